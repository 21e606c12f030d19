//! The image-level referral step: what the referral network sees and how its outputs map
//! back onto the photo.
//!
//! The network looks at the whole field of view at a reduced, fixed resolution: the
//! canonical planes of [`preprocess`](crate::preprocess) (so every camera is normalised the
//! same way), cropped to the square around the field of view and averaged down to
//! `input_side` pixels. It answers with one referral margin and an attention map of
//! `input_side / attention_stride` cells a side; [`ReferralView`] maps input pixels and
//! attention cells back to original-photo coordinates, for boxes, heatmaps and records.
//!
//! Trainer and device both build their input here, so the network sees the same numbers
//! in the field as in training.

use anyhow::{Result, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::geometry::{CHANNELS, Planes, ScaleMap};
use crate::manifest::OperatingPoint;
use crate::preprocess::Preprocessed;

/// The referral settings of a model set (`[referral]` in the manifest).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferralConfig {
    /// Side of the square network input, in pixels.
    pub input_side: usize,
    /// Input pixels per attention cell (the attention map has `input_side /
    /// attention_stride` cells a side).
    pub attention_stride: usize,
    /// How many attention boxes a result reports (the zoom-in regions).
    pub boxes: usize,
    /// The refer decision, chosen on cross-validation.
    pub rule: ReferRule,
    /// What the network was trained on (free text).
    pub training_data: String,
    /// Cross-validated AUC of the referral score for referable DR (by patient).
    pub cv_auc: f64,
    /// The zoom-in step, when the set has a crop classifier (role `zoom`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zoom: Option<ZoomConfig>,
}

/// The zoom-in step (`[referral.zoom]`): the `crops` strongest attention cells are cropped
/// from the full-resolution preprocessed photo ([`ReferralView::zoom_crop`]), scored by
/// the crop classifier, and the mean of their margins is merged with the referral margin
/// ([`merged_margin`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoomConfig {
    /// How many cells are cropped and scored.
    pub crops: usize,
    /// Side of a crop in attention cells, centred on its cell.
    pub crop_cells: f64,
    /// Side of a crop in pixels, as the classifier reads it.
    pub crop_side: usize,
}

/// The referral margin of a set with a zoom-in step: the mean of the network's margin
/// and the crop classifier's mean margin. `refer_score` is its sigmoid.
pub fn merged_margin(referral_margin: f64, zoom_margin: f64) -> f64 {
    (referral_margin + zoom_margin) / 2.0
}

/// When the device says "refer": the referral score at or above `score_threshold`, or
/// (when set) at least `ma_count` microaneurysms at `operating_point`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferRule {
    pub score_threshold: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ma_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operating_point: Option<OperatingPoint>,
}

impl ReferRule {
    /// Whether an eye with this referral score and these MA counts is referred;
    /// `ma_count_at` gives the number of MAs at an operating point.
    pub fn refers(&self, score: f64, ma_count_at: impl Fn(OperatingPoint) -> usize) -> bool {
        if score >= self.score_threshold {
            return true;
        }
        match (self.ma_count, self.operating_point) {
            (Some(n), Some(op)) => ma_count_at(op) >= n as usize,
            _ => false,
        }
    }
}

impl ReferralConfig {
    /// Cells per side of the attention map.
    pub fn attention_side(&self) -> usize {
        self.input_side / self.attention_stride
    }

    /// Checks a manifest or the trainer relies on.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.input_side >= 16,
            "referral.input_side must be at least 16, got {}",
            self.input_side
        );
        ensure!(
            self.attention_stride > 0 && self.input_side.is_multiple_of(self.attention_stride),
            "referral.attention_stride ({}) must divide referral.input_side ({})",
            self.attention_stride,
            self.input_side
        );
        let t = self.rule.score_threshold;
        ensure!(
            (0.0..=1.0).contains(&t),
            "referral.rule.score_threshold must be in [0, 1], got {t}"
        );
        ensure!(
            self.rule.ma_count.is_some() == self.rule.operating_point.is_some(),
            "referral.rule: ma_count and operating_point go together"
        );
        if let Some(z) = &self.zoom {
            ensure!(
                (1..=self.attention_side() * self.attention_side()).contains(&z.crops),
                "referral.zoom.crops must be 1 to the number of attention cells, got {}",
                z.crops
            );
            ensure!(
                z.crop_cells.is_finite() && z.crop_cells > 0.0 && z.crop_cells <= 8.0,
                "referral.zoom.crop_cells must be in (0, 8], got {}",
                z.crop_cells
            );
            ensure!(
                (8..=512).contains(&z.crop_side),
                "referral.zoom.crop_side must be 8 to 512 pixels, got {}",
                z.crop_side
            );
        }
        Ok(())
    }
}

/// The referral score of the network's margin (referable minus not): what `detect`
/// reports as `refer_score`, in [0, 1].
pub fn refer_score(margin: f64) -> f64 {
    1.0 / (1.0 + (-margin).exp())
}

/// The referral network's input and where it lies in the photo.
#[derive(Clone, Debug, PartialEq)]
pub struct ReferralView {
    /// `side` x `side` planes (CHW), the square around the field of view averaged down.
    pub planes: Planes,
    /// Canonical coordinates of the input's top-left corner.
    pub origin: (f64, f64),
    /// Canonical pixels per input pixel.
    pub step: f64,
    /// Canonical <-> original coordinates of the photo.
    pub scale: ScaleMap,
}

impl ReferralView {
    /// The input of a preprocessed photo: the square around its field of view (centred on
    /// the FOV's bounding box, side its longer edge) averaged down to `side` pixels. Parts
    /// of the square beyond the canonical image count as 0, the value preprocessing gives
    /// outside the field of view.
    pub fn of(pre: &Preprocessed, side: usize) -> Result<Self> {
        let (w, h) = (pre.fov.width() as usize, pre.fov.height() as usize);
        let Some((x_lo, y_lo, x_last, y_last)) = pre.fov.bounding_box() else {
            bail!("the photo has an empty field of view: no referral input");
        };
        let (x_lo, y_lo) = (x_lo as usize, y_lo as usize);
        let (x_hi, y_hi) = (x_last as usize + 1, y_last as usize + 1);
        ensure!(side > 0, "referral input side must be positive");
        let extent = (x_hi - x_lo).max(y_hi - y_lo) as f64;
        let origin = (
            (x_lo + x_hi) as f64 / 2.0 - extent / 2.0,
            (y_lo + y_hi) as f64 / 2.0 - extent / 2.0,
        );
        let step = extent / side as f64;
        let planes = area_resample(&pre.planes, (w, h), origin, step, side);
        Ok(Self {
            planes,
            origin,
            step,
            scale: pre.scale,
        })
    }

    /// Side of the input in pixels.
    pub fn side(&self) -> usize {
        self.planes.width
    }

    /// Original-photo coordinates (pixel centres at integers, as detections) of input
    /// position `(u, v)` (input pixels, pixel corners at integers; the origin and the
    /// footprints of [`ReferralView::of`] count canonical pixel corners too, hence the
    /// half-pixel shifts).
    pub fn to_original(&self, u: f64, v: f64) -> (f64, f64) {
        let cx = self.origin.0 + u * self.step - 0.5;
        let cy = self.origin.1 + v * self.step - 0.5;
        self.scale.to_original(cx, cy)
    }

    /// Input position of original-photo point `(x, y)`: the inverse of
    /// [`ReferralView::to_original`].
    pub fn from_original(&self, x: f64, y: f64) -> (f64, f64) {
        let (cx, cy) = self.scale.to_canonical(x, y);
        (
            (cx + 0.5 - self.origin.0) / self.step,
            (cy + 0.5 - self.origin.1) / self.step,
        )
    }

    /// The `n` strongest cells of a map over the input (`map_side` cells a side, each
    /// `side / map_side` input pixels), strongest first, as boxes in original coordinates.
    pub fn top_boxes(&self, map: &[f32], map_side: usize, n: usize) -> Vec<AttentionBox> {
        assert_eq!(
            map.len(),
            map_side * map_side,
            "map is not map_side squared"
        );
        let cell = self.side() as f64 / map_side as f64;
        top_cells(map, n)
            .into_iter()
            .map(|i| {
                let (u, v) = ((i % map_side) as f64, (i / map_side) as f64);
                let (x0, y0) = self.to_original(u * cell, v * cell);
                let (x1, y1) = self.to_original((u + 1.0) * cell, (v + 1.0) * cell);
                AttentionBox {
                    x0,
                    y0,
                    x1,
                    y1,
                    weight: map[i] as f64,
                }
            })
            .collect()
    }

    /// The zoom-in crop of cell `cell` (row-major) of a map over the input (`map_side`
    /// cells a side): the square of `cells` cells a side centred on that cell, taken from
    /// the canonical (full-resolution) planes of `pre` (the photo this view was made
    /// of) and area-averaged to `side` x `side` pixels; parts beyond the image count as 0.
    pub fn zoom_crop(
        &self,
        pre: &Preprocessed,
        map_side: usize,
        cell: usize,
        cells: f64,
        side: usize,
    ) -> Planes {
        let cell_px = self.side() as f64 / map_side as f64 * self.step;
        let (u, v) = ((cell % map_side) as f64, (cell / map_side) as f64);
        let centre = (
            self.origin.0 + (u + 0.5) * cell_px,
            self.origin.1 + (v + 0.5) * cell_px,
        );
        let extent = cells * cell_px;
        let origin = (centre.0 - extent / 2.0, centre.1 - extent / 2.0);
        let size = (pre.planes.width, pre.planes.height);
        area_resample(&pre.planes, size, origin, extent / side as f64, side)
    }

    /// The value of a map over the input (`map_side` cells a side) at original-photo point
    /// `(x, y)`, bilinear between cell centres; `None` outside the input square.
    pub fn map_at(&self, map: &[f32], map_side: usize, x: f64, y: f64) -> Option<f32> {
        let (u, v) = self.from_original(x, y);
        let side = self.side() as f64;
        if !(0.0..side).contains(&u) || !(0.0..side).contains(&v) {
            return None;
        }
        let cell = side / map_side as f64;
        let (fu, fv) = (u / cell - 0.5, v / cell - 0.5);
        let last = map_side as f64 - 1.0;
        let (fu, fv) = (fu.clamp(0.0, last), fv.clamp(0.0, last));
        let (u0, v0) = (fu.floor() as usize, fv.floor() as usize);
        let (u1, v1) = ((u0 + 1).min(map_side - 1), (v0 + 1).min(map_side - 1));
        let (a, b) = ((fu - u0 as f64) as f32, (fv - v0 as f64) as f32);
        let at = |uu: usize, vv: usize| map[vv * map_side + uu];
        let top = at(u0, v0) * (1.0 - a) + at(u1, v0) * a;
        let bottom = at(u0, v1) * (1.0 - a) + at(u1, v1) * a;
        Some(top * (1.0 - b) + bottom * b)
    }
}

/// Indices of the `n` largest values of `map`, largest first; equal values keep their
/// order (a stable sort), so results are reproducible. The zoom-in regions.
pub fn top_cells(map: &[f32], n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..map.len()).collect();
    order.sort_by(|&a, &b| map[b].total_cmp(&map[a]));
    order.truncate(n);
    order
}

/// One attention region, in original-photo pixels.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttentionBox {
    pub x0: f64,
    pub y0: f64,
    pub x1: f64,
    pub y1: f64,
    /// The attention value of the cell (0..1).
    pub weight: f64,
}

impl AttentionBox {
    /// Whether original-photo point `(x, y)` lies in the box.
    pub fn contains(&self, x: f64, y: f64) -> bool {
        (self.x0..self.x1).contains(&x) && (self.y0..self.y1).contains(&y)
    }
}

/// Average `src` (`size` = width, height) over the `side` x `side` grid of squares of
/// `step` pixels whose top-left corner is at `origin`. Each output pixel averages the
/// source pixels whose index lies in its footprint `[lo, hi)` (rounded down, at least one
/// pixel); pixels beyond the source count as 0.
fn area_resample(
    src: &Planes,
    size: (usize, usize),
    origin: (f64, f64),
    step: f64,
    side: usize,
) -> Planes {
    let (w, h) = size;
    let ranges = |start: f64| -> Vec<(i64, i64)> {
        (0..side)
            .map(|i| {
                let lo = (start + i as f64 * step).floor() as i64;
                let hi = ((start + (i + 1) as f64 * step).floor() as i64).max(lo + 1);
                (lo, hi)
            })
            .collect()
    };
    let (xr, yr) = (ranges(origin.0), ranges(origin.1));
    let mut out = Planes::zeros(side, side);
    let mut rows = vec![0f32; side * h];
    for c in 0..CHANNELS {
        let plane = src.channel(c);
        // Horizontal pass: every source row averaged into `side` columns.
        for y in 0..h {
            let row = &plane[y * w..(y + 1) * w];
            for (i, &(lo, hi)) in xr.iter().enumerate() {
                let (a, b) = (
                    lo.clamp(0, w as i64) as usize,
                    hi.clamp(0, w as i64) as usize,
                );
                let sum: f32 = row[a..b].iter().sum();
                rows[y * side + i] = sum / (hi - lo) as f32;
            }
        }
        // Vertical pass.
        let dst = out.channel_mut(c);
        for (j, &(lo, hi)) in yr.iter().enumerate() {
            let (a, b) = (
                lo.clamp(0, h as i64) as usize,
                hi.clamp(0, h as i64) as usize,
            );
            for i in 0..side {
                let sum: f32 = (a..b).map(|y| rows[y * side + i]).sum();
                dst[j * side + i] = sum / (hi - lo) as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::Mask;

    fn preprocessed(w: usize, h: usize, fov: (usize, usize, usize, usize)) -> Preprocessed {
        let mut planes = Planes::zeros(w, h);
        let mut mask = Mask::new(w as u32, h as u32);
        for y in fov.1..fov.3 {
            for x in fov.0..fov.2 {
                mask.set(x as u32, y as u32, true);
                for c in 0..CHANNELS {
                    planes.channel_mut(c)[y * w + x] = (c + 1) as f32;
                }
            }
        }
        Preprocessed {
            planes,
            fov: mask,
            scale: ScaleMap::between((2 * w as u32, 2 * h as u32), (w as u32, h as u32)),
            original_size: (2 * w as u32, 2 * h as u32),
            original_fov_diameter: 0.0,
        }
    }

    #[test]
    fn zoom_crops_come_from_the_full_resolution_planes_around_the_cell() {
        let mut pre = preprocessed(64, 64, (0, 0, 64, 64));
        for y in 0..64 {
            for x in 0..64 {
                pre.planes.channel_mut(0)[y * 64 + x] = (x + 100 * y) as f32;
            }
        }
        // Side 8 over a 64-px FOV: 8 canonical px per input px; a 4-cell map: 16 px a cell.
        let view = ReferralView::of(&pre, 8).unwrap();
        // Cell (2, 1), one cell wide at full resolution: canonical x 32..48, y 16..32.
        let crop = view.zoom_crop(&pre, 4, 4 + 2, 1.0, 16);
        assert_eq!((crop.width, crop.height), (16, 16));
        for j in 0..16 {
            for i in 0..16 {
                let want = ((32 + i) + 100 * (16 + j)) as f32;
                assert_eq!(crop.channel(0)[j * 16 + i], want, "({i}, {j})");
            }
        }
        // Two cells around the corner cell, halved: the part beyond the image is 0 and
        // each pixel averages 2x2 canonical pixels.
        let crop = view.zoom_crop(&pre, 4, 0, 2.0, 16);
        assert_eq!(crop.channel(0)[0], 0.0);
        assert_eq!(crop.channel(0)[4 * 16 + 4], 0.5 + 100.0 * 0.5);
        assert_eq!(crop.channel(1)[15 * 16 + 15], 2.0);
    }

    #[test]
    fn input_is_the_square_around_the_fov_averaged_down() {
        // FOV 40 wide, 20 high at (10, 30): the square is 40 a side centred on it, so
        // the input's top and bottom quarters lie outside the FOV.
        let pre = preprocessed(64, 64, (10, 30, 50, 50));
        let view = ReferralView::of(&pre, 8).unwrap();
        assert_eq!((view.origin, view.step), ((10.0, 20.0), 5.0));
        let p = &view.planes;
        assert_eq!(p.get(0, 3, 0), 0.0, "above the FOV");
        assert_eq!(p.get(0, 3, 3), 1.0, "inside");
        assert_eq!(p.get(2, 3, 4), 3.0, "channel 2 inside");
        assert_eq!(p.get(1, 0, 7), 0.0, "below the FOV");
        // Input pixel (0, 2) starts at canonical corner (10, 30), original corner (20, 60),
        // whose pixel-centre coordinates are (19.5, 59.5).
        assert_eq!(view.to_original(0.0, 2.0), (19.5, 59.5));
        assert_eq!(view.from_original(19.5, 59.5), (0.0, 2.0));
    }

    #[test]
    fn a_square_beyond_the_image_averages_in_zeros() {
        // FOV touching the left edge and taller than wide: the square sticks out left.
        let pre = preprocessed(32, 32, (0, 0, 8, 32));
        let view = ReferralView::of(&pre, 4).unwrap();
        assert_eq!(view.origin, (-12.0, 0.0));
        assert_eq!(view.planes.get(0, 0, 0), 0.0);
        assert_eq!(view.planes.get(0, 1, 0), 0.5, "half the footprint inside");
    }

    #[test]
    fn empty_fov_is_an_error() {
        let pre = preprocessed(16, 16, (0, 0, 0, 0));
        let e = ReferralView::of(&pre, 4).unwrap_err().to_string();
        assert!(e.contains("empty field of view"), "{e}");
    }

    #[test]
    fn boxes_are_the_strongest_cells_in_original_coordinates() {
        let pre = preprocessed(64, 64, (0, 0, 64, 64));
        let view = ReferralView::of(&pre, 16).unwrap();
        // 4x4 map, each cell 4 input px = 16 canonical px = 32 original px.
        let mut map = vec![0.1f32; 16];
        map[6] = 0.9; // cell (2, 1)
        map[13] = 0.5; // cell (1, 3)
        let boxes = view.top_boxes(&map, 4, 2);
        assert_eq!(boxes.len(), 2);
        // Corners (64, 32) and (96, 64) in pixel-centre coordinates.
        assert_eq!((boxes[0].x0, boxes[0].y0, boxes[0].x1), (63.5, 31.5, 95.5));
        assert!((boxes[0].weight - 0.9).abs() < 1e-6);
        assert_eq!((boxes[1].x0, boxes[1].y0), (31.5, 95.5));
        assert!(boxes[0].contains(70.0, 40.0) && !boxes[0].contains(40.0, 40.0));
        // At a cell centre the map value is the cell's; outside the square, none.
        assert!((view.map_at(&map, 4, 79.5, 47.5).unwrap() - 0.9).abs() < 1e-6);
        assert_eq!(view.map_at(&map, 4, -1.0, 10.0), None);
    }

    #[test]
    fn refer_rule_takes_score_or_ma_count() {
        let rule = ReferRule {
            score_threshold: 0.6,
            ma_count: Some(3),
            operating_point: Some(OperatingPoint::Fp1),
        };
        assert!(rule.refers(0.7, |_| 0));
        assert!(!rule.refers(0.5, |_| 2));
        assert!(rule.refers(0.5, |op| if op == OperatingPoint::Fp1 { 3 } else { 0 }));
        let score_only = ReferRule {
            score_threshold: 0.6,
            ma_count: None,
            operating_point: None,
        };
        assert!(!score_only.refers(0.5, |_| 100));
    }

    #[test]
    fn score_is_the_logistic_of_the_margin() {
        assert_eq!(refer_score(0.0), 0.5);
        assert!((refer_score(2.0) + refer_score(-2.0) - 1.0).abs() < 1e-12);
        assert!(refer_score(-800.0) >= 0.0 && refer_score(800.0) <= 1.0);
    }

    #[test]
    fn config_checks() {
        let mut cfg = ReferralConfig {
            input_side: 320,
            attention_stride: 16,
            boxes: 4,
            rule: ReferRule {
                score_threshold: 0.5,
                ma_count: None,
                operating_point: None,
            },
            training_data: "test".into(),
            cv_auc: 0.5,
            zoom: None,
        };
        cfg.validate().unwrap();
        assert_eq!(cfg.attention_side(), 20);
        cfg.attention_stride = 12;
        assert!(cfg.validate().is_err());
    }
}
