//! `ma-trainer eval` end to end on the real DiaretDB1 training split in `shared/datasets`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use ma_core::detection::{DetectLine, Detection, ImageDetections};
use ma_trainer::datasets::{Dataset, DatasetKind, LoadOptions, Split};

fn diaretdb1_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/datasets/diaretdb1");
    assert!(
        root.is_dir(),
        "the DiaretDB1 dataset is missing at {} (see shared/datasets/README.md); these tests need it",
        root.display()
    );
    root
}

/// One line per training image with one detection on a pixel of each lesion: the lesion
/// pixel nearest its centroid (the centroid itself may lie outside a concave lesion).
fn perfect_lines() -> &'static [ImageDetections] {
    static LINES: OnceLock<Vec<ImageDetections>> = OnceLock::new();
    LINES.get_or_init(|| {
        let opts = LoadOptions {
            split: Some(Split::Train),
            ..LoadOptions::default()
        };
        let dataset = Dataset::load(DatasetKind::Diaretdb1, &diaretdb1_root(), &opts).unwrap();
        assert_eq!(dataset.images.len(), 28);
        let mut lesions = 0;
        let lines: Vec<ImageDetections> = dataset
            .images
            .iter()
            .map(|im| {
                let truth = im.load_truth().unwrap();
                lesions += truth.lesions.len();
                let detections = truth
                    .lesions
                    .iter()
                    .map(|l| {
                        let (cx, cy) = l.centroid();
                        let d2 = |&&(x, y): &&(u32, u32)| {
                            (x as f64 - cx).powi(2) + (y as f64 - cy).powi(2)
                        };
                        let &(x, y) = l
                            .pixels
                            .iter()
                            .min_by(|a, b| d2(a).total_cmp(&d2(b)))
                            .unwrap();
                        Detection {
                            x: x as f64,
                            y: y as f64,
                            score: 0.9,
                        }
                    })
                    .collect();
                ImageDetections {
                    // As `detect --input <dataset root>` would write it.
                    image: im.rel_path.clone(),
                    width: truth.width,
                    height: truth.height,
                    detections,
                    elapsed_ms: 1.0,
                    referral: None,
                }
            })
            .collect();
        assert!(lesions > 0, "the training split has no lesions?");
        lines
    })
}

fn write_jsonl(path: &Path, lines: impl IntoIterator<Item = ImageDetections>) {
    let text: String = lines
        .into_iter()
        .map(|d| DetectLine::Ok(d).to_json_line() + "\n")
        .collect();
    std::fs::write(path, text).unwrap();
}

fn eval(detections: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ma-trainer"))
        .args([
            "eval",
            "--dataset",
            "diaretdb1",
            "--split",
            "train",
            "--root",
        ])
        .arg(diaretdb1_root())
        .arg("--detections")
        .arg(detections)
        .args(extra)
        .output()
        .unwrap()
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn detections_on_every_lesion_score_cpm_one_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("perfect.jsonl");
    let mut lines = perfect_lines().to_vec();
    // A line for an image outside the split: ignored, counted.
    lines.push(ImageDetections {
        image: "elsewhere/image999.png".into(),
        width: 10,
        height: 10,
        detections: vec![],
        elapsed_ms: 1.0,
        referral: None,
    });
    write_jsonl(&file, lines);
    let plot = dir.path().join("froc.png");
    let out = eval(&file, &["--plot", plot.to_str().unwrap(), "--per-image"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("CPM: 1.000"), "{stdout}");
    assert!(stdout.contains("images: 28"), "{stdout}");
    assert!(
        stdout.contains("1 for images outside the dataset/split, ignored"),
        "{stdout}"
    );
    assert!(
        stdout.contains("image001.png"),
        "per-image table missing:\n{stdout}"
    );
    assert!(stdout.contains(&plot.display().to_string()), "{stdout}");

    let bytes = std::fs::read(&plot).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
    let img = image::load_from_memory(&bytes).unwrap();
    assert_eq!(
        (img.width(), img.height()),
        ma_trainer::plot::PLOT_SIZE,
        "unexpected plot size"
    );
}

#[test]
fn no_detections_score_cpm_zero() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("empty.jsonl");
    write_jsonl(
        &file,
        perfect_lines().iter().cloned().map(|mut d| {
            d.detections.clear();
            d
        }),
    );
    let out = eval(&file, &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("CPM: 0.000"), "{stdout}");
}

#[test]
fn a_missing_image_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("missing.jsonl");
    let lines = perfect_lines();
    let dropped = Path::new(&lines[3].image)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    write_jsonl(
        &file,
        lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 3)
            .map(|(_, d)| d.clone()),
    );
    let out = eval(&file, &[]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "expected failure, got:\n{stdout}");
    assert!(stderr.contains(&dropped), "{stderr}");
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
}

#[test]
fn a_missing_detections_file_fails_naming_it() {
    let out = eval(Path::new("/nonexistent/dets.jsonl"), &[]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("/nonexistent/dets.jsonl"), "{stderr}");
}
