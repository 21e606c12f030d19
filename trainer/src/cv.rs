//! K-fold cross-validation on a training set: accuracy can be followed without touching
//! held-out data.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ma_device::cascade::candidates::Candidate;
use ma_device::detection::{DetectLine, ImageDetections};

use crate::froc::{FrocReport, ImageOutcome};
use crate::pipeline::{PipelineConfig, candidate_recall, detect, reported, train_cascade};
use crate::prepare::PreparedImage;

/// Candidate counts at which recall is reported.
pub const RECALL_KS: [usize; 8] = [10, 25, 50, 75, 100, 150, 200, 300];

/// Image `i` (in name order) belongs to fold `i % folds`.
pub fn fold_of(index: usize, folds: usize) -> usize {
    index % folds
}

/// What `cv` measured, saved as `cv-summary.json` for `export` (operating points and the
/// CPM quoted in the manifest come from here, never from the training images themselves).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CvSummary {
    pub folds: usize,
    /// Folds actually run (1-based).
    pub folds_run: Vec<usize>,
    pub cpm_per_fold: Vec<f64>,
    pub mean_cpm: f64,
    /// Stage-2 score thresholds at 1, 2 and 4 FP/image over the pooled held-out images.
    pub operating_points: [f64; 3],
    pub images: usize,
    pub lesions: usize,
}

impl CvSummary {
    pub const FILE_NAME: &'static str = "cv-summary.json";

    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(Self::FILE_NAME);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("cannot read {} (run `ma-trainer cv` first)", path.display())
        })?;
        serde_json::from_str(&text).with_context(|| format!("malformed {}", path.display()))
    }
}

pub struct FoldResult {
    pub fold: usize,
    pub report: FrocReport,
    pub recall: Vec<(usize, f64)>,
    pub seconds: f64,
}

/// Train on all folds but one, evaluate on it, for every fold. Writes per-fold
/// checkpoints under `out/fold-K/` and the held-out detections of all folds, in the
/// `detect` format, to `out/cv-detections.jsonl`.
///
/// `only` restricts the run to one fold (0-based), to spread a long CV over sessions.
pub fn cross_validate(
    images: &[PreparedImage],
    folds: usize,
    only: Option<usize>,
    cfg: &PipelineConfig,
    out: &Path,
    resume: bool,
) -> Result<Vec<FoldResult>> {
    if folds < 2 || folds > images.len() {
        bail!(
            "--folds must be between 2 and the number of images ({}), got {folds}",
            images.len()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    if let Some(f) = only.filter(|&f| f >= folds) {
        bail!("--fold {} does not exist with --folds {folds}", f + 1);
    }
    let det_path = match only {
        Some(f) => out.join(format!("cv-detections-fold-{}.jsonl", f + 1)),
        None => out.join("cv-detections.jsonl"),
    };
    let mut det_file = std::fs::File::create(&det_path)
        .with_context(|| format!("cannot create {}", det_path.display()))?;
    let mut eval_cfg = cfg.candidates.clone();
    // Evaluation looks at more candidates than the shipped cap to draw the recall curve.
    eval_cfg.max_candidates = *RECALL_KS.last().expect("non-empty");
    let mut results = Vec::new();
    let mut pooled = Vec::new();
    for fold in (0..folds).filter(|f| only.is_none_or(|o| o == *f)) {
        let started = Instant::now();
        let (val, train): (Vec<usize>, Vec<usize>) =
            (0..images.len()).partition(|&i| fold_of(i, folds) == fold);
        eprintln!(
            "fold {}/{folds}: training on {} images, evaluating on {}",
            fold + 1,
            train.len(),
            val.len()
        );
        let cascade = train_cascade(
            images,
            &train,
            &val,
            cfg,
            &out.join(format!("fold-{fold}")),
            resume,
        )?;
        let mut outcomes = Vec::new();
        let mut cands: Vec<(usize, Vec<Candidate>)> = Vec::new();
        for &i in &val {
            let t = Instant::now();
            let (c, all) = detect(&cascade, images, i, &eval_cfg);
            // Score as shipped: only the first `max_candidates` go to stage 2.
            let shipped = reported(&all[..all.len().min(cfg.candidates.max_candidates)]);
            outcomes.push(ImageOutcome::score(
                &images[i].name,
                &images[i].truth,
                &shipped,
            )?);
            let line = DetectLine::Ok(ImageDetections {
                image: images[i].name.clone(),
                width: images[i].truth.width,
                height: images[i].truth.height,
                detections: shipped,
                elapsed_ms: t.elapsed().as_secs_f64() * 1e3,
            });
            writeln!(det_file, "{}", line.to_json_line())
                .with_context(|| format!("cannot write {}", det_path.display()))?;
            cands.push((i, c));
        }
        let report = FrocReport::from_outcomes(&outcomes)?;
        pooled.extend(outcomes);
        let recall = candidate_recall(&cands, images, &RECALL_KS)?;
        let seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "fold {}/{folds}: CPM {:.3}, candidate recall {} ({:.0} s)",
            fold + 1,
            report.cpm,
            recall
                .iter()
                .map(|(k, r)| format!("@{k} {:.2}", r))
                .collect::<Vec<_>>()
                .join(" "),
            seconds
        );
        results.push(FoldResult {
            fold,
            report,
            recall,
            seconds,
        });
    }
    Ok(results)
}
