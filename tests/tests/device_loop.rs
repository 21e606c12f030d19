//! The device loop (`ma-device run`, `ma_device::run_loop`) with a real model set through
//! tract: board configs for the folder and synthetic sources, a recorded camera that fails
//! and comes back, stopping on SIGTERM (in-process and on the real binary), and the
//! `records list` / `records export` commands on the log a run wrote.
//!
//! The models are untrained nets exported in a temporary folder (no trained models are
//! shipped yet): what is tested is the loop (records, screens, counts, errors, stopping),
//! not accuracy. Every test makes what it needs; none is skipped.
//!
//! The binary is built (or found fresh) by running `cargo build -p ma-device` from the
//! test, as in `bad_inputs.rs`: integration tests of another package do not get
//! `CARGO_BIN_EXE_*`. Set `MA_DEVICE_BIN` to test a given binary instead.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use image::RgbImage;
use ma_core::manifest::Manifest;
use ma_core::signing::ModelTrust;
use ma_device::board::{BoardConfig, OperatingPoint};
use ma_device::capture::camera::{CameraConfig, CameraSource};
use ma_device::capture::trigger::TriggerInput;
use ma_device::capture::{
    FakeClock, PixelFormat, RawFrame, RecordedCapture, SyntheticSource, Trigger,
};
use ma_device::cascade::{Cascade, ImageResult};
use ma_device::display::PngSink;
use ma_device::records::{self, ImageHash, Record, RecordLog};
use ma_device::run_loop::{Detector, DisplayTarget, Station, pixel_hash, stop_on_signals};
use ma_synthetic::{SyntheticParams, generate};

/// Operating-point thresholds of the test model set: 1, 2 and 4 FP/image.
const THRESHOLDS: [f64; 3] = [0.6, 0.5, 0.4];
/// A run that takes longer than this is killed and fails the test.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

// ---- fixtures --------------------------------------------------------------------------

/// One untrained, signed model set for every test here, exported once per test process
/// into cargo's scratch folder for integration tests (replaced on every run, never
/// leaked): the folder and the public key it is signed with.
fn fixture() -> &'static (PathBuf, PathBuf) {
    static MODELS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    MODELS.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("device-loop-models");
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        let key = ma_tests::export_untrained_models(&dir, 11, "loop-test", THRESHOLDS);
        (dir, key)
    })
}

fn models() -> &'static Path {
    &fixture().0
}

/// The public key the test models are signed with.
fn models_key() -> &'static Path {
    &fixture().1
}

fn trust() -> ModelTrust {
    ModelTrust::key_file(models_key()).unwrap()
}

fn small_params() -> SyntheticParams {
    ma_tests::small_fundus_params()
}

/// A board config in `dir` (display in `dir/screens`, log in `dir/log/records.log`),
/// trusting the test models' key.
fn board_toml(dir: &Path, source: &str, operating_point: &str, models: &Path) -> String {
    format!(
        "name = \"test-board\"\ndescription = \"device-loop test\"\n\
         [source]\n{source}\n\
         [display]\nkind = \"png\"\noutput_dir = \"{}\"\nwidth = 400\nheight = 272\n\
         [inference]\nthreads = 1\nmodels = \"{}\"\noperating_point = \"{operating_point}\"\n\
         public_key = \"{}\"\n\
         [records]\nlog = \"{}\"\n",
        dir.join("screens").display(),
        models.display(),
        models_key().display(),
        dir.join("log/records.log").display()
    )
}

fn write_board(dir: &Path, toml: &str) -> PathBuf {
    let path = dir.join("board.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// The PNG screens in `dir`, sorted.
fn screens(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    files.sort();
    files
}

fn read_log(path: &Path) -> Vec<Record> {
    let (records, report) = records::read_all(path).unwrap();
    assert!(report.is_clean(), "{report}");
    records
}

/// Checks a processed frame's record against the threshold it was counted at.
fn check_result_record(r: &Record, threshold: f64) {
    assert_eq!(r.error, None, "{r:?}");
    let count = r.detections.iter().filter(|d| d.score >= threshold).count();
    assert_eq!(r.ma_count as usize, count, "{r:?}");
    assert_eq!(r.refer, count > 0);
    assert!(r.detections.iter().all(|d| (0.01..=1.0).contains(&d.score)));
    assert!(
        r.detections.windows(2).all(|w| w[0].score >= w[1].score),
        "best first"
    );
    assert_eq!(r.model_version, "loop-test float");
    assert_eq!(r.board, "test-board");
    assert!(r.elapsed_ms > 0.0);
}

/// `a` is `b` read back from JSON: equal, floats to within JSON's shortest-decimal
/// round trip (serde_json's default parser may be one unit in the last place off).
fn assert_same(a: &Record, b: &Record) {
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-12 * x.abs().max(1.0);
    let strip = |r: &Record| Record {
        detections: Vec::new(),
        refer_score: None,
        attention_boxes: Vec::new(),
        ..r.clone()
    };
    assert_eq!(strip(a), strip(b));
    assert_eq!(a.refer_score.is_some(), b.refer_score.is_some());
    if let (Some(p), Some(q)) = (a.refer_score, b.refer_score) {
        assert!(close(p, q), "{p} vs {q}");
    }
    assert_eq!(a.attention_boxes.len(), b.attention_boxes.len());
    for (p, q) in a.attention_boxes.iter().zip(&b.attention_boxes) {
        assert!(
            close(p.x0, q.x0) && close(p.y1, q.y1) && close(p.weight, q.weight),
            "{p:?} vs {q:?}"
        );
    }
    assert_eq!(a.detections.len(), b.detections.len());
    for (p, q) in a.detections.iter().zip(&b.detections) {
        assert!(
            close(p.x, q.x) && close(p.y, q.y) && close(p.score, q.score),
            "{p:?} vs {q:?}"
        );
    }
}

/// Wraps a detector and sets `stop` once `after` frames were processed.
struct StopAfter<D> {
    inner: D,
    after: u64,
    done: AtomicU64,
    stop: Arc<AtomicBool>,
}

impl<D: Detector> Detector for StopAfter<D> {
    fn detect(&self, image: &RgbImage) -> Result<ImageResult> {
        let result = self.inner.detect(image);
        if self.done.fetch_add(1, Ordering::SeqCst) + 1 >= self.after {
            self.stop.store(true, Ordering::SeqCst);
        }
        result
    }
    fn model_version(&self) -> String {
        self.inner.model_version()
    }
}

// ---- the loop in-process -----------------------------------------------------------------

#[test]
fn folder_board_records_every_frame_and_error_before_showing_it() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir_all(photos.join("left")).unwrap();
    let a = generate(&small_params(), 1).image;
    a.save(photos.join("a.png")).unwrap();
    generate(&small_params(), 2)
        .image
        .save(photos.join("left/c.jpg"))
        .unwrap();
    // A PNG cut in half: reported, recorded, and the replay goes on.
    let mut cut = Vec::new();
    a.write_to(&mut std::io::Cursor::new(&mut cut), image::ImageFormat::Png)
        .unwrap();
    std::fs::write(photos.join("b.png"), &cut[..cut.len() / 2]).unwrap();

    let source = format!(
        "kind = \"folder\"\npath = \"{}\"\nloop = false",
        photos.display()
    );
    let board = write_board(
        dir.path(),
        &board_toml(dir.path(), &source, "4fp", models()),
    );
    let config = BoardConfig::load(&board).unwrap();
    let (mut station, report) = Station::from_board(&config, false).unwrap();
    assert!(report.created && report.is_clean(), "{report}");
    assert_eq!(station.threshold, THRESHOLDS[2]);
    assert_eq!(station.operating_point, OperatingPoint::Fp4);
    let summary = station.run(&AtomicBool::new(false));
    drop(station);

    assert!(!summary.stopped, "{summary:?}");
    assert_eq!(
        (summary.frames, summary.processed, summary.failed_frames),
        (2, 2, 0)
    );
    assert_eq!(summary.source_errors, 1);
    assert_eq!((summary.records_saved, summary.records_unsaved), (3, 0));
    assert_eq!(summary.log, dir.path().join("log/records.log"));
    let text = summary.to_string();
    assert!(
        text.contains(&dir.path().join("screens").display().to_string())
            && text.contains("records.log"),
        "{text}"
    );

    // One screen per record, 400x272.
    let shown = screens(&dir.path().join("screens"));
    assert_eq!(shown.len(), 3, "{shown:?}");
    for s in &shown {
        assert_eq!(image::image_dimensions(s).unwrap(), (400, 272));
    }

    let records = read_log(&summary.log);
    let names: Vec<&str> = records.iter().map(|r| r.source.as_str()).collect();
    assert_eq!(names, ["a.png", "b.png", "left/c.jpg"]);
    // The processed frames: file hash, size, frame numbers, counts at 4 FP/image, and the
    // same detections as the cascade gives on its own.
    let cascade = Cascade::load(models(), None, &trust()).unwrap();
    for (r, id, file) in [(&records[0], 0, "a.png"), (&records[2], 1, "left/c.jpg")] {
        check_result_record(r, THRESHOLDS[2]);
        assert_eq!(r.frame, id);
        let bytes = std::fs::read(photos.join(file)).unwrap();
        assert_eq!(r.image_sha256, ImageHash::of(&bytes));
        assert_eq!((r.width, r.height), (320, 288));
        let direct = cascade
            .detect(&ma_core::image_io::read_image(&photos.join(file)).unwrap())
            .unwrap();
        assert_eq!(r.detections.len(), direct.detections.len());
        for (a, b) in r.detections.iter().zip(&direct.detections) {
            assert_eq!((a.x, a.y, a.score), (b.x, b.y, b.score));
        }
    }
    let bad = &records[1];
    let error = bad.error.as_deref().unwrap();
    assert!(error.contains("b.png") && !error.contains('\n'), "{error}");
    assert_eq!((bad.width, bad.height, bad.ma_count), (0, 0, 0));

    // Round trip through the exports.
    let mut jsonl = Vec::new();
    records::to_jsonl(&records, &mut jsonl).unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8(jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (line, r) in lines.iter().zip(&records) {
        assert_eq!(line["source"], r.source.as_str());
        assert_eq!(line["image_sha256"], r.image_sha256.to_string().as_str());
        assert_eq!(line["ma_count"], r.ma_count);
        assert_eq!(
            line["detections"].as_array().unwrap().len(),
            r.detections.len()
        );
        let back: Record = serde_json::from_value(line.clone()).unwrap();
        assert_same(&back, r);
    }
    let mut csv = Vec::new();
    records::to_csv(&records, &mut csv).unwrap();
    let csv = String::from_utf8(csv).unwrap();
    assert_eq!(csv.lines().count(), 4);
    assert!(csv.starts_with(records::CSV_HEADER));
}

#[test]
fn synthetic_board_appends_to_the_log_of_an_earlier_run() {
    let dir = tempfile::tempdir().unwrap();
    let board = write_board(
        dir.path(),
        &board_toml(
            dir.path(),
            "kind = \"synthetic\"\ncount = 1\nseed = 5",
            "2fp",
            models(),
        ),
    );
    let config = BoardConfig::load(&board).unwrap();
    for run in 1..=2u64 {
        let (mut station, report) = Station::from_board(&config, false).unwrap();
        assert_eq!(report.records_ok, run - 1);
        let summary = station.run(&AtomicBool::new(false));
        assert_eq!((summary.frames, summary.processed), (1, 1), "{summary:?}");
        assert_eq!((summary.records_saved, summary.screens), (1, 1));
    }
    let records = read_log(&dir.path().join("log/records.log"));
    assert_eq!(records.len(), 2);
    // The board's synthetic frames are the full-size defaults; seed 5 is frame 0.
    let frame = generate(&SyntheticParams::default(), 5).image;
    for r in &records {
        check_result_record(r, THRESHOLDS[1]);
        assert_eq!((r.frame, r.source.as_str()), (0, "synthetic seed 5"));
        assert_eq!(r.image_sha256, pixel_hash(&frame));
        assert_eq!((r.width, r.height), (1500, 1152));
    }
    // PNG numbering restarts per run: the second run's screen replaced the first.
    assert_eq!(screens(&dir.path().join("screens")).len(), 1);
}

/// A station on small synthetic frames, built by hand.
fn small_station(dir: &Path, count: u64, detector: Box<dyn Detector>) -> Station {
    let (log, _) = RecordLog::open(dir.join("records.log")).unwrap();
    Station {
        source: Box::new(SyntheticSource::new(small_params(), 1, count)),
        detector,
        panel: Box::new(PngSink::new(dir.join("screens"), 320, 240).unwrap()),
        display: DisplayTarget::PngFolder(dir.join("screens")),
        log,
        board: "test-board".into(),
        operating_point: OperatingPoint::Fp2,
        threshold: THRESHOLDS[1],
        heatmap: false,
        heatmap_toggle: None,
        archive: None,
    }
}

#[test]
fn sigterm_stops_the_loop_after_the_frame_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let stop = stop_on_signals().unwrap();
    let cascade = Cascade::load(models(), None, &trust()).unwrap();
    let mut station = small_station(dir.path(), 40, Box::new(cascade));
    let log = dir.path().join("records.log");
    // Raise SIGTERM once the first record is on disk (the loop is then in frame 2 or
    // later, or between frames).
    let signaller = std::thread::spawn(move || {
        let start = Instant::now();
        while records::read_all(&log).map_or(0, |(r, _)| r.len()) == 0 {
            assert!(start.elapsed() < RUN_TIMEOUT, "no record written");
            std::thread::sleep(Duration::from_millis(20));
        }
        signal_hook::low_level::raise(signal_hook::consts::SIGTERM).unwrap();
    });
    let summary = station.run(&stop);
    signaller.join().unwrap();
    assert!(stop.load(Ordering::SeqCst));
    assert!(summary.stopped, "{summary:?}");
    assert!(
        (1..40).contains(&summary.frames),
        "ran {} frames",
        summary.frames
    );
    // The frame in progress was finished: every delivered frame has its record and screen.
    let records = read_log(&dir.path().join("records.log"));
    assert_eq!(records.len() as u64, summary.frames);
    assert_eq!(summary.screens, summary.frames);
    assert_eq!(
        screens(&dir.path().join("screens")).len() as u64,
        summary.frames
    );
    for (i, r) in records.iter().enumerate() {
        check_result_record(r, THRESHOLDS[1]);
        assert_eq!(r.frame, i as u64);
    }
}

#[test]
fn camera_unplugged_and_bad_frames_are_logged_shown_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    // MJPEG buffers of a small synthetic fundus; every other one is cut short (a corrupt
    // USB transfer). Reads 1 and 4 fail as an unplugged camera does, and so does the first
    // reopen.
    let fundus = generate(&small_params(), 3).image;
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 92)
        .encode_image(&fundus)
        .unwrap();
    let frame = |bytes: Vec<u8>| RawFrame {
        format: PixelFormat::Mjpeg,
        width: 320,
        height: 288,
        stride: 0,
        bytes,
    };
    let cut = jpeg[..jpeg.len() / 3].to_vec();
    let capture = RecordedCapture::new("/dev/video7", vec![frame(jpeg.clone()), frame(cut)])
        .fail_opens(1..2)
        .fail_reads(1..2)
        .fail_reads(4..5);
    let clock = FakeClock::new();
    let source = CameraSource::with_parts(
        Box::new(capture),
        TriggerInput::new(&Trigger::Interval(Duration::ZERO)),
        CameraConfig::default(),
        Arc::new(clock.clone()),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let detector = StopAfter {
        inner: Cascade::load(models(), None, &trust()).unwrap(),
        after: 2,
        done: AtomicU64::new(0),
        stop: Arc::clone(&stop),
    };
    let mut station = small_station(dir.path(), 0, Box::new(detector));
    station.source = Box::new(source);
    let summary = station.run(&stop);
    assert!(summary.stopped);
    assert_eq!((summary.frames, summary.processed), (2, 2), "{summary:?}");
    assert!(summary.source_errors >= 3, "{summary:?}");

    let records = read_log(&dir.path().join("records.log"));
    assert_eq!(records.len() as u64, summary.frames + summary.source_errors);
    let errors: Vec<&str> = records.iter().filter_map(|r| r.error.as_deref()).collect();
    assert!(
        errors.iter().any(|e| e.contains("cannot read a frame")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("cannot open")),
        "{errors:?}"
    );
    assert!(
        errors.iter().all(|e| e.contains("/dev/video7")),
        "{errors:?}"
    );
    let frames: Vec<&Record> = records.iter().filter(|r| r.error.is_none()).collect();
    for (i, r) in frames.iter().enumerate() {
        check_result_record(r, THRESHOLDS[1]);
        assert_eq!(
            (r.frame, r.source.as_str()),
            (i as u64, "camera:/dev/video7")
        );
        assert_eq!((r.width, r.height), (320, 288));
    }
    // Every record was shown; the retries waited on the (fake) clock, doubling.
    assert_eq!(
        screens(&dir.path().join("screens")).len() as u64,
        summary.screens
    );
    assert!(summary.screens >= records.len() as u64);
    assert!(clock.sleeps().contains(&Duration::from_millis(500)));
}

#[test]
fn board_config_and_model_errors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let synthetic = "kind = \"synthetic\"\ncount = 1";
    // No models in the folder: the message names it, and nothing was written.
    let empty = dir.path().join("empty-models");
    std::fs::create_dir_all(&empty).unwrap();
    let config = BoardConfig::parse(&board_toml(dir.path(), synthetic, "1fp", &empty)).unwrap();
    let e = format!("{:#}", Station::from_board(&config, false).err().unwrap());
    assert!(
        e.contains("empty-models") && e.contains("manifest.toml"),
        "{e}"
    );
    assert!(!dir.path().join("log").exists() && !dir.path().join("screens").exists());
    // A model file that does not match the manifest: refused, naming the file.
    let copy = dir.path().join("tampered");
    std::fs::create_dir_all(&copy).unwrap();
    let manifest = Manifest::load(models()).unwrap();
    for entry in &manifest.models {
        std::fs::copy(models().join(&entry.file), copy.join(&entry.file)).unwrap();
    }
    for file in ["manifest.toml", "manifest.toml.sig"] {
        std::fs::copy(models().join(file), copy.join(file)).unwrap();
    }
    let stage1 = copy.join("stage1-float.onnx");
    let mut bytes = std::fs::read(&stage1).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&stage1, bytes).unwrap();
    let config = BoardConfig::parse(&board_toml(dir.path(), synthetic, "1fp", &copy)).unwrap();
    let e = format!("{:#}", Station::from_board(&config, false).err().unwrap());
    assert!(e.contains("stage1-float.onnx"), "{e}");
    // A folder source without images.
    let source = format!(
        "kind = \"folder\"\npath = \"{}\"",
        dir.path().join("empty-models").display()
    );
    let config = BoardConfig::parse(&board_toml(dir.path(), &source, "1fp", models())).unwrap();
    let e = format!("{:#}", Station::from_board(&config, false).err().unwrap());
    assert!(e.contains("source.path") && e.contains("no images"), "{e}");
    // A misspelt key in the board file: named, with the file.
    let text = board_toml(dir.path(), synthetic, "1fp", models()).replace("threads", "thread");
    let board = write_board(dir.path(), &text);
    let e = format!("{:#}", BoardConfig::load(&board).unwrap_err());
    assert!(e.contains("thread") && e.contains("board.toml"), "{e}");
}

/// A copy of the test bundle in `dir/name`: manifest, signature and models.
fn copy_bundle(dir: &Path, name: &str) -> PathBuf {
    let copy = dir.join(name);
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(models()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, copy.join(path.file_name().unwrap())).unwrap();
    }
    copy
}

#[test]
fn only_bundles_signed_by_the_boards_key_are_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let synthetic = "kind = \"synthetic\"\ncount = 1";
    let board = |models: &Path| {
        BoardConfig::parse(&board_toml(dir.path(), synthetic, "1fp", models)).unwrap()
    };
    let refused = |config: &BoardConfig| {
        let e = format!("{:#}", Station::from_board(config, false).err().unwrap());
        // Refused before anything was written.
        assert!(!dir.path().join("log").exists() && !dir.path().join("screens").exists());
        e
    };
    // What a successful load created (the log and the panel's folder).
    let clean = || {
        for d in ["log", "screens"] {
            let _ = std::fs::remove_dir_all(dir.path().join(d));
        }
    };

    // The signed bundle loads.
    Station::from_board(&board(models()), false).unwrap();
    clean();

    // A manifest whose thresholds were lowered after signing.
    let tampered = copy_bundle(dir.path(), "tampered-manifest");
    let manifest = tampered.join("manifest.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(text.contains("fp_per_image_1 = 0.6"), "{text}");
    std::fs::write(
        &manifest,
        text.replace("fp_per_image_1 = 0.6", "fp_per_image_1 = 0.1"),
    )
    .unwrap();
    let e = refused(&board(&tampered));
    assert!(
        e.contains("not a valid signature") && e.contains("tampered-manifest"),
        "{e}"
    );
    // Development runs may still load it, and say so in every record.
    let (station, _) = Station::from_board(&board(&tampered), true).unwrap();
    assert_eq!(station.detector.model_version(), "loop-test float UNSIGNED");
    drop(station);
    clean();

    // No signature at all.
    let unsigned = copy_bundle(dir.path(), "unsigned");
    std::fs::remove_file(unsigned.join("manifest.toml.sig")).unwrap();
    let e = refused(&board(&unsigned));
    assert!(
        e.contains("not signed") && e.contains("--allow-unsigned"),
        "{e}"
    );

    // The right bundle, but the board trusts another key.
    let other = ma_core::signing::KeyPair::generate().unwrap();
    let (_, other_pub) = other.write(&dir.path().join("other")).unwrap();
    let text = board_toml(dir.path(), synthetic, "1fp", models()).replace(
        &models_key().display().to_string(),
        &other_pub.display().to_string(),
    );
    let e = refused(&BoardConfig::parse(&text).unwrap());
    assert!(e.contains("another key") && e.contains("other.pub"), "{e}");

    // A flipped byte in a model file: the signed manifest's hash refuses it.
    let flipped = copy_bundle(dir.path(), "flipped-model");
    let stage2 = flipped.join("stage2-float.onnx");
    let mut bytes = std::fs::read(&stage2).unwrap();
    bytes[100] ^= 0x80;
    std::fs::write(&stage2, bytes).unwrap();
    let e = refused(&board(&flipped));
    assert!(
        e.contains("stage2-float.onnx") && e.contains("SHA-256"),
        "{e}"
    );
}

// ---- the binary ---------------------------------------------------------------------------

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `ma-device args` in `cwd` to completion.
fn ma_device(cwd: &Path, args: &[&str]) -> Output {
    let out = Command::new(ma_tests::ma_device_binary())
        .current_dir(cwd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn binary_stops_on_sigterm_with_status_0_and_records_can_be_read_back() {
    use std::os::unix::process::ExitStatusExt;

    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    // Relative paths in the board config are relative to the working directory.
    let toml = board_toml(
        Path::new("out"),
        "kind = \"synthetic\"\ncount = 1000\nseed = 3",
        "1fp",
        models(),
    );
    write_board(work, &toml);
    let log = work.join("out/log/records.log");

    let mut child = Command::new(ma_tests::ma_device_binary())
        .current_dir(work)
        .args(["run", "--board", "board.toml"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !log.exists() || records::read_all(&log).map_or(0, |(r, _)| r.len()) == 0 {
        if start.elapsed() > RUN_TIMEOUT || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "no record from ma-device run: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("cannot run kill");
    assert!(killed.success());
    let waited = Instant::now();
    let out = loop {
        if child.try_wait().unwrap().is_some() {
            break child.wait_with_output().unwrap();
        }
        if waited.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            panic!("ma-device run did not stop within {RUN_TIMEOUT:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        (out.status.code(), out.status.signal()),
        (Some(0), None),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // It says where the screens and the records are.
    assert!(stdout.contains("stopped after"), "{stdout}");
    assert!(
        stdout.contains("records log: out/log/records.log"),
        "{stdout}"
    );
    assert!(stdout.contains("PNG screens in out/screens/"), "{stdout}");

    let records = read_log(&log);
    assert!(!records.is_empty() && records.len() < 1000);
    assert_eq!(screens(&work.join("out/screens")).len(), records.len());
    for r in &records {
        check_result_record(r, THRESHOLDS[0]);
    }

    // records list: one line per record, numbered.
    let list = ma_device(work, &["records", "list", "--log", "out/log/records.log"]);
    assert_eq!(list.code, Some(0), "{}", list.stderr);
    assert_eq!(list.stdout.lines().count(), records.len());
    assert!(list.stdout.starts_with("#0 "), "{}", list.stdout);
    assert!(list.stdout.contains("synthetic seed 3"), "{}", list.stdout);

    // records export: JSONL on stdout, CSV into a file; both round-trip.
    let jsonl = ma_device(
        work,
        &[
            "records",
            "export",
            "--log",
            "out/log/records.log",
            "--format",
            "jsonl",
        ],
    );
    assert_eq!(jsonl.code, Some(0), "{}", jsonl.stderr);
    let back: Vec<Record> = jsonl
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(back.len(), records.len());
    for (a, b) in back.iter().zip(&records) {
        assert_same(a, b);
    }
    let csv = ma_device(
        work,
        &[
            "records",
            "export",
            "--log",
            "out/log/records.log",
            "--format",
            "csv",
            "--output",
            "records.csv",
        ],
    );
    assert_eq!(csv.code, Some(0), "{}", csv.stderr);
    let text = std::fs::read_to_string(work.join("records.csv")).unwrap();
    assert!(text.starts_with(records::CSV_HEADER));
    assert_eq!(text.lines().count(), records.len() + 1);

    // A torn final record and a damaged one: reported on stderr, the rest still read.
    let damaged = work.join("damaged.log");
    let mut bytes = std::fs::read(&log).unwrap();
    let first_end = bytes.iter().skip(6).position(|&b| b == 0).unwrap() + 6;
    // COBS bytes are never 0: change one without making it a terminator.
    bytes[first_end - 3] = if bytes[first_end - 3] == 1 { 2 } else { 1 };
    bytes.extend_from_slice(b"\x05torn");
    std::fs::File::create(&damaged)
        .unwrap()
        .write_all(&bytes)
        .unwrap();
    let list = ma_device(work, &["records", "list", "--log", "damaged.log"]);
    assert_eq!(list.code, Some(0), "{}", list.stderr);
    assert_eq!(list.stdout.lines().count(), records.len() - 1);
    assert!(
        list.stderr.contains("1 corrupt frames skipped") && list.stderr.contains("torn"),
        "{}",
        list.stderr
    );
    let jsonl = ma_device(
        work,
        &[
            "records",
            "export",
            "--log",
            "damaged.log",
            "--format",
            "jsonl",
        ],
    );
    assert_eq!(jsonl.code, Some(0));
    assert_eq!(jsonl.stdout.lines().count(), records.len() - 1);
    assert!(jsonl.stderr.contains("torn"), "{}", jsonl.stderr);

    // A log that does not exist, and a file that is not a log: exit 1, named.
    let missing = ma_device(work, &["records", "list", "--log", "nope.log"]);
    assert_eq!(missing.code, Some(1));
    assert!(missing.stderr.contains("nope.log"), "{}", missing.stderr);
    let not_a_log = ma_device(
        work,
        &[
            "records",
            "export",
            "--log",
            "board.toml",
            "--format",
            "csv",
        ],
    );
    assert_eq!(not_a_log.code, Some(1));
    assert!(
        not_a_log.stderr.contains("not an ma-device records log"),
        "{}",
        not_a_log.stderr
    );
}

#[test]
fn binary_refuses_a_board_without_key_unless_allow_unsigned_and_then_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let toml = board_toml(
        Path::new("out"),
        "kind = \"synthetic\"\ncount = 1\nseed = 5",
        "2fp",
        models(),
    );
    let key_line = format!("public_key = \"{}\"\n", models_key().display());
    assert!(toml.contains(&key_line));
    write_board(work, &toml.replace(&key_line, ""));

    let run = ma_device(work, &["run", "--board", "board.toml"]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("inference.public_key is not set")
            && run.stderr.contains("--allow-unsigned"),
        "{}",
        run.stderr
    );
    assert!(!work.join("out").exists());

    let run = ma_device(work, &["run", "--board", "board.toml", "--allow-unsigned"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stderr.contains("WARNING: --allow-unsigned"),
        "{}",
        run.stderr
    );
    let records = read_log(&work.join("out/log/records.log"));
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].model_version, "loop-test float UNSIGNED");
}

#[test]
fn binary_detect_checks_the_bundle_signature() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    generate(&small_params(), 4)
        .image
        .save(work.join("eye.png"))
        .unwrap();
    let models = models().to_str().unwrap();
    let key = models_key().to_str().unwrap();
    let detect = |extra: &[&str]| {
        let mut args = vec![
            "detect", "--models", models, "--input", "eye.png", "--output", "d.jsonl",
        ];
        args.extend_from_slice(extra);
        ma_device(work, &args)
    };
    // By default only the release key is trusted; the test bundle has its own key.
    let run = detect(&[]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("another key") && run.stderr.contains("release key"),
        "{}",
        run.stderr
    );
    let run = detect(&["--public-key", key]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!run.stderr.contains("WARNING"), "{}", run.stderr);
    // Every core by default; --threads overrides.
    let cores = std::thread::available_parallelism().unwrap().get();
    let plural = |n: usize| format!("({n} thread{})", if n == 1 { "" } else { "s" });
    assert!(run.stderr.contains(&plural(cores)), "{}", run.stderr);
    let run = detect(&["--public-key", key, "--threads", "1"]);
    assert!(run.stderr.contains(&plural(1)), "{}", run.stderr);
    let run = detect(&["--allow-unsigned"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stderr.contains("WARNING: --allow-unsigned"),
        "{}",
        run.stderr
    );
}

#[test]
fn binary_run_without_models_or_board_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    std::fs::create_dir_all(work.join("models")).unwrap();
    let toml = board_toml(
        Path::new("out"),
        "kind = \"synthetic\"\ncount = 1",
        "2fp",
        Path::new("models"),
    );
    write_board(work, &toml);
    let run = ma_device(work, &["run", "--board", "board.toml"]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("models/manifest.toml does not exist")
            && run.stderr.contains("models folder models"),
        "{}",
        run.stderr
    );
    assert!(!work.join("out").exists());
    // The default board is board-configs/desktop-sim.toml in the working directory.
    let run = ma_device(work, &["run"]);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("board-configs/desktop-sim.toml"),
        "{}",
        run.stderr
    );
    // --help explains the commands.
    let help = ma_device(work, &["--help"]);
    assert_eq!(help.code, Some(0));
    for command in ["run", "records", "detect", "preprocess", "synth"] {
        assert!(help.stdout.contains(command), "{}", help.stdout);
    }
    let help = ma_device(work, &["run", "--help"]);
    assert!(
        help.stdout.contains("SIGTERM") && help.stdout.contains("--board"),
        "{}",
        help.stdout
    );
    let help = ma_device(work, &["records", "export", "--help"]);
    assert!(
        help.stdout.contains("jsonl") && help.stdout.contains("csv"),
        "{}",
        help.stdout
    );
}

// ---- hostile conditions (issue 24) ----------------------------------------------------------

/// The write end of a pipe whose reader is already gone: every write gets EPIPE.
fn closed_pipe() -> Stdio {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: plain syscalls; `fds` has room for the two descriptors, and the write end
    // is owned by the returned value only.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        libc::close(fds[0]);
        Stdio::from(OwnedFd::from_raw_fd(fds[1]))
    }
}

/// Runs `ma-device args` in `cwd` with stdout and stderr both closed pipes; the exit code
/// (`None`: killed by a signal).
fn ma_device_closed_pipes(cwd: &Path, args: &[&str]) -> Option<i32> {
    Command::new(ma_tests::ma_device_binary())
        .current_dir(cwd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(closed_pipe())
        .stderr(closed_pipe())
        .status()
        .unwrap()
        .code()
}

/// A records log with `n` small records, written in-process.
fn small_log(path: &Path, n: u64) {
    let (mut log, _) = RecordLog::open(path).unwrap();
    for i in 0..n {
        log.append(&Record {
            time_unix_ms: 1_714_566_896_000 + i as i64,
            frame: i,
            source: format!("eye-{i}.png"),
            image_sha256: ImageHash::of(&i.to_le_bytes()),
            width: 320,
            height: 288,
            detections: Vec::new(),
            refer: false,
            ma_count: 0,
            model_version: "loop-test float".into(),
            board: "test-board".into(),
            elapsed_ms: 1.0,
            error: None,
            refer_score: None,
            attention_boxes: Vec::new(),
            frame_file: None,
        })
        .unwrap();
    }
}

/// `records export` never writes over the log it reads: not by name, not through a hard
/// link or a symlink, not through `>> log`. The error names both paths.
#[test]
fn binary_records_export_never_writes_over_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let log = work.join("r.log");
    small_log(&log, 3);
    let original = std::fs::read(&log).unwrap();
    std::fs::hard_link(&log, work.join("hard.log")).unwrap();
    std::os::unix::fs::symlink(&log, work.join("soft.log")).unwrap();
    for output in ["r.log", "./r.log", "hard.log", "soft.log"] {
        for format in ["jsonl", "csv"] {
            let run = ma_device(
                work,
                &[
                    "records", "export", "--log", "r.log", "--format", format, "--output", output,
                ],
            );
            assert_eq!(run.code, Some(1), "{output}: {}", run.stderr);
            assert!(
                run.stderr.contains("refusing to write")
                    && run.stderr.contains(output)
                    && run.stderr.contains("records log r.log"),
                "{}",
                run.stderr
            );
            assert_eq!(std::fs::read(&log).unwrap(), original, "{output}");
        }
    }
    // Standard output appending to the log (`>> r.log`).
    let append = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    let out = Command::new(ma_tests::ma_device_binary())
        .current_dir(work)
        .args(["records", "export", "--log", "r.log", "--format", "jsonl"])
        .stdout(append)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("standard output"), "{stderr}");
    assert_eq!(std::fs::read(&log).unwrap(), original);
    // The log still reads back, and another output works.
    let list = ma_device(work, &["records", "list", "--log", "r.log"]);
    assert_eq!((list.code, list.stdout.lines().count()), (Some(0), 3));
    let run = ma_device(
        work,
        &[
            "records", "export", "--log", "r.log", "--format", "jsonl", "--output", "r.jsonl",
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        std::fs::read_to_string(work.join("r.jsonl"))
            .unwrap()
            .lines()
            .count(),
        3
    );
}

/// A reader that went away (`| head`, `| true`) is no failure: `run` saves every record
/// and exits 0, `detect` writes its JSONL, `records list/export` stop quietly. Before, the
/// first print panicked (status 101).
#[test]
fn binary_commands_survive_closed_stdout_and_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let toml = board_toml(
        Path::new("out"),
        "kind = \"synthetic\"\ncount = 2\nseed = 9",
        "2fp",
        models(),
    );
    write_board(work, &toml);
    let code = ma_device_closed_pipes(work, &["run", "--board", "board.toml"]);
    assert_eq!(code, Some(0), "run");
    let log = work.join("out/log/records.log");
    assert_eq!(read_log(&log).len(), 2);

    for args in [
        &["records", "list", "--log", "out/log/records.log"][..],
        &[
            "records",
            "export",
            "--log",
            "out/log/records.log",
            "--format",
            "csv",
        ],
        // An error message on a closed stderr still gives status 1, not a panic.
        &["records", "list", "--log", "missing.log"],
    ] {
        let expected = if args.contains(&"missing.log") {
            Some(1)
        } else {
            Some(0)
        };
        assert_eq!(ma_device_closed_pipes(work, args), expected, "{args:?}");
    }

    generate(&small_params(), 4)
        .image
        .save(work.join("eye.png"))
        .unwrap();
    let code = ma_device_closed_pipes(
        work,
        &[
            "detect",
            "--models",
            models().to_str().unwrap(),
            "--public-key",
            models_key().to_str().unwrap(),
            "--input",
            "eye.png",
            "--output",
            "d.jsonl",
        ],
    );
    assert_eq!(code, Some(0), "detect");
    let lines = ma_core::detection::read_jsonl(&work.join("d.jsonl")).unwrap();
    assert_eq!(lines.len(), 1);
}

/// Board values that would allocate without bound or overflow the clock are refused at
/// start-up, naming the key (100000 x 100000 used to abort with status 134).
#[test]
fn binary_refuses_unbounded_board_values_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let toml = board_toml(
        Path::new("out"),
        "kind = \"synthetic\"\ncount = 1",
        "2fp",
        models(),
    );
    for (from, to, key) in [
        ("width = 400", "width = 100000", "display.width"),
        ("height = 272", "height = 100000", "display.height"),
        ("threads = 1", "threads = 1000000", "inference.threads"),
    ] {
        assert!(toml.contains(from));
        write_board(work, &toml.replace(from, to));
        let run = ma_device(work, &["run", "--board", "board.toml"]);
        assert_eq!(run.code, Some(1), "{key}: {}", run.stderr);
        assert!(
            run.stderr.contains(key) && run.stderr.contains("board.toml"),
            "{}",
            run.stderr
        );
        assert!(!work.join("out").exists());
    }
}

/// A full disk for the screens (RLIMIT_FSIZE below the size of one screen, a file size
/// limit as a full disk is, for the writer): every screen fails, no temporary `.part`
/// file is left to hold space, and every record is saved (records come first).
#[test]
fn binary_disk_full_leaves_no_temporary_screen_and_saves_every_record() {
    /// Larger than a few records, smaller than one 400x272 screen.
    const FILE_SIZE_LIMIT: u64 = 48 << 10;
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let toml = board_toml(
        Path::new("out"),
        "kind = \"synthetic\"\ncount = 3\nseed = 21",
        "2fp",
        models(),
    );
    write_board(work, &toml);
    let mut command = Command::new(ma_tests::ma_device_binary());
    command
        .current_dir(work)
        .args(["run", "--board", "board.toml"])
        .stdin(Stdio::null());
    ma_tests::limit_file_size(&mut command, FILE_SIZE_LIMIT);
    let out = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        stderr.matches("cannot show the result").count(),
        3,
        "every screen should fail: {stderr}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(work.join("out/screens"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let records = read_log(&work.join("out/log/records.log"));
    assert_eq!(records.len(), 3, "{stderr}");
    for r in &records {
        check_result_record(r, THRESHOLDS[1]);
    }
}

/// A folder replay with hostile names, started on a damaged log: names with control
/// characters are escaped on stderr, a name that is not UTF-8 still gets the hash of its
/// file, and the damaged log gives one short warning.
#[test]
fn binary_folder_run_escapes_names_hashes_every_file_and_summarises_a_damaged_log() {
    use std::os::unix::ffi::OsStrExt;

    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let photos = work.join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    let escape_name = "eye\n\u{1b}[31mred.png";
    let latin1 = std::ffi::OsStr::from_bytes(b"caf\xe9.png");
    generate(&small_params(), 6)
        .image
        .save_with_format(photos.join(escape_name), image::ImageFormat::Png)
        .unwrap();
    generate(&small_params(), 7)
        .image
        .save_with_format(photos.join(latin1), image::ImageFormat::Png)
        .unwrap();
    // The log of an earlier run, then 100000 damaged frames.
    let log = work.join("out/log/records.log");
    std::fs::create_dir_all(log.parent().unwrap()).unwrap();
    small_log(&log, 1);
    let mut damage = Vec::new();
    for _ in 0..100_000 {
        damage.extend_from_slice(b"\x05junk\x00");
    }
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(&damage)
        .unwrap();

    let source = format!(
        "kind = \"folder\"\npath = \"{}\"\nloop = false",
        photos.display()
    );
    write_board(
        work,
        &board_toml(Path::new("out"), &source, "2fp", models()),
    );
    let run = ma_device(work, &["run", "--board", "board.toml"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!run.stderr.contains('\u{1b}'), "{:?}", run.stderr);
    assert!(
        run.stderr.contains("eye\\n\\u{1b}[31mred.png"),
        "{}",
        run.stderr
    );
    let warning = run
        .stderr
        .lines()
        .find(|l| l.starts_with("warning: records log"))
        .unwrap_or_else(|| panic!("no warning: {}", run.stderr));
    assert!(
        warning.len() < 1000 && warning.contains("100000 corrupt frames skipped"),
        "{} bytes: {warning}",
        warning.len()
    );

    let (records, _) = records::read_all(&log).unwrap();
    assert_eq!(records.len(), 3);
    for r in &records[1..] {
        check_result_record(r, THRESHOLDS[1]);
    }
    let latin1_record = records
        .iter()
        .find(|r| r.source.starts_with("caf"))
        .unwrap();
    let bytes = std::fs::read(photos.join(latin1)).unwrap();
    assert_eq!(latin1_record.image_sha256, ImageHash::of(&bytes));
    // `records list` keeps one line per record.
    let list = ma_device(work, &["records", "list", "--log", "out/log/records.log"]);
    assert_eq!(list.stdout.lines().count(), 3, "{}", list.stdout);
}

#[test]
fn readme_main_command_replays_the_demo_photos_with_the_shipped_models() {
    // `ma-device run` from the repository root, as the README says, but in a scratch
    // folder (links to the repository's files) so the run's out/ lands there.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    for name in ["board-configs", "demo", "models", "keys"] {
        std::os::unix::fs::symlink(repo.join(name).canonicalize().unwrap(), work.join(name))
            .unwrap();
    }
    let run = ma_device(work, &["run"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!run.stderr.contains("UNSIGNED"), "{}", run.stderr);

    let manifest = ma_core::manifest::Manifest::load(repo.join("models")).unwrap();
    let records = read_log(&work.join("out/records.log"));
    let sources: Vec<&str> = records.iter().map(|r| r.source.as_str()).collect();
    assert_eq!(
        sources,
        [
            "IDRiD_01.jpg",
            "IDRiD_03.jpg",
            "IDRiD_04.jpg",
            "IDRiD_15.jpg"
        ]
    );
    let referral = manifest.referral.as_ref().expect("the shipped set refers");
    for r in &records {
        assert_eq!(r.error, None, "{r:?}");
        assert_eq!(r.model_version, format!("{} int8", manifest.version));
        // The referral network's answer is kept: its score and the boxes behind it.
        let score = r.refer_score.expect("a refer_score in every record");
        assert!((0.0..=1.0).contains(&score), "{r:?}");
        assert_eq!(r.attention_boxes.len(), referral.boxes, "{r:?}");
        assert!(
            r.attention_boxes
                .iter()
                .all(|b| b.x0 < b.x1 && b.y0 < b.y1 && (0.0..=1.0).contains(&b.weight)),
            "{r:?}"
        );
    }
    // IDRiD_03 holds 63 annotated MAs: the shipped models, trained on it, mark some.
    assert!(records[1].ma_count > 0, "{:?}", records[1]);
    assert_eq!(screens(&work.join("out/display")).len(), 4);
}
