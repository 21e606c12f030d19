//! A stand-in camera: replays recorded buffers and fails on a script, so reconnection
//! is tested without hardware (CI has no camera, vivid or v4l2loopback).

use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::camera::RawCapture;
use super::clock::FakeClock;
use super::raw::{PixelFormat, RawFrame};

/// One call made on a [`RecordedCapture`], for tests to inspect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Open { ok: bool },
    Read { ok: bool },
    Close,
}

/// Replays `frames` in a cycle. Open and read calls are numbered from 0 (failed calls
/// count); those in a `fail_*` range fail with ENODEV, as an unplugged USB camera does.
pub struct RecordedCapture {
    name: String,
    frames: Vec<RawFrame>,
    next_frame: usize,
    open: bool,
    opens: u64,
    reads: u64,
    fail_opens: Vec<Range<u64>>,
    fail_reads: Vec<Range<u64>>,
    read_time: Option<(FakeClock, Duration)>,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl RecordedCapture {
    pub fn new(name: impl Into<String>, frames: Vec<RawFrame>) -> Self {
        Self {
            name: name.into(),
            frames,
            next_frame: 0,
            open: false,
            opens: 0,
            reads: 0,
            fail_opens: Vec::new(),
            fail_reads: Vec::new(),
            read_time: None,
            calls: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Recorded buffers from files, all with the same format and geometry.
    pub fn from_files(
        name: impl Into<String>,
        files: &[PathBuf],
        format: PixelFormat,
        width: u32,
        height: u32,
        stride: u32,
    ) -> Result<Self> {
        let frames = files
            .iter()
            .map(|f| RawFrame::read_file(f, format, width, height, stride))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::new(name, frames))
    }

    /// Open calls with these numbers fail (e.g. `1..3`: the 2nd and 3rd open).
    pub fn fail_opens(mut self, calls: Range<u64>) -> Self {
        self.fail_opens.push(calls);
        self
    }

    /// Read calls with these numbers fail as if the camera was unplugged.
    pub fn fail_reads(mut self, calls: Range<u64>) -> Self {
        self.fail_reads.push(calls);
        self
    }

    /// Each successful read advances `clock` by `time` (exposure and transfer).
    pub fn with_read_time(mut self, clock: FakeClock, time: Duration) -> Self {
        self.read_time = Some((clock, time));
        self
    }

    /// A shared view of every call made so far, still readable after the capture has
    /// been moved into a source.
    pub fn call_log(&self) -> Arc<Mutex<Vec<Call>>> {
        Arc::clone(&self.calls)
    }

    fn log(&self, call: Call) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(call);
    }
}

fn unplugged() -> std::io::Error {
    std::io::Error::from_raw_os_error(19) // ENODEV, what V4L2 returns after unplugging
}

impl RawCapture for RecordedCapture {
    fn open(&mut self) -> Result<()> {
        let n = self.opens;
        self.opens += 1;
        let fail = self.fail_opens.iter().any(|r| r.contains(&n));
        self.log(Call::Open { ok: !fail });
        self.open = !fail;
        if fail {
            return Err(unplugged()).with_context(|| format!("cannot open {}", self.name));
        }
        Ok(())
    }

    fn read(&mut self) -> Result<RawFrame> {
        if !self.open {
            self.log(Call::Read { ok: false });
            bail!("{} is not open", self.name);
        }
        let n = self.reads;
        self.reads += 1;
        let fail = self.fail_reads.iter().any(|r| r.contains(&n));
        self.log(Call::Read { ok: !fail });
        if fail {
            return Err(unplugged()).with_context(|| format!("cannot dequeue from {}", self.name));
        }
        if self.frames.is_empty() {
            bail!("{} has no recorded frames", self.name);
        }
        if let Some((clock, time)) = &self.read_time {
            clock.advance(*time);
        }
        let frame = self.frames[self.next_frame % self.frames.len()].clone();
        self.next_frame += 1;
        Ok(frame)
    }

    fn close(&mut self) {
        self.open = false;
        self.log(Call::Close);
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn describe(&self) -> String {
        format!("{} (recorded, {} frames)", self.name, self.frames.len())
    }
}
