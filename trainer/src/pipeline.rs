//! The two-stage training and its evaluation, with libtorch doing the arithmetic.
//!
//! Stage 1 (basic CNN) learns "an MA lies within 4 px of the patch centre" from balanced
//! patches; run fully-convolutionally it gives a stride-8 probability map whose peaks,
//! refined to the darkest nearby blob ([`ma_device::cascade::candidates`], the device's
//! own code), are the candidates. Its false alarms on the training images become the hard
//! negatives of stage 2 (final CNN), which scores each candidate.

use std::path::Path;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use ma_device::cascade::MIN_REPORTED_SCORE;
use ma_device::cascade::candidates::{Candidate, CandidateConfig, ProbMap, find_candidates};
use ma_device::detection::Detection;
use ma_device::geometry::{CHANNELS, PatchGeometry, Planes};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Tensor, nn};

use crate::froc::ImageOutcome;
use crate::nets::{Net, Stage};
use crate::patches::{Augment, Sample, batch, dark_negatives, positives, random_negatives};
use crate::prepare::PreparedImage;
use crate::tiles::{
    Tile, TileGeometry, balanced_cell_loss, lesion_tiles, random_tiles, tile_batch,
};
use crate::train::{StageConfig, patch_loss, train_stage, validate};

/// Everything that sets how the cascade is trained.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub stage1: StageConfig,
    pub stage2: StageConfig,
    /// Stage-1 positives are shifted up to this many pixels (half the output stride), so
    /// every map cell within reach of an MA learns to fire.
    pub stage1_jitter: i64,
    /// Stage-2 positives: refined candidates land within a few pixels of MA centres.
    pub stage2_jitter: i64,
    /// Each lesion gives this many (differently jittered and augmented) positives per epoch.
    pub positive_repeats: usize,
    /// Candidate picking for hard negatives and evaluation.
    pub candidates: CandidateConfig,
    /// Random negatives added to stage 2's hard negatives, as a fraction of them.
    pub stage2_random_fraction: f64,
    /// Fraction of stage 1's negatives drawn on dark structures instead of anywhere.
    pub stage1_dark_fraction: f64,
    /// Normalised green below which a pixel counts as dark for those negatives.
    pub dark_green: f32,
    /// Train stage 1 on tiles of this many cells a side, every cell labelled (see
    /// [`crate::tiles`]), instead of on single balanced patches. `None`: patches.
    pub stage1_tiles: Option<TileGeometry>,
    /// Stage-2 architecture: [`Stage::Refine`] (started from stage 1's weights) or
    /// [`Stage::Final`] (the papers' final CNN, from scratch).
    pub stage2_arch: Stage,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            stage1: StageConfig {
                epochs: 10,
                batch_size: 16,
                learning_rate: 1e-3,
                seed: 1,
            },
            stage2: StageConfig {
                epochs: 6,
                batch_size: 64,
                // Fine-tuning stage 1's weights: a tenth of its rate.
                learning_rate: 1e-4,
                seed: 2,
            },
            stage1_jitter: 4,
            stage2_jitter: 2,
            positive_repeats: 4,
            candidates: CandidateConfig {
                threshold: 0.2,
                ..CandidateConfig::default()
            },
            stage2_random_fraction: 0.25,
            stage1_dark_fraction: 0.5,
            dark_green: -2.0,
            stage1_tiles: Some(TileGeometry { cells: 12 }),
            stage2_arch: Stage::Refine,
        }
    }
}

/// Both trained networks.
pub struct Cascade {
    pub stage1: (nn::VarStore, Net),
    pub stage2: (nn::VarStore, Net),
}

/// Train both stages on `train` (indices into `images`); `val` images only give the
/// validation figures. Checkpoints go to `out/checkpoints`.
pub fn train_cascade(
    images: &[PreparedImage],
    train: &[usize],
    val: &[usize],
    cfg: &PipelineConfig,
    out: &Path,
    resume: bool,
) -> Result<Cascade> {
    let checkpoints = out.join("checkpoints");
    let mut val_rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(99);
    let val_set: Vec<usize> = if val.is_empty() {
        train.to_vec()
    } else {
        val.to_vec()
    };
    let val_pos = positives(
        images,
        &val_set,
        cfg.stage1_jitter,
        Augment::NONE,
        &mut val_rng,
    );
    let val_neg = random_negatives(
        images,
        &val_set,
        val_pos.len().max(1),
        Augment::NONE,
        &mut val_rng,
    );
    let validation1: Vec<Sample> = val_pos.into_iter().chain(val_neg).collect();

    let repeats = cfg.positive_repeats.max(1);
    let validate1 = |net: &Net| validate(net, images, &validation1, Device::cuda_if_available());
    let stage1 = match cfg.stage1_tiles {
        Some(geo) => {
            // Every lesion in a tile at a random place, as many random tiles again.
            let mut draw = |_epoch: usize, rng: &mut ChaCha8Rng| {
                let mut t = Vec::new();
                for _ in 0..repeats {
                    t.extend(lesion_tiles(images, train, geo, Augment::DEFAULT, rng));
                }
                let n = t.len();
                t.extend(random_tiles(images, train, n, Augment::DEFAULT, rng));
                t
            };
            let loss = |net: &Net, chunk: &[Tile]| {
                let device = Device::cuda_if_available();
                let (xs, ys) = tile_batch(images, chunk, geo, cfg.stage1_jitter);
                balanced_cell_loss(
                    &net.forward_t(&xs.to_device(device), true),
                    &ys.to_device(device),
                )
            };
            train_stage(
                Stage::Basic,
                None,
                &mut draw,
                &loss,
                &validate1,
                &cfg.stage1,
                &checkpoints,
                resume,
            )?
        }
        None => {
            let mut draw = |_epoch: usize, rng: &mut ChaCha8Rng| {
                let mut s = Vec::new();
                for _ in 0..repeats {
                    s.extend(positives(
                        images,
                        train,
                        cfg.stage1_jitter,
                        Augment::DEFAULT,
                        rng,
                    ));
                }
                let n = s.len();
                let dark = (n as f64 * cfg.stage1_dark_fraction) as usize;
                s.extend(dark_negatives(
                    images,
                    train,
                    dark,
                    cfg.dark_green,
                    Augment::DEFAULT,
                    rng,
                ));
                s.extend(random_negatives(
                    images,
                    train,
                    n - dark,
                    Augment::DEFAULT,
                    rng,
                ));
                s
            };
            let loss = |net: &Net, chunk: &[Sample]| patch_loss(net, images, chunk);
            train_stage(
                Stage::Basic,
                None,
                &mut draw,
                &loss,
                &validate1,
                &cfg.stage1,
                &checkpoints,
                resume,
            )?
        }
    };

    // Hard negatives: stage-1 candidates on the training images away from every lesion.
    let hard = hard_negatives(&stage1.1, images, train, &cfg.candidates);
    eprintln!(
        "stage 2: {} hard negatives from {} training images",
        hard.len(),
        train.len()
    );
    // Without validation images, validate on the training images (as stage 1 does).
    let val_hard = if val.is_empty() {
        hard.clone()
    } else {
        hard_negatives(&stage1.1, images, val, &cfg.candidates)
    };
    let mut validation2 = positives(
        images,
        &val_set,
        cfg.stage2_jitter,
        Augment::NONE,
        &mut val_rng,
    );
    validation2.extend(val_hard.iter().map(|&(i, c)| {
        Sample::new(
            i,
            c.x as i64,
            c.y as i64,
            false,
            Augment::NONE,
            &mut val_rng,
        )
    }));

    // Balanced: as many (differently jittered and augmented) positives as negatives. With
    // the natural 1:4 mix the final CNN settled on the prior (validation AUC 0.49-0.55
    // after 3 epochs in the fold-1 pilot).
    let mut draw2 = |_epoch: usize, rng: &mut ChaCha8Rng| {
        let mut s: Vec<Sample> = hard
            .iter()
            .map(|&(i, c)| Sample::new(i, c.x as i64, c.y as i64, false, Augment::DEFAULT, rng))
            .collect();
        let n = (hard.len() as f64 * cfg.stage2_random_fraction) as usize;
        s.extend(random_negatives(images, train, n, Augment::DEFAULT, rng));
        let negatives = s.len();
        let mut pos = Vec::new();
        while pos.len() < negatives.max(repeats) {
            let round = positives(images, train, cfg.stage2_jitter, Augment::DEFAULT, rng);
            if round.is_empty() {
                break;
            }
            pos.extend(round);
        }
        pos.truncate(negatives.max(repeats));
        s.extend(pos);
        s.shuffle(rng);
        s
    };
    let loss2 = |net: &Net, chunk: &[Sample]| patch_loss(net, images, chunk);
    let validate2 = |net: &Net| validate(net, images, &validation2, Device::cuda_if_available());
    let init = (cfg.stage2_arch == Stage::Refine).then_some(&stage1.0);
    let stage2 = train_stage(
        cfg.stage2_arch,
        init,
        &mut draw2,
        &loss2,
        &validate2,
        &cfg.stage2,
        &checkpoints,
        resume,
    )?;
    Ok(Cascade { stage1, stage2 })
}

/// Stage-1 probability map of an image: the planes padded by half a patch (zeros, as
/// outside the FOV), so cell (i, j) is centred on canonical pixel (8j, 8i).
pub fn stage1_map(net: &Net, planes: &Planes) -> ProbMap {
    let _guard = tch::no_grad_guard();
    let half = (PatchGeometry::DEFAULT.size / 2) as i64;
    let x = Tensor::from_slice(&planes.data)
        .view([
            1,
            CHANNELS as i64,
            planes.height as i64,
            planes.width as i64,
        ])
        .constant_pad_nd([half, half, half, half])
        .to_device(Device::cuda_if_available());
    let map = net.forward_map(&x).to_device(Device::Cpu).contiguous();
    let size = map.size();
    ProbMap {
        width: size[1] as usize,
        height: size[0] as usize,
        stride: Stage::BASIC_STRIDE,
        offset: 0,
        data: Vec::<f32>::try_from(map.flatten(0, -1)).expect("float map"),
    }
}

/// Candidates of one image, best stage-1 probability first.
pub fn image_candidates(
    net1: &Net,
    image: &PreparedImage,
    cfg: &CandidateConfig,
) -> Vec<Candidate> {
    let map = stage1_map(net1, &image.pre.planes);
    find_candidates(&map, &image.pre.planes, &image.pre.fov, cfg)
}

fn hard_negatives(
    net1: &Net,
    images: &[PreparedImage],
    subset: &[usize],
    cfg: &CandidateConfig,
) -> Vec<(usize, Candidate)> {
    let bar = progress(subset.len(), "stage-1 maps");
    let mut out = Vec::new();
    for &i in subset {
        for c in image_candidates(net1, &images[i], cfg) {
            if !images[i].exclusion.get(c.x as i64, c.y as i64) {
                out.push((i, c));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    out
}

/// Stage-2 MA probability of patches centred on `candidates` of one image.
pub fn stage2_scores(
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
        let (xs, _) = batch(images, chunk, PatchGeometry::DEFAULT);
        let p = net2
            .patch_probabilities(&xs.to_device(Device::cuda_if_available()))
            .to_device(Device::Cpu);
        out.extend(Vec::<f32>::try_from(&p).expect("float probabilities"));
    }
    out
}

/// Candidates of one image (best stage-1 probability first) and, in the same order, their
/// detections in original coordinates with stage-2 scores; see [`reported`].
pub fn detect(
    cascade: &Cascade,
    images: &[PreparedImage],
    image: usize,
    cfg: &CandidateConfig,
) -> (Vec<Candidate>, Vec<Detection>) {
    let candidates = image_candidates(&cascade.stage1.1, &images[image], cfg);
    let scores = stage2_scores(&cascade.stage2.1, images, image, &candidates);
    let scale = images[image].pre.scale;
    let detections: Vec<Detection> = candidates
        .iter()
        .zip(&scores)
        .map(|(c, &s)| {
            let (x, y) = scale.to_original(c.x as f64, c.y as f64);
            Detection {
                x,
                y,
                score: s as f64,
            }
        })
        .collect();
    (candidates, detections)
}

/// What `detect` reports of an image's detections: those scoring at least
/// [`MIN_REPORTED_SCORE`], best first (as the device cascade does).
pub fn reported(detections: &[Detection]) -> Vec<Detection> {
    let mut out: Vec<Detection> = detections
        .iter()
        .filter(|d| d.score >= MIN_REPORTED_SCORE)
        .copied()
        .collect();
    out.sort_by(|a, b| b.score.total_cmp(&a.score));
    out
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
            let dets: Vec<Detection> = cands
                .iter()
                .take(k)
                .map(|c| {
                    let (x, y) = img.pre.scale.to_original(c.x as f64, c.y as f64);
                    Detection { x, y, score: 1.0 }
                })
                .collect();
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
