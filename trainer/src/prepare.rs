//! Training images made ready once: preprocessed exactly as on the device, with their
//! ground truth mapped to canonical (preprocessed) pixels.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use ma_device::image_io::read_image;
use ma_device::mask::Mask;
use ma_device::preprocess::{FovSource, PreprocessConfig, Preprocessed, preprocess};

use crate::datasets::DatasetImage;
use crate::ground_truth::GroundTruth;

/// Negatives are never drawn closer than this (canonical pixels) to a lesion or an
/// uncertain pixel: stage-1 MA cells reach 3 px from a lesion centre, and a patch centred
/// just beside an MA is not a fair "no MA" example.
pub const NEGATIVE_EXCLUSION: usize = 10;

/// One training image.
pub struct PreparedImage {
    pub name: String,
    pub pre: Preprocessed,
    /// Ground truth in original coordinates (for FROC scoring).
    pub truth: GroundTruth,
    /// One canonical pixel per lesion: the lesion pixel nearest its centroid.
    pub lesion_centres: Vec<(usize, usize)>,
    /// Canonical pixels where negatives may not be drawn.
    pub exclusion: Mask,
}

impl PreparedImage {
    /// Preprocess one dataset image (FOV estimated, as on the device).
    pub fn load(image: &DatasetImage, cfg: &PreprocessConfig) -> Result<Self> {
        let rgb = read_image(&image.path)?;
        let truth = image.load_truth()?;
        let pre = preprocess(&rgb, FovSource::Estimate, cfg)
            .with_context(|| format!("preprocessing {}", image.path.display()))?;
        Ok(Self::from_parts(image.name.clone(), pre, truth))
    }

    pub fn from_parts(name: String, pre: Preprocessed, truth: GroundTruth) -> Self {
        let (w, h) = (pre.planes.width, pre.planes.height);
        let to_canonical = |x: f64, y: f64| {
            let (cx, cy) = pre.scale.to_canonical(x, y);
            (
                cx.round().clamp(0.0, w as f64 - 1.0) as usize,
                cy.round().clamp(0.0, h as f64 - 1.0) as usize,
            )
        };
        let lesion_centres = truth
            .lesions
            .iter()
            .map(|l| {
                let (cx, cy) = l.centroid();
                let &(x, y) = l
                    .pixels
                    .iter()
                    .min_by(|a, b| {
                        let d =
                            |p: &(u32, u32)| (p.0 as f64 - cx).powi(2) + (p.1 as f64 - cy).powi(2);
                        d(a).total_cmp(&d(b))
                    })
                    .expect("lesions are never empty");
                to_canonical(x as f64, y as f64)
            })
            .collect();
        let mut marked = Mask::new(w as u32, h as u32);
        for l in &truth.lesions {
            for &(x, y) in &l.pixels {
                let (cx, cy) = to_canonical(x as f64, y as f64);
                marked.set(cx as u32, cy as u32, true);
            }
        }
        if let Some(u) = &truth.uncertain {
            for (i, _) in u.as_slice().iter().enumerate().filter(|(_, v)| **v) {
                let (x, y) = (i % u.width() as usize, i / u.width() as usize);
                let (cx, cy) = to_canonical(x as f64, y as f64);
                marked.set(cx as u32, cy as u32, true);
            }
        }
        let exclusion = dilate_square(&marked, NEGATIVE_EXCLUSION);
        Self {
            name,
            pre,
            truth,
            lesion_centres,
            exclusion,
        }
    }
}

/// Load and preprocess every image, with a progress bar.
pub fn prepare_all(images: &[DatasetImage], cfg: &PreprocessConfig) -> Result<Vec<PreparedImage>> {
    let bar = ProgressBar::new(images.len() as u64).with_style(
        ProgressStyle::with_template("preprocessing {bar:30} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    let mut out = Vec::with_capacity(images.len());
    for image in images {
        bar.set_message(image.name.clone());
        out.push(PreparedImage::load(image, cfg)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// Set every pixel within Chebyshev distance `r` of a set pixel (separable box max).
pub fn dilate_square(mask: &Mask, r: usize) -> Mask {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let src = mask.as_slice();
    let mut rows = vec![false; w * h];
    for y in 0..h {
        let row = &src[y * w..][..w];
        // Distance to the nearest set pixel to the left / right along the row.
        let mut last: Option<usize> = None;
        for x in 0..w {
            if row[x] {
                last = Some(x);
            }
            if last.is_some_and(|l| x - l <= r) {
                rows[y * w + x] = true;
            }
        }
        last = None;
        for x in (0..w).rev() {
            if row[x] {
                last = Some(x);
            }
            if last.is_some_and(|l| l - x <= r) {
                rows[y * w + x] = true;
            }
        }
    }
    let mut out = vec![false; w * h];
    for x in 0..w {
        let mut last: Option<usize> = None;
        for y in 0..h {
            if rows[y * w + x] {
                last = Some(y);
            }
            if last.is_some_and(|l| y - l <= r) {
                out[y * w + x] = true;
            }
        }
        last = None;
        for y in (0..h).rev() {
            if rows[y * w + x] {
                last = Some(y);
            }
            if last.is_some_and(|l| l - y <= r) {
                out[y * w + x] = true;
            }
        }
    }
    Mask::from_vec(w as u32, h as u32, out).expect("same size")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dilation_is_a_square() {
        let mut m = Mask::new(20, 20);
        m.set(10, 10, true);
        let d = dilate_square(&m, 3);
        assert_eq!(d.count(), 49);
        assert!(d.get(7, 7) && d.get(13, 13) && !d.get(6, 10) && !d.get(10, 14));
    }
}
