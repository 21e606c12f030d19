//! Lesion-level ground truth, in original image pixel coordinates, shared by all
//! dataset readers and by the FROC scorer.

use ma_device::mask::Mask;

/// One annotated microaneurysm: the pixels it covers.
#[derive(Clone, Debug, PartialEq)]
pub struct Lesion {
    /// `(x, y)` pixels, pixel centres at integers; never empty.
    pub pixels: Vec<(u32, u32)>,
}

impl Lesion {
    /// Mean of the lesion's pixel centres.
    pub fn centroid(&self) -> (f64, f64) {
        let n = self.pixels.len() as f64;
        let (sx, sy) = self.pixels.iter().fold((0.0, 0.0), |(sx, sy), &(x, y)| {
            (sx + x as f64, sy + y as f64)
        });
        (sx / n, sy / n)
    }

    /// A filled disk of pixel centres within `radius` of `(cx, cy)`, clipped to the image
    /// (ROC marks). At least the centre pixel, so a lesion is never empty.
    pub fn disk(cx: f64, cy: f64, radius: f64, width: u32, height: u32) -> Self {
        let mut pixels = Vec::new();
        let r = radius.max(0.0);
        let (y0, y1) = (
            (cy - r).floor().max(0.0),
            (cy + r).ceil().min(height as f64 - 1.0),
        );
        let (x0, x1) = (
            (cx - r).floor().max(0.0),
            (cx + r).ceil().min(width as f64 - 1.0),
        );
        let mut y = y0;
        while y <= y1 {
            let mut x = x0;
            while x <= x1 {
                if (x - cx).powi(2) + (y - cy).powi(2) <= r * r {
                    pixels.push((x as u32, y as u32));
                }
                x += 1.0;
            }
            y += 1.0;
        }
        if pixels.is_empty() {
            let clamp = |v: f64, hi: u32| v.round().clamp(0.0, hi as f64 - 1.0) as u32;
            pixels.push((clamp(cx, width), clamp(cy, height)));
        }
        Self { pixels }
    }
}

/// Everything the scorer needs to know about one image.
#[derive(Clone, Debug, PartialEq)]
pub struct GroundTruth {
    pub width: u32,
    pub height: u32,
    /// Empty for a healthy image.
    pub lesions: Vec<Lesion>,
    /// Pixels where a detection is neither a true nor a false positive
    /// (DiaretDB1: 0 < confidence < threshold). `None` when the dataset has none.
    pub uncertain: Option<Mask>,
}

impl GroundTruth {
    /// The MAs a synthetic frame was drawn with, as disk lesions (look-alikes are not
    /// lesions: detections on them are false positives).
    pub fn from_synthetic(frame: &ma_device::synthetic::SyntheticFundus) -> Self {
        let (width, height) = frame.image.dimensions();
        Self {
            width,
            height,
            lesions: frame
                .microaneurysms
                .iter()
                .map(|m| Lesion::disk(m.x, m.y, m.radius, width, height))
                .collect(),
            uncertain: None,
        }
    }
}
