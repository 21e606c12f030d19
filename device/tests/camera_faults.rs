//! Camera faults: the camera source's retry logic ([`CameraSource`]) against the real
//! V4L2 capture code of a device node that is missing or is not a camera, a camera that
//! is unplugged and plugged back in, and random fault schedules.
//!
//! CI has no camera and cannot load vivid or v4l2loopback, so a present camera is
//! replayed from buffers ([`RecordedCapture`]); an absent one is the real
//! [`V4l2Capture`] failing to open a device node, so its errors are the real ones. Time is
//! a [`FakeClock`]: back-offs of seconds take no time.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use ma_device::capture::camera::{CameraConfig, CameraSource, RawCapture};
use ma_device::capture::trigger::TriggerInput;
use ma_device::capture::{
    FakeClock, FrameEvent, FrameSource, PixelFormat, RawFrame, RecordedCapture, SourceError,
    SourceState, Trigger, V4l2Capture, V4l2Config,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A 64x48 grey YUYV buffer.
fn grey_frame() -> RawFrame {
    RawFrame {
        format: PixelFormat::Yuyv,
        width: 64,
        height: 48,
        stride: 0,
        bytes: vec![128; 64 * 48 * 2],
    }
}

/// A buffer too short for its size: a corrupt frame from a working camera.
fn short_frame() -> RawFrame {
    let mut f = grey_frame();
    f.bytes.truncate(1000);
    f
}

fn continuous() -> TriggerInput {
    TriggerInput::new(&Trigger::Interval(Duration::ZERO))
}

fn real_v4l2(device: &Path) -> V4l2Capture {
    let mut config = V4l2Config::new(device, PixelFormat::Yuyv, 640, 480);
    config.timeout = Duration::from_secs(2);
    V4l2Capture::new(config)
}

fn source(capture: impl RawCapture + 'static, clock: &FakeClock) -> CameraSource {
    CameraSource::with_parts(
        Box::new(capture),
        continuous(),
        CameraConfig::default(),
        Arc::new(clock.clone()),
    )
}

fn retry_in(state: &SourceState) -> Duration {
    match state {
        SourceState::CameraLost { retry_in, .. } => *retry_in,
        other => panic!("not a lost camera: {other}"),
    }
}

/// Calls `next_frame` until it returns an error or a frame (idle ticks in between must
/// each have waited on the clock); `None` if `max_calls` pass without either.
fn next_event(cam: &mut CameraSource, clock: &FakeClock, max_calls: usize) -> Option<FrameEvent> {
    for _ in 0..max_calls {
        let before = clock.elapsed();
        match cam.next_frame() {
            FrameEvent::Idle => assert!(clock.elapsed() > before, "idle without waiting"),
            FrameEvent::Exhausted => panic!("a camera source is never exhausted"),
            event => return Some(event),
        }
    }
    None
}

#[test]
fn missing_or_foreign_device_node_is_retried_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("video0");
    let clock = FakeClock::new();
    let mut cam = source(real_v4l2(&node), &clock);
    let mut delays = Vec::new();
    // No node at all.
    for _ in 0..6 {
        let Some(FrameEvent::Error(SourceError { message, .. })) = next_event(&mut cam, &clock, 50)
        else {
            panic!("expected an error");
        };
        assert!(
            message.contains(&node.display().to_string()) && message.contains("cannot open"),
            "{message}"
        );
        let state = cam.state();
        assert!(
            state.to_string().contains("No such file or directory"),
            "{state}"
        );
        delays.push(retry_in(&state).as_millis());
    }
    assert_eq!(delays, [500, 1000, 2000, 4000, 8000, 8000]);

    // The node comes back as something that is not a camera: a regular file, then
    // /dev/null. Still an error naming it, still retried at the capped back-off.
    std::fs::write(&node, b"not a camera").unwrap();
    let Some(FrameEvent::Error(SourceError { message, .. })) = next_event(&mut cam, &clock, 50)
    else {
        panic!("expected an error");
    };
    println!("regular file as the camera: {message}");
    assert!(message.contains("Inappropriate ioctl"), "{message}");
    assert_eq!(retry_in(&cam.state()), Duration::from_secs(8));
    std::fs::remove_file(&node).unwrap();
    std::os::unix::fs::symlink("/dev/null", &node).unwrap();
    let Some(FrameEvent::Error(SourceError { message, .. })) = next_event(&mut cam, &clock, 50)
    else {
        panic!("expected an error");
    };
    println!("/dev/null as the camera: {message}");
    assert!(message.contains(&node.display().to_string()), "{message}");
    assert!(!cam.state().is_ok());
}

/// Switches between a present camera (recorded buffers) and an absent one (the real V4L2
/// capture of a node that does not exist) as the test plugs and unplugs it.
struct Hotplug {
    plugged: Arc<AtomicBool>,
    present: RecordedCapture,
    absent: V4l2Capture,
    name: PathBuf,
}

impl RawCapture for Hotplug {
    fn open(&mut self) -> Result<()> {
        if self.plugged.load(Ordering::SeqCst) {
            self.present.open()
        } else {
            self.absent.open()
        }
    }

    fn read(&mut self) -> Result<RawFrame> {
        if !self.plugged.load(Ordering::SeqCst) {
            // What a streaming UVC camera returns when its cable is pulled.
            return Err(io::Error::from_raw_os_error(libc::ENODEV))
                .with_context(|| format!("cannot dequeue a frame from {}", self.name.display()));
        }
        self.present.read()
    }

    fn close(&mut self) {
        self.present.close();
        self.absent.close();
    }

    fn name(&self) -> String {
        self.name.display().to_string()
    }
}

#[test]
fn unplugged_camera_comes_back_within_the_longest_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let name = dir.path().join("video0");
    let plugged = Arc::new(AtomicBool::new(true));
    let clock = FakeClock::new();
    let hotplug = Hotplug {
        plugged: Arc::clone(&plugged),
        present: RecordedCapture::new(name.display().to_string(), vec![grey_frame()]),
        absent: real_v4l2(&name),
        name: name.clone(),
    };
    let config = CameraConfig::default();
    let mut cam = source(hotplug, &clock);
    let mut next_id = 0;
    for (cycle, outage_s) in [1u64, 5, 30, 0].into_iter().enumerate() {
        // Frames flow while plugged in.
        for _ in 0..3 {
            match next_event(&mut cam, &clock, 50) {
                Some(FrameEvent::Frame(f)) => {
                    assert_eq!(f.id, next_id, "cycle {cycle}");
                    next_id += 1;
                }
                other => panic!("cycle {cycle}: {other:?}"),
            }
            assert_eq!(cam.state(), SourceState::CameraOk);
        }
        // Pulled: the next read fails, reopening fails (no device node) until it is back.
        plugged.store(false, Ordering::SeqCst);
        let unplugged_at = clock.elapsed();
        let Some(FrameEvent::Error(SourceError { message: first, .. })) =
            next_event(&mut cam, &clock, 50)
        else {
            panic!("cycle {cycle}: no error after unplugging");
        };
        assert!(first.contains("cannot read a frame"), "{first}");
        // The back-off starts again from the beginning after the frames.
        assert_eq!(retry_in(&cam.state()), config.initial_backoff);
        let mut failed_opens = 0;
        while clock.elapsed() - unplugged_at < Duration::from_secs(outage_s) {
            match next_event(&mut cam, &clock, 50) {
                Some(FrameEvent::Error(SourceError { message: m, .. })) => {
                    assert!(m.contains("No such file or directory"), "{m}");
                    failed_opens += 1;
                }
                other => panic!("cycle {cycle}: {other:?} while unplugged"),
            }
        }
        plugged.store(true, Ordering::SeqCst);
        let replugged_at = clock.elapsed();
        match next_event(&mut cam, &clock, 100) {
            Some(FrameEvent::Frame(f)) => {
                assert_eq!(f.id, next_id);
                next_id += 1;
            }
            other => panic!("cycle {cycle}: {other:?} after plugging back in"),
        }
        let latency = clock.elapsed() - replugged_at;
        println!(
            "outage {outage_s} s: {failed_opens} failed reopens, first frame {:.1} s after \
             plugging back in",
            latency.as_secs_f64()
        );
        assert!(latency <= config.max_backoff, "{latency:?}");
        assert_eq!(cam.state(), SourceState::CameraOk);
    }
}

#[test]
fn random_fault_schedules_always_recover() {
    let config = CameraConfig::default();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (mut errors_seen, mut frames_seen) = (0, 0);
    for schedule in 0..200 {
        let frames: Vec<RawFrame> = (0..rng.random_range(1..6))
            .map(|_| {
                if rng.random_ratio(1, 5) {
                    short_frame()
                } else {
                    grey_frame()
                }
            })
            .collect();
        let good_frames = frames.iter().filter(|f| f.bytes.len() > 1000).count();
        let mut capture = RecordedCapture::new("/dev/video7", frames);
        let mut last_fault = 0;
        for _ in 0..rng.random_range(0..4) {
            let start = rng.random_range(0..30);
            let end = start + rng.random_range(1..12);
            last_fault = last_fault.max(end);
            capture = if rng.random_bool(0.5) {
                capture.fail_opens(start..end)
            } else {
                capture.fail_reads(start..end)
            };
        }
        let clock = FakeClock::new();
        let mut cam = source(capture, &clock);
        // Consecutive open/read failures, as the source counts them.
        let mut failures = 0;
        let mut ids = Vec::new();
        let mut events = 0;
        // Enough frames to be past every scheduled fault (they are numbered by call).
        let wanted = if good_frames == 0 {
            0
        } else {
            3 * last_fault as usize + 5
        };
        while ids.len() < wanted || (good_frames == 0 && events < 100) {
            events += 1;
            assert!(events < 2000, "schedule {schedule}: no progress");
            match next_event(&mut cam, &clock, 100) {
                Some(FrameEvent::Frame(f)) => {
                    failures = 0;
                    ids.push(f.id);
                    assert_eq!(cam.state(), SourceState::CameraOk);
                }
                // The camera is open and delivering: only this frame is lost.
                Some(FrameEvent::Error(SourceError { message: m, .. }))
                    if m.contains("bad frame skipped") =>
                {
                    assert_eq!(cam.state(), SourceState::CameraOk, "{m}");
                    errors_seen += 1;
                }
                Some(FrameEvent::Error(SourceError { message: m, .. })) => {
                    assert!(
                        m.contains("cannot open") || m.contains("cannot read"),
                        "{m}"
                    );
                    failures += 1;
                    assert_eq!(retry_in(&cam.state()), config.backoff(failures), "{m}");
                    errors_seen += 1;
                }
                other => panic!("schedule {schedule}: {other:?}"),
            }
        }
        assert_eq!(ids, (0..ids.len() as u64).collect::<Vec<_>>());
        frames_seen += ids.len();
        // Waiting never took longer than a slice at a time.
        assert!(clock.sleeps().iter().all(|&d| d <= config.wait_slice));
    }
    println!("200 fault schedules: {frames_seen} frames, {errors_seen} error events");
}
