//! Time for the capture logic, injectable so tests of back-off and trigger timing run
//! instantly and deterministically instead of sleeping for seconds.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// Monotonic time, wall time and sleeping.
pub trait Clock: Send + Sync {
    /// Monotonic time, for deadlines.
    fn now(&self) -> Instant;
    /// Wall-clock time, for [`super::Frame::captured_at`].
    fn wall(&self) -> SystemTime;
    fn sleep(&self, duration: Duration);
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// A clock that only moves when slept on or advanced; clones share the same time.
/// It records every sleep so tests can check how long the code chose to wait.
#[derive(Debug, Clone)]
pub struct FakeClock {
    inner: Arc<Mutex<FakeInner>>,
}

#[derive(Debug)]
struct FakeInner {
    start: Instant,
    wall_start: SystemTime,
    elapsed: Duration,
    sleeps: Vec<Duration>,
}

impl Default for FakeClock {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeClock {
    /// Starts at elapsed 0; wall time starts at the Unix epoch + 1e9 s (2001-09-09).
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(FakeInner {
                start: Instant::now(),
                wall_start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000),
                elapsed: Duration::ZERO,
                sleeps: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, FakeInner> {
        // A panicking test thread must not hide the clock from the others.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Move time forward without recording a sleep (e.g. "a capture takes 30 ms").
    pub fn advance(&self, duration: Duration) {
        self.lock().elapsed += duration;
    }

    /// Time since the clock was made.
    pub fn elapsed(&self) -> Duration {
        self.lock().elapsed
    }

    /// Every sleep so far, in order.
    pub fn sleeps(&self) -> Vec<Duration> {
        self.lock().sleeps.clone()
    }

    /// The wall time the clock started at, to compare with `captured_at`.
    pub fn wall_start(&self) -> SystemTime {
        self.lock().wall_start
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Instant {
        let inner = self.lock();
        inner.start + inner.elapsed
    }
    fn wall(&self) -> SystemTime {
        let inner = self.lock();
        inner.wall_start + inner.elapsed
    }
    fn sleep(&self, duration: Duration) {
        let mut inner = self.lock();
        inner.elapsed += duration;
        inner.sleeps.push(duration);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_clock_moves_only_when_told() {
        let clock = FakeClock::new();
        let t0 = clock.now();
        clock.sleep(Duration::from_millis(500));
        clock.advance(Duration::from_millis(20));
        let shared = clock.clone();
        assert_eq!(shared.now() - t0, Duration::from_millis(520));
        assert_eq!(shared.sleeps(), vec![Duration::from_millis(500)]);
        assert_eq!(
            shared.wall().duration_since(shared.wall_start()).unwrap(),
            Duration::from_millis(520)
        );
    }
}
