//! What the canonical-scale step does to each dataset (`ma-trainer info --dataset ...`):
//! photo sizes, field-of-view diameters, the scale applied, and the size of the MAs after
//! scaling. The cascade assumes MAs are the same size in pixels on every camera; this is
//! where that is checked.

use crate::prepare::{PreparedImage, dataset_names};

/// One dataset's figures.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetStats {
    pub dataset: String,
    pub images: usize,
    pub lesions: usize,
    /// Distinct photo sizes (width, height), sorted.
    pub sizes: Vec<(u32, u32)>,
    /// FOV diameter in original pixels: minimum, median, maximum.
    pub fov_diameter: [f64; 3],
    /// Length scale (canonical pixels per original pixel): minimum, median, maximum.
    pub scale: [f64; 3],
    /// Equivalent diameter `2 sqrt(area / pi)` of each lesion in original pixels:
    /// 10th, 50th and 90th percentile.
    pub ma_diameter_original: [f64; 3],
    /// The same after the canonical-scale step (what the networks see).
    pub ma_diameter_canonical: [f64; 3],
}

/// Figures per dataset, in order of first appearance.
pub fn dataset_stats(images: &[PreparedImage]) -> Vec<DatasetStats> {
    dataset_names(images)
        .into_iter()
        .map(|name| {
            let mine: Vec<&PreparedImage> = images.iter().filter(|im| im.dataset == name).collect();
            let mut sizes: Vec<(u32, u32)> = mine.iter().map(|im| im.pre.original_size).collect();
            sizes.sort();
            sizes.dedup();
            let fov: Vec<f64> = mine.iter().map(|im| im.pre.original_fov_diameter).collect();
            let scale: Vec<f64> = mine.iter().map(|im| im.pre.scale.length_scale()).collect();
            let mut original = Vec::new();
            let mut canonical = Vec::new();
            for im in &mine {
                let s = im.pre.scale.length_scale();
                for l in &im.truth.lesions {
                    let d = 2.0 * (l.pixels.len() as f64 / std::f64::consts::PI).sqrt();
                    original.push(d);
                    canonical.push(d * s);
                }
            }
            DatasetStats {
                dataset: name,
                images: mine.len(),
                lesions: original.len(),
                sizes,
                fov_diameter: quantiles(&fov, [0.0, 0.5, 1.0]),
                scale: quantiles(&scale, [0.0, 0.5, 1.0]),
                ma_diameter_original: quantiles(&original, [0.1, 0.5, 0.9]),
                ma_diameter_canonical: quantiles(&canonical, [0.1, 0.5, 0.9]),
            }
        })
        .collect()
}

/// Nearest-rank quantiles; NaN for no values.
fn quantiles(values: &[f64], qs: [f64; 3]) -> [f64; 3] {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    qs.map(|q| {
        if v.is_empty() {
            f64::NAN
        } else {
            v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<f64> = (1..=11).map(f64::from).collect();
        assert_eq!(quantiles(&v, [0.1, 0.5, 0.9]), [2.0, 6.0, 10.0]);
        assert_eq!(quantiles(&[3.0], [0.0, 0.5, 1.0]), [3.0; 3]);
        assert!(quantiles(&[], [0.5; 3])[0].is_nan());
    }
}
