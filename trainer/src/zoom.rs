//! The zoom-in step of Zoom-in-Net (Wang et al., MICCAI 2017): the referral network's
//! strongest attention cells are cropped from the canonical, full-resolution preprocessed
//! photo ([`ReferralView::zoom_crop`], shared with the device) and scored by a crop
//! classifier (C-Net, [`zoom_classifier`]); the mean crop margin of a photo is its zoom
//! margin, merged with the referral margin by averaging ([`merge`], from `ma-core`).
//!
//! The crop classifier learns from image labels only: every crop of a referable eye is
//! labelled referable. It is trained on more crops per photo than it is scored on
//! ([`ZoomSettings::train_crops`] vs [`ZoomSettings::crops`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use tch::nn;
use tch::{Device, Tensor};

use ma_core::geometry::CHANNELS;
use ma_core::preprocess::PreprocessConfig;
use ma_core::referral::top_cells;

use crate::nets::{Net, ZOOM_CROP, zoom_classifier};
use crate::referral::{ReferralTraining, fit_binary, photo_view};

/// Which crops, and how large.
#[derive(Clone, Debug, PartialEq)]
pub struct ZoomSettings {
    /// Crops a photo is scored on: its strongest attention cells (the device's boxes).
    pub crops: usize,
    /// Crops per photo to train on (the strongest first; at least `crops`).
    pub train_crops: usize,
    /// Side of a crop in attention cells, centred on its cell.
    pub cells: f64,
    /// Side of a crop in pixels after area-averaging ([`ZOOM_CROP`]).
    pub side: usize,
}

impl Default for ZoomSettings {
    fn default() -> Self {
        Self {
            crops: 4,
            train_crops: 8,
            cells: 1.5,
            side: ZOOM_CROP,
        }
    }
}

impl ZoomSettings {
    /// At least one crop to score, and at least as many to train on.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.crops >= 1 && self.train_crops >= self.crops,
            "--train-crops ({}) must be at least --crops ({}), which must be at least 1",
            self.train_crops,
            self.crops
        );
        Ok(())
    }
}

/// The crop classifier.
pub struct ZoomNet {
    net: Net,
}

impl ZoomNet {
    pub fn new(vs: &nn::Path) -> Self {
        Self {
            net: Net::from_layers(vs, zoom_classifier()),
        }
    }

    /// Referable minus not, one value per crop of `xs` (`[N, 3, side, side]`).
    pub fn margin(&self, xs: &Tensor, train: bool) -> Tensor {
        self.net.margin(xs, train)
    }
}

/// The referral and zoom margins merged, as the device merges them.
pub use ma_core::referral::merged_margin as merge;

/// The crops of every photo for several attention maps at once (one preprocessing pass):
/// `cells[m][p]` lists the cells of photo `p` under map `m` (each list `k` long, over a
/// `map_side` map of the photo's `input_side` referral view). Returns one tensor per map,
/// `[photos * k, 3, side, side]`, photo-major. The first photo that fails stops the run
/// with its path in the error.
pub fn prepare_crops(
    paths: &[PathBuf],
    cfg: &PreprocessConfig,
    input_side: usize,
    map_side: usize,
    cells: &[Vec<Vec<usize>>],
    z: &ZoomSettings,
) -> Result<Vec<Tensor>> {
    ensure!(!cells.is_empty(), "no attention maps to crop by");
    let k = cells[0].first().map_or(0, Vec::len);
    for m in cells {
        ensure!(
            m.len() == paths.len() && m.iter().all(|c| c.len() == k),
            "every photo needs {k} cells under every map"
        );
    }
    let per_photo: Vec<Vec<Vec<f32>>> =
        crate::parallel::map_in_order(paths, "cropping", |p, path| {
            let photo = photo_view(path, cfg, input_side)?;
            Ok(cells
                .iter()
                .map(|m| {
                    let mut flat = Vec::with_capacity(k * CHANNELS * z.side * z.side);
                    for &cell in &m[p] {
                        let crop = photo
                            .view
                            .zoom_crop(&photo.pre, map_side, cell, z.cells, z.side);
                        flat.extend_from_slice(&crop.data);
                    }
                    flat
                })
                .collect())
        })?;
    let side = z.side as i64;
    Ok((0..cells.len())
        .map(|m| {
            let flat: Vec<f32> = per_photo
                .iter()
                .flat_map(|p| p[m].iter().copied())
                .collect();
            Tensor::from_slice(&flat).view([(paths.len() * k) as i64, CHANNELS as i64, side, side])
        })
        .collect())
}

/// The strongest `n` cells of each attention map.
pub fn strongest_cells(attention: &[Vec<f32>], n: usize) -> Vec<Vec<usize>> {
    attention.iter().map(|a| top_cells(a, n)).collect()
}

/// Train a crop classifier on the crops of the photos `train` (`crops` holds `k` crops
/// per photo, photo-major; each labelled with its photo's label).
pub fn train(
    crops: &Tensor,
    k: usize,
    labels: &[bool],
    train: &[usize],
    cfg: &ReferralTraining,
    progress: &str,
) -> Result<(nn::VarStore, ZoomNet)> {
    let crop_labels: Vec<bool> = labels
        .iter()
        .flat_map(|&l| std::iter::repeat_n(l, k))
        .collect();
    let crop_idx: Vec<usize> = train.iter().flat_map(|&p| p * k..(p + 1) * k).collect();
    tch::manual_seed(cfg.seed as i64);
    let vs = nn::VarStore::new(Device::cuda_if_available());
    let net = ZoomNet::new(&vs.root());
    fit_binary(
        &vs,
        &|xs, train| net.margin(xs, train),
        crops,
        &crop_labels,
        &crop_idx,
        cfg,
        progress,
    )?;
    Ok((vs, net))
}

/// The zoom margin of each photo `which`: the mean margin of its first `n` crops (of `k`
/// per photo in `crops`).
pub fn predict(
    net: &ZoomNet,
    crops: &Tensor,
    k: usize,
    n: usize,
    which: &[usize],
) -> Result<Vec<f64>> {
    ensure!(n >= 1 && n <= k, "score on 1 to {k} crops, not {n}");
    let device = Device::cuda_if_available();
    let _guard = tch::no_grad_guard();
    let mut out = Vec::with_capacity(which.len());
    for chunk in which.chunks(16) {
        let idx: Vec<i64> = chunk
            .iter()
            .flat_map(|&p| (p * k..p * k + n).map(|i| i as i64))
            .collect();
        let m = net.margin(
            &crops
                .index_select(0, &Tensor::from_slice(&idx))
                .to_device(device),
            false,
        );
        let m = Vec::<f32>::try_from(&m.to_device(Device::Cpu)).context("reading margins")?;
        out.extend(
            m.chunks(n)
                .map(|c| c.iter().map(|&v| v as f64).sum::<f64>() / n as f64),
        );
    }
    Ok(out)
}

/// The zoom margin of one photo, as the device computes it: the mean margin of the crops
/// of its `z.crops` strongest cells of `attention` (`map_side` a side over `view`).
pub fn photo_margin(
    net: &ZoomNet,
    pre: &ma_core::preprocess::Preprocessed,
    view: &ma_core::referral::ReferralView,
    attention: &[f32],
    map_side: usize,
    z: &ma_core::referral::ZoomConfig,
) -> Result<f64> {
    let cells = top_cells(attention, z.crops);
    let mut flat = Vec::with_capacity(cells.len() * CHANNELS * z.crop_side * z.crop_side);
    for &cell in &cells {
        flat.extend_from_slice(
            &view
                .zoom_crop(pre, map_side, cell, z.crop_cells, z.crop_side)
                .data,
        );
    }
    let side = z.crop_side as i64;
    let crops = Tensor::from_slice(&flat).view([cells.len() as i64, CHANNELS as i64, side, side]);
    let k = cells.len();
    predict(net, &crops, k, k, &[0])?
        .pop()
        .context("no zoom margin")
}

/// Load trained crop-classifier weights.
pub fn load(path: &Path) -> Result<(nn::VarStore, ZoomNet)> {
    crate::train::load_weights(path, "crop-classifier", ZoomNet::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// Crops of noise where referable photos hold a small dark spot in some crops: the
    /// classifier learns it from photo labels alone.
    #[test]
    fn learns_a_spot_in_some_crops_from_photo_labels() {
        use rand::{Rng, SeedableRng};
        let (photos, k, side) = (64usize, 4usize, 32i64);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let crops = Tensor::randn(
            [(photos * k) as i64, 3, side, side],
            (Kind::Float, Device::Cpu),
        ) * 0.3;
        let labels: Vec<bool> = (0..photos).map(|p| p % 2 == 0).collect();
        for p in (0..photos).filter(|&p| labels[p]) {
            // Two of the four crops show the lesion.
            for c in 0..2 {
                let (x, y) = (rng.random_range(4..side - 8), rng.random_range(4..side - 8));
                let _ = crops
                    .get((p * k + c) as i64)
                    .narrow(1, y, 4)
                    .narrow(2, x, 4)
                    .fill_(-2.0);
            }
        }
        let train_idx: Vec<usize> = (0..48).collect();
        let held: Vec<usize> = (48..photos).collect();
        let cfg = ReferralTraining {
            epochs: 8,
            batch_size: 16,
            learning_rate: 3e-3,
            ..Default::default()
        };
        let (_vs, net) = train(&crops, k, &labels, &train_idx, &cfg, "synthetic").unwrap();
        let scores: Vec<f32> = predict(&net, &crops, k, k, &held)
            .unwrap()
            .into_iter()
            .map(|m| m as f32)
            .collect();
        let held_labels: Vec<bool> = held.iter().map(|&p| labels[p]).collect();
        let auc = crate::train::auc(&scores, &held_labels);
        assert!(auc >= 0.95, "held-out AUC {auc}");
        assert!(predict(&net, &crops, k, k + 1, &held).is_err());
    }
}
