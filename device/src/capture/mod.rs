//! Frame sources for the device loop: a folder of photos, the synthetic generator, or a
//! USB (UVC) fundus camera through V4L2.
//!
//! Every source implements [`FrameSource`]. The loop calls [`FrameSource::next_frame`]
//! repeatedly and gets a [`FrameEvent`]: a frame, a recoverable error to log (a bad file,
//! an unplugged camera), `Idle` (nothing yet, call again) or `Exhausted` (stop). Sources
//! never panic on bad input and never spin: a call that produces nothing has waited (at
//! most [`camera::CameraConfig::wait_slice`]) first. [`FrameSource::state`] is the
//! one-line text for the status bar ("camera ok", "camera lost: ..., retry in 2.0 s",
//! "replaying 3/10").
//!
//! The camera is split in two so its logic is testable without hardware:
//! [`RawCapture`] is the device I/O (the real [`V4l2Capture`], or [`RecordedCapture`]
//! replaying recorded buffers with scripted failures), [`decode_raw`] turns a
//! [`RawFrame`] (YUYV or MJPEG bytes) into RGB, and [`CameraSource`] adds triggers,
//! decoding and reconnection with back-off on top, timed by an injectable [`Clock`].

pub mod camera;
pub mod clock;
pub mod folder;
pub mod raw;
pub mod recorded;
#[cfg(feature = "synthetic")]
pub mod synthetic;
pub mod trigger;
pub mod v4l2;

use std::fmt;
use std::time::{Duration, SystemTime};

use image::RgbImage;

pub use camera::{CameraConfig, CameraSource, RawCapture};
pub use clock::{Clock, FakeClock, SystemClock};
pub use folder::FolderSource;
pub use raw::{PixelFormat, RawFrame, decode_raw};
pub use recorded::RecordedCapture;
#[cfg(feature = "synthetic")]
pub use synthetic::SyntheticSource;
pub use trigger::Trigger;
pub use v4l2::{V4l2Capture, V4l2Config};

/// One decoded picture, ready for preprocessing.
#[derive(Clone, PartialEq)]
pub struct Frame {
    /// Increases by one per delivered frame of a source, from 0; errors do not use ids,
    /// and a reconnected camera continues where it stopped.
    pub id: u64,
    /// Where it came from, as records name it: the file name (relative to the replayed
    /// folder), `camera:<device>`, or "synthetic seed N".
    pub source: String,
    /// The file the frame was decoded from, when the source read one as a whole: records
    /// identify the photo by the file's SHA-256 and the archive keeps its bytes. `None`:
    /// records hash the decoded RGB8 pixels and the archive keeps them as PNG (the
    /// camera's raw buffer does not leave the source).
    pub file: Option<SourceFile>,
    pub image: RgbImage,
    /// When the frame entered the device: after the camera buffer was dequeued, or when
    /// the file was read or the synthetic image generated.
    pub captured_at: SystemTime,
}

/// The bytes of the file a frame was decoded from.
#[derive(Clone, PartialEq, Eq)]
pub struct SourceFile {
    pub sha256: [u8; 32],
    pub bytes: Vec<u8>,
    /// The file's extension as named (e.g. `png`, `JPG`): the archive keeps it.
    pub extension: String,
}

/// Without the pixels: a frame in a log line must not print megabytes.
impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("id", &self.id)
            .field("source", &self.source)
            .field("file", &self.file.as_ref().map(|f| f.bytes.len()))
            .field(
                "image",
                &format_args!("{}x{}", self.image.width(), self.image.height()),
            )
            .field("captured_at", &self.captured_at)
            .finish()
    }
}

/// What one call of [`FrameSource::next_frame`] produced.
#[derive(Debug)]
pub enum FrameEvent {
    Frame(Frame),
    /// Recoverable: log it, show [`FrameSource::state`], and call again. The source has
    /// already arranged its retry.
    Error(SourceError),
    /// No frame yet (waiting for a trigger, or for the next reconnection attempt); the
    /// call has already waited a little, so calling again at once does not spin.
    Idle,
    /// No more frames will come: the end of a folder replay or of the synthetic frames,
    /// or stdin closed under the key trigger.
    Exhausted,
}

/// A recoverable source failure and where it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceError {
    /// What failed, as records name it: the file (relative to the replayed folder) or
    /// `camera:<device>`.
    pub origin: String,
    /// One line that says what went wrong (it names the file or device too).
    pub message: String,
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The source's condition, for the status bar and the log. `Display` gives the text.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceState {
    /// Camera not opened yet.
    CameraStarting,
    /// Camera open and delivering (or waiting for its trigger).
    CameraOk,
    /// Camera failed (unplugged, unreadable); reopening in `retry_in`.
    CameraLost { reason: String, retry_in: Duration },
    /// The trigger input failed (e.g. GPIO not readable); retrying in `retry_in`.
    TriggerFailed { reason: String, retry_in: Duration },
    /// Folder replay: `position` of `total` files handed out so far in this pass.
    Replaying { position: usize, total: usize },
    /// Synthetic frames: `position` of `total` generated so far.
    Synthetic { position: u64, total: u64 },
    /// Replay or synthetic run over; `delivered` frames were handed out.
    Finished { delivered: u64 },
}

impl SourceState {
    /// True when nothing is wrong (the status bar shows errors differently).
    pub fn is_ok(&self) -> bool {
        !matches!(
            self,
            SourceState::CameraLost { .. } | SourceState::TriggerFailed { .. }
        )
    }
}

impl fmt::Display for SourceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceState::CameraStarting => write!(f, "camera starting"),
            SourceState::CameraOk => write!(f, "camera ok"),
            SourceState::CameraLost { reason, retry_in } => write!(
                f,
                "camera lost: {reason}, retry in {:.1} s",
                retry_in.as_secs_f64()
            ),
            SourceState::TriggerFailed { reason, retry_in } => write!(
                f,
                "trigger failed: {reason}, retry in {:.1} s",
                retry_in.as_secs_f64()
            ),
            SourceState::Replaying { position, total } => {
                write!(f, "replaying {position}/{total}")
            }
            SourceState::Synthetic { position, total } => {
                write!(f, "synthetic {position}/{total}")
            }
            SourceState::Finished { delivered } => {
                write!(f, "finished ({delivered} frames)")
            }
        }
    }
}

/// Something the device loop pulls frames from.
pub trait FrameSource {
    /// The next frame, error, idle tick or end. Never panics; may block for up to a
    /// trigger wait slice or one camera frame time.
    fn next_frame(&mut self) -> FrameEvent;
    /// The current condition for the status bar (see [`SourceState`]).
    fn state(&self) -> SourceState;
    /// One line for the log at start-up, e.g. "folder /data (12 images, loop)".
    fn describe(&self) -> String;
}

impl<S: FrameSource + ?Sized> FrameSource for Box<S> {
    fn next_frame(&mut self) -> FrameEvent {
        (**self).next_frame()
    }
    fn state(&self) -> SourceState {
        (**self).state()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_texts_match_the_status_bar_wording() {
        assert_eq!(SourceState::CameraOk.to_string(), "camera ok");
        let lost = SourceState::CameraLost {
            reason: "No such device (os error 19)".into(),
            retry_in: Duration::from_millis(2000),
        };
        assert_eq!(
            lost.to_string(),
            "camera lost: No such device (os error 19), retry in 2.0 s"
        );
        assert!(!lost.is_ok());
        assert_eq!(
            SourceState::Replaying {
                position: 3,
                total: 10
            }
            .to_string(),
            "replaying 3/10"
        );
    }
}
