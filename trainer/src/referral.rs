//! The image-level referral network (refer the eye or not), after Zoom-in-Net (Wang et
//! al., MICCAI 2017) and deep image mining (Quellec et al., MedIA 2017).
//!
//! The whole field of view at a reduced resolution ([`ReferralView`], shared with the
//! device) goes through a small convolutional trunk ([`referral_trunk`], M-Net). Two 1x1
//! heads read its feature map: an attention head (A-Net) whose sigmoid map says where the
//! decision looks, and a class head whose margin map (referable minus not) says what it
//! sees there. The referral margin is the attention-weighted mean of the margin map,
//! `sum(a * m) / (sum(a) + eps)`, so the attention map is a forward output the device can
//! show, and the cells it weighs most are the zoom-in regions.
//!
//! The S1 heatmap ([`s1_heatmap`]) is Quellec's pixel-level explanation: the
//! sensitivity of the referral margin to each input pixel, by backpropagation.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use ma_core::geometry::CHANNELS;
use ma_core::image_io::read_image;
use ma_core::preprocess::{FovSource, PreprocessConfig, Preprocessed, preprocess};
use ma_core::referral::ReferralView;

use crate::nets::{Net, REFERRAL_FEATURES, REFERRAL_STRIDE, referral_trunk};
use crate::train::one_cycle;

/// Added to the attention sum before dividing: keeps the margin finite when every
/// attention value is ~0. The export writes the same constant.
pub const ATTENTION_EPS: f64 = 1e-6;

/// Names of the two heads in the var store (the trunk's layers sit beside them).
pub const ATTENTION_HEAD: &str = "attention";
pub const CLASS_HEAD: &str = "classes";

/// The network: trunk, attention head, class head.
pub struct ReferralNet {
    trunk: Net,
    attention: nn::Conv2D,
    classes: nn::Conv2D,
}

/// What the network says about a batch.
pub struct ReferralOutput {
    /// Referable minus not, `[N]`.
    pub margin: Tensor,
    /// Attention in (0, 1), `[N, 1, s, s]` with `s = side / 16`.
    pub attention: Tensor,
}

impl ReferralNet {
    /// Built on `vs` (the var store's root, for export).
    pub fn new(vs: &nn::Path) -> Self {
        let head = |name: &str, outputs| {
            nn::conv2d(vs / name, REFERRAL_FEATURES, outputs, 1, Default::default())
        };
        Self {
            trunk: Net::from_layers(vs, referral_trunk()),
            attention: head(ATTENTION_HEAD, 1),
            classes: head(CLASS_HEAD, 2),
        }
    }

    /// `xs`: `[N, 3, side, side]`, side a multiple of 16.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> ReferralOutput {
        let features = self.trunk.forward_t(xs, train);
        let features = features.feature_dropout(0.2, train);
        let attention = self.attention.forward(&features).sigmoid();
        let logits = self.classes.forward(&features);
        let margin_map = logits.narrow(1, 1, 1) - logits.narrow(1, 0, 1);
        let dims = [1i64, 2, 3];
        let weighted =
            (&attention * &margin_map).sum_dim_intlist(dims.as_slice(), false, Kind::Float);
        let total = attention.sum_dim_intlist(dims.as_slice(), false, Kind::Float) + ATTENTION_EPS;
        ReferralOutput {
            margin: weighted / total,
            attention,
        }
    }
}

/// The network inputs of a set of photos, in their order.
pub struct Inputs {
    /// `[N, 3, side, side]` on the CPU.
    pub tensor: Tensor,
    pub views: Vec<ReferralView>,
}

/// One photo read, preprocessed and viewed as the network sees it.
pub struct PhotoView {
    pub rgb: image::RgbImage,
    pub pre: Preprocessed,
    pub view: ReferralView,
}

/// Read the photo at `path`, preprocess it (FOV estimated, as on the device) and make its
/// `side`-pixel referral view; errors name the file.
pub fn photo_view(path: &Path, cfg: &PreprocessConfig, side: usize) -> Result<PhotoView> {
    let rgb = read_image(path)?;
    let pre = preprocess(&rgb, FovSource::Estimate, cfg)
        .and_then(|pre| Ok((ReferralView::of(&pre, side)?, pre)))
        .with_context(|| format!("preparing {}", path.display()));
    let (view, pre) = pre?;
    Ok(PhotoView { rgb, pre, view })
}

/// A view's planes as the network's `[3, side, side]` input.
pub fn input_tensor(view: &ReferralView) -> Tensor {
    let side = view.side() as i64;
    Tensor::from_slice(&view.planes.data).view([CHANNELS as i64, side, side])
}

/// Read and preprocess every photo (one worker per core) into its referral input. The
/// first photo that fails stops the run with its path in the error.
pub fn prepare(
    paths: &[std::path::PathBuf],
    cfg: &PreprocessConfig,
    side: usize,
) -> Result<Inputs> {
    ensure!(!paths.is_empty(), "no photos to prepare");
    ensure!(
        side.is_multiple_of(REFERRAL_STRIDE),
        "the referral input side must be a multiple of {REFERRAL_STRIDE}, got {side}"
    );
    let views = crate::parallel::map_in_order(paths, "preprocessing", |_, path| {
        photo_view(path, cfg, side).map(|photo| photo.view)
    })?;
    let mut flat = Vec::with_capacity(views.len() * CHANNELS * side * side);
    for v in &views {
        flat.extend_from_slice(&v.planes.data);
    }
    let tensor = Tensor::from_slice(&flat).view([
        views.len() as i64,
        CHANNELS as i64,
        side as i64,
        side as i64,
    ]);
    Ok(Inputs { tensor, views })
}

/// How the referral network is trained.
#[derive(Clone, Debug)]
pub struct ReferralTraining {
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak rate of the one-cycle schedule.
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// Weight of the S1 sparsity cost ([`s1_sparsity`]) in the loss; 0 leaves it out.
    pub s1_penalty: f64,
}

impl Default for ReferralTraining {
    fn default() -> Self {
        Self {
            epochs: 30,
            batch_size: 16,
            learning_rate: 2e-3,
            weight_decay: 1e-4,
            seed: 1,
            s1_penalty: 0.0,
        }
    }
}

/// How spread out the S1 heatmaps of a batch are: for each input, `mean|g| / rms(g)` of
/// the S1 map `g` (the largest absolute gradient over the channels, per pixel), averaged
/// over the batch. 1 for a flat map, about `sqrt(k / n)` for a map with `k` equal hot
/// pixels of `n`; unchanged when the map is scaled, so lowering it sharpens the map
/// without flattening the decision. As a training cost (double backpropagation) it is our
/// reading of Quellec et al.'s aim of training for sparse, lesion-like heatmaps.
pub fn s1_sparsity(input_gradient: &Tensor) -> Tensor {
    let g = input_gradient
        .abs()
        .amax([1i64].as_slice(), false)
        .flatten(1, -1);
    let l1 = g.mean_dim([1i64].as_slice(), false, Kind::Float);
    let l2 = (g.square().mean_dim([1i64].as_slice(), false, Kind::Float) + 1e-20).sqrt();
    (l1 / l2).mean(Kind::Float)
}

/// A random flip / transpose of each photo and a contrast change per channel: a fundus
/// photo has no preferred orientation (left and right eyes mirror each other), and
/// cameras differ in contrast. Zero (outside the field of view) stays zero.
fn augment(batch: &Tensor, rng: &mut ChaCha8Rng) -> Tensor {
    use rand::Rng;
    let n = batch.size()[0];
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut x = batch.get(i);
        if rng.random_bool(0.5) {
            x = x.flip([2i64].as_slice());
        }
        if rng.random_bool(0.5) {
            x = x.flip([1i64].as_slice());
        }
        if rng.random_bool(0.5) {
            x = x.transpose(1, 2);
        }
        let gains: Vec<f32> = (0..CHANNELS)
            .map(|_| 1.0 + rng.random_range(-0.15f32..0.15))
            .collect();
        out.push(x * Tensor::from_slice(&gains).view([CHANNELS as i64, 1, 1]));
    }
    Tensor::stack(&out, 0)
}

/// Train a fresh network on the photos `train` (indices into `inputs`) with their labels
/// (referable or not). Prints one line per epoch; `progress` names the run.
pub fn train(
    inputs: &Tensor,
    labels: &[bool],
    train: &[usize],
    cfg: &ReferralTraining,
    progress: &str,
) -> Result<(nn::VarStore, ReferralNet)> {
    tch::manual_seed(cfg.seed as i64);
    let vs = nn::VarStore::new(Device::cuda_if_available());
    let net = ReferralNet::new(&vs.root());
    fit_binary(
        &vs,
        &|xs, train| net.forward_t(xs, train).margin,
        inputs,
        labels,
        train,
        cfg,
        progress,
    )?;
    Ok((vs, net))
}

/// Fit the variables of `vs` so that `margin(inputs, true)` (one value per input) says
/// `labels` (binary cross-entropy on the margin as a logit, the minority class weighed
/// up), on the inputs `train` (indices into `inputs`), augmented ([`augment`]), with
/// AdamW and a one-cycle schedule. The referral network and the zoom-in crop classifier
/// are trained by this one loop.
pub fn fit_binary(
    vs: &nn::VarStore,
    margin: &dyn Fn(&Tensor, bool) -> Tensor,
    inputs: &Tensor,
    labels: &[bool],
    train: &[usize],
    cfg: &ReferralTraining,
    progress: &str,
) -> Result<()> {
    ensure!(!train.is_empty(), "{progress}: nothing to train on");
    let positives = train.iter().filter(|&&i| labels[i]).count();
    ensure!(
        positives > 0 && positives < train.len(),
        "{progress}: the training inputs need both referable and non-referable eyes \
         ({positives} of {} referable)",
        train.len()
    );
    let device = vs.device();
    let mut opt = nn::AdamW {
        wd: cfg.weight_decay,
        ..Default::default()
    }
    .build(vs, cfg.learning_rate)
    .context("cannot build the optimiser")?;
    // Referable eyes are the minority: weigh them up to balance the loss.
    let pos_weight = Tensor::from_slice(&[(train.len() - positives) as f32 / positives as f32])
        .to_device(device);
    let steps_per_epoch = train.len().div_ceil(cfg.batch_size);
    let total = steps_per_epoch * cfg.epochs;
    let bar = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template(&format!(
            "{progress} {{bar:30}} {{pos}}/{{len}} steps [{{elapsed}}<{{eta}}] {{msg}}"
        ))
        .expect("valid template"),
    );
    let mut step = 0;
    for epoch in 0..cfg.epochs {
        let started = Instant::now();
        let mut rng =
            ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
        tch::manual_seed((cfg.seed + epoch as u64) as i64);
        let mut order = train.to_vec();
        order.shuffle(&mut rng);
        let mut loss_sum = 0.0;
        for chunk in order.chunks(cfg.batch_size) {
            let (lr, beta1) = one_cycle(step, total, cfg.learning_rate);
            opt.set_lr(lr);
            opt.set_momentum(beta1);
            let idx = Tensor::from_slice(&chunk.iter().map(|&i| i as i64).collect::<Vec<_>>());
            let xs = augment(&inputs.index_select(0, &idx), &mut rng).to_device(device);
            let ys = Tensor::from_slice(
                &chunk
                    .iter()
                    .map(|&i| labels[i] as u8 as f32)
                    .collect::<Vec<_>>(),
            )
            .to_device(device);
            let xs = if cfg.s1_penalty > 0.0 {
                xs.set_requires_grad(true)
            } else {
                xs
            };
            let m = margin(&xs, true);
            let mut loss = m.binary_cross_entropy_with_logits(
                &ys,
                None::<Tensor>,
                Some(pos_weight.shallow_clone()),
                tch::Reduction::Mean,
            );
            if cfg.s1_penalty > 0.0 {
                // The S1 map with its graph kept, so the cost trains the weights.
                let g = Tensor::run_backward(&[m.sum(Kind::Float)], &[&xs], true, true)
                    .into_iter()
                    .next()
                    .context("no input gradient for the S1 cost")?;
                loss += s1_sparsity(&g) * cfg.s1_penalty;
            }
            opt.backward_step(&loss);
            let l = loss.double_value(&[]);
            if !l.is_finite() {
                bail!(
                    "{progress}: the training loss became {l} at epoch {}",
                    epoch + 1
                );
            }
            loss_sum += l * chunk.len() as f64;
            step += 1;
            bar.inc(1);
        }
        bar.set_message(format!(
            "epoch {} loss {:.3} ({:.0} s)",
            epoch + 1,
            loss_sum / train.len() as f64,
            started.elapsed().as_secs_f64()
        ));
    }
    bar.finish();
    Ok(())
}

/// Margin and attention map (row-major, `s * s` values) of each photo `which`.
pub fn predict(
    net: &ReferralNet,
    inputs: &Tensor,
    which: &[usize],
) -> Result<Vec<(f64, Vec<f32>)>> {
    let device = Device::cuda_if_available();
    let mut out = Vec::with_capacity(which.len());
    let _guard = tch::no_grad_guard();
    for chunk in which.chunks(8) {
        let idx = Tensor::from_slice(&chunk.iter().map(|&i| i as i64).collect::<Vec<_>>());
        let r = net.forward_t(&inputs.index_select(0, &idx).to_device(device), false);
        let margins = Vec::<f32>::try_from(&r.margin.to_device(Device::Cpu))
            .context("reading referral margins")?;
        for (k, m) in margins.into_iter().enumerate() {
            let att = r
                .attention
                .get(k as i64)
                .to_device(Device::Cpu)
                .flatten(0, -1);
            out.push((
                m as f64,
                Vec::<f32>::try_from(&att).context("reading attention")?,
            ));
        }
    }
    Ok(out)
}

/// Quellec's S1 heatmap of one input `[3, side, side]`: the absolute gradient of the
/// referral margin with respect to each input pixel, the largest over the three channels
/// (`side * side` values, row-major). Pixels that move the decision most are hot.
pub fn s1_heatmap(net: &ReferralNet, input: &Tensor) -> Result<Vec<f32>> {
    Ok(explain(net, input)?.s1)
}

/// What the network says about one input and why, from one forward pass.
pub struct Explained {
    pub margin: f64,
    /// Row-major, `side / 16` squared values.
    pub attention: Vec<f32>,
    /// The S1 heatmap ([`s1_heatmap`]), `side * side` values.
    pub s1: Vec<f32>,
}

/// Margin, attention and S1 heatmap of one input `[3, side, side]`.
pub fn explain(net: &ReferralNet, input: &Tensor) -> Result<Explained> {
    let device = Device::cuda_if_available();
    let x = input
        .unsqueeze(0)
        .to_device(device)
        .detach()
        .set_requires_grad(true);
    let out = net.forward_t(&x, false);
    let grads = Tensor::run_backward(&[out.margin.sum(Kind::Float)], &[&x], false, false);
    let g = grads
        .into_iter()
        .next()
        .context("no gradient for the input")?
        .abs()
        .amax([1i64].as_slice(), false)
        .flatten(0, -1)
        .to_device(Device::Cpu);
    Ok(Explained {
        margin: out.margin.double_value(&[0]),
        attention: Vec::<f32>::try_from(
            &out.attention.detach().flatten(0, -1).to_device(Device::Cpu),
        )
        .context("reading attention")?,
        s1: Vec::<f32>::try_from(&g).context("reading the heatmap")?,
    })
}

/// Load trained referral weights.
pub fn load(path: &std::path::Path) -> Result<(nn::VarStore, ReferralNet)> {
    crate::train::load_weights(path, "referral", ReferralNet::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Photos of noise where "referable" is decided by a planted bright 10x10 patch at a
    /// random place: the network must learn it from image labels alone, and its
    /// attention must point at the patch (Zoom-in-Net's premise, on a case where the
    /// answer is known).
    #[test]
    fn s1_sparsity_is_low_for_few_hot_pixels_and_scale_free() {
        let flat = Tensor::ones([2, 3, 8, 8], (Kind::Float, Device::Cpu));
        let v = |t: &Tensor| s1_sparsity(t).double_value(&[]);
        assert!((v(&flat) - 1.0).abs() < 1e-6);
        // 4 hot pixels of 64 (in one channel; the map takes the largest): sqrt(4/64).
        let sparse = Tensor::zeros([2, 3, 8, 8], (Kind::Float, Device::Cpu));
        let _ = sparse
            .narrow(1, 2, 1)
            .narrow(2, 0, 2)
            .narrow(3, 0, 2)
            .fill_(-3.0);
        assert!((v(&sparse) - 0.25).abs() < 1e-6, "{}", v(&sparse));
        assert!((v(&(&sparse * 100.0)) - v(&sparse)).abs() < 1e-6);
    }

    #[test]
    fn the_s1_cost_trains_through_double_backpropagation() {
        let inputs = Tensor::randn([16, 3, 32, 32], (Kind::Float, Device::Cpu));
        let labels: Vec<bool> = (0..16).map(|i| i % 2 == 0).collect();
        let all: Vec<usize> = (0..16).collect();
        let cfg = ReferralTraining {
            epochs: 2,
            batch_size: 8,
            s1_penalty: 1.0,
            ..Default::default()
        };
        let (vs, _net) = train(&inputs, &labels, &all, &cfg, "s1 cost").unwrap();
        let plain = ReferralTraining {
            s1_penalty: 0.0,
            ..cfg
        };
        let (vs0, _) = train(&inputs, &labels, &all, &plain, "no s1 cost").unwrap();
        // Same seed and data: only the cost differs, so the weights do.
        let w = |v: &nn::VarStore| v.variables()["conv1.weight"].copy();
        assert!(!w(&vs).allclose(&w(&vs0), 1e-6, 1e-6, false));
    }

    #[test]
    fn learns_a_planted_pattern_and_attends_to_it() {
        use rand::Rng;
        let (n, side) = (96usize, 64i64);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let inputs = Tensor::randn([n as i64, 3, side, side], (Kind::Float, Device::Cpu)) * 0.5;
        let mut labels = Vec::new();
        let mut centres = Vec::new();
        for i in 0..n {
            let referable = i % 2 == 0;
            let (x, y) = (
                rng.random_range(4..side - 14),
                rng.random_range(4..side - 14),
            );
            if referable {
                let _ = inputs
                    .get(i as i64)
                    .narrow(1, y, 10)
                    .narrow(2, x, 10)
                    .fill_(2.0);
            }
            labels.push(referable);
            centres.push((x + 5, y + 5));
        }
        let train_idx: Vec<usize> = (0..64).collect();
        let held: Vec<usize> = (64..n).collect();
        let cfg = ReferralTraining {
            epochs: 12,
            batch_size: 16,
            learning_rate: 3e-3,
            ..Default::default()
        };
        let (_vs, net) = train(&inputs, &labels, &train_idx, &cfg, "synthetic").unwrap();
        let out = predict(&net, &inputs, &held).unwrap();
        let scores: Vec<f32> = out.iter().map(|(m, _)| *m as f32).collect();
        let held_labels: Vec<bool> = held.iter().map(|&i| labels[i]).collect();
        let auc = crate::train::auc(&scores, &held_labels);
        // The hottest attention cell (16x16 px each) overlaps the patch.
        let cells = (side as usize) / REFERRAL_STRIDE;
        let (mut on_patch, mut positives) = (0, 0);
        for ((_, att), &i) in out.iter().zip(&held) {
            if !labels[i] {
                continue;
            }
            positives += 1;
            let best = (0..att.len())
                .max_by(|&a, &b| att[a].total_cmp(&att[b]))
                .unwrap();
            let cell = REFERRAL_STRIDE as i64;
            let (cx, cy) = ((best % cells) as i64 * cell, (best / cells) as i64 * cell);
            // The patch spans corner .. corner + 10 on each axis.
            let (x, y) = (centres[i].0 - 5, centres[i].1 - 5);
            if cx < x + 10 && x < cx + cell && cy < y + 10 && y < cy + cell {
                on_patch += 1;
            }
        }
        eprintln!(
            "synthetic: held-out AUC {auc:.3}, attention on the patch {on_patch}/{positives}"
        );
        assert!(auc >= 0.95, "held-out AUC {auc}");
        assert!(
            on_patch * 10 >= positives * 8,
            "attention on the patch {on_patch}/{positives}"
        );
    }

    #[test]
    fn shapes_and_attention_pooling() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = ReferralNet::new(&vs.root());
        let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        let out = net.forward_t(&x, false);
        assert_eq!(out.margin.size(), [2]);
        assert_eq!(out.attention.size(), [2, 1, 4, 4]);
        let a = out.attention.min().double_value(&[]);
        assert!(a > 0.0 && out.attention.max().double_value(&[]) < 1.0);
        let heat = s1_heatmap(&net, &x.get(0)).unwrap();
        assert_eq!(heat.len(), 64 * 64);
        assert!(heat.iter().any(|&v| v > 0.0));
    }
}
