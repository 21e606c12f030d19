//! Board controls besides the capture trigger: the key or button that turns the referral
//! heatmap overlay on the panel on and off (`[controls]` in the board config).
//!
//! The control is watched by its own thread, so a short button press is caught even while
//! the loop is busy with a frame; the loop collects the presses between frames
//! ([`Toggle::take`]) and redraws the panel at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::capture::SystemClock;
use crate::capture::trigger::{TriggerInput, Wait};

/// How long the watcher waits per turn before looking at its stop flag.
const WATCH_SLICE: Duration = Duration::from_millis(100);
/// Pause after an error reading the control (an unexported GPIO line) before retrying.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// What the watcher saw.
enum Event {
    Pressed,
    /// Reading the control failed; it is retried.
    Failed(String),
}

/// What happened to a control since the last [`Toggle::take`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Presses {
    pub count: usize,
    /// Errors reading the control, each once in a row (a failing button is retried).
    pub errors: Vec<String>,
}

/// A key or button watched in the background.
pub struct Toggle {
    events: Receiver<Event>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    description: String,
}

impl Toggle {
    /// Starts watching `input`.
    pub fn watch(mut input: TriggerInput) -> Result<Toggle> {
        let description = input.describe();
        let (tx, events) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("heatmap-toggle".into())
            .spawn(move || {
                let mut last_error: Option<String> = None;
                while !stopped.load(Ordering::SeqCst) {
                    let sent = match input.wait(WATCH_SLICE, &SystemClock) {
                        Ok(Wait::Fired) => {
                            last_error = None;
                            tx.send(Event::Pressed)
                        }
                        Ok(Wait::NotYet) => Ok(()),
                        // stdin closed: no more presses can come.
                        Ok(Wait::Closed) => break,
                        Err(e) => {
                            let text = format!("{e:#}");
                            let sent = if last_error.as_ref() == Some(&text) {
                                Ok(())
                            } else {
                                last_error = Some(text.clone());
                                tx.send(Event::Failed(text))
                            };
                            // Retry later, still answering a stop within one slice.
                            let mut waited = Duration::ZERO;
                            while waited < RETRY_AFTER && !stopped.load(Ordering::SeqCst) {
                                std::thread::sleep(WATCH_SLICE);
                                waited += WATCH_SLICE;
                            }
                            sent
                        }
                    };
                    if sent.is_err() {
                        break;
                    }
                }
            })
            .context("cannot start the thread that watches the heatmap toggle")?;
        Ok(Toggle {
            events,
            stop,
            thread: Some(thread),
            description,
        })
    }

    /// A toggle pressed by the program itself (a touch button, tests): each
    /// [`Presser::press`] is seen by the next [`Toggle::take`], with no watcher thread.
    pub fn manual(description: &str) -> (Presser, Toggle) {
        let (tx, events) = mpsc::channel();
        let toggle = Toggle {
            events,
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
            description: description.to_string(),
        };
        (Presser(tx), toggle)
    }

    /// The presses and errors since the last call; never waits.
    pub fn take(&self) -> Presses {
        let mut presses = Presses::default();
        loop {
            match self.events.try_recv() {
                Ok(Event::Pressed) => presses.count += 1,
                Ok(Event::Failed(e)) => presses.errors.push(e),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return presses,
            }
        }
    }

    /// What the control is, for messages (`GPIO gpiochip0 line 12`).
    pub fn describe(&self) -> &str {
        &self.description
    }
}

/// Presses a [`Toggle::manual`].
pub struct Presser(Sender<Event>);

impl Presser {
    pub fn press(&self) {
        // A dropped toggle has nobody to tell.
        let _ = self.0.send(Event::Pressed);
    }
}

impl Drop for Toggle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The watcher stops within one slice; a stdin reader it waits on is never joined.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for(toggle: &Toggle, count: usize) -> Presses {
        let mut seen = Presses::default();
        for _ in 0..200 {
            let p = toggle.take();
            seen.count += p.count;
            seen.errors.extend(p.errors);
            if seen.count >= count {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        seen
    }

    #[test]
    fn presses_are_counted_and_taken_once() {
        let (tx, rx) = mpsc::channel();
        let toggle = Toggle::watch(TriggerInput::from_channel(rx)).unwrap();
        tx.send(()).unwrap();
        tx.send(()).unwrap();
        assert_eq!(wait_for(&toggle, 2).count, 2);
        assert_eq!(toggle.take(), Presses::default());
        drop(tx);
        // A closed control just stops; dropping the toggle joins its thread.
        drop(toggle);
    }

    #[test]
    fn a_failing_button_is_reported_once_and_retried() {
        let dir = tempfile::tempdir().unwrap();
        // No sysfs GPIO tree there: every read fails the same way.
        let toggle = Toggle::watch(TriggerInput::gpio_at(dir.path(), 0, 12)).unwrap();
        let mut errors = Vec::new();
        for _ in 0..50 {
            errors.extend(toggle.take().errors);
            if !errors.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("gpiochip"), "{errors:?}");
        // The same error on the retry is not reported again.
        std::thread::sleep(RETRY_AFTER + 4 * WATCH_SLICE);
        assert_eq!(toggle.take(), Presses::default());
        assert_eq!(toggle.describe(), "GPIO gpiochip0 line 12");
    }
}
