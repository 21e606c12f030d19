//! `ma-trainer eval`: score a `detect` output file against a dataset's ground truth
//! (FROC / CPM, `shared/docs/CONTRACTS.md` section 2) and report it.
//!
//! Detection lines are matched to dataset images by file name: a line's `image` is relative to
//! the detect run's `--input`, so only its last path component is compared. Every dataset image
//! (of the chosen split) needs exactly one successful line; lines for other images are ignored
//! and counted, since running detect on a whole folder and scoring one split is normal.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use ma_core::detection::{DetectLine, ImageDetections, read_jsonl};

use crate::datasets::{Dataset, DatasetKind, LoadOptions, Split};
use crate::froc::{FP_RATES, FrocReport, ImageOutcome};
use crate::plot::write_froc_png;

/// At most this many missing images are named in the error.
const MISSING_LISTED: usize = 5;

/// What `ma-trainer eval` was asked to do.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub kind: DatasetKind,
    pub root: PathBuf,
    pub split: Option<Split>,
    pub detections: PathBuf,
    /// DiaretDB1 fused-confidence threshold for lesion pixels.
    pub confidence_threshold: f64,
    /// Show a progress bar on stderr while loading ground truth.
    pub progress: bool,
}

/// A finished evaluation.
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// E.g. "DiaretDB1 train".
    pub dataset_label: String,
    pub report: FrocReport,
    /// Per image, in dataset order.
    pub outcomes: Vec<ImageOutcome>,
    /// Lines for images that are not in the dataset (or split): ignored.
    pub ignored_lines: usize,
    pub detection_lines: usize,
    /// Each image's `refer_score`, in dataset order, when every line carries one (a
    /// model set with a referral network).
    pub refer_scores: Option<Vec<f64>>,
    /// Lesions whose centroid lies in one of their photo's `attention_boxes`, and all
    /// lesions (with referral fields on every line): how much of the lesion load the
    /// zoom-in regions cover.
    pub lesions_in_attention_boxes: Option<(usize, usize)>,
}

impl Evaluation {
    /// Image-level AUCs of "has a lesion" for the referral score alone and for the rank
    /// average of the referral score and the best detection score; `None` without
    /// referral scores or when one class is missing.
    pub fn referral_aucs(&self) -> Option<(f64, f64)> {
        let refer = self.refer_scores.as_ref()?;
        let labels: Vec<bool> = self.outcomes.iter().map(|o| o.lesions() > 0).collect();
        if labels.iter().all(|&l| l) || labels.iter().all(|&l| !l) {
            return None;
        }
        let best: Vec<f64> = self
            .outcomes
            .iter()
            .map(|o| o.best_score().unwrap_or(0.0))
            .collect();
        let auc = |s: &[f64]| crate::train::auc_f64(s, &labels);
        Some((
            auc(refer),
            auc(&crate::referral_cv::rank_average(refer, &best)),
        ))
    }
}

/// Detection lines matched to dataset images.
#[derive(Clone, Debug, PartialEq)]
pub struct MatchedLines {
    /// One per dataset image, in the order of the names given.
    pub images: Vec<ImageDetections>,
    /// Names (as written in the file) of lines for images not in the dataset.
    pub unmatched: Vec<String>,
}

/// Whether two relative paths name the same file: one is a component-wise suffix of the
/// other (either separator).
fn same_file(a: &str, b: &str) -> bool {
    let parts = |p: &str| -> Vec<String> {
        p.split(['/', '\\'])
            .filter(|c| !c.is_empty() && *c != ".")
            .map(str::to_string)
            .collect()
    };
    let (a, b) = (parts(a), parts(b));
    let n = a.len().min(b.len());
    n > 0 && a[a.len() - n..] == b[b.len() - n..]
}

/// Last path component of a line's `image`, whichever separator the detect run used.
pub fn base_name(image: &str) -> &str {
    image.rsplit(['/', '\\']).next().unwrap_or(image)
}

/// Match `lines` to the dataset images `names` (paths relative to the dataset root, or
/// bare file names). A line belongs to an image when one path is a component-wise suffix
/// of the other: `image001.png` and `resources/images/ddb1_fundusimages/image001.png` match,
/// but `ddb1_groundtruth/hardexudates/image001.png` (a ground-truth map that `detect` also
/// found when run on the dataset root) does not. Errors: an image with no line (up to
/// [`MISSING_LISTED`] named), an image with two lines, an error line for an image.
pub fn match_lines(names: &[&str], lines: Vec<DetectLine>) -> Result<MatchedLines> {
    let index: HashMap<&str, Vec<usize>> =
        names
            .iter()
            .enumerate()
            .fold(HashMap::new(), |mut m, (i, n)| {
                m.entry(base_name(n)).or_default().push(i);
                m
            });
    let mut slots: Vec<Option<ImageDetections>> = vec![None; names.len()];
    let mut unmatched = Vec::new();
    for line in lines {
        let found = index.get(base_name(line.image())).and_then(|candidates| {
            candidates
                .iter()
                .copied()
                .find(|&i| same_file(names[i], line.image()))
        });
        let Some(i) = found else {
            unmatched.push(line.image().to_string());
            continue;
        };
        match line {
            DetectLine::Failed(f) => {
                bail!("detect failed on dataset image {}: {}", f.image, f.error)
            }
            DetectLine::Ok(d) => {
                if let Some(first) = &slots[i] {
                    bail!(
                        "two lines for dataset image {}: {:?} and {:?}",
                        names[i],
                        first.image,
                        d.image
                    );
                }
                slots[i] = Some(d);
            }
        }
    }
    let missing: Vec<&str> = names
        .iter()
        .zip(&slots)
        .filter(|(_, s)| s.is_none())
        .map(|(n, _)| *n)
        .collect();
    if !missing.is_empty() {
        let mut listed = missing[..missing.len().min(MISSING_LISTED)].join(", ");
        if missing.len() > MISSING_LISTED {
            write!(listed, " and {} more", missing.len() - MISSING_LISTED).unwrap();
        }
        bail!(
            "{} of {} dataset images have no line in the detections file: {listed}",
            missing.len(),
            names.len()
        );
    }
    Ok(MatchedLines {
        images: slots
            .into_iter()
            .map(|s| s.expect("checked above"))
            .collect(),
        unmatched,
    })
}

/// Load the dataset and the detections, score every image and sweep the FROC curve.
pub fn evaluate(opts: &EvalOptions) -> Result<Evaluation> {
    if opts.kind == DatasetKind::Folder {
        bail!(
            "a plain image folder has no ground truth: eval needs diaretdb1, roc, eophtha or idrid"
        );
    }
    let load = LoadOptions {
        split: opts.split,
        confidence_threshold: opts.confidence_threshold,
    };
    let dataset = Dataset::load(opts.kind, &opts.root, &load).with_context(|| {
        format!(
            "cannot load the {} dataset at {}",
            opts.kind,
            opts.root.display()
        )
    })?;
    let lines = read_jsonl(&opts.detections)?;
    let detection_lines = lines.len();
    // Paths relative to the root, so that lines for other files with the same name (the
    // ground-truth maps, when `detect` ran on the whole dataset folder) are told apart.
    let relative: Vec<String> = dataset
        .images
        .iter()
        .map(|im| {
            im.path
                .strip_prefix(&opts.root)
                .map_or_else(|_| im.name.clone(), |p| p.to_string_lossy().into_owned())
        })
        .collect();
    let names: Vec<&str> = relative.iter().map(String::as_str).collect();
    let matched = match_lines(&names, lines)
        .with_context(|| format!("detections file {}", opts.detections.display()))?;

    let bar = if opts.progress {
        ProgressBar::new(dataset.images.len() as u64).with_style(
            ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed}]")
                .expect("static template"),
        )
    } else {
        ProgressBar::hidden()
    };
    bar.set_message("loading ground truth");
    let mut outcomes = Vec::with_capacity(dataset.images.len());
    let mut in_boxes = (0usize, 0usize);
    for (image, dets) in dataset.images.iter().zip(&matched.images) {
        // One image's truth at a time: DiaretDB1 uncertain masks are megabytes each.
        let truth = image.load_truth()?;
        if let Some(r) = &dets.referral {
            for lesion in &truth.lesions {
                let (x, y) = lesion.centroid();
                in_boxes.0 += usize::from(r.attention_boxes.iter().any(|b| b.contains(x, y)));
                in_boxes.1 += 1;
            }
        }
        if (dets.width, dets.height) != (truth.width, truth.height) {
            bail!(
                "{}: the detections file {} gives size {}x{} but the image is {}x{}",
                image.name,
                opts.detections.display(),
                dets.width,
                dets.height,
                truth.width,
                truth.height
            );
        }
        outcomes.push(
            ImageOutcome::score(&image.name, &truth, &dets.detections)
                .with_context(|| format!("detections file {}", opts.detections.display()))?,
        );
        bar.inc(1);
    }
    bar.finish_and_clear();

    let dataset_label = match opts.split {
        Some(split) => format!("{} {split}", opts.kind),
        None => opts.kind.to_string(),
    };
    let report = FrocReport::from_outcomes(&outcomes)
        .with_context(|| format!("cannot score {dataset_label} at {}", opts.root.display()))?;
    let refer_scores: Option<Vec<f64>> = matched
        .images
        .iter()
        .map(|d| d.referral.as_ref().map(|r| r.refer_score))
        .collect();
    Ok(Evaluation {
        lesions_in_attention_boxes: refer_scores.is_some().then_some(in_boxes),
        refer_scores,
        dataset_label,
        report,
        outcomes,
        ignored_lines: matched.unmatched.len(),
        detection_lines,
    })
}

fn rate_label(f: f64) -> String {
    if f >= 1.0 {
        format!("{f}")
    } else {
        format!("1/{}", (1.0 / f).round())
    }
}

fn threshold_text(t: Option<f64>) -> String {
    t.map_or_else(|| "none".to_string(), |t| format!("{t:.4}"))
}

/// The text report `ma-trainer eval` prints.
pub fn format_report(eval: &Evaluation, detections: &Path, per_image: bool) -> String {
    let r = &eval.report;
    let mut s = String::new();
    let w = &mut s;
    writeln!(w, "dataset: {}", eval.dataset_label).unwrap();
    write!(
        w,
        "detections: {} ({} lines",
        detections.display(),
        eval.detection_lines
    )
    .unwrap();
    if eval.ignored_lines > 0 {
        write!(
            w,
            "; {} for images outside the dataset/split, ignored",
            eval.ignored_lines
        )
        .unwrap();
    }
    writeln!(w, ")").unwrap();
    writeln!(
        w,
        "images: {} ({} with lesions, {} without)",
        r.images,
        r.images_with_lesions,
        r.images - r.images_with_lesions
    )
    .unwrap();
    writeln!(w, "lesions: {}", r.lesions).unwrap();
    writeln!(w).unwrap();
    writeln!(w, "FP/image  sensitivity  threshold").unwrap();
    for (f, p) in FP_RATES.iter().zip(&r.sensitivities) {
        writeln!(
            w,
            "{:>8}  {:>11.3}  {:>9}",
            rate_label(*f),
            p.sensitivity,
            threshold_text(p.threshold)
        )
        .unwrap();
    }
    writeln!(w).unwrap();
    writeln!(w, "CPM: {:.3}", r.cpm).unwrap();
    match (r.image_auc, r.auc_undefined_reason()) {
        (Some(auc), _) => writeln!(w, "image-level AUC: {auc:.3}").unwrap(),
        (None, reason) => writeln!(
            w,
            "image-level AUC: undefined: {}",
            reason.unwrap_or_default()
        )
        .unwrap(),
    }
    if let Some((inside, all)) = eval.lesions_in_attention_boxes.filter(|&(_, all)| all > 0) {
        writeln!(
            w,
            "lesions inside their photo's attention boxes: {inside} of {all} ({:.1}%)",
            100.0 * inside as f64 / all as f64
        )
        .unwrap();
    }
    if let Some((refer, combined)) = eval.referral_aucs() {
        writeln!(
            w,
            "image-level AUC of refer_score: {refer:.3}; of the rank average of refer_score \
             and the best detection score: {combined:.3}"
        )
        .unwrap();
    }
    writeln!(
        w,
        "operating thresholds (lowest score threshold with FP/image <= F):"
    )
    .unwrap();
    for p in &r.operating {
        match p.threshold {
            Some(t) => writeln!(
                w,
                "  {} FP/image: score >= {t:.4} (sensitivity {:.3} at {:.3} FP/image)",
                p.fp_rate, p.sensitivity, p.fp_per_image
            )
            .unwrap(),
            None => writeln!(
                w,
                "  {} FP/image: none (even the best-scored detection exceeds it)",
                p.fp_rate
            )
            .unwrap(),
        }
    }
    if per_image {
        let op = r.operating.iter().find(|p| p.fp_rate == 1.0);
        let op_t = op.and_then(|p| p.threshold);
        writeln!(w).unwrap();
        writeln!(
            w,
            "per image (all detections; '@1' = at the 1 FP/image threshold {}):",
            threshold_text(op_t)
        )
        .unwrap();
        let name_w = eval
            .outcomes
            .iter()
            .map(|o| o.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        writeln!(
            w,
            "{:<name_w$}  {:>7}  {:>5}  {:>5}  {:>7}  {:>7}  {:>10}  {:>8}  {:>8}  {:>5}",
            "image",
            "lesions",
            "found",
            "FPs",
            "outside",
            "ignored",
            "detections",
            "best",
            "found@1",
            "FPs@1"
        )
        .unwrap();
        for o in &eval.outcomes {
            let s = o.summary();
            let (found1, fp1) = match op_t {
                Some(t) => (o.found_at(t), o.false_positives_at(t)),
                None => (0, 0),
            };
            writeln!(
                w,
                "{:<name_w$}  {:>7}  {:>5}  {:>5}  {:>7}  {:>7}  {:>10}  {:>8}  {:>8}  {:>5}",
                s.name,
                s.lesions,
                s.found,
                s.false_positives,
                s.outside,
                s.ignored,
                s.detections,
                s.best_score
                    .map_or_else(|| "-".into(), |b| format!("{b:.4}")),
                found1,
                fp1
            )
            .unwrap();
        }
    }
    s
}

/// Evaluate, print the report to stdout and write the plot if asked.
pub fn run(opts: &EvalOptions, plot: Option<&Path>, per_image: bool) -> Result<()> {
    let eval = evaluate(opts)?;
    print!("{}", format_report(&eval, &opts.detections, per_image));
    if let Some(path) = plot {
        write_froc_png(path, &eval.report, &eval.dataset_label)?;
        println!("FROC plot: {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ma_core::detection::{Detection, ImageFailure};

    fn ok(image: &str) -> DetectLine {
        DetectLine::Ok(ImageDetections {
            image: image.into(),
            width: 10,
            height: 10,
            detections: vec![Detection {
                x: 1.0,
                y: 1.0,
                score: 0.5,
            }],
            elapsed_ms: 1.0,
            referral: None,
        })
    }

    #[test]
    fn base_names() {
        assert_eq!(base_name("a/b/image001.png"), "image001.png");
        assert_eq!(base_name(r"a\b\image001.png"), "image001.png");
        assert_eq!(base_name("image001.png"), "image001.png");
    }

    #[test]
    fn matches_by_base_name_and_counts_other_lines() {
        let lines = vec![ok("x/b.png"), ok("other.png"), ok("y/z/a.png")];
        let m = match_lines(&["a.png", "b.png"], lines).unwrap();
        assert_eq!(m.images[0].image, "y/z/a.png");
        assert_eq!(m.images[1].image, "x/b.png");
        assert_eq!(m.unmatched, ["other.png"]);
    }

    #[test]
    fn missing_images_are_named() {
        let names: Vec<String> = (0..8).map(|i| format!("im{i}.png")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let err = match_lines(&refs, vec![ok("im0.png")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("7 of 8"), "{err}");
        assert!(
            err.contains("im1.png, im2.png, im3.png, im4.png, im5.png and 2 more"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_and_failed_lines_are_errors() {
        let err = match_lines(&["a.png"], vec![ok("a.png"), ok("d/a.png")]).unwrap_err();
        assert!(
            err.to_string()
                .contains("two lines for dataset image a.png"),
            "{err}"
        );
        let failed = DetectLine::Failed(ImageFailure {
            image: "d/a.png".into(),
            error: "truncated file".into(),
        });
        let err = match_lines(&["a.png"], vec![failed])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("d/a.png") && err.contains("truncated file"),
            "{err}"
        );
        // A failed line for an image outside the dataset is just ignored.
        let failed_other = DetectLine::Failed(ImageFailure {
            image: "zzz.png".into(),
            error: "x".into(),
        });
        let m = match_lines(&["a.png"], vec![failed_other, ok("a.png")]).unwrap();
        assert_eq!(m.unmatched.len(), 1);
    }

    #[test]
    fn lines_for_other_files_with_the_same_name_are_not_the_image() {
        // `detect` on a DiaretDB1 root also meets the ground-truth maps, which fail.
        let gt = DetectLine::Failed(ImageFailure {
            image: "resources/images/ddb1_groundtruth/hardexudates/image001.png".into(),
            error: "no field of view found".into(),
        });
        let name = "resources/images/ddb1_fundusimages/image001.png";
        let m = match_lines(&[name], vec![gt.clone(), ok(name)]).unwrap();
        assert_eq!(m.images[0].image, name);
        assert_eq!(m.unmatched.len(), 1);
        // Run on the image folder itself, detect writes bare names: still matched.
        let m = match_lines(&[name], vec![ok("image001.png")]).unwrap();
        assert_eq!(m.images.len(), 1);
        assert!(same_file("a\\b.png", "x/a/b.png") && !same_file("c/b.png", "a/b.png"));
    }

    #[test]
    fn rate_labels() {
        assert_eq!(rate_label(0.125), "1/8");
        assert_eq!(rate_label(1.0), "1");
        assert_eq!(rate_label(8.0), "8");
    }
}
