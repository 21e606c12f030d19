//! Stage-1 training data: crops of the preprocessed images in which every output cell of
//! the stride-2 map is labelled.
//!
//! Stage 1 is fully convolutional, so training it on a 128x128 crop trains 64x64 cell
//! classifiers at once, and its negatives are every vessel crossing, pigment spot and
//! haemorrhage edge the device will meet there, not a few random draws.
//!
//! Pixel labels ([`PixelLabels`]): MA within [`POSITIVE_RADIUS`] px of a lesion centre;
//! ignored in the exclusion zone around lesions and uncertain marks
//! ([`crate::prepare::NEGATIVE_EXCLUSION`]) and outside the field of view (the device never
//! looks there); non-MA everywhere else. A cell (2x2 pixels) is MA if any of its pixels is,
//! else ignored if any is, else non-MA.

use ma_core::geometry::{CHANNELS, extract_window};
use rand::Rng;
use tch::{Kind, Reduction, Tensor};

use crate::nets::Stage;
use crate::patches::{Augment, brighten, dihedral, dihedral_plane};
use crate::prepare::PreparedImage;

/// Label of a cell or pixel that does not count in the loss.
pub const IGNORE: i8 = -1;

/// Pixels within this distance (canonical px) of a lesion centre are MA. DiaretDB1 marks
/// are mostly disks of radius ~3 (median lesion area 33 px).
pub const POSITIVE_RADIUS: f64 = 3.0;

/// Side of a training crop (canonical px); a multiple of
/// [`Stage::CANDIDATES_INPUT_MULTIPLE`].
pub const CROP_SIDE: usize = 128;

/// Per-pixel training labels of one image: 1 MA, 0 non-MA, [`IGNORE`].
pub struct PixelLabels {
    pub width: usize,
    pub height: usize,
    pub data: Vec<i8>,
}

impl PixelLabels {
    pub fn of(image: &PreparedImage) -> Self {
        let (w, h) = (image.pre.planes.width, image.pre.planes.height);
        let mut data: Vec<i8> = image
            .pre
            .fov
            .as_slice()
            .iter()
            .zip(image.exclusion.as_slice())
            .map(|(&in_fov, &excluded)| if in_fov && !excluded { 0 } else { IGNORE })
            .collect();
        let r = POSITIVE_RADIUS.ceil() as i64;
        for &(cx, cy) in &image.lesion_centres {
            for dy in -r..=r {
                for dx in -r..=r {
                    let (x, y) = (cx as i64 + dx, cy as i64 + dy);
                    let inside = x >= 0 && y >= 0 && (x as usize) < w && (y as usize) < h;
                    if inside && ((dx * dx + dy * dy) as f64) <= POSITIVE_RADIUS.powi(2) {
                        data[y as usize * w + x as usize] = 1;
                    }
                }
            }
        }
        Self {
            width: w,
            height: h,
            data,
        }
    }

    /// Label at `(x, y)`; [`IGNORE`] beyond the image.
    fn get(&self, x: i64, y: i64) -> i8 {
        if x < 0 || y < 0 || x as usize >= self.width || y as usize >= self.height {
            IGNORE
        } else {
            self.data[y as usize * self.width + x as usize]
        }
    }

    /// Cell labels of the `side` x `side` crop at `(x0, y0)`: `side / 2` squared, row-major.
    pub fn cells(&self, x0: i64, y0: i64, side: usize) -> Vec<i8> {
        let s = Stage::CANDIDATES_STRIDE;
        let k = side / s;
        let mut out = Vec::with_capacity(k * k);
        for i in 0..k {
            for j in 0..k {
                let mut label = 0;
                for dy in 0..s {
                    for dx in 0..s {
                        let v = self.get(x0 + (j * s + dx) as i64, y0 + (i * s + dy) as i64);
                        label = match (label, v) {
                            (1, _) | (_, 1) => 1,
                            (IGNORE, _) | (_, IGNORE) => IGNORE,
                            _ => 0,
                        };
                    }
                }
                out.push(label);
            }
        }
        out
    }
}

/// One crop to cut: image, top-left corner (canonical px), augmentation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Crop {
    pub image: usize,
    pub x0: i64,
    pub y0: i64,
    /// One of the 8 flips/rotations (0 = identity).
    pub dihedral: u8,
    pub gain: f32,
    pub bias: f32,
}

impl Crop {
    /// The crop centred on `(cx, cy)`, randomly augmented.
    fn centred(image: usize, cx: i64, cy: i64, aug: Augment, rng: &mut impl Rng) -> Self {
        let s = crate::patches::Sample::new(image, cx, cy, false, aug, rng);
        let half = (CROP_SIDE / 2) as i64;
        Self {
            image,
            x0: cx - half,
            y0: cy - half,
            dihedral: s.dihedral,
            gain: s.gain,
            bias: s.bias,
        }
    }
}

/// `n` crops each holding a lesion of `subset` (drawn uniformly over all its lesions) at
/// a random place within 56 px of the crop's centre (at least 7 px from its edges).
pub fn lesion_crops(
    images: &[PreparedImage],
    subset: &[usize],
    n: usize,
    aug: Augment,
    rng: &mut impl Rng,
) -> Vec<Crop> {
    let lesions: Vec<(usize, (usize, usize))> = subset
        .iter()
        .flat_map(|&i| images[i].lesion_centres.iter().map(move |&c| (i, c)))
        .collect();
    if lesions.is_empty() {
        return Vec::new();
    }
    let reach = (CROP_SIDE / 2 - 8) as i64;
    (0..n)
        .map(|_| {
            let (i, (x, y)) = lesions[rng.random_range(0..lesions.len())];
            let cx = x as i64 + rng.random_range(-reach..=reach);
            let cy = y as i64 + rng.random_range(-reach..=reach);
            Crop::centred(i, cx, cy, aug, rng)
        })
        .collect()
}

/// `n` crops centred on random field-of-view pixels of random images of `subset`.
pub fn random_crops(
    images: &[PreparedImage],
    subset: &[usize],
    n: usize,
    aug: Augment,
    rng: &mut impl Rng,
) -> Vec<Crop> {
    let mut out = Vec::with_capacity(n);
    if subset.is_empty() {
        return out;
    }
    while out.len() < n {
        let i = subset[rng.random_range(0..subset.len())];
        let fov = &images[i].pre.fov;
        let Some((x0, y0, x1, y1)) = fov.bounding_box() else {
            // An image without field of view gives no crop; the others still do.
            if subset.iter().all(|&k| images[k].pre.fov.count() == 0) {
                break;
            }
            continue;
        };
        let (x, y) = (rng.random_range(x0..=x1), rng.random_range(y0..=y1));
        if fov.get(x as i64, y as i64) {
            out.push(Crop::centred(i, x as i64, y as i64, aug, rng));
        }
    }
    out
}

/// Cut, augment and stack crops: N x 3 x S x S inputs and N x S/2 x S/2 cell labels (int64).
pub fn crop_batch(
    images: &[PreparedImage],
    labels: &[PixelLabels],
    crops: &[Crop],
) -> (Tensor, Tensor) {
    let side = CROP_SIDE;
    let cells = side / Stage::CANDIDATES_STRIDE;
    let len = CHANNELS * side * side;
    let mut data = vec![0.0f32; crops.len() * len];
    let mut targets = vec![0i64; crops.len() * cells * cells];
    let mut raw = vec![0.0f32; len];
    for ((c, out), lab) in crops
        .iter()
        .zip(data.chunks_exact_mut(len))
        .zip(targets.chunks_exact_mut(cells * cells))
    {
        extract_window(
            &images[c.image].pre.planes,
            c.x0,
            c.y0,
            side,
            side,
            &mut raw,
        );
        dihedral(&raw, out, side, c.dihedral);
        brighten(out, c.gain, c.bias);
        // An even side maps cell j onto cell k - 1 - j under a flip, as it maps pixels
        // 2j, 2j + 1 onto 2(k - 1 - j) + 1, 2(k - 1 - j): the same symmetry labels the
        // transformed crop.
        let cell_labels: Vec<i64> = labels[c.image]
            .cells(c.x0, c.y0, side)
            .into_iter()
            .map(i64::from)
            .collect();
        dihedral_plane(&cell_labels, lab, cells, c.dihedral);
    }
    let (n, s, k) = (crops.len() as i64, side as i64, cells as i64);
    (
        Tensor::from_slice(&data).view([n, CHANNELS as i64, s, s]),
        Tensor::from_slice(&targets).view([n, k, k]),
    )
}

/// Class-balanced cross-entropy over the labelled cells of `logits` (N x 2 x k x k): MA
/// cells and non-MA cells each weigh one half, however few MA cells a batch holds;
/// ignored cells do not count.
pub fn balanced_cell_loss(logits: &Tensor, labels: &Tensor) -> Tensor {
    let ce =
        logits.cross_entropy_loss::<Tensor>(&labels.clamp_min(0), None, Reduction::None, -100, 0.0);
    let mean_over = |class: i64| {
        let m = labels.eq(class).to_kind(Kind::Float);
        (&ce * &m).sum(Kind::Float) / m.sum(Kind::Float).clamp_min(1.0)
    };
    (mean_over(1) + mean_over(0)) * 0.5
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ground_truth::GroundTruth;
    use ma_core::preprocess::{FovSource, PreprocessConfig, preprocess};
    use ma_synthetic::{SyntheticParams, generate};
    use rand::SeedableRng;

    /// A small synthetic photo with known MAs, prepared as for training.
    pub(crate) fn synthetic_image() -> PreparedImage {
        let frame = generate(&SyntheticParams::small(), 5);
        let pre = preprocess(
            &frame.image,
            FovSource::Estimate,
            &PreprocessConfig::default(),
        )
        .expect("preprocess");
        PreparedImage::from_parts(
            "synthetic",
            "s".into(),
            pre,
            GroundTruth::from_synthetic(&frame),
        )
    }

    #[test]
    fn labels_mark_a_disk_round_each_lesion_centre() {
        let img = synthetic_image();
        let labels = PixelLabels::of(&img);
        let (x, y) = img.lesion_centres[0];
        let (x, y) = (x as i64, y as i64);
        assert_eq!(labels.get(x, y), 1);
        assert_eq!(labels.get(x + 3, y), 1);
        assert_eq!(labels.get(x + 2, y + 2), 1, "2.83 px away");
        assert_eq!(labels.get(x + 3, y + 1), IGNORE, "3.16 px: exclusion zone");
        assert_eq!(labels.get(-1, 0), IGNORE);
        // Somewhere in the FOV far from every lesion and mark is a non-MA pixel.
        assert!(labels.data.contains(&0));
    }

    #[test]
    fn a_cell_is_ma_if_any_of_its_pixels_is() {
        let labels = PixelLabels {
            width: 4,
            height: 4,
            data: vec![
                0, 0, 0, 0, //
                0, 1, 0, IGNORE, //
                0, 0, 0, 0, //
                0, 0, 0, 0,
            ],
        };
        assert_eq!(labels.cells(0, 0, 4), vec![1, IGNORE, 0, 0]);
        // Shifted by one pixel the MA pixel lands in cell (0, 0) again, the ignored one in
        // cell (0, 1), and the crop reaches past the image (ignored).
        assert_eq!(labels.cells(1, 1, 4), vec![1, IGNORE, IGNORE, IGNORE]);
    }

    /// Where pixel `(px, py)` of an `s` x `s` plane lands under symmetry `k` of
    /// [`dihedral_plane`].
    fn image_of(px: usize, py: usize, s: usize, k: u8) -> (usize, usize) {
        let src = (0..s * s).collect::<Vec<_>>();
        let mut dst = vec![0; s * s];
        dihedral_plane(&src, &mut dst, s, k);
        let at = dst.iter().position(|&v| v == py * s + px).unwrap();
        (at % s, at / s)
    }

    #[test]
    fn crops_and_their_labels_follow_the_same_symmetry() {
        let img = synthetic_image();
        let labels = vec![PixelLabels::of(&img)];
        let images = [img];
        let (x, y) = images[0].lesion_centres[0];
        let k = CROP_SIDE / Stage::CANDIDATES_STRIDE;
        let crop = |d| Crop {
            image: 0,
            x0: x as i64 - 20,
            y0: y as i64 - 30,
            dihedral: d,
            gain: 1.0,
            bias: 0.0,
        };
        let (xs0, ys0) = crop_batch(&images, &labels, &[crop(0)]);
        assert_eq!(xs0.size(), [1, 3, CROP_SIDE as i64, CROP_SIDE as i64]);
        assert_eq!(ys0.size(), [1, k as i64, k as i64]);
        let plane =
            |t: &Tensor, c: i64| Vec::<f32>::try_from(&t.get(0).get(c).flatten(0, -1)).unwrap();
        let cells = |t: &Tensor| Vec::<i64>::try_from(&t.get(0).flatten(0, -1)).unwrap();
        for d in 0..8u8 {
            let (xs, ys) = crop_batch(&images, &labels, &[crop(d)]);
            // Pixels and labels are the untransformed crop's, under the same symmetry.
            for c in 0..CHANNELS as i64 {
                let mut want = vec![0.0; CROP_SIDE * CROP_SIDE];
                dihedral_plane(&plane(&xs0, c), &mut want, CROP_SIDE, d);
                assert_eq!(plane(&xs, c), want, "symmetry {d}, channel {c}");
            }
            let mut want = vec![0; k * k];
            dihedral_plane(&cells(&ys0), &mut want, k, d);
            assert_eq!(cells(&ys), want, "symmetry {d}");
            // The lesion centre, wherever the symmetry puts it, is in an MA cell.
            let (px, py) = image_of(20, 30, CROP_SIDE, d);
            let cell = ys.int64_value(&[0, (py / 2) as i64, (px / 2) as i64]);
            assert_eq!(cell, 1, "symmetry {d}: lesion centre at ({px}, {py})");
        }
    }

    #[test]
    fn sampled_crops_hold_lesions() {
        let img = synthetic_image();
        let images = [img];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let crops = lesion_crops(&images, &[0], 20, Augment::NONE, &mut rng);
        assert_eq!(crops.len(), 20);
        for c in &crops {
            // Within 56 px of the crop centre (pixel 64): crop pixels 8 to 120.
            let holds = images[0].lesion_centres.iter().any(|&(x, y)| {
                let (dx, dy) = (x as i64 - c.x0, y as i64 - c.y0);
                (8..=120).contains(&dx) && (8..=120).contains(&dy)
            });
            assert!(holds, "{c:?}");
        }
        assert_eq!(
            random_crops(&images, &[0], 7, Augment::NONE, &mut rng).len(),
            7
        );
    }

    #[test]
    fn loss_is_balanced_and_ignores_cells() {
        let ce = |d: f64| (1.0 + (-d).exp()).ln();
        let logits =
            Tensor::from_slice(&[0.0f32, 0.0, 0.0, 0.0, 2.0, 1.0, -1.0, 50.0]).view([1, 2, 2, 2]);
        let labels = Tensor::from_slice(&[1i64, 0, 0, IGNORE as i64]).view([1, 2, 2]);
        let got = balanced_cell_loss(&logits, &labels).double_value(&[]);
        let want = 0.5 * ce(2.0) + 0.5 * (ce(-1.0) + ce(1.0)) / 2.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}
