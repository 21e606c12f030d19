//! The records log on disk: round trips, crash damage (torn tails, corrupt frames), bad
//! headers and the export formats.

use std::fs;
use std::path::{Path, PathBuf};

use ma_device::records::{
    self, FORMAT_VERSION, HEADER_LEN, ImageHash, MAGIC, Record, RecordBox, RecordDetection,
    RecordLog,
};

fn record(i: u64) -> Record {
    Record {
        time_unix_ms: 1_714_566_896_000 + 1000 * i as i64,
        frame: i,
        source: if i.is_multiple_of(3) {
            "camera:/dev/video0".to_string()
        } else {
            format!("image_{i:03}.png")
        },
        image_sha256: ImageHash::of(format!("image bytes {i}").as_bytes()),
        width: 1500 + i as u32,
        height: 1152,
        detections: (0..(i % 7))
            .map(|k| RecordDetection {
                x: 100.0 + k as f64 * 13.25,
                y: 200.5 - k as f64,
                score: 1.0 / (k as f64 + 1.5),
            })
            .collect(),
        refer: i % 4 == 1,
        ma_count: (i % 7) as u32,
        model_version: "ma-cascade-2024.05".to_string(),
        board: "desktop-sim".to_string(),
        elapsed_ms: 150.0 + i as f32 * 0.5,
        error: if i % 11 == 10 {
            Some(format!("frame {i}: truncated JPEG"))
        } else {
            None
        },
        refer_score: (i % 11 != 10).then_some(0.05 * (i % 20) as f64),
        attention_boxes: (0..if i % 11 == 10 { 0 } else { i % 5 })
            .map(|k| RecordBox {
                x0: 50.0 * k as f64,
                y0: 40.0,
                x1: 50.0 * k as f64 + 75.5,
                y1: 115.5,
                weight: 1.0 / (k as f64 + 2.0),
            })
            .collect(),
        frame_file: (i % 11 != 10).then(|| format!("{:064x}.jpg", i)),
    }
}

fn temp_log() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("records.log");
    (dir, path)
}

/// Writes `n` records; returns the file length after each (the frame boundaries).
fn write_records(path: &Path, n: u64) -> Vec<u64> {
    let (mut log, report) = RecordLog::open(path).unwrap();
    assert!(report.created);
    let mut ends = vec![fs::metadata(path).unwrap().len()];
    for i in 0..n {
        assert_eq!(log.append(&record(i)).unwrap(), i);
        ends.push(fs::metadata(path).unwrap().len());
    }
    ends
}

#[test]
fn round_trip_of_many_records() {
    let (_dir, path) = temp_log();
    write_records(&path, 300);
    let (records, report) = records::read_all(&path).unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.records_ok, 300);
    assert_eq!(records, (0..300).map(record).collect::<Vec<_>>());

    // Reopening continues the numbering and keeps everything.
    let (mut log, report) = RecordLog::open(&path).unwrap();
    assert!(report.is_clean() && !report.created, "{report}");
    assert_eq!(log.next_index(), 300);
    assert_eq!(log.append(&record(300)).unwrap(), 300);
    drop(log);
    let (records, _) = records::read_all(&path).unwrap();
    assert_eq!(records.len(), 301);
    assert_eq!(records[300], record(300));
}

#[test]
fn header_is_magic_and_version() {
    let (_dir, path) = temp_log();
    write_records(&path, 1);
    let bytes = fs::read(&path).unwrap();
    assert_eq!(&bytes[..5], MAGIC);
    assert_eq!(bytes[5], FORMAT_VERSION);
    assert_eq!(HEADER_LEN, 6);
    assert_eq!(bytes.last(), Some(&0));
}

#[test]
fn torn_tail_at_every_offset_is_cut_off() {
    let (_dir, path) = temp_log();
    let ends = write_records(&path, 5);
    let full = fs::read(&path).unwrap();
    let last_start = ends[4] as usize;
    assert_eq!(full.len() as u64, ends[5]);
    for cut in last_start..full.len() {
        fs::write(&path, &full[..cut]).unwrap();
        let torn = (cut - last_start) as u64;

        let (records, report) = records::read_all(&path).unwrap();
        assert_eq!(records, (0..4).map(record).collect::<Vec<_>>(), "cut {cut}");
        assert_eq!(report.torn_bytes, torn, "cut {cut}");
        assert!(report.corrupt.is_empty(), "cut {cut}: {report}");
        // Reading does not modify the file.
        assert_eq!(fs::metadata(&path).unwrap().len(), cut as u64);

        let (mut log, report) = RecordLog::open(&path).unwrap();
        assert_eq!(report.torn_bytes, torn, "cut {cut}");
        assert_eq!(report.records_ok, 4);
        assert_eq!(fs::metadata(&path).unwrap().len(), last_start as u64);
        assert_eq!(log.append(&record(99)).unwrap(), 4);
        drop(log);

        let (records, report) = records::read_all(&path).unwrap();
        assert!(report.is_clean(), "cut {cut}: {report}");
        assert_eq!(records.len(), 5);
        assert_eq!(records[4], record(99));
    }
}

/// Changes one byte without making it 0x00 (which would also split the frame).
fn flip(byte: u8) -> u8 {
    if byte ^ 0x10 != 0 {
        byte ^ 0x10
    } else {
        byte ^ 0x20
    }
}

#[test]
fn corrupt_middle_frame_is_skipped_and_reported() {
    let (_dir, path) = temp_log();
    let ends = write_records(&path, 5);
    let mut bytes = fs::read(&path).unwrap();
    let (start, end) = (ends[2] as usize, ends[3] as usize);
    let mid = (start + end) / 2;
    bytes[mid] = flip(bytes[mid]);
    fs::write(&path, &bytes).unwrap();

    let (records, report) = records::read_all(&path).unwrap();
    let expected: Vec<Record> = [0, 1, 3, 4].into_iter().map(record).collect();
    assert_eq!(records, expected);
    assert_eq!(report.records_ok, 4);
    assert_eq!(report.corrupt_skipped(), 1, "{report}");
    let c = &report.corrupt[0];
    assert_eq!((c.frame, c.offset), (2, start as u64));
    assert_eq!(c.len, (end - start - 1) as u64);
    assert_eq!(report.torn_bytes, 0);
    assert!(report.to_string().contains("frame 2"), "{report}");

    // The writer reports it too, leaves it in place and appends after it.
    let (mut log, report) = RecordLog::open(&path).unwrap();
    assert_eq!(report.corrupt_skipped(), 1);
    assert_eq!(fs::metadata(&path).unwrap().len(), bytes.len() as u64);
    assert_eq!(log.append(&record(5)).unwrap(), 4);
    drop(log);
    let (records, _) = records::read_all(&path).unwrap();
    assert_eq!(records.last(), Some(&record(5)));
    assert_eq!(records.len(), 5);
}

/// A log damaged all over (200000 garbage frames) is summarised in a short warning, not
/// described frame by frame (that was a 12 MB line at every start of `run`).
#[test]
fn a_badly_damaged_log_gives_a_short_report() {
    let (_dir, path) = temp_log();
    write_records(&path, 2);
    let mut bytes = fs::read(&path).unwrap();
    let garbage_start = bytes.len() as u64;
    for _ in 0..200_000 {
        bytes.extend_from_slice(b"\x05junk\x00");
    }
    fs::write(&path, &bytes).unwrap();
    let (records, report) = records::read_all(&path).unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(report.corrupt_skipped(), 200_000);
    let text = report.to_string();
    assert!(text.len() < 600, "{} bytes: {text}", text.len());
    assert!(
        text.contains("200000 corrupt frames skipped")
            && text.contains(&format!(
                "between bytes {garbage_start} and {}",
                bytes.len() - 1
            ))
            && text.contains("and 199997 more"),
        "{text}"
    );
}

#[test]
fn every_single_byte_flip_is_caught() {
    let (_dir, path) = temp_log();
    let ends = write_records(&path, 3);
    let clean = fs::read(&path).unwrap();
    let (start, end) = (ends[1] as usize, ends[2] as usize - 1);
    for i in start..end {
        let mut bytes = clean.clone();
        bytes[i] = flip(bytes[i]);
        fs::write(&path, &bytes).unwrap();
        let (records, report) = records::read_all(&path).unwrap();
        assert_eq!(records, vec![record(0), record(2)], "byte {i}");
        assert_eq!(report.corrupt_skipped(), 1, "byte {i}: {report}");
    }
}

#[test]
fn zero_byte_inside_a_frame_loses_only_that_frame() {
    let (_dir, path) = temp_log();
    let ends = write_records(&path, 4);
    let mut bytes = fs::read(&path).unwrap();
    let mid = (ends[1] + ends[2]) as usize / 2;
    bytes[mid] = 0;
    fs::write(&path, &bytes).unwrap();
    let (records, report) = records::read_all(&path).unwrap();
    assert_eq!(records, vec![record(0), record(2), record(3)]);
    assert!(report.corrupt_skipped() >= 1, "{report}");
}

#[test]
fn wrong_header_is_refused_naming_the_file() {
    let (_dir, path) = temp_log();
    fs::write(&path, b"NOTMAREC and more").unwrap();
    for err in [
        format!("{:#}", RecordLog::open(&path).unwrap_err()),
        format!("{:#}", records::read_all(&path).unwrap_err()),
    ] {
        assert!(err.contains("records.log"), "{err}");
        assert!(err.contains("not an ma-device records log"), "{err}");
    }
    // Refused, not repaired: the file is untouched.
    assert_eq!(fs::read(&path).unwrap(), b"NOTMAREC and more");

    let mut other_version = MAGIC.to_vec();
    other_version.push(FORMAT_VERSION + 1);
    fs::write(&path, &other_version).unwrap();
    for err in [
        format!("{:#}", RecordLog::open(&path).unwrap_err()),
        format!("{:#}", records::read_all(&path).unwrap_err()),
    ] {
        assert!(err.contains("records.log"), "{err}");
        assert!(
            err.contains(&format!("version {}", FORMAT_VERSION + 1)),
            "{err}"
        );
    }
    assert_eq!(fs::read(&path).unwrap(), other_version);
}

#[test]
fn empty_missing_and_partial_header_files() {
    let (dir, path) = temp_log();
    // Missing: readers fail naming it; the writer creates it (and its folders).
    let err = format!("{:#}", records::read_all(&path).unwrap_err());
    assert!(err.contains("records.log"), "{err}");
    let nested = dir.path().join("a/b/records.log");
    let (mut log, report) = RecordLog::open(&nested).unwrap();
    assert!(report.created && report.is_clean());
    log.append(&record(0)).unwrap();
    drop(log);
    assert_eq!(records::read_all(&nested).unwrap().0, vec![record(0)]);

    // Zero-length (crash right after creation): no records; the writer adds the header.
    fs::write(&path, b"").unwrap();
    let (records, report) = records::read_all(&path).unwrap();
    assert!(records.is_empty() && report.is_clean());
    let (mut log, report) = RecordLog::open(&path).unwrap();
    assert!(report.created);
    log.append(&record(1)).unwrap();
    drop(log);
    assert_eq!(records::read_all(&path).unwrap().0, vec![record(1)]);

    // Header only.
    let (_dir2, path2) = temp_log();
    drop(RecordLog::open(&path2).unwrap());
    assert_eq!(fs::metadata(&path2).unwrap().len(), HEADER_LEN as u64);
    let (records, report) = records::read_all(&path2).unwrap();
    assert!(records.is_empty() && report.is_clean());

    // A partial header is a torn creation: rewritten.
    fs::write(&path, &MAGIC[..3]).unwrap();
    let (_, report) = records::read_all(&path).unwrap();
    assert_eq!(report.torn_bytes, 3);
    let (mut log, report) = RecordLog::open(&path).unwrap();
    assert_eq!(report.torn_bytes, 3);
    log.append(&record(2)).unwrap();
    drop(log);
    assert_eq!(records::read_all(&path).unwrap().0, vec![record(2)]);
}

#[test]
fn record_with_an_error_round_trips() {
    let (_dir, path) = temp_log();
    let failed = Record {
        width: 0,
        height: 0,
        detections: vec![],
        ma_count: 0,
        error: Some("unreadable image: truncated JPEG (\"x\", line\nbreak)".to_string()),
        ..record(7)
    };
    let (mut log, _) = RecordLog::open(&path).unwrap();
    log.append(&record(1)).unwrap();
    log.append(&failed).unwrap();
    drop(log);
    let (records, _) = records::read_all(&path).unwrap();
    assert_eq!(records, vec![record(1), failed.clone()]);
    let summary = records::list_summary(&records);
    assert_eq!(summary.lines().count(), 2);
    assert!(
        summary.lines().nth(1).unwrap().contains("FAILED"),
        "{summary}"
    );
    assert!(summary.contains("2024-05-01T"), "{summary}");
}

#[test]
fn reader_works_while_a_writer_has_the_log_open() {
    let (_dir, path) = temp_log();
    let (mut log, _) = RecordLog::open(&path).unwrap();
    log.append(&record(0)).unwrap();
    assert_eq!(records::read_all(&path).unwrap().0, vec![record(0)]);
    let err = format!("{:#}", RecordLog::open(&path).unwrap_err());
    assert!(err.contains("in use"), "{err}");
}

/// A minimal RFC 4180 parser for checking the CSV output.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = vec![];
    let mut row = vec![];
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    rows
}

#[test]
fn csv_export_quotes_and_formats() {
    let tricky = Record {
        source: "left eye, \"patient 7\".png".to_string(),
        error: Some("multi\nline".to_string()),
        ..record(3)
    };
    let records = vec![record(1), tricky.clone()];
    let mut out = Vec::new();
    records::to_csv(&records, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("\"left eye, \"\"patient 7\"\".png\""),
        "{text}"
    );
    let rows = parse_csv(&text);
    assert_eq!(rows.len(), 3, "{text}");
    assert_eq!(
        rows[0],
        [
            "time",
            "frame",
            "source",
            "sha256",
            "width",
            "height",
            "ma_count",
            "refer",
            "model_version",
            "board",
            "elapsed_ms",
            "error",
            "detections",
            "refer_score",
            "attention_boxes",
            "frame_file"
        ]
    );
    assert!(rows.iter().all(|r| r.len() == 16), "{rows:?}");
    let r1 = &rows[1];
    assert_eq!(r1[0], "2024-05-01T12:34:57.000Z");
    assert_eq!(r1[1], "1");
    assert_eq!(r1[3], record(1).image_sha256.to_string());
    assert_eq!(r1[7], "true");
    assert_eq!(r1[11], "");
    assert_eq!(r1[12], "100.00:200.50:0.6667");
    assert_eq!(rows[2][2], tricky.source);
    assert_eq!(rows[2][11], "multi\nline");
    assert_eq!(rows[2][12].split(';').count(), 3);
    assert_eq!(r1[13], "0.0500");
    assert_eq!(r1[14], "0.0:40.0:75.5:115.5:0.5000");
    assert_eq!(rows[2][14].split(';').count(), 3);
}

#[test]
fn jsonl_export_is_one_object_per_record() {
    let records: Vec<Record> = (0..12).map(record).collect();
    let mut out = Vec::new();
    records::to_jsonl(&records, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 12);
    for (line, r) in text.lines().zip(&records) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["image_sha256"], r.image_sha256.to_string());
        assert_eq!(v["frame"], r.frame);
        // JSON floats may come back one ulp off: compare detections approximately.
        let mut back: Record = serde_json::from_str(line).unwrap();
        assert_eq!(back.detections.len(), r.detections.len());
        for (a, b) in back.detections.iter().zip(&r.detections) {
            assert!((a.x - b.x).abs() < 1e-9 && (a.y - b.y).abs() < 1e-9);
            assert!((a.score - b.score).abs() < 1e-12);
        }
        back.detections = r.detections.clone();
        assert_eq!(&back, r);
    }
}

#[test]
fn streaming_reader_matches_read_all() {
    let (_dir, path) = temp_log();
    write_records(&path, 20);
    let mut seen = vec![];
    let report = records::read_each(&path, |r| {
        seen.push(r.frame);
        Ok(())
    })
    .unwrap();
    assert_eq!(report.records_ok, 20);
    assert_eq!(seen, (0..20).collect::<Vec<_>>());
}
