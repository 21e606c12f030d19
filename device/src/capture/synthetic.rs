//! Synthetic fundus frames as a source: the demo and the fast end-to-end tests need
//! frames without a camera or datasets.

use std::time::SystemTime;

use super::{Frame, FrameEvent, FrameSource, SourceState};
use ma_synthetic::{SyntheticParams, generate};

/// `count` frames from [`generate`] with seeds `seed, seed + 1, ...`; frame `id` i has
/// seed `seed + i`, so a frame can be regenerated (with its ground truth) from its id.
#[derive(Debug, Clone)]
pub struct SyntheticSource {
    params: SyntheticParams,
    seed: u64,
    count: u64,
    next: u64,
    finished: bool,
}

impl SyntheticSource {
    pub fn new(params: SyntheticParams, seed: u64, count: u64) -> Self {
        Self {
            params,
            seed,
            count,
            next: 0,
            finished: false,
        }
    }

    /// The generator seed of frame `id`.
    pub fn seed_of(&self, id: u64) -> u64 {
        self.seed.wrapping_add(id)
    }
}

impl FrameSource for SyntheticSource {
    fn next_frame(&mut self) -> FrameEvent {
        if self.next >= self.count {
            self.finished = true;
            return FrameEvent::Exhausted;
        }
        let id = self.next;
        self.next += 1;
        let seed = self.seed_of(id);
        FrameEvent::Frame(Frame {
            id,
            source: format!("synthetic seed {seed}"),
            file: None,
            image: generate(&self.params, seed).image,
            captured_at: SystemTime::now(),
        })
    }

    fn state(&self) -> SourceState {
        if self.finished {
            SourceState::Finished {
                delivered: self.next,
            }
        } else {
            SourceState::Synthetic {
                position: self.next,
                total: self.count,
            }
        }
    }

    fn describe(&self) -> String {
        format!(
            "synthetic {} frames {}x{}, seeds {} to {}",
            self.count,
            self.params.width,
            self.params.height,
            self.seed,
            // The last seed drawn, not one past it: frame i uses seed + i.
            self.seed.wrapping_add(self.count.saturating_sub(1))
        )
    }
}
