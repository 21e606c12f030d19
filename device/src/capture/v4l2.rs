//! A USB (UVC) camera through V4L2, with `linuxvideo` (pure Rust, so no libclang at
//! build time and no trouble cross-compiling for aarch64).
//!
//! The device is driven from its own thread: `linuxvideo` dequeues with a blocking
//! ioctl and has no timeout, and a camera that stalls must not freeze the device loop.
//! [`V4l2Capture::read`] asks the thread for a frame and waits at most
//! [`V4l2Config::timeout`]; on a timeout or error the camera is declared lost, the
//! thread is abandoned (it exits when its ioctl returns, e.g. with ENODEV after an
//! unplug) and the next open starts a new one. A panic inside the library ends only
//! that thread and shows up as an error.
//!
//! Streaming uses mmap buffers (`linuxvideo`'s default of 2). Before a triggered read
//! the frames already waiting in those buffers are dropped, so the picture is taken
//! after the trigger, not up to two frame times before it.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use linuxvideo::format::{PixFormat, PixelFormat as V4l2PixelFormat};
use linuxvideo::stream::ReadStream;
use linuxvideo::{BufType, CapabilityFlags, Device, Fract};

use super::camera::RawCapture;
use super::raw::{PixelFormat, RawFrame};

/// At most this many waiting frames are dropped before a read (more means the camera
/// produces faster than we can drop: take the next one anyway).
const MAX_STALE: usize = 8;
/// Frames flagged as corrupt by the driver are skipped this many times in a row.
const MAX_CORRUPT: usize = 3;

/// Which camera and how to stream from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V4l2Config {
    pub device: PathBuf,
    pub format: PixelFormat,
    /// Requested size; the camera must offer it exactly. 0 x 0: the largest it offers.
    pub width: u32,
    pub height: u32,
    /// Requested frame rate, if any (the camera may round it).
    pub fps: Option<u32>,
    /// Longest wait for the stream to start or for one frame before giving up.
    pub timeout: Duration,
    /// Drop frames captured before the read was requested (see the module docs).
    /// Turn off for continuous capture, where it would halve the frame rate.
    pub drop_stale: bool,
}

impl V4l2Config {
    pub fn new(device: impl Into<PathBuf>, format: PixelFormat, width: u32, height: u32) -> Self {
        Self {
            device: device.into(),
            format,
            width,
            height,
            fps: None,
            timeout: Duration::from_secs(5),
            drop_stale: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Negotiated {
    width: u32,
    height: u32,
    stride: u32,
}

struct Worker {
    requests: Sender<()>,
    replies: Receiver<Result<RawFrame>>,
}

/// The real camera. See the module docs for the threading.
pub struct V4l2Capture {
    config: V4l2Config,
    worker: Option<Worker>,
    negotiated: Option<Negotiated>,
}

impl V4l2Capture {
    pub fn new(config: V4l2Config) -> Self {
        Self {
            config,
            worker: None,
            negotiated: None,
        }
    }

    fn device_name(&self) -> String {
        self.config.device.display().to_string()
    }
}

impl RawCapture for V4l2Capture {
    fn open(&mut self) -> Result<()> {
        self.close();
        let name = self.device_name();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let (request_tx, request_rx) = mpsc::channel();
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        let config = self.config.clone();
        std::thread::Builder::new()
            .name(format!("capture {name}"))
            .spawn(move || run_worker(config, ready_tx, request_rx, reply_tx))
            .with_context(|| format!("cannot start the capture thread for {name}"))?;
        let timeout = self.config.timeout;
        let negotiated = match ready_rx.recv_timeout(timeout) {
            Ok(result) => result?,
            Err(RecvTimeoutError::Timeout) => bail!(
                "{name} did not start streaming within {:.1} s",
                timeout.as_secs_f64()
            ),
            Err(RecvTimeoutError::Disconnected) => {
                bail!("the capture thread for {name} ended while opening it")
            }
        };
        self.negotiated = Some(negotiated);
        self.worker = Some(Worker {
            requests: request_tx,
            replies: reply_rx,
        });
        Ok(())
    }

    fn read(&mut self) -> Result<RawFrame> {
        let name = self.device_name();
        let worker = self
            .worker
            .as_ref()
            .with_context(|| format!("{name} is not open"))?;
        worker
            .requests
            .send(())
            .map_err(|_| anyhow!("the capture thread for {name} has ended"))?;
        let timeout = self.config.timeout;
        match worker.replies.recv_timeout(timeout) {
            Ok(frame) => frame,
            Err(RecvTimeoutError::Timeout) => {
                bail!("no frame from {name} within {:.1} s", timeout.as_secs_f64())
            }
            Err(RecvTimeoutError::Disconnected) => {
                bail!("the capture thread for {name} ended (device error)")
            }
        }
    }

    fn close(&mut self) {
        // Dropping the request channel ends the thread once its current ioctl returns;
        // the thread then drops the stream (STREAMOFF, munmap, close).
        self.worker = None;
    }

    fn name(&self) -> String {
        self.device_name()
    }

    fn describe(&self) -> String {
        match self.negotiated {
            Some(n) => format!(
                "{} {} {}x{}",
                self.device_name(),
                self.config.format,
                n.width,
                n.height
            ),
            None if self.config.width == 0 || self.config.height == 0 => {
                format!(
                    "{} {} (largest size)",
                    self.device_name(),
                    self.config.format
                )
            }
            None => format!(
                "{} {} {}x{}",
                self.device_name(),
                self.config.format,
                self.config.width,
                self.config.height
            ),
        }
    }
}

/// The capture thread: open, report, then one frame per request until the request
/// channel closes or a read fails (the device is then reopened from scratch).
fn run_worker(
    config: V4l2Config,
    ready: SyncSender<Result<Negotiated>>,
    requests: Receiver<()>,
    replies: SyncSender<Result<RawFrame>>,
) {
    let (mut stream, negotiated) = match start_stream(&config) {
        Ok(started) => started,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if ready.send(Ok(negotiated)).is_err() {
        return; // the opener gave up waiting
    }
    while requests.recv().is_ok() {
        let reply = grab(&mut stream, &config, negotiated);
        let failed = reply.is_err();
        if replies.send(reply).is_err() || failed {
            return;
        }
    }
}

fn start_stream(config: &V4l2Config) -> Result<(ReadStream, Negotiated)> {
    let name = config.device.display();
    let device = Device::open(&config.device).with_context(|| format!("cannot open {name}"))?;
    let caps = device
        .capabilities()
        .with_context(|| format!("cannot query {name}"))?;
    let flags = caps.device_capabilities();
    if !flags.contains(CapabilityFlags::VIDEO_CAPTURE) {
        bail!(
            "{name} ({}, {}) is not a single-planar video capture device",
            caps.driver(),
            caps.card()
        );
    }
    if !flags.contains(CapabilityFlags::STREAMING) {
        bail!("{name} ({}) does not support streaming I/O", caps.card());
    }

    let wanted = match config.format {
        PixelFormat::Yuyv => V4l2PixelFormat::YUYV,
        PixelFormat::Mjpeg => V4l2PixelFormat::MJPG,
    };
    let offered: Vec<V4l2PixelFormat> = device
        .formats(BufType::VIDEO_CAPTURE)
        .filter_map(|f| f.ok().map(|f| f.pixel_format()))
        .collect();
    if !offered.contains(&wanted) {
        let list: Vec<String> = offered.iter().map(|f| f.to_string()).collect();
        bail!(
            "{name} ({}) does not offer {}; it offers: {}",
            caps.card(),
            config.format,
            list.join(", ")
        );
    }

    let any_size = config.width == 0 || config.height == 0;
    let (w, h) = if any_size {
        (u32::MAX, u32::MAX) // the driver clamps to its largest size
    } else {
        (config.width, config.height)
    };
    let capture = device
        .video_capture(PixFormat::new(w, h, wanted))
        .with_context(|| format!("cannot set {} on {name}", config.format))?;
    let format = capture.format();
    if format.pixel_format() != wanted {
        bail!(
            "{name} switched to {} instead of {}",
            format.pixel_format(),
            config.format
        );
    }
    if !any_size && (format.width(), format.height()) != (config.width, config.height) {
        bail!(
            "{name} offers {}x{} instead of the requested {}x{} in {}",
            format.width(),
            format.height(),
            config.width,
            config.height,
            config.format
        );
    }
    let negotiated = Negotiated {
        width: format.width(),
        height: format.height(),
        stride: format.bytes_per_line(),
    };
    if let Some(fps) = config.fps {
        if fps == 0 {
            bail!("frame rate must be positive");
        }
        capture
            .set_frame_interval(Fract::new(1, fps))
            .with_context(|| format!("cannot set {fps} frames/s on {name}"))?;
    }
    let stream = capture
        .into_stream()
        .with_context(|| format!("cannot start streaming from {name}"))?;
    Ok((stream, negotiated))
}

fn grab(stream: &mut ReadStream, config: &V4l2Config, n: Negotiated) -> Result<RawFrame> {
    let name = config.device.display();
    if config.drop_stale {
        for _ in 0..MAX_STALE {
            if stream
                .will_block()
                .with_context(|| format!("cannot query buffers of {name}"))?
            {
                break;
            }
            stream
                .dequeue(|_| Ok(()))
                .with_context(|| format!("cannot dequeue a frame from {name}"))?;
        }
    }
    for _ in 0..MAX_CORRUPT {
        // The view is the used part of the buffer (`bytesused`): the JPEG for MJPEG.
        let bytes = stream
            .dequeue(|buf| Ok((!buf.is_error()).then(|| buf.to_vec())))
            .with_context(|| format!("cannot dequeue a frame from {name}"))?;
        if let Some(bytes) = bytes {
            return Ok(RawFrame {
                format: config.format,
                width: n.width,
                height: n.height,
                stride: n.stride,
                bytes,
            });
        }
    }
    bail!("{name} delivered {MAX_CORRUPT} corrupt frames in a row")
}
