//! Masked square median filter on 8-bit values (Huang's sliding histogram).
//!
//! Background estimation needs the median of the *field-of-view* pixels in a window:
//! letting the black surround into the window would pull the background down at the rim.

/// Median of the valid values in the `(2r+1)x(2r+1)` window around each cell.
///
/// `values` and `valid` are row-major `width x height`. Cells whose window holds no valid
/// value get `None`. With an even count the lower median is taken (deterministic, integer).
pub fn masked_median(
    values: &[u8],
    valid: &[bool],
    width: usize,
    height: usize,
    radius: usize,
) -> Vec<Option<u8>> {
    assert_eq!(values.len(), width * height);
    assert_eq!(valid.len(), width * height);
    let mut out = vec![None; width * height];
    let r = radius as isize;
    let (w, h) = (width as isize, height as isize);
    for y in 0..h {
        let (y0, y1) = ((y - r).max(0), (y + r).min(h - 1));
        let mut win = Window::new();
        // Columns that enter the window as it slides right; column x-r-1 leaves.
        let column = |win: &mut Window, x: isize, add: bool| {
            if x < 0 || x >= w {
                return;
            }
            for yy in y0..=y1 {
                let i = (yy * w + x) as usize;
                if valid[i] {
                    if add {
                        win.add(values[i]);
                    } else {
                        win.remove(values[i]);
                    }
                }
            }
        };
        for x in -r..r {
            column(&mut win, x, true);
        }
        for x in 0..w {
            column(&mut win, x + r, true);
            column(&mut win, x - r - 1, false);
            out[(y * w + x) as usize] = win.median();
        }
    }
    out
}

/// Histogram of the window with a running lower median `m`: `below` counts values < m.
struct Window {
    hist: [u32; 256],
    count: u32,
    m: usize,
    below: u32,
}

impl Window {
    fn new() -> Self {
        Self {
            hist: [0; 256],
            count: 0,
            m: 0,
            below: 0,
        }
    }

    fn add(&mut self, v: u8) {
        self.hist[v as usize] += 1;
        self.count += 1;
        if (v as usize) < self.m {
            self.below += 1;
        }
    }

    fn remove(&mut self, v: u8) {
        self.hist[v as usize] -= 1;
        self.count -= 1;
        if (v as usize) < self.m {
            self.below -= 1;
        }
    }

    /// Move `m` to the smallest value with at least half the count at or below it.
    fn median(&mut self) -> Option<u8> {
        if self.count == 0 {
            return None;
        }
        let half = self.count.div_ceil(2);
        while self.below >= half {
            self.m -= 1;
            self.below -= self.hist[self.m];
        }
        while self.below + self.hist[self.m] < half {
            self.below += self.hist[self.m];
            self.m += 1;
        }
        Some(self.m as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Straightforward reference: collect, sort, take the lower median.
    fn reference(values: &[u8], valid: &[bool], w: usize, h: usize, r: usize) -> Vec<Option<u8>> {
        let mut out = Vec::new();
        for y in 0..h {
            for x in 0..w {
                let mut win = Vec::new();
                for yy in y.saturating_sub(r)..=(y + r).min(h - 1) {
                    for xx in x.saturating_sub(r)..=(x + r).min(w - 1) {
                        if valid[yy * w + xx] {
                            win.push(values[yy * w + xx]);
                        }
                    }
                }
                win.sort();
                out.push((!win.is_empty()).then(|| win[(win.len() - 1) / 2]));
            }
        }
        out
    }

    #[test]
    fn matches_sorting_reference_on_random_data() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for &(w, h, r) in &[(17, 13, 3), (30, 9, 7), (5, 40, 1), (8, 8, 0)] {
            let values: Vec<u8> = (0..w * h).map(|_| rng.random()).collect();
            let valid: Vec<bool> = (0..w * h).map(|_| rng.random_bool(0.7)).collect();
            assert_eq!(
                masked_median(&values, &valid, w, h, r),
                reference(&values, &valid, w, h, r),
                "{w}x{h} r={r}"
            );
        }
    }

    #[test]
    fn empty_windows_are_none() {
        let out = masked_median(&[9; 12], &[false; 12], 4, 3, 1);
        assert!(out.iter().all(|v| v.is_none()));
    }
}
