//! Lesion-level ground truth, in original image pixel coordinates, shared by all
//! dataset readers and by the FROC scorer.

use ma_core::mask::Mask;

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
    /// The same truth for the image resampled to `size` (pixel edges scale, as in
    /// [`ma_core::geometry::ScaleMap`]); a lesion keeps at least one pixel.
    pub fn resized(&self, size: (u32, u32)) -> Self {
        if size == (self.width, self.height) {
            return self.clone();
        }
        let map = ma_core::geometry::ScaleMap::between((self.width, self.height), size);
        let to = |x: u32, y: u32| {
            let (nx, ny) = map.to_canonical(x as f64, y as f64);
            (
                nx.round().clamp(0.0, size.0 as f64 - 1.0) as u32,
                ny.round().clamp(0.0, size.1 as f64 - 1.0) as u32,
            )
        };
        let lesions = self
            .lesions
            .iter()
            .map(|l| {
                let mut pixels: Vec<(u32, u32)> = l.pixels.iter().map(|&(x, y)| to(x, y)).collect();
                pixels.sort_by_key(|&(x, y)| (y, x));
                pixels.dedup();
                Lesion { pixels }
            })
            .collect();
        let uncertain = self.uncertain.as_ref().map(|u| {
            let mut m = Mask::new(size.0, size.1);
            for (i, _) in u.as_slice().iter().enumerate().filter(|(_, v)| **v) {
                let (x, y) = to(i as u32 % u.width(), i as u32 / u.width());
                m.set(x, y, true);
            }
            m
        });
        Self {
            width: size.0,
            height: size.1,
            lesions,
            uncertain,
        }
    }

    /// The MAs a synthetic frame was drawn with, as disk lesions (look-alikes are not
    /// lesions: detections on them are false positives).
    pub fn from_synthetic(frame: &ma_synthetic::SyntheticFundus) -> Self {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resized_truth_follows_the_pixels() {
        let mut uncertain = Mask::new(100, 80);
        uncertain.set(99, 79, true);
        let gt = GroundTruth {
            width: 100,
            height: 80,
            lesions: vec![
                Lesion::disk(50.0, 40.0, 2.0, 100, 80),
                Lesion {
                    pixels: vec![(0, 0)],
                },
            ],
            uncertain: Some(uncertain),
        };
        assert_eq!(gt.resized((100, 80)), gt);
        let half = gt.resized((50, 40));
        assert_eq!((half.width, half.height), (50, 40));
        assert_eq!(half.lesions.len(), 2);
        let (cx, cy) = half.lesions[0].centroid();
        assert!(
            (cx - 24.75).abs() < 0.6 && (cy - 19.75).abs() < 0.6,
            "{cx} {cy}"
        );
        assert!(half.lesions[0].pixels.len() < gt.lesions[0].pixels.len());
        assert_eq!(half.lesions[1].pixels, [(0, 0)]);
        let u = half.uncertain.unwrap();
        assert!(u.get(49, 39) && u.count() == 1);
    }
}
