//! From candidates and their two logit margins to the detections `detect` reports:
//! the score of a candidate ([`Scoring`]), its place on the original photo
//! ([`to_detections`]) and which are reported ([`reported`]). The device cascade, the
//! benchmark and the trainer's evaluation all call these, so they report the same.

use crate::candidates::Candidate;
use crate::detection::Detection;
use crate::geometry::ScaleMap;

/// Candidates scoring below this after stage 2 are not reported (the `detect` contract
/// asks for every candidate with score >= 0.01).
pub const MIN_REPORTED_SCORE: f64 = 0.01;

/// How a candidate's reported score is made from the two nets' logit margins (the
/// `[scoring]` table of the model manifest):
/// `score = sigmoid((stage2 + stage1_weight * stage1) / temperature)`.
///
/// Stage 1 sees 70 px of context around every pixel, stage 2 a 41x41 patch centred on
/// the candidate; their errors differ, and on cross-validation the weighted sum ranked
/// MAs better than either margin alone. The default weight is the largest on the
/// plateau of `ma-trainer score-sweep` over the 4-fold CV: away from DiaretDB1, stage 1
/// generalises better than stage 2, and lower weights lost MAs there
/// (`models/MODEL_CARD.md`, "Choosing the stage-1 weight"). The temperature only keeps
/// large margins from rounding to exactly 1.0 (where they would tie); it does not change
/// the order.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scoring {
    pub stage1_weight: f64,
    pub temperature: f64,
}

impl Default for Scoring {
    fn default() -> Self {
        Self {
            stage1_weight: 0.75,
            temperature: 8.0,
        }
    }
}

impl Scoring {
    /// The reported score of a candidate with these margins, in (0, 1).
    pub fn score(&self, stage1: f32, stage2: f32) -> f64 {
        let z = (stage2 as f64 + self.stage1_weight * stage1 as f64) / self.temperature;
        1.0 / (1.0 + (-z).exp())
    }
}

/// `candidates` (canonical coordinates) as detections on the original photo of size
/// `photo`, the i-th scored `score(i, candidate)`, in the candidates' order.
///
/// Candidates from the canonical image's padding map outside the photo: they are no
/// lesion of it, and coordinates must stay on the photo (its pixels' area, the centre of
/// pixel 0 being 0), so they are dropped.
pub fn to_detections(
    candidates: &[Candidate],
    scale: &ScaleMap,
    photo: (u32, u32),
    score: impl Fn(usize, &Candidate) -> f64,
) -> Vec<Detection> {
    let (w, h) = (f64::from(photo.0), f64::from(photo.1));
    candidates
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let (x, y) = scale.to_original(c.x as f64, c.y as f64);
            let on_photo = (-0.5..=w - 0.5).contains(&x) && (-0.5..=h - 0.5).contains(&y);
            on_photo.then(|| Detection {
                x,
                y,
                score: score(i, c),
            })
        })
        .collect()
}

/// The detections `detect` reports: those scoring at least [`MIN_REPORTED_SCORE`], best
/// first (ties in their original order).
pub fn reported(mut detections: Vec<Detection>) -> Vec<Detection> {
    detections.retain(|d| d.score >= MIN_REPORTED_SCORE);
    detections.sort_by(|a, b| b.score.total_cmp(&a.score));
    detections
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(x: usize, y: usize) -> Candidate {
        Candidate { x, y, stage1: 0.0 }
    }

    #[test]
    fn candidates_map_to_the_photo_and_padding_ones_are_dropped() {
        // Canonical image twice the photo's size: photo x = (canonical x + 0.5) / 2 - 0.5.
        let scale = ScaleMap::between((10, 8), (20, 16));
        let found = [candidate(1, 1), candidate(19, 15), candidate(25, 3)];
        let dets = to_detections(&found, &scale, (10, 8), |i, _| i as f64);
        assert_eq!(
            dets,
            vec![
                Detection {
                    x: 0.25,
                    y: 0.25,
                    score: 0.0
                },
                Detection {
                    x: 9.25,
                    y: 7.25,
                    score: 1.0
                },
            ]
        );
    }

    #[test]
    fn reported_keeps_scores_from_the_minimum_best_first() {
        let d = |score| Detection {
            x: 0.0,
            y: 0.0,
            score,
        };
        let out = reported(vec![d(0.2), d(0.005), d(0.9), d(MIN_REPORTED_SCORE)]);
        let scores: Vec<f64> = out.iter().map(|d| d.score).collect();
        assert_eq!(scores, vec![0.9, 0.2, MIN_REPORTED_SCORE]);
    }
}
