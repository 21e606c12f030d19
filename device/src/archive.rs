//! The frames archive: every processed frame kept, lossless, so a camp's results can be
//! re-checked on the workstation (`records export --bundle`, `ma-trainer validate`).
//!
//! * **Names**: a frame is stored as `<sha256>.<ext>`, the SHA-256 its record carries
//!   ([`crate::records::Record::image_sha256`]): for a frame replayed from a folder, the
//!   original file's bytes under the file's extension (the hash is of those bytes); for
//!   camera and synthetic frames, a PNG of the decoded RGB8 pixels (the hash is of the
//!   pixels, `run_loop::pixel_hash`, so decoding the PNG gives them back bit for bit).
//!   The same photo twice is stored once.
//! * **Durability**: a frame is written to a hidden temporary file, synced, renamed into
//!   place and the folder synced, all before its record is appended: a record never names
//!   a frame that is not on disk. A temporary file left by a power loss is removed when the
//!   archive is opened. A failed write (disk full) leaves nothing behind; the record is
//!   still written, without a frame file, and the panel says the frame was not kept.
//! * **Budget**: the archive never holds more than its budget (`records.frames_budget_mb`):
//!   before a frame is written, the oldest frames (by modification time) are deleted until
//!   it fits. Records keep the hash of an evicted frame; the export says which are gone.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use image::RgbImage;

use crate::records::ImageHash;
use ma_core::bundle::frame_file_hash;
use ma_core::durable::{TEMP_PREFIX, sync_dir, write_durably};

/// What a frame is stored as.
pub enum FrameContent<'a> {
    /// The original file's bytes (folder source), stored under `extension`.
    File { bytes: &'a [u8], extension: &'a str },
    /// Decoded pixels (camera, synthetic), stored as PNG.
    Pixels(&'a RgbImage),
}

/// What keeping one frame did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kept {
    /// The frame's file name in the archive.
    pub file: String,
    /// Frames deleted to stay within the budget (file names, oldest first).
    pub evicted: Vec<String>,
    /// Bytes the archive holds now.
    pub total_bytes: u64,
}

/// What opening the archive found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArchiveReport {
    pub frames: usize,
    pub bytes: u64,
    /// Temporary files of frames a power loss interrupted, removed.
    pub removed_incomplete: usize,
}

/// The frames folder of a board.
#[derive(Debug)]
pub struct FrameArchive {
    dir: PathBuf,
    budget_bytes: u64,
    /// Oldest first: (file name, size).
    order: VecDeque<(String, u64)>,
    sizes: HashMap<String, u64>,
    total_bytes: u64,
}

impl FrameArchive {
    /// Opens (creating it if missing) the archive in `dir`, holding at most `budget_bytes`.
    pub fn open(dir: &Path, budget_bytes: u64) -> Result<(FrameArchive, ArchiveReport)> {
        fs::create_dir_all(dir)
            .with_context(|| format!("creating the frames folder {}", dir.display()))?;
        let mut found = Vec::new();
        let mut report = ArchiveReport::default();
        for entry in fs::read_dir(dir)
            .with_context(|| format!("reading the frames folder {}", dir.display()))?
        {
            let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEMP_PREFIX) {
                fs::remove_file(entry.path()).with_context(|| {
                    format!("removing the incomplete frame {}", entry.path().display())
                })?;
                report.removed_incomplete += 1;
                continue;
            }
            if frame_file_hash(&name).is_none() {
                continue; // not ours: left alone, not counted
            }
            let meta = entry
                .metadata()
                .with_context(|| format!("reading {}", entry.path().display()))?;
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((modified, name, meta.len()));
        }
        found.sort();
        let mut archive = FrameArchive {
            dir: dir.to_path_buf(),
            budget_bytes,
            order: VecDeque::new(),
            sizes: HashMap::new(),
            total_bytes: 0,
        };
        for (_, name, size) in found {
            archive.push(name, size);
        }
        report.frames = archive.order.len();
        report.bytes = archive.total_bytes;
        if report.removed_incomplete > 0 {
            sync_dir(dir).with_context(|| format!("syncing {}", dir.display()))?;
        }
        Ok((archive, report))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    /// Frames held now.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Keeps the frame whose record hash is `hash`, durably, evicting the oldest frames
    /// first if the budget needs it. Returns once the frame is on disk. A frame already
    /// held (the same photo again) is not rewritten; it becomes the newest.
    pub fn keep(&mut self, hash: &ImageHash, content: FrameContent<'_>) -> Result<Kept> {
        let file = file_name(hash, &content)?;
        let path = self.dir.join(&file);
        if let Some(size) = self.sizes.get(&file).copied() {
            if path.is_file() {
                // Newest again: touched on disk too, so the order survives a restart.
                let _ = File::options()
                    .append(true)
                    .open(&path)
                    .and_then(|f| f.set_modified(SystemTime::now()));
                self.order.retain(|(n, _)| n != &file);
                self.order.push_back((file.clone(), size));
                return Ok(Kept {
                    file,
                    evicted: Vec::new(),
                    total_bytes: self.total_bytes,
                });
            }
            // Deleted behind our back: write it again.
            self.forget(&file);
        }
        let bytes: std::borrow::Cow<'_, [u8]> = match content {
            FrameContent::File { bytes, .. } => bytes.into(),
            FrameContent::Pixels(image) => encode_png(image)?.into(),
        };
        let size = bytes.len() as u64;
        let evicted = self.make_room(size)?;
        write_durably(&path, &bytes)
            .with_context(|| format!("frame {file} not kept in {}", self.dir.display()))?;
        self.push(file.clone(), size);
        Ok(Kept {
            file,
            evicted,
            total_bytes: self.total_bytes,
        })
    }

    /// Deletes the oldest frames until `incoming` more bytes fit in the budget.
    fn make_room(&mut self, incoming: u64) -> Result<Vec<String>> {
        let mut evicted = Vec::new();
        while self.total_bytes + incoming > self.budget_bytes {
            let Some((name, _)) = self.order.front().cloned() else {
                break; // a frame larger than the whole budget is still kept
            };
            let path = self.dir.join(&name);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("evicting the old frame {} (frames budget)", path.display())
                    });
                }
            }
            self.forget(&name);
            evicted.push(name);
        }
        if !evicted.is_empty() {
            sync_dir(&self.dir).with_context(|| format!("syncing {}", self.dir.display()))?;
        }
        Ok(evicted)
    }

    fn push(&mut self, name: String, size: u64) {
        self.total_bytes += size;
        self.sizes.insert(name.clone(), size);
        self.order.push_back((name, size));
    }

    fn forget(&mut self, name: &str) {
        if let Some(size) = self.sizes.remove(name) {
            self.total_bytes -= size;
            self.order.retain(|(n, _)| n != name);
        }
    }
}

/// `<hash>.<ext>`: the original extension (lower case) of a file, `png` for pixels.
fn file_name(hash: &ImageHash, content: &FrameContent<'_>) -> Result<String> {
    let ext = match content {
        FrameContent::File { extension, .. } => {
            let ext = extension.to_ascii_lowercase();
            if ext.is_empty() || !ext.bytes().all(|b| b.is_ascii_alphanumeric()) {
                bail!("cannot archive a file with the extension {extension:?}");
            }
            ext
        }
        FrameContent::Pixels(_) => "png".to_string(),
    };
    Ok(format!("{hash}.{ext}"))
}

/// Lossless PNG of the pixels, fast compression (the device's time goes to the cascade).
pub fn encode_png(image: &RgbImage) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
        .write_image(
            image.as_raw(),
            image.width(),
            image.height(),
            image::ExtendedColorType::Rgb8,
        )
        .context("encoding the frame as PNG")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ma_core::durable::TEMP_PREFIX;

    fn pixels(seed: u8) -> RgbImage {
        RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([seed, (x * 3) as u8 ^ seed, (y * 5) as u8])
        })
    }

    fn keep_pixels(a: &mut FrameArchive, seed: u8) -> Kept {
        let img = pixels(seed);
        let hash = crate::run_loop::pixel_hash(&img);
        a.keep(&hash, FrameContent::Pixels(&img)).unwrap()
    }

    #[test]
    fn frames_are_named_by_their_hash_and_decode_to_the_same_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, report) = FrameArchive::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(report, ArchiveReport::default());
        let img = pixels(7);
        let hash = crate::run_loop::pixel_hash(&img);
        let kept = a.keep(&hash, FrameContent::Pixels(&img)).unwrap();
        assert_eq!(kept.file, format!("{hash}.png"));
        let back = image::open(dir.path().join(&kept.file)).unwrap().to_rgb8();
        assert_eq!(crate::run_loop::pixel_hash(&back), hash);

        let bytes = b"original jpeg bytes".to_vec();
        let file_hash = ImageHash::of(&bytes);
        let kept = a
            .keep(
                &file_hash,
                FrameContent::File {
                    bytes: &bytes,
                    extension: "JPG",
                },
            )
            .unwrap();
        assert_eq!(kept.file, format!("{file_hash}.jpg"));
        assert_eq!(fs::read(dir.path().join(&kept.file)).unwrap(), bytes);
        assert_eq!(a.len(), 2);
        // The same photo again is stored once.
        keep_pixels(&mut a, 7);
        assert_eq!(a.len(), 2);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 2);
    }

    #[test]
    fn the_oldest_frames_go_first_to_stay_within_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let size = encode_png(&pixels(1)).unwrap().len() as u64;
        // Room for three frames of about this size.
        let (mut a, _) = FrameArchive::open(dir.path(), size * 3 + size / 2).unwrap();
        let first: Vec<String> = (1..=3).map(|s| keep_pixels(&mut a, s).file).collect();
        // Frame 1 seen again: it becomes the newest, so frame 2 is the oldest now.
        assert!(keep_pixels(&mut a, 1).evicted.is_empty());
        let kept = keep_pixels(&mut a, 4);
        assert_eq!(kept.evicted, vec![first[1].clone()]);
        assert!(kept.total_bytes <= a.budget_bytes());
        assert!(!dir.path().join(&first[1]).exists());
        assert!(dir.path().join(&first[0]).exists());
        // Reopened, the archive finds what is on disk, in age order.
        drop(a);
        let (mut a, report) = FrameArchive::open(dir.path(), size * 3 + size / 2).unwrap();
        assert_eq!(report.frames, 3);
        let kept = keep_pixels(&mut a, 5);
        assert_eq!(kept.evicted.len(), 1);
        assert_ne!(kept.evicted[0], kept.file);
    }

    #[test]
    fn an_interrupted_write_is_removed_and_foreign_files_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let temp = dir
            .path()
            .join(format!("{TEMP_PREFIX}{}.png", "ab".repeat(32)));
        fs::write(&temp, b"half a frame").unwrap();
        fs::write(dir.path().join("notes.txt"), b"not a frame").unwrap();
        let (a, report) = FrameArchive::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(report.removed_incomplete, 1);
        assert_eq!((report.frames, a.len()), (0, 0));
        assert!(!temp.exists());
        assert!(dir.path().join("notes.txt").exists());
    }

    #[test]
    fn a_failed_write_leaves_nothing_and_says_which_frame() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, _) = FrameArchive::open(dir.path(), 1 << 20).unwrap();
        // The folder gone (unmounted card): the write fails, nothing is counted.
        fs::remove_dir_all(dir.path()).unwrap();
        let img = pixels(3);
        let hash = crate::run_loop::pixel_hash(&img);
        let err = a.keep(&hash, FrameContent::Pixels(&img)).unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains(&hash.to_string()) && text.contains("not kept"),
            "{text}"
        );
        assert!(a.is_empty());
    }
}
