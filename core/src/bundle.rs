//! Field-validation bundles: what a device exports (`ma-device records export --bundle`)
//! for the workstation to re-check (`ma-trainer validate`). Both sides read this module,
//! so the layout is defined once.
//!
//! ```text
//! BUNDLE/
//!   records.jsonl          the exported records, one JSON object per line
//!   frames/<sha256>.<ext>  the frames those records name (the board's frames archive)
//!   models/manifest.toml   the model manifest the device ran, byte for byte,
//!   models/manifest.toml.sig   and its signature (absent for an unsigned set)
//!   bundle.toml            written last: board, model version, every file's SHA-256
//! ```
//!
//! `bundle.toml` is written only once everything else is on disk, and removed first when
//! a bundle is exported again into the same folder, so a bundle cut short (disk full, USB
//! stick pulled) has none and [`verify`] calls it partial. Every file's SHA-256 in it is
//! checked on import; a frame's name is also the hash its record carries, so a frame
//! replaced together with its entry in `bundle.toml` is still caught by the workstation
//! when it decodes the frame ([`frame_matches_record`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::digest::{sha256, sha256_hex};
use crate::durable::write_durably;
use crate::manifest::OperatingPoint;

/// Name of the bundle's index, written last.
pub const INDEX: &str = "bundle.toml";
/// The records, as JSON lines.
pub const RECORDS: &str = "records.jsonl";
/// Folder of the frames.
pub const FRAMES: &str = "frames";
/// Folder of the model manifest and its signature.
pub const MODELS: &str = "models";
/// Layout version of [`BundleIndex`].
pub const FORMAT: u32 = 1;

/// `bundle.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleIndex {
    /// [`FORMAT`].
    pub format: u32,
    /// Board config name of the device.
    pub board: String,
    /// Release of the model set the records were made with (its manifest's `version`).
    pub model_version: String,
    /// The board's operating point (`inference.operating_point`): the records' MA counts
    /// and circled MAs are at its score threshold.
    pub operating_point: OperatingPoint,
    /// The time range asked for (`--since`, `--until`, as given), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// Records in `records.jsonl`.
    pub records: usize,
    /// Records of the log left out: made with another model version than the set in
    /// `models/` (the device was updated in between; export them with that set).
    pub other_model_records: usize,
    /// SHA-256 of `records.jsonl`.
    pub records_sha256: String,
    /// SHA-256 of `models/manifest.toml` and of its signature (`None`: unsigned set).
    pub manifest_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature_sha256: Option<String>,
    /// Frames in `frames/`.
    pub frames: Vec<BundleFrame>,
    /// Frames the records name that the device no longer held (deleted for the frames
    /// budget) or never kept (no archive, or the write failed): their records carry only
    /// the hash.
    pub missing_frames: Vec<MissingFrame>,
}

/// One frame file of the bundle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleFrame {
    /// File name in `frames/`: `<sha256 the record carries>.<ext>`.
    pub file: String,
    /// SHA-256 of the file's bytes.
    pub sha256: String,
    pub bytes: u64,
}

/// A record's frame that is not in the bundle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MissingFrame {
    /// Line of the record in `records.jsonl` (0-based).
    pub record: usize,
    /// The image's SHA-256 (the record's `image_sha256`).
    pub image_sha256: String,
    /// `evicted` (named by the record, gone from the archive) or `not kept`.
    pub reason: String,
}

/// One line of `records.jsonl`: the fields of the device's records (`ma_device::records::
/// Record` as JSON) that validation reads; others are ignored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BundleRecord {
    pub time_unix_ms: i64,
    pub frame: u64,
    pub source: String,
    pub image_sha256: String,
    pub width: u32,
    pub height: u32,
    pub detections: Vec<BundleDetection>,
    pub refer: bool,
    pub ma_count: u32,
    pub model_version: String,
    pub board: String,
    pub error: Option<String>,
    #[serde(default)]
    pub refer_score: Option<f64>,
    #[serde(default)]
    pub frame_file: Option<String>,
}

/// A detection of a record, original image coordinates.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BundleDetection {
    pub x: f64,
    pub y: f64,
    pub score: f64,
}

impl BundleIndex {
    /// Reads `dir/bundle.toml`; a folder without one holds a partial bundle.
    pub fn load(dir: &Path) -> Result<BundleIndex> {
        let path = dir.join(INDEX);
        if !path.is_file() {
            if dir.join(RECORDS).exists() || dir.join(FRAMES).exists() {
                bail!(
                    "{} is a partial bundle: {INDEX} is missing, so the export did not finish \
                     (disk full, or the medium was removed); export it again",
                    dir.display()
                );
            }
            bail!(
                "{} is not a bundle: no {INDEX} (make one with `ma-device records export \
                 --bundle`)",
                dir.display()
            );
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let index: BundleIndex =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        ensure!(
            index.format == FORMAT,
            "{} has format {}, this build reads format {FORMAT}",
            path.display(),
            index.format
        );
        Ok(index)
    }

    /// Writes `dir/bundle.toml` durably (temporary file, sync, rename): the last step of an
    /// export.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = toml::to_string_pretty(self).context("serialising the bundle index")?;
        write_durably(&dir.join(INDEX), text.as_bytes())
    }

    /// Path of a frame of this bundle in `dir`.
    pub fn frame_path(dir: &Path, file: &str) -> PathBuf {
        dir.join(FRAMES).join(file)
    }
}

/// Checks a bundle before anything is re-run: the index is there (else: partial), the
/// records, model manifest, signature and every frame are there with the SHA-256 the
/// index gives, and every frame's name is `<hash>.<ext>`. Errors name the file at fault.
pub fn verify(dir: &Path) -> Result<BundleIndex> {
    let index = BundleIndex::load(dir)?;
    check_file(&dir.join(RECORDS), &index.records_sha256)?;
    let models = dir.join(MODELS);
    check_file(
        &models.join(crate::signing::MANIFEST_FILE),
        &index.manifest_sha256,
    )?;
    if let Some(sig) = &index.signature_sha256 {
        check_file(&models.join(crate::signing::SIGNATURE_FILE), sig)?;
    }
    for f in &index.frames {
        ensure!(
            frame_file_hash(&f.file).is_some(),
            "{INDEX} lists the frame {:?}, which is not named <sha256>.<ext>",
            f.file
        );
        check_file(&BundleIndex::frame_path(dir, &f.file), &f.sha256).with_context(|| {
            format!(
                "bundle {}: frame {} was changed or is missing",
                dir.display(),
                f.file
            )
        })?;
    }
    Ok(index)
}

/// Whether a frame's bytes belong to a record whose `image_sha256` is `image_sha256`:
/// the hash of the file's bytes (a replayed file), or of the decoded RGB8 pixels (camera
/// and synthetic frames, kept as PNG).
pub fn frame_matches_record(
    file_bytes: &[u8],
    pixels: &image::RgbImage,
    image_sha256: &str,
) -> bool {
    let want = image_sha256.to_ascii_lowercase();
    sha256_hex(file_bytes) == want || hex(&sha256(pixels.as_raw())) == want
}

/// The hash a frame file's name carries (`<64 hex digits>.<ext>`), lower case.
pub fn frame_file_hash(name: &str) -> Option<String> {
    let (stem, ext) = name.split_once('.')?;
    (stem.len() == 64
        && stem.bytes().all(|b| b.is_ascii_hexdigit())
        && !ext.is_empty()
        && ext.bytes().all(|b| b.is_ascii_alphanumeric()))
    .then(|| stem.to_ascii_lowercase())
}

/// Fails unless `path` exists with SHA-256 `want`.
pub fn check_file(path: &Path, want: &str) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let got = sha256_hex(&bytes);
    ensure!(
        got.eq_ignore_ascii_case(want),
        "{} does not match the bundle index: its SHA-256 is {got}, {INDEX} says {want}",
        path.display()
    );
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_names_carry_the_hash() {
        let h = "ab".repeat(32);
        assert_eq!(frame_file_hash(&format!("{h}.png")), Some(h.clone()));
        assert_eq!(
            frame_file_hash(&format!("{}.JPG", h.to_uppercase())),
            Some(h.clone())
        );
        assert_eq!(frame_file_hash(&h), None);
        assert_eq!(frame_file_hash(&format!("{h}.")), None);
        assert_eq!(frame_file_hash("x.png"), None);
        assert_eq!(frame_file_hash(&format!("{h}.p/ng")), None);
    }

    #[test]
    fn a_folder_without_index_is_partial_or_not_a_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let err = format!("{:#}", verify(dir.path()).unwrap_err());
        assert!(err.contains("not a bundle"), "{err}");
        std::fs::write(dir.path().join(RECORDS), b"{}\n").unwrap();
        let err = format!("{:#}", verify(dir.path()).unwrap_err());
        assert!(err.contains("partial bundle"), "{err}");
    }
}
