//! Replaying photos from a folder, for demos, field trials on stored images, and tests.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Result, bail};

use super::{Frame, FrameEvent, FrameSource, SourceError, SourceFile, SourceState};
use ma_core::digest::sha256;
use ma_core::image_io::{find_images, read_image_and_bytes};

/// Every image below a folder (recursively), in sorted path order, optionally looped.
///
/// The file list is taken once, at construction. A file that does not decode gives a
/// [`FrameEvent::Error`] naming it and the replay moves on. When looping, a pass that
/// delivered no frame at all ends the replay (`Exhausted`), so a folder of broken files
/// cannot make the loop spin on errors forever.
#[derive(Debug)]
pub struct FolderSource {
    root: PathBuf,
    files: Vec<PathBuf>,
    looping: bool,
    /// Index of the next file to read in this pass.
    next: usize,
    frames_this_pass: usize,
    next_id: u64,
    finished: bool,
}

impl FolderSource {
    /// Lists the images now; errors if the folder cannot be read or holds none.
    pub fn new(root: &Path, looping: bool) -> Result<Self> {
        let files = find_images(root)?;
        if files.is_empty() {
            bail!(
                "no images (PNG, JPEG, TIFF, BMP, PPM) in folder {}",
                root.display()
            );
        }
        Ok(Self {
            root: root.to_path_buf(),
            files,
            looping,
            next: 0,
            frames_this_pass: 0,
            next_id: 0,
            finished: false,
        })
    }

    /// The files in replay order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The file name relative to the replayed folder (a path if nested).
    fn name(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned()
    }
}

impl FrameSource for FolderSource {
    fn next_frame(&mut self) -> FrameEvent {
        if self.finished {
            return FrameEvent::Exhausted;
        }
        if self.next == self.files.len() {
            if !self.looping || self.frames_this_pass == 0 {
                self.finished = true;
                return FrameEvent::Exhausted;
            }
            self.next = 0;
            self.frames_this_pass = 0;
        }
        let path = self.files[self.next].clone();
        self.next += 1;
        match read_image_and_bytes(&path) {
            Ok((image, bytes)) => {
                self.frames_this_pass += 1;
                let id = self.next_id;
                self.next_id += 1;
                FrameEvent::Frame(Frame {
                    id,
                    source: self.name(&path),
                    file: Some(SourceFile {
                        sha256: sha256(&bytes),
                        extension: path
                            .extension()
                            .map(|e| e.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                        bytes,
                    }),
                    image,
                    captured_at: SystemTime::now(),
                })
            }
            // `read_image_and_bytes` errors name the file.
            Err(e) => FrameEvent::Error(SourceError {
                origin: self.name(&path),
                message: format!("skipping image: {e:#}"),
            }),
        }
    }

    fn state(&self) -> SourceState {
        if self.finished {
            SourceState::Finished {
                delivered: self.next_id,
            }
        } else {
            SourceState::Replaying {
                position: self.next,
                total: self.files.len(),
            }
        }
    }

    fn describe(&self) -> String {
        format!(
            "folder {} ({} images{})",
            self.root.display(),
            self.files.len(),
            if self.looping { ", loop" } else { "" }
        )
    }
}
