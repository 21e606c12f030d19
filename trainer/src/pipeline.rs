//! The two-stage training and its evaluation, with libtorch doing the arithmetic.
//!
//! Stage 1 learns, from crops whose every stride-2 cell is labelled ([`crate::dense`]),
//! a map of "an MA lies here"; the map's local maxima ([`ma_core::candidates`],
//! the device's own code) are the candidates. Its false alarms on the training images
//! become the hard negatives of stage 2, which judges each candidate from a 41x41 patch.
//! The final score adds both nets' logit margins ([`Scoring`]).

use std::path::Path;

use anyhow::{Result, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use ma_core::candidates::{Candidate, CandidateConfig, ProbMap, find_candidates};
use ma_core::detection::Detection;
use ma_core::geometry::{CHANNELS, PatchGeometry, Planes};
use ma_core::scoring::Scoring;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor, nn};

use crate::dense::{Crop, PixelLabels, balanced_cell_loss, crop_batch, lesion_crops, random_crops};
use crate::froc::{ImageOutcome, Verdict};
use crate::gt_enhance::crop_enhancement;
use crate::nets::{InputScales, Net, Stage};
use crate::patches::{Augment, Sample, batch, positives, random_negatives};
use crate::prepare::PreparedImage;
use crate::train::{
    NetSpec, StageConfig, Triplet, Validation, auc, patch_loss, train_stage, validate,
};

/// Everything that sets how the cascade is trained.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub stage1: StageConfig,
    /// Stage-1 crops per epoch; half hold a lesion, half are anywhere in the FOV.
    pub stage1_crops: usize,
    pub stage2: StageConfig,
    /// Stage-2 positives: lesion centres shifted by up to this many pixels (candidates
    /// land within a pixel or two of MA centres), besides the candidates that hit lesions.
    pub stage2_jitter: i64,
    /// Random negatives added to stage 2's hard negatives, as a fraction of them.
    pub stage2_random_fraction: f64,
    /// Stage-1 candidates per training image that stage 2 learns from (more than the
    /// device keeps, so stage 2 also sees the weaker look-alikes).
    pub hard_negative_candidates: usize,
    /// Candidate picking on the device (and in evaluation).
    pub candidates: CandidateConfig,
    /// How the two margins make the reported score.
    pub scoring: Scoring,
    /// Stage 2's triplet term beside the cross-entropy (`--triplet-weight`); `None`: off.
    pub stage2_triplet: Option<Triplet>,
    /// Stage 1's ground-truth feature enhancement while training, its beta
    /// (`--gt-enhance`, [`crate::gt_enhance`]); `None`: off.
    pub stage1_gt_enhance: Option<f32>,
    /// The input scales stage 1 sees (`--stage1-scales`); single by default.
    pub stage1_scales: InputScales,
}

impl PipelineConfig {
    /// Combinations the trainer cannot run, refused before any work.
    pub fn check(&self) -> Result<()> {
        ensure!(
            self.stage1_gt_enhance.is_none() || self.stage1_scales.is_single(),
            "--gt-enhance works on the single-scale stage 1 only: drop --gt-enhance or \
             --stage1-scales"
        );
        let (crop, multiple) = (crate::dense::CROP_SIDE, self.stage1_scales.input_multiple());
        ensure!(
            crop.is_multiple_of(multiple),
            "stage-1 scales {} need input sides in multiples of {multiple}; the \
             {crop}-pixel training crops are not",
            self.stage1_scales.describe()
        );
        Ok(())
    }

    /// The training-only methods this configuration turns on, in words (recorded in
    /// `training-data.json` and the manifest's `[training] data`).
    pub fn methods(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.stage1_scales.is_single() {
            out.push(format!(
                "multi-scale stage 1 (scales {})",
                self.stage1_scales.describe()
            ));
        }
        if let Some(beta) = self.stage1_gt_enhance {
            out.push(format!(
                "stage-1 ground-truth feature enhancement (beta {beta})"
            ));
        }
        if let Some(t) = self.stage2_triplet {
            out.push(format!(
                "stage-2 triplet loss (weight {}, margin {})",
                t.weight, t.margin
            ));
        }
        out
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            stage1: StageConfig {
                epochs: 15,
                batch_size: 16,
                learning_rate: 2e-3,
                weight_decay: 0.0,
                seed: 1,
            },
            stage1_crops: 3000,
            stage2: StageConfig {
                epochs: 12,
                batch_size: 64,
                learning_rate: 2e-3,
                weight_decay: 1e-4,
                seed: 2,
            },
            stage2_jitter: 2,
            stage2_random_fraction: 0.25,
            hard_negative_candidates: 300,
            candidates: CandidateConfig::default(),
            scoring: Scoring::default(),
            stage2_triplet: None,
            stage1_gt_enhance: None,
            stage1_scales: InputScales::single(),
        }
    }
}

/// Both trained networks.
pub struct Cascade {
    pub stage1: (nn::VarStore, Net),
    pub stage2: (nn::VarStore, Net),
}

/// Train both stages on `train` (indices into `images`); `val` images only give the
/// validation figures (the training images do when `val` is empty). Checkpoints go to
/// `out/checkpoints`.
pub fn train_cascade(
    images: &[PreparedImage],
    train: &[usize],
    val: &[usize],
    cfg: &PipelineConfig,
    out: &Path,
    resume: bool,
) -> Result<Cascade> {
    cfg.check()?;
    let checkpoints = out.join("checkpoints");
    let val_set: Vec<usize> = if val.is_empty() {
        train.to_vec()
    } else {
        val.to_vec()
    };
    let labels: Vec<PixelLabels> = images.iter().map(PixelLabels::of).collect();

    // Stage 1: every cell of every crop labelled.
    let mut val_rng = ChaCha8Rng::seed_from_u64(99);
    let validation1: Vec<Crop> = lesion_crops(images, &val_set, 64, Augment::NONE, &mut val_rng)
        .into_iter()
        .chain(random_crops(
            images,
            &val_set,
            64,
            Augment::NONE,
            &mut val_rng,
        ))
        .collect();
    let mut draw1 = |_epoch: usize, rng: &mut ChaCha8Rng| {
        let half = cfg.stage1_crops / 2;
        let mut crops = lesion_crops(images, train, half, Augment::DEFAULT, rng);
        crops.extend(random_crops(
            images,
            train,
            cfg.stage1_crops - half,
            Augment::DEFAULT,
            rng,
        ));
        crops
    };
    let loss1 = |net: &Net, chunk: &[Crop]| {
        let device = Device::cuda_if_available();
        let (xs, ys) = crop_batch(images, &labels, chunk);
        let xs = xs.to_device(device);
        let logits = match cfg.stage1_gt_enhance {
            Some(beta) => {
                let enhancement = crop_enhancement(images, chunk, beta).to_device(device);
                net.forward_enhanced(&xs, &enhancement, true)
            }
            None => net.forward_t(&xs, true),
        };
        balanced_cell_loss(&logits, &ys.to_device(device))
    };
    let validate1 = |net: &Net| validate_cells(net, images, &labels, &validation1);
    let stage1 = train_stage(
        NetSpec {
            stage: Stage::Candidates,
            layers: cfg.stage1_scales.layers(),
        },
        &mut draw1,
        &loss1,
        &validate1,
        &cfg.stage1,
        &checkpoints,
        resume,
    )?;

    // Stage 2: stage 1's candidates on the training images, as the device makes them.
    let mining = CandidateConfig {
        max_candidates: cfg.hard_negative_candidates,
        ..cfg.candidates.clone()
    };
    let mined = mine_candidates(&stage1.1, images, train, &mining)?;
    eprintln!(
        "stage 2: {} hard negatives and {} candidates on lesions from {} training images",
        mined.negatives.len(),
        mined.positives.len(),
        train.len()
    );
    let val_mined = if val.is_empty() {
        mined.clone()
    } else {
        mine_candidates(&stage1.1, images, val, &mining)?
    };
    let mut validation2 = positives(
        images,
        &val_set,
        cfg.stage2_jitter,
        Augment::NONE,
        &mut val_rng,
    );
    validation2.extend(val_mined.negatives.iter().map(|s| Sample {
        dihedral: 0,
        gain: 1.0,
        bias: 0.0,
        ..*s
    }));

    // Balanced: as many positives (differently jittered and augmented lesion centres, and
    // the candidates that hit lesions) as negatives.
    let mut draw2 = |_epoch: usize, rng: &mut ChaCha8Rng| {
        let mut s: Vec<Sample> = mined
            .negatives
            .iter()
            .map(|n| Sample::new(n.image, n.x, n.y, false, Augment::DEFAULT, rng))
            .collect();
        let n = (mined.negatives.len() as f64 * cfg.stage2_random_fraction) as usize;
        s.extend(random_negatives(images, train, n, Augment::DEFAULT, rng));
        let negatives = s.len();
        let mut pos = Vec::new();
        while pos.len() < negatives {
            let round = positives(images, train, cfg.stage2_jitter, Augment::DEFAULT, rng);
            if round.is_empty() && mined.positives.is_empty() {
                break;
            }
            pos.extend(round);
            pos.extend(
                mined
                    .positives
                    .iter()
                    .map(|p| Sample::new(p.image, p.x, p.y, true, Augment::DEFAULT, rng)),
            );
        }
        pos.truncate(negatives);
        s.extend(pos);
        s
    };
    let loss2 = |net: &Net, chunk: &[Sample]| patch_loss(net, images, chunk, cfg.stage2_triplet);
    let validate2 = |net: &Net| validate(net, images, &validation2, Device::cuda_if_available());
    let stage2 = train_stage(
        Stage::Verdict.into(),
        &mut draw2,
        &loss2,
        &validate2,
        &cfg.stage2,
        &checkpoints,
        resume,
    )?;
    Ok(Cascade { stage1, stage2 })
}

/// Loss, accuracy and AUC of stage 1 over the labelled cells of fixed crops.
fn validate_cells(
    net: &Net,
    images: &[PreparedImage],
    labels: &[PixelLabels],
    crops: &[Crop],
) -> Validation {
    let _guard = tch::no_grad_guard();
    let device = Device::cuda_if_available();
    let (mut loss, mut margins, mut truth) = (0.0, Vec::new(), Vec::new());
    for chunk in crops.chunks(16) {
        let (xs, ys) = crop_batch(images, labels, chunk);
        let logits = net.forward_t(&xs.to_device(device), false);
        loss += balanced_cell_loss(&logits, &ys.to_device(device)).double_value(&[])
            * chunk.len() as f64;
        let m = (logits.select(1, 1) - logits.select(1, 0))
            .to_device(Device::Cpu)
            .flatten(0, -1);
        let m = Vec::<f32>::try_from(&m).expect("float margins");
        let y = Vec::<i64>::try_from(&ys.flatten(0, -1)).expect("int labels");
        for (m, y) in m.into_iter().zip(y) {
            if y >= 0 {
                margins.push(m);
                truth.push(y == 1);
            }
        }
    }
    let (pos, neg) = (
        truth.iter().filter(|t| **t).count().max(1),
        truth.iter().filter(|t| !**t).count().max(1),
    );
    // Balanced accuracy, as the loss is balanced.
    let (mut tp, mut tn) = (0, 0);
    for (m, &t) in margins.iter().zip(&truth) {
        match (t, *m >= 0.0) {
            (true, true) => tp += 1,
            (false, false) => tn += 1,
            _ => {}
        }
    }
    Validation {
        loss: loss / crops.len().max(1) as f64,
        accuracy: 0.5 * (tp as f64 / pos as f64 + tn as f64 / neg as f64),
        auc: auc(&margins, &truth),
    }
}

/// Stage-1 candidates of training images, sorted into stage-2 training samples.
#[derive(Clone, Debug, Default)]
pub struct Mined {
    /// Candidates that hit a lesion (FROC rule): positives where the device puts them.
    pub positives: Vec<Sample>,
    /// Candidates that hit none and lie outside the exclusion zone.
    pub negatives: Vec<Sample>,
}

/// Run stage 1 over `subset` and sort its candidates (see [`Mined`]).
pub fn mine_candidates(
    net1: &Net,
    images: &[PreparedImage],
    subset: &[usize],
    cfg: &CandidateConfig,
) -> Result<Mined> {
    let bar = progress(subset.len(), "stage-1 maps");
    let mut out = Mined::default();
    for &i in subset {
        let img = &images[i];
        let cands = image_candidates(net1, img, cfg);
        let dets = to_detections(img, &cands, |_, c| c.stage1 as f64);
        let outcome = ImageOutcome::score(&img.name, &img.truth, &dets)?;
        for (c, (_, verdict)) in cands.iter().zip(&outcome.detections) {
            let sample = |label| Sample {
                image: i,
                x: c.x as i64,
                y: c.y as i64,
                label,
                dihedral: 0,
                gain: 1.0,
                bias: 0.0,
            };
            match verdict {
                Verdict::TruePositive => out.positives.push(sample(true)),
                Verdict::FalsePositive if !img.exclusion.get(c.x as i64, c.y as i64) => {
                    out.negatives.push(sample(false))
                }
                _ => {}
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// Stage-1 margin map of an image: cell (i, j) covers canonical pixels (2j, 2i) to
/// (2j + 1, 2i + 1). The planes are padded with zeros (as outside the FOV) to a multiple
/// of the net's input multiple on the right and bottom, and the map is cut
/// back to the cells that cover the image, as the device does.
pub fn stage1_map(net: &Net, planes: &Planes) -> ProbMap {
    let _guard = tch::no_grad_guard();
    let m = net.input_multiple() as i64;
    let (h, w) = (planes.height as i64, planes.width as i64);
    let x = Tensor::from_slice(&planes.data)
        .view([1, CHANNELS as i64, h, w])
        .constant_pad_nd([0, (m - w % m) % m, 0, (m - h % m) % m])
        .to_device(Device::cuda_if_available());
    let s = Stage::CANDIDATES_STRIDE as i64;
    let (mh, mw) = ((h + s - 1) / s, (w + s - 1) / s);
    let map = net
        .margin(&x, false)
        .squeeze_dim(0)
        .narrow(0, 0, mh)
        .narrow(1, 0, mw)
        .to_device(Device::Cpu)
        .contiguous();
    ProbMap {
        width: mw as usize,
        height: mh as usize,
        stride: Stage::CANDIDATES_STRIDE,
        offset: 0,
        data: Vec::<f32>::try_from(map.flatten(0, -1)).expect("float map"),
    }
}

/// Candidates of one image, best stage-1 margin first.
pub fn image_candidates(
    net1: &Net,
    image: &PreparedImage,
    cfg: &CandidateConfig,
) -> Vec<Candidate> {
    let map = stage1_map(net1, &image.pre.planes);
    find_candidates(&map, &image.pre.planes, &image.pre.fov, cfg)
}

/// Stage-2 margin of the patches centred on `candidates` of `images[image]`.
pub fn stage2_margins(
    net2: &Net,
    images: &[PreparedImage],
    image: usize,
    candidates: &[Candidate],
) -> Vec<f32> {
    let _guard = tch::no_grad_guard();
    let samples: Vec<Sample> = candidates
        .iter()
        .map(|c| Sample {
            image,
            x: c.x as i64,
            y: c.y as i64,
            label: false,
            dihedral: 0,
            gain: 1.0,
            bias: 0.0,
        })
        .collect();
    let mut out = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(64) {
        let (xs, _) = batch(images, chunk, PatchGeometry::VERDICT);
        let m = net2
            .margin(&xs.to_device(Device::cuda_if_available()), false)
            .to_device(Device::Cpu)
            .to_kind(Kind::Float);
        out.extend(Vec::<f32>::try_from(&m).expect("float margins"));
    }
    out
}

/// One image through the cascade.
pub struct CascadeOutput {
    /// Best stage-1 margin first.
    pub candidates: Vec<Candidate>,
    /// Stage-2 margin of each candidate, same order.
    pub stage2: Vec<f32>,
}

impl CascadeOutput {
    /// Detections in original coordinates, candidate order, scored by `scoring` (those
    /// off the photo dropped, as on the device).
    pub fn detections(&self, image: &PreparedImage, scoring: &Scoring) -> Vec<Detection> {
        to_detections(image, &self.candidates, |i, c| {
            scoring.score(c.stage1, self.stage2[i])
        })
    }
}

/// Candidates of one image (up to `cfg.max_candidates`) and their stage-2 margins.
pub fn run_cascade(
    cascade: &Cascade,
    images: &[PreparedImage],
    image: usize,
    cfg: &CandidateConfig,
) -> CascadeOutput {
    let candidates = image_candidates(&cascade.stage1.1, &images[image], cfg);
    let stage2 = stage2_margins(&cascade.stage2.1, images, image, &candidates);
    CascadeOutput { candidates, stage2 }
}

/// `candidates` on `image`'s photo, scored by `score` (the device's mapping).
fn to_detections(
    image: &PreparedImage,
    candidates: &[Candidate],
    score: impl Fn(usize, &Candidate) -> f64,
) -> Vec<Detection> {
    ma_core::scoring::to_detections(candidates, &image.pre.scale, image.pre.original_size, score)
}

/// What `detect` reports of an image's detections: those scoring at least
/// [`ma_core::scoring::MIN_REPORTED_SCORE`], best first (as the device cascade does).
pub fn reported(detections: &[Detection]) -> Vec<Detection> {
    ma_core::scoring::reported(detections.to_vec())
}

/// Lesion recall of the top-K stage-1 candidates, for each K in `ks`, over `subset`.
pub fn candidate_recall(
    candidates: &[(usize, Vec<Candidate>)],
    images: &[PreparedImage],
    ks: &[usize],
) -> Result<Vec<(usize, f64)>> {
    let total: usize = candidates
        .iter()
        .map(|(i, _)| images[*i].truth.lesions.len())
        .sum();
    let mut out = Vec::new();
    for &k in ks {
        let mut found = 0;
        for (i, cands) in candidates {
            let img = &images[*i];
            let dets = to_detections(img, &cands[..cands.len().min(k)], |_, _| 1.0);
            found += ImageOutcome::score(&img.name, &img.truth, &dets)?.found_at(1.0);
        }
        out.push((
            k,
            if total == 0 {
                0.0
            } else {
                found as f64 / total as f64
            },
        ));
    }
    Ok(out)
}

pub fn progress(n: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(n as u64).with_style(
        ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} [{elapsed}<{eta}]")
            .expect("valid template"),
    );
    bar.set_prefix(what.to_string());
    bar
}
