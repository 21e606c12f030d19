//! Measuring the referral decision: patient-level cross-validation of the referral
//! network on the graded set, the MA-count baseline of the cascade on the same photos,
//! and the refer rule chosen on the CV.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use ma_core::detection::{DetectLine, read_jsonl};
use ma_core::manifest::{OperatingPoint, OperatingPoints};
use ma_core::referral::{ReferRule, refer_score};

use crate::grading::GradedPhoto;
use crate::train::{auc_f64, mid_ranks};

/// The operating points a rule may count MAs at.
const POINTS: [OperatingPoint; 3] = [
    OperatingPoint::Fp1,
    OperatingPoint::Fp2,
    OperatingPoint::Fp4,
];

/// AUC and the screening figures of one score.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BinaryFigures {
    pub auc: f64,
    /// Best sensitivity with specificity at least 0.85, and that specificity.
    pub sensitivity_at_specificity_85: f64,
    pub specificity_85: f64,
    /// Best sensitivity with specificity at least 0.90, and that specificity.
    pub sensitivity_at_specificity_90: f64,
    pub specificity_90: f64,
}

/// `(threshold, sensitivity, specificity)` for "refer if score >= threshold", at every
/// distinct score (and one above all, referring nobody).
pub fn roc(scores: &[f64], labels: &[bool]) -> Vec<(f64, f64, f64)> {
    let mut thresholds: Vec<f64> = scores.to_vec();
    thresholds.sort_by(f64::total_cmp);
    thresholds.dedup();
    thresholds.push(f64::INFINITY);
    thresholds
        .into_iter()
        .map(|t| {
            let (sens, spec) =
                sensitivity_specificity(scores.iter().map(|&s| s >= t).zip(labels.iter().copied()));
            (t, sens, spec)
        })
        .collect()
}

/// Sensitivity and specificity of `(referred, referable)` decisions (0 for a class with no
/// member).
pub fn sensitivity_specificity(decisions: impl IntoIterator<Item = (bool, bool)>) -> (f64, f64) {
    let (mut tp, mut tn, mut pos, mut neg) = (0usize, 0usize, 0usize, 0usize);
    for (refer, referable) in decisions {
        if referable {
            pos += 1;
            tp += usize::from(refer);
        } else {
            neg += 1;
            tn += usize::from(!refer);
        }
    }
    (tp as f64 / pos.max(1) as f64, tn as f64 / neg.max(1) as f64)
}

/// The best sensitivity among thresholds with specificity >= `min_spec`: (threshold,
/// sensitivity, specificity).
pub fn at_specificity(scores: &[f64], labels: &[bool], min_spec: f64) -> (f64, f64, f64) {
    roc(scores, labels)
        .into_iter()
        .filter(|p| p.2 >= min_spec)
        .max_by(|a, b| a.1.total_cmp(&b.1).then(a.2.total_cmp(&b.2)))
        .expect("the threshold above every score has specificity 1")
}

pub fn figures(scores: &[f64], labels: &[bool]) -> BinaryFigures {
    let (_, s85, p85) = at_specificity(scores, labels, 0.85);
    let (_, s90, p90) = at_specificity(scores, labels, 0.90);
    BinaryFigures {
        auc: auc_f64(scores, labels),
        sensitivity_at_specificity_85: s85,
        specificity_85: p85,
        sensitivity_at_specificity_90: s90,
        specificity_90: p90,
    }
}

/// What the cascade found on one photo, from a `detect` output.
#[derive(Clone, Debug, PartialEq)]
pub struct MaFindings {
    /// MAs at 1, 2 and 4 FP/image.
    pub counts: [usize; 3],
    /// Best detection score (0 without detections).
    pub best: f64,
}

impl MaFindings {
    pub fn count_at(&self, op: OperatingPoint) -> usize {
        self.counts[POINTS
            .iter()
            .position(|&p| p == op)
            .expect("one of the three")]
    }
}

/// The cascade's findings on each photo, from a `detect` JSONL file run on the graded set;
/// counts at the manifest's operating points. Every photo needs one successful line,
/// matched by file name.
pub fn ma_findings(
    detections: &Path,
    photos: &[GradedPhoto],
    points: &OperatingPoints,
) -> Result<Vec<MaFindings>> {
    let mut by_name: HashMap<String, MaFindings> = HashMap::new();
    for line in read_jsonl(detections)? {
        let name = Path::new(line.image())
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        match line {
            DetectLine::Ok(d) => {
                let counts = POINTS.map(|op| {
                    let t = points.threshold(op);
                    d.detections.iter().filter(|x| x.score >= t).count()
                });
                let best = d.detections.iter().map(|x| x.score).fold(0.0, f64::max);
                by_name.insert(name, MaFindings { counts, best });
            }
            DetectLine::Failed(f) => bail!(
                "{} failed in {}: {}",
                f.image,
                detections.display(),
                f.error
            ),
        }
    }
    photos
        .iter()
        .map(|p| {
            by_name
                .remove(&p.name)
                .with_context(|| format!("{} has no line in {}", p.name, detections.display()))
        })
        .collect()
}

/// The refer rule with the best sensitivity at specificity >= `min_spec` on these scores:
/// a referral-score threshold alone, or "score >= t or at least n MAs at an operating
/// point" (n in 1..=10). Returns the rule and its (sensitivity, specificity).
pub fn choose_rule(
    scores: &[f64],
    findings: Option<&[MaFindings]>,
    labels: &[bool],
    min_spec: f64,
) -> (ReferRule, f64, f64) {
    let (t, sens, spec) = at_specificity(scores, labels, min_spec);
    let mut best = (
        ReferRule {
            score_threshold: t.min(1.0),
            ma_count: None,
            operating_point: None,
        },
        sens,
        spec,
    );
    let Some(findings) = findings else {
        return best;
    };
    let mut thresholds: Vec<f64> = scores.to_vec();
    thresholds.push(1.0);
    thresholds.sort_by(f64::total_cmp);
    thresholds.dedup();
    for op in POINTS {
        for n in 1..=10u32 {
            for &t in &thresholds {
                let rule = ReferRule {
                    score_threshold: t.min(1.0),
                    ma_count: Some(n),
                    operating_point: Some(op),
                };
                let (sens, spec) = rule_figures(&rule, scores, findings, labels);
                if spec >= min_spec && (sens, spec) > (best.1, best.2) {
                    best = (rule, sens, spec);
                }
            }
        }
    }
    best
}

/// Sensitivity and specificity of a rule.
pub fn rule_figures(
    rule: &ReferRule,
    scores: &[f64],
    findings: &[MaFindings],
    labels: &[bool],
) -> (f64, f64) {
    sensitivity_specificity(
        scores
            .iter()
            .zip(findings)
            .zip(labels)
            .map(|((&s, f), &l)| (rule.refers(s, |op| f.count_at(op)), l)),
    )
}

/// The average of the two scores' ranks (ties share their mean rank): a combination with
/// nothing fitted, for the AUC of "referral score and MA count together".
pub fn rank_average(a: &[f64], b: &[f64]) -> Vec<f64> {
    let (ra, rb) = (mid_ranks(a), mid_ranks(b));
    ra.iter()
        .zip(&rb)
        .map(|(x, y)| (x + y) / 2.0 / a.len() as f64)
        .collect()
}

/// One photo's out-of-fold result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutOfFold {
    pub name: String,
    pub patient: String,
    pub grade: u8,
    pub referable: bool,
    /// 1-based.
    pub fold: usize,
    pub margin: f64,
}

impl OutOfFold {
    pub fn score(&self) -> f64 {
        refer_score(self.margin)
    }
}

/// Write the out-of-fold results as CSV (one line per photo).
pub fn write_csv(path: &Path, rows: &[OutOfFold]) -> Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    writeln!(f, "image,patient,grade,referable,fold,margin,refer_score")?;
    for r in rows {
        writeln!(
            f,
            "{},{},{},{},{},{:.6},{:.6}",
            r.name,
            r.patient,
            r.grade,
            r.referable as u8,
            r.fold,
            r.margin,
            r.score()
        )?;
    }
    f.flush()
        .with_context(|| format!("writing {}", path.display()))
}

/// Read a fold's results back (for a CV spread over several runs with `--fold`).
pub fn read_csv(path: &Path) -> Result<Vec<OutOfFold>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        ensure!(
            f.len() == 7,
            "{} line {}: 7 fields expected",
            path.display(),
            i + 1
        );
        let bad = || format!("{} line {}: bad number", path.display(), i + 1);
        rows.push(OutOfFold {
            name: f[0].into(),
            patient: f[1].into(),
            grade: f[2].parse().with_context(bad)?,
            referable: f[3] == "1",
            fold: f[4].parse().with_context(bad)?,
            margin: f[5].parse().with_context(bad)?,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn screening_figures() {
        // Negatives 0.1..0.4 and one at 0.8; positives 0.5..0.9.
        let scores = [0.1, 0.2, 0.3, 0.4, 0.8, 0.5, 0.6, 0.7, 0.9];
        let labels = [false, false, false, false, false, true, true, true, true];
        let f = figures(&scores, &labels);
        assert!((f.auc - 0.85).abs() < 1e-9, "{}", f.auc);
        // 17 of 20 pairs ordered. Specificity 0.8 (one negative above 0.5) misses 0.85:
        // only the threshold 0.9 keeps every negative out, finding 1 of 4.
        assert_eq!(
            (f.sensitivity_at_specificity_85, f.specificity_85),
            (0.25, 1.0)
        );
        assert_eq!(at_specificity(&scores, &labels, 0.8), (0.5, 1.0, 0.8));
    }

    #[test]
    fn rule_adds_ma_counts_where_they_help() {
        // Positive 3 has a low score but many MAs: only the MA arm finds it.
        let scores = [0.1, 0.2, 0.9, 0.15];
        let labels = [false, false, true, true];
        let f = |n| MaFindings {
            counts: [n, n, n],
            best: 0.0,
        };
        let findings = [f(0), f(1), f(0), f(5)];
        let (rule, sens, spec) = choose_rule(&scores, Some(&findings), &labels, 1.0);
        assert_eq!((sens, spec), (1.0, 1.0));
        assert!(
            rule.ma_count.is_some_and(|n| (2..=5).contains(&n)),
            "{rule:?}"
        );
        let (alone, sens, _) = choose_rule(&scores, None, &labels, 1.0);
        assert_eq!(alone.ma_count, None);
        assert_eq!(sens, 0.5);
    }

    #[test]
    fn csv_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let rows = vec![OutOfFold {
            name: "Patient001_L.jpg".into(),
            patient: "Patient001".into(),
            grade: 5,
            referable: true,
            fold: 2,
            margin: -0.25,
        }];
        let path = tmp.path().join("oof.csv");
        write_csv(&path, &rows).unwrap();
        let back = read_csv(&path).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(
            (back[0].fold, back[0].margin, back[0].referable),
            (2, -0.25, true)
        );
    }
}
