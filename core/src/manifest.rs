//! `models/manifest.toml`: which model files ship, their hashes, and everything the device
//! must do exactly as in training (preprocessing, patch geometry) or needs to interpret
//! the outputs (candidate parameters, operating points).
//!
//! Model bytes are only ever handed out after their SHA-256 matched the manifest
//! ([`Manifest::verify_file`]), so a truncated copy or a model swapped without a new
//! manifest is refused instead of silently producing different detections.
//!
//! ```toml
//! version = "2025.1"
//! default_variant = "float"
//! patch_size = 41
//!
//! [preprocess]
//! canonical_fov_diameter = 1410.0
//! ...
//!
//! [scoring]
//! stage1_weight = 0.75
//! temperature = 8.0
//!
//! [[models]]
//! role = "stage1"
//! variant = "float"
//! file = "stage1-float.onnx"
//! sha256 = "<64 hex digits>"
//! input = "image"
//! output = "margin"
//! receptive_field = 70
//! output_stride = 2
//! input_multiple = 4
//! ```

use std::fmt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::candidates::CandidateConfig;
use crate::digest::sha256_hex;
use crate::preprocess::PreprocessConfig;
use crate::referral::ReferralConfig;
use crate::scoring::Scoring;
use crate::signing::{ModelTrust, read_trusted_manifest};

/// File name of the manifest inside the models folder (the file the signature covers).
pub const FILE_NAME: &str = crate::signing::MANIFEST_FILE;

/// The whole manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Release of this model set (free text, shown in logs and records).
    pub version: String,
    /// Variant the device uses unless told otherwise.
    pub default_variant: Variant,
    /// Side of the square patches stage 2 was trained on.
    pub patch_size: usize,
    /// Preprocessing the models were trained with; the device must use the same.
    pub preprocess: PreprocessConfig,
    /// Stage-1 candidate extraction.
    pub stage1: CandidateConfig,
    /// How the two margins make a candidate's score.
    pub scoring: Scoring,
    /// Stage-2 score thresholds measured on cross-validation.
    pub operating_points: OperatingPoints,
    /// Where the models come from.
    pub training: Training,
    /// The image-level referral network's settings; absent in model sets without one
    /// (then `detect` reports no `refer_score`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referral: Option<ReferralConfig>,
    pub models: Vec<ModelEntry>,
    /// The training weights (safetensors) the ONNX files were exported from, for the
    /// workstation's independent reference cascade (`ma-trainer validate`). The device
    /// never loads them; their hashes are here so the signature covers them too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reference_weights: Vec<WeightsEntry>,
    /// Folder the manifest was loaded from; model files are relative to it. Not stored.
    #[serde(skip)]
    pub dir: PathBuf,
}

/// Which network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The cascade's candidate map.
    Stage1,
    /// The cascade's verdict per candidate.
    Stage2,
    /// The image-level referral network (score and attention map).
    Referral,
    /// The referral network's zoom-in crop classifier (C-Net of Zoom-in-Net).
    Zoom,
}

/// How the weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    Float,
    /// int8 weights dequantised at load (smaller file, float arithmetic).
    Int8,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Stage1 => "stage1",
            Role::Stage2 => "stage2",
            Role::Referral => "referral",
            Role::Zoom => "zoom",
        })
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Variant::Float => "float",
            Variant::Int8 => "int8",
        })
    }
}

impl std::str::FromStr for Variant {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "float" => Ok(Variant::Float),
            "int8" => Ok(Variant::Int8),
            _ => bail!("unknown model variant `{s}` (expected float or int8)"),
        }
    }
}

/// One model file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub role: Role,
    pub variant: Variant,
    /// Relative to the manifest's folder.
    pub file: String,
    /// SHA-256 of the file, lower-case hex.
    pub sha256: String,
    /// Graph input name (`image` for stage 1 and the referral network, `patches` for
    /// stage 2).
    pub input: String,
    /// Graph output name: the logit margin (MA minus non-MA; referable minus not), one
    /// channel.
    pub output: String,
    /// Referral only: side of the square input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_side: Option<usize>,
    /// Referral only: name of the second output, the attention map `[1, 1, s, s]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<String>,
    /// Stage 2 only: side of the input patches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_size: Option<usize>,
    /// Stage 1 only: side of the input window one map value depends on (how much
    /// overlap the device's bands need).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receptive_field: Option<usize>,
    /// Stage 1 only: pixels between neighbouring values of the map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_stride: Option<usize>,
    /// Stage 1 only: input height and width must be multiples of this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_multiple: Option<usize>,
    /// Stage 2: the batch dimension is symbolic and fixed by the device at load.
    #[serde(default)]
    pub dynamic_batch: bool,
}

/// One network's training weights (`[[reference_weights]]`): what its float ONNX file
/// was exported from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsEntry {
    pub role: Role,
    /// Relative to the manifest's folder.
    pub file: String,
    /// SHA-256 of the file, lower-case hex.
    pub sha256: String,
}

/// The input geometry of a model, as its manifest entry records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelGeometry {
    /// Stage 1, fully convolutional over the whole image.
    Map {
        receptive_field: usize,
        output_stride: usize,
        input_multiple: usize,
    },
    /// Stage 2, square patches of this side.
    Patch(usize),
    /// The referral network, a square input of this side.
    Image(usize),
    /// The zoom-in crop classifier, square crops of this side.
    Crop(usize),
}

/// Stage-2 score thresholds giving 1, 2 and 4 false positives per image on
/// cross-validation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatingPoints {
    pub fp_per_image_1: f64,
    pub fp_per_image_2: f64,
    pub fp_per_image_4: f64,
}

impl OperatingPoints {
    /// The score threshold of an operating point.
    pub fn threshold(&self, op: OperatingPoint) -> f64 {
        match op {
            OperatingPoint::Fp1 => self.fp_per_image_1,
            OperatingPoint::Fp2 => self.fp_per_image_2,
            OperatingPoint::Fp4 => self.fp_per_image_4,
        }
    }
}

/// An operating point on the FROC curve: the score threshold giving this many false positives
/// per image on the validation set (thresholds come from the model manifest).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OperatingPoint {
    #[serde(rename = "1fp")]
    Fp1,
    #[serde(rename = "2fp")]
    Fp2,
    #[serde(rename = "4fp")]
    Fp4,
}

impl OperatingPoint {
    /// The name used in configs and the manifest (`"1fp"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            OperatingPoint::Fp1 => "1fp",
            OperatingPoint::Fp2 => "2fp",
            OperatingPoint::Fp4 => "4fp",
        }
    }

    /// The operating point of `n` false positives per image (1, 2 or 4).
    pub fn from_fp_per_image(n: u32) -> Option<Self> {
        match n {
            1 => Some(OperatingPoint::Fp1),
            2 => Some(OperatingPoint::Fp2),
            4 => Some(OperatingPoint::Fp4),
            _ => None,
        }
    }

    /// False positives per image.
    pub fn fp_per_image(self) -> f64 {
        match self {
            OperatingPoint::Fp1 => 1.0,
            OperatingPoint::Fp2 => 2.0,
            OperatingPoint::Fp4 => 4.0,
        }
    }
}

impl std::fmt::Display for OperatingPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Provenance of the models.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Training {
    /// Datasets and splits, free text.
    pub data: String,
    /// Number of training images.
    pub images: usize,
    /// Licence of the models ("research use only": trained on research datasets).
    pub licence: String,
    /// Cross-validated competition performance metric (mean sensitivity at 1/8..8 FP/image).
    pub cv_cpm: f64,
}

/// Name of every graph's (first) output.
pub const OUTPUT_NAME: &str = "margin";
/// Name of the referral graph's attention output.
pub const ATTENTION_NAME: &str = "attention";

impl ModelEntry {
    /// An entry for the file `file` (relative to `dir`), hashing it now. The role follows
    /// from the geometry.
    pub fn for_file(
        dir: impl AsRef<Path>,
        file: &str,
        variant: Variant,
        geometry: ModelGeometry,
    ) -> Result<Self> {
        let path = dir.as_ref().join(file);
        let bytes = std::fs::read(&path)
            .with_context(|| format!("reading model file {}", path.display()))?;
        let mut entry = Self {
            role: Role::Stage1,
            variant,
            file: file.into(),
            sha256: sha256_hex(&bytes),
            input: "image".into(),
            output: OUTPUT_NAME.into(),
            input_side: None,
            attention: None,
            patch_size: None,
            receptive_field: None,
            output_stride: None,
            input_multiple: None,
            dynamic_batch: false,
        };
        match geometry {
            ModelGeometry::Map {
                receptive_field,
                output_stride,
                input_multiple,
            } => {
                entry.receptive_field = Some(receptive_field);
                entry.output_stride = Some(output_stride);
                entry.input_multiple = Some(input_multiple);
            }
            ModelGeometry::Patch(side) => {
                entry.role = Role::Stage2;
                entry.input = "patches".into();
                entry.patch_size = Some(side);
                entry.dynamic_batch = true;
            }
            ModelGeometry::Image(side) => {
                entry.role = Role::Referral;
                entry.input_side = Some(side);
                entry.attention = Some(ATTENTION_NAME.into());
            }
            ModelGeometry::Crop(side) => {
                entry.role = Role::Zoom;
                entry.input = "crops".into();
                entry.patch_size = Some(side);
                entry.dynamic_batch = true;
            }
        }
        Ok(entry)
    }

    /// The geometry the entry records (checked by [`Manifest::load`]).
    pub fn geometry(&self) -> Result<ModelGeometry> {
        let what = || format!("{} {} model {}", self.role, self.variant, self.file);
        if self.role != Role::Referral {
            ensure!(
                self.input_side.is_none() && self.attention.is_none(),
                "{}: input_side and attention only apply to the referral model",
                what()
            );
        }
        match self.role {
            Role::Stage1 => {
                let field = |v: Option<usize>, name: &str| {
                    v.filter(|&v| v > 0)
                        .with_context(|| format!("{}: needs a positive {name}", what()))
                };
                ensure!(
                    self.patch_size.is_none(),
                    "{}: patch_size only applies to stage2 and zoom",
                    what()
                );
                Ok(ModelGeometry::Map {
                    receptive_field: field(self.receptive_field, "receptive_field")?,
                    output_stride: field(self.output_stride, "output_stride")?,
                    input_multiple: field(self.input_multiple, "input_multiple")?,
                })
            }
            Role::Stage2 | Role::Zoom => {
                ensure!(
                    self.receptive_field.is_none()
                        && self.output_stride.is_none()
                        && self.input_multiple.is_none(),
                    "{}: receptive_field, output_stride and input_multiple only apply to stage1",
                    what()
                );
                let side = self
                    .patch_size
                    .filter(|&s| s > 0)
                    .with_context(|| format!("{}: needs a positive patch_size", what()))?;
                Ok(if self.role == Role::Zoom {
                    ModelGeometry::Crop(side)
                } else {
                    ModelGeometry::Patch(side)
                })
            }
            Role::Referral => {
                ensure!(
                    self.patch_size.is_none()
                        && self.receptive_field.is_none()
                        && self.output_stride.is_none()
                        && self.input_multiple.is_none()
                        && !self.dynamic_batch,
                    "{}: only input_side and attention apply to the referral model",
                    what()
                );
                ensure!(
                    self.attention.as_deref() == Some(ATTENTION_NAME),
                    "{}: attention must be `{ATTENTION_NAME}`",
                    what()
                );
                let side = self
                    .input_side
                    .filter(|&s| s > 0)
                    .with_context(|| format!("{}: needs a positive input_side", what()))?;
                Ok(ModelGeometry::Image(side))
            }
        }
    }
}

impl Manifest {
    /// Read and check `dir/manifest.toml` without checking its signature (workstation
    /// tools; the device loads through [`Manifest::load_trusted`]).
    pub fn load(dir: impl AsRef<Path>) -> Result<Manifest> {
        Self::load_trusted(dir, &ModelTrust::Unsigned)
    }

    /// Read `dir/manifest.toml`, accepted only if `trust` accepts its signature
    /// ([`crate::signing`]), and check it.
    pub fn load_trusted(dir: impl AsRef<Path>, trust: &ModelTrust) -> Result<Manifest> {
        let dir = dir.as_ref();
        let path = dir.join(FILE_NAME);
        let bytes = read_trusted_manifest(dir, trust)?;
        let text = String::from_utf8(bytes)
            .with_context(|| format!("model manifest {} is not UTF-8", path.display()))?;
        let mut m: Manifest = toml::from_str(&text)
            .with_context(|| format!("parsing model manifest {}", path.display()))?;
        m.dir = dir.to_path_buf();
        m.validate()
            .with_context(|| format!("model manifest {}", path.display()))?;
        Ok(m)
    }

    /// Write `dir/manifest.toml` (after the same checks as [`Manifest::load`]).
    pub fn write(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.validate()?;
        let path = dir.as_ref().join(FILE_NAME);
        let text = toml::to_string_pretty(self).context("serialising the model manifest")?;
        std::fs::write(&path, text)
            .with_context(|| format!("writing model manifest {}", path.display()))
    }

    /// The entry for `role` and `variant`.
    pub fn entry(&self, role: Role, variant: Variant) -> Result<&ModelEntry> {
        self.models
            .iter()
            .find(|e| e.role == role && e.variant == variant)
            .with_context(|| format!("model manifest has no {role} model of variant {variant}"))
    }

    /// Full path of an entry's file.
    pub fn path_of(&self, entry: &ModelEntry) -> PathBuf {
        self.dir.join(&entry.file)
    }

    /// The bytes of `entry`'s file, refused unless their SHA-256 is the manifest's.
    pub fn verify_file(&self, entry: &ModelEntry) -> Result<Vec<u8>> {
        self.verified_bytes(&entry.file, &entry.sha256, "model file")
    }

    /// The path of the training weights of `role` (`[[reference_weights]]`), once their
    /// SHA-256 is checked to be the manifest's.
    pub fn reference_weights(&self, role: Role) -> Result<PathBuf> {
        let entry = self
            .reference_weights
            .iter()
            .find(|e| e.role == role)
            .with_context(|| {
                format!(
                    "model manifest {} lists no reference weights for {role} (model sets \
                     before 0.6.1 do not ship them; see models/MODEL_CARD.md)",
                    self.dir.join(FILE_NAME).display()
                )
            })?;
        self.verified_bytes(&entry.file, &entry.sha256, "reference weights")?;
        Ok(self.dir.join(&entry.file))
    }

    fn verified_bytes(&self, file: &str, sha256: &str, what: &str) -> Result<Vec<u8>> {
        let path = self.dir.join(file);
        let bytes =
            std::fs::read(&path).with_context(|| format!("reading {what} {}", path.display()))?;
        let actual = sha256_hex(&bytes);
        if !actual.eq_ignore_ascii_case(sha256) {
            bail!(
                "{what} {} is corrupt or was replaced: its SHA-256 is {actual}, the manifest \
                 says {sha256}",
                path.display(),
            );
        }
        Ok(bytes)
    }

    /// Verified bytes of the model for `role` and `variant`.
    pub fn model_bytes(&self, role: Role, variant: Variant) -> Result<Vec<u8>> {
        self.verify_file(self.entry(role, variant)?)
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            self.patch_size % 2 == 1,
            "patch_size must be odd, got {}",
            self.patch_size
        );
        ensure!(
            self.scoring.temperature > 0.0 && self.scoring.temperature.is_finite(),
            "scoring.temperature must be positive, got {}",
            self.scoring.temperature
        );
        ensure!(
            self.scoring.stage1_weight >= 0.0 && self.scoring.stage1_weight.is_finite(),
            "scoring.stage1_weight must be zero or positive, got {}",
            self.scoring.stage1_weight
        );
        for (i, e) in self.models.iter().enumerate() {
            let what = format!("models[{i}] ({} {}, {})", e.role, e.variant, e.file);
            check_file_entry(&what, &e.file, &e.sha256)?;
            match e.geometry()? {
                ModelGeometry::Patch(side) => ensure!(
                    side == self.patch_size,
                    "{what}: patch_size {side} differs from the manifest's {}",
                    self.patch_size
                ),
                ModelGeometry::Image(side) => {
                    let cfg = self.referral.as_ref().with_context(|| {
                        format!("{what}: a referral model needs a [referral] section")
                    })?;
                    ensure!(
                        side == cfg.input_side,
                        "{what}: input_side {side} differs from referral.input_side {}",
                        cfg.input_side
                    );
                }
                ModelGeometry::Crop(side) => {
                    let zoom = self
                        .referral
                        .as_ref()
                        .and_then(|r| r.zoom.as_ref())
                        .with_context(|| {
                            format!("{what}: a zoom model needs a [referral.zoom] section")
                        })?;
                    ensure!(
                        side == zoom.crop_side,
                        "{what}: patch_size {side} differs from referral.zoom.crop_side {}",
                        zoom.crop_side
                    );
                }
                ModelGeometry::Map { .. } => {}
            }
            ensure!(
                e.output == OUTPUT_NAME,
                "{what}: output must be `{OUTPUT_NAME}` (the logit margin), got `{}`",
                e.output
            );
            if self.models[..i]
                .iter()
                .any(|o| o.role == e.role && o.variant == e.variant)
            {
                bail!("{what}: a second {} {} model", e.role, e.variant);
            }
        }
        for (i, e) in self.reference_weights.iter().enumerate() {
            let what = format!("reference_weights[{i}] ({}, {})", e.role, e.file);
            check_file_entry(&what, &e.file, &e.sha256)?;
            ensure!(
                self.models.iter().any(|m| m.role == e.role),
                "{what}: no {} model in the set",
                e.role
            );
            if self.reference_weights[..i].iter().any(|o| o.role == e.role) {
                bail!("{what}: second reference weights for {}", e.role);
            }
        }
        // A missing role is reported when its model is loaded; a role without the
        // default variant is a manifest error.
        if let Some(cfg) = &self.referral {
            cfg.validate()?;
            ensure!(
                self.models.iter().any(|e| e.role == Role::Referral),
                "a [referral] section without a referral model"
            );
            ensure!(
                cfg.zoom.is_none() || self.models.iter().any(|e| e.role == Role::Zoom),
                "a [referral.zoom] section without a zoom model"
            );
        }
        for role in [Role::Stage1, Role::Stage2, Role::Referral, Role::Zoom] {
            if self.models.iter().any(|e| e.role == role) {
                self.entry(role, self.default_variant)
                    .context("default_variant must exist for every stage listed")?;
            }
        }
        Ok(())
    }
}

/// A listed file (`what` names the entry in errors) is a relative path inside the models
/// folder with a 64-hex-digit SHA-256.
fn check_file_entry(what: &str, file: &str, sha256: &str) -> Result<()> {
    ensure!(
        !file.is_empty()
            && Path::new(file)
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir)),
        "{what}: file must be a relative path inside the models folder"
    );
    ensure!(
        sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()),
        "{what}: sha256 must be 64 hex digits, got `{sha256}`"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_operating_point_reads_its_own_threshold() {
        let points = OperatingPoints {
            fp_per_image_1: 0.9,
            fp_per_image_2: 0.8,
            fp_per_image_4: 0.7,
        };
        for (n, expected) in [(1, 0.9), (2, 0.8), (4, 0.7)] {
            let op = OperatingPoint::from_fp_per_image(n).unwrap();
            assert_eq!(op.fp_per_image(), n as f64);
            assert_eq!(points.threshold(op), expected);
            assert_eq!(op.as_str(), format!("{n}fp"));
        }
        assert_eq!(OperatingPoint::from_fp_per_image(3), None);
    }

    fn sample(dir: &Path) -> Manifest {
        let mut models = vec![];
        let map = ModelGeometry::Map {
            receptive_field: 70,
            output_stride: 2,
            input_multiple: 4,
        };
        for (role, variant, content) in [
            (Role::Stage1, Variant::Float, b"stage one float".as_slice()),
            (Role::Stage1, Variant::Int8, b"stage one int8"),
            (Role::Stage2, Variant::Float, b"stage two float"),
            (Role::Stage2, Variant::Int8, b"stage two int8"),
        ] {
            let file = format!("{role}-{variant}.onnx");
            std::fs::write(dir.join(&file), content).unwrap();
            let geometry = match role {
                Role::Stage1 => map,
                Role::Stage2 => ModelGeometry::Patch(41),
                Role::Referral | Role::Zoom => unreachable!("added by the referral tests"),
            };
            models.push(ModelEntry::for_file(dir, &file, variant, geometry).unwrap());
        }
        Manifest {
            version: "test-1".into(),
            default_variant: Variant::Float,
            patch_size: 41,
            preprocess: PreprocessConfig::default(),
            stage1: CandidateConfig {
                min_margin: -3.0,
                max_candidates: 400,
                nms_radius: 2,
                search_radius: 6,
                merge_distance: 4.0,
            },
            scoring: Scoring {
                stage1_weight: 0.5,
                temperature: 4.0,
            },
            operating_points: OperatingPoints {
                fp_per_image_1: 0.91,
                fp_per_image_2: 0.82,
                fp_per_image_4: 0.7,
            },
            training: Training {
                data: "DiaretDB1 train split".into(),
                images: 28,
                licence: "research use only".into(),
                cv_cpm: 0.41,
            },
            referral: None,
            models,
            reference_weights: Vec::new(),
            dir: dir.to_path_buf(),
        }
    }

    #[test]
    fn round_trip_and_verified_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let m = sample(tmp.path());
        m.write(tmp.path()).unwrap();
        let back = Manifest::load(tmp.path()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.preprocess, PreprocessConfig::default());
        assert_eq!(
            back.model_bytes(Role::Stage2, Variant::Int8).unwrap(),
            b"stage two int8"
        );
        let text = std::fs::read_to_string(tmp.path().join(FILE_NAME)).unwrap();
        assert!(text.contains("output_stride = 2"), "{text}");
    }

    fn with_referral(dir: &Path, m: &mut Manifest) {
        use crate::referral::{ReferRule, ReferralConfig};
        for variant in [Variant::Float, Variant::Int8] {
            let file = format!("referral-{variant}.onnx");
            std::fs::write(dir.join(&file), b"referral").unwrap();
            m.models.push(
                ModelEntry::for_file(dir, &file, variant, ModelGeometry::Image(320)).unwrap(),
            );
        }
        m.referral = Some(ReferralConfig {
            input_side: 320,
            attention_stride: 16,
            boxes: 4,
            rule: ReferRule {
                score_threshold: 0.4,
                ma_count: Some(2),
                operating_point: Some(OperatingPoint::Fp2),
            },
            training_data: "graded photos".into(),
            cv_auc: 0.8,
            zoom: None,
        });
    }

    /// Adds a zoom-in crop classifier (96-px crops) to a set with a referral network.
    fn with_zoom(dir: &Path, m: &mut Manifest) {
        for variant in [Variant::Float, Variant::Int8] {
            let file = format!("zoom-{variant}.onnx");
            std::fs::write(dir.join(&file), b"zoom").unwrap();
            m.models
                .push(ModelEntry::for_file(dir, &file, variant, ModelGeometry::Crop(96)).unwrap());
        }
        m.referral.as_mut().unwrap().zoom = Some(crate::referral::ZoomConfig {
            crops: 4,
            crop_cells: 1.5,
            crop_side: 96,
        });
    }

    fn zoom(m: &mut Manifest) -> &mut crate::referral::ZoomConfig {
        m.referral.as_mut().unwrap().zoom.as_mut().unwrap()
    }

    #[test]
    fn zoom_section_and_models_round_trip_and_must_agree() {
        let tmp = tempfile::tempdir().unwrap();
        let mut m = sample(tmp.path());
        with_referral(tmp.path(), &mut m);
        with_zoom(tmp.path(), &mut m);
        m.write(tmp.path()).unwrap();
        let back = Manifest::load(tmp.path()).unwrap();
        assert_eq!(back, m);
        let e = back.entry(Role::Zoom, Variant::Int8).unwrap();
        assert_eq!(e.geometry().unwrap(), ModelGeometry::Crop(96));
        assert_eq!((e.input.as_str(), e.dynamic_batch), ("crops", true));
        let text = std::fs::read_to_string(tmp.path().join(FILE_NAME)).unwrap();
        assert!(text.contains("[referral.zoom]"), "{text}");

        // `m` changed by `change`, written: the error.
        let refused = |change: &dyn Fn(&mut Manifest)| {
            let mut bad = m.clone();
            change(&mut bad);
            format!("{:#}", bad.write(tmp.path()).unwrap_err())
        };
        let e = refused(&|m| m.referral.as_mut().unwrap().zoom = None);
        assert!(e.contains("needs a [referral.zoom] section"), "{e}");
        let e = refused(&|m| zoom(m).crop_side = 64);
        assert!(e.contains("patch_size 96 differs"), "{e}");
        let e = refused(&|m| m.models.retain(|e| e.role != Role::Zoom));
        assert!(e.contains("without a zoom model"), "{e}");
        let e = refused(&|m| zoom(m).crops = 401);
        assert!(e.contains("referral.zoom.crops"), "{e}");
    }

    #[test]
    fn referral_section_and_models_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let mut m = sample(tmp.path());
        with_referral(tmp.path(), &mut m);
        m.write(tmp.path()).unwrap();
        let back = Manifest::load(tmp.path()).unwrap();
        assert_eq!(back, m);
        let e = back.entry(Role::Referral, Variant::Int8).unwrap();
        assert_eq!(e.geometry().unwrap(), ModelGeometry::Image(320));
        assert_eq!(e.attention.as_deref(), Some(ATTENTION_NAME));
        let text = std::fs::read_to_string(tmp.path().join(FILE_NAME)).unwrap();
        assert!(text.contains("[referral.rule]"), "{text}");
        assert!(text.contains("operating_point = \"2fp\""), "{text}");
    }

    #[test]
    fn referral_models_and_section_must_agree() {
        let tmp = tempfile::tempdir().unwrap();
        let mut m = sample(tmp.path());
        with_referral(tmp.path(), &mut m);
        let mut no_section = m.clone();
        no_section.referral = None;
        let e = format!("{:#}", no_section.write(tmp.path()).unwrap_err());
        assert!(e.contains("needs a [referral] section"), "{e}");
        let mut other_side = m.clone();
        other_side.referral.as_mut().unwrap().input_side = 256;
        let e = format!("{:#}", other_side.write(tmp.path()).unwrap_err());
        assert!(e.contains("input_side 320 differs"), "{e}");
        let mut no_models = m;
        no_models.models.retain(|e| e.role != Role::Referral);
        let e = format!("{:#}", no_models.write(tmp.path()).unwrap_err());
        assert!(e.contains("without a referral model"), "{e}");
    }

    #[test]
    fn flipped_byte_is_refused_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let m = sample(tmp.path());
        m.write(tmp.path()).unwrap();
        let path = tmp.path().join("stage1-float.onnx");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[3] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
        let m = Manifest::load(tmp.path()).unwrap();
        let entry = m.entry(Role::Stage1, Variant::Float).unwrap();
        let err = format!("{:#}", m.verify_file(entry).unwrap_err());
        assert!(err.contains("stage1-float.onnx"), "{err}");
        assert!(err.contains(&entry.sha256), "{err}");
        assert!(
            err.contains(&sha256_hex(&std::fs::read(&path).unwrap())),
            "{err}"
        );
        // The other files are still fine.
        m.model_bytes(Role::Stage1, Variant::Int8).unwrap();
    }

    #[test]
    fn unknown_key_is_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        sample(tmp.path()).write(tmp.path()).unwrap();
        let path = tmp.path().join(FILE_NAME);
        let text = std::fs::read_to_string(&path).unwrap();
        for (from, to) in [
            ("[stage1]\n", "[stage1]\nhalo = 3.0\n"),
            ("version = ", "colour = \"red\"\nversion = "),
            ("role = \"stage2\"", "role = \"stage2\"\nthreads = 4"),
        ] {
            assert!(text.contains(from), "{text}");
            std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
            let err = format!("{:#}", Manifest::load(tmp.path()).unwrap_err());
            assert!(err.contains("unknown field"), "{err}");
        }
    }

    #[test]
    fn inconsistent_entries_are_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let mut m = sample(tmp.path());
        m.models[0].file = "../elsewhere.onnx".into();
        assert!(m.write(tmp.path()).is_err());
        let mut m = sample(tmp.path());
        m.models
            .retain(|e| e.variant == Variant::Int8 || e.role == Role::Stage1);
        let err = format!("{:#}", m.write(tmp.path()).unwrap_err());
        assert!(err.contains("default_variant"), "{err}");
    }

    #[test]
    fn geometry_must_fit_the_role() {
        let tmp = tempfile::tempdir().unwrap();
        let expect_err = |m: &Manifest, needle: &str| {
            let err = format!("{:#}", m.write(tmp.path()).unwrap_err());
            assert!(err.contains(needle), "{err}");
        };
        let mut m = sample(tmp.path());
        m.models[0].input_multiple = None;
        expect_err(&m, "input_multiple");
        let mut m = sample(tmp.path());
        m.models[2].receptive_field = Some(70);
        expect_err(&m, "only apply to stage1");
        let mut m = sample(tmp.path());
        m.models[3].patch_size = Some(43);
        expect_err(&m, "differs from the manifest's 41");
        let mut m = sample(tmp.path());
        m.models[1].output = "prob".into();
        expect_err(&m, "logit margin");
        let mut m = sample(tmp.path());
        m.scoring.temperature = 0.0;
        expect_err(&m, "temperature");
    }
}
