//! When the camera takes a picture: on a timer, on Enter, or on a GPIO button.
//!
//! GPIO goes through the legacy sysfs interface (`/sys/class/gpio/gpioN/value`), polled
//! every 10 ms for a rising edge. The GPIO character device (`/dev/gpiochipN`) needs
//! ioctls, and with no `libc`/`nix`/`gpio-cdev` dependency there is no way to issue them
//! from safe std Rust. Sysfs GPIO is deprecated upstream but enabled in NVIDIA's L4T
//! kernels. `Gpio { chip, line }` uses the character-device numbering (as `gpioinfo`
//! prints it) and is mapped to the sysfs number `base + line` by finding the sysfs
//! `gpiochipBASE` of the same device; `GpioSysfs { number }` takes a sysfs number as
//! Jetson pin tables list them. The line is exported and set to input if needed (and left
//! exported afterwards).

use std::fmt;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::clock::Clock;

/// How often the GPIO value is read; a button press lasts far longer.
pub const GPIO_POLL: Duration = Duration::from_millis(10);

/// What makes the camera source capture a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// Every period, from the first call (fixed rate; missed ticks are skipped, not
    /// bunched). `Duration::ZERO` captures as fast as the camera delivers.
    Interval(Duration),
    /// Each line (Enter) on stdin. A background thread owns stdin; when it closes, the
    /// source is exhausted (so `printf '\n\n' | ma-device ...` takes two pictures). As a
    /// panel toggle ([`TriggerInput::toggle`]) it is the line `h` instead, which then no
    /// longer takes a picture.
    Key,
    /// A rising edge on line `line` of `/dev/gpiochip<chip>` (read through sysfs).
    Gpio { chip: u32, line: u32 },
    /// A rising edge on sysfs GPIO `number` (`/sys/class/gpio/gpio<number>`).
    GpioSysfs { number: u32 },
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trigger::Interval(d) if d.is_zero() => write!(f, "continuous"),
            Trigger::Interval(d) => write!(f, "every {:.1} s", d.as_secs_f64()),
            Trigger::Key => write!(f, "Enter key"),
            Trigger::Gpio { chip, line } => write!(f, "GPIO gpiochip{chip} line {line}"),
            Trigger::GpioSysfs { number } => write!(f, "GPIO sysfs {number}"),
        }
    }
}

impl FromStr for Trigger {
    type Err = anyhow::Error;
    /// `key`, `interval=SECONDS` (e.g. `interval=2.5`), `gpio=CHIP:LINE`, `gpio=NUMBER`.
    fn from_str(s: &str) -> Result<Self> {
        let usage = "use key, interval=SECONDS, gpio=CHIP:LINE or gpio=SYSFS_NUMBER";
        let (kind, arg) = s.split_once('=').unwrap_or((s, ""));
        match (kind.trim().to_ascii_lowercase().as_str(), arg.trim()) {
            ("key", "") => Ok(Trigger::Key),
            ("interval", secs) => {
                let secs: f64 = secs
                    .parse()
                    .with_context(|| format!("bad interval {secs:?} in trigger {s:?}"))?;
                if !secs.is_finite() || !(0.0..=86_400.0).contains(&secs) {
                    bail!("interval must be 0..86400 seconds, got {secs}");
                }
                Ok(Trigger::Interval(Duration::from_secs_f64(secs)))
            }
            ("gpio", arg) => {
                let num = |t: &str| {
                    t.trim()
                        .parse::<u32>()
                        .with_context(|| format!("bad GPIO number {t:?} in trigger {s:?}"))
                };
                match arg.split_once(':') {
                    Some((chip, line)) => Ok(Trigger::Gpio {
                        chip: num(chip)?,
                        line: num(line)?,
                    }),
                    None => Ok(Trigger::GpioSysfs { number: num(arg)? }),
                }
            }
            _ => bail!("unknown trigger {s:?}: {usage}"),
        }
    }
}

/// Outcome of waiting for a trigger for at most one slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Fired,
    NotYet,
    /// The trigger can never fire again (stdin or the channel closed).
    Closed,
}

/// A trigger being waited on (the state behind a [`Trigger`]).
pub struct TriggerInput {
    kind: Input,
    description: String,
}

enum Input {
    Interval {
        period: Duration,
        next: Option<std::time::Instant>,
    },
    Channel(Arc<Mutex<Receiver<()>>>),
    Gpio(GpioInput),
}

impl fmt::Debug for TriggerInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}

impl TriggerInput {
    /// Set up a trigger. Nothing is opened yet: GPIO is exported on the first wait, so
    /// its errors are reported (and retried) by the source, and `Key` starts the stdin
    /// reader thread here.
    pub fn new(trigger: &Trigger) -> Self {
        let kind = match *trigger {
            Trigger::Interval(period) => Input::Interval { period, next: None },
            Trigger::Key => Input::Channel(stdin_channels().capture.clone()),
            Trigger::Gpio { chip, line } => {
                Input::Gpio(GpioInput::new(GpioLine::Chip { chip, line }, "/sys"))
            }
            Trigger::GpioSysfs { number } => {
                Input::Gpio(GpioInput::new(GpioLine::Sysfs(number), "/sys"))
            }
        };
        Self {
            kind,
            description: trigger.to_string(),
        }
    }

    /// A control that is not the capture trigger (the heatmap toggle): `Key` fires on the
    /// stdin line [`TOGGLE_LINE`] (and from then on that line no longer captures), GPIO on
    /// its button; an interval is refused, naming `setting`.
    pub fn toggle(trigger: &Trigger, setting: &str) -> Result<Self> {
        let kind = match *trigger {
            Trigger::Key => {
                TOGGLE_WANTED.store(true, std::sync::atomic::Ordering::SeqCst);
                Input::Channel(stdin_channels().toggle.clone())
            }
            Trigger::Interval(_) => bail!(
                "{setting} ({trigger}): a toggle is a key or a button (key, gpio=CHIP:LINE or \
                 gpio=SYSFS_NUMBER), not an interval"
            ),
            _ => return Ok(Self::new(trigger)),
        };
        Ok(Self {
            kind,
            description: format!("the line {TOGGLE_LINE:?} + Enter on stdin"),
        })
    }

    /// Fire once per message on `rx`; closed when every sender is dropped. For triggers
    /// from elsewhere in the program (a touch button) and for tests.
    pub fn from_channel(rx: Receiver<()>) -> Self {
        Self {
            kind: Input::Channel(Arc::new(Mutex::new(rx))),
            description: "external trigger".into(),
        }
    }

    /// GPIO through a sysfs tree rooted somewhere else than `/sys` (tests).
    pub fn gpio_at(sysfs_root: &Path, chip: u32, line: u32) -> Self {
        Self {
            kind: Input::Gpio(GpioInput::new(GpioLine::Chip { chip, line }, sysfs_root)),
            description: format!("GPIO gpiochip{chip} line {line}"),
        }
    }

    /// Wait at most `slice` for the trigger.
    pub fn wait(&mut self, slice: Duration, clock: &dyn Clock) -> Result<Wait> {
        match &mut self.kind {
            Input::Interval { period, next } => {
                let now = clock.now();
                let due = *next.get_or_insert(now);
                if now < due {
                    clock.sleep((due - now).min(slice));
                    if clock.now() < due {
                        return Ok(Wait::NotYet);
                    }
                }
                let now = clock.now();
                // Fixed rate; after a long stall start a new grid instead of bunching.
                let mut following = due + *period;
                if following <= now && !period.is_zero() {
                    following = now + *period;
                }
                *next = Some(following);
                Ok(Wait::Fired)
            }
            Input::Channel(rx) => {
                let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
                match rx.recv_timeout(slice) {
                    Ok(()) => Ok(Wait::Fired),
                    Err(RecvTimeoutError::Timeout) => Ok(Wait::NotYet),
                    Err(RecvTimeoutError::Disconnected) => Ok(Wait::Closed),
                }
            }
            Input::Gpio(gpio) => gpio.wait(slice, clock),
        }
    }

    /// Forget what happened while the camera was away: key presses queued then are
    /// dropped, the interval restarts (fires at once), a GPIO edge must start anew.
    pub fn reset(&mut self) {
        match &mut self.kind {
            Input::Interval { next, .. } => *next = None,
            Input::Channel(rx) => {
                let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
                while rx.try_recv().is_ok() {}
            }
            Input::Gpio(gpio) => gpio.last = None,
        }
    }

    pub fn describe(&self) -> String {
        self.description.clone()
    }
}

/// The stdin line that toggles the heatmap overlay when a toggle is on stdin.
pub const TOGGLE_LINE: &str = "h";

/// Set once a toggle listens on stdin: only then does [`TOGGLE_LINE`] stop capturing.
static TOGGLE_WANTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The stdin lines, split between the capture trigger and the toggle.
struct StdinChannels {
    capture: Arc<Mutex<Receiver<()>>>,
    toggle: Arc<Mutex<Receiver<()>>>,
}

/// One process-wide stdin reader: a second reader thread would steal lines.
fn stdin_channels() -> &'static StdinChannels {
    static LINES: OnceLock<StdinChannels> = OnceLock::new();
    LINES.get_or_init(|| {
        let (capture_tx, capture_rx) = mpsc::channel();
        let (toggle_tx, toggle_rx) = mpsc::channel();
        // If the thread cannot start, the senders are dropped and both report closed.
        let _ = std::thread::Builder::new()
            .name("stdin-trigger".into())
            .spawn(move || {
                let stdin = std::io::stdin();
                let mut line = String::new();
                loop {
                    line.clear();
                    match stdin.lock().read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let toggle = TOGGLE_WANTED.load(std::sync::atomic::Ordering::SeqCst)
                                && line.trim().eq_ignore_ascii_case(TOGGLE_LINE);
                            // The receivers live in this static for good: sends cannot fail.
                            let _ = if toggle {
                                toggle_tx.send(())
                            } else {
                                capture_tx.send(())
                            };
                        }
                    }
                }
            });
        StdinChannels {
            capture: Arc::new(Mutex::new(capture_rx)),
            toggle: Arc::new(Mutex::new(toggle_rx)),
        }
    })
}

#[derive(Debug, Clone, Copy)]
enum GpioLine {
    Chip { chip: u32, line: u32 },
    Sysfs(u32),
}

/// A GPIO input polled through sysfs for rising edges.
#[derive(Debug)]
struct GpioInput {
    line: GpioLine,
    sysfs: PathBuf,
    /// `.../gpioN/value`, once exported and set to input.
    value: Option<PathBuf>,
    /// Last level seen; `None` after a fire or reset, so a held button (or the level at
    /// start) does not count as an edge.
    last: Option<bool>,
}

impl GpioInput {
    fn new(line: GpioLine, sysfs: impl Into<PathBuf>) -> Self {
        Self {
            line,
            sysfs: sysfs.into(),
            value: None,
            last: None,
        }
    }

    fn wait(&mut self, slice: Duration, clock: &dyn Clock) -> Result<Wait> {
        let value = match &self.value {
            Some(v) => v.clone(),
            None => {
                let v = self.setup()?;
                self.value = Some(v.clone());
                v
            }
        };
        let deadline = clock.now() + slice;
        loop {
            let level = match read_level(&value) {
                Ok(level) => level,
                Err(e) => {
                    // Set up again next time (the line may have been unexported).
                    self.value = None;
                    self.last = None;
                    return Err(e);
                }
            };
            if self.last.replace(level) == Some(false) && level {
                self.last = None;
                return Ok(Wait::Fired);
            }
            let now = clock.now();
            if now >= deadline {
                return Ok(Wait::NotYet);
            }
            clock.sleep(GPIO_POLL.min(deadline - now));
        }
    }

    /// Export the line (if not yet) and make it an input; returns its value file.
    fn setup(&self) -> Result<PathBuf> {
        let number = match self.line {
            GpioLine::Sysfs(n) => n,
            GpioLine::Chip { chip, line } => sysfs_gpio_number(&self.sysfs, chip, line)?,
        };
        let class = self.sysfs.join("class/gpio");
        let dir = class.join(format!("gpio{number}"));
        if !dir.exists() {
            let export = class.join("export");
            std::fs::write(&export, number.to_string()).with_context(|| {
                format!(
                    "cannot export GPIO {number} through {} (sysfs GPIO enabled? permission?)",
                    export.display()
                )
            })?;
        }
        let direction = dir.join("direction");
        let current = std::fs::read_to_string(&direction).unwrap_or_default();
        if current.trim() != "in" {
            // Some lines have a fixed direction and no writable file: reading still works.
            let _ = std::fs::write(&direction, "in");
        }
        let value = dir.join("value");
        read_level(&value)?;
        Ok(value)
    }
}

fn read_level(value: &Path) -> Result<bool> {
    let text = std::fs::read_to_string(value)
        .with_context(|| format!("cannot read GPIO value {}", value.display()))?;
    match text.trim() {
        "0" => Ok(false),
        "1" => Ok(true),
        other => bail!("unexpected GPIO value {other:?} in {}", value.display()),
    }
}

/// The sysfs GPIO number of `line` on `/dev/gpiochip<chip>`: the sysfs `gpiochipBASE`
/// directory that belongs to the same device gives `base`, and the number is
/// `base + line`. The character device's sysfs node (`bus/gpio/devices/gpiochipN`) and
/// the legacy class node hang off the same parent device (older kernels) or off the
/// chardev node itself (newer kernels); both are accepted.
fn sysfs_gpio_number(sysfs: &Path, chip: u32, line: u32) -> Result<u32> {
    let node = sysfs.join(format!("bus/gpio/devices/gpiochip{chip}"));
    let node = node
        .canonicalize()
        .with_context(|| format!("no GPIO chip {} (/dev/gpiochip{chip})", node.display()))?;
    let parent = node.parent().map(Path::to_path_buf);
    let class = sysfs.join("class/gpio");
    let entries = std::fs::read_dir(&class).with_context(|| {
        format!(
            "cannot list {} (is sysfs GPIO enabled in this kernel?)",
            class.display()
        )
    })?;
    let mut exact = Vec::new();
    let mut siblings = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(base) = name
            .strip_prefix("gpiochip")
            .and_then(|b| b.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(real) = entry.path().canonicalize() else {
            continue;
        };
        // .../<owner>/gpio/gpiochipBASE
        let owner = real.parent().and_then(Path::parent);
        if owner == Some(node.as_path()) {
            exact.push((base, entry.path()));
        } else if owner.is_some() && owner == parent.as_deref() {
            siblings.push((base, entry.path()));
        }
    }
    let (base, dir) = match (exact.len(), siblings.len()) {
        (1, _) => exact.remove(0),
        (0, 1) => siblings.remove(0),
        (0, 0) => bail!(
            "no sysfs GPIO chip for /dev/gpiochip{chip} under {}; give the sysfs number instead (gpio=NUMBER)",
            class.display()
        ),
        _ => bail!(
            "several sysfs GPIO chips match /dev/gpiochip{chip}; give the sysfs number instead (gpio=NUMBER)"
        ),
    };
    let ngpio: u32 = std::fs::read_to_string(dir.join("ngpio"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u32::MAX);
    if line >= ngpio {
        bail!("gpiochip{chip} has {ngpio} lines, no line {line}");
    }
    base.checked_add(line)
        .context("GPIO number overflows (corrupt sysfs base?)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::clock::FakeClock;
    use std::os::unix::fs::symlink;

    #[test]
    fn triggers_parse_from_text() {
        assert_eq!("key".parse::<Trigger>().unwrap(), Trigger::Key);
        assert_eq!(
            "interval=2.5".parse::<Trigger>().unwrap(),
            Trigger::Interval(Duration::from_millis(2500))
        );
        assert_eq!(
            "gpio=0:17".parse::<Trigger>().unwrap(),
            Trigger::Gpio { chip: 0, line: 17 }
        );
        assert_eq!(
            "gpio=348".parse::<Trigger>().unwrap(),
            Trigger::GpioSysfs { number: 348 }
        );
        for bad in ["", "keys", "interval=x", "interval=-1", "gpio=a:b", "key=1"] {
            assert!(bad.parse::<Trigger>().is_err(), "{bad}");
        }
    }

    #[test]
    fn channel_trigger_fires_per_message_and_closes() {
        let clock = FakeClock::new();
        let (tx, rx) = mpsc::channel();
        let mut t = TriggerInput::from_channel(rx);
        let slice = Duration::from_millis(5);
        assert_eq!(t.wait(slice, &clock).unwrap(), Wait::NotYet);
        tx.send(()).unwrap();
        tx.send(()).unwrap();
        assert_eq!(t.wait(slice, &clock).unwrap(), Wait::Fired);
        tx.send(()).unwrap();
        t.reset(); // drops the queued presses
        assert_eq!(t.wait(slice, &clock).unwrap(), Wait::NotYet);
        tx.send(()).unwrap();
        drop(tx);
        assert_eq!(t.wait(slice, &clock).unwrap(), Wait::Fired);
        assert_eq!(t.wait(slice, &clock).unwrap(), Wait::Closed);
    }

    /// A fake sysfs: chip 1 is a platform device whose legacy node is gpiochip300.
    fn fake_sysfs(root: &Path) -> PathBuf {
        let dev = root.join("devices/platform/2200000.gpio");
        std::fs::create_dir_all(dev.join("gpiochip1")).unwrap();
        std::fs::create_dir_all(dev.join("gpio/gpiochip300")).unwrap();
        std::fs::write(dev.join("gpio/gpiochip300/ngpio"), "32\n").unwrap();
        // An unrelated chip.
        let other = root.join("devices/platform/other");
        std::fs::create_dir_all(other.join("gpiochip0")).unwrap();
        std::fs::create_dir_all(other.join("gpio/gpiochip500")).unwrap();
        std::fs::create_dir_all(root.join("bus/gpio/devices")).unwrap();
        std::fs::create_dir_all(root.join("class/gpio")).unwrap();
        symlink(
            dev.join("gpiochip1"),
            root.join("bus/gpio/devices/gpiochip1"),
        )
        .unwrap();
        symlink(
            other.join("gpiochip0"),
            root.join("bus/gpio/devices/gpiochip0"),
        )
        .unwrap();
        symlink(
            dev.join("gpio/gpiochip300"),
            root.join("class/gpio/gpiochip300"),
        )
        .unwrap();
        symlink(
            other.join("gpio/gpiochip500"),
            root.join("class/gpio/gpiochip500"),
        )
        .unwrap();
        let line = root.join("class/gpio/gpio305");
        std::fs::create_dir_all(&line).unwrap();
        std::fs::write(line.join("direction"), "out\n").unwrap();
        std::fs::write(line.join("value"), "1\n").unwrap();
        line.join("value")
    }

    #[test]
    fn chip_and_line_map_to_the_sysfs_number() {
        let dir = tempfile::tempdir().unwrap();
        fake_sysfs(dir.path());
        assert_eq!(sysfs_gpio_number(dir.path(), 1, 5).unwrap(), 305);
        assert_eq!(sysfs_gpio_number(dir.path(), 0, 2).unwrap(), 502);
        let e = format!("{:#}", sysfs_gpio_number(dir.path(), 1, 40).unwrap_err());
        assert!(e.contains("32 lines"), "{e}");
        let e = format!("{:#}", sysfs_gpio_number(dir.path(), 7, 0).unwrap_err());
        assert!(e.contains("gpiochip7"), "{e}");
    }

    #[test]
    fn gpio_fires_on_a_rising_edge_only() {
        let dir = tempfile::tempdir().unwrap();
        let value = fake_sysfs(dir.path());
        let clock = FakeClock::new();
        let mut t = TriggerInput::gpio_at(dir.path(), 1, 5);
        let slice = Duration::from_millis(100);
        // Held high from the start: not an edge. The line was made an input.
        assert_eq!(t.wait(slice, &clock).unwrap(), Wait::NotYet);
        let direction = dir.path().join("class/gpio/gpio305/direction");
        assert_eq!(std::fs::read_to_string(direction).unwrap(), "in");
        // Polled every 10 ms within the slice.
        assert!(clock.sleeps().iter().all(|&d| d <= GPIO_POLL));
        assert_eq!(clock.elapsed(), slice);
        std::fs::write(&value, "0\n").unwrap();
        assert_eq!(t.wait(slice, &clock).unwrap(), Wait::NotYet);
        std::fs::write(&value, "1\n").unwrap();
        assert_eq!(t.wait(slice, &clock).unwrap(), Wait::Fired);
        // Still held: no second capture.
        assert_eq!(t.wait(slice, &clock).unwrap(), Wait::NotYet);
        // A vanished line is an error, and is set up again afterwards.
        std::fs::remove_file(&value).unwrap();
        assert!(t.wait(slice, &clock).is_err());
        std::fs::write(&value, "0\n").unwrap();
        assert_eq!(t.wait(slice, &clock).unwrap(), Wait::NotYet);
    }

    #[test]
    fn interval_fires_at_a_fixed_rate_and_skips_missed_ticks() {
        let clock = FakeClock::new();
        let t0 = clock.now();
        let mut t = TriggerInput::new(&Trigger::Interval(Duration::from_secs(2)));
        let slice = Duration::from_millis(500);
        let mut fired = Vec::new();
        while fired.len() < 3 {
            if t.wait(slice, &clock).unwrap() == Wait::Fired {
                fired.push(clock.now() - t0);
                clock.advance(Duration::from_millis(300)); // capture time
            }
        }
        let secs = |s: u64| Duration::from_secs(s);
        assert_eq!(fired, [secs(0), secs(2), secs(4)]);
        // Never slept longer than a slice.
        assert!(clock.sleeps().iter().all(|&d| d <= slice));
        // A 7 s stall: fire at once, then 2 s later (not three times in a row).
        clock.advance(Duration::from_millis(6700));
        assert_eq!(t.wait(slice, &clock).unwrap(), Wait::Fired);
        let stalled = clock.now();
        assert_eq!(t.wait(slice, &clock).unwrap(), Wait::NotYet);
        while t.wait(slice, &clock).unwrap() != Wait::Fired {}
        assert_eq!(clock.now() - stalled, secs(2));
    }
}
