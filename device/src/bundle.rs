//! `records export --bundle`: the records of a board (optionally a time range), the frames
//! they name from its frames archive, and the model manifest and signature it ran, as a
//! self-describing folder for the workstation (`ma-trainer validate`). The layout is
//! `ma_core::bundle`'s.
//!
//! Exporting again into the same folder is idempotent: frames already there with the
//! right bytes are not copied again, the other files come out identical, and frames no
//! longer named are removed. The index is removed first and written last, so an export cut
//! short is recognised as partial.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use ma_core::bundle::{
    self, BundleFrame, BundleIndex, FRAMES, INDEX, MODELS, MissingFrame, RECORDS, frame_file_hash,
};
use ma_core::digest::sha256_hex;
use ma_core::durable::write_durably;
use ma_core::manifest::Manifest;
use ma_core::signing::{MANIFEST_FILE, SIGNATURE_FILE};

use crate::board::BoardConfig;
use crate::records::{self, Record};

/// What to export.
pub struct ExportRequest<'a> {
    pub board: &'a BoardConfig,
    pub out: &'a Path,
    /// Records from this time on (Unix ms, inclusive) and before `until` (exclusive), with
    /// the text the user gave, kept in the index.
    pub since: Option<(i64, String)>,
    pub until: Option<(i64, String)>,
}

/// What an export wrote.
#[derive(Debug)]
pub struct ExportSummary {
    pub index: BundleIndex,
    /// Frames copied now (the others were already in the folder).
    pub copied: usize,
    /// Stale frames removed from the folder.
    pub removed: usize,
    pub bytes: u64,
}

/// Writes the bundle (see the module docs).
pub fn export(req: &ExportRequest<'_>) -> Result<ExportSummary> {
    let board = req.board;
    let models_dir = &board.inference.models;
    let manifest = Manifest::load(models_dir).context("inference.models")?;
    let (list, report) = records::read_all(&board.records.log).context("records.log")?;
    if !report.is_clean() {
        crate::errln!(
            "warning: records log {}: {report}",
            board.records.log.display()
        );
    }
    let in_range = |r: &&Record| {
        req.since.as_ref().is_none_or(|(t, _)| r.time_unix_ms >= *t)
            && req.until.as_ref().is_none_or(|(t, _)| r.time_unix_ms < *t)
    };
    let (chosen, other): (Vec<&Record>, Vec<&Record>) = list
        .iter()
        .filter(in_range)
        .partition(|r| release_of(&r.model_version) == manifest.version);

    if chosen.is_empty() {
        bail!(
            "no records to export: the log {} holds {} record(s), {} in the time range, none \
             made with model {} (inference.models)",
            board.records.log.display(),
            list.len(),
            other.len(),
            manifest.version
        );
    }
    prepare_folder(req.out)?;
    let frames_out = req.out.join(FRAMES);
    std::fs::create_dir_all(&frames_out)
        .with_context(|| format!("creating {}", frames_out.display()))?;

    // Frames, each once (the same photo may have several records).
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut missing = Vec::new();
    for (i, r) in chosen.iter().enumerate() {
        if r.error.is_some() && r.width == 0 {
            continue; // a source error: no image
        }
        let hash = r.image_sha256.to_string();
        let on_device = match (&r.frame_file, board.records.frames.as_deref()) {
            (Some(file), Some(dir)) if dir.join(file).is_file() => Some(file.clone()),
            _ => None,
        };
        match on_device {
            Some(file) => {
                wanted.insert(file);
            }
            None => missing.push(MissingFrame {
                record: i,
                image_sha256: hash,
                reason: if r.frame_file.is_some() {
                    "evicted".into()
                } else {
                    "not kept".into()
                },
            }),
        }
    }
    let bar = ProgressBar::new(wanted.len() as u64).with_style(
        ProgressStyle::with_template("frames {bar:30} {pos}/{len} [{elapsed}<{eta}]")
            .expect("valid template"),
    );
    let archive = board.records.frames.clone().unwrap_or_default();
    let mut frames = Vec::with_capacity(wanted.len());
    let (mut copied, mut bytes) = (0, 0u64);
    for file in &wanted {
        let src = archive.join(file);
        let data = std::fs::read(&src)
            .with_context(|| format!("reading the archived frame {}", src.display()))?;
        let dst = frames_out.join(file);
        let same = std::fs::metadata(&dst).is_ok_and(|m| m.len() == data.len() as u64)
            && std::fs::read(&dst).is_ok_and(|d| d == data);
        if !same {
            write_durably(&dst, &data)?;
            copied += 1;
        }
        bytes += data.len() as u64;
        frames.push(BundleFrame {
            file: file.clone(),
            sha256: sha256_hex(&data),
            bytes: data.len() as u64,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    let removed = remove_stale_frames(&frames_out, &wanted)?;

    // The model manifest and signature, byte for byte.
    let models_out = req.out.join(MODELS);
    std::fs::create_dir_all(&models_out)
        .with_context(|| format!("creating {}", models_out.display()))?;
    let manifest_bytes = std::fs::read(models_dir.join(MANIFEST_FILE))
        .with_context(|| format!("reading {}", models_dir.join(MANIFEST_FILE).display()))?;
    write_durably(&models_out.join(MANIFEST_FILE), &manifest_bytes)?;
    let sig_path = models_dir.join(SIGNATURE_FILE);
    let signature_sha256 = if sig_path.is_file() {
        let sig =
            std::fs::read(&sig_path).with_context(|| format!("reading {}", sig_path.display()))?;
        write_durably(&models_out.join(SIGNATURE_FILE), &sig)?;
        Some(sha256_hex(&sig))
    } else {
        let _ = std::fs::remove_file(models_out.join(SIGNATURE_FILE));
        None
    };

    let mut jsonl = Vec::new();
    let owned: Vec<Record> = chosen.iter().map(|r| (*r).clone()).collect();
    records::to_jsonl(&owned, &mut jsonl)?;
    write_durably(&req.out.join(RECORDS), &jsonl)?;
    bytes += jsonl.len() as u64 + manifest_bytes.len() as u64;

    let index = BundleIndex {
        format: bundle::FORMAT,
        board: board.name.clone(),
        model_version: manifest.version.clone(),
        operating_point: board.inference.operating_point,
        since: req.since.as_ref().map(|(_, s)| s.clone()),
        until: req.until.as_ref().map(|(_, s)| s.clone()),
        records: chosen.len(),
        other_model_records: other.len(),
        records_sha256: sha256_hex(&jsonl),
        manifest_sha256: sha256_hex(&manifest_bytes),
        signature_sha256,
        frames,
        missing_frames: missing,
    };
    index.write(req.out)?;
    Ok(ExportSummary {
        index,
        copied,
        removed,
        bytes,
    })
}

/// The release a record's `model_version` names (`0.6.1 int8 UNSIGNED` -> `0.6.1`).
pub fn release_of(model_version: &str) -> &str {
    model_version.split_whitespace().next().unwrap_or("")
}

/// Makes `out` ready for a (re-)export: created if missing; an earlier bundle's index
/// removed first (so an interrupted re-export reads as partial); any other non-empty
/// folder refused, so an export never mixes into unrelated files.
fn prepare_folder(out: &Path) -> Result<()> {
    if out.exists() {
        let is_bundle = [INDEX, RECORDS, FRAMES, MODELS]
            .iter()
            .any(|n| out.join(n).exists());
        let empty = std::fs::read_dir(out)
            .with_context(|| format!("reading {}", out.display()))?
            .next()
            .is_none();
        if !is_bundle && !empty {
            bail!(
                "{} holds other files and no bundle: export into a new or empty folder",
                out.display()
            );
        }
        let index = out.join(INDEX);
        if index.exists() {
            std::fs::remove_file(&index)
                .with_context(|| format!("removing the old {}", index.display()))?;
            ma_core::durable::sync_dir(out)
                .with_context(|| format!("syncing {}", out.display()))?;
        }
    } else {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    }
    Ok(())
}

/// Removes frame files of an earlier export that this one does not name, and temporary
/// files of an interrupted one.
fn remove_stale_frames(dir: &Path, wanted: &BTreeSet<String>) -> Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours =
            frame_file_hash(&name).is_some() || name.starts_with(ma_core::durable::TEMP_PREFIX);
        if ours && !wanted.contains(&name) {
            let path: PathBuf = entry.path();
            std::fs::remove_file(&path)
                .with_context(|| format!("removing the stale frame {}", path.display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}
