//! Lesion-level FROC / CPM scoring (`shared/docs/CONTRACTS.md` section 2). Pure: no I/O.
//!
//! An independent scorer following the same written rules measures the project, so every
//! interpretation the contract leaves open is pinned down here:
//!
//! - **Hit.** A detection at `(x, y)` (pixel centres at integers) hits a lesion when the
//!   Euclidean distance from `(x, y)` to the nearest lesion pixel centre is `<= 5.0`
//!   ([`HIT_DISTANCE`]). "Inside the lesion" (the pixel `(round(x), round(y))` belongs to it)
//!   is implied: that pixel's centre is at most `sqrt(0.5)` away. A detection counts for every
//!   lesion it hits; each lesion counts once, with the best score among the detections that
//!   hit it; further hits are neither true nor false positives.
//! - **Order of checks**, per detection: outside the image (`x < -0.5`, `y < -0.5`,
//!   `x >= width - 0.5` or `y >= height - 0.5`) is a false positive, always, even within
//!   5 px of a border lesion; else hitting at least one lesion makes it a true positive; else
//!   landing on an uncertain pixel ([`GroundTruth::uncertain`]) makes it ignored; else it is a
//!   false positive.
//! - **Rounding** to a pixel is `floor(v + 0.5)` (halves round up): pixel `i` covers
//!   `[i - 0.5, i + 0.5)`, matching the half-open image bounds above, so every in-image point
//!   maps to an in-image pixel (round-half-away-from-zero would send `-0.5` to pixel -1).
//! - **Sweep.** Thresholds are all distinct detection scores; a detection counts at `t` when
//!   `score >= t`. sensitivity(t) = lesions whose best score `>= t` / all lesions;
//!   FP/image(t) = false positives with score `>= t` / images. Healthy images (no lesions)
//!   count in the number of images.
//! - **Sensitivity at F FP/image** is the best sensitivity among thresholds with
//!   FP/image `<= F`; the threshold above every score (sensitivity 0, no FPs) always
//!   qualifies. CPM is the mean over F = 1/8, 1/4, 1/2, 1, 2, 4, 8 ([`FP_RATES`]).
//!   With no lesions in the whole set, sensitivity is undefined and scoring fails.
//! - **Operating threshold** for F: the lowest swept threshold whose FP/image `<= F`
//!   (`None` when only the threshold above every score qualifies). Any threshold between the
//!   next lower detection score and it gives the same counts on the scored data.
//! - **Image-level AUC** for "the image has at least one lesion": each image is scored by its
//!   best detection score (every detection of the image, whatever its verdict; 0 when it has
//!   none); Mann-Whitney statistic with ties counting 1/2; `None` when all images are of one
//!   class.

use anyhow::{Result, bail};
use ma_core::detection::Detection;

use crate::ground_truth::GroundTruth;

/// FP/image rates whose sensitivities average to the CPM.
pub const FP_RATES: [f64; 7] = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0];

/// FP/image rates whose operating thresholds are reported.
pub const OPERATING_FP_RATES: [f64; 3] = [1.0, 2.0, 4.0];

/// A detection within this many pixels of a lesion pixel centre hits the lesion.
pub const HIT_DISTANCE: f64 = 5.0;

/// What one detection counts as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hits at least one lesion (whether or not it is that lesion's best hit).
    TruePositive,
    /// On an uncertain pixel and hitting no lesion: neither true nor false positive.
    Ignored,
    /// Inside the image, hits no lesion, not on an uncertain pixel.
    FalsePositive,
    /// Outside the image: a false positive.
    Outside,
}

impl Verdict {
    pub fn is_false_positive(self) -> bool {
        matches!(self, Verdict::FalsePositive | Verdict::Outside)
    }
}

/// Pixel that a coordinate falls in (see the module doc on rounding).
fn pixel_of(v: f64) -> i64 {
    (v + 0.5).floor() as i64
}

/// Lesions of one image with their bounding boxes grown by [`HIT_DISTANCE`], so that a
/// detection is compared pixel by pixel only with the few lesions near it.
struct LesionIndex<'a> {
    /// `(x0, y0, x1, y1)` inclusive, in pixel-centre coordinates, grown by the hit distance.
    boxes: Vec<Option<(f64, f64, f64, f64)>>,
    truth: &'a GroundTruth,
}

impl<'a> LesionIndex<'a> {
    fn new(truth: &'a GroundTruth) -> Self {
        let boxes = truth
            .lesions
            .iter()
            .map(|lesion| {
                let first = *lesion.pixels.first()?;
                let (x0, y0, x1, y1) = lesion.pixels.iter().fold(
                    (first.0, first.1, first.0, first.1),
                    |(x0, y0, x1, y1), &(x, y)| (x0.min(x), y0.min(y), x1.max(x), y1.max(y)),
                );
                Some((
                    x0 as f64 - HIT_DISTANCE,
                    y0 as f64 - HIT_DISTANCE,
                    x1 as f64 + HIT_DISTANCE,
                    y1 as f64 + HIT_DISTANCE,
                ))
            })
            .collect();
        Self { boxes, truth }
    }

    /// Indices of the lesions that `(x, y)` hits.
    fn hits(&self, x: f64, y: f64, out: &mut Vec<usize>) {
        out.clear();
        for (i, b) in self.boxes.iter().enumerate() {
            let Some((x0, y0, x1, y1)) = *b else { continue };
            if x < x0 || x > x1 || y < y0 || y > y1 {
                continue;
            }
            let hit = self.truth.lesions[i].pixels.iter().any(|&(px, py)| {
                let (dx, dy) = (x - px as f64, y - py as f64);
                // sqrt rather than comparing squares: "distance <= 5.0" exactly as a
                // straightforward scorer computes it.
                (dx * dx + dy * dy).sqrt() <= HIT_DISTANCE
            });
            if hit {
                out.push(i);
            }
        }
    }
}

/// The scored detections of one image; ground truth is not kept, so images can be
/// scored one at a time while their (large) masks are loaded.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageOutcome {
    pub name: String,
    /// Best score among the detections hitting each lesion; `None` for a missed lesion.
    pub lesion_best: Vec<Option<f64>>,
    /// Every detection's score and verdict, in input order.
    pub detections: Vec<(f64, Verdict)>,
}

impl ImageOutcome {
    /// Classify `detections` against `truth`. Fails on a non-finite coordinate or score.
    pub fn score(name: &str, truth: &GroundTruth, detections: &[Detection]) -> Result<Self> {
        let index = LesionIndex::new(truth);
        let mut lesion_best: Vec<Option<f64>> = vec![None; truth.lesions.len()];
        let mut verdicts = Vec::with_capacity(detections.len());
        let (w, h) = (truth.width as f64, truth.height as f64);
        let mut hits = Vec::new();
        for (k, d) in detections.iter().enumerate() {
            if !(d.x.is_finite() && d.y.is_finite() && d.score.is_finite()) {
                bail!("{name}: detection {k} has a non-finite coordinate or score");
            }
            let verdict = if d.x < -0.5 || d.y < -0.5 || d.x >= w - 0.5 || d.y >= h - 0.5 {
                Verdict::Outside
            } else {
                index.hits(d.x, d.y, &mut hits);
                if !hits.is_empty() {
                    for &i in &hits {
                        let best = &mut lesion_best[i];
                        *best = Some(best.map_or(d.score, |b: f64| b.max(d.score)));
                    }
                    Verdict::TruePositive
                } else if truth
                    .uncertain
                    .as_ref()
                    .is_some_and(|m| m.get(pixel_of(d.x), pixel_of(d.y)))
                {
                    Verdict::Ignored
                } else {
                    Verdict::FalsePositive
                }
            };
            verdicts.push((d.score, verdict));
        }
        Ok(Self {
            name: name.to_string(),
            lesion_best,
            detections: verdicts,
        })
    }

    pub fn lesions(&self) -> usize {
        self.lesion_best.len()
    }

    /// Lesions found by a detection with score `>= threshold`.
    pub fn found_at(&self, threshold: f64) -> usize {
        self.lesion_best
            .iter()
            .filter(|b| b.is_some_and(|s| s >= threshold))
            .count()
    }

    /// False positives with score `>= threshold`.
    pub fn false_positives_at(&self, threshold: f64) -> usize {
        self.detections
            .iter()
            .filter(|(s, v)| v.is_false_positive() && *s >= threshold)
            .count()
    }

    /// Best detection score, `None` when the image has no detections.
    pub fn best_score(&self) -> Option<f64> {
        self.detections.iter().map(|&(s, _)| s).reduce(f64::max)
    }

    fn count(&self, verdict: Verdict) -> usize {
        self.detections
            .iter()
            .filter(|(_, v)| *v == verdict)
            .count()
    }

    /// Counts over all detections, for a diagnostic table.
    pub fn summary(&self) -> ImageSummary {
        ImageSummary {
            name: self.name.clone(),
            lesions: self.lesions(),
            found: self.found_at(f64::NEG_INFINITY),
            false_positives: self.false_positives_at(f64::NEG_INFINITY),
            outside: self.count(Verdict::Outside),
            ignored: self.count(Verdict::Ignored),
            detections: self.detections.len(),
            best_score: self.best_score(),
        }
    }
}

/// Per-image counts at the lowest threshold (every detection counts).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageSummary {
    pub name: String,
    pub lesions: usize,
    /// Lesions hit by any detection.
    pub found: usize,
    /// All false positives, including `outside`.
    pub false_positives: usize,
    /// False positives outside the image.
    pub outside: usize,
    /// Detections on uncertain pixels.
    pub ignored: usize,
    pub detections: usize,
    pub best_score: Option<f64>,
}

/// One point of the FROC curve: the counts when detections with `score >= threshold` count.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CurvePoint {
    /// Lowest swept threshold giving these counts; `f64::INFINITY` for the point where no
    /// detection counts (only when no detection score gives the same counts).
    pub threshold: f64,
    pub lesions_found: usize,
    pub false_positives: usize,
    pub sensitivity: f64,
    pub fp_per_image: f64,
}

/// Sensitivity at one FP/image rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RatePoint {
    /// The FP/image rate F asked for.
    pub fp_rate: f64,
    /// Best sensitivity among thresholds with FP/image `<= F`.
    pub sensitivity: f64,
    /// FP/image actually reached at `threshold`.
    pub fp_per_image: f64,
    /// Lowest threshold with FP/image `<= F`; `None` when only the threshold above every
    /// score qualifies.
    pub threshold: Option<f64>,
}

/// Everything the FROC evaluation of a set of images reports.
#[derive(Clone, Debug, PartialEq)]
pub struct FrocReport {
    pub images: usize,
    /// Images with at least one lesion.
    pub images_with_lesions: usize,
    pub lesions: usize,
    /// Sensitivity at each of [`FP_RATES`], in that order.
    pub sensitivities: Vec<RatePoint>,
    /// Mean of `sensitivities`.
    pub cpm: f64,
    /// Image-level AUC; `None` when all images are of one class.
    pub image_auc: Option<f64>,
    /// Operating points at [`OPERATING_FP_RATES`], in that order.
    pub operating: Vec<RatePoint>,
    /// FROC curve by decreasing threshold (so non-decreasing FP/image and sensitivity),
    /// one point per distinct pair of counts, starting at (0 FP, 0 found).
    pub curve: Vec<CurvePoint>,
    pub per_image: Vec<ImageSummary>,
}

impl FrocReport {
    /// Sweep the thresholds over the scored images. Fails when there are no images or no
    /// lesions (sensitivity undefined).
    pub fn from_outcomes(outcomes: &[ImageOutcome]) -> Result<Self> {
        let images = outcomes.len();
        if images == 0 {
            bail!("no images to score");
        }
        let lesions: usize = outcomes.iter().map(ImageOutcome::lesions).sum();
        if lesions == 0 {
            bail!(
                "sensitivity is undefined: none of the {images} images has a lesion in its ground truth"
            );
        }
        let curve = sweep(outcomes, lesions, images);
        let sensitivities: Vec<RatePoint> = FP_RATES
            .iter()
            .map(|&f| rate_point(&curve, f, images))
            .collect();
        let operating = OPERATING_FP_RATES
            .iter()
            .map(|&f| rate_point(&curve, f, images))
            .collect();
        let cpm = mean(&sensitivities);
        let images_with_lesions = outcomes.iter().filter(|o| o.lesions() > 0).count();
        Ok(Self {
            images,
            images_with_lesions,
            lesions,
            sensitivities,
            cpm,
            image_auc: image_auc(outcomes),
            operating,
            curve,
            per_image: outcomes.iter().map(ImageOutcome::summary).collect(),
        })
    }

    /// Sensitivity and operating threshold at any FP/image rate.
    pub fn at_rate(&self, fp_rate: f64) -> RatePoint {
        rate_point(&self.curve, fp_rate, self.images)
    }

    /// Why the image-level AUC is undefined, `None` when it is defined.
    pub fn auc_undefined_reason(&self) -> Option<String> {
        if self.image_auc.is_some() {
            None
        } else if self.images_with_lesions == self.images {
            Some(format!("all {} images have lesions", self.images))
        } else {
            Some(format!("none of the {} images has a lesion", self.images))
        }
    }
}

fn mean(points: &[RatePoint]) -> f64 {
    points.iter().map(|p| p.sensitivity).sum::<f64>() / points.len() as f64
}

fn sweep(outcomes: &[ImageOutcome], lesions: usize, images: usize) -> Vec<CurvePoint> {
    let desc = |v: &mut Vec<f64>| v.sort_by(|a, b| b.total_cmp(a));
    let mut found: Vec<f64> = outcomes
        .iter()
        .flat_map(|o| o.lesion_best.iter().flatten().copied())
        .collect();
    let mut fps: Vec<f64> = outcomes
        .iter()
        .flat_map(|o| o.detections.iter())
        .filter(|(_, v)| v.is_false_positive())
        .map(|&(s, _)| s)
        .collect();
    let mut thresholds: Vec<f64> = outcomes
        .iter()
        .flat_map(|o| o.detections.iter().map(|&(s, _)| s))
        .collect();
    desc(&mut found);
    desc(&mut fps);
    desc(&mut thresholds);
    thresholds.dedup();

    let point = |threshold, tp: usize, fp: usize| CurvePoint {
        threshold,
        lesions_found: tp,
        false_positives: fp,
        sensitivity: tp as f64 / lesions as f64,
        fp_per_image: fp as f64 / images as f64,
    };
    let mut curve = vec![point(f64::INFINITY, 0, 0)];
    let (mut tp, mut fp) = (0, 0);
    for t in thresholds {
        while tp < found.len() && found[tp] >= t {
            tp += 1;
        }
        while fp < fps.len() && fps[fp] >= t {
            fp += 1;
        }
        let last = curve.last_mut().expect("curve starts with a point");
        if (last.lesions_found, last.false_positives) == (tp, fp) {
            // Same counts at a lower threshold: keep the lowest one.
            last.threshold = t;
        } else {
            curve.push(point(t, tp, fp));
        }
    }
    curve
}

fn rate_point(curve: &[CurvePoint], fp_rate: f64, images: usize) -> RatePoint {
    // FP/image is non-decreasing along the curve, so the qualifying points are a prefix and
    // its last one has both the best sensitivity and the lowest threshold. Comparing counts
    // (fp <= F * images) avoids rounding in the division.
    let best = curve
        .iter()
        .take_while(|p| p.false_positives as f64 <= fp_rate * images as f64)
        .last()
        .expect("the first curve point has no false positives");
    RatePoint {
        fp_rate,
        sensitivity: best.sensitivity,
        fp_per_image: best.fp_per_image,
        threshold: best.threshold.is_finite().then_some(best.threshold),
    }
}

/// Mann-Whitney AUC of "has a lesion" scored by the best detection score (0 when none).
fn image_auc(outcomes: &[ImageOutcome]) -> Option<f64> {
    let score = |o: &ImageOutcome| o.best_score().unwrap_or(0.0);
    let pos: Vec<f64> = outcomes
        .iter()
        .filter(|o| o.lesions() > 0)
        .map(score)
        .collect();
    let neg: Vec<f64> = outcomes
        .iter()
        .filter(|o| o.lesions() == 0)
        .map(score)
        .collect();
    if pos.is_empty() || neg.is_empty() {
        return None;
    }
    // Pairwise: image counts are small (tens to hundreds), and it is exact.
    let wins: f64 = pos
        .iter()
        .flat_map(|p| neg.iter().map(move |n| (p, n)))
        .map(|(p, n)| match p.total_cmp(n) {
            std::cmp::Ordering::Greater => 1.0,
            std::cmp::Ordering::Equal => 0.5,
            std::cmp::Ordering::Less => 0.0,
        })
        .sum();
    Some(wins / (pos.len() * neg.len()) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ground_truth::Lesion;
    use ma_core::mask::Mask;

    const W: u32 = 100;
    const H: u32 = 80;

    fn det(x: f64, y: f64, score: f64) -> Detection {
        Detection { x, y, score }
    }

    fn truth(lesions: &[&[(u32, u32)]]) -> GroundTruth {
        GroundTruth {
            width: W,
            height: H,
            lesions: lesions
                .iter()
                .map(|p| Lesion { pixels: p.to_vec() })
                .collect(),
            uncertain: None,
        }
    }

    fn report(cases: &[(&GroundTruth, Vec<Detection>)]) -> FrocReport {
        let outcomes: Vec<ImageOutcome> = cases
            .iter()
            .enumerate()
            .map(|(i, (t, d))| ImageOutcome::score(&format!("img{i}"), t, d).unwrap())
            .collect();
        FrocReport::from_outcomes(&outcomes).unwrap()
    }

    fn sens(r: &FrocReport) -> Vec<f64> {
        r.sensitivities.iter().map(|p| p.sensitivity).collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn perfect_detections_give_cpm_one() {
        let a = truth(&[&[(10, 10), (11, 10)], &[(50, 40)]]);
        let b = truth(&[&[(90, 70)]]);
        let healthy = truth(&[]);
        let r = report(&[
            (&a, vec![det(10.0, 10.0, 0.9), det(50.2, 39.8, 0.8)]),
            (&b, vec![det(90.0, 70.0, 0.7)]),
            (&healthy, vec![]),
        ]);
        assert_eq!(r.lesions, 3);
        assert_eq!(r.images, 3);
        assert_eq!(r.cpm, 1.0);
        assert_eq!(r.image_auc, Some(1.0));
        assert_eq!(r.operating[0].threshold, Some(0.7));
    }

    #[test]
    fn no_detections_give_zero() {
        let a = truth(&[&[(10, 10)]]);
        let r = report(&[(&a, vec![]), (&truth(&[]), vec![])]);
        assert_eq!(r.cpm, 0.0);
        assert!(sens(&r).iter().all(|&s| s == 0.0));
        assert_eq!(r.curve.len(), 1);
        assert_eq!(r.operating[0].threshold, None);
        // Both images score 0: a tie.
        assert_eq!(r.image_auc, Some(0.5));
    }

    #[test]
    fn no_lesions_is_an_error_not_a_number() {
        let healthy = truth(&[]);
        let o = ImageOutcome::score("h", &healthy, &[det(5.0, 5.0, 0.9)]).unwrap();
        let err = FrocReport::from_outcomes(&[o]).unwrap_err();
        assert!(err.to_string().contains("undefined"), "{err}");
        assert!(FrocReport::from_outcomes(&[]).is_err());
    }

    #[test]
    fn duplicate_hits_count_once_and_are_not_false_positives() {
        let a = truth(&[&[(20, 20)]]);
        let dets = vec![
            det(20.0, 20.0, 0.6),
            det(21.0, 20.0, 0.9),
            det(19.0, 22.0, 0.3),
        ];
        let o = ImageOutcome::score("a", &a, &dets).unwrap();
        assert_eq!(o.lesion_best, vec![Some(0.9)]);
        assert_eq!(o.false_positives_at(0.0), 0);
        let r = FrocReport::from_outcomes(&[o]).unwrap();
        assert_eq!(r.cpm, 1.0);
        assert_eq!(r.lesions, 1);
        assert_eq!(r.per_image[0].found, 1);
        assert_eq!(r.per_image[0].false_positives, 0);
    }

    #[test]
    fn one_detection_counts_for_every_lesion_it_hits() {
        let a = truth(&[&[(20, 20)], &[(26, 20)]]);
        let o = ImageOutcome::score("a", &a, &[det(23.0, 20.0, 0.5)]).unwrap();
        assert_eq!(o.lesion_best, vec![Some(0.5), Some(0.5)]);
    }

    #[test]
    fn uncertain_region_hits_are_ignored() {
        let mut uncertain = Mask::new(W, H);
        for y in 30..40 {
            for x in 60..70 {
                uncertain.set(x, y, true);
            }
        }
        let mut a = truth(&[&[(10, 10)]]);
        a.uncertain = Some(uncertain);
        let dets = vec![
            det(65.0, 35.0, 0.95), // uncertain: ignored
            det(69.4, 39.4, 0.9),  // rounds to (69, 39): still uncertain
            det(69.5, 35.0, 0.85), // rounds to (70, 35): outside the region, FP
            det(10.0, 10.0, 0.5),
        ];
        let o = ImageOutcome::score("a", &a, &dets).unwrap();
        let verdicts: Vec<Verdict> = o.detections.iter().map(|d| d.1).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Ignored,
                Verdict::Ignored,
                Verdict::FalsePositive,
                Verdict::TruePositive
            ]
        );
        let r = FrocReport::from_outcomes(&[o]).unwrap();
        assert_eq!(r.per_image[0].ignored, 2);
        // One FP on one image: sensitivity 1 from F = 1 on, 0 below.
        assert_eq!(sens(&r), [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn a_lesion_hit_wins_over_the_uncertain_region() {
        let mut uncertain = Mask::new(W, H);
        uncertain.set(12, 10, true);
        let mut a = truth(&[&[(10, 10)]]);
        a.uncertain = Some(uncertain);
        let o = ImageOutcome::score("a", &a, &[det(12.0, 10.0, 0.4)]).unwrap();
        assert_eq!(o.detections[0].1, Verdict::TruePositive);
    }

    #[test]
    fn out_of_image_detections_are_false_positives_even_near_a_lesion() {
        let a = truth(&[&[(0, 40)], &[(99, 79)]]);
        let dets = vec![
            det(-0.6, 40.0, 0.9),  // 0.6 px from lesion 0, but outside
            det(99.5, 79.0, 0.8),  // x >= width - 0.5
            det(99.0, 79.5, 0.7),  // y >= height - 0.5
            det(-0.5, 40.0, 0.6),  // on the edge: inside, hits lesion 0
            det(99.49, 79.0, 0.5), // inside, hits lesion 1
        ];
        let o = ImageOutcome::score("a", &a, &dets).unwrap();
        let verdicts: Vec<Verdict> = o.detections.iter().map(|d| d.1).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Outside,
                Verdict::Outside,
                Verdict::Outside,
                Verdict::TruePositive,
                Verdict::TruePositive
            ]
        );
        assert_eq!(o.lesion_best, vec![Some(0.6), Some(0.5)]);
        let s = o.summary();
        assert_eq!((s.false_positives, s.outside), (3, 3));
    }

    #[test]
    fn hit_distance_is_inclusive_at_five_pixels() {
        let a = truth(&[&[(50, 40), (51, 40)]]);
        let verdict = |x: f64, y: f64| {
            ImageOutcome::score("a", &a, &[det(x, y, 0.5)])
                .unwrap()
                .detections[0]
                .1
        };
        assert_eq!(verdict(56.0, 40.0), Verdict::TruePositive); // 5.0 right of (51, 40)
        assert_eq!(verdict(56.01, 40.0), Verdict::FalsePositive);
        assert_eq!(verdict(45.0, 40.0), Verdict::TruePositive); // 5.0 left of (50, 40)
        assert_eq!(verdict(44.99, 40.0), Verdict::FalsePositive);
        assert_eq!(verdict(54.0, 44.0), Verdict::TruePositive); // 3-4-5 from (51, 40)
        assert_eq!(verdict(54.0, 44.01), Verdict::FalsePositive);
        assert_eq!(verdict(50.0, 45.0), Verdict::TruePositive);
        assert_eq!(verdict(50.0, 45.01), Verdict::FalsePositive);
    }

    #[test]
    fn sensitivity_at_f_uses_the_best_qualifying_threshold() {
        // Image A has 3 lesions, image B is healthy; 2 images.
        //   score  what            found  FPs  FP/image
        //   0.9    hit L1            1     0     0
        //   0.8    FP on A           1     1     0.5
        //   0.7    hit L2            2     1     0.5
        //   0.65   ignored (B)       2     1     0.5   (same counts: threshold lowered)
        //   0.6    FP on B           2     2     1.0
        //   0.5    FP on B           2     3     1.5
        //   0.4    hit L3            3     3     1.5
        //   0.3    FP on A           3     4     2.0
        // F = 1/8, 1/4: only thresholds inf and 0.9 qualify       -> 1/3
        // F = 1/2: best is 0.7 (0.8 qualifies too but finds less)  -> 2/3, threshold 0.65
        // F = 1: lowest qualifying threshold 0.6                   -> 2/3
        // F = 2, 4, 8: every threshold                             -> 1
        // CPM = (1/3 + 1/3 + 2/3 + 2/3 + 1 + 1 + 1) / 7 = 5/7.
        let mut uncertain = Mask::new(W, H);
        uncertain.set(80, 60, true);
        let a = truth(&[&[(10, 10)], &[(30, 30)], &[(50, 50)]]);
        let mut b = truth(&[]);
        b.uncertain = Some(uncertain);
        let r = report(&[
            (
                &a,
                vec![
                    det(10.0, 10.0, 0.9),
                    det(90.0, 10.0, 0.8),
                    det(30.0, 30.0, 0.7),
                    det(50.0, 50.0, 0.4),
                    det(90.0, 70.0, 0.3),
                ],
            ),
            (
                &b,
                vec![
                    det(80.0, 60.0, 0.65),
                    det(20.0, 20.0, 0.6),
                    det(40.0, 20.0, 0.5),
                ],
            ),
        ]);
        let third = 1.0 / 3.0;
        let expected = [third, third, 2.0 * third, 2.0 * third, 1.0, 1.0, 1.0];
        for (got, want) in sens(&r).iter().zip(expected) {
            assert!(close(*got, want), "{:?}", sens(&r));
        }
        assert!(close(r.cpm, 5.0 / 7.0), "{}", r.cpm);
        assert_eq!(r.sensitivities[2].threshold, Some(0.65));
        assert_eq!(r.sensitivities[2].fp_per_image, 0.5);
        assert_eq!(r.sensitivities[0].threshold, Some(0.9));
        let ops: Vec<Option<f64>> = r.operating.iter().map(|p| p.threshold).collect();
        assert_eq!(ops, [Some(0.6), Some(0.3), Some(0.3)]);
        assert_eq!(r.at_rate(1.5).threshold, Some(0.4));
        // Curve: one point per distinct (found, FPs), starting from nothing.
        let counts: Vec<(usize, usize)> = r
            .curve
            .iter()
            .map(|p| (p.lesions_found, p.false_positives))
            .collect();
        assert_eq!(
            counts,
            [
                (0, 0),
                (1, 0),
                (1, 1),
                (2, 1),
                (2, 2),
                (2, 3),
                (3, 3),
                (3, 4)
            ]
        );
        assert_eq!(r.curve[0].threshold, f64::INFINITY);
        assert_eq!(r.images_with_lesions, 1);
    }

    #[test]
    fn healthy_images_count_in_fp_per_image() {
        let a = truth(&[&[(10, 10)]]);
        let healthy = truth(&[]);
        let dets = vec![det(10.0, 10.0, 0.5), det(60.0, 60.0, 0.9)];
        // 1 FP over 1 image: the lesion is found only at 1 FP/image.
        let alone = report(&[(&a, dets.clone())]);
        assert_eq!(sens(&alone), [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
        // 1 FP over 2 images (0.5 FP/image): found from F = 1/2 on.
        let with_healthy = report(&[(&a, dets), (&healthy, vec![])]);
        assert_eq!(sens(&with_healthy), [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
        // And FPs on the healthy image count too.
        let fp_on_healthy = report(&[
            (&a, vec![det(10.0, 10.0, 0.5)]),
            (&healthy, vec![det(30.0, 30.0, 0.9), det(31.0, 60.0, 0.8)]),
        ]);
        assert_eq!(sens(&fp_on_healthy), [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn image_auc_counts_ties_as_half() {
        // Positives score 0.9, 0.5, 0 (no detections); negatives 0.5, 0.2, 0 (none).
        // Pairs won: 0.9 beats all 3; 0.5 ties 0.5 (1/2), beats 0.2 and 0 (2);
        // 0 loses to 0.5 and 0.2, ties 0 (1/2). AUC = (3 + 2.5 + 0.5) / 9 = 2/3.
        let pos = truth(&[&[(10, 10)]]);
        let neg = truth(&[]);
        let r = report(&[
            (&pos, vec![det(70.0, 70.0, 0.9)]),
            (&pos, vec![det(70.0, 70.0, 0.5)]),
            (&pos, vec![]),
            (&neg, vec![det(70.0, 70.0, 0.5), det(70.0, 71.0, 0.1)]),
            (&neg, vec![det(70.0, 70.0, 0.2)]),
            (&neg, vec![]),
        ]);
        assert!(close(r.image_auc.unwrap(), 2.0 / 3.0));
        assert_eq!(r.auc_undefined_reason(), None);
    }

    #[test]
    fn image_auc_is_undefined_for_one_class() {
        let a = truth(&[&[(10, 10)]]);
        let r = report(&[(&a, vec![det(10.0, 10.0, 0.5)]), (&a, vec![])]);
        assert_eq!(r.image_auc, None);
        assert!(r.auc_undefined_reason().unwrap().contains("all 2 images"));
    }

    #[test]
    fn non_finite_detections_are_rejected() {
        let a = truth(&[&[(10, 10)]]);
        assert!(ImageOutcome::score("a", &a, &[det(f64::NAN, 1.0, 0.5)]).is_err());
        assert!(ImageOutcome::score("a", &a, &[det(1.0, 1.0, f64::INFINITY)]).is_err());
    }

    #[test]
    fn many_lesions_and_detections_match_brute_force() {
        // The bounding-box prefilter must not change any verdict.
        let lesions: Vec<Vec<(u32, u32)>> = (0..40)
            .map(|i| {
                let (cx, cy) = ((i * 37 % 90) + 5, (i * 23 % 70) + 5);
                vec![(cx, cy), (cx + 1, cy), (cx, cy + 1)]
            })
            .collect();
        let refs: Vec<&[(u32, u32)]> = lesions.iter().map(|l| l.as_slice()).collect();
        let a = truth(&refs);
        let dets: Vec<Detection> = (0..500)
            .map(|k| {
                det(
                    (k * 13 % 990) as f64 / 10.0,
                    (k * 7 % 790) as f64 / 10.0,
                    0.5,
                )
            })
            .collect();
        let o = ImageOutcome::score("a", &a, &dets).unwrap();
        for (d, &(_, v)) in dets.iter().zip(&o.detections) {
            let brute = lesions.iter().flatten().any(|&(px, py)| {
                ((d.x - px as f64).powi(2) + (d.y - py as f64).powi(2)).sqrt() <= 5.0
            });
            assert_eq!(v == Verdict::TruePositive, brute, "{d:?}");
        }
    }
}
