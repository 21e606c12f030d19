//! Dense stage-1 training: tiles of several stage-1 patches, labelled cell by cell.
//!
//! Run fully-convolutionally, the basic CNN's output cell (i, j) on a tile of side
//! `101 + 8 (k - 1)` is exactly its verdict on the 101x101 patch centred on tile pixel
//! `(50 + 8j, 50 + 8i)`. A tile therefore trains k x k patch classifiers for about
//! `(side / 101)^2` patches' worth of arithmetic, and its negatives are *every* cell the
//! device will see there (vessel crossings, pigment, haemorrhage edges), not a few
//! random draws: that is what stage 1's ranking needs (measured in the model card).
//!
//! Labels per cell: MA (1) when a lesion centre lies within `jitter` px (Chebyshev) of the
//! cell centre, so each lesion owns the cell(s) the device's stride-8 map gives it;
//! ignored (-1) in the exclusion zone around lesions and uncertain marks, or outside the
//! field of view (the device never looks there); non-MA (0) otherwise.

use ma_device::geometry::{CHANNELS, PatchGeometry};
use rand::Rng;
use tch::{Kind, Reduction, Tensor};

use crate::nets::Stage;
use crate::patches::{Augment, dihedral_plane};
use crate::prepare::PreparedImage;

/// Label of a cell that does not count in the loss.
pub const IGNORE: i64 = -1;

/// Tile shape: `cells` x `cells` stage-1 outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileGeometry {
    pub cells: usize,
}

impl TileGeometry {
    /// Side of the tile in pixels.
    pub fn side(&self) -> usize {
        PatchGeometry::DEFAULT.size + Stage::BASIC_STRIDE * (self.cells - 1)
    }

    /// Offset (pixels) of cell `j`'s centre from the tile centre.
    pub fn cell_offset(&self, j: usize) -> i64 {
        let s = Stage::BASIC_STRIDE as i64;
        s * j as i64 - s * (self.cells as i64 - 1) / 2
    }

    /// Largest |offset| of a cell centre from the tile centre.
    pub fn reach(&self) -> i64 {
        -self.cell_offset(0)
    }
}

/// One tile to cut: image, canonical centre, augmentation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tile {
    pub image: usize,
    pub cx: i64,
    pub cy: i64,
    pub dihedral: u8,
    pub gain: f32,
    pub bias: f32,
}

impl Tile {
    fn new(image: usize, cx: i64, cy: i64, aug: Augment, rng: &mut impl Rng) -> Self {
        let s = crate::patches::Sample::new(image, cx, cy, false, aug, rng);
        Self {
            image,
            cx,
            cy,
            dihedral: s.dihedral,
            gain: s.gain,
            bias: s.bias,
        }
    }
}

/// For every lesion of `subset`, a tile holding it at a random cell position.
pub fn lesion_tiles(
    images: &[PreparedImage],
    subset: &[usize],
    geo: TileGeometry,
    aug: Augment,
    rng: &mut impl Rng,
) -> Vec<Tile> {
    let reach = geo.reach();
    let mut out = Vec::new();
    for &i in subset {
        for &(x, y) in &images[i].lesion_centres {
            let dx = rng.random_range(-reach..=reach);
            let dy = rng.random_range(-reach..=reach);
            out.push(Tile::new(i, x as i64 - dx, y as i64 - dy, aug, rng));
        }
    }
    out
}

/// `n` tiles centred on random field-of-view pixels, spread evenly over `subset`.
pub fn random_tiles(
    images: &[PreparedImage],
    subset: &[usize],
    n: usize,
    aug: Augment,
    rng: &mut impl Rng,
) -> Vec<Tile> {
    let mut out = Vec::with_capacity(n);
    if subset.is_empty() {
        return out;
    }
    for k in 0..n {
        let i = subset[k % subset.len()];
        let fov = &images[i].pre.fov;
        let Some((x0, y0, x1, y1)) = fov.bounding_box() else {
            continue;
        };
        for _ in 0..1000 {
            let (x, y) = (rng.random_range(x0..=x1), rng.random_range(y0..=y1));
            if fov.get(x as i64, y as i64) {
                out.push(Tile::new(i, x as i64, y as i64, aug, rng));
                break;
            }
        }
    }
    out
}

/// Cell labels of a tile before augmentation, row-major `cells x cells`.
pub fn tile_labels(image: &PreparedImage, tile: &Tile, geo: TileGeometry, jitter: i64) -> Vec<i64> {
    let mut labels = Vec::with_capacity(geo.cells * geo.cells);
    for i in 0..geo.cells {
        for j in 0..geo.cells {
            let (x, y) = (tile.cx + geo.cell_offset(j), tile.cy + geo.cell_offset(i));
            let near_lesion = image.lesion_centres.iter().any(|&(lx, ly)| {
                (lx as i64 - x).abs() <= jitter && (ly as i64 - y).abs() <= jitter
            });
            labels.push(if near_lesion {
                1
            } else if !image.pre.fov.get(x, y) || image.exclusion.get(x, y) {
                IGNORE
            } else {
                0
            });
        }
    }
    labels
}

/// Cut, augment and stack tiles: N x 3 x side x side inputs, N x cells x cells labels.
pub fn tile_batch(
    images: &[PreparedImage],
    tiles: &[Tile],
    geo: TileGeometry,
    jitter: i64,
) -> (Tensor, Tensor) {
    let side = geo.side();
    let patch = PatchGeometry { size: side };
    let len = patch.len();
    let cells = geo.cells * geo.cells;
    let mut data = vec![0.0f32; tiles.len() * len];
    let mut labels = vec![0i64; tiles.len() * cells];
    let mut raw = vec![0.0f32; len];
    for ((t, out), lab) in tiles
        .iter()
        .zip(data.chunks_exact_mut(len))
        .zip(labels.chunks_exact_mut(cells))
    {
        let img = &images[t.image];
        patch.extract(&img.pre.planes, t.cx, t.cy, &mut raw);
        for c in 0..CHANNELS {
            let plane = side * side;
            dihedral_plane(
                &raw[c * plane..][..plane],
                &mut out[c * plane..][..plane],
                side,
                t.dihedral,
            );
        }
        if t.gain != 1.0 || t.bias != 0.0 {
            for v in out.iter_mut().filter(|v| **v != 0.0) {
                *v = *v * t.gain + t.bias;
            }
        }
        // The cell grid is symmetric about the tile centre, so the same symmetry maps
        // the labels onto the cells of the transformed tile.
        dihedral_plane(
            &tile_labels(img, t, geo, jitter),
            lab,
            geo.cells,
            t.dihedral,
        );
    }
    let (n, s, k) = (tiles.len() as i64, side as i64, geo.cells as i64);
    (
        Tensor::from_slice(&data).view([n, CHANNELS as i64, s, s]),
        Tensor::from_slice(&labels).view([n, k, k]),
    )
}

/// Class-balanced cross-entropy over the labelled cells of `logits` (N x 2 x k x k): MA
/// cells and non-MA cells each weigh one half, however few MA cells a batch holds (the
/// device's threshold and the candidate ranking then see balanced-prior probabilities, as
/// with balanced patches); ignored cells do not count.
pub fn balanced_cell_loss(logits: &Tensor, labels: &Tensor) -> Tensor {
    let ce = logits.cross_entropy_loss::<Tensor>(labels, None, Reduction::None, IGNORE, 0.0);
    let mean_over = |class: i64| {
        let m = labels.eq(class).to_kind(Kind::Float);
        (&ce * &m).sum(Kind::Float) / m.sum(Kind::Float).clamp_min(1.0)
    };
    (mean_over(1) + mean_over(0)) * 0.5
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nets::Net;
    use ma_device::preprocess::{FovSource, PreprocessConfig, preprocess};
    use ma_device::synthetic::{SyntheticParams, generate};
    use tch::{Device, nn};

    use crate::ground_truth::GroundTruth;

    fn synthetic_image() -> PreparedImage {
        let frame = generate(&SyntheticParams::small(), 5);
        let pre = preprocess(
            &frame.image,
            FovSource::Estimate,
            &PreprocessConfig::default(),
        )
        .expect("preprocess");
        PreparedImage::from_parts("s".into(), pre, GroundTruth::from_synthetic(&frame))
    }

    #[test]
    fn cell_geometry_is_symmetric() {
        let g = TileGeometry { cells: 12 };
        assert_eq!(g.side(), 189);
        assert_eq!(g.cell_offset(0), -44);
        assert_eq!(g.cell_offset(11), 44);
        assert_eq!(g.reach(), 44);
    }

    #[test]
    fn cells_are_the_patch_classifier() {
        // The loss trains what the device runs: cell (i, j) of the tile map is the patch
        // classifier on the 101x101 patch centred on the cell centre.
        tch::manual_seed(7);
        let img = synthetic_image();
        let geo = TileGeometry { cells: 4 };
        let (x, y) = img.lesion_centres[0];
        let tile = Tile {
            image: 0,
            cx: x as i64,
            cy: y as i64,
            dihedral: 0,
            gain: 1.0,
            bias: 0.0,
        };
        let images = [img];
        let (xs, _) = tile_batch(&images, &[tile], geo, 4);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Net::new(&vs.root(), Stage::Basic);
        let map = net.forward_map(&xs);
        let (i, j) = (2usize, 1usize);
        let mut patch = vec![0.0; PatchGeometry::DEFAULT.len()];
        PatchGeometry::DEFAULT.extract(
            &images[0].pre.planes,
            tile.cx + geo.cell_offset(j),
            tile.cy + geo.cell_offset(i),
            &mut patch,
        );
        let p = net
            .patch_probabilities(&Tensor::from_slice(&patch).view([1, 3, 101, 101]))
            .double_value(&[0]);
        let m = map.double_value(&[i as i64, j as i64]);
        assert!((p - m).abs() < 1e-5, "patch {p} vs cell {m}");
    }

    #[test]
    fn labels_mark_the_lesion_cell_and_follow_the_symmetries() {
        let img = synthetic_image();
        let geo = TileGeometry { cells: 5 };
        let (x, y) = img.lesion_centres[0];
        // Lesion 2 px right of the centre of cell (1, 3).
        let tile = Tile {
            image: 0,
            cx: x as i64 - geo.cell_offset(3) - 2,
            cy: y as i64 - geo.cell_offset(1),
            dihedral: 0,
            gain: 1.0,
            bias: 0.0,
        };
        let labels = tile_labels(&img, &tile, geo, 4);
        assert_eq!(labels[5 + 3], 1);
        // Its neighbours are inside the exclusion zone: not counted either way.
        assert_eq!(labels[5 + 2], IGNORE);
        let images = [img];
        for k in 0..8u8 {
            let t = Tile {
                dihedral: k,
                ..tile
            };
            let (_, lab) = tile_batch(&images, &[t], geo, 4);
            let lab = Vec::<i64>::try_from(lab.flatten(0, -1)).expect("labels");
            let mut want = vec![0i64; 25];
            dihedral_plane(&labels, &mut want, 5, k);
            assert_eq!(lab, want, "symmetry {k}");
            assert_eq!(lab.iter().filter(|&&l| l == 1).count(), 1);
        }
    }

    #[test]
    fn loss_is_balanced_and_ignores_cells() {
        // Cell logits (non-MA, MA): cross-entropies are ln(1 + e^-d) for the true class
        // ahead by d.
        let ce = |d: f64| (1.0 + (-d).exp()).ln();
        // Cells: MA predicted well (d = 2), two non-MA cells (d = 1 and d = -1), and an
        // ignored cell whose terrible logits must not count.
        let logits =
            Tensor::from_slice(&[0.0f32, 0.0, 0.0, 0.0, 2.0, 1.0, -1.0, 50.0]).view([1, 2, 2, 2]);
        let labels = Tensor::from_slice(&[1i64, 0, 0, IGNORE]).view([1, 2, 2]);
        let got = balanced_cell_loss(&logits, &labels).double_value(&[]);
        let want = 0.5 * ce(2.0) + 0.5 * (ce(-1.0) + ce(1.0)) / 2.0;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // Without MA cells only the non-MA half remains.
        let labels = Tensor::from_slice(&[IGNORE, 0, 0, IGNORE]).view([1, 2, 2]);
        let got = balanced_cell_loss(&logits, &labels).double_value(&[]);
        assert!((got - 0.5 * (ce(-1.0) + ce(1.0)) / 2.0).abs() < 1e-6);
    }
}
