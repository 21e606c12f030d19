//! Training patches: where they are cut, how they are augmented, how they become a batch.
//!
//! A patch is labelled by its centre pixel. Positives are centred on an MA (its pixel
//! nearest the centroid) shifted by up to `jitter` pixels, so the network learns "an MA
//! lies within `jitter` px of my centre"; negatives are centred on FOV pixels at least
//! [`crate::prepare::NEGATIVE_EXCLUSION`] px from any lesion or uncertain pixel.

use ma_core::geometry::{CHANNELS, PatchGeometry};
use rand::Rng;
use tch::{Kind, Tensor};

use crate::prepare::PreparedImage;

/// One patch to cut: image index, canonical centre, label and augmentation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub image: usize,
    pub x: i64,
    pub y: i64,
    pub label: bool,
    /// One of the 8 flips/rotations (0 = identity).
    pub dihedral: u8,
    /// Contrast gain and brightness offset applied to the normalised values.
    pub gain: f32,
    pub bias: f32,
}

/// Augmentation ranges.
#[derive(Clone, Copy, Debug)]
pub struct Augment {
    pub gain: f32,
    pub bias: f32,
}

impl Augment {
    pub const DEFAULT: Augment = Augment {
        gain: 0.1,
        bias: 0.1,
    };
    pub const NONE: Augment = Augment {
        gain: 0.0,
        bias: 0.0,
    };
}

impl Sample {
    pub fn new(
        image: usize,
        x: i64,
        y: i64,
        label: bool,
        aug: Augment,
        rng: &mut impl Rng,
    ) -> Self {
        let augmenting = aug.gain > 0.0 || aug.bias > 0.0;
        Self {
            image,
            x,
            y,
            label,
            dihedral: if augmenting {
                rng.random_range(0..8)
            } else {
                0
            },
            gain: 1.0
                + if aug.gain > 0.0 {
                    rng.random_range(-aug.gain..aug.gain)
                } else {
                    0.0
                },
            bias: if aug.bias > 0.0 {
                rng.random_range(-aug.bias..aug.bias)
            } else {
                0.0
            },
        }
    }
}

/// A positive at every lesion centre of `images[i]`, shifted by up to `jitter` px.
pub fn positives(
    images: &[PreparedImage],
    subset: &[usize],
    jitter: i64,
    aug: Augment,
    rng: &mut impl Rng,
) -> Vec<Sample> {
    let mut out = Vec::new();
    for &i in subset {
        for &(x, y) in &images[i].lesion_centres {
            let (dx, dy) = if jitter > 0 {
                (
                    rng.random_range(-jitter..=jitter),
                    rng.random_range(-jitter..=jitter),
                )
            } else {
                (0, 0)
            };
            out.push(Sample::new(i, x as i64 + dx, y as i64 + dy, true, aug, rng));
        }
    }
    out
}

/// `n` random negatives (FOV pixels outside the exclusion zone) spread evenly over the
/// images of `subset`.
pub fn random_negatives(
    images: &[PreparedImage],
    subset: &[usize],
    n: usize,
    aug: Augment,
    rng: &mut impl Rng,
) -> Vec<Sample> {
    let mut out = Vec::with_capacity(n);
    if subset.is_empty() {
        return out;
    }
    for k in 0..n {
        let i = subset[k % subset.len()];
        let img = &images[i];
        let Some((x0, y0, x1, y1)) = img.pre.fov.bounding_box() else {
            continue;
        };
        // The FOV fills most of its bounding box: few tries are needed.
        for _ in 0..1000 {
            let (x, y) = (rng.random_range(x0..=x1), rng.random_range(y0..=y1));
            if img.pre.fov.get(x as i64, y as i64) && !img.exclusion.get(x as i64, y as i64) {
                out.push(Sample::new(i, x as i64, y as i64, false, aug, rng));
                break;
            }
        }
    }
    out
}

/// Cut, augment and stack samples into an N x 3 x S x S tensor and an N label tensor.
pub fn batch(images: &[PreparedImage], samples: &[Sample], geo: PatchGeometry) -> (Tensor, Tensor) {
    let len = geo.len();
    let mut data = vec![0.0f32; samples.len() * len];
    let mut patch = vec![0.0f32; len];
    for (s, out) in samples.iter().zip(data.chunks_exact_mut(len)) {
        geo.extract(&images[s.image].pre.planes, s.x, s.y, &mut patch);
        dihedral(&patch, out, geo.size, s.dihedral);
        brighten(out, s.gain, s.bias);
    }
    let n = samples.len() as i64;
    let s = geo.size as i64;
    let xs = Tensor::from_slice(&data).view([n, CHANNELS as i64, s, s]);
    let labels: Vec<i64> = samples.iter().map(|s| s.label as i64).collect();
    (xs, Tensor::from_slice(&labels).to_kind(Kind::Int64))
}

/// Apply one of the 8 symmetries of the square to a CHW patch of side `s`.
pub fn dihedral(src: &[f32], dst: &mut [f32], s: usize, k: u8) {
    for c in 0..CHANNELS {
        dihedral_plane(
            &src[c * s * s..][..s * s],
            &mut dst[c * s * s..][..s * s],
            s,
            k,
        );
    }
}

/// Contrast and brightness augmentation: `v * gain + bias` on every non-zero value, so
/// that outside the FOV stays exactly 0, as preprocessing leaves it.
pub fn brighten(values: &mut [f32], gain: f32, bias: f32) {
    if gain != 1.0 || bias != 0.0 {
        for v in values.iter_mut().filter(|v| **v != 0.0) {
            *v = *v * gain + bias;
        }
    }
}

/// Apply one of the 8 symmetries of the square to one `s` x `s` plane (pixels, or the
/// labels of a tile's cells).
pub fn dihedral_plane<T: Copy>(src: &[T], dst: &mut [T], s: usize, k: u8) {
    let (transpose, flip_x, flip_y) = (k & 4 != 0, k & 1 != 0, k & 2 != 0);
    for y in 0..s {
        for x in 0..s {
            let (mut sx, mut sy) = if transpose { (y, x) } else { (x, y) };
            if flip_x {
                sx = s - 1 - sx;
            }
            if flip_y {
                sy = s - 1 - sy;
            }
            dst[y * s + x] = src[sy * s + sx];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eight_symmetries_are_distinct_and_keep_the_centre() {
        let s = 5;
        let src: Vec<f32> = (0..CHANNELS * s * s).map(|v| v as f32).collect();
        let mut seen = Vec::new();
        for k in 0..8 {
            let mut dst = vec![0.0; src.len()];
            dihedral(&src, &mut dst, s, k);
            assert_eq!(dst[12], src[12], "centre pixel of channel 0");
            let mut sorted = dst.clone();
            sorted.sort_by(f32::total_cmp);
            assert_eq!(sorted, src, "a permutation");
            assert!(!seen.contains(&dst));
            seen.push(dst);
        }
    }
}
