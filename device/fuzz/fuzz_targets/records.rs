//! Any bytes as a records frame and as a records log file. The reader must never panic or
//! return a record that does not re-encode to itself, and whatever a log holds after its
//! header, opening it for appending and appending one record must leave that record
//! readable (crash damage must never make the log unwritable). Logs of the older format
//! versions 1 and 2 are read the same way.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use ma_device::records::{
    FORMAT_VERSION, ImageHash, MAGIC, Record, RecordBox, RecordDetection, RecordLog, decode_frame,
    encode_frame, read_all,
};

/// One folder for the whole run, on tmpfs when there is one: every append syncs.
fn log_path() -> &'static PathBuf {
    static PATH: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &PATH
        .get_or_init(|| {
            let dir = tempfile::Builder::new()
                .prefix("records-fuzz")
                .tempdir_in("/dev/shm")
                .or_else(|_| tempfile::tempdir())
                .unwrap();
            let path = dir.path().join("records.log");
            (dir, path)
        })
        .1
}

fn probe() -> Record {
    Record {
        time_unix_ms: 1_714_566_896_789,
        frame: 7,
        source: "fuzz".into(),
        image_sha256: ImageHash::of(b"fuzz"),
        width: 1500,
        height: 1152,
        detections: vec![RecordDetection {
            x: 1.5,
            y: 2.5,
            score: 0.5,
        }],
        refer: true,
        ma_count: 1,
        model_version: "v".into(),
        board: "b".into(),
        elapsed_ms: 1.0,
        error: None,
        refer_score: Some(0.75),
        attention_boxes: vec![RecordBox {
            x0: 0.0,
            y0: 1.0,
            x1: 64.0,
            y1: 65.0,
            weight: 0.5,
        }],
        frame_file: Some(format!("{}.png", "ab".repeat(32))),
    }
}

/// Records compare by their encoding: a decoded NaN score is not equal to itself.
fn same(a: &Record, b: &Record) -> bool {
    encode_frame(a).unwrap() == encode_frame(b).unwrap()
}

fn check_reencodes(r: &Record) {
    let frame = encode_frame(r).unwrap();
    let again = decode_frame(&frame[..frame.len() - 1]).expect("a re-encoded record decodes");
    assert!(same(r, &again));
}

fuzz_target!(|data: &[u8]| {
    // 1. The bytes as one frame (without its terminator).
    if let Ok(r) = decode_frame(data) {
        check_reencodes(&r);
    }

    // 2. The bytes as a whole file: read only.
    let path = log_path();
    std::fs::write(path, data).unwrap();
    if let Ok((records, _)) = read_all(path) {
        records.iter().for_each(check_reencodes);
    }

    // 3. The bytes after a valid header: read, open for appending, append.
    let mut file = MAGIC.to_vec();
    file.push(FORMAT_VERSION);
    file.extend_from_slice(data);
    std::fs::write(path, &file).unwrap();
    let (records, report) = read_all(path).expect("a log with a valid header reads");
    records.iter().for_each(check_reencodes);
    let (mut log, opened) = RecordLog::open(path).expect("a log with a valid header opens");
    assert_eq!(opened.records_ok, records.len() as u64);
    assert_eq!(opened.corrupt, report.corrupt);
    assert_eq!(opened.torn_bytes, report.torn_bytes);
    let probe = probe();
    assert_eq!(log.append(&probe).unwrap(), records.len() as u64);
    drop(log);
    let (after, report) = read_all(path).unwrap();
    assert_eq!(report.torn_bytes, 0);
    assert_eq!(report.corrupt, opened.corrupt);
    assert_eq!(after.len(), records.len() + 1);
    assert!(after.iter().zip(&records).all(|(a, b)| same(a, b)));
    assert!(same(after.last().unwrap(), &probe));

    // 4. The bytes after a version 1 or 2 header (an older device's log): read only,
    // since opening such a log for appending moves it aside.
    for version in [1, 2] {
        let mut file = MAGIC.to_vec();
        file.push(version);
        file.extend_from_slice(data);
        std::fs::write(path, &file).unwrap();
        let (records, _) = read_all(path).expect("an older log reads");
        records.iter().for_each(check_reencodes);
    }
});
