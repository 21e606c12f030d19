//! Training images made ready once: preprocessed exactly as on the device, with their
//! ground truth mapped to canonical (preprocessed) pixels.

use anyhow::{Context, Result};

use ma_core::image_io::read_image;
use ma_core::mask::Mask;
use ma_core::preprocess::{FovSource, PreprocessConfig, Preprocessed, preprocess};

use crate::camera_aug::CameraAugment;
use crate::datasets::DatasetImage;
use crate::ground_truth::GroundTruth;

/// Negatives are never drawn closer than this (canonical pixels) to a lesion or an
/// uncertain pixel: stage-1 MA cells reach 3 px from a lesion centre, and a patch centred
/// just beside an MA is not a fair "no MA" example.
pub const NEGATIVE_EXCLUSION: usize = 10;

/// One training image.
pub struct PreparedImage {
    /// Which dataset it comes from (e.g. "DiaretDB1"): folds are made per dataset and
    /// the CV reports each dataset's figures.
    pub dataset: String,
    pub name: String,
    /// A camera-augmented training copy of image `i` (see [`crate::camera_aug`]): trained
    /// on with its source, never held out or scored. `None` for the photos themselves.
    pub copy_of: Option<usize>,
    pub pre: Preprocessed,
    /// Ground truth in original coordinates (for FROC scoring).
    pub truth: GroundTruth,
    /// One canonical pixel per lesion: the lesion pixel nearest its centroid.
    pub lesion_centres: Vec<(usize, usize)>,
    /// Canonical pixels where negatives may not be drawn.
    pub exclusion: Mask,
}

impl PreparedImage {
    /// Preprocess one image of `dataset` (FOV estimated, as on the device).
    pub fn load(dataset: &str, image: &DatasetImage, cfg: &PreprocessConfig) -> Result<Self> {
        Ok(Self::load_with_copies(dataset, image, 0, cfg, &CameraAugment::OFF)?.0)
    }

    /// The image and its camera-augmented copies (`aug.copies` of them; `index` is the
    /// image's place in the run, which seeds them). The copies point at `index`.
    fn load_with_copies(
        dataset: &str,
        image: &DatasetImage,
        index: usize,
        cfg: &PreprocessConfig,
        aug: &CameraAugment,
    ) -> Result<(Self, Vec<Self>)> {
        let rgb = read_image(&image.path)?;
        let truth = image.load_truth()?;
        let pre = preprocess(&rgb, FovSource::Estimate, cfg)
            .with_context(|| format!("preprocessing {}", image.path.display()))?;
        let mut copies = Vec::with_capacity(aug.copies);
        for k in 0..aug.copies {
            let (degraded, copy_cfg) = aug.degrade(&rgb, cfg, index, k)?;
            // The ground truth is in original pixels; a shrunk copy needs it rescaled.
            let copy_truth = truth.resized(degraded.dimensions());
            let copy_pre =
                preprocess(&degraded, FovSource::Estimate, &copy_cfg).with_context(|| {
                    format!("preprocessing camera copy {k} of {}", image.path.display())
                })?;
            let mut c = Self::from_parts(
                dataset,
                format!("{}#camera-copy-{}", image.name, k + 1),
                copy_pre,
                copy_truth,
            );
            c.copy_of = Some(index);
            copies.push(c);
        }
        Ok((
            Self::from_parts(dataset, image.name.clone(), pre, truth),
            copies,
        ))
    }

    pub fn from_parts(dataset: &str, name: String, pre: Preprocessed, truth: GroundTruth) -> Self {
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
            dataset: dataset.to_owned(),
            name,
            copy_of: None,
            pre,
            truth,
            lesion_centres,
            exclusion,
        }
    }
}

/// The datasets of `images`, in order of first appearance.
pub fn dataset_names(images: &[PreparedImage]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for im in images {
        if !names.contains(&im.dataset) {
            names.push(im.dataset.clone());
        }
    }
    names
}

/// Load and preprocess every image of every `(dataset name, images)` pair, in that order,
/// on all cores, with a progress bar; then the camera-augmented copies (`aug`), after all
/// the photos, so a photo's index does not depend on the augmentation. Image names must be
/// unique across the datasets: CV detection files and `eval` match lines by name.
pub fn prepare_all(
    datasets: &[(String, Vec<DatasetImage>)],
    cfg: &PreprocessConfig,
    aug: &CameraAugment,
) -> Result<Vec<PreparedImage>> {
    let jobs: Vec<(&str, &DatasetImage)> = datasets
        .iter()
        .flat_map(|(name, images)| images.iter().map(move |im| (name.as_str(), im)))
        .collect();
    let mut seen = std::collections::HashMap::new();
    for (dataset, im) in &jobs {
        if let Some(other) = seen.insert(im.name.as_str(), (*dataset, &im.path)) {
            anyhow::bail!(
                "image name {} is in two datasets ({}: {}, {dataset}: {}); names must be \
                 unique across the datasets of one run",
                im.name,
                other.0,
                other.1.display(),
                im.path.display()
            );
        }
    }
    let loaded = crate::parallel::map_in_order(&jobs, "preprocessing", |k, (dataset, image)| {
        PreparedImage::load_with_copies(dataset, image, k, cfg, aug)
    })?;
    let mut out = Vec::with_capacity(jobs.len() * (1 + aug.copies));
    let mut copies = Vec::new();
    for (image, c) in loaded {
        out.push(image);
        copies.extend(c);
    }
    out.extend(copies);
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
