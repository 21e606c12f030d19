//! The device loop (`ma-device run`): frame source -> cascade -> records log -> panel,
//! until the source is exhausted or a stop is requested (SIGINT/SIGTERM).
//!
//! Per frame, in this order:
//! 1. the cascade runs on the decoded frame (a frame it cannot process is a failed frame,
//!    not a crash);
//! 2. one [`Record`] is appended to the records log and synced to disk
//!    ([`RecordLog::append`]): time, frame number, source name, SHA-256 of the image,
//!    every candidate, MA count and referral at the board's operating point, the referral
//!    network's score and attention boxes (model sets with one), model version, board
//!    name, processing time;
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
//! [`Station::from_board`] (in [`crate::station`]) builds them from a board config;
//! [`Station::run`] returns a [`RunSummary`]. What the panel shows is composed in
//! [`crate::display::screen`]. Frames and source errors name their origin themselves
//! ([`Frame::source`], [`SourceError::origin`]), so the loop treats every source alike.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use image::RgbImage;
use ma_core::image_io::one_line;

use crate::archive::{FrameArchive, FrameContent};
use crate::board::OperatingPoint;
use crate::capture::{Frame, FrameEvent, FrameSource, SourceError, SourceState};
use crate::cascade::{Cascade, ImageResult};
use crate::controls::Toggle;
use crate::display::Panel;
use crate::display::overlay::OverlayInfo;
use crate::display::screen::{Screen, Shown};
use crate::errln;
use crate::records::{ImageHash, Record, RecordLog, now_unix_ms};

/// What the loop needs from the cascade; a trait so the loop is tested without models.
pub trait Detector {
    /// Every candidate with its score, in original image coordinates, best first.
    fn detect(&self, image: &RgbImage) -> Result<ImageResult>;
    /// Stored in every record and shown on the status bar.
    fn model_version(&self) -> String;
    /// Whether the eye is referred: by default when at least one MA scores
    /// `ma_threshold` (the board's operating point).
    fn refers(&self, result: &ImageResult, ma_threshold: f64) -> bool {
        result.ma_count(ma_threshold) > 0
    }
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

    /// With a referral network, the manifest's refer rule (referral score and MA
    /// counts at the rule's own operating point, chosen on cross-validation); without
    /// one, at least one MA at the board's operating point.
    fn refers(&self, result: &ImageResult, ma_threshold: f64) -> bool {
        match (self.referral_config(), &result.referral) {
            (Some(cfg), Some(r)) => cfg.rule.refers(r.score, |op| {
                result.ma_count(self.manifest.operating_points.threshold(op))
            }),
            _ => result.ma_count(ma_threshold) > 0,
        }
    }
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
    pub detector: Box<dyn Detector>,
    pub panel: Box<dyn Panel>,
    pub display: DisplayTarget,
    pub log: RecordLog,
    /// Board name, stored in every record.
    pub board: String,
    pub operating_point: OperatingPoint,
    /// Score at or above which a candidate counts as an MA (from the manifest).
    pub threshold: f64,
    /// Whether results start with the referral heatmap blended in (`controls.heatmap`).
    pub heatmap: bool,
    /// The key or button that turns the heatmap overlay on and off, looked at between
    /// frames and on idle ticks (`controls.heatmap_toggle`).
    pub heatmap_toggle: Option<Toggle>,
    /// Where every decoded frame is kept before its record is written
    /// (`records.frames`); `None`: frames are not kept.
    pub archive: Option<FrameArchive>,
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
    /// Frames kept in the archive, frames that could not be kept, and old frames deleted
    /// to stay within its budget.
    pub frames_kept: u64,
    pub frames_not_kept: u64,
    pub frames_evicted: u64,
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
        if self.frames_kept + self.frames_not_kept > 0 {
            write!(f, "frames archive: {} kept", self.frames_kept)?;
            if self.frames_not_kept > 0 {
                write!(f, ", {} NOT KEPT", self.frames_not_kept)?;
            }
            if self.frames_evicted > 0 {
                write!(f, ", {} old frames deleted (budget)", self.frames_evicted)?;
            }
            writeln!(f)?;
        }
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
    /// Runs until the source is exhausted or `stop` is set (checked between frames).
    pub fn run(&mut self, stop: &AtomicBool) -> RunSummary {
        let mut summary = RunSummary {
            log: self.log.path().to_path_buf(),
            display: self.display.to_string(),
            ..RunSummary::default()
        };
        let model_version = self.detector.model_version();
        let mut screen = View {
            screen: Screen::new(self.panel.size(), self.threshold),
            state_key: None,
        };
        screen.screen.heatmap = self.heatmap;
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
        errln!(
            "heatmap overlay {}{}",
            on_off(self.heatmap),
            match &self.heatmap_toggle {
                Some(t) => format!("; {} turns it on and off", t.describe()),
                None => String::new(),
            }
        );
        loop {
            if stop.load(Ordering::SeqCst) {
                summary.stopped = true;
                break;
            }
            self.poll_heatmap_toggle(&mut screen, &mut summary);
            match self.source.next_frame() {
                FrameEvent::Frame(frame) => {
                    self.process(frame, &model_version, &mut screen, &mut summary)
                }
                FrameEvent::Error(error) => {
                    self.source_error(&error, &model_version, &mut screen, &mut summary)
                }
                FrameEvent::Idle => {
                    // Redraw only when the source's condition changes (camera back, lost,
                    // ...), not on every idle tick: a PNG panel would fill the disk.
                    let state = self.source.state();
                    if screen.state_key != Some(state_key(&state)) {
                        let text = state.to_string();
                        screen.screen.render(&text, state.is_ok(), None);
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
        screen: &mut View,
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
        let name = frame.source.clone();
        let mut record = Record {
            time_unix_ms: unix_ms(frame.captured_at),
            frame: frame.id,
            source: name.clone(),
            image_sha256: frame
                .file
                .as_ref()
                .map(|f| ImageHash(f.sha256))
                .unwrap_or_else(|| pixel_hash(&frame.image)),
            width: frame.image.width(),
            height: frame.image.height(),
            detections: Vec::new(),
            refer: false,
            ma_count: 0,
            model_version: model_version.to_string(),
            board: self.board.clone(),
            elapsed_ms: elapsed_ms as f32,
            error: None,
            refer_score: None,
            attention_boxes: Vec::new(),
            frame_file: None,
        };
        let detections = match &outcome {
            Ok(result) => {
                let count = result.ma_count(self.threshold);
                record.detections = result.detections.iter().map(|&d| d.into()).collect();
                record.ma_count = u32::try_from(count).unwrap_or(u32::MAX);
                record.refer = self.detector.refers(result, self.threshold);
                if let Some(referral) = &result.referral {
                    record.refer_score = Some(referral.score);
                    record.attention_boxes = referral.boxes.iter().map(|&b| b.into()).collect();
                }
                summary.processed += 1;
                summary.referred += u64::from(record.refer);
                Some((
                    result.detections.clone(),
                    result.referral.clone().map(Box::new),
                ))
            }
            Err(e) => {
                record.error = Some(one_line(&format!("{e:#}")));
                summary.failed_frames += 1;
                None
            }
        };
        // The frame is on disk before the record that names it.
        let kept = self.keep_frame(&frame, &record.image_sha256, summary);
        if let Some(Ok(k)) = &kept {
            record.frame_file = Some(k.file.clone());
        }
        let saved = self.append(&record, summary);
        let state = self.source.state();
        let mut saved_text = match &saved {
            Ok(index) => format!("saved #{index}"),
            Err(_) => "NOT SAVED".to_string(),
        };
        match &kept {
            Some(Err(_)) => saved_text.push_str(", frame NOT KEPT"),
            Some(Ok(KeptFrame {
                evicted_note: Some(note),
                ..
            })) => saved_text.push_str(&format!(", {note}")),
            _ => {}
        }
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
        let ok = saved.is_ok() && state.is_ok() && !matches!(kept, Some(Err(_)));
        let status = format!("{saved_text}, {state}");
        screen.screen.shown = match detections {
            Some((detections, referral)) => Shown::Result {
                info: OverlayInfo {
                    detections,
                    threshold: self.threshold,
                    ma_count: record.ma_count as usize,
                    refer: record.refer,
                    refer_score: referral.as_ref().map(|r| r.score),
                    latency_ms: elapsed_ms,
                    frame_number: frame.id,
                    source_state: String::new(),
                    source_ok: true,
                    model_version: Some(model_version.to_string()),
                },
                image: frame.image,
                referral,
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
        let banner = match (saved, kept) {
            (Err(e), _) => Some(format!("result NOT SAVED: {}", one_line(&format!("{e:#}")))),
            (Ok(_), Some(Err(e))) => {
                Some(format!("frame NOT KEPT: {}", one_line(&format!("{e:#}"))))
            }
            _ => None,
        };
        screen.screen.render(&status, ok, banner.as_deref());
        self.present(screen, &state, summary);
    }

    fn source_error(
        &mut self,
        error: &SourceError,
        model_version: &str,
        screen: &mut View,
        summary: &mut RunSummary,
    ) {
        summary.source_errors += 1;
        let message = one_line(&error.message);
        let state = self.source.state();
        let record = Record {
            time_unix_ms: now_unix_ms(),
            frame: 0,
            source: error.origin.clone(),
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
            refer_score: None,
            attention_boxes: Vec::new(),
            frame_file: None,
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
        screen.screen.render(&status, false, Some(&message));
        self.present(screen, &state, summary);
    }

    /// Keeps the frame in the archive (if the board has one): `Some(Ok(..))` once
    /// it is on disk, `Some(Err)` if it could not be kept (printed and counted, never
    /// fatal: the record is still written, without a frame file). Old frames deleted for
    /// the budget are printed, and noted for the status bar.
    fn keep_frame(
        &mut self,
        frame: &Frame,
        hash: &ImageHash,
        summary: &mut RunSummary,
    ) -> Option<Result<KeptFrame>> {
        let archive = self.archive.as_mut()?;
        let content = match &frame.file {
            Some(file) => FrameContent::File {
                bytes: &file.bytes,
                extension: &file.extension,
            },
            None => FrameContent::Pixels(&frame.image),
        };
        Some(match archive.keep(hash, content) {
            Ok(kept) => {
                summary.frames_kept += 1;
                if !kept.evicted.is_empty() {
                    summary.frames_evicted += kept.evicted.len() as u64;
                    let note = format!(
                        "{} oldest frame{} deleted",
                        kept.evicted.len(),
                        if kept.evicted.len() == 1 { "" } else { "s" }
                    );
                    errln!(
                        "frames archive {}: {note} to stay within the budget of {:.1} MiB \
                         ({}; their records keep the hashes)",
                        archive.dir().display(),
                        archive.budget_bytes() as f64 / f64::from(1 << 20),
                        kept.evicted.join(", ")
                    );
                    return Some(Ok(KeptFrame {
                        file: kept.file,
                        evicted_note: Some(note),
                    }));
                }
                Ok(KeptFrame {
                    file: kept.file,
                    evicted_note: None,
                })
            }
            Err(e) => {
                summary.frames_not_kept += 1;
                errln!("error: {e:#}");
                Err(e)
            }
        })
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

    /// Flips the heatmap overlay once per press since the last look and redraws the panel
    /// at once if it changed; errors reading the toggle are printed, never fatal.
    fn poll_heatmap_toggle(&mut self, screen: &mut View, summary: &mut RunSummary) {
        let Some(toggle) = &self.heatmap_toggle else {
            return;
        };
        let presses = toggle.take();
        for e in &presses.errors {
            errln!("warning: heatmap toggle ({}): {e}", toggle.describe());
        }
        if presses.count % 2 == 0 {
            return;
        }
        screen.screen.heatmap = !screen.screen.heatmap;
        errln!(
            "heatmap overlay {}{}",
            on_off(screen.screen.heatmap),
            if screen.screen.heatmap && !screen.screen.has_heatmap() {
                " (the result shown has no referral heatmap: it shows with the next result \
                 of a model set with a referral network)"
            } else {
                ""
            }
        );
        screen.screen.rerender();
        let state = self.source.state();
        self.present(screen, &state, summary);
    }

    fn present(&mut self, screen: &mut View, state: &SourceState, summary: &mut RunSummary) {
        screen.state_key = Some(state_key(state));
        match self.panel.present(&screen.screen.canvas) {
            Ok(()) => summary.screens += 1,
            Err(e) => {
                summary.screen_failures += 1;
                errln!("error: cannot show the result: {e:#}");
            }
        }
    }
}

/// A frame kept in the archive: its file name, and what was deleted to make room.
struct KeptFrame {
    file: String,
    /// "N oldest frames deleted", for the status bar.
    evicted_note: Option<String>,
}

fn on_off(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}

/// The [`Record::image_sha256`] of a frame known only by its pixels: SHA-256 of the RGB8
/// buffer (rows top to bottom, 3 bytes per pixel, no header).
pub fn pixel_hash(image: &RgbImage) -> ImageHash {
    ImageHash::of(image.as_raw())
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

/// The loop's screen and the source condition it was last presented with.
struct View {
    screen: Screen,
    state_key: Option<(std::mem::Discriminant<SourceState>, bool)>,
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use std::path::PathBuf;
    use std::time::Duration;

    use anyhow::bail;
    use ma_synthetic::SyntheticParams;

    use super::*;
    use crate::capture::clock::FakeClock;
    use crate::capture::recorded::RecordedCapture;
    use crate::capture::trigger::TriggerInput;
    use crate::capture::{self, CameraConfig, CameraSource, FolderSource, SyntheticSource};
    use crate::capture::{PixelFormat, RawFrame};
    use crate::cascade::Timings;
    use crate::display::PngSink;
    use crate::records::read_all;
    use ma_core::detection::Detection;

    /// Two detections per frame (one above 0.5, one below); fails on frames whose top-left
    /// pixel is pure red; sets `stop` after `stop_after` frames when given.
    struct FakeDetector {
        calls: Rc<Cell<u64>>,
        stop_after: Option<(u64, Arc<AtomicBool>)>,
        /// Answer with a referral (score 0.75, attention hot on the left half).
        referral: bool,
        /// Press this heatmap toggle during the given call.
        press_on_call: Option<(u64, crate::controls::Presser)>,
    }

    impl FakeDetector {
        fn new() -> Self {
            Self {
                calls: Rc::new(Cell::new(0)),
                stop_after: None,
                referral: false,
                press_on_call: None,
            }
        }

        fn referring() -> Self {
            Self {
                referral: true,
                ..Self::new()
            }
        }
    }

    fn fake_referral(image: &RgbImage) -> crate::cascade::Referral {
        let side = image.width().max(image.height()) as usize;
        let view = ma_core::referral::ReferralView {
            planes: ma_core::geometry::Planes::zeros(side, side),
            origin: (0.0, 0.0),
            step: 1.0,
            scale: ma_core::geometry::ScaleMap::IDENTITY,
        };
        let attention = vec![1.0, 0.0, 0.9, 0.0];
        crate::cascade::Referral {
            score: 0.75,
            boxes: view.top_boxes(&attention, 2, 2),
            attention,
            attention_side: 2,
            view,
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
            if let Some((n, presser)) = &self.press_on_call
                && self.calls.get() == *n
            {
                presser.press();
            }
            let d = |x: f64, score: f64| Detection { x, y: 20.0, score };
            Ok(ImageResult {
                width: image.width(),
                height: image.height(),
                detections: vec![d(10.0, 0.9), d(30.0, 0.2)],
                candidates: 2,
                referral: self.referral.then(|| fake_referral(image)),
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

        fn station(&self, source: Box<dyn FrameSource>, detector: FakeDetector) -> Station {
            let (log, _) = RecordLog::open(&self.log_path).unwrap();
            Station {
                source,
                detector: Box::new(detector),
                panel: Box::new(PngSink::new(&self.png_dir, 320, 240).unwrap()),
                display: DisplayTarget::PngFolder(self.png_dir.clone()),
                log,
                board: "test-board".into(),
                operating_point: OperatingPoint::Fp2,
                threshold: 0.5,
                heatmap: false,
                heatmap_toggle: None,
                archive: None,
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

    /// 96x80 frames with one MA each, seeds from 7.
    fn small_params() -> SyntheticParams {
        SyntheticParams {
            width: 96,
            height: 80,
            fov_diameter: 90.0,
            n_microaneurysms: 1,
            n_lookalikes: 0,
            ..SyntheticParams::default()
        }
    }

    fn small_synthetic(count: u64) -> Box<dyn FrameSource> {
        Box::new(SyntheticSource::new(small_params(), 7, count))
    }

    #[test]
    fn synthetic_frames_are_recorded_then_shown() {
        let fx = Fixture::new();
        let mut station = fx.station(small_synthetic(3), FakeDetector::new());
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
            let image = ma_synthetic::generate(&small_params(), 7 + i as u64).image;
            assert_eq!(r.image_sha256, pixel_hash(&image));
        }
        let text = summary.to_string();
        assert!(
            text.contains("records.log") && text.contains("screens"),
            "{text}"
        );
    }

    /// The picture part (above the status bar, whose latency varies) of the screens a run
    /// wrote, in order.
    fn screens_of(fx: &Fixture) -> Vec<RgbImage> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&fx.png_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
            .iter()
            .map(|f| {
                let screen = image::open(f).unwrap().to_rgb8();
                let panel = embedded_graphics::primitives::Rectangle::new(
                    embedded_graphics::prelude::Point::zero(),
                    embedded_graphics::prelude::Size::new(screen.width(), screen.height()),
                );
                let area = crate::display::overlay::Layout::new(panel, (0, 0)).image_area;
                image::imageops::crop_imm(&screen, 0, 0, area.size.width, area.size.height)
                    .to_image()
            })
            .collect()
    }

    #[test]
    fn referral_is_recorded_and_the_heatmap_overlay_toggles() {
        let run = |heatmap: bool, toggle: Option<Toggle>, detector: FakeDetector| {
            let fx = Fixture::new();
            let mut station = fx.station(small_synthetic(2), detector);
            station.heatmap = heatmap;
            station.heatmap_toggle = toggle;
            station.run(&AtomicBool::new(false));
            (screens_of(&fx), fx.records())
        };
        let (plain, records) = run(false, None, FakeDetector::referring());
        assert_eq!(plain.len(), 2);
        // Records keep the score and the boxes behind it.
        for r in &records {
            assert_eq!(r.refer_score, Some(0.75));
            assert_eq!(r.attention_boxes.len(), 2);
            assert!(r.attention_boxes[0].weight > r.attention_boxes[1].weight);
        }
        let (heat, _) = run(true, None, FakeDetector::referring());
        assert_eq!(heat.len(), 2);
        assert_ne!(plain[0], heat[0], "the overlay changes the picture");
        // Without a referral answer the overlay has nothing to show.
        let (no_referral_plain, _) = run(false, None, FakeDetector::new());
        let (no_referral_heat, records) = run(true, None, FakeDetector::new());
        assert_eq!(no_referral_plain, no_referral_heat);
        assert!(records.iter().all(|r| r.refer_score.is_none()));

        // One press before the start: on from the first result (the empty screen is
        // redrawn at once).
        let (presser, toggle) = Toggle::manual("test button");
        presser.press();
        let (pressed, _) = run(false, Some(toggle), FakeDetector::referring());
        assert_eq!(pressed.len(), 3);
        assert_eq!(pressed[1..], heat[..]);
        // Two presses cancel out: no redraw.
        let (presser, toggle) = Toggle::manual("test button");
        presser.press();
        presser.press();
        let (twice, _) = run(false, Some(toggle), FakeDetector::referring());
        assert_eq!(twice, plain);
        // A press while the second frame is analysed: that result is shown plain, then
        // redrawn with the heatmap before anything else happens.
        let (presser, toggle) = Toggle::manual("test button");
        let mut detector = FakeDetector::referring();
        detector.press_on_call = Some((2, presser));
        let (mid, _) = run(false, Some(toggle), detector);
        assert_eq!(mid.len(), 3);
        assert_eq!(mid[..2], plain[..]);
        assert_eq!(mid[2], heat[1]);
    }

    #[test]
    fn stop_flag_finishes_the_current_frame_and_stops() {
        let fx = Fixture::new();
        // Set before the start: nothing is read.
        let mut station = fx.station(small_synthetic(5), FakeDetector::new());
        let summary = station.run(&AtomicBool::new(true));
        assert!(summary.stopped);
        assert_eq!(summary.frames, 0);
        drop(station);
        // Set during the second frame's detection: that frame is recorded and shown.
        let stop = Arc::new(AtomicBool::new(false));
        let mut detector = FakeDetector::new();
        detector.stop_after = Some((2, Arc::clone(&stop)));
        let mut station = fx.station(small_synthetic(5), detector);
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
        let mut station = fx.station(Box::new(source), FakeDetector::new());
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

    /// With a frames archive: every decoded frame (processed or failed) is on disk under
    /// the hash its record carries before the record is written; a source error keeps
    /// none; the budget evicts the oldest and the status bar and summary say so.
    #[test]
    fn every_decoded_frame_is_kept_before_its_record() {
        let fx = Fixture::new();
        let photos = tempfile::tempdir().unwrap();
        let good = RgbImage::from_pixel(300, 280, image::Rgb([20, 90, 40]));
        good.save(photos.path().join("a.png")).unwrap();
        std::fs::write(photos.path().join("b.png"), b"not a png").unwrap();
        RgbImage::from_pixel(300, 280, image::Rgb([255, 0, 0]))
            .save(photos.path().join("c.png"))
            .unwrap();
        let frames = fx._dir.path().join("frames");
        let (archive, _) = FrameArchive::open(&frames, 1 << 20).unwrap();
        let source = FolderSource::new(photos.path(), false).unwrap();
        let mut station = fx.station(Box::new(source), FakeDetector::new());
        station.archive = Some(archive);
        let summary = station.run(&AtomicBool::new(false));
        assert_eq!((summary.frames_kept, summary.frames_not_kept), (2, 0));
        let records = fx.records();
        assert_eq!(records.len(), 3);
        for r in [&records[0], &records[2]] {
            let file = r.frame_file.as_deref().expect("kept");
            assert_eq!(file, format!("{}.png", r.image_sha256));
            let bytes = std::fs::read(frames.join(file)).unwrap();
            assert_eq!(
                ImageHash::of(&bytes),
                r.image_sha256,
                "the original file's bytes"
            );
        }
        assert_eq!(records[1].frame_file, None, "a source error has no frame");
        assert!(
            summary.to_string().contains("frames archive: 2 kept"),
            "{summary}"
        );

        // Synthetic frames (PNG of the pixels) into a budget of about one frame: each new
        // frame evicts the one before.
        let fx = Fixture::new();
        let frames = fx._dir.path().join("frames");
        let one = crate::archive::encode_png(&ma_synthetic::generate(&small_params(), 7).image)
            .unwrap()
            .len() as u64;
        let (archive, _) = FrameArchive::open(&frames, one + one / 2).unwrap();
        let mut station = fx.station(small_synthetic(3), FakeDetector::new());
        station.archive = Some(archive);
        let summary = station.run(&AtomicBool::new(false));
        assert_eq!((summary.frames_kept, summary.frames_evicted), (3, 2));
        let records = fx.records();
        let last = records[2].frame_file.as_deref().unwrap();
        let back = image::open(frames.join(last)).unwrap().to_rgb8();
        assert_eq!(pixel_hash(&back), records[2].image_sha256);
        assert!(
            !frames
                .join(records[0].frame_file.as_deref().unwrap())
                .exists()
        );
        assert!(
            records.iter().all(|r| r.frame_file.is_some()),
            "the hash stays"
        );
        assert!(
            summary.to_string().contains("2 old frames deleted"),
            "{summary}"
        );
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
        let mut station = fx.station(Box::new(source), detector);
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
}
