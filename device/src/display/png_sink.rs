//! The simulated board's panel: every presented frame becomes a numbered PNG.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{Canvas, Panel, check_canvas_size};

/// Writes each presented frame as `frame-000000.png`, `frame-000001.png`, ... into a
/// folder, so a run without a display can be inspected (or turned into a video)
/// afterwards. Numbering restarts at 0 for every sink, overwriting an earlier run's
/// files of the same names.
#[derive(Debug)]
pub struct PngSink {
    dir: PathBuf,
    width: u32,
    height: u32,
    next: u64,
}

impl PngSink {
    /// A `width` x `height` panel writing into `dir`, created if missing.
    pub fn new(dir: impl Into<PathBuf>, width: u32, height: u32) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create panel output folder {}", dir.display()))?;
        Ok(PngSink {
            dir,
            width,
            height,
            next: 0,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file frame number `n` (counting presented frames from 0) is written to.
    pub fn frame_path(&self, n: u64) -> PathBuf {
        self.dir.join(format!("frame-{n:06}.png"))
    }

    /// How many frames have been written.
    pub fn frames_written(&self) -> u64 {
        self.next
    }
}

impl Panel for PngSink {
    fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    /// Writes to a temporary name and renames, so a viewer polling the folder never
    /// reads a half-written PNG. On any failure the temporary file is removed: on a full
    /// disk a leftover `.part` kept its space from the records log (which the loop writes
    /// first, and which matters more than a screen).
    fn present(&mut self, canvas: &Canvas) -> Result<()> {
        check_canvas_size(
            &format!("the PNG panel in {}", self.dir.display()),
            self.size(),
            canvas,
        )?;
        let path = self.frame_path(self.next);
        let tmp = path.with_extension("png.part");
        let written = image::save_buffer_with_format(
            &tmp,
            canvas.as_rgb(),
            canvas.width(),
            canvas.height(),
            image::ExtendedColorType::Rgb8,
            image::ImageFormat::Png,
        )
        .with_context(|| format!("cannot write panel frame {}", tmp.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
        });
        if let Err(e) = written {
            return Err(match std::fs::remove_file(&tmp) {
                Ok(()) => e,
                Err(r) if r.kind() == std::io::ErrorKind::NotFound => e,
                Err(r) => e.context(format!("and cannot remove {} ({r})", tmp.display())),
            });
        }
        self.next += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_graphics::pixelcolor::Rgb888;
    use embedded_graphics::prelude::*;

    #[test]
    fn writes_numbered_frames_into_a_new_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested/panel");
        let mut sink = PngSink::new(&dir, 6, 4).unwrap();
        assert_eq!(sink.size(), (6, 4));
        let mut canvas = Canvas::new(6, 4);
        for k in 0..3u8 {
            canvas.clear(Rgb888::new(k * 50, 0, 0)).unwrap();
            sink.present(&canvas).unwrap();
        }
        assert_eq!(sink.frames_written(), 3);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["frame-000000.png", "frame-000001.png", "frame-000002.png"]
        );
        let last = image::open(dir.join("frame-000002.png")).unwrap().to_rgb8();
        assert_eq!(last.dimensions(), (6, 4));
        assert_eq!(last.get_pixel(5, 3).0, [100, 0, 0]);
    }

    #[test]
    fn errors_name_the_folder_or_size() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("not-a-folder");
        std::fs::write(&file, b"x").unwrap();
        let err = PngSink::new(file.join("panel"), 4, 4).unwrap_err();
        assert!(format!("{err:#}").contains("not-a-folder"), "{err:#}");

        let mut sink = PngSink::new(tmp.path().join("ok"), 4, 4).unwrap();
        let err = sink.present(&Canvas::new(5, 4)).unwrap_err();
        assert!(format!("{err:#}").contains("5x4"), "{err:#}");
        assert_eq!(sink.frames_written(), 0);
    }

    #[test]
    fn a_failed_screen_leaves_no_temporary_file() {
        let tmp = tempfile::tempdir().unwrap();
        let mut sink = PngSink::new(tmp.path(), 4, 4).unwrap();
        // The final name is taken by a folder that is not empty: the PNG is written,
        // the rename fails.
        std::fs::create_dir_all(sink.frame_path(0).join("in-the-way")).unwrap();
        let err = sink.present(&Canvas::new(4, 4)).unwrap_err();
        assert!(format!("{err:#}").contains("cannot rename"), "{err:#}");
        assert!(!sink.frame_path(0).with_extension("png.part").exists());
        assert_eq!(sink.frames_written(), 0);
    }
}
