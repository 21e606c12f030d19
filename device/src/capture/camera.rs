//! The camera as a frame source: trigger, capture, decode, and reconnection with
//! exponential back-off when the camera is unplugged or fails.
//!
//! The device I/O sits behind [`RawCapture`] so this logic is tested with
//! [`super::RecordedCapture`] (scripted failures) and a [`super::FakeClock`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::clock::{Clock, SystemClock};
use super::raw::{RawFrame, decode_raw};
use super::trigger::{Trigger, TriggerInput, Wait};
use super::{Frame, FrameEvent, FrameSource, SourceError, SourceState};

/// Camera device I/O: open, read one frame, close.
pub trait RawCapture: Send {
    /// Open the device and start streaming (closing first if already open).
    fn open(&mut self) -> Result<()>;
    /// One frame taken now (frames waiting from before the call are dropped).
    fn read(&mut self) -> Result<RawFrame>;
    /// Release the device; called after a read error, before reopening.
    fn close(&mut self);
    /// Device name for frames and messages, e.g. "/dev/video0".
    fn name(&self) -> String;
    /// One line with format details, for the log.
    fn describe(&self) -> String {
        self.name()
    }
}

/// Reconnection and waiting behaviour of a [`CameraSource`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CameraConfig {
    /// Wait after the first failure; doubled after each further consecutive failure.
    pub initial_backoff: Duration,
    /// The doubling stops here.
    pub max_backoff: Duration,
    /// Longest a `next_frame` call waits (for a trigger or a retry) before returning
    /// `Idle`, so the loop can refresh the screen and check for shutdown.
    pub wait_slice: Duration,
}

impl Default for CameraConfig {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            wait_slice: Duration::from_millis(500),
        }
    }
}

impl CameraConfig {
    /// Wait before the retry after `failures` consecutive failures (1 = the first).
    pub fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        self.initial_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProblemKind {
    Camera,
    Trigger,
}

#[derive(Debug, Clone)]
struct Problem {
    kind: ProblemKind,
    /// Root cause, short enough for the status bar.
    reason: String,
}

/// Frames from a camera on a trigger.
///
/// Per call of [`FrameSource::next_frame`]: if a retry is pending, wait for it (at most
/// one wait slice, else `Idle`); open the camera if closed; wait for the trigger (at
/// most one wait slice, else `Idle`); read and decode one frame. An open, read or
/// trigger error returns [`FrameEvent::Error`] and schedules the retry after the
/// back-off (`initial_backoff`, doubling per consecutive failure up to `max_backoff`,
/// reset by a delivered frame); a read error also closes the camera so the retry
/// reopens it. A frame that does not decode is an error event too, but the camera stays
/// open: USB cameras occasionally deliver a corrupt frame. Loss of the camera is noticed
/// at the next capture, not while waiting for a trigger.
pub struct CameraSource {
    capture: Box<dyn RawCapture>,
    trigger: TriggerInput,
    config: CameraConfig,
    clock: Arc<dyn Clock>,
    is_open: bool,
    ever_opened: bool,
    exhausted: bool,
    failures: u32,
    retry_at: Option<Instant>,
    problem: Option<Problem>,
    next_id: u64,
}

impl CameraSource {
    /// A camera source on the real clock.
    pub fn new(
        capture: impl RawCapture + 'static,
        trigger: &Trigger,
        config: CameraConfig,
    ) -> Self {
        Self::with_parts(
            Box::new(capture),
            TriggerInput::new(trigger),
            config,
            Arc::new(SystemClock),
        )
    }

    /// Everything injectable: any trigger input (e.g. a channel) and clock (tests).
    pub fn with_parts(
        capture: Box<dyn RawCapture>,
        trigger: TriggerInput,
        config: CameraConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            capture,
            trigger,
            config,
            clock,
            is_open: false,
            ever_opened: false,
            exhausted: false,
            failures: 0,
            retry_at: None,
            problem: None,
            next_id: 0,
        }
    }

    /// Record a failure, schedule the retry, and describe it for the log.
    fn fail(&mut self, kind: ProblemKind, what: &str, err: anyhow::Error) -> FrameEvent {
        self.failures = self.failures.saturating_add(1);
        let delay = self.config.backoff(self.failures);
        self.retry_at = Some(self.clock.now() + delay);
        self.problem = Some(Problem {
            kind,
            reason: ma_core::image_io::one_line(&err.root_cause().to_string()),
        });
        FrameEvent::Error(SourceError {
            origin: self.origin(),
            message: format!(
                "camera {}: {what}: {}; retry in {:.1} s",
                self.capture.name(),
                ma_core::image_io::one_line(&format!("{err:#}")),
                delay.as_secs_f64()
            ),
        })
    }

    /// How records name this camera's frames and failures.
    fn origin(&self) -> String {
        format!("camera:{}", self.capture.name())
    }
}

impl FrameSource for CameraSource {
    fn next_frame(&mut self) -> FrameEvent {
        if self.exhausted {
            return FrameEvent::Exhausted;
        }
        let slice = self.config.wait_slice;
        if let Some(at) = self.retry_at {
            let now = self.clock.now();
            if now < at {
                self.clock.sleep((at - now).min(slice));
                if self.clock.now() < at {
                    return FrameEvent::Idle;
                }
            }
            self.retry_at = None;
        }

        if !self.is_open {
            if let Err(e) = self.capture.open() {
                return self.fail(ProblemKind::Camera, "cannot open", e);
            }
            self.is_open = true;
            if self.ever_opened {
                // Presses or ticks from while the camera was away are stale.
                self.trigger.reset();
            }
            self.ever_opened = true;
            if matches!(&self.problem, Some(p) if p.kind == ProblemKind::Camera) {
                self.problem = None;
            }
        }

        match self.trigger.wait(slice, self.clock.as_ref()) {
            Ok(wait) => {
                if matches!(&self.problem, Some(p) if p.kind == ProblemKind::Trigger) {
                    self.problem = None;
                    self.failures = 0;
                }
                match wait {
                    Wait::Fired => {}
                    Wait::NotYet => return FrameEvent::Idle,
                    Wait::Closed => {
                        self.exhausted = true;
                        self.capture.close();
                        self.is_open = false;
                        return FrameEvent::Exhausted;
                    }
                }
            }
            Err(e) => {
                let what = format!("trigger ({}) failed", self.trigger.describe());
                return self.fail(ProblemKind::Trigger, &what, e);
            }
        }

        let raw = match self.capture.read() {
            Ok(raw) => raw,
            Err(e) => {
                self.capture.close();
                self.is_open = false;
                return self.fail(ProblemKind::Camera, "cannot read a frame", e);
            }
        };
        let captured_at = self.clock.wall();
        match decode_raw(&raw) {
            Ok(image) => {
                self.failures = 0;
                self.problem = None;
                let id = self.next_id;
                self.next_id += 1;
                FrameEvent::Frame(Frame {
                    id,
                    source: self.origin(),
                    file: None,
                    image,
                    captured_at,
                })
            }
            Err(e) => FrameEvent::Error(SourceError {
                origin: self.origin(),
                message: format!(
                    "camera {}: bad frame skipped: {}",
                    self.capture.name(),
                    ma_core::image_io::one_line(&format!("{e:#}"))
                ),
            }),
        }
    }

    fn state(&self) -> SourceState {
        if self.exhausted {
            return SourceState::Finished {
                delivered: self.next_id,
            };
        }
        match &self.problem {
            Some(p) => {
                let retry_in = self
                    .retry_at
                    .map(|at| at.saturating_duration_since(self.clock.now()))
                    .unwrap_or_default();
                let reason = p.reason.clone();
                match p.kind {
                    ProblemKind::Camera => SourceState::CameraLost { reason, retry_in },
                    ProblemKind::Trigger => SourceState::TriggerFailed { reason, retry_in },
                }
            }
            None if self.ever_opened => SourceState::CameraOk,
            None => SourceState::CameraStarting,
        }
    }

    fn describe(&self) -> String {
        format!(
            "camera {}, trigger: {}",
            self.capture.describe(),
            self.trigger.describe()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let c = CameraConfig::default();
        let ms = |n: u32| c.backoff(n).as_millis();
        assert_eq!(
            (1..=7).map(ms).collect::<Vec<_>>(),
            [500, 1000, 2000, 4000, 8000, 8000, 8000]
        );
        assert_eq!(c.backoff(u32::MAX), Duration::from_secs(8));
    }
}
