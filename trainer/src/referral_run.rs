//! The `ma-trainer referral ...` and `heatmap` commands: cross-validate, train and export
//! the referral network, and draw its heatmaps for the workstation.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use ma_core::heatmap;
use ma_core::image_io::find_images;
use ma_core::manifest::{Manifest, Role};
use ma_core::referral::{ReferRule, ReferralConfig, ZoomConfig, refer_score, top_cells};

use crate::export::referral::add_to_model_set;
use crate::grading::{self, GradedPhoto};
use crate::nets::REFERRAL_STRIDE;
use crate::referral::{self, ReferralTraining};
use crate::referral_cv::{
    BinaryFigures, MaFindings, OutOfFold, choose_rule, figures, ma_findings, rank_average,
    read_csv, rule_figures, sensitivity_specificity, write_csv,
};
use crate::zoom::{self, ZoomSettings};

/// What every referral command needs.
#[derive(Clone, Debug)]
pub struct ReferralData {
    /// The graded set's root.
    pub data: PathBuf,
    /// The model set whose `[preprocess]` settings the network is trained with.
    pub models: PathBuf,
    /// Side of the network input.
    pub side: usize,
    pub training: ReferralTraining,
}

/// The figures of a finished CV, `OUT/referral-cv.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReferralCvSummary {
    pub photos: usize,
    pub referable: usize,
    pub folds: usize,
    pub side: usize,
    pub epochs: usize,
    pub per_fold_auc: Vec<f64>,
    /// The referral score, out-of-fold, pooled over the folds.
    pub referral: BinaryFigures,
    /// The cascade's MA count at 2 FP/image as a score (when `--ma-detections` was given).
    pub ma_count: Option<BinaryFigures>,
    /// The rank average of the referral score and the MA count.
    pub combined: Option<BinaryFigures>,
    /// Today's device rule, "refer if at least one MA at 2 FP/image": (sensitivity,
    /// specificity).
    pub one_ma_rule: Option<(f64, f64)>,
    /// The refer rule chosen on these out-of-fold scores (best sensitivity at
    /// specificity >= 0.85), with its sensitivity and specificity.
    pub rule: ReferRule,
    pub rule_sensitivity: f64,
    pub rule_specificity: f64,
    /// The rule's figures without the optimism of choosing and scoring on the same
    /// photos: for each fold, a rule chosen on the other folds' scores decides that
    /// fold's photos; (sensitivity, specificity) of those decisions, pooled.
    pub rule_nested: (f64, f64),
    pub training_data: String,
}

impl ReferralCvSummary {
    pub const FILE: &'static str = "referral-cv.json";

    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(Self::FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (run `ma-trainer referral cv` first)",
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

fn load_set(d: &ReferralData) -> Result<(Vec<GradedPhoto>, Vec<bool>, Manifest)> {
    let photos = grading::load(&d.data)?;
    let labels = photos.iter().map(GradedPhoto::referable).collect();
    let manifest = Manifest::load(&d.models).with_context(|| {
        format!(
            "the model set whose preprocessing to use ({})",
            d.models.display()
        )
    })?;
    Ok((photos, labels, manifest))
}

fn fold_csv(out: &Path, fold: usize) -> PathBuf {
    out.join(format!("fold-{fold}.csv"))
}

/// `k`-fold CV by patient: trains fold `only` (1-based) or every fold not done yet in
/// `out` (a fold is done once its scores are written), writes each fold's
/// out-of-fold scores (`OUT/fold-K.csv`) and weights (`OUT/fold-K/referral.safetensors`);
/// once every fold's scores are in OUT, summarises them (with the cascade's MA findings
/// from `ma_detections`, a `detect` output on the same photos, when given) into
/// `OUT/referral-cv.json` and `OUT/referral-cv.csv`.
pub fn cv(
    d: &ReferralData,
    out: &Path,
    folds: usize,
    only: Option<usize>,
    ma_detections: Option<&Path>,
) -> Result<()> {
    let (photos, labels, manifest) = load_set(d)?;
    let fold_of = grading::patient_folds(&photos, folds)?;
    if let Some(k) = only {
        ensure!((1..=folds).contains(&k), "--fold {k} is not in 1..={folds}");
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // A fold whose scores are in OUT is done (a resumed or summarising run keeps it);
    // `--fold K` always runs K.
    let to_run: Vec<usize> = match only {
        Some(k) => vec![k],
        None => (1..=folds)
            .filter(|&k| {
                let done = fold_csv(out, k).exists();
                if done {
                    println!(
                        "fold {k}/{folds}: done earlier, kept ({})",
                        fold_csv(out, k).display()
                    );
                }
                !done
            })
            .collect(),
    };
    if to_run.is_empty() {
        return summarise(d, out, folds, &photos, &manifest, ma_detections);
    }
    let started = Instant::now();
    let paths: Vec<PathBuf> = photos.iter().map(|p| p.path.clone()).collect();
    let inputs = referral::prepare(&paths, &manifest.preprocess, d.side)?;
    eprintln!(
        "prepared {} photos ({} referable) in {:.0} s",
        photos.len(),
        labels.iter().filter(|&&l| l).count(),
        started.elapsed().as_secs_f64()
    );
    for k in to_run {
        let train: Vec<usize> = (0..photos.len()).filter(|&i| fold_of[i] + 1 != k).collect();
        let held: Vec<usize> = (0..photos.len()).filter(|&i| fold_of[i] + 1 == k).collect();
        let (vs, net) = referral::train(
            &inputs.tensor,
            &labels,
            &train,
            &d.training,
            &format!("fold {k}/{folds}"),
        )?;
        let dir = out.join(format!("fold-{k}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let weights = dir.join("referral.safetensors");
        vs.save(&weights)
            .with_context(|| format!("writing {}", weights.display()))?;
        let rows: Vec<OutOfFold> = referral::predict(&net, &inputs.tensor, &held)?
            .into_iter()
            .zip(&held)
            .map(|((margin, _), &i)| OutOfFold {
                name: photos[i].name.clone(),
                patient: photos[i].patient.clone(),
                grade: photos[i].grade,
                referable: labels[i],
                fold: k,
                margin,
            })
            .collect();
        let scores: Vec<f64> = rows.iter().map(OutOfFold::score).collect();
        let held_labels: Vec<bool> = rows.iter().map(|r| r.referable).collect();
        println!(
            "fold {k}/{folds}: {} held-out photos, referral AUC {:.3}",
            rows.len(),
            figures(&scores, &held_labels).auc
        );
        write_csv(&fold_csv(out, k), &rows)?;
    }
    let missing: Vec<usize> = (1..=folds)
        .filter(|&k| !fold_csv(out, k).exists())
        .collect();
    if !missing.is_empty() {
        println!(
            "folds {missing:?} not run yet: the summary comes once every fold is in {}",
            out.display()
        );
        return Ok(());
    }
    summarise(d, out, folds, &photos, &manifest, ma_detections)
}

fn summarise(
    d: &ReferralData,
    out: &Path,
    folds: usize,
    photos: &[GradedPhoto],
    manifest: &Manifest,
    ma_detections: Option<&Path>,
) -> Result<()> {
    let mut rows = Vec::new();
    let mut per_fold_auc = Vec::new();
    for k in 1..=folds {
        let r = read_csv(&fold_csv(out, k))?;
        let s: Vec<f64> = r.iter().map(OutOfFold::score).collect();
        let l: Vec<bool> = r.iter().map(|x| x.referable).collect();
        per_fold_auc.push(figures(&s, &l).auc);
        rows.extend(r);
    }
    // Back into the photos' order, checking the folds cover the set exactly.
    let mut by_name: std::collections::HashMap<String, OutOfFold> =
        rows.into_iter().map(|r| (r.name.clone(), r)).collect();
    let rows: Vec<OutOfFold> = photos
        .iter()
        .map(|p| {
            by_name
                .remove(&p.name)
                .with_context(|| format!("{} is in no fold's scores in {}", p.name, out.display()))
        })
        .collect::<Result<_>>()?;
    ensure!(
        by_name.is_empty(),
        "fold scores in {} name photos the graded set does not have (e.g. {:?}): were the \
         folds run on another copy?",
        out.display(),
        by_name.keys().next()
    );
    write_csv(&out.join("referral-cv.csv"), &rows)?;
    let scores: Vec<f64> = rows.iter().map(OutOfFold::score).collect();
    let labels: Vec<bool> = rows.iter().map(|r| r.referable).collect();
    let findings: Option<Vec<MaFindings>> = ma_detections
        .map(|p| ma_findings(p, photos, &manifest.operating_points))
        .transpose()?;
    let (ma_count, combined, one_ma_rule) = match &findings {
        Some(f) => {
            let counts: Vec<f64> = f.iter().map(|x| x.counts[1] as f64).collect();
            let one = ReferRule {
                score_threshold: 1.0 + f64::EPSILON,
                ma_count: Some(1),
                operating_point: Some(ma_core::manifest::OperatingPoint::Fp2),
            };
            (
                Some(figures(&counts, &labels)),
                Some(figures(&rank_average(&scores, &counts), &labels)),
                Some(rule_figures(&one, &scores, f, &labels)),
            )
        }
        None => (None, None, None),
    };
    let (rule, rule_sensitivity, rule_specificity) =
        choose_rule(&scores, findings.as_deref(), &labels, 0.85);
    let rule_nested = nested_rule_figures(&rows, &scores, findings.as_deref(), &labels, folds);
    let summary = ReferralCvSummary {
        photos: rows.len(),
        referable: labels.iter().filter(|&&l| l).count(),
        folds,
        side: d.side,
        epochs: d.training.epochs,
        per_fold_auc,
        referral: figures(&scores, &labels),
        ma_count,
        combined,
        one_ma_rule,
        rule,
        rule_sensitivity,
        rule_specificity,
        rule_nested,
        training_data: format!(
            "graded DR photos ({}), {} photos, referable = grade >= {}",
            d.data.display(),
            rows.len(),
            grading::FIRST_REFERABLE_GRADE
        ),
    };
    let path = out.join(ReferralCvSummary::FILE);
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("writing {}", path.display()))?;
    print_summary(&summary);
    println!(
        "wrote {} and {}",
        path.display(),
        out.join("referral-cv.csv").display()
    );
    Ok(())
}

/// The figures of the zoom-in step on the referral CV, `OUT/zoom-cv.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ZoomCvSummary {
    pub photos: usize,
    pub folds: usize,
    /// Crops a photo is scored on, trained on, their side in cells and in pixels.
    pub crops: usize,
    pub train_crops: usize,
    pub crop_cells: f64,
    pub crop_side: usize,
    pub epochs: usize,
    /// Per fold: AUC of the referral margin, the zoom margin and their mean.
    pub per_fold_auc: Vec<(f64, f64, f64)>,
    pub referral: BinaryFigures,
    pub zoom: BinaryFigures,
    pub merged: BinaryFigures,
}

impl ZoomCvSummary {
    pub const FILE: &'static str = "zoom-cv.json";
}

/// The zoom-in step on a finished referral CV (`cv_dir`, with every fold's weights): for
/// each fold, the fold's referral network picks each photo's strongest attention cells,
/// a crop classifier is trained on the crops of the fold's training photos and scores
/// its held-out photos; the zoom margin and its mean with the referral margin are then
/// measured like the referral score. Writes the classifiers (`OUT/fold-K/zoom.safetensors`),
/// `OUT/zoom-cv.csv` (one line per photo) and `OUT/zoom-cv.json`; then the merged margin's
/// `OUT/fold-K.csv` and [`ReferralCvSummary`] (with the MA baseline and refer rule of
/// `ma_detections`), as `referral cv` writes them for the network alone.
pub fn zoom_cv(
    d: &ReferralData,
    cv_dir: &Path,
    out: &Path,
    folds: usize,
    z: &ZoomSettings,
    zoom_training: &ReferralTraining,
    ma_detections: Option<&Path>,
) -> Result<ZoomCvSummary> {
    z.validate()?;
    // OUT gets fold-K.csv files of the merged score: in the network's CV folder they would
    // replace its own.
    let same = |a: &Path, b: &Path| {
        a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
    };
    ensure!(
        !same(cv_dir, out),
        "--out {} is the network's CV folder (--cv): its fold scores would be replaced; \
         choose another folder",
        out.display()
    );
    let (photos, labels, manifest) = load_set(d)?;
    let fold_of = grading::patient_folds(&photos, folds)?;
    let weights: Vec<PathBuf> = (1..=folds)
        .map(|k| {
            cv_dir
                .join(format!("fold-{k}"))
                .join("referral.safetensors")
        })
        .collect();
    for w in &weights {
        ensure!(
            w.is_file(),
            "{} is missing: run `ma-trainer referral cv --out {} --folds {folds}` first",
            w.display(),
            cv_dir.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let paths: Vec<PathBuf> = photos.iter().map(|p| p.path.clone()).collect();
    let all: Vec<usize> = (0..photos.len()).collect();
    let map_side = d.side / REFERRAL_STRIDE;
    // Every fold's network on every photo: its margins and its strongest cells.
    let (cells, margins) = attention_cells(d, &manifest, &paths, &weights, z)?;
    let crops = zoom::prepare_crops(&paths, &manifest.preprocess, d.side, map_side, &cells, z)?;
    let k = z.train_crops;
    let mut rows: Vec<(usize, f64, f64)> = Vec::with_capacity(photos.len());
    let mut per_fold_auc = Vec::with_capacity(folds);
    for fold in 1..=folds {
        let train: Vec<usize> = all
            .iter()
            .copied()
            .filter(|&i| fold_of[i] + 1 != fold)
            .collect();
        let held: Vec<usize> = all
            .iter()
            .copied()
            .filter(|&i| fold_of[i] + 1 == fold)
            .collect();
        let c = &crops[fold - 1];
        let (vs, net) = zoom::train(
            c,
            k,
            &labels,
            &train,
            zoom_training,
            &format!("zoom fold {fold}/{folds}"),
        )?;
        let dir = out.join(format!("fold-{fold}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("zoom.safetensors");
        vs.save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        let zoom_margins = zoom::predict(&net, c, k, z.crops, &held)?;
        let fold_rows: Vec<(usize, f64, f64)> = held
            .iter()
            .zip(zoom_margins)
            .map(|(&i, zm)| (i, margins[fold - 1][i], zm))
            .collect();
        let l: Vec<bool> = fold_rows.iter().map(|r| labels[r.0]).collect();
        let auc_of = |f: &dyn Fn(&(usize, f64, f64)) -> f64| {
            figures(&fold_rows.iter().map(f).collect::<Vec<_>>(), &l).auc
        };
        let aucs = (
            auc_of(&|r| r.1),
            auc_of(&|r| r.2),
            auc_of(&|r| zoom::merge(r.1, r.2)),
        );
        println!(
            "zoom fold {fold}/{folds}: {} held-out photos, AUC referral {:.3}, zoom {:.3}, \
             merged {:.3}",
            held.len(),
            aucs.0,
            aucs.1,
            aucs.2
        );
        per_fold_auc.push(aucs);
        rows.extend(fold_rows);
    }
    rows.sort_by_key(|r| r.0);
    let csv = out.join("zoom-cv.csv");
    let mut text = String::from(
        "image,patient,grade,referable,fold,referral_margin,zoom_margin,merged_margin\n",
    );
    for &(i, m, zm) in &rows {
        let p = &photos[i];
        text.push_str(&format!(
            "{},{},{},{},{},{m:.6},{zm:.6},{:.6}\n",
            p.name,
            p.patient,
            p.grade,
            u8::from(labels[i]),
            fold_of[i] + 1,
            zoom::merge(m, zm)
        ));
    }
    std::fs::write(&csv, text).with_context(|| format!("writing {}", csv.display()))?;
    let l: Vec<bool> = rows.iter().map(|r| labels[r.0]).collect();
    let score = |f: &dyn Fn(&(usize, f64, f64)) -> f64| -> Vec<f64> {
        rows.iter().map(|r| refer_score(f(r))).collect()
    };
    let summary = ZoomCvSummary {
        photos: rows.len(),
        folds,
        crops: z.crops,
        train_crops: z.train_crops,
        crop_cells: z.cells,
        crop_side: z.side,
        epochs: zoom_training.epochs,
        per_fold_auc,
        referral: figures(&score(&|r| r.1), &l),
        zoom: figures(&score(&|r| r.2), &l),
        merged: figures(&score(&|r| zoom::merge(r.1, r.2)), &l),
    };
    let json = out.join(ZoomCvSummary::FILE);
    std::fs::write(&json, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("writing {}", json.display()))?;
    println!(
        "\nzoom-in step, {folds}-fold CV by patient, {} photos:",
        rows.len()
    );
    for (name, f) in [
        ("referral network", &summary.referral),
        ("crop classifier", &summary.zoom),
        ("mean of both margins", &summary.merged),
    ] {
        println!(
            "  {name:<22} AUC {:.3}, sensitivity {:.3} at specificity >= 0.85, {:.3} at >= 0.90",
            f.auc, f.sensitivity_at_specificity_85, f.sensitivity_at_specificity_90
        );
    }
    println!("wrote {} and {}", json.display(), csv.display());
    // The merged margin as the referral score of a CV in OUT: the same summary, baseline
    // and refer rule as `referral cv` (what `referral export` reads).
    for fold in 1..=folds {
        let fold_rows: Vec<OutOfFold> = rows
            .iter()
            .filter(|r| fold_of[r.0] + 1 == fold)
            .map(|&(i, m, zm)| OutOfFold {
                name: photos[i].name.clone(),
                patient: photos[i].patient.clone(),
                grade: photos[i].grade,
                referable: labels[i],
                fold,
                margin: zoom::merge(m, zm),
            })
            .collect();
        write_csv(&fold_csv(out, fold), &fold_rows)?;
    }
    summarise(d, out, folds, &photos, &manifest, ma_detections)?;
    Ok(summary)
}

/// See [`ReferralCvSummary::rule_nested`].
fn nested_rule_figures(
    rows: &[OutOfFold],
    scores: &[f64],
    findings: Option<&[MaFindings]>,
    labels: &[bool],
    folds: usize,
) -> (f64, f64) {
    // Each photo's decision by the rule chosen without its fold.
    let mut decisions = Vec::with_capacity(rows.len());
    for k in 1..=folds {
        let pick = |inside: bool| -> Vec<usize> {
            (0..rows.len())
                .filter(|&i| (rows[i].fold == k) == inside)
                .collect()
        };
        let (held, rest) = (pick(true), pick(false));
        let take = |idx: &[usize]| -> (Vec<f64>, Option<Vec<MaFindings>>, Vec<bool>) {
            (
                idx.iter().map(|&i| scores[i]).collect(),
                findings.map(|f| idx.iter().map(|&i| f[i].clone()).collect()),
                idx.iter().map(|&i| labels[i]).collect(),
            )
        };
        let (s, f, l) = take(&rest);
        let (rule, _, _) = choose_rule(&s, f.as_deref(), &l, 0.85);
        let (s, f, l) = take(&held);
        for (i, &label) in l.iter().enumerate() {
            let refer = rule.refers(s[i], |op| f.as_ref().map_or(0, |f| f[i].count_at(op)));
            decisions.push((refer, label));
        }
    }
    sensitivity_specificity(decisions)
}

fn print_summary(s: &ReferralCvSummary) {
    println!(
        "\nreferable DR, {}-fold CV by patient: {} photos, {} referable",
        s.folds, s.photos, s.referable
    );
    let fold_aucs: Vec<String> = s.per_fold_auc.iter().map(|a| format!("{a:.3}")).collect();
    println!(
        "per-fold AUC of the referral score: {}",
        fold_aucs.join(" ")
    );
    println!(
        "{:<34} {:>6} {:>12} {:>12}",
        "score", "AUC", "sens@spec85", "sens@spec90"
    );
    let row = |name: &str, f: &BinaryFigures| {
        println!(
            "{name:<34} {:>6.3} {:>12.3} {:>12.3}",
            f.auc, f.sensitivity_at_specificity_85, f.sensitivity_at_specificity_90
        )
    };
    row("referral network", &s.referral);
    if let Some(f) = &s.ma_count {
        row("MA count at 2 FP/image (cascade)", f);
    }
    if let Some(f) = &s.combined {
        row("rank average of both", f);
    }
    if let Some((sens, spec)) = s.one_ma_rule {
        println!(
            "today's rule, >= 1 MA at 2 FP/image: sensitivity {sens:.3}, specificity {spec:.3}"
        );
    }
    println!(
        "chosen rule: {:?}: sensitivity {:.3}, specificity {:.3} on the photos it was \
         chosen on; chosen on the other folds for each fold: sensitivity {:.3}, \
         specificity {:.3}",
        s.rule, s.rule_sensitivity, s.rule_specificity, s.rule_nested.0, s.rule_nested.1
    );
}

/// Train on every graded photo; writes `OUT/referral.safetensors`.
pub fn train(d: &ReferralData, out: &Path) -> Result<PathBuf> {
    let (photos, labels, manifest) = load_set(d)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let paths: Vec<PathBuf> = photos.iter().map(|p| p.path.clone()).collect();
    let inputs = referral::prepare(&paths, &manifest.preprocess, d.side)?;
    let all: Vec<usize> = (0..photos.len()).collect();
    let (vs, _) = referral::train(&inputs.tensor, &labels, &all, &d.training, "referral")?;
    let path = out.join("referral.safetensors");
    vs.save(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(path)
}

/// Add trained weights to the model set in `models`, with the rule and AUC of the CV in
/// `cv_dir`. With `zoom` (a crop classifier from `referral zoom-train`), `cv_dir` must be
/// `referral zoom-cv`'s OUT: the rule and AUC are those of the merged margin, and the
/// crops are taken as that CV took them.
pub fn export(
    weights: &Path,
    zoom: Option<&Path>,
    cv_dir: &Path,
    models: &Path,
    version: &str,
) -> Result<Manifest> {
    let summary = ReferralCvSummary::load(cv_dir)?;
    let (vs, _) = referral::load(weights)?;
    let zoom_path = zoom;
    let zoom = match zoom {
        Some(path) => {
            let file = cv_dir.join(ZoomCvSummary::FILE);
            let text = std::fs::read_to_string(&file).with_context(|| {
                format!(
                    "reading {} (with --zoom-weights, --cv is `referral zoom-cv`'s OUT)",
                    file.display()
                )
            })?;
            let z: ZoomCvSummary = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", file.display()))?;
            Some((
                zoom::load(path)?.0,
                ZoomConfig {
                    crops: z.crops,
                    crop_cells: z.crop_cells,
                    crop_side: z.crop_side,
                },
            ))
        }
        None => None,
    };
    let cfg = ReferralConfig {
        input_side: summary.side,
        attention_stride: REFERRAL_STRIDE,
        boxes: 4,
        rule: summary.rule.clone(),
        training_data: summary.training_data.clone(),
        cv_auc: summary.referral.auc,
        zoom: zoom.as_ref().map(|z| z.1.clone()),
    };
    let mut manifest = add_to_model_set(&vs, zoom.as_ref().map(|z| &z.0), models, &cfg, version)?;
    crate::export::weights::attach(&mut manifest, Role::Referral, weights)?;
    if let Some(path) = zoom_path {
        crate::export::weights::attach(&mut manifest, Role::Zoom, path)?;
    }
    crate::export::write_unsigned(&manifest, models)?;
    Ok(manifest)
}

/// Train the crop classifier on every graded photo, with the crops the referral network
/// `weights` (trained on every photo, `referral train`) picks; writes
/// `OUT/zoom.safetensors`.
pub fn zoom_train(
    d: &ReferralData,
    weights: &Path,
    out: &Path,
    z: &ZoomSettings,
) -> Result<PathBuf> {
    z.validate()?;
    let (photos, labels, manifest) = load_set(d)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let paths: Vec<PathBuf> = photos.iter().map(|p| p.path.clone()).collect();
    let (cells, _) = attention_cells(d, &manifest, &paths, &[weights.to_path_buf()], z)?;
    let crops = zoom::prepare_crops(
        &paths,
        &manifest.preprocess,
        d.side,
        d.side / REFERRAL_STRIDE,
        &cells,
        z,
    )?;
    let all: Vec<usize> = (0..photos.len()).collect();
    let (vs, _) = zoom::train(&crops[0], z.train_crops, &labels, &all, &d.training, "zoom")?;
    let path = out.join("zoom.safetensors");
    vs.save(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(path)
}

/// Per referral network, per photo: its strongest attention cells.
type CellsPerNet = Vec<Vec<Vec<usize>>>;

/// For each referral network in `weights`: every photo's margin and its
/// `z.train_crops` strongest attention cells. The photos are preprocessed here and again
/// by [`zoom::prepare_crops`]: keeping every full-resolution preprocessed photo between
/// the two (about 20 MB each, 8 GB for the graded set) would cost more than the second
/// pass (under a minute).
fn attention_cells(
    d: &ReferralData,
    manifest: &Manifest,
    paths: &[PathBuf],
    weights: &[PathBuf],
    z: &ZoomSettings,
) -> Result<(CellsPerNet, Vec<Vec<f64>>)> {
    let inputs = referral::prepare(paths, &manifest.preprocess, d.side)?;
    let all: Vec<usize> = (0..paths.len()).collect();
    let mut cells = Vec::with_capacity(weights.len());
    let mut margins = Vec::with_capacity(weights.len());
    for w in weights {
        let (_vs, net) = referral::load(w)?;
        let (m, att): (Vec<f64>, Vec<Vec<f32>>) = referral::predict(&net, &inputs.tensor, &all)?
            .into_iter()
            .unzip();
        margins.push(m);
        cells.push(zoom::strongest_cells(&att, z.train_crops));
    }
    Ok((cells, margins))
}

/// Trained referral weights and the model set whose `[referral]` settings (input side,
/// boxes) and preprocessing they go with.
fn load_network(
    weights: &Path,
    models: &Path,
) -> Result<(Manifest, ReferralConfig, referral::ReferralNet)> {
    let manifest = Manifest::load(models)?;
    let cfg = manifest.referral.clone().with_context(|| {
        format!(
            "{} has no [referral] section: which input side the network takes is unknown",
            models.join(ma_core::manifest::FILE_NAME).display()
        )
    })?;
    let (_, net) = referral::load(weights)?;
    Ok((manifest, cfg, net))
}

/// S1 and attention heatmaps of every photo under `input` (a file or a folder) into `out`:
/// `<stem>-s1.png` and `<stem>-attention.png` (photo with the map blended in and the top
/// attention boxes outlined), and one line per photo with its referral score, which is
/// also returned per photo: the device's `refer_score` with `zoom_weights` (or for a set
/// without a zoom-in step), else the network's own.
pub fn heatmaps(
    weights: &Path,
    zoom_weights: Option<&Path>,
    models: &Path,
    input: &Path,
    out: &Path,
) -> Result<Vec<(PathBuf, f64)>> {
    let (manifest, cfg, net) = load_network(weights, models)?;
    // With the set's zoom-in step, the printed score is the device's `refer_score`.
    let zoom = match (zoom_weights, &cfg.zoom) {
        (Some(w), Some(z)) => Some((zoom::load(w)?.1, z.clone())),
        (Some(_), None) => anyhow::bail!(
            "--zoom-weights given, but {} has no [referral.zoom] section (how to crop)",
            models.display()
        ),
        (None, _) => None,
    };
    let files = if input.is_dir() {
        find_images(input)?
    } else {
        vec![input.to_path_buf()]
    };
    ensure!(!files.is_empty(), "no photos under {}", input.display());
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let side = cfg.input_side;
    let what = match (&zoom, &cfg.zoom) {
        (Some(_), _) => "refer_score",
        (None, Some(_)) => "network_score (without the zoom-in step: not the device's score)",
        (None, None) => "refer_score",
    };
    let mut scores = Vec::with_capacity(files.len());
    for file in files {
        let referral::PhotoView { rgb, pre, view } =
            referral::photo_view(&file, &manifest.preprocess, side)?;
        let referral::Explained {
            margin,
            attention,
            s1,
        } = referral::explain(&net, &referral::input_tensor(&view))?;
        let margin = match &zoom {
            Some((znet, z)) => ma_core::referral::merged_margin(
                margin,
                zoom::photo_margin(znet, &pre, &view, &attention, cfg.attention_side(), z)?,
            ),
            None => margin,
        };
        let stem = file
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let boxes = view.top_boxes(&attention, cfg.attention_side(), cfg.boxes);
        for (name, map, map_side) in [
            ("s1", &s1, side),
            ("attention", &attention, cfg.attention_side()),
        ] {
            let max = heatmap::quantile(map, 0.995);
            let img = heatmap::picture(&rgb, &view, map, map_side, max, &boxes);
            let path = out.join(format!("{stem}-{name}.png"));
            img.save(&path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        println!(
            "{}\t{what} {:.4}\t{}",
            file.display(),
            refer_score(margin),
            out.join(format!("{stem}-{{s1,attention}}.png")).display()
        );
        scores.push((file, refer_score(margin)));
    }
    Ok(scores)
}

/// Where a lesion set's MAs fall in the attention ranking (Zoom-in-Net's figure): for
/// each lesion, the rank of the attention cell holding its centroid in its photo.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttentionCoverage {
    pub dataset: String,
    pub photos: usize,
    pub lesions: usize,
    /// Cells in the attention map.
    pub cells: usize,
    /// Fewest top cells per photo holding 50% and 80% of the lesions (pooled).
    pub cells_for_50: usize,
    pub cells_for_80: usize,
    /// Share of the lesions in the 4 top cells (the boxes `detect` reports).
    pub share_in_top_4: f64,
}

/// [`AttentionCoverage`] of the referral weights on a lesion set.
pub fn attention_coverage(
    weights: &Path,
    models: &Path,
    dataset: &crate::datasets::Dataset,
) -> Result<AttentionCoverage> {
    let (manifest, cfg, net) = load_network(weights, models)?;
    let paths: Vec<PathBuf> = dataset.images.iter().map(|im| im.path.clone()).collect();
    let inputs = referral::prepare(&paths, &manifest.preprocess, cfg.input_side)?;
    let all: Vec<usize> = (0..paths.len()).collect();
    let predictions = referral::predict(&net, &inputs.tensor, &all)?;
    let side = cfg.attention_side();
    let cell = (cfg.input_side / side) as f64;
    let mut ranks = Vec::new();
    for ((image, view), (_, attention)) in
        dataset.images.iter().zip(&inputs.views).zip(&predictions)
    {
        // Ranked as the device ranks its boxes.
        let mut rank_of = vec![0; attention.len()];
        for (r, &c) in top_cells(attention, attention.len()).iter().enumerate() {
            rank_of[c] = r;
        }
        for lesion in image.load_truth()?.lesions {
            let (x, y) = lesion.centroid();
            let (u, v) = view.from_original(x, y);
            let (cu, cv) = ((u / cell).floor(), (v / cell).floor());
            // A lesion outside the input square is in no cell: ranked last.
            let rank = if (0.0..side as f64).contains(&cu) && (0.0..side as f64).contains(&cv) {
                rank_of[cv as usize * side + cu as usize]
            } else {
                side * side
            };
            ranks.push(rank);
        }
    }
    ensure!(!ranks.is_empty(), "the dataset has no lesions to cover");
    ranks.sort_unstable();
    let cells_for =
        |q: f64| ranks[((ranks.len() as f64 * q).ceil() as usize).clamp(1, ranks.len()) - 1] + 1;
    Ok(AttentionCoverage {
        dataset: dataset.kind.to_string(),
        photos: paths.len(),
        lesions: ranks.len(),
        cells: side * side,
        cells_for_50: cells_for(0.5),
        cells_for_80: cells_for(0.8),
        share_in_top_4: ranks.iter().filter(|&&r| r < 4).count() as f64 / ranks.len() as f64,
    })
}

/// Most heatmap maxima kept per photo by [`heatmap_froc`].
pub const HEATMAP_MAXIMA: usize = 50;

/// Quellec et al.'s lesion-level evaluation of the S1 heatmap: each photo's local maxima
/// (3x3, inside the field of view, the [`HEATMAP_MAXIMA`] strongest) are detections
/// scored by their heat, in original coordinates, and the lesion set's FROC follows the
/// project's rules (`shared/docs/CONTRACTS.md` section 2). Also returns how many lesions
/// any of the maxima found, whatever their score, and the number of lesions.
pub fn heatmap_froc(
    weights: &Path,
    models: &Path,
    dataset: &crate::datasets::Dataset,
) -> Result<(crate::froc::FrocReport, usize, usize)> {
    use ma_core::detection::Detection;
    let (manifest, cfg, net) = load_network(weights, models)?;
    let side = cfg.input_side;
    let mut outcomes = Vec::with_capacity(dataset.images.len());
    for image in &dataset.images {
        let referral::PhotoView { pre, view, .. } =
            referral::photo_view(&image.path, &manifest.preprocess, side)?;
        let heat = referral::s1_heatmap(&net, &referral::input_tensor(&view))?;
        let mut maxima: Vec<Detection> = Vec::new();
        for v in 1..side - 1 {
            for u in 1..side - 1 {
                let h = heat[v * side + u];
                let neighbours = (v - 1..=v + 1).flat_map(|y| (u - 1..=u + 1).map(move |x| (x, y)));
                if h <= 0.0 || neighbours.into_iter().any(|(x, y)| heat[y * side + x] > h) {
                    continue;
                }
                // The pixel's centre on the canonical grid, which holds the FOV mask.
                let cx = view.origin.0 + (u as f64 + 0.5) * view.step - 0.5;
                let cy = view.origin.1 + (v as f64 + 0.5) * view.step - 0.5;
                if !pre.fov.get(cx.round() as i64, cy.round() as i64) {
                    continue;
                }
                let (ox, oy) = view.to_original(u as f64 + 0.5, v as f64 + 0.5);
                maxima.push(Detection {
                    x: ox,
                    y: oy,
                    score: h as f64,
                });
            }
        }
        maxima.sort_by(|a, b| b.score.total_cmp(&a.score));
        maxima.truncate(HEATMAP_MAXIMA);
        let truth = image.load_truth()?;
        outcomes.push(crate::froc::ImageOutcome::score(
            &image.name,
            &truth,
            &maxima,
        )?);
    }
    let found = outcomes
        .iter()
        .flat_map(|o| &o.lesion_best)
        .filter(|b| b.is_some())
        .count();
    let lesions = outcomes.iter().map(|o| o.lesion_best.len()).sum();
    Ok((
        crate::froc::FrocReport::from_outcomes(&outcomes)?,
        found,
        lesions,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zoom_cv_refuses_to_write_into_the_networks_cv_folder() {
        let dir = tempfile::tempdir().unwrap();
        let d = ReferralData {
            data: dir.path().join("no-graded-set"),
            models: dir.path().join("no-models"),
            side: 320,
            training: ReferralTraining::default(),
        };
        let cv = dir.path().join("cv");
        std::fs::create_dir_all(&cv).unwrap();
        let z = ZoomSettings::default();
        for out in [cv.clone(), cv.join(".")] {
            let e = format!(
                "{:#}",
                zoom_cv(&d, &cv, &out, 5, &z, &d.training, None).unwrap_err()
            );
            assert!(e.contains("the network's CV folder"), "{e}");
        }
        let bad = ZoomSettings {
            crops: 4,
            train_crops: 2,
            ..ZoomSettings::default()
        };
        let e = format!(
            "{:#}",
            zoom_cv(&d, &cv, &dir.path().join("out"), 5, &bad, &d.training, None).unwrap_err()
        );
        assert!(e.contains("--train-crops (2)"), "{e}");
    }
}
