//! From the stage-1 map to candidate positions for stage 2.
//!
//! Stage 1 gives a logit margin ("MA here" minus "no MA here") per 2x2-pixel cell.
//! Candidates are the map's local maxima over a window of `2 * nms_radius + 1` cells
//! above a minimum margin (at most `max_candidates`, best first); each is then moved to
//! the darkest spot within `search_radius` pixels in the preprocessed green channel, where
//! a microaneurysm's centre is, and candidates that end up closer than `merge_distance`
//! are merged.

use crate::geometry::{PatchGeometry, Planes};
use crate::mask::Mask;

/// Stage-1 output: the MA logit margin on a grid; cell (i, j) is centred on canonical
/// pixel `(j * stride + offset, i * stride + offset)`.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbMap {
    pub width: usize,
    pub height: usize,
    pub stride: usize,
    /// Coordinate of cell (0, 0)'s centre in the pixels the map describes: 0 for a map
    /// of a whole image padded by half a patch, half a patch for an unpadded input.
    pub offset: isize,
    pub data: Vec<f32>,
}

impl ProbMap {
    pub fn get(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.width + j]
    }

    /// Canonical pixel at the centre of cell (i, j).
    pub fn centre(&self, i: usize, j: usize) -> (isize, isize) {
        (
            j as isize * self.stride as isize + self.offset,
            i as isize * self.stride as isize + self.offset,
        )
    }
}

/// How candidates are picked (the `[stage1]` table of the model manifest).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandidateConfig {
    /// Minimum stage-1 logit margin (-4.6 is a probability of 0.01).
    pub min_margin: f32,
    /// At most this many candidates per image, best first.
    pub max_candidates: usize,
    /// A candidate is the highest cell within this many cells in every direction.
    pub nms_radius: usize,
    /// Refinement searches this many pixels around the cell centre.
    pub search_radius: usize,
    /// Candidates that end up closer than this (pixels) are merged, keeping the better.
    pub merge_distance: f64,
}

impl Default for CandidateConfig {
    fn default() -> Self {
        Self {
            min_margin: -4.6,
            max_candidates: 150,
            nms_radius: 2,
            search_radius: 2,
            merge_distance: 4.0,
        }
    }
}

/// A candidate in canonical pixel coordinates, with its stage-1 margin.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub x: usize,
    pub y: usize,
    pub stage1: f32,
}

/// Pick and refine candidates. `planes` are the preprocessed planes (green is channel
/// 1), `fov` the canonical field of view: candidates are only kept inside it.
pub fn find_candidates(
    map: &ProbMap,
    planes: &Planes,
    fov: &Mask,
    cfg: &CandidateConfig,
) -> Vec<Candidate> {
    let blob = BlobResponse::new(planes);
    let mut peaks = local_maxima(map, cfg.min_margin, cfg.nms_radius);
    peaks.sort_by(|a, b| b.2.total_cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1))));
    let mut out: Vec<Candidate> = Vec::new();
    for (i, j, p) in peaks {
        if out.len() >= cfg.max_candidates {
            break;
        }
        let (cx, cy) = map.centre(i, j);
        let Some((x, y)) = blob.darkest_near(cx, cy, cfg.search_radius, fov) else {
            continue;
        };
        let close = out.iter().any(|c| {
            let (dx, dy) = (c.x as f64 - x as f64, c.y as f64 - y as f64);
            dx * dx + dy * dy < cfg.merge_distance * cfg.merge_distance
        });
        if !close {
            out.push(Candidate { x, y, stage1: p });
        }
    }
    out
}

/// Cells at least as high as every cell within `radius` (ties broken by raster order) and
/// at least `min`, as (row, column, value).
fn local_maxima(map: &ProbMap, min: f32, radius: usize) -> Vec<(usize, usize, f32)> {
    let (w, h) = (map.width, map.height);
    let mut out = Vec::new();
    for i in 0..h {
        for j in 0..w {
            let p = map.get(i, j);
            if p < min {
                continue;
            }
            let r = radius as isize;
            let mut is_max = true;
            'n: for di in -r..=r {
                for dj in -r..=r {
                    let (ni, nj) = (i as isize + di, j as isize + dj);
                    if (di, dj) == (0, 0)
                        || ni < 0
                        || nj < 0
                        || ni >= h as isize
                        || nj >= w as isize
                    {
                        continue;
                    }
                    let q = map.get(ni as usize, nj as usize);
                    // Strictly higher neighbour, or an equal one earlier in raster order.
                    if q > p || (q == p && (ni, nj) < (i as isize, j as isize)) {
                        is_max = false;
                        break 'n;
                    }
                }
            }
            if is_max {
                out.push((i, j, p));
            }
        }
    }
    out
}

/// Green channel averaged over 3x3 (so single noisy pixels do not win), evaluated lazily.
struct BlobResponse<'a> {
    green: &'a [f32],
    width: usize,
    height: usize,
}

impl<'a> BlobResponse<'a> {
    fn new(planes: &'a Planes) -> Self {
        Self {
            green: planes.channel(1),
            width: planes.width,
            height: planes.height,
        }
    }

    fn at(&self, x: usize, y: usize) -> f32 {
        let mut sum = 0.0;
        for yy in y.saturating_sub(1)..=(y + 1).min(self.height - 1) {
            for xx in x.saturating_sub(1)..=(x + 1).min(self.width - 1) {
                sum += self.green[yy * self.width + xx];
            }
        }
        sum
    }

    /// Darkest (3x3-summed, then own value) FOV pixel within `radius` of (cx, cy); ties
    /// to raster order.
    fn darkest_near(
        &self,
        cx: isize,
        cy: isize,
        radius: usize,
        fov: &Mask,
    ) -> Option<(usize, usize)> {
        let r = radius as isize;
        let mut best: Option<((f32, f32), usize, usize)> = None;
        for y in (cy - r).max(0)..=(cy + r).min(self.height as isize - 1) {
            for x in (cx - r).max(0)..=(cx + r).min(self.width as isize - 1) {
                if !fov.get(x as i64, y as i64) {
                    continue;
                }
                // The 3x3 sum is flat around a 1-2 px spot: its own value breaks ties.
                let (x, y) = (x as usize, y as usize);
                let v = (self.at(x, y), self.green[y * self.width + x]);
                if best.is_none_or(|(b, _, _)| v < b) {
                    best = Some((v, x, y));
                }
            }
        }
        best.map(|(_, x, y)| (x, y))
    }
}

/// Stage 2's input: one `geometry` patch of `planes` per candidate, centred on it, in
/// the candidates' order.
pub fn patches(geometry: &PatchGeometry, planes: &Planes, candidates: &[Candidate]) -> Vec<f32> {
    let len = geometry.len();
    let mut patches = vec![0.0f32; candidates.len() * len];
    for (c, patch) in candidates.iter().zip(patches.chunks_exact_mut(len)) {
        geometry.extract(planes, c.x as i64, c.y as i64, patch);
    }
    patches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planes_with_dark_spots(w: usize, h: usize, spots: &[(usize, usize)]) -> Planes {
        let mut p = Planes::zeros(w, h);
        for &(x, y) in spots {
            p.channel_mut(1)[y * w + x] = -5.0;
            p.channel_mut(1)[y * w + x + 1] = -2.0;
        }
        p
    }

    fn full_fov(w: usize, h: usize) -> Mask {
        Mask::from_vec(w as u32, h as u32, vec![true; w * h]).unwrap()
    }

    #[test]
    fn peaks_are_refined_to_the_dark_spot_and_capped() {
        let (w, h) = (80, 64);
        let planes = planes_with_dark_spots(w, h, &[(21, 13), (60, 45)]);
        let mut map = ProbMap {
            width: 10,
            height: 8,
            stride: 8,
            offset: 0,
            data: vec![0.1; 80],
        };
        // Cell (2, 3) is centred at (24, 16), near the spot at (21, 13).
        map.data[2 * 10 + 3] = 0.9;
        // Cell (6, 7) centred at (56, 48), near (60, 45).
        map.data[6 * 10 + 7] = 0.8;
        // A weaker peak far from any spot.
        map.data[10 + 8] = 0.6;
        let cfg = CandidateConfig {
            max_candidates: 2,
            search_radius: 6,
            ..CandidateConfig::default()
        };
        let c = find_candidates(&map, &planes, &full_fov(w, h), &cfg);
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].x, c[0].y, c[0].stage1), (21, 13, 0.9));
        assert_eq!((c[1].x, c[1].y), (60, 45));
    }

    #[test]
    fn peaks_suppress_lower_cells_within_the_radius() {
        let (w, h) = (40, 8);
        let planes = Planes::zeros(w, h);
        let mut map = ProbMap {
            width: 20,
            height: 4,
            stride: 2,
            offset: 0,
            data: vec![-10.0; 80],
        };
        // Three peaks on row 1: columns 2 and 4 are 2 cells apart, 4 and 9 are 5 apart.
        map.data[20 + 2] = 3.0;
        map.data[20 + 4] = 5.0;
        map.data[20 + 9] = 1.0;
        // Below the minimum margin: never a candidate.
        map.data[60 + 15] = -6.0;
        let cfg = |nms_radius| CandidateConfig {
            nms_radius,
            search_radius: 0,
            ..CandidateConfig::default()
        };
        let at = |c: &[Candidate]| c.iter().map(|c| (c.x, c.y)).collect::<Vec<_>>();
        let fov = full_fov(w, h);
        assert_eq!(
            at(&find_candidates(&map, &planes, &fov, &cfg(1))),
            [(8, 2), (4, 2), (18, 2)]
        );
        assert_eq!(
            at(&find_candidates(&map, &planes, &fov, &cfg(2))),
            [(8, 2), (18, 2)]
        );
    }

    #[test]
    fn plateaus_give_one_peak_and_outside_fov_is_skipped() {
        let (w, h) = (40, 40);
        let planes = planes_with_dark_spots(w, h, &[(10, 10)]);
        let map = ProbMap {
            width: 5,
            height: 5,
            stride: 8,
            offset: 0,
            data: vec![0.7; 25],
        };
        let c = find_candidates(&map, &planes, &full_fov(w, h), &CandidateConfig::default());
        assert_eq!(c.len(), 1);
        let empty = Mask::new(w as u32, h as u32);
        assert!(find_candidates(&map, &planes, &empty, &CandidateConfig::default()).is_empty());
    }
}
