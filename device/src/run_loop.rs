//! The device loop (`ma-device run`): frame source -> cascade -> records log -> panel,
//! until the source is exhausted or a stop is requested (SIGINT/SIGTERM).
//!
//! Per frame, in this order:
//! 1. the cascade runs on the decoded frame (a frame it cannot process is a failed frame,
//!    not a crash);
//! 2. one [`Record`] is appended to the records log and synced to disk
//!    ([`RecordLog::append`]): time, frame number, source name, SHA-256 of the image,
//!    every candidate, MA count and referral at the board's operating point, model
//!    version, board name, processing time;
//! 3. only then is the result drawn and presented; the status bar says `saved #N` (the
//!    record's index, as `ma-device records list` numbers it) or, if the append failed,
//!    `NOT SAVED` in amber.
//!
//! Source errors (an unreadable file, an unplugged camera, a corrupt camera frame) are
//! printed, appended as records with `error` set, and shown on the panel (the last result
//! stays visible, with the error across the top and the camera state in amber); the source
//! itself retries with back-off ([`crate::capture::CameraSource`]). Nothing in the loop
//! panics or returns early on bad input: the loop ends only when the source is exhausted or
//! the stop flag is set, and a set flag is only looked at between frames, so the frame in
//! progress is finished and its record written first.
//!
//! The loop is a library function so it is tested without a binary: [`Station`] holds the
//! already-built parts (any [`FrameSource`], [`Detector`], [`Panel`] and [`RecordLog`]);
//! [`Station::from_board`] builds them from a [`BoardConfig`]; [`Station::run`] returns a
//! [`RunSummary`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use embedded_graphics::mono_font::ascii::{FONT_6X10, FONT_9X15};
use embedded_graphics::mono_font::{MonoFont, MonoTextStyle};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::Rectangle;
use embedded_graphics::text::{Baseline, Text};
use image::RgbImage;

use crate::board::{self, BoardConfig, DisplayConfig, OperatingPoint, SourceConfig};
use crate::capture::{
    self, CameraConfig, CameraSource, FolderSource, Frame, FrameEvent, FrameSource, SourceState,
    SyntheticSource, V4l2Capture, V4l2Config,
};
use crate::cascade::{Cascade, ImageResult};
use crate::display::overlay::{Layout, OverlayInfo, draw_overlay};
use crate::display::{Canvas, FramebufferSink, Panel, PngSink};
use crate::errln;
use crate::image_io::one_line;
use crate::manifest;
use crate::records::{ImageHash, OpenReport, Record, RecordLog, now_unix_ms};
use crate::signing::ModelTrust;
use crate::synthetic::SyntheticParams;

/// What the loop needs from the cascade; a trait so the loop is tested without models.
pub trait Detector {
    /// Every candidate with its score, in original image coordinates, best first.
    fn detect(&self, image: &RgbImage) -> Result<ImageResult>;
    /// Stored in every record and shown on the status bar.
    fn model_version(&self) -> String;
}

impl Detector for Cascade {
    fn detect(&self, image: &RgbImage) -> Result<ImageResult> {
        Cascade::detect(self, image)
    }

    /// The manifest's version and the variant in use, e.g. `v0.1 int8`, marked
    /// `UNSIGNED` when the signature was not checked (`--allow-unsigned`), so every record
    /// and screen made with unchecked models says so.
    fn model_version(&self) -> String {
        let unsigned = if self.signed_by.is_none() {
            " UNSIGNED"
        } else {
            ""
        };
        format!("{} {}{unsigned}", self.manifest.version, self.variant)
    }
}

/// What kind of source frames come from: decides how frames are named and hashed in the
/// records, and what an error record names as its source.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceKind {
    /// Files below `root`, replayed in the order of `files` ([`FolderSource::files`]).
    /// Records name a frame by its path relative to `root` and hash the file's bytes.
    Folder { root: PathBuf, files: Vec<PathBuf> },
    /// A camera; records name frames `camera:<device>` and hash the decoded RGB8 pixels
    /// (the raw buffer does not reach the loop).
    Camera { device: String },
    /// Anything else (synthetic frames): the frame's own source name, the RGB8 pixels
    /// hashed; `label` names the source in error records.
    Other { label: String },
}

/// Where the screens go, for the summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DisplayTarget {
    /// PNG files `frame-NNNNNN.png` in this folder (numbered from 0 in every run).
    PngFolder(PathBuf),
    /// A framebuffer device.
    Framebuffer(PathBuf),
    /// Something else (tests).
    Other(String),
}

impl fmt::Display for DisplayTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisplayTarget::PngFolder(dir) => {
                write!(f, "PNG screens in {}/ (frame-NNNNNN.png)", dir.display())
            }
            DisplayTarget::Framebuffer(dev) => write!(f, "framebuffer {}", dev.display()),
            DisplayTarget::Other(s) => f.write_str(s),
        }
    }
}

/// Everything the loop runs on, already built.
pub struct Station {
    pub source: Box<dyn FrameSource>,
    pub source_kind: SourceKind,
    pub detector: Box<dyn Detector>,
    pub panel: Box<dyn Panel>,
    pub display: DisplayTarget,
    pub log: RecordLog,
    /// Board name, stored in every record.
    pub board: String,
    pub operating_point: OperatingPoint,
    /// Score at or above which a candidate counts as an MA (from the manifest).
    pub threshold: f64,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Frames the source delivered (each got a record, or tried to).
    pub frames: u64,
    /// Frames the cascade processed.
    pub processed: u64,
    /// Processed frames with at least one MA at the operating point.
    pub referred: u64,
    /// Frames the cascade could not process (recorded with their error).
    pub failed_frames: u64,
    /// Error events from the source: unreadable files, camera failures, bad camera frames.
    pub source_errors: u64,
    /// Records appended and synced (frames and source errors).
    pub records_saved: u64,
    /// Records that could not be saved (disk full, I/O error).
    pub records_unsaved: u64,
    /// Screens presented, and screens the panel refused.
    pub screens: u64,
    pub screen_failures: u64,
    /// True when the stop flag ended the run, false when the source was exhausted.
    pub stopped: bool,
    pub log: PathBuf,
    /// Where the screens went (see [`DisplayTarget`]).
    pub display: String,
}

impl fmt::Display for RunSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} after {} frame(s): {} processed ({} referred), {} failed, {} source error(s)",
            if self.stopped {
                "stopped"
            } else {
                "source finished"
            },
            self.frames,
            self.processed,
            self.referred,
            self.failed_frames,
            self.source_errors
        )?;
        write!(
            f,
            "records log: {} ({} saved",
            self.log.display(),
            self.records_saved
        )?;
        if self.records_unsaved > 0 {
            write!(f, ", {} NOT SAVED", self.records_unsaved)?;
        }
        writeln!(f, ")")?;
        write!(f, "display: {} ({} screens", self.display, self.screens)?;
        if self.screen_failures > 0 {
            write!(f, ", {} failed", self.screen_failures)?;
        }
        write!(f, ")")
    }
}

/// A stop flag set by SIGINT and SIGTERM. A second signal while the flag is already set
/// exits at once with status 1 (a stuck shutdown can still be interrupted); records are
/// appended atomically, so the log stays readable either way.
pub fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::flag;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        // The shutdown must be registered first: it only fires when an earlier signal
        // has already set the flag.
        flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))
            .context("cannot install the signal handlers")?;
        flag::register(signal, Arc::clone(&stop)).context("cannot install the signal handlers")?;
    }
    Ok(stop)
}

impl Station {
    /// Builds every part a board config names: the cascade (from `inference.models`, with
    /// its hashes checked, `inference.threads` threads), the source, the panel and the
    /// records log (created if missing; what opening it found is returned, e.g. a torn
    /// final record that was cut off). Errors name the setting or file at fault. Models
    /// are loaded first, so a board without models fails before anything is written.
    ///
    /// The model bundle must be signed by the key in `inference.public_key`; with
    /// `allow_unsigned` (development) the signature is not checked and every record and
    /// screen says `UNSIGNED`.
    pub fn from_board(config: &BoardConfig, allow_unsigned: bool) -> Result<(Station, OpenReport)> {
        let trust = model_trust(config, allow_unsigned)?;
        let camera = match &config.source {
            SourceConfig::Camera(c) => Some(camera_parts(c)?),
            _ => None,
        };
        let detector = load_cascade(&config.inference.models, config.inference.threads, &trust)?;
        let threshold = detector
            .manifest
            .operating_points
            .threshold(config.inference.operating_point);

        let (source, source_kind): (Box<dyn FrameSource>, SourceKind) = match &config.source {
            SourceConfig::Synthetic(s) => (
                Box::new(SyntheticSource::new(
                    SyntheticParams::default(),
                    s.seed,
                    u64::from(s.count),
                )),
                SourceKind::Other {
                    label: "synthetic".into(),
                },
            ),
            SourceConfig::Folder(f) => {
                let root = f.folder();
                let source = FolderSource::new(root, f.repeat)
                    .with_context(|| format!("source.path {}", root.display()))?;
                let kind = SourceKind::Folder {
                    root: root.to_path_buf(),
                    files: source.files().to_vec(),
                };
                (Box::new(source), kind)
            }
            SourceConfig::Camera(c) => {
                let (v4l2, trigger, camera_config) = camera.expect("built above");
                let source = CameraSource::new(V4l2Capture::new(v4l2), &trigger, camera_config);
                let kind = SourceKind::Camera {
                    device: c.device.display().to_string(),
                };
                (Box::new(source), kind)
            }
        };

        let (panel, display): (Box<dyn Panel>, DisplayTarget) = match &config.display {
            DisplayConfig::Png {
                output_dir,
                width,
                height,
            } => (
                Box::new(PngSink::new(output_dir, *width, *height).context("display.output_dir")?),
                DisplayTarget::PngFolder(output_dir.clone()),
            ),
            DisplayConfig::Framebuffer {
                device,
                width,
                height,
            } => {
                let sink = FramebufferSink::open(device).context("display.device")?;
                if sink.size() != (*width, *height) {
                    let (w, h) = sink.size();
                    errln!(
                        "warning: {} is {w}x{h}, the board config says {width}x{height}; \
                         drawing at {w}x{h}",
                        device.display()
                    );
                }
                (Box::new(sink), DisplayTarget::Framebuffer(device.clone()))
            }
        };

        let (log, report) = RecordLog::open(&config.records.log).context("records.log")?;
        let station = Station {
            source,
            source_kind,
            detector: Box::new(detector),
            panel,
            display,
            log,
            board: config.name.clone(),
            operating_point: config.inference.operating_point,
            threshold,
        };
        Ok((station, report))
    }

    /// Runs until the source is exhausted or `stop` is set (checked between frames).
    pub fn run(&mut self, stop: &AtomicBool) -> RunSummary {
        let mut summary = RunSummary {
            log: self.log.path().to_path_buf(),
            display: self.display.to_string(),
            ..RunSummary::default()
        };
        let model_version = self.detector.model_version();
        let (w, h) = self.panel.size();
        let mut screen = Screen {
            canvas: Canvas::new(w, h),
            shown: Shown::Nothing,
            threshold: self.threshold,
            state_key: None,
        };
        errln!(
            "board {}: {}; model {model_version}, operating point {} (score >= {:.3}); \
             records {}; {}",
            self.board,
            self.source.describe(),
            self.operating_point,
            self.threshold,
            self.log.path().display(),
            self.display
        );
        loop {
            if stop.load(Ordering::SeqCst) {
                summary.stopped = true;
                break;
            }
            match self.source.next_frame() {
                FrameEvent::Frame(frame) => {
                    self.process(frame, &model_version, &mut screen, &mut summary)
                }
                FrameEvent::Error(message) => {
                    self.source_error(&message, &model_version, &mut screen, &mut summary)
                }
                FrameEvent::Idle => {
                    // Redraw only when the source's condition changes (camera back, lost,
                    // ...), not on every idle tick: a PNG panel would fill the disk.
                    let state = self.source.state();
                    if screen.state_key != Some(state_key(&state)) {
                        let text = state.to_string();
                        screen.render(&text, state.is_ok(), None);
                        self.present(&mut screen, &state, &mut summary);
                    }
                }
                FrameEvent::Exhausted => break,
            }
        }
        summary
    }

    fn process(
        &mut self,
        frame: Frame,
        model_version: &str,
        screen: &mut Screen,
        summary: &mut RunSummary,
    ) {
        summary.frames += 1;
        let started = Instant::now();
        // A panic inside the detector (a bug, or a library tripping over an odd frame)
        // fails this frame like an error does, instead of ending the loop.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.detector.detect(&frame.image)
        }))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown cause".into());
            Err(anyhow::anyhow!("internal error in the detector: {what}"))
        });
        let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        let name = self.frame_name(&frame);
        let mut record = Record {
            time_unix_ms: unix_ms(frame.captured_at),
            frame: frame.id,
            source: name.clone(),
            image_sha256: self.frame_hash(&frame),
            width: frame.image.width(),
            height: frame.image.height(),
            detections: Vec::new(),
            refer: false,
            ma_count: 0,
            model_version: model_version.to_string(),
            board: self.board.clone(),
            elapsed_ms: elapsed_ms as f32,
            error: None,
        };
        let detections = match &outcome {
            Ok(result) => {
                let count = result.ma_count(self.threshold);
                record.detections = result.detections.iter().map(|&d| d.into()).collect();
                record.ma_count = u32::try_from(count).unwrap_or(u32::MAX);
                record.refer = count > 0;
                summary.processed += 1;
                summary.referred += u64::from(record.refer);
                Some(result.detections.clone())
            }
            Err(e) => {
                record.error = Some(one_line(&format!("{e:#}")));
                summary.failed_frames += 1;
                None
            }
        };
        let saved = self.append(&record, summary);
        let state = self.source.state();
        let saved_text = match &saved {
            Ok(index) => format!("saved #{index}"),
            Err(_) => "NOT SAVED".to_string(),
        };
        match &record.error {
            None => errln!(
                "frame {} {name}: {} MA{} at {} ({} candidates), {elapsed_ms:.0} ms, {saved_text}",
                frame.id,
                record.ma_count,
                if record.refer {
                    ", REFER"
                } else {
                    ", no refer"
                },
                self.operating_point,
                record.detections.len()
            ),
            Some(e) => errln!("frame {} {name}: FAILED: {e}; {saved_text}", frame.id),
        }
        let ok = saved.is_ok() && state.is_ok();
        let status = format!("{saved_text}, {state}");
        screen.shown = match detections {
            Some(detections) => Shown::Result {
                info: OverlayInfo {
                    detections,
                    threshold: self.threshold,
                    ma_count: record.ma_count as usize,
                    refer: record.refer,
                    latency_ms: elapsed_ms,
                    frame_number: frame.id,
                    source_state: String::new(),
                    source_ok: true,
                    model_version: Some(model_version.to_string()),
                },
                image: frame.image,
            },
            None => Shown::Failed {
                image: frame.image,
                frame_number: frame.id,
                reason: format!(
                    "frame #{} not analysed: {}",
                    frame.id,
                    record.error.as_deref().unwrap_or_default()
                ),
            },
        };
        let banner = saved
            .err()
            .map(|e| format!("result NOT SAVED: {}", one_line(&format!("{e:#}"))));
        screen.render(&status, ok, banner.as_deref());
        self.present(screen, &state, summary);
    }

    fn source_error(
        &mut self,
        message: &str,
        model_version: &str,
        screen: &mut Screen,
        summary: &mut RunSummary,
    ) {
        summary.source_errors += 1;
        let message = one_line(message);
        let state = self.source.state();
        let record = Record {
            time_unix_ms: now_unix_ms(),
            frame: 0,
            source: self.error_source(&state),
            image_sha256: ImageHash::default(),
            width: 0,
            height: 0,
            detections: Vec::new(),
            refer: false,
            ma_count: 0,
            model_version: model_version.to_string(),
            board: self.board.clone(),
            elapsed_ms: 0.0,
            error: Some(message.clone()),
        };
        let saved = self.append(&record, summary);
        errln!(
            "source error: {message}; {}",
            match &saved {
                Ok(index) => format!("saved #{index}"),
                Err(_) => "NOT SAVED".into(),
            }
        );
        let status = match &saved {
            Ok(index) => format!("saved #{index}, {state}"),
            Err(_) => format!("NOT SAVED, {state}"),
        };
        screen.render(&status, false, Some(&message));
        self.present(screen, &state, summary);
    }

    /// Appends and syncs; a failure is printed and counted, never fatal.
    fn append(&mut self, record: &Record, summary: &mut RunSummary) -> Result<u64> {
        match self.log.append(record) {
            Ok(index) => {
                summary.records_saved += 1;
                Ok(index)
            }
            Err(e) => {
                summary.records_unsaved += 1;
                errln!("error: {e:#}");
                Err(e)
            }
        }
    }

    fn present(&mut self, screen: &mut Screen, state: &SourceState, summary: &mut RunSummary) {
        screen.state_key = Some(state_key(state));
        match self.panel.present(&screen.canvas) {
            Ok(()) => summary.screens += 1,
            Err(e) => {
                summary.screen_failures += 1;
                errln!("error: cannot show the result: {e:#}");
            }
        }
    }

    /// The record's `source` for a delivered frame.
    fn frame_name(&self, frame: &Frame) -> String {
        match &self.source_kind {
            SourceKind::Camera { .. } => format!("camera:{}", frame.source),
            SourceKind::Folder { .. } | SourceKind::Other { .. } => frame.source.clone(),
        }
    }

    /// SHA-256 of the file for folder frames (read again from the path the source read,
    /// not from the record's name, which is lossy for a name that is not UTF-8), of the
    /// RGB8 pixels otherwise.
    fn frame_hash(&self, frame: &Frame) -> ImageHash {
        if let (SourceKind::Folder { .. }, Some(path)) = (&self.source_kind, &frame.path) {
            match std::fs::read(path) {
                Ok(bytes) => return ImageHash::of(&bytes),
                Err(e) => errln!(
                    "warning: cannot read {} again to hash it ({e}); hashing its pixels",
                    path.display()
                ),
            }
        }
        pixel_hash(&frame.image)
    }

    /// The record's `source` for a source error: the file that failed for a folder
    /// replay, the device for a camera.
    fn error_source(&self, state: &SourceState) -> String {
        match &self.source_kind {
            SourceKind::Folder { root, files } => match state {
                SourceState::Replaying { position, .. } if *position > 0 => files
                    .get(position - 1)
                    .map(|f| {
                        f.strip_prefix(root)
                            .unwrap_or(f)
                            .to_string_lossy()
                            .into_owned()
                    })
                    .unwrap_or_else(|| format!("folder:{}", root.display())),
                _ => format!("folder:{}", root.display()),
            },
            SourceKind::Camera { device } => format!("camera:{device}"),
            SourceKind::Other { label } => label.clone(),
        }
    }
}

/// The [`Record::image_sha256`] of a frame known only by its pixels: SHA-256 of the RGB8
/// buffer (rows top to bottom, 3 bytes per pixel, no header).
pub fn pixel_hash(image: &RgbImage) -> ImageHash {
    ImageHash::of(image.as_raw())
}

/// Loads the cascade for the device, with an explicit message when the folder holds no
/// model set (the usual case on a fresh clone before models are shipped).
pub fn load_cascade(models: &Path, threads: usize, trust: &ModelTrust) -> Result<Cascade> {
    let manifest_path = models.join(manifest::FILE_NAME);
    if !manifest_path.is_file() {
        bail!(
            "no models: {} does not exist. The models folder {} (inference.models in the \
             board config) must hold manifest.toml and the ONNX files it lists; export a set \
             with `ma-trainer export --out {}` or point inference.models at a folder that \
             holds one",
            manifest_path.display(),
            models.display(),
            models.display()
        );
    }
    crate::cascade::onnx::set_threads(threads);
    Cascade::load(models, None, trust)
        .with_context(|| format!("cannot load the models in {}", models.display()))
}

/// What a board accepts: bundles signed by `inference.public_key`, or anything with
/// `allow_unsigned`. A board without a key refuses to start unless `allow_unsigned`.
pub fn model_trust(config: &BoardConfig, allow_unsigned: bool) -> Result<ModelTrust> {
    if allow_unsigned {
        return Ok(ModelTrust::Unsigned);
    }
    match &config.inference.public_key {
        Some(key) => ModelTrust::key_file(key).context("inference.public_key"),
        None => bail!(
            "inference.public_key is not set: a device only runs model bundles signed by the \
             key it names (e.g. public_key = \"keys/models.pub\", the release key). Set it, \
             or pass --allow-unsigned for development"
        ),
    }
}

/// The V4L2 settings, trigger and retry behaviour of a camera board config.
fn camera_parts(c: &board::CameraSource) -> Result<(V4l2Config, capture::Trigger, CameraConfig)> {
    let format = match c.format {
        board::PixelFormat::Yuyv => capture::PixelFormat::Yuyv,
        board::PixelFormat::Mjpeg => capture::PixelFormat::Mjpeg,
    };
    let trigger = match &c.trigger {
        board::Trigger::Key {} => capture::Trigger::Key,
        board::Trigger::Interval { seconds } => {
            capture::Trigger::Interval(Duration::try_from_secs_f64(*seconds).with_context(
                || format!("source.trigger.seconds ({seconds}) is not a usable duration"),
            )?)
        }
        board::Trigger::Gpio { chip, line } => capture::Trigger::Gpio {
            chip: gpio_chip_number(chip)?,
            line: line.context("source.trigger.line is required for trigger kind \"gpio\"")?,
        },
    };
    let retry = CameraConfig {
        initial_backoff: Duration::from_millis(c.retry_backoff_ms.initial),
        max_backoff: Duration::from_millis(c.retry_backoff_ms.max),
        ..CameraConfig::default()
    };
    Ok((
        V4l2Config::new(&c.device, format, c.width, c.height),
        trigger,
        retry,
    ))
}

/// N of `/dev/gpiochipN`.
fn gpio_chip_number(chip: &Path) -> Result<u32> {
    chip.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("gpiochip"))
        .and_then(|n| n.parse().ok())
        .with_context(|| {
            format!(
                "source.trigger.chip must name a GPIO chip device like /dev/gpiochip0, got {}",
                chip.display()
            )
        })
}

fn unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// The kind of source condition and whether it is ok: a change of either redraws the
/// screen on an idle tick (a retry countdown alone does not).
fn state_key(state: &SourceState) -> (std::mem::Discriminant<SourceState>, bool) {
    (std::mem::discriminant(state), state.is_ok())
}

/// What the panel shows besides the status.
enum Shown {
    /// No frame yet.
    Nothing,
    /// The last processed frame and its result (`source_state` is filled in per render).
    Result { image: RgbImage, info: OverlayInfo },
    /// The last frame could not be analysed.
    Failed {
        image: RgbImage,
        frame_number: u64,
        reason: String,
    },
}

struct Screen {
    canvas: Canvas,
    shown: Shown,
    threshold: f64,
    /// The source condition at the last present.
    state_key: Option<(std::mem::Discriminant<SourceState>, bool)>,
}

const BAR_BACKGROUND: Rgb888 = Rgb888::new(22, 22, 26);
const BAR_RULE: Rgb888 = Rgb888::new(70, 70, 76);
const TEXT_DIM: Rgb888 = Rgb888::new(175, 175, 180);
const TEXT_WARN: Rgb888 = Rgb888::new(255, 190, 0);
const BANNER_BACKGROUND: Rgb888 = Rgb888::new(60, 40, 0);
const TEXT_MARGIN: i32 = 6;

impl Screen {
    /// Draws the current view with `status` (source condition, saved state) in the
    /// status bar, amber unless `ok`, and `banner` (an error) across the top.
    fn render(&mut self, status: &str, ok: bool, banner: Option<&str>) {
        let canvas = &mut self.canvas;
        let status_colour = if ok { TEXT_DIM } else { TEXT_WARN };
        match &self.shown {
            Shown::Result { image, info } => {
                let info = OverlayInfo {
                    source_state: status.to_string(),
                    source_ok: ok,
                    ..info.clone()
                };
                let Ok(()) = draw_overlay(canvas, image, &info);
            }
            Shown::Failed {
                image,
                frame_number,
                reason,
            } => {
                draw_frame_only(canvas, image, self.threshold);
                draw_plain_bar(
                    canvas,
                    &[
                        ("NOT ANALYSED", TEXT_WARN),
                        (&format!("#{frame_number}"), TEXT_DIM),
                        (status, status_colour),
                    ],
                );
                if banner.is_none() {
                    draw_banner(canvas, reason);
                }
            }
            Shown::Nothing => {
                draw_frame_only(canvas, &RgbImage::new(0, 0), self.threshold);
                draw_plain_bar(
                    canvas,
                    &[("no result yet", TEXT_DIM), (status, status_colour)],
                );
            }
        }
        if let Some(text) = banner {
            draw_banner(canvas, text);
        }
    }
}

/// The frame (letterboxed, no marks) and an empty status bar.
fn draw_frame_only(canvas: &mut Canvas, image: &RgbImage, threshold: f64) {
    let info = OverlayInfo {
        detections: Vec::new(),
        threshold,
        ma_count: 0,
        refer: false,
        latency_ms: f64::NAN,
        frame_number: 0,
        source_state: String::new(),
        source_ok: true,
        model_version: None,
    };
    let Ok(()) = draw_overlay(canvas, image, &info);
}

fn layout(canvas: &Canvas) -> Layout {
    Layout::new(canvas.bounding_box(), (0, 0))
}

/// A status bar of plain fields, for screens without a result (the overlay's bar always
/// shows an MA count and a referral, which would mislead here).
fn draw_plain_bar(canvas: &mut Canvas, fields: &[(&str, Rgb888)]) {
    let bar = layout(canvas).status_bar;
    if bar.is_zero_sized() {
        return;
    }
    let Ok(()) = canvas.fill_solid(&bar, BAR_BACKGROUND);
    let rule = Rectangle::new(bar.top_left, Size::new(bar.size.width, 1));
    let Ok(()) = canvas.fill_solid(&rule, BAR_RULE);
    let font = font_for(bar.size.height);
    let advance = (font.character_size.width + font.character_spacing) as i32;
    let top =
        bar.top_left.y + (bar.size.height.saturating_sub(font.character_size.height) / 2) as i32;
    let right = bar.top_left.x + bar.size.width as i32 - TEXT_MARGIN;
    let mut x = bar.top_left.x + TEXT_MARGIN;
    let mut clipped = canvas.clipped(&bar);
    for (text, colour) in fields.iter().filter(|(t, _)| !t.is_empty()) {
        let room = ((right - x) / advance).max(0) as usize;
        if room < 4 {
            break;
        }
        let text = fit(text, room);
        let style = MonoTextStyle::new(font, *colour);
        let Ok(_) =
            Text::with_baseline(&text, Point::new(x, top), style, Baseline::Top).draw(&mut clipped);
        x += (text.chars().count() as i32 + 2) * advance;
    }
}

/// Amber text on a dark band across the top of the image area, wrapped at word
/// boundaries onto at most [`BANNER_LINES`] lines.
fn draw_banner(canvas: &mut Canvas, text: &str) {
    let area = layout(canvas).image_area;
    if area.is_zero_sized() {
        return;
    }
    let font = font_for(area.size.height);
    let advance = (font.character_size.width + font.character_spacing) as i32;
    let room = ((area.size.width as i32 - 2 * TEXT_MARGIN) / advance).max(0) as usize;
    let lines = wrap(&one_line(text), room, BANNER_LINES);
    let line_height = font.character_size.height + 2;
    let height = (line_height * lines.len() as u32 + 6).min(area.size.height);
    let band = Rectangle::new(area.top_left, Size::new(area.size.width, height));
    let Ok(()) = canvas.fill_solid(&band, BANNER_BACKGROUND);
    let style = MonoTextStyle::new(font, TEXT_WARN);
    let mut clipped = canvas.clipped(&band);
    for (i, line) in lines.iter().enumerate() {
        let origin = band.top_left + Point::new(TEXT_MARGIN, 4 + (i as u32 * line_height) as i32);
        let Ok(_) = Text::with_baseline(line, origin, style, Baseline::Top).draw(&mut clipped);
    }
}

/// Lines of an error banner at most.
const BANNER_LINES: usize = 3;

/// `text` in lines of at most `room` characters, broken at spaces where possible (long
/// words are cut), at most `max_lines`; the last one ends in "..." if text is left over.
fn wrap(text: &str, room: usize, max_lines: usize) -> Vec<String> {
    let room = room.max(1);
    let mut lines: Vec<String> = Vec::new();
    let mut rest = fit(text, usize::MAX);
    while !rest.is_empty() && lines.len() < max_lines {
        if rest.len() <= room {
            lines.push(std::mem::take(&mut rest));
            break;
        }
        // ASCII only after `fit`, so byte indices are character indices.
        let cut = rest[..=room].rfind(' ').filter(|&i| i > 0).unwrap_or(room);
        lines.push(rest[..cut].trim_end().to_string());
        rest = rest[cut..].trim_start().to_string();
    }
    if !rest.is_empty()
        && let Some(last) = lines.last_mut()
    {
        *last = fit(&format!("{last} {rest}"), room);
    }
    lines
}

fn font_for(height: u32) -> &'static MonoFont<'static> {
    if height >= 24 { &FONT_9X15 } else { &FONT_6X10 }
}

/// `text` cut to `room` characters, ending in "..." when cut. ASCII only (the fonts are).
fn fit(text: &str, room: usize) -> String {
    let text: String = text
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                '?'
            }
        })
        .collect();
    if text.chars().count() <= room {
        text
    } else if room > 3 {
        text.chars()
            .take(room - 3)
            .collect::<String>()
            .trim_end()
            .to_string()
            + "..."
    } else {
        text.chars().take(room).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use super::*;
    use crate::capture::clock::FakeClock;
    use crate::capture::recorded::RecordedCapture;
    use crate::capture::trigger::TriggerInput;
    use crate::capture::{PixelFormat, RawFrame};
    use crate::cascade::Timings;
    use crate::detection::Detection;
    use crate::records::read_all;

    /// Two detections per frame (one above 0.5, one below); fails on frames whose top-left
    /// pixel is pure red; sets `stop` after `stop_after` frames when given.
    struct FakeDetector {
        calls: Rc<Cell<u64>>,
        stop_after: Option<(u64, Arc<AtomicBool>)>,
    }

    impl FakeDetector {
        fn new() -> Self {
            Self {
                calls: Rc::new(Cell::new(0)),
                stop_after: None,
            }
        }
    }

    impl Detector for FakeDetector {
        fn detect(&self, image: &RgbImage) -> Result<ImageResult> {
            self.calls.set(self.calls.get() + 1);
            if let Some((n, stop)) = &self.stop_after
                && self.calls.get() >= *n
            {
                stop.store(true, Ordering::SeqCst);
            }
            if image.width() > 0 && image.get_pixel(0, 0).0 == [255, 0, 0] {
                bail!("preprocessing failed: no field of view\nsecond line");
            }
            if image.width() > 0 && image.get_pixel(0, 0).0 == [0, 255, 0] {
                panic!("index out of bounds");
            }
            let d = |x: f64, score: f64| Detection { x, y: 20.0, score };
            Ok(ImageResult {
                width: image.width(),
                height: image.height(),
                detections: vec![d(10.0, 0.9), d(30.0, 0.2)],
                candidates: 2,
                timings: Timings::default(),
            })
        }
        fn model_version(&self) -> String {
            "fake-1 float".into()
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        png_dir: PathBuf,
        log_path: PathBuf,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            Self {
                png_dir: dir.path().join("screens"),
                log_path: dir.path().join("log/records.log"),
                _dir: dir,
            }
        }

        fn station(
            &self,
            source: Box<dyn FrameSource>,
            kind: SourceKind,
            detector: FakeDetector,
        ) -> Station {
            let (log, _) = RecordLog::open(&self.log_path).unwrap();
            Station {
                source,
                source_kind: kind,
                detector: Box::new(detector),
                panel: Box::new(PngSink::new(&self.png_dir, 320, 240).unwrap()),
                display: DisplayTarget::PngFolder(self.png_dir.clone()),
                log,
                board: "test-board".into(),
                operating_point: OperatingPoint::Fp2,
                threshold: 0.5,
            }
        }

        fn pngs(&self) -> usize {
            std::fs::read_dir(&self.png_dir)
                .map(|d| {
                    d.filter(|e| {
                        e.as_ref()
                            .unwrap()
                            .file_name()
                            .to_string_lossy()
                            .ends_with(".png")
                    })
                    .count()
                })
                .unwrap_or(0)
        }

        fn records(&self) -> Vec<Record> {
            let (records, report) = read_all(&self.log_path).unwrap();
            assert!(report.is_clean(), "{report}");
            records
        }
    }

    fn small_synthetic(count: u64) -> Box<dyn FrameSource> {
        let params = SyntheticParams {
            width: 96,
            height: 80,
            fov_diameter: 90.0,
            n_microaneurysms: 1,
            n_lookalikes: 0,
            ..SyntheticParams::default()
        };
        Box::new(SyntheticSource::new(params, 7, count))
    }

    fn other() -> SourceKind {
        SourceKind::Other {
            label: "synthetic".into(),
        }
    }

    #[test]
    fn synthetic_frames_are_recorded_then_shown() {
        let fx = Fixture::new();
        let mut station = fx.station(small_synthetic(3), other(), FakeDetector::new());
        let summary = station.run(&AtomicBool::new(false));
        assert_eq!(
            (summary.frames, summary.processed, summary.referred),
            (3, 3, 3)
        );
        assert_eq!((summary.records_saved, summary.screens), (3, 3));
        assert!(!summary.stopped);
        assert_eq!(fx.pngs(), 3);
        let records = fx.records();
        assert_eq!(records.len(), 3);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.frame, i as u64);
            assert_eq!(r.source, format!("synthetic seed {}", 7 + i));
            assert_eq!((r.ma_count, r.refer, r.detections.len()), (1, true, 2));
            assert_eq!((r.width, r.height), (96, 80));
            assert_eq!(r.board, "test-board");
            assert_eq!(r.model_version, "fake-1 float");
            assert_eq!(r.error, None);
            let params = SyntheticParams {
                width: 96,
                height: 80,
                fov_diameter: 90.0,
                n_microaneurysms: 1,
                n_lookalikes: 0,
                ..SyntheticParams::default()
            };
            let image = crate::synthetic::generate(&params, 7 + i as u64).image;
            assert_eq!(r.image_sha256, pixel_hash(&image));
        }
        let text = summary.to_string();
        assert!(
            text.contains("records.log") && text.contains("screens"),
            "{text}"
        );
    }

    #[test]
    fn stop_flag_finishes_the_current_frame_and_stops() {
        let fx = Fixture::new();
        // Set before the start: nothing is read.
        let mut station = fx.station(small_synthetic(5), other(), FakeDetector::new());
        let summary = station.run(&AtomicBool::new(true));
        assert!(summary.stopped);
        assert_eq!(summary.frames, 0);
        drop(station);
        // Set during the second frame's detection: that frame is recorded and shown.
        let stop = Arc::new(AtomicBool::new(false));
        let mut detector = FakeDetector::new();
        detector.stop_after = Some((2, Arc::clone(&stop)));
        let mut station = fx.station(small_synthetic(5), other(), detector);
        let summary = station.run(&stop);
        assert!(summary.stopped);
        assert_eq!(
            (summary.frames, summary.records_saved, summary.screens),
            (2, 2, 2)
        );
        assert_eq!(fx.records().len(), 2);
        assert_eq!(fx.pngs(), 2);
    }

    #[test]
    fn folder_bad_files_and_failed_frames_are_recorded_and_the_loop_goes_on() {
        let fx = Fixture::new();
        let dir = tempfile::tempdir().unwrap();
        let good = RgbImage::from_pixel(300, 280, image::Rgb([20, 90, 40]));
        good.save(dir.path().join("a.png")).unwrap();
        std::fs::write(dir.path().join("b.png"), b"not a png").unwrap();
        // Pure red top-left: the fake detector fails on it.
        RgbImage::from_pixel(300, 280, image::Rgb([255, 0, 0]))
            .save(dir.path().join("c.png"))
            .unwrap();
        good.save(dir.path().join("d.png")).unwrap();
        // Pure green: the fake detector panics on it.
        RgbImage::from_pixel(300, 280, image::Rgb([0, 255, 0]))
            .save(dir.path().join("e.png"))
            .unwrap();
        let source = FolderSource::new(dir.path(), false).unwrap();
        let kind = SourceKind::Folder {
            root: dir.path().to_path_buf(),
            files: source.files().to_vec(),
        };
        let mut station = fx.station(Box::new(source), kind, FakeDetector::new());
        let summary = station.run(&AtomicBool::new(false));
        assert_eq!(summary.frames, 4);
        assert_eq!(summary.processed, 2);
        assert_eq!(summary.failed_frames, 2);
        assert_eq!(summary.source_errors, 1);
        assert_eq!(summary.records_saved, 5);
        assert_eq!(fx.pngs(), 5);
        let records = fx.records();
        let sources: Vec<&str> = records.iter().map(|r| r.source.as_str()).collect();
        assert_eq!(sources, ["a.png", "b.png", "c.png", "d.png", "e.png"]);
        assert_eq!(
            records[4].error.as_deref(),
            Some("internal error in the detector: index out of bounds")
        );
        let a = std::fs::read(dir.path().join("a.png")).unwrap();
        assert_eq!(records[0].image_sha256, ImageHash::of(&a));
        // The unreadable file: an error record naming it, nothing else known.
        let bad = &records[1];
        assert!(bad.error.as_deref().unwrap().contains("b.png"), "{bad:?}");
        assert_eq!((bad.width, bad.ma_count, bad.refer), (0, 0, false));
        assert_eq!(bad.image_sha256, ImageHash::default());
        // The frame the detector failed on: its size, hash and frame number, one line.
        let failed = &records[2];
        assert_eq!((failed.frame, failed.width, failed.height), (1, 300, 280));
        assert_eq!(
            failed.error.as_deref(),
            Some("preprocessing failed: no field of view second line")
        );
        assert!(failed.detections.is_empty() && !failed.refer);
        assert_eq!(records[3].frame, 2);
        // The failed frame's screen shows the frame and the reason, not a result.
        let screen = image::open(fx.png_dir.join("frame-000002.png"))
            .unwrap()
            .to_rgb8();
        assert_eq!(screen.get_pixel(160, 100).0, [255, 0, 0]);
        assert_eq!(screen.get_pixel(3, 3).0, BANNER_BACKGROUND_RGB);
    }

    const BANNER_BACKGROUND_RGB: [u8; 3] = [60, 40, 0];

    /// A 320x240 grey YUYV buffer.
    fn grey_yuyv() -> RawFrame {
        RawFrame {
            format: PixelFormat::Yuyv,
            width: 320,
            height: 240,
            stride: 0,
            bytes: [128u8, 128, 128, 128].repeat(320 * 240 / 2),
        }
    }

    #[test]
    fn camera_failures_are_recorded_shown_and_retried() {
        let fx = Fixture::new();
        let clock = FakeClock::new();
        // Recorded buffers alternate good / not decodable. Read 1 and read 3 fail as an
        // unplugged camera does, and so does open 1 (the first reopen).
        let mut broken = grey_yuyv();
        broken.bytes.truncate(100);
        let capture = RecordedCapture::new("/dev/video9", vec![grey_yuyv(), broken])
            .fail_opens(1..2)
            .fail_reads(1..2)
            .fail_reads(3..4);
        let calls = capture.call_log();
        let source = CameraSource::with_parts(
            Box::new(capture),
            TriggerInput::new(&capture::Trigger::Interval(Duration::ZERO)),
            CameraConfig::default(),
            Arc::new(clock.clone()),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let mut detector = FakeDetector::new();
        detector.stop_after = Some((3, Arc::clone(&stop)));
        let kind = SourceKind::Camera {
            device: "/dev/video9".into(),
        };
        let mut station = fx.station(Box::new(source), kind, detector);
        let summary = station.run(&stop);
        assert!(summary.stopped);
        assert_eq!(summary.frames, 3);
        // frame 0; read 1 fails; reopen fails; reopen; bad buffer; read 3 fails; reopen;
        // frame 1; bad buffer; frame 2 (the detector then sets the stop flag).
        assert_eq!(summary.source_errors, 5, "{:?}", calls.lock().unwrap());
        let records = fx.records();
        assert_eq!(records.len(), 8);
        let errors: Vec<&str> = records.iter().filter_map(|r| r.error.as_deref()).collect();
        assert_eq!(errors.len(), 5);
        assert_eq!(
            errors.iter().filter(|e| e.contains("bad frame")).count(),
            2,
            "{errors:?}"
        );
        assert!(
            errors.iter().all(|e| e.contains("/dev/video9")),
            "{errors:?}"
        );
        assert!(records.iter().all(|r| r.source == "camera:/dev/video9"));
        let frames: Vec<u64> = records
            .iter()
            .filter(|r| r.error.is_none())
            .map(|r| r.frame)
            .collect();
        assert_eq!(frames, [0, 1, 2]);
        // Every record was shown, and the back-off was waited for on the fake clock.
        assert_eq!(fx.pngs() as u64, summary.screens);
        assert!(summary.screens >= 8, "{summary:?}");
        assert!(clock.elapsed() >= Duration::from_millis(500 + 1000 + 500));
    }

    #[test]
    fn gpio_chip_and_config_errors_name_the_setting() {
        assert_eq!(gpio_chip_number(Path::new("/dev/gpiochip3")).unwrap(), 3);
        let e = format!(
            "{:#}",
            gpio_chip_number(Path::new("/dev/gpio")).unwrap_err()
        );
        assert!(e.contains("source.trigger.chip"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("no-models-here");
        let e = format!(
            "{:#}",
            load_cascade(&models, 1, &ModelTrust::Unsigned)
                .err()
                .unwrap()
        );
        assert!(
            e.contains("no-models-here") && e.contains("manifest.toml"),
            "{e}"
        );

        let config = |extra: &str| {
            BoardConfig::parse(&format!(
                "name = \"t\"\n[source]\nkind = \"synthetic\"\ncount = 1\n\
                 [display]\nkind = \"png\"\noutput_dir = \"{}\"\nwidth = 64\nheight = 48\n\
                 [inference]\nthreads = 1\nmodels = \"{}\"\noperating_point = \"1fp\"\n{extra}\
                 [records]\nlog = \"{}\"\n",
                dir.path().join("png").display(),
                models.display(),
                dir.path().join("r.log").display()
            ))
            .unwrap()
        };
        let e = format!(
            "{:#}",
            Station::from_board(&config(""), true).err().unwrap()
        );
        assert!(e.contains("no-models-here"), "{e}");
        // Nothing was written before the models were found missing.
        assert!(!dir.path().join("r.log").exists() && !dir.path().join("png").exists());
        // No key and no --allow-unsigned; a key file that is missing.
        for extra in ["", "public_key = \"missing.pub\"\n"] {
            let e = format!(
                "{:#}",
                Station::from_board(&config(extra), false).err().unwrap()
            );
            assert!(e.contains("inference.public_key"), "{e}");
            assert!(extra.is_empty() || e.contains("missing.pub"), "{e}");
            assert!(!extra.is_empty() || e.contains("--allow-unsigned"), "{e}");
        }
    }

    #[test]
    fn wrap_breaks_at_spaces_and_marks_the_cut() {
        assert_eq!(wrap("camera lost", 20, 3), ["camera lost"]);
        assert_eq!(
            wrap("skipping image: photos/b.png: not an image", 16, 3),
            ["skipping image:", "photos/b.png:", "not an image"]
        );
        assert_eq!(wrap("aaaaaaaaaa bb", 4, 3), ["aaaa", "aaaa", "a..."]);
        assert_eq!(wrap("one two three four", 9, 2), ["one two", "three..."]);
        assert!(wrap("", 10, 3).is_empty());
    }

    #[test]
    fn fit_cuts_and_keeps_ascii() {
        assert_eq!(fit("camera ok", 20), "camera ok");
        assert_eq!(fit("camera lost: no such device", 10), "camera...");
        assert_eq!(fit("µ", 5), "?");
    }
}
