//! Field validation end to end: the device loop keeps every frame, `records export
//! --bundle` writes a bundle, and the workstation re-runs it (`ma-trainer validate`:
//! libtorch reference cascade from the released weights) and reports the agreement.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::AtomicBool;

use ma_core::bundle::{self, BundleIndex};
use ma_core::signing::ModelTrust;
use ma_device::board::BoardConfig;
use ma_device::bundle::{ExportRequest, export};
use ma_device::run_loop::Station;
use ma_synthetic::generate;
use ma_trainer::validate::{FrameRow, Limits, Report, Shard, Truth, Validation, run_shard};

/// The repository (tests run from `tests/`).
fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// An untrained model set with a referral network and reference weights, signed.
fn untrained() -> &'static (PathBuf, PathBuf) {
    static SET: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    let (_, models, key) = SET.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        let key = ma_tests::export_untrained_models_with_referral(
            &models,
            11,
            "fv-test-1",
            [0.6, 0.5, 0.4],
            64,
        );
        (dir, models, key)
    });
    // Leaked on purpose: the set lives as long as the test process.
    Box::leak(Box::new((models.clone(), key.clone())))
}

/// A board config in `dir`: frames from `photos`, models `models` (key `key`), variant
/// `variant`, frames archive `dir/frames` with a budget of `budget_mb`.
fn board(dir: &Path, photos: &Path, models: &Path, key: &Path, variant: &str) -> BoardConfig {
    let toml = format!(
        "name = \"fv-board\"\n\
         [source]\nkind = \"folder\"\npath = \"{}\"\n\
         [display]\nkind = \"png\"\noutput_dir = \"{}\"\nwidth = 320\nheight = 240\n\
         [inference]\nthreads = 2\nmodels = \"{}\"\noperating_point = \"2fp\"\n\
         variant = \"{variant}\"\npublic_key = \"{}\"\n\
         [records]\nlog = \"{}\"\nframes = \"{}\"\nframes_budget_mb = 64\n",
        photos.display(),
        dir.join("screens").display(),
        models.display(),
        key.display(),
        dir.join("records.log").display(),
        dir.join("frames").display(),
    );
    let path = dir.join("board.toml");
    std::fs::write(&path, toml).unwrap();
    BoardConfig::load(&path).unwrap()
}

/// Runs the device loop of `config` to the end of its folder.
fn run_device(config: &BoardConfig) {
    let (mut station, _) = Station::from_board(config, false).unwrap();
    let summary = station.run(&AtomicBool::new(false));
    assert_eq!(summary.records_unsaved, 0, "{summary}");
    assert_eq!(summary.frames_not_kept, 0, "{summary}");
}

fn export_bundle(config: &BoardConfig, out: &Path) -> BundleIndex {
    export(&ExportRequest {
        board: config,
        out,
        since: None,
        until: None,
    })
    .unwrap()
    .index
}

/// Validates the whole bundle in one shard and builds the report.
fn validate(bundle: &Path, models: &Path, key: &Path, out: &Path) -> Report {
    let trust = ModelTrust::key_file(key).unwrap();
    let v = Validation::open(bundle, models, &trust).unwrap();
    let part = run_shard(&v, Shard::ALL, out).unwrap();
    Report::from_parts(bundle, &v.index, &[part], None, Limits::default())
        .unwrap()
        .0
}

/// Small synthetic photos (with MAs) as PNG files in `dir`.
fn synthetic_photos(dir: &Path, seeds: std::ops::Range<u64>) {
    std::fs::create_dir_all(dir).unwrap();
    for seed in seeds {
        generate(&ma_tests::small_fundus_params(), seed)
            .image
            .save(dir.join(format!("eye-{seed}.png")))
            .unwrap();
    }
}

/// The shipped models on the shared demo photos (IDRiD, CC BY 4.0): the device (tract)
/// and the workstation (libtorch, float, from the released weights) give the same refer
/// decisions. Float on the device: every MA matched, detection scores within 1e-5, the
/// referral score within 0.03 (where attention cells tie, the crop classifier may see
/// another 4th crop). int8 on the device (the default): MAs matched but near the
/// threshold, their scores within 0.005, the referral score within 0.12. These are the
/// tolerances the model card documents from 488 shared photos ("Field validation").
#[test]
fn the_workstation_agrees_with_the_device_on_the_shared_photos() {
    let photos = repo().join("demo/photos");
    let models = repo().join("models");
    let key = repo().join("keys/models.pub");
    for variant in ["float", "int8"] {
        let dir = tempfile::tempdir().unwrap();
        let config = board(dir.path(), &photos, &models, &key, variant);
        run_device(&config);
        let bundle = dir.path().join("bundle");
        let index = export_bundle(&config, &bundle);
        assert_eq!((index.records, index.frames.len()), (4, 4));
        let r = validate(&bundle, &models, &key, &dir.path().join("report"));
        let what = format!("{variant}: {r:?}");
        assert_eq!(r.frames_compared, 4, "{what}");
        assert_eq!(r.kappa, 1.0, "{what}");
        assert!(r.device_mas > 0, "the photos have MAs: {what}");
        if variant == "float" {
            assert_eq!(r.matched_mas, r.device_mas, "{what}");
            assert_eq!(r.matched_mas, r.workstation_mas, "{what}");
            assert_eq!(r.unmatched_detections, 0, "{what}");
            assert!(r.max_score_diff <= 1e-5, "{what}");
            assert!(r.refer_score.max_abs <= 0.03, "{what}");
        } else {
            // An MA of either side that the other did not count is still there, scored
            // within 0.005 (just under the threshold).
            let part = dir.path().join("report").join(Shard::ALL.part_name());
            every_ma_has_a_partner(&part, 0.005);
            assert!(r.ma_scores.max_abs <= 0.005, "{what}");
            assert!(r.refer_score.max_abs <= 0.12, "{what}");
        }
    }
}

/// Every MA (score at or above the 2 FP/image threshold of the shipped set) of either side
/// has a detection on the other within 2 px scoring within `tolerance` of it.
fn every_ma_has_a_partner(part: &Path, tolerance: f64) {
    let manifest = ma_core::manifest::Manifest::load(repo().join("models")).unwrap();
    let threshold = manifest
        .operating_points
        .threshold(ma_core::manifest::OperatingPoint::Fp2);
    let text = std::fs::read_to_string(part).unwrap();
    for line in text.lines().skip(1) {
        let row: FrameRow = serde_json::from_str(line).unwrap();
        for (mine, theirs) in [
            (&row.device_detections, &row.workstation_detections),
            (&row.workstation_detections, &row.device_detections),
        ] {
            for &[x, y, score] in mine.iter().filter(|d| d[2] >= threshold) {
                let partner = theirs.iter().any(|&[u, v, s]| {
                    (x - u).hypot(y - v) <= 2.0 && (score - s).abs() <= tolerance
                });
                assert!(
                    partner,
                    "{}: MA at ({x}, {y}) score {score} alone",
                    row.source
                );
            }
        }
    }
}

/// Untrained networks on synthetic photos: agreement, the report files, sharding,
/// resuming, --truth, and the errors for a tampered frame, a missing frame, a partial
/// bundle and a bundle of another model version.
#[test]
fn bundles_validate_in_shards_and_broken_bundles_are_refused() {
    let (models, key) = untrained();
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    synthetic_photos(&photos, 1..6);
    let config = board(dir.path(), &photos, models, key, "float");
    run_device(&config);
    let bundle = dir.path().join("bundle");
    let index = export_bundle(&config, &bundle);
    assert_eq!((index.records, index.frames.len()), (5, 5));
    // Exporting again changes nothing.
    let before = std::fs::read(bundle.join(bundle::INDEX)).unwrap();
    let again = export(&ExportRequest {
        board: &config,
        out: &bundle,
        since: None,
        until: None,
    })
    .unwrap();
    assert_eq!(again.copied, 0);
    assert_eq!(std::fs::read(bundle.join(bundle::INDEX)).unwrap(), before);

    // In one go and in three shards (one interrupted and resumed): the same report.
    let trust = ModelTrust::key_file(key).unwrap();
    let v = Validation::open(&bundle, models, &trust).unwrap();
    let whole = dir.path().join("whole");
    let part = run_shard(&v, Shard::ALL, &whole).unwrap();
    let (one, pairs) =
        Report::from_parts(&bundle, &v.index, &[part], None, Limits::default()).unwrap();
    assert_eq!(one.frames_compared, 5);
    assert_eq!(one.kappa, 1.0);
    assert_eq!(one.ma_match_rate, 1.0);
    assert!(one.max_score_diff < 1e-3, "{}", one.max_score_diff);
    let (json, html) = ma_trainer::validate::write_report(&whole, &one, &pairs).unwrap();
    let csv = whole.join("frames.csv");
    ma_trainer::validate::write_frames_csv(&[whole.join(Shard::ALL.part_name())], None, &csv)
        .unwrap();
    let csv = std::fs::read_to_string(csv).unwrap();
    assert_eq!(csv.lines().count(), 6, "{csv}");
    assert!(
        csv.lines().nth(1).unwrap().starts_with("0,eye-1.png,"),
        "{csv}"
    );
    let text = std::fs::read_to_string(&html).unwrap();
    assert!(text.contains("data:image/png;base64,") && text.contains("kappa"));
    // JSON keeps every field (floats to the last unit or so of serde_json's parser).
    let back: Report = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(
        (back.frames_compared, back.refer_confusion, back.matched_mas),
        (one.frames_compared, one.refer_confusion, one.matched_mas)
    );
    assert!((back.refer_score.upper - one.refer_score.upper).abs() <= 1e-20);

    let sharded = dir.path().join("sharded");
    let mut parts = Vec::new();
    for k in 1..=3 {
        parts.push(run_shard(&v, Shard { k, n: 3 }, &sharded).unwrap());
    }
    // Shard 1 cut mid-line, as a killed run leaves it: a rerun completes it.
    let text = std::fs::read_to_string(&parts[0]).unwrap();
    std::fs::write(&parts[0], &text[..text.len() - 10]).unwrap();
    run_shard(&v, Shard { k: 1, n: 3 }, &sharded).unwrap();
    let rows = |text: &str| -> Vec<FrameRow> {
        text.lines()
            .skip(1)
            .map(|l| FrameRow {
                elapsed_ms: 0.0,
                ..serde_json::from_str(l).unwrap()
            })
            .collect()
    };
    let resumed = std::fs::read_to_string(&parts[0]).unwrap();
    assert!(rows(&resumed) == rows(&text), "the resumed part differs");
    assert_eq!(resumed.lines().next(), text.lines().next());
    let (three, ..) =
        Report::from_parts(&bundle, &v.index, &parts, None, Limits::default()).unwrap();
    assert_same_report(&three, &one);
    let err = Report::from_parts(&bundle, &v.index, &parts[..2], None, Limits::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("[3]"), "{err}");

    // Limits: a kappa of 1 passes any --min-kappa; a tiny --max-score-diff does not
    // unless the scores are identical.
    let (strict, ..) = Report::from_parts(
        &bundle,
        &v.index,
        &parts,
        None,
        Limits {
            min_kappa: Some(0.99),
            max_score_diff: Some(0.0),
        },
    )
    .unwrap();
    assert!(
        strict
            .limit_failures
            .iter()
            .all(|f| f.contains("score difference"))
    );

    // --truth as a CSV of marks: the true MAs of the synthetic photos.
    let csv = dir.path().join("truth.csv");
    let mut marks = String::from("image,x,y\n");
    for seed in 1..6 {
        for ma in generate(&ma_tests::small_fundus_params(), seed).microaneurysms {
            marks.push_str(&format!("eye-{seed}.png,{},{}\n", ma.x, ma.y));
        }
    }
    std::fs::write(&csv, marks).unwrap();
    let truth = Truth::csv(&csv).unwrap();
    let (with_truth, ..) =
        Report::from_parts(&bundle, &v.index, &parts, Some(&truth), Limits::default()).unwrap();
    let t = with_truth.truth.unwrap();
    assert_eq!((t.frames, t.lesions), (5, 15));
    assert!((t.device.cpm - t.workstation.cpm).abs() < 1e-9);

    // Broken bundles, each with a clear error.
    let broken = |name: &str, damage: &dyn Fn(&Path)| -> String {
        let copy = dir.path().join(name);
        copy_dir(&bundle, &copy);
        damage(&copy);
        match Validation::open(&copy, models, &trust) {
            Ok(_) => panic!("{name}: accepted"),
            Err(e) => format!("{e:#}"),
        }
    };
    let frame = &index.frames[0].file;
    let err = broken("tampered", &|b| {
        let path = BundleIndex::frame_path(b, frame);
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 1;
        std::fs::write(path, bytes).unwrap();
    });
    assert!(
        err.contains(frame.as_str()) && err.contains("SHA-256"),
        "{err}"
    );
    let err = broken("missing", &|b| {
        std::fs::remove_file(BundleIndex::frame_path(b, frame)).unwrap()
    });
    assert!(
        err.contains(frame.as_str()) && err.contains("missing"),
        "{err}"
    );
    let err = broken("partial", &|b| {
        std::fs::remove_file(b.join(bundle::INDEX)).unwrap()
    });
    assert!(err.contains("partial bundle"), "{err}");
    // A bundle from another model version (the device ran another set).
    let other = dir.path().join("other-models");
    let other_key = ma_tests::export_untrained_models_with_referral(
        &other,
        12,
        "fv-test-2",
        [0.6, 0.5, 0.4],
        64,
    );
    let err = match Validation::open(&bundle, &other, &ModelTrust::Unsigned) {
        Ok(_) => panic!("another model version accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("fv-test-1") && err.contains("fv-test-2") && err.contains("network file"),
        "{err}"
    );
    // The bundle's manifest must be signed by the key given.
    let err = match Validation::open(&bundle, models, &ModelTrust::key_file(&other_key).unwrap()) {
        Ok(_) => panic!("a bundle signed by another key accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("not trusted"), "{err}");
}

/// Reports of the same frames read in another order: counts equal, sums of floats to
/// rounding.
fn assert_same_report(a: &Report, b: &Report) {
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-12 * x.abs().max(1e-9);
    let counts = |r: &Report| {
        (
            r.frames_compared,
            r.refer_confusion,
            (r.device_mas, r.workstation_mas, r.matched_mas),
            (r.matched_detections, r.unmatched_detections),
            r.disagreeing_frames.len(),
            r.refer_score.pairs,
            r.ma_scores.pairs,
        )
    };
    assert_eq!(counts(a), counts(b));
    for (x, y) in [
        (a.kappa, b.kappa),
        (a.max_score_diff, b.max_score_diff),
        (a.mean_score_diff, b.mean_score_diff),
        (a.refer_score.bias, b.refer_score.bias),
        (a.refer_score.upper, b.refer_score.upper),
        (a.ma_scores.bias, b.ma_scores.bias),
        (a.ma_scores.sd, b.ma_scores.sd),
    ] {
        assert!(close(x, y), "{x} vs {y}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A full disk while archiving (RLIMIT_FSIZE below one frame, a file size limit as a full
/// disk is, for the writer) loses no record: each is saved without a frame file, no
/// partial frame is left, the run says so and the bundle lists the frames as not kept.
#[test]
fn binary_disk_full_while_archiving_loses_no_record() {
    use std::process::{Command, Stdio};

    let (models, key) = untrained();
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    synthetic_photos(&photos, 1..4);
    let smallest = std::fs::read_dir(&photos)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .min()
        .unwrap();
    // Room for the records (a few KiB each), not for one frame.
    let limit = 48u64 << 10;
    assert!(smallest > limit, "the photos must be larger than the limit");
    let config = board(dir.path(), &photos, models, key, "float");
    let mut command = Command::new(ma_tests::ma_device_binary());
    command
        .args(["run", "--board"])
        .arg(dir.path().join("board.toml"))
        .stdin(Stdio::null());
    ma_tests::limit_file_size(&mut command, limit);
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stderr.matches("frame NOT KEPT").count(), 3, "{stderr}");
    assert!(stdout.contains("3 NOT KEPT"), "{stdout}");
    let (records, report) = ma_device::records::read_all(&config.records.log).unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(records.len(), 3);
    assert!(
        records
            .iter()
            .all(|r| r.error.is_none() && r.frame_file.is_none())
    );
    let left: Vec<_> = std::fs::read_dir(dir.path().join("frames"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "no partial frame may stay: {left:?}");
    let index = export_bundle(&config, &dir.path().join("bundle"));
    assert_eq!(index.missing_frames.len(), 3);
    assert!(index.missing_frames.iter().all(|m| m.reason == "not kept"));
}
