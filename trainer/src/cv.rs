//! K-fold cross-validation on a training set: accuracy can be followed without touching
//! held-out data.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ma_core::candidates::Candidate;
use ma_core::detection::{DetectLine, ImageDetections, read_jsonl};
use ma_core::scoring::{MIN_REPORTED_SCORE, Scoring};

use crate::eval::match_lines;
use crate::froc::{FrocReport, ImageOutcome};
use crate::pipeline::{PipelineConfig, candidate_recall, reported, run_cascade, train_cascade};
use crate::prepare::{PreparedImage, dataset_names};

/// Candidate counts at which recall is reported.
pub const RECALL_KS: [usize; 8] = [10, 25, 50, 75, 100, 150, 200, 300];

/// The fold of every image: folds are made per dataset, so every fold holds images of
/// every dataset. The k-th photo of a dataset (in name order) belongs to fold `k % folds`;
/// with one dataset, photo `i` is in fold `i % folds`. A camera-augmented copy is in its
/// photo's fold (it is trained on only when its photo is).
pub fn fold_assignment(images: &[PreparedImage], folds: usize) -> Vec<usize> {
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut of: Vec<usize> = Vec::with_capacity(images.len());
    for im in images {
        let fold = match im.copy_of {
            Some(source) => of[source],
            None => {
                let k = seen.entry(im.dataset.as_str()).or_insert(0);
                *k += 1;
                (*k - 1) % folds
            }
        };
        of.push(fold);
    }
    of
}

/// The photos of fold `fold` (0-based), in image order: what the fold holds out (copies
/// are never held out).
pub fn fold_members(images: &[PreparedImage], folds: usize, fold: usize) -> Vec<usize> {
    let of = fold_assignment(images, folds);
    (0..images.len())
        .filter(|&i| of[i] == fold && images[i].copy_of.is_none())
        .collect()
}

/// One dataset's share of a CV (`cv-summary.json`, `per_dataset`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DatasetCv {
    pub dataset: String,
    pub images: usize,
    pub lesions: usize,
    /// CPM of this dataset's held-out images of each fold run (order of `folds_run`).
    pub cpm_per_fold: Vec<f64>,
    pub mean_cpm: f64,
    /// One FROC over this dataset's held-out images of all folds.
    pub pooled_cpm: f64,
    /// Pooled lesion recall of the top-K stage-1 candidates (K, recall), from the folds'
    /// result files; empty when they predate per-dataset figures.
    #[serde(default)]
    pub candidate_recall: Vec<(usize, f64)>,
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
    /// CPM of the pooled held-out images (one FROC over all folds).
    pub pooled_cpm: f64,
    /// The same figures for each dataset's images alone (absent in summaries written
    /// before training on several datasets existed).
    #[serde(default)]
    pub per_dataset: Vec<DatasetCv>,
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
    /// Each dataset's held-out images of this fold alone.
    pub per_dataset: Vec<FoldDataset>,
    pub seconds: f64,
}

/// One dataset's figures on one fold.
pub struct FoldDataset {
    pub dataset: String,
    pub report: FrocReport,
    pub recall: Vec<(usize, f64)>,
}

/// Train on all folds but one, evaluate on it, for every fold. Writes per-fold
/// checkpoints and final weights under `out/fold-K/`, the held-out detections of fold K, in the `detect`
/// format, to `out/cv-detections-fold-K.jsonl`, and its figures to
/// `out/fold-K-result.json` (K from 1).
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
    let smallest = dataset_names(images)
        .into_iter()
        .map(|d| {
            let photos = images
                .iter()
                .filter(|im| im.dataset == d && im.copy_of.is_none())
                .count();
            (photos, d)
        })
        .min();
    let Some((smallest, name)) = smallest else {
        bail!("cross-validation needs images, got none");
    };
    if folds < 2 || folds > smallest {
        bail!(
            "--folds must be between 2 and the number of images of the smallest dataset \
             ({name}: {smallest}), got {folds} (every fold holds images of every dataset)"
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    if let Some(f) = only.filter(|&f| f >= folds) {
        bail!("--fold {} does not exist with --folds {folds}", f + 1);
    }
    let mut eval_cfg = cfg.candidates.clone();
    // Evaluation looks at more candidates than the shipped cap to draw the recall curve.
    eval_cfg.max_candidates = *RECALL_KS.last().expect("non-empty");
    let mut results = Vec::new();
    for fold in (0..folds).filter(|f| only.is_none_or(|o| o == *f)) {
        let started = Instant::now();
        let of = fold_assignment(images, folds);
        let val = fold_members(images, folds, fold);
        let train: Vec<usize> = (0..images.len()).filter(|&i| of[i] != fold).collect();
        eprintln!(
            "fold {}/{folds}: training on {} images ({} of them camera copies), evaluating \
             on {}",
            fold + 1,
            train.len(),
            train
                .iter()
                .filter(|&&i| images[i].copy_of.is_some())
                .count(),
            val.len()
        );
        let fold_dir = out.join(format!("fold-{}", fold + 1));
        let cascade = train_cascade(images, &train, &val, cfg, &fold_dir, resume)?;
        // The fold's final weights, named as `train` names them, so `export` can turn
        // them into a model set for the device-path CV (scripts/cv-device.sh).
        for (stage, (vs, _)) in [("stage1", &cascade.stage1), ("stage2", &cascade.stage2)] {
            let path = fold_dir.join(format!("{stage}.safetensors"));
            vs.save(&path)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        let det_path = detections_path(out, fold);
        let mut det_file = std::fs::File::create(&det_path)
            .with_context(|| format!("cannot create {}", det_path.display()))?;
        let mut outcomes = Vec::new();
        let mut cands: Vec<(usize, Vec<Candidate>)> = Vec::new();
        for &i in &val {
            let t = Instant::now();
            let mut run = run_cascade(&cascade, images, i, &eval_cfg);
            let c = run.candidates.clone();
            // Score as shipped: only the first `max_candidates` go to stage 2.
            run.candidates.truncate(cfg.candidates.max_candidates);
            run.stage2.truncate(cfg.candidates.max_candidates);
            let shipped = reported(&run.detections(&images[i], &cfg.scoring));
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
                referral: None,
            });
            writeln!(det_file, "{}", line.to_json_line())
                .with_context(|| format!("cannot write {}", det_path.display()))?;
            cands.push((i, c));
        }
        let report = FrocReport::from_outcomes(&outcomes)?;
        let recall = candidate_recall(&cands, images, &RECALL_KS)?;
        let mut per_dataset = Vec::new();
        for dataset in dataset_names(images) {
            let mine = |i: usize| images[val[i]].dataset == dataset;
            let o: Vec<ImageOutcome> = (0..val.len())
                .filter(|&i| mine(i))
                .map(|i| outcomes[i].clone())
                .collect();
            let c: Vec<(usize, Vec<Candidate>)> = (0..val.len())
                .filter(|&i| mine(i))
                .map(|i| cands[i].clone())
                .collect();
            per_dataset.push(FoldDataset {
                dataset,
                report: FrocReport::from_outcomes(&o)?,
                recall: candidate_recall(&c, images, &RECALL_KS)?,
            });
        }
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
        if per_dataset.len() > 1 {
            for d in &per_dataset {
                eprintln!(
                    "fold {}/{folds}: {}: {} images, CPM {:.3}",
                    fold + 1,
                    d.dataset,
                    d.report.images,
                    d.report.cpm
                );
            }
        }
        let result = FoldResult {
            fold,
            report,
            recall,
            per_dataset,
            seconds,
        };
        let path = out.join(format!("fold-{}-result.json", fold + 1));
        std::fs::write(&path, result.to_json())
            .with_context(|| format!("cannot write {}", path.display()))?;
        results.push(result);
    }
    Ok(results)
}

/// Held-out detections of fold `fold` (0-based), in the `detect` format.
pub fn detections_path(out: &Path, fold: usize) -> PathBuf {
    out.join(format!("cv-detections-fold-{}.jsonl", fold + 1))
}

impl FoldResult {
    fn to_json(&self) -> String {
        serde_json::json!({
            "fold": self.fold + 1,
            "cpm": self.report.cpm,
            "images": self.report.images,
            "lesions": self.report.lesions,
            "candidate_recall": recall_json(&self.recall),
            "per_dataset": self.per_dataset.iter().map(|d| serde_json::json!({
                "dataset": d.dataset,
                "cpm": d.report.cpm,
                "images": d.report.images,
                "lesions": d.report.lesions,
                "candidate_recall": recall_json(&d.recall),
            })).collect::<Vec<_>>(),
            "minutes": self.seconds / 60.0,
        })
        .to_string()
    }
}

fn recall_json(recall: &[(usize, f64)]) -> Vec<serde_json::Value> {
    recall
        .iter()
        .map(|(k, r)| serde_json::json!({"candidates": k, "recall": r}))
        .collect()
}

fn recall_from_json(v: &serde_json::Value) -> Vec<(usize, f64)> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["candidates"].as_u64()? as usize, p["recall"].as_f64()?)))
        .collect()
}

/// Score the held-out detections of every fold run so far in `out` (folds may be run in
/// separate invocations with `--fold`) and write `cv-summary.json`: per-fold CPM, their
/// mean, and the operating points over the pooled held-out images. `None` when no fold has
/// been run yet.
pub fn summarise(images: &[PreparedImage], folds: usize, out: &Path) -> Result<Option<CvSummary>> {
    let mut folds_run = Vec::new();
    let mut cpm_per_fold = Vec::new();
    // Held-out outcomes of all folds, with the image each belongs to.
    let mut pooled: Vec<(usize, ImageOutcome)> = Vec::new();
    let datasets = dataset_names(images);
    // cpm_by_dataset[d] = that dataset's CPM on each fold run.
    let mut cpm_by_dataset: Vec<Vec<f64>> = vec![Vec::new(); datasets.len()];
    for fold in 0..folds {
        let path = detections_path(out, fold);
        if !path.exists() {
            continue;
        }
        let members = fold_members(images, folds, fold);
        let names: Vec<&str> = members.iter().map(|&i| images[i].name.as_str()).collect();
        let lines = read_jsonl(&path)?;
        let matched = match match_lines(&names, lines) {
            Ok(m) => m,
            Err(e) => {
                // Typically a fold still running in another process: its file fills up
                // image by image. Left out, and said so; the last run to finish counts it.
                eprintln!(
                    "cv summary: fold {} left out: {} does not match it yet ({e:#})",
                    fold + 1,
                    path.display()
                );
                continue;
            }
        };
        let mut outcomes = Vec::new();
        for (&i, d) in members.iter().zip(&matched.images) {
            outcomes.push((
                i,
                ImageOutcome::score(&images[i].name, &images[i].truth, &d.detections)?,
            ));
        }
        cpm_per_fold.push(froc_of(&outcomes, |_| true)?.cpm);
        for (d, name) in datasets.iter().enumerate() {
            cpm_by_dataset[d].push(froc_of(&outcomes, |i| images[i].dataset == *name)?.cpm);
        }
        folds_run.push(fold + 1);
        pooled.extend(outcomes);
    }
    if folds_run.is_empty() {
        return Ok(None);
    }
    // The recall curves saved by each fold's run (absent for folds run before they were).
    let mut curves = Vec::new();
    // Per dataset: (lesions found, lesions) at each K, summed over the folds.
    let mut found_by_dataset: Vec<Vec<(usize, f64, f64)>> = vec![Vec::new(); datasets.len()];
    for &k in &folds_run {
        let path = out.join(format!("fold-{k}-result.json"));
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("malformed {}", path.display()))?;
        curves.push((
            format!("fold {k}"),
            recall_from_json(&v["candidate_recall"]),
        ));
        for part in v["per_dataset"].as_array().into_iter().flatten() {
            let Some(d) = datasets.iter().position(|n| part["dataset"] == n.as_str()) else {
                continue;
            };
            let lesions = part["lesions"].as_f64().unwrap_or(0.0);
            for (k, r) in recall_from_json(&part["candidate_recall"]) {
                let acc = &mut found_by_dataset[d];
                match acc.iter_mut().find(|(kk, _, _)| *kk == k) {
                    Some(e) => {
                        e.1 += r * lesions;
                        e.2 += lesions;
                    }
                    None => acc.push((k, r * lesions, lesions)),
                }
            }
        }
    }
    if !curves.is_empty() {
        crate::plot::write_recall_png(&out.join("cv-recall.png"), &curves)?;
    }
    let mut per_dataset = Vec::new();
    for (d, name) in datasets.iter().enumerate() {
        let report = froc_of(&pooled, |i| images[i].dataset == *name)?;
        let cpm = &cpm_by_dataset[d];
        per_dataset.push(DatasetCv {
            dataset: name.clone(),
            images: report.images,
            lesions: report.lesions,
            mean_cpm: cpm.iter().sum::<f64>() / cpm.len() as f64,
            cpm_per_fold: cpm.clone(),
            pooled_cpm: report.cpm,
            candidate_recall: found_by_dataset[d]
                .iter()
                .map(|&(k, found, total)| (k, if total > 0.0 { found / total } else { 0.0 }))
                .collect(),
        });
    }
    let report = froc_of(&pooled, |_| true)?;
    // A rate the curve never reaches: every reported detection is within the budget.
    let op = |k: usize| report.operating[k].threshold.unwrap_or(MIN_REPORTED_SCORE);
    let summary = CvSummary {
        folds,
        mean_cpm: cpm_per_fold.iter().sum::<f64>() / cpm_per_fold.len() as f64,
        cpm_per_fold,
        folds_run,
        operating_points: [op(0), op(1), op(2)],
        images: report.images,
        lesions: report.lesions,
        pooled_cpm: report.cpm,
        per_dataset,
    };
    let path = out.join(CvSummary::FILE_NAME);
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Some(summary))
}

/// One FROC over the outcomes whose image passes `keep`.
fn froc_of(outcomes: &[(usize, ImageOutcome)], keep: impl Fn(usize) -> bool) -> Result<FrocReport> {
    let kept: Vec<ImageOutcome> = outcomes
        .iter()
        .filter(|(i, _)| keep(*i))
        .map(|(_, o)| o.clone())
        .collect();
    FrocReport::from_outcomes(&kept)
}

/// Which margins make a candidate's score (compared by `ma-trainer fold-eval`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreSource {
    Stage1,
    Stage2,
    /// Both, as shipped ([`ma_core::scoring::Scoring`]).
    Both,
}

impl ScoreSource {
    pub const ALL: [ScoreSource; 3] = [ScoreSource::Stage1, ScoreSource::Stage2, ScoreSource::Both];

    pub fn name(self) -> &'static str {
        match self {
            ScoreSource::Stage1 => "stage 1 only",
            ScoreSource::Stage2 => "stage 2 only",
            ScoreSource::Both => "stage 2 + weight x stage 1 (shipped)",
        }
    }

    /// The scoring rule that uses only this source's margins.
    pub fn scoring(self, shipped: &Scoring) -> Scoring {
        match self {
            // Stage 1 alone: the stage-2 margin is given as 0 below.
            ScoreSource::Stage1 => Scoring {
                stage1_weight: 1.0,
                ..shipped.clone()
            },
            ScoreSource::Stage2 => Scoring {
                stage1_weight: 0.0,
                ..shipped.clone()
            },
            ScoreSource::Both => shipped.clone(),
        }
    }
}

/// Lesion recall of the top-K candidates, for each K.
pub type RecallCurve = Vec<(usize, f64)>;

/// Score the held-out images of `fold` (0-based) with trained nets, once per
/// [`ScoreSource`]: FROC reports in `ScoreSource::ALL` order and the candidate recall curve.
pub fn evaluate_fold(
    images: &[PreparedImage],
    folds: usize,
    fold: usize,
    cascade: &crate::pipeline::Cascade,
    cfg: &PipelineConfig,
) -> Result<(Vec<FrocReport>, RecallCurve)> {
    let val = fold_members(images, folds, fold);
    let mut eval_cfg = cfg.candidates.clone();
    eval_cfg.max_candidates = *RECALL_KS.last().expect("non-empty");
    let mut outcomes: Vec<Vec<ImageOutcome>> = vec![Vec::new(); ScoreSource::ALL.len()];
    let mut cands = Vec::new();
    for &i in &val {
        let mut run = run_cascade(cascade, images, i, &eval_cfg);
        cands.push((i, run.candidates.clone()));
        run.candidates.truncate(cfg.candidates.max_candidates);
        run.stage2.truncate(cfg.candidates.max_candidates);
        for (k, source) in ScoreSource::ALL.iter().enumerate() {
            let mut r = crate::pipeline::CascadeOutput {
                candidates: run.candidates.clone(),
                stage2: run.stage2.clone(),
            };
            if *source == ScoreSource::Stage1 {
                r.stage2.iter_mut().for_each(|m| *m = 0.0);
            }
            let dets = r.detections(&images[i], &source.scoring(&cfg.scoring));
            outcomes[k].push(ImageOutcome::score(
                &images[i].name,
                &images[i].truth,
                &reported(&dets),
            )?);
        }
    }
    let reports = outcomes
        .iter()
        .map(|o| FrocReport::from_outcomes(o))
        .collect::<Result<Vec<_>>>()?;
    Ok((reports, candidate_recall(&cands, images, &RECALL_KS)?))
}

/// CPM of the held-out images of every trained fold when candidates are scored with each
/// of several stage-1 weights (`score = sigmoid((m2 + w m1) / T)`), from
/// [`sweep_stage1_weight`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct WeightSweep {
    /// Folds found in the CV folder (1-based).
    pub folds_run: Vec<usize>,
    pub rows: Vec<WeightSweepRow>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct WeightSweepRow {
    pub stage1_weight: f64,
    /// Same order as [`WeightSweep::folds_run`].
    pub cpm_per_fold: Vec<f64>,
    pub mean_cpm: f64,
    /// One FROC over the held-out images of all folds.
    pub pooled_cpm: f64,
}

impl WeightSweep {
    pub const FILE_NAME: &'static str = "stage1-weight-sweep.json";
}

/// Run each fold's trained nets (`cv_dir/fold-K/stage{1,2}.safetensors`, written by `cv`)
/// once on that fold's held-out images, then score the candidates with every weight in
/// `weights`. Only the score changes between rows, so the candidates, their number and
/// positions are those `cv` measured.
pub fn sweep_stage1_weight(
    images: &[PreparedImage],
    folds: usize,
    cv_dir: &Path,
    weights: &[f64],
    cfg: &PipelineConfig,
) -> Result<WeightSweep> {
    if weights.is_empty() || weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
        bail!("stage-1 weights must be zero or positive numbers, got {weights:?}");
    }
    let mut folds_run = Vec::new();
    // outcomes[weight][fold] per held-out image.
    let mut outcomes: Vec<Vec<Vec<ImageOutcome>>> = vec![Vec::new(); weights.len()];
    for fold in 0..folds {
        let dir = cv_dir.join(format!("fold-{}", fold + 1));
        let (p1, p2) = (
            dir.join("stage1.safetensors"),
            dir.join("stage2.safetensors"),
        );
        if !p1.exists() && !p2.exists() {
            continue;
        }
        let cascade = crate::pipeline::Cascade {
            stage1: crate::train::load_net(&p1, crate::nets::Stage::Candidates)?,
            stage2: crate::train::load_net(&p2, crate::nets::Stage::Verdict)?,
        };
        let members = fold_members(images, folds, fold);
        let bar = crate::pipeline::progress(members.len(), &format!("fold {}", fold + 1));
        let runs: Vec<_> = members
            .iter()
            .map(|&i| {
                let run = run_cascade(&cascade, images, i, &cfg.candidates);
                bar.inc(1);
                (i, run)
            })
            .collect();
        bar.finish_and_clear();
        for (k, &w) in weights.iter().enumerate() {
            let scoring = Scoring {
                stage1_weight: w,
                ..cfg.scoring.clone()
            };
            let mut fold_outcomes = Vec::new();
            for (i, run) in &runs {
                let dets = run.detections(&images[*i], &scoring);
                fold_outcomes.push(ImageOutcome::score(
                    &images[*i].name,
                    &images[*i].truth,
                    &reported(&dets),
                )?);
            }
            outcomes[k].push(fold_outcomes);
        }
        folds_run.push(fold + 1);
    }
    if folds_run.is_empty() {
        bail!(
            "no trained fold in {} (expected fold-K/stage1.safetensors and \
             fold-K/stage2.safetensors from `ma-trainer cv --out {0}`)",
            cv_dir.display()
        );
    }
    let mut rows = Vec::new();
    for (k, &w) in weights.iter().enumerate() {
        let cpm_per_fold = outcomes[k]
            .iter()
            .map(|o| Ok(FrocReport::from_outcomes(o)?.cpm))
            .collect::<Result<Vec<f64>>>()?;
        let pooled: Vec<ImageOutcome> = outcomes[k].concat();
        rows.push(WeightSweepRow {
            stage1_weight: w,
            mean_cpm: cpm_per_fold.iter().sum::<f64>() / cpm_per_fold.len() as f64,
            cpm_per_fold,
            pooled_cpm: FrocReport::from_outcomes(&pooled)?.cpm,
        });
    }
    Ok(WeightSweep { folds_run, rows })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ground_truth::GroundTruth;
    use ma_core::preprocess::{FovSource, PreprocessConfig, preprocess};
    use ma_synthetic::{SyntheticParams, generate};

    /// Small synthetic images labelled with a dataset name; `copy_of` marks copies.
    fn images(spec: &[(&str, Option<usize>)]) -> Vec<PreparedImage> {
        let frame = generate(&SyntheticParams::small(), 3);
        let pre = preprocess(
            &frame.image,
            FovSource::Estimate,
            &PreprocessConfig::default(),
        )
        .unwrap();
        spec.iter()
            .enumerate()
            .map(|(i, (dataset, copy_of))| {
                let mut im = PreparedImage::from_parts(
                    dataset,
                    format!("{dataset}-{i}"),
                    pre.clone(),
                    GroundTruth::from_synthetic(&frame),
                );
                im.copy_of = *copy_of;
                im
            })
            .collect()
    }

    #[test]
    fn folds_are_made_per_dataset_and_copies_follow_their_photo() {
        // One dataset: photo i in fold i % K, as before several datasets existed.
        let one = images(&[("A", None); 6]);
        assert_eq!(fold_assignment(&one, 4), [0, 1, 2, 3, 0, 1]);

        // Two datasets, then copies of photos 1 (A) and 4 (B).
        let two = images(&[
            ("A", None),
            ("A", None),
            ("A", None),
            ("B", None),
            ("B", None),
            ("B", None),
            ("B", None),
            ("A", Some(1)),
            ("B", Some(4)),
        ]);
        assert_eq!(fold_assignment(&two, 2), [0, 1, 0, 0, 1, 0, 1, 1, 1]);
        // Every fold holds both datasets; copies are never held out.
        assert_eq!(fold_members(&two, 2, 0), [0, 2, 3, 5]);
        assert_eq!(fold_members(&two, 2, 1), [1, 4, 6]);
        assert_eq!(dataset_names(&two), ["A", "B"]);
    }

    #[test]
    fn too_many_folds_for_the_smallest_dataset_is_an_error() {
        let imgs = images(&[
            ("A", None),
            ("A", None),
            ("B", None),
            ("B", None),
            ("B", None),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let e = cross_validate(
            &imgs,
            3,
            None,
            &PipelineConfig::default(),
            dir.path(),
            false,
        )
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap();
        assert!(e.contains("smallest dataset") && e.contains("A: 2"), "{e}");
    }
}
