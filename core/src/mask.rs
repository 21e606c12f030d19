//! A binary mask over an image grid (field of view, lesion pixels, uncertain regions).

use anyhow::{Result, bail};

/// Row-major boolean mask, one byte per pixel for cheap random access.
#[derive(Clone, PartialEq, Eq)]
pub struct Mask {
    width: u32,
    height: u32,
    data: Vec<bool>,
}

impl Mask {
    pub fn new(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            data: vec![false; width as usize * height as usize],
        }
    }

    pub fn from_vec(width: u32, height: u32, data: Vec<bool>) -> Result<Self> {
        if data.len() != width as usize * height as usize {
            bail!(
                "mask data has {} pixels, expected {width}x{height}",
                data.len()
            );
        }
        Ok(Self {
            width,
            height,
            data,
        })
    }

    /// Mask of the pixels of a grey image where `keep(value)` holds.
    pub fn from_luma(img: &image::GrayImage, keep: impl Fn(u8) -> bool) -> Self {
        let data = img.as_raw().iter().map(|&v| keep(v)).collect();
        Self {
            width: img.width(),
            height: img.height(),
            data,
        }
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    pub fn as_slice(&self) -> &[bool] {
        &self.data
    }

    pub fn as_mut_slice(&mut self) -> &mut [bool] {
        &mut self.data
    }

    /// Value at (x, y); `false` outside the grid.
    pub fn get(&self, x: i64, y: i64) -> bool {
        if x < 0 || y < 0 || x >= self.width as i64 || y >= self.height as i64 {
            return false;
        }
        self.data[y as usize * self.width as usize + x as usize]
    }

    pub fn set(&mut self, x: u32, y: u32, value: bool) {
        let w = self.width as usize;
        self.data[y as usize * w + x as usize] = value;
    }

    pub fn count(&self) -> usize {
        self.data.iter().filter(|&&v| v).count()
    }

    /// Inclusive bounding box `(x0, y0, x1, y1)` of the set pixels, `None` when empty.
    pub fn bounding_box(&self) -> Option<(u32, u32, u32, u32)> {
        let w = self.width as usize;
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        for (i, _) in self.data.iter().enumerate().filter(|(_, v)| **v) {
            let (x, y) = (i % w, i / w);
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        (x0 != usize::MAX).then_some((x0 as u32, y0 as u32, x1 as u32, y1 as u32))
    }

    /// The largest 8-connected component (the first in raster order among equals).
    ///
    /// Works on runs of pixels instead of pixels: a field of view has a million of them.
    pub fn largest_component_8(&self) -> Mask {
        let runs = self.runs(true);
        let root = label_runs(&runs, true);
        let mut size = vec![0usize; runs.len()];
        for (run, &r) in runs.iter().zip(&root) {
            size[r] += run.len();
        }
        // Roots are the first run of their component, so ties go to raster order.
        let best = (0..runs.len()).max_by_key(|&r| (size[r], std::cmp::Reverse(r)));
        let mut out = Mask::new(self.width, self.height);
        if let Some(best) = best {
            for (run, _) in runs.iter().zip(&root).filter(|(_, r)| **r == best) {
                out.fill_run(run);
            }
        }
        out
    }

    /// Set every unset pixel that cannot reach the border through unset pixels
    /// (4-connected): the holes inside the set region.
    pub fn fill_holes(&self) -> Mask {
        let runs = self.runs(false);
        let root = label_runs(&runs, false);
        let (w, h) = (self.width, self.height);
        let mut touches_border = vec![false; runs.len()];
        for (run, &r) in runs.iter().zip(&root) {
            if run.y == 0 || run.y == h - 1 || run.x0 == 0 || run.x1 == w - 1 {
                touches_border[r] = true;
            }
        }
        let mut out = Mask {
            width: w,
            height: h,
            data: vec![true; self.data.len()],
        };
        for (run, &r) in runs.iter().zip(&root) {
            if touches_border[r] {
                out.fill_run_with(run, false);
            }
        }
        out
    }

    /// Maximal horizontal runs of pixels equal to `value`, in raster order.
    fn runs(&self, value: bool) -> Vec<Run> {
        let w = self.width as usize;
        let mut runs = Vec::new();
        for (y, row) in self.data.chunks_exact(w.max(1)).enumerate() {
            let mut x = 0;
            while x < w {
                if row[x] != value {
                    x += 1;
                    continue;
                }
                let x0 = x;
                while x < w && row[x] == value {
                    x += 1;
                }
                runs.push(Run {
                    y: y as u32,
                    x0: x0 as u32,
                    x1: (x - 1) as u32,
                });
            }
        }
        runs
    }

    fn fill_run(&mut self, run: &Run) {
        self.fill_run_with(run, true);
    }

    fn fill_run_with(&mut self, run: &Run, value: bool) {
        let row = run.y as usize * self.width as usize;
        self.data[row + run.x0 as usize..=row + run.x1 as usize].fill(value);
    }

    /// 8-connected components of the set pixels, each as a list of `(x, y)` pixels,
    /// in raster order of their first pixel (deterministic).
    pub fn components_8(&self) -> Vec<Vec<(u32, u32)>> {
        let (w, h) = (self.width as i64, self.height as i64);
        let mut seen = vec![false; self.data.len()];
        let mut out = Vec::new();
        let mut stack = Vec::new();
        for start in 0..self.data.len() {
            if !self.data[start] || seen[start] {
                continue;
            }
            seen[start] = true;
            stack.push(start);
            let mut comp = Vec::new();
            while let Some(i) = stack.pop() {
                let (x, y) = ((i as i64) % w, (i as i64) / w);
                comp.push((x as u32, y as u32));
                for dy in -1..=1 {
                    for dx in -1..=1 {
                        let (nx, ny) = (x + dx, y + dy);
                        if nx < 0 || ny < 0 || nx >= w || ny >= h {
                            continue;
                        }
                        let j = (ny * w + nx) as usize;
                        if self.data[j] && !seen[j] {
                            seen[j] = true;
                            stack.push(j);
                        }
                    }
                }
            }
            comp.sort_by_key(|&(x, y)| (y, x));
            out.push(comp);
        }
        out
    }
}

/// A horizontal run of equal pixels, `x0..=x1` on row `y`.
struct Run {
    y: u32,
    x0: u32,
    x1: u32,
}

impl Run {
    fn len(&self) -> usize {
        (self.x1 - self.x0 + 1) as usize
    }
}

/// Connected-component label of each run (raster order in, root = index of the
/// component's first run out). Runs on neighbouring rows touch when they overlap, or,
/// with 8-connectivity, meet at a corner.
fn label_runs(runs: &[Run], eight: bool) -> Vec<usize> {
    fn find(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let reach = u32::from(eight);
    let mut parent: Vec<usize> = (0..runs.len()).collect();
    // Runs of the previous row that can still touch the current run: [first, row_start).
    // Both rows are sorted by x without overlaps, so a run that ends left of this one ends
    // left of the rest of the row too: one sweep per pair of rows, not every pair of runs
    // (a row of alternating pixels has thousands of runs).
    let (mut first, mut row_start) = (0, 0);
    for i in 0..runs.len() {
        if i > 0 && runs[i].y != runs[i - 1].y {
            first = if runs[i].y == runs[i - 1].y + 1 {
                row_start
            } else {
                i
            };
            row_start = i;
        }
        while first < row_start && runs[first].x1 + reach < runs[i].x0 {
            first += 1;
        }
        for j in first..row_start {
            let (a, b) = (&runs[i], &runs[j]);
            if b.x0 > a.x1 + reach {
                break;
            }
            if b.x1 + reach >= a.x0 {
                let (ra, rb) = (find(&mut parent, i), find(&mut parent, j));
                // The smaller index (the earlier run) becomes the root.
                let (lo, hi) = (ra.min(rb), ra.max(rb));
                parent[hi] = lo;
            }
        }
    }
    (0..runs.len()).map(|i| find(&mut parent, i)).collect()
}

/// A summary, not a million booleans: masks appear in test failure messages.
impl std::fmt::Debug for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Mask({}x{}, {} set, bbox {:?})",
            self.width,
            self.height,
            self.count(),
            self.bounding_box()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_are_8_connected_and_ordered() {
        let mut m = Mask::new(6, 4);
        // Diagonal pair: one component under 8-connectivity.
        m.set(0, 0, true);
        m.set(1, 1, true);
        // Separate blob.
        m.set(4, 2, true);
        m.set(5, 2, true);
        let comps = m.components_8();
        assert_eq!(comps, vec![vec![(0, 0), (1, 1)], vec![(4, 2), (5, 2)]]);
        assert_eq!(m.bounding_box(), Some((0, 0, 5, 2)));
        assert_eq!(m.count(), 4);
        let mut big = m.clone();
        big.set(5, 3, true);
        let largest = big.largest_component_8();
        assert_eq!(largest.count(), 3);
        assert!(largest.get(5, 3) && !largest.get(0, 0));
    }

    #[test]
    fn run_labelling_matches_pixel_labelling() {
        // A U shape whose arms join only at the bottom, a diagonal chain, a dot.
        let rows = [
            "#...#..#",
            "#...#...#",
            "#####....",
            "......#..",
            ".....#...",
            "#........",
        ];
        let (w, h) = (9, rows.len() as u32);
        let mut m = Mask::new(w, h);
        for (y, row) in rows.iter().enumerate() {
            for (x, ch) in row.chars().enumerate() {
                m.set(x as u32, y as u32, ch == '#');
            }
        }
        let largest = m.largest_component_8();
        let by_pixels = m
            .components_8()
            .into_iter()
            .max_by_key(|c| c.len())
            .unwrap();
        assert_eq!(largest.count(), by_pixels.len());
        assert!(
            by_pixels
                .iter()
                .all(|&(x, y)| largest.get(x as i64, y as i64))
        );
        // The U's inside is open at the top: not a hole. Closing it makes one.
        assert_eq!(m.fill_holes(), m);
        for x in 0..5 {
            m.set(x, 0, true);
        }
        let filled = m.fill_holes();
        assert!(filled.get(2, 1) && filled.get(3, 1));
        assert_eq!(filled.count(), m.count() + 3);
        assert!(!m.get(-1, 0) && !m.get(6, 0));
    }

    /// The sweep in `label_runs` gives the labels of comparing every pair of runs on
    /// neighbouring rows, on random masks of several densities (sparse dots, noise,
    /// mostly set), with both connectivities.
    #[test]
    fn run_labelling_sweep_matches_all_pairs() {
        fn all_pairs(runs: &[Run], eight: bool) -> Vec<usize> {
            let reach = u32::from(eight);
            let mut label: Vec<usize> = (0..runs.len()).collect();
            let touch = |a: &Run, b: &Run| {
                a.y.abs_diff(b.y) == 1 && b.x0 <= a.x1 + reach && b.x1 + reach >= a.x0
            };
            // Propagate the smallest index until nothing changes.
            loop {
                let mut changed = false;
                for i in 0..runs.len() {
                    for j in 0..runs.len() {
                        if touch(&runs[i], &runs[j]) && label[j] < label[i] {
                            label[i] = label[j];
                            changed = true;
                        }
                    }
                }
                if !changed {
                    return label;
                }
            }
        }
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for density in [5u64, 30, 50, 70, 95] {
            for (w, h) in [(1, 9), (9, 1), (17, 13), (40, 30)] {
                let mut m = Mask::new(w, h);
                for y in 0..h {
                    for x in 0..w {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        m.set(x, y, state % 100 < density);
                    }
                }
                for value in [true, false] {
                    let runs = m.runs(value);
                    for eight in [true, false] {
                        assert_eq!(
                            label_runs(&runs, eight),
                            all_pairs(&runs, eight),
                            "{w}x{h} density {density} value {value} eight {eight}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn from_vec_checks_size() {
        assert!(Mask::from_vec(2, 2, vec![true; 3]).is_err());
    }
}
