//! The training loop shared by both stages: Adam on softmax cross-entropy, a fresh sample
//! draw every epoch, a progress bar, a validation figure, a checkpoint every epoch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use ma_device::geometry::PatchGeometry;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::nets::{Net, Stage};
use crate::patches::{Sample, batch};
use crate::prepare::PreparedImage;

/// How one stage is trained.
#[derive(Clone, Debug)]
pub struct StageConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub seed: u64,
}

/// Patch accuracy and AUC on a fixed validation sample.
#[derive(Clone, Copy, Debug, Default)]
pub struct Validation {
    pub loss: f64,
    pub accuracy: f64,
    pub auc: f64,
}

/// Train `stage` from scratch (or from the last checkpoint in `checkpoints` when
/// `resume`). `draw(epoch, rng)` gives the epoch's training items (fresh negatives each
/// epoch), `loss(net, batch)` the training loss of a batch of them, `validate(net)` the
/// figure printed after each epoch. `init` (same architecture) gives the starting
/// weights instead of a random initialisation.
#[allow(clippy::too_many_arguments)]
pub fn train_stage<T>(
    stage: Stage,
    init: Option<&nn::VarStore>,
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
    let net = Net::new(&vs.root(), stage);
    std::fs::create_dir_all(checkpoints)
        .with_context(|| format!("cannot create checkpoint folder {}", checkpoints.display()))?;

    let mut first_epoch = 0;
    let resume_from = if resume {
        last_checkpoint(checkpoints, stage)?
    } else {
        None
    };
    if let Some(init) = init.filter(|_| resume_from.is_none()) {
        vs.copy(init)
            .with_context(|| format!("{}: cannot start from the given weights", stage.name()))?;
    }
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
    // Adam's moments are not checkpointed: a resumed run restarts them.
    let mut opt = nn::Adam::default()
        .build(&vs, cfg.learning_rate)
        .context("cannot build the optimiser")?;
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
        for chunk in samples.chunks(cfg.batch_size) {
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

/// Softmax cross-entropy of the patch classifier on a batch of samples.
pub fn patch_loss(net: &Net, images: &[PreparedImage], samples: &[Sample]) -> Tensor {
    let device = Device::cuda_if_available();
    let (xs, ys) = batch(images, samples, PatchGeometry::DEFAULT);
    net.patch_logits(&xs.to_device(device), true)
        .cross_entropy_for_logits(&ys.to_device(device))
}

/// Loss, accuracy (at 0.5) and AUC of the patch classifier on `samples`.
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
    let geo = PatchGeometry::DEFAULT;
    let (mut loss, mut probs) = (0.0, Vec::with_capacity(samples.len()));
    for chunk in samples.chunks(128) {
        let (xs, ys) = batch(images, chunk, geo);
        let logits = net.patch_logits(&xs.to_device(device), false);
        loss += logits
            .cross_entropy_for_logits(&ys.to_device(device))
            .double_value(&[])
            * chunk.len() as f64;
        let p = logits
            .softmax(-1, Kind::Float)
            .select(1, 1)
            .to_device(Device::Cpu);
        probs.extend(Vec::<f32>::try_from(&p).expect("float probabilities"));
    }
    let labels: Vec<bool> = samples.iter().map(|s| s.label).collect();
    let correct = probs
        .iter()
        .zip(&labels)
        .filter(|(p, l)| (**p >= 0.5) == **l)
        .count();
    Validation {
        loss: loss / samples.len() as f64,
        accuracy: correct as f64 / samples.len() as f64,
        auc: auc(&probs, &labels),
    }
}

/// Mann-Whitney AUC, ties counting one half; 0.5 when a class is missing.
pub fn auc(scores: &[f32], labels: &[bool]) -> f64 {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (mut rank_sum, mut pos) = (0.0, 0usize);
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let mid_rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            if labels[k] {
                rank_sum += mid_rank;
                pos += 1;
            }
        }
        i = j + 1;
    }
    let neg = scores.len() - pos;
    if pos == 0 || neg == 0 {
        return 0.5;
    }
    (rank_sum - (pos * (pos + 1)) as f64 / 2.0) / (pos * neg) as f64
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

/// The architecture of a stage-2 weights file: the final CNN (it has a `conv4`) or the
/// refined basic CNN.
pub fn stage2_architecture(path: &Path) -> Result<Stage> {
    let tensors = tch::Tensor::read_safetensors(path)
        .with_context(|| format!("cannot read stage-2 weights {}", path.display()))?;
    Ok(
        if tensors.iter().any(|(name, _)| name.starts_with("conv4.")) {
            Stage::Final
        } else {
            Stage::Refine
        },
    )
}

/// Load trained stage-2 weights, whichever architecture they are.
pub fn load_stage2(path: &Path) -> Result<(nn::VarStore, Net)> {
    load_net(path, stage2_architecture(path)?)
}

/// Load trained weights into a fresh net (for export and evaluation).
pub fn load_net(path: &Path, stage: Stage) -> Result<(nn::VarStore, Net)> {
    let mut vs = nn::VarStore::new(Device::cuda_if_available());
    let net = Net::new(&vs.root(), stage);
    vs.load(path).with_context(|| {
        format!(
            "cannot load {} weights from {}",
            stage.name(),
            path.display()
        )
    })?;
    Ok((vs, net))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_with_ties() {
        assert_eq!(auc(&[0.1, 0.9], &[false, true]), 1.0);
        assert_eq!(auc(&[0.5, 0.5], &[false, true]), 0.5);
        assert!((auc(&[0.2, 0.8, 0.5, 0.5], &[false, true, true, false]) - 0.875).abs() < 1e-12);
    }
}
