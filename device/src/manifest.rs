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
//! patch_size = 101
//!
//! [preprocess]
//! canonical_fov_diameter = 1410.0
//! ...
//!
//! [[models]]
//! role = "stage1"
//! variant = "float"
//! file = "stage1-float.onnx"
//! sha256 = "<64 hex digits>"
//! input = "image"
//! output = "prob"
//! patch_size = 101
//! output_stride = 8
//! ```

use std::fmt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cascade::candidates::CandidateConfig;
use crate::preprocess::PreprocessConfig;
use crate::signing::{ModelTrust, read_trusted_manifest};

/// File name of the manifest inside the models folder.
pub const FILE_NAME: &str = "manifest.toml";

/// The whole manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Release of this model set (free text, shown in logs and records).
    pub version: String,
    /// Variant the device uses unless told otherwise.
    pub default_variant: Variant,
    /// Side of the square patches both nets were trained on.
    pub patch_size: usize,
    /// Preprocessing the models were trained with; the device must use the same.
    pub preprocess: PreprocessConfig,
    /// Stage-1 candidate extraction.
    pub stage1: CandidateConfig,
    /// Stage-2 score thresholds measured on cross-validation.
    pub operating_points: OperatingPoints,
    /// Where the models come from.
    pub training: Training,
    pub models: Vec<ModelEntry>,
    /// Folder the manifest was loaded from; model files are relative to it. Not stored.
    #[serde(skip)]
    pub dir: PathBuf,
}

/// Which network of the cascade.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Stage1,
    Stage2,
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
    /// Graph input name (`image` for stage 1, `patches` for stage 2).
    pub input: String,
    /// Graph output name: softmax over axis 1, channel 1 = MA probability.
    pub output: String,
    /// Stage 2: side of the input patches. Stage 1: its receptive field (one output
    /// value classifies one patch of this size).
    pub patch_size: usize,
    /// Stage 1 only: pixels between neighbouring values of the probability map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_stride: Option<usize>,
    /// Stage 2: the batch dimension is symbolic and fixed by the device at load.
    #[serde(default)]
    pub dynamic_batch: bool,
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

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl ModelEntry {
    /// An entry for the file `file` (relative to `dir`), hashing it now.
    pub fn for_file(
        dir: impl AsRef<Path>,
        file: &str,
        role: Role,
        variant: Variant,
        patch_size: usize,
        output_stride: usize,
    ) -> Result<Self> {
        let path = dir.as_ref().join(file);
        let bytes = std::fs::read(&path)
            .with_context(|| format!("reading model file {}", path.display()))?;
        let (input, output_stride, dynamic_batch) = match role {
            Role::Stage1 => ("image", Some(output_stride), false),
            Role::Stage2 => ("patches", None, true),
        };
        Ok(Self {
            role,
            variant,
            file: file.into(),
            sha256: sha256_hex(&bytes),
            input: input.into(),
            output: "prob".into(),
            patch_size,
            output_stride,
            dynamic_batch,
        })
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
        let path = self.path_of(entry);
        let bytes = std::fs::read(&path)
            .with_context(|| format!("reading model file {}", path.display()))?;
        let actual = sha256_hex(&bytes);
        if !actual.eq_ignore_ascii_case(&entry.sha256) {
            bail!(
                "model file {} is corrupt or was replaced: its SHA-256 is {actual}, the \
                 manifest says {}",
                path.display(),
                entry.sha256
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
        for (i, e) in self.models.iter().enumerate() {
            let what = format!("models[{i}] ({} {}, {})", e.role, e.variant, e.file);
            let rel = Path::new(&e.file);
            ensure!(
                !e.file.is_empty()
                    && rel
                        .components()
                        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir)),
                "{what}: file must be a relative path inside the models folder"
            );
            ensure!(
                e.sha256.len() == 64 && e.sha256.bytes().all(|b| b.is_ascii_hexdigit()),
                "{what}: sha256 must be 64 hex digits, got `{}`",
                e.sha256
            );
            ensure!(
                e.patch_size == self.patch_size,
                "{what}: patch_size {} differs from the manifest's {}",
                e.patch_size,
                self.patch_size
            );
            match e.role {
                Role::Stage1 => ensure!(
                    e.output_stride.is_some_and(|s| s > 0),
                    "{what}: a stage1 model needs a positive output_stride"
                ),
                Role::Stage2 => ensure!(
                    e.output_stride.is_none(),
                    "{what}: output_stride only applies to stage1"
                ),
            }
            if self.models[..i]
                .iter()
                .any(|o| o.role == e.role && o.variant == e.variant)
            {
                bail!("{what}: a second {} {} model", e.role, e.variant);
            }
        }
        // A missing role is reported when its model is loaded; a role without the
        // default variant is a manifest error.
        for role in [Role::Stage1, Role::Stage2] {
            if self.models.iter().any(|e| e.role == role) {
                self.entry(role, self.default_variant)
                    .context("default_variant must exist for every stage listed")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> Manifest {
        let mut models = vec![];
        for (role, variant, content) in [
            (Role::Stage1, Variant::Float, b"stage one float".as_slice()),
            (Role::Stage1, Variant::Int8, b"stage one int8"),
            (Role::Stage2, Variant::Float, b"stage two float"),
            (Role::Stage2, Variant::Int8, b"stage two int8"),
        ] {
            let file = format!("{role}-{variant}.onnx");
            std::fs::write(dir.join(&file), content).unwrap();
            models.push(ModelEntry::for_file(dir, &file, role, variant, 101, 8).unwrap());
        }
        Manifest {
            version: "test-1".into(),
            default_variant: Variant::Float,
            patch_size: 101,
            preprocess: PreprocessConfig::default(),
            stage1: CandidateConfig {
                threshold: 0.3,
                max_candidates: 400,
                search_radius: 6,
                merge_distance: 4.0,
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
            models,
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
        assert!(text.contains("output_stride = 8"), "{text}");
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
            ("[stage1]\n", "[stage1]\nnms_radius = 3.0\n"),
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
}
