//! The CNN cascade on the device: preprocess -> stage-1 map -> candidates -> stage-2
//! verdicts -> detections in original image coordinates.

pub mod candidates;
pub mod onnx;

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use image::RgbImage;

use crate::detection::Detection;
use crate::geometry::PatchGeometry;
use crate::manifest::{Manifest, Variant};
use crate::preprocess::{FovSource, PreprocessConfig, preprocess};
use crate::signing::ModelTrust;
use candidates::{CandidateConfig, find_candidates};
use onnx::{STAGE2_BATCH, Stage1Model, Stage2Model};

/// Candidates scoring below this after stage 2 are not reported (the `detect` contract
/// asks for every candidate with score >= 0.01).
pub const MIN_REPORTED_SCORE: f64 = 0.01;

/// How a candidate's reported score is made from the two nets' logit margins (the
/// `[scoring]` table of the model manifest):
/// `score = sigmoid((stage2 + stage1_weight * stage1) / temperature)`.
///
/// Stage 1 sees 70 px of context around every pixel, stage 2 a 41x41 patch centred on
/// the candidate; their errors differ, and on cross-validation the weighted sum ranked
/// MAs better than either margin alone. The default weight 0.75 is the largest on the
/// plateau of `ma-trainer score-sweep` over the 4-fold CV (mean CPM 0.350; 0.356 at 0.5,
/// 0.339 at 1.0, 0.322 for stage 2 alone): away from DiaretDB1, stage 1 generalises
/// better than stage 2, and lower weights lost MAs there (`models/MODEL_CARD.md`,
/// "Choosing the stage-1 weight"). The temperature only keeps large margins from
/// rounding to exactly 1.0 (where they would tie); it does not change the order.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scoring {
    pub stage1_weight: f64,
    pub temperature: f64,
}

impl Default for Scoring {
    fn default() -> Self {
        Self {
            stage1_weight: 0.75,
            temperature: 8.0,
        }
    }
}

impl Scoring {
    /// The reported score of a candidate with these margins, in (0, 1).
    pub fn score(&self, stage1: f32, stage2: f32) -> f64 {
        let z = (stage2 as f64 + self.stage1_weight * stage1 as f64) / self.temperature;
        1.0 / (1.0 + (-z).exp())
    }
}

/// The detections `detect` reports: those scoring at least [`MIN_REPORTED_SCORE`], best
/// first (ties in their original order).
pub fn reported(mut detections: Vec<Detection>) -> Vec<Detection> {
    detections.retain(|d| d.score >= MIN_REPORTED_SCORE);
    detections.sort_by(|a, b| b.score.total_cmp(&a.score));
    detections
}

/// Where the time of one image went, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    pub preprocess: f64,
    pub stage1: f64,
    pub stage2: f64,
    pub total: f64,
}

/// What the cascade says about one image.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageResult {
    pub width: u32,
    pub height: u32,
    /// Every candidate with score >= [`MIN_REPORTED_SCORE`], best first, in original
    /// image coordinates.
    pub detections: Vec<Detection>,
    /// Candidates stage 1 handed to stage 2.
    pub candidates: usize,
    pub timings: Timings,
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

/// The loaded models and the settings they were trained with.
pub struct Cascade {
    pub manifest: Manifest,
    pub variant: Variant,
    /// Fingerprint of the key whose signature was checked; `None`: loaded with
    /// [`ModelTrust::Unsigned`], signature not checked.
    pub signed_by: Option<String>,
    stage1: Stage1Model,
    stage2: Stage2Model,
    preprocess: PreprocessConfig,
    candidates: CandidateConfig,
    scoring: Scoring,
    geometry: PatchGeometry,
}

impl Cascade {
    /// Load the models listed in `models_dir/manifest.toml`: the manifest's signature is
    /// checked as `trust` says, then each file's sha256 before it is parsed. `variant`
    /// defaults to the manifest's.
    pub fn load(models_dir: &Path, variant: Option<Variant>, trust: &ModelTrust) -> Result<Self> {
        let manifest = Manifest::load_trusted(models_dir, trust)?;
        let variant = variant.unwrap_or(manifest.default_variant);
        let geometry = PatchGeometry::new(manifest.patch_size).with_context(|| {
            format!(
                "patch_size in {}",
                models_dir.join(crate::manifest::FILE_NAME).display()
            )
        })?;
        let stage1 = Stage1Model::from_manifest(&manifest, variant)?;
        let stage2 = Stage2Model::from_manifest(&manifest, variant, STAGE2_BATCH)?;
        ensure!(
            stage2.patch_size() == geometry.size,
            "the stage-2 model in {} takes {}-px patches, the manifest says {}",
            models_dir.display(),
            stage2.patch_size(),
            geometry.size
        );
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
            geometry,
        })
    }

    /// Run the whole cascade on one decoded image.
    pub fn detect(&self, image: &RgbImage) -> Result<ImageResult> {
        let started = Instant::now();
        let pre = preprocess(image, FovSource::Estimate, &self.preprocess)?;
        let t_pre = started.elapsed().as_secs_f64() * 1e3;

        let map = self.stage1.run_on_image(&pre.planes)?;
        let found = find_candidates(&map, &pre.planes, &pre.fov, &self.candidates);
        let t_stage1 = started.elapsed().as_secs_f64() * 1e3 - t_pre;

        let len = self.geometry.len();
        let mut patches = vec![0.0f32; found.len() * len];
        for (c, patch) in found.iter().zip(patches.chunks_exact_mut(len)) {
            self.geometry
                .extract(&pre.planes, c.x as i64, c.y as i64, patch);
        }
        let margins = self.stage2.run(&patches, found.len())?;
        // Candidates from the canonical image's padding map outside the photo: they are
        // no lesion of it, and coordinates must stay on the photo (its pixels' area, the
        // centre of pixel 0 being 0).
        let (w, h) = (f64::from(image.width()), f64::from(image.height()));
        let on_photo =
            |d: &Detection| (-0.5..=w - 0.5).contains(&d.x) && (-0.5..=h - 0.5).contains(&d.y);
        let detections = reported(
            found
                .iter()
                .zip(&margins)
                .map(|(c, &m2)| {
                    let (x, y) = pre.scale.to_original(c.x as f64, c.y as f64);
                    Detection {
                        x,
                        y,
                        score: self.scoring.score(c.stage1, m2),
                    }
                })
                .filter(on_photo)
                .collect(),
        );
        let total = started.elapsed().as_secs_f64() * 1e3;
        Ok(ImageResult {
            width: image.width(),
            height: image.height(),
            detections,
            candidates: found.len(),
            timings: Timings {
                preprocess: t_pre,
                stage1: t_stage1,
                stage2: total - t_pre - t_stage1,
                total,
            },
        })
    }
}
