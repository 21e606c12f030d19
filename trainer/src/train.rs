//! The training loop shared by both stages: AdamW on softmax cross-entropy with a
//! one-cycle schedule, a fresh sample draw every epoch, a progress bar, a validation
//! figure, a checkpoint every epoch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use ma_core::geometry::PatchGeometry;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Tensor};

use crate::nets::{InputScales, Layer, Net, Stage};
use crate::patches::{Sample, batch};
use crate::prepare::PreparedImage;

/// How one stage is trained.
#[derive(Clone, Debug)]
pub struct StageConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate of the one-cycle schedule ([`one_cycle`]).
    pub learning_rate: f64,
    /// AdamW's decoupled weight decay (0: plain Adam).
    pub weight_decay: f64,
    pub seed: u64,
}

/// Learning rate and Adam's beta1 at `step` of `total` under the one-cycle policy
/// (Smith 2018, as PyTorch's `OneCycleLR` does it): over the first 15% of the steps the
/// rate rises from `peak / 25` to `peak` while beta1 falls from 0.95 to 0.85, then the
/// rate anneals to `peak / 25 / 1e4` and beta1 returns to 0.95, both along cosines.
///
/// Measured in the prototype of the current nets: a constant rate needed more epochs for
/// the same validation loss, and the ending anneal steadies the last epoch's weights,
/// which are the ones exported.
pub fn one_cycle(step: usize, total: usize, peak: f64) -> (f64, f64) {
    const WARM_UP: f64 = 0.15;
    let (start, end) = (peak / 25.0, peak / 25.0 / 1e4);
    let (beta_hi, beta_lo) = (0.95, 0.85);
    let cos = |from: f64, to: f64, t: f64| {
        to + (from - to) / 2.0 * (1.0 + (std::f64::consts::PI * t).cos())
    };
    let warm = (WARM_UP * total as f64 - 1.0).max(1.0);
    let step = step as f64;
    if step <= warm {
        let t = step / warm;
        (cos(start, peak, t), cos(beta_hi, beta_lo, t))
    } else {
        let t = ((step - warm) / ((total as f64 - 1.0) - warm).max(1.0)).min(1.0);
        (cos(peak, end, t), cos(beta_lo, beta_hi, t))
    }
}

/// Patch accuracy and AUC on a fixed validation sample.
#[derive(Clone, Copy, Debug, Default)]
pub struct Validation {
    pub loss: f64,
    pub accuracy: f64,
    pub auc: f64,
}

/// What [`train_stage`] trains: the stage (it names the checkpoints) and its layers.
pub struct NetSpec {
    pub stage: Stage,
    pub layers: Vec<Layer>,
}

impl From<Stage> for NetSpec {
    /// The stage's standard layers.
    fn from(stage: Stage) -> Self {
        Self {
            stage,
            layers: stage.layers(),
        }
    }
}

/// Train `spec`'s net from scratch (or from the last checkpoint in `checkpoints` when
/// `resume`). `draw(epoch, rng)` gives the epoch's training items (fresh negatives each
/// epoch), `loss(net, batch)` the training loss of a batch of them, `validate(net)` the
/// figure printed after each epoch.
pub fn train_stage<T>(
    spec: NetSpec,
    draw: &mut dyn FnMut(usize, &mut ChaCha8Rng) -> Vec<T>,
    loss: &dyn Fn(&Net, &[T]) -> Tensor,
    validate: &dyn Fn(&Net) -> Validation,
    cfg: &StageConfig,
    checkpoints: &Path,
    resume: bool,
) -> Result<(nn::VarStore, Net)> {
    let device = Device::cuda_if_available();
    tch::manual_seed(cfg.seed as i64);
    let mut vs = nn::VarStore::new(device);
    let NetSpec { stage, layers } = spec;
    let net = Net::from_layers(&vs.root(), layers);
    std::fs::create_dir_all(checkpoints)
        .with_context(|| format!("cannot create checkpoint folder {}", checkpoints.display()))?;

    let mut first_epoch = 0;
    let resume_from = if resume {
        last_checkpoint(checkpoints, stage)?
    } else {
        None
    };
    if let Some((epoch, path)) = resume_from {
        vs.load(&path)
            .with_context(|| format!("cannot load checkpoint {}", path.display()))?;
        eprintln!(
            "{}: resuming after epoch {epoch} from {}",
            stage.name(),
            path.display()
        );
        first_epoch = epoch;
    }
    // Adam's moments are not checkpointed: a resumed run restarts them (the schedule
    // carries on where it was).
    let mut opt = nn::AdamW {
        wd: cfg.weight_decay,
        ..Default::default()
    }
    .build(&vs, cfg.learning_rate)
    .context("cannot build the optimiser")?;
    // The schedule needs the number of steps: every epoch draws as many items.
    let mut steps_per_epoch = None;
    for epoch in first_epoch..cfg.epochs {
        let started = Instant::now();
        // Seeded per epoch, so a resumed run draws what an uninterrupted one would.
        let mut rng =
            ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
        tch::manual_seed((cfg.seed + epoch as u64) as i64);
        let mut samples = draw(epoch, &mut rng);
        if samples.is_empty() {
            bail!(
                "{}: no training samples in epoch {}",
                stage.name(),
                epoch + 1
            );
        }
        samples.shuffle(&mut rng);
        let batches = samples.len().div_ceil(cfg.batch_size);
        let per_epoch = *steps_per_epoch.get_or_insert(batches);
        let bar = ProgressBar::new(batches as u64).with_style(
            ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} {msg} [{elapsed}<{eta}]")
                .expect("valid template"),
        );
        bar.set_prefix(format!(
            "{} epoch {}/{}",
            stage.name(),
            epoch + 1,
            cfg.epochs
        ));
        let (mut loss_sum, mut seen) = (0.0, 0usize);
        for (b, chunk) in samples.chunks(cfg.batch_size).enumerate() {
            let (lr, beta1) = one_cycle(
                epoch * per_epoch + b,
                cfg.epochs * per_epoch,
                cfg.learning_rate,
            );
            opt.set_lr(lr);
            opt.set_momentum(beta1);
            let loss = loss(&net, chunk);
            opt.backward_step(&loss);
            loss_sum += loss.double_value(&[]) * chunk.len() as f64;
            seen += chunk.len();
            bar.set_message(format!("loss {:.4}", loss_sum / seen as f64));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let v = validate(&net);
        let path = checkpoint_path(checkpoints, stage, epoch + 1);
        vs.save(&path)
            .with_context(|| format!("cannot write checkpoint {}", path.display()))?;
        eprintln!(
            "{} epoch {}/{}: {} samples, train loss {:.4}, validation loss {:.4} acc {:.3} AUC {:.3} ({:.0} s)",
            stage.name(),
            epoch + 1,
            cfg.epochs,
            samples.len(),
            loss_sum / seen as f64,
            v.loss,
            v.accuracy,
            v.auc,
            started.elapsed().as_secs_f64()
        );
    }
    Ok((vs, net))
}

/// Softmax cross-entropy of the stage-2 patch classifier on a batch of samples.
pub fn patch_loss(
    net: &Net,
    images: &[PreparedImage],
    samples: &[Sample],
    triplet: Option<Triplet>,
) -> Tensor {
    let device = Device::cuda_if_available();
    let (xs, ys) = batch(images, samples, PatchGeometry::VERDICT);
    let (xs, ys) = (xs.to_device(device), ys.to_device(device));
    match triplet {
        None => net.forward_t(&xs, true).cross_entropy_for_logits(&ys),
        Some(t) => {
            let (logits, embedding) = net.forward_with_embedding(&xs, true);
            logits.cross_entropy_for_logits(&ys)
                + batch_hard_triplet(&embedding, &ys, t.margin) * t.weight
        }
    }
}

/// Stage 2's triplet term (Sarhan et al. 2019): `weight` times the batch-hard triplet
/// loss of the patch embeddings with `margin`, added to the cross-entropy.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Triplet {
    pub weight: f64,
    pub margin: f64,
}

/// Batch-hard triplet loss (Hermans, Beyer and Leibe 2017; the hard-triplet selection of
/// Sarhan et al.): embeddings `[N, D]` are scaled to unit length; each sample is an anchor,
/// paired with the farthest sample of its own label and the closest of the other label;
/// the loss is the mean over anchors that have both of `max(0, d(a, p) - d(a, n) +
/// margin)` (Euclidean distances). 0 for a batch of one label.
pub fn batch_hard_triplet(embeddings: &Tensor, labels: &Tensor, margin: f64) -> Tensor {
    let e = embeddings / (embeddings.norm_scalaropt_dim(2, [1i64].as_slice(), true) + 1e-12);
    // Squared distances from the Gram matrix, clamped before the root (its gradient at 0
    // is infinite).
    let gram = e.matmul(&e.transpose(0, 1));
    let sq = gram.diagonal(0, 0, 1);
    let d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - gram * 2.0).clamp_min(1e-12);
    let dist = d2.sqrt();
    let n = labels.size()[0];
    let same = labels.unsqueeze(1).eq_tensor(&labels.unsqueeze(0));
    let eye = Tensor::eye(n, (tch::Kind::Bool, labels.device()));
    let positive = same.logical_and(&eye.logical_not());
    let negative = same.logical_not();
    // Masked max and min: out-of-mask entries pushed below 0 / above any distance.
    let big = 4.0;
    let hardest_pos = (&dist - positive.logical_not().to_kind(tch::Kind::Float) * big)
        .amax([1i64].as_slice(), false);
    let hardest_neg = (&dist + negative.logical_not().to_kind(tch::Kind::Float) * big)
        .amin([1i64].as_slice(), false);
    let valid = positive
        .any_dim(1, false)
        .logical_and(&negative.any_dim(1, false))
        .to_kind(tch::Kind::Float);
    let per_anchor = (hardest_pos - hardest_neg + margin).relu() * &valid;
    per_anchor.sum(tch::Kind::Float) / valid.sum(tch::Kind::Float).clamp_min(1.0)
}

/// Loss, accuracy (margin >= 0, i.e. probability >= 0.5) and AUC of the stage-2 patch
/// classifier on `samples`.
pub fn validate(
    net: &Net,
    images: &[PreparedImage],
    samples: &[Sample],
    device: Device,
) -> Validation {
    if samples.is_empty() {
        return Validation::default();
    }
    let _guard = tch::no_grad_guard();
    let (mut loss, mut margins) = (0.0, Vec::with_capacity(samples.len()));
    for chunk in samples.chunks(128) {
        let (xs, ys) = batch(images, chunk, PatchGeometry::VERDICT);
        let logits = net.forward_t(&xs.to_device(device), false);
        loss += logits
            .cross_entropy_for_logits(&ys.to_device(device))
            .double_value(&[])
            * chunk.len() as f64;
        let m = (logits.select(1, 1) - logits.select(1, 0)).to_device(Device::Cpu);
        margins.extend(Vec::<f32>::try_from(&m).expect("float margins"));
    }
    let labels: Vec<bool> = samples.iter().map(|s| s.label).collect();
    let correct = margins
        .iter()
        .zip(&labels)
        .filter(|(m, l)| (**m >= 0.0) == **l)
        .count();
    Validation {
        loss: loss / samples.len() as f64,
        accuracy: correct as f64 / samples.len() as f64,
        auc: auc(&margins, &labels),
    }
}

/// Mann-Whitney AUC, ties counting one half; 0.5 when a class is missing.
pub fn auc(scores: &[f32], labels: &[bool]) -> f64 {
    // f32 -> f64 is exact: the same ties, the same AUC.
    auc_f64(
        &scores.iter().map(|&s| f64::from(s)).collect::<Vec<_>>(),
        labels,
    )
}

/// [`auc`] of f64 scores (referral scores), without narrowing them first.
pub fn auc_f64(scores: &[f64], labels: &[bool]) -> f64 {
    let ranks = mid_ranks(scores);
    let (mut rank_sum, mut pos) = (0.0, 0usize);
    for (r, &l) in ranks.iter().zip(labels) {
        if l {
            rank_sum += r + 1.0;
            pos += 1;
        }
    }
    let neg = scores.len() - pos;
    if pos == 0 || neg == 0 {
        return 0.5;
    }
    (rank_sum - (pos * (pos + 1)) as f64 / 2.0) / (pos * neg) as f64
}

/// The 0-based rank of each value in increasing order; tied values share their mean rank.
pub fn mid_ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut ranks = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        for &k in &idx[i..=j] {
            ranks[k] = (i + j) as f64 / 2.0;
        }
        i = j + 1;
    }
    ranks
}

pub fn checkpoint_path(dir: &Path, stage: Stage, epoch: usize) -> PathBuf {
    dir.join(format!("{}-epoch-{epoch:03}.safetensors", stage.name()))
}

/// The highest-epoch checkpoint of `stage` in `dir`, if any.
pub fn last_checkpoint(dir: &Path, stage: Stage) -> Result<Option<(usize, PathBuf)>> {
    let prefix = format!("{}-epoch-", stage.name());
    let mut best: Option<(usize, PathBuf)> = None;
    if !dir.exists() {
        return Ok(None);
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let epoch = name
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".safetensors"))
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(epoch) = epoch.filter(|e| best.as_ref().is_none_or(|(b, _)| e > b)) {
            best = Some((epoch, path));
        }
    }
    Ok(best)
}

/// Load trained weights into a fresh net (for export and evaluation).
///
/// A stage-1 file says its own input scales ([`InputScales`]): the net is built to fit.
pub fn load_net(path: &Path, stage: Stage) -> Result<(nn::VarStore, Net)> {
    let layers = match stage {
        Stage::Candidates => InputScales::of_file(path)?.layers(),
        Stage::Verdict => stage.layers(),
    };
    load_weights(path, stage.name(), |root| Net::from_layers(root, layers))
}

/// Build a network with `build` on a fresh var store's root and load the weights at
/// `path` into it; the error names `what` and the file. Every network loads this way.
pub fn load_weights<N>(
    path: &Path,
    what: &str,
    build: impl FnOnce(&nn::Path) -> N,
) -> Result<(nn::VarStore, N)> {
    let mut vs = nn::VarStore::new(Device::cuda_if_available());
    let net = build(&vs.root());
    vs.load(path)
        .with_context(|| format!("cannot load {what} weights from {}", path.display()))?;
    Ok((vs, net))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn triplet_of(points: &[[f32; 2]], labels: &[i64], margin: f64) -> f64 {
        let flat: Vec<f32> = points.iter().flatten().copied().collect();
        let e = Tensor::from_slice(&flat).view([points.len() as i64, 2]);
        batch_hard_triplet(&e, &Tensor::from_slice(labels), margin).double_value(&[])
    }

    #[test]
    fn a_stage1_file_loads_into_the_net_of_its_scales() {
        let dir = tempfile::tempdir().unwrap();
        let image = Tensor::randn([1, 3, 48, 64], (tch::Kind::Float, Device::Cpu));
        for text in ["1", "1,0.5"] {
            let scales = InputScales::parse(text).unwrap();
            tch::manual_seed(3);
            let vs = nn::VarStore::new(Device::Cpu);
            let net = Net::from_layers(&vs.root(), scales.layers());
            let path = dir.path().join(format!("stage1-{text}.safetensors"));
            vs.save(&path).unwrap();
            assert_eq!(InputScales::of_file(&path).unwrap(), scales);
            let (_vs, loaded) = load_net(&path, Stage::Candidates).unwrap();
            let diff = (net.margin(&image, false) - loaded.margin(&image, false))
                .abs()
                .max()
                .double_value(&[]);
            assert_eq!(diff, 0.0, "{text}");
        }
        let err = format!(
            "{:#}",
            InputScales::of_file(&dir.path().join("missing.safetensors")).unwrap_err()
        );
        assert!(err.contains("missing.safetensors"), "{err}");
    }

    #[test]
    fn batch_hard_triplet_loss_takes_the_hardest_pair_of_each_anchor() {
        // Classes apart (distance 2 between unit vectors): no loss below margin 2.
        let apart = [[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [-3.0, 0.0]];
        assert!(triplet_of(&apart, &[0, 0, 1, 1], 0.5).abs() < 1e-6);
        // Swapped: each anchor's positive is 2 away, its hardest negative 0: 2 + margin.
        let mixed = [[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]];
        assert!((triplet_of(&mixed, &[0, 0, 1, 1], 0.5) - 2.5).abs() < 1e-5);
        // Orthogonal classes: d(a, p) = 0, d(a, n) = sqrt(2) -> max(0, m - sqrt 2).
        let ortho = [[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 2.0]];
        let want = (1.6 - 2f64.sqrt()).max(0.0);
        assert!((triplet_of(&ortho, &[0, 0, 1, 1], 1.6) - want).abs() < 1e-5);
        // One label, or anchors without a positive: nothing to compare.
        assert_eq!(triplet_of(&mixed, &[1, 1, 1, 1], 0.5), 0.0);
        assert_eq!(triplet_of(&mixed[..2], &[0, 1], 0.5), 0.0);
    }

    /// The triplet term changes the loss and the gradients stage 2 learns from, on a
    /// fixed batch; the logits (what is exported) are the plain forward pass's.
    #[test]
    fn the_triplet_term_changes_what_stage_2_learns() {
        tch::manual_seed(4);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Net::new(&vs.root(), Stage::Verdict);
        let p = Stage::VERDICT_PATCH as i64;
        let xs = Tensor::randn([8, 3, p, p], (tch::Kind::Float, Device::Cpu));
        let ys = Tensor::from_slice(&[0i64, 1, 0, 1, 1, 0, 0, 1]);
        let grads = |weight: f64| -> (f64, Vec<f32>) {
            for (_, mut v) in vs.variables() {
                v.zero_grad();
            }
            // Eval mode: no dropout, so both passes see the same network.
            let (logits, embedding) = net.forward_with_embedding(&xs, false);
            assert!(logits.allclose(&net.forward_t(&xs, false), 1e-6, 1e-6, false));
            let loss = logits.cross_entropy_for_logits(&ys)
                + batch_hard_triplet(&embedding, &ys, 0.2) * weight;
            loss.backward();
            let g = vs
                .variables()
                .get("conv1.weight")
                .unwrap()
                .grad()
                .flatten(0, -1);
            (loss.double_value(&[]), Vec::<f32>::try_from(&g).unwrap())
        };
        let (plain, g0) = grads(0.0);
        let (with, g1) = grads(1.0);
        assert!(with > plain, "{with} vs {plain}");
        let moved = g0
            .iter()
            .zip(&g1)
            .filter(|(a, b)| (*a - *b).abs() > 1e-7)
            .count();
        assert!(moved > g0.len() / 2, "{moved} of {}", g0.len());
    }

    #[test]
    fn one_cycle_rises_then_anneals() {
        let (total, peak) = (1000, 2e-3);
        let (lr0, b0) = one_cycle(0, total, peak);
        assert!((lr0 - peak / 25.0).abs() < 1e-12 && (b0 - 0.95).abs() < 1e-12);
        let (lr_top, b_top) = one_cycle(149, total, peak);
        assert!((lr_top - peak).abs() < 1e-12 && (b_top - 0.85).abs() < 1e-12);
        let (lr_end, b_end) = one_cycle(999, total, peak);
        assert!((lr_end - peak / 25e4).abs() < 1e-12 && (b_end - 0.95).abs() < 1e-12);
        let lrs: Vec<f64> = (0..total).map(|s| one_cycle(s, total, peak).0).collect();
        assert!(lrs[..150].windows(2).all(|w| w[1] >= w[0]));
        assert!(lrs[149..].windows(2).all(|w| w[1] <= w[0]));
    }

    #[test]
    fn auc_with_ties() {
        assert_eq!(auc(&[0.1, 0.9], &[false, true]), 1.0);
        assert_eq!(auc(&[0.5, 0.5], &[false, true]), 0.5);
        assert!((auc(&[0.2, 0.8, 0.5, 0.5], &[false, true, true, false]) - 0.875).abs() < 1e-12);
    }
}
