//! The workstation's reference cascade: the device's whole pipeline (preprocess -> stage 1
//! -> candidates -> stage 2 -> scoring -> referral with its zoom-in step -> refer rule),
//! with the networks run by libtorch, float, from the model set's reference weights (the
//! training weights its ONNX files were exported from, `[[reference_weights]]`). Everything
//! but the networks is `ma-core`'s, as on the device; the networks are an independent
//! implementation of the same arithmetic, so agreement with the device (tract, float or
//! int8) checks the device's runtime and files, not only its inputs.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use image::RgbImage;
use tch::{Device, Kind, Tensor};

use ma_core::candidates::{self, find_candidates};
use ma_core::detection::Detection;
use ma_core::geometry::CHANNELS;
use ma_core::geometry::PatchGeometry;
use ma_core::manifest::{Manifest, OperatingPoint, Role};
use ma_core::preprocess::{FovSource, preprocess};
use ma_core::referral::{ReferralView, merged_margin, refer_score};
use ma_core::scoring::{reported, to_detections};
use ma_core::signing::ModelTrust;

use crate::nets::{Net, Stage};
use crate::pipeline::stage1_map;
use crate::referral::{self, ReferralNet};
use crate::zoom::{self, ZoomNet};

/// The reference cascade of one model set.
pub struct ReferenceCascade {
    pub manifest: Manifest,
    stage1: Net,
    stage2: Net,
    referral: Option<(ReferralNet, Option<ZoomNet>)>,
    geometry: PatchGeometry,
    // The var stores own the weights the nets use.
    _stores: Vec<tch::nn::VarStore>,
}

/// What the reference says about one photo.
#[derive(Clone, Debug, PartialEq)]
pub struct ReferenceResult {
    /// As `detect` reports them: score >= 0.01, best first, original coordinates.
    pub detections: Vec<Detection>,
    /// The referral score (model sets with a referral network).
    pub refer_score: Option<f64>,
}

impl ReferenceCascade {
    /// Loads `models_dir`'s manifest (signature checked as `trust` says) and its reference
    /// weights (SHA-256 checked against the manifest).
    pub fn load(models_dir: &Path, trust: &ModelTrust) -> Result<Self> {
        let manifest = Manifest::load_trusted(models_dir, trust)?;
        let geometry = PatchGeometry::new(manifest.patch_size)
            .with_context(|| format!("patch_size of {}", models_dir.display()))?;
        let mut stores = Vec::new();
        let (vs1, stage1) = crate::train::load_net(
            &manifest.reference_weights(Role::Stage1)?,
            Stage::Candidates,
        )?;
        let (vs2, stage2) =
            crate::train::load_net(&manifest.reference_weights(Role::Stage2)?, Stage::Verdict)?;
        stores.extend([vs1, vs2]);
        let referral = match &manifest.referral {
            Some(cfg) => {
                let (vs, net) = referral::load(&manifest.reference_weights(Role::Referral)?)?;
                stores.push(vs);
                let zoom = match &cfg.zoom {
                    Some(_) => {
                        let (vs, z) = zoom::load(&manifest.reference_weights(Role::Zoom)?)?;
                        stores.push(vs);
                        Some(z)
                    }
                    None => None,
                };
                Some((net, zoom))
            }
            None => None,
        };
        Ok(Self {
            manifest,
            stage1,
            stage2,
            referral,
            geometry,
            _stores: stores,
        })
    }

    /// The whole cascade on one decoded photo.
    pub fn run(&self, image: &RgbImage) -> Result<ReferenceResult> {
        let m = &self.manifest;
        let pre = preprocess(image, FovSource::Estimate, &m.preprocess)?;
        let map = stage1_map(&self.stage1, &pre.planes);
        let found = find_candidates(&map, &pre.planes, &pre.fov, &m.stage1);
        let patches = candidates::patches(&self.geometry, &pre.planes, &found);
        let margins =
            self.patch_margins(&self.stage2, &patches, found.len(), self.geometry.size)?;
        let photo = (image.width(), image.height());
        let detections = reported(to_detections(&found, &pre.scale, photo, |i, c| {
            m.scoring.score(c.stage1, margins[i])
        }));
        let refer_score = match (&self.referral, &m.referral) {
            (Some((net, zoom_net)), Some(cfg)) => {
                let view = ReferralView::of(&pre, cfg.input_side)?;
                let (margin, attention) =
                    referral::predict(net, &referral::input_tensor(&view).unsqueeze(0), &[0])?
                        .pop()
                        .context("no referral output")?;
                let margin = match (zoom_net, &cfg.zoom) {
                    (Some(z), Some(zc)) => merged_margin(
                        margin,
                        zoom::photo_margin(z, &pre, &view, &attention, cfg.attention_side(), zc)?,
                    ),
                    _ => margin,
                };
                Some(refer_score(margin))
            }
            _ => None,
        };
        Ok(ReferenceResult {
            detections,
            refer_score,
        })
    }

    /// Stage-2 margins of `n` flat patches of side `side`.
    fn patch_margins(&self, net: &Net, flat: &[f32], n: usize, side: usize) -> Result<Vec<f32>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        ensure!(
            flat.len() == n * CHANNELS * side * side,
            "patch buffer size"
        );
        let _guard = tch::no_grad_guard();
        let s = side as i64;
        let xs = Tensor::from_slice(flat)
            .view([n as i64, CHANNELS as i64, s, s])
            .to_device(Device::cuda_if_available());
        let m = net
            .margin(&xs, false)
            .to_device(Device::Cpu)
            .to_kind(Kind::Float);
        Vec::<f32>::try_from(&m).context("reading stage-2 margins")
    }

    /// Score at or above which a detection is an MA at `op`.
    pub fn threshold(&self, op: OperatingPoint) -> f64 {
        self.manifest.operating_points.threshold(op)
    }

    /// The refer decision of the model set's rule (as the device's), or without a
    /// referral network at least one MA at `op`.
    pub fn refers(&self, result: &ReferenceResult, op: OperatingPoint) -> bool {
        let count = |op: OperatingPoint| {
            let t = self.threshold(op);
            result.detections.iter().filter(|d| d.score >= t).count()
        };
        match (&self.manifest.referral, result.refer_score) {
            (Some(cfg), Some(score)) => cfg.rule.refers(score, count),
            _ => count(op) > 0,
        }
    }
}
