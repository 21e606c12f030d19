//! The CNN cascade on the device: preprocess -> stage-1 map -> candidates -> stage-2
//! verdicts -> detections in original image coordinates; and, when the model set has
//! one, the referral network on the same preprocessed photo -> referral score and
//! attention boxes.
//!
//! Every step but the networks is `ma-core`'s, shared with the trainer; this module runs
//! the networks with tract ([`onnx`]) and times the steps.

pub mod onnx;

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use image::RgbImage;

use ma_core::candidates::{self, CandidateConfig, find_candidates};
use ma_core::detection::Detection;
use ma_core::geometry::PatchGeometry;
use ma_core::manifest::{Manifest, Role, Variant};
use ma_core::preprocess::{FovSource, PreprocessConfig, preprocess};
use ma_core::referral::{
    AttentionBox, ReferralConfig, ReferralView, merged_margin, refer_score, top_cells,
};
use ma_core::scoring::{Scoring, reported, to_detections};
use ma_core::signing::ModelTrust;
use onnx::{PatchModel, ReferralModel, STAGE1_BANDS, STAGE2_BATCH, Stage1Model};

/// Where the time of one image went, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    pub preprocess: f64,
    pub stage1: f64,
    pub stage2: f64,
    /// The referral network (0 without one).
    pub referral: f64,
    pub total: f64,
}

/// What the cascade says about one image.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageResult {
    pub width: u32,
    pub height: u32,
    /// Every candidate with score >=
    /// [`MIN_REPORTED_SCORE`](ma_core::scoring::MIN_REPORTED_SCORE), best first, in original
    /// image coordinates.
    pub detections: Vec<Detection>,
    /// Candidates stage 1 handed to stage 2.
    pub candidates: usize,
    /// The referral network's answer (model sets with one).
    pub referral: Option<Referral>,
    pub timings: Timings,
}

/// The referral network's answer about one photo.
#[derive(Clone, Debug, PartialEq)]
pub struct Referral {
    /// In [0, 1], higher = more likely referable DR (`refer_score` of `detect`).
    pub score: f64,
    /// The strongest attention cells, strongest first, in original coordinates.
    pub boxes: Vec<AttentionBox>,
    /// The attention map (`attention_side` squared values, row-major) over `view`.
    pub attention: Vec<f32>,
    pub attention_side: usize,
    /// Where the network's input lies in the photo (maps the attention back onto it).
    pub view: ReferralView,
}

impl Referral {
    /// `photo` (the one this answer is about) with the attention map blended in and the
    /// boxes outlined: what `detect --heatmaps` writes and the panel's heatmap overlay shows.
    pub fn picture(&self, photo: &RgbImage) -> RgbImage {
        // The attention is a sigmoid output: scaled to its own range it would always look
        // hot, so it is drawn on the absolute 0..1 scale.
        ma_core::heatmap::picture(
            photo,
            &self.view,
            &self.attention,
            self.attention_side,
            1.0,
            &self.boxes,
        )
    }
}

impl ImageResult {
    /// MAs at or above an operating-point score.
    pub fn ma_count(&self, threshold: f64) -> usize {
        self.detections
            .iter()
            .filter(|d| d.score >= threshold)
            .count()
    }
}

/// The referral network and its zoom-in step, with the manifest's settings.
struct ReferralStep {
    model: ReferralModel,
    /// The crop classifier, when the set has one (`[referral.zoom]`).
    zoom: Option<PatchModel>,
    cfg: ReferralConfig,
}

impl ReferralStep {
    /// The referral answer about a preprocessed photo: the network's margin, merged with
    /// the mean margin of the crop classifier on the strongest attention cells' crops when
    /// the set has a zoom-in step (as the trainer's `referral zoom-cv` measured it).
    fn run(&self, pre: &ma_core::preprocess::Preprocessed) -> Result<Referral> {
        let cfg = &self.cfg;
        let view = ReferralView::of(pre, cfg.input_side)?;
        let out = self.model.run(&view.planes)?;
        ensure!(
            out.attention_side == cfg.attention_side(),
            "the referral model's attention map is {0}x{0}, the manifest implies {1}x{1}",
            out.attention_side,
            cfg.attention_side()
        );
        let mut margin = out.margin as f64;
        if let (Some(model), Some(z)) = (&self.zoom, &cfg.zoom) {
            let cells = top_cells(&out.attention, z.crops);
            let mut crops = Vec::with_capacity(cells.len() * model.patch_len());
            for &cell in &cells {
                let crop = view.zoom_crop(pre, out.attention_side, cell, z.crop_cells, z.crop_side);
                crops.extend_from_slice(&crop.data);
            }
            let margins = model.run(&crops, cells.len())?;
            let zoom = margins.iter().map(|&m| m as f64).sum::<f64>() / margins.len() as f64;
            margin = merged_margin(margin, zoom);
        }
        Ok(Referral {
            score: refer_score(margin),
            boxes: view.top_boxes(&out.attention, out.attention_side, cfg.boxes),
            attention: out.attention,
            attention_side: out.attention_side,
            view,
        })
    }
}

/// How the networks run: memory and speed, never the result (the bands overlap by the
/// receptive field, a batch is zero-padded). The device uses the default; `ma-bench
/// --emulate` tries others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Runtime {
    /// Stage 1 runs over this many horizontal bands of the image.
    pub stage1_bands: usize,
    /// Stage 2 runs on this many patches at a time.
    pub stage2_batch: usize,
}

impl Default for Runtime {
    fn default() -> Self {
        Self {
            stage1_bands: STAGE1_BANDS,
            stage2_batch: STAGE2_BATCH,
        }
    }
}

/// The loaded models and the settings they were trained with.
pub struct Cascade {
    pub manifest: Manifest,
    pub variant: Variant,
    /// Fingerprint of the key whose signature was checked; `None`: loaded with
    /// [`ModelTrust::Unsigned`], signature not checked.
    pub signed_by: Option<String>,
    stage1: Stage1Model,
    stage2: PatchModel,
    referral: Option<ReferralStep>,
    preprocess: PreprocessConfig,
    candidates: CandidateConfig,
    scoring: Scoring,
    geometry: PatchGeometry,
    runtime: Runtime,
}

impl Cascade {
    /// Load the models listed in `models_dir/manifest.toml`: the manifest's signature is
    /// checked as `trust` says, then each file's sha256 before it is parsed. `variant`
    /// defaults to the manifest's.
    pub fn load(models_dir: &Path, variant: Option<Variant>, trust: &ModelTrust) -> Result<Self> {
        Self::load_with(models_dir, variant, trust, Runtime::default())
    }

    /// [`Cascade::load`] with the networks run as `runtime` says.
    pub fn load_with(
        models_dir: &Path,
        variant: Option<Variant>,
        trust: &ModelTrust,
        runtime: Runtime,
    ) -> Result<Self> {
        let manifest = Manifest::load_trusted(models_dir, trust)?;
        let variant = variant.unwrap_or(manifest.default_variant);
        let geometry = PatchGeometry::new(manifest.patch_size).with_context(|| {
            format!(
                "patch_size in {}",
                models_dir.join(ma_core::manifest::FILE_NAME).display()
            )
        })?;
        let stage1 = Stage1Model::from_manifest(&manifest, variant)?;
        let stage2 =
            PatchModel::from_manifest(&manifest, Role::Stage2, variant, runtime.stage2_batch)?;
        ensure!(
            stage2.patch_size() == geometry.size,
            "the stage-2 model in {} takes {}-px patches, the manifest says {}",
            models_dir.display(),
            stage2.patch_size(),
            geometry.size
        );
        // The manifest checked that the model's input side is the section's.
        let referral = match &manifest.referral {
            Some(cfg) => Some(ReferralStep {
                model: ReferralModel::from_manifest(&manifest, variant)?,
                // One run scores every crop of a photo.
                zoom: match &cfg.zoom {
                    Some(z) => Some(PatchModel::from_manifest(
                        &manifest,
                        Role::Zoom,
                        variant,
                        z.crops,
                    )?),
                    None => None,
                },
                cfg: cfg.clone(),
            }),
            None => None,
        };
        let signed_by = match trust {
            ModelTrust::SignedBy { key } => Some(key.fingerprint()),
            ModelTrust::Unsigned => None,
        };
        Ok(Self {
            signed_by,
            preprocess: manifest.preprocess.clone(),
            candidates: manifest.stage1.clone(),
            scoring: manifest.scoring.clone(),
            manifest,
            variant,
            stage1,
            stage2,
            referral,
            geometry,
            runtime,
        })
    }

    /// The referral settings, when the model set has a referral network.
    pub fn referral_config(&self) -> Option<&ReferralConfig> {
        self.referral.as_ref().map(|r| &r.cfg)
    }

    /// Run the whole cascade on one decoded image.
    pub fn detect(&self, image: &RgbImage) -> Result<ImageResult> {
        let started = Instant::now();
        let pre = preprocess(image, FovSource::Estimate, &self.preprocess)?;
        let t_pre = started.elapsed().as_secs_f64() * 1e3;

        let map = self
            .stage1
            .run_in_bands(&pre.planes, self.runtime.stage1_bands)?;
        let found = find_candidates(&map, &pre.planes, &pre.fov, &self.candidates);
        let t_stage1 = started.elapsed().as_secs_f64() * 1e3 - t_pre;

        let patches = candidates::patches(&self.geometry, &pre.planes, &found);
        let margins = self.stage2.run(&patches, found.len())?;
        let photo = (image.width(), image.height());
        let detections = reported(to_detections(&found, &pre.scale, photo, |i, c| {
            self.scoring.score(c.stage1, margins[i])
        }));
        let t_stage2 = started.elapsed().as_secs_f64() * 1e3 - t_pre - t_stage1;

        let referral = match &self.referral {
            Some(step) => Some(step.run(&pre)?),
            None => None,
        };
        let total = started.elapsed().as_secs_f64() * 1e3;
        Ok(ImageResult {
            width: image.width(),
            height: image.height(),
            detections,
            candidates: found.len(),
            referral,
            timings: Timings {
                preprocess: t_pre,
                stage1: t_stage1,
                stage2: t_stage2,
                referral: total - t_pre - t_stage1 - t_stage2,
                total,
            },
        })
    }
}
