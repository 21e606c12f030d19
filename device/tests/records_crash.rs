//! Crash safety of the records log with real processes: a writer killed with SIGKILL at
//! random moments never loses a record it confirmed, and nothing damaged is ever read back;
//! a writer that hits a file size limit (a full disk, for the writer) gets clear errors and
//! leaves a log that reopens cleanly.
//!
//! The writer is this test binary itself, re-run with [`CHILD_ENV`] naming the log: its
//! `writer_child` test appends records and prints `saved N` after each `append` returns
//! (after `fdatasync`). A process kill leaves the page cache intact, so the tests also cut
//! the unconfirmed tail of the file at random points (what a power cut during that write
//! can leave) and extend it with zeros (blocks allocated but never written).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ma_device::records::{
    HEADER_LEN, ImageHash, Record, RecordBox, RecordDetection, RecordLog, encode_frame, read_all,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Path of the log the child writes; unset in a normal test run.
const CHILD_ENV: &str = "MA_RECORDS_CRASH_CHILD";
/// Optional RLIMIT_FSIZE for the child, in bytes.
const LIMIT_ENV: &str = "MA_RECORDS_CRASH_FSIZE";
/// Kill rounds.
const ROUNDS: usize = 200;
/// Longest wait before a kill once the log is open: a few dozen appends.
const MAX_KILL_DELAY: Duration = Duration::from_millis(60);

/// Record number `i`: deterministic, so a reader can tell whether it is intact. Sizes
/// vary from about 100 bytes to about 10 KB (every 16th), so some frames cross pages.
fn record(i: u64) -> Record {
    let n = if i % 16 == 15 { 400 } else { i % 23 };
    Record {
        time_unix_ms: 1_714_566_896_000 + 40 * i as i64,
        frame: i,
        source: format!("camera:/dev/video0#{i}"),
        image_sha256: ImageHash::of(&i.to_le_bytes()),
        width: 1500,
        height: 1152,
        detections: (0..n)
            .map(|k| RecordDetection {
                x: (i * 31 + k) as f64 * 0.5,
                y: k as f64 * 1.25,
                score: 1.0 / (k as f64 + 1.0),
            })
            .collect(),
        refer: n > 0,
        ma_count: n as u32,
        model_version: "crash-test".into(),
        board: "desktop-sim".into(),
        elapsed_ms: i as f32,
        error: (i % 9 == 4).then(|| format!("frame {i} failed")),
        refer_score: (i % 9 != 4).then(|| (i % 100) as f64 / 100.0),
        attention_boxes: (0..(i % 5))
            .map(|k| RecordBox {
                x0: k as f64 * 60.0,
                y0: 0.0,
                x1: k as f64 * 60.0 + 60.0,
                y1: 60.0,
                weight: 0.5,
            })
            .collect(),
        frame_file: (i % 9 != 4).then(|| format!("{:064x}.png", i)),
    }
}

/// Bytes the log holds after records `0..n` (written in one go, without damage).
fn log_len(n: u64) -> u64 {
    HEADER_LEN as u64 + (0..n).map(|i| frame_len(i) as u64).sum::<u64>()
}

fn frame_len(i: u64) -> usize {
    encode_frame(&record(i)).unwrap().len()
}

/// Offset just after the `n`th record's terminator in the log at `path`, counting only
/// non-empty frames (zero bytes between frames carry nothing).
fn end_of_record(path: &Path, n: u64) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let mut seen = 0;
    let mut chunk_len = 0;
    let mut pos = HEADER_LEN;
    while seen < n {
        if bytes[pos] == 0 {
            seen += u64::from(chunk_len > 0);
            chunk_len = 0;
        } else {
            chunk_len += 1;
        }
        pos += 1;
    }
    pos as u64
}

/// The writer (runs only when re-invoked with [`CHILD_ENV`]). Prints `open OK CORRUPT
/// TORN`, then `saved N` after each confirmed append or `error MESSAGE` after a failed
/// one; stops after 5 failures in a row (or never, until killed).
#[test]
fn writer_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    if let Some(limit) = std::env::var_os(LIMIT_ENV) {
        let limit: u64 = limit.to_str().unwrap().parse().unwrap();
        let rlim = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        // SAFETY: plain syscalls on this process. With SIGXFSZ ignored, a write past the
        // limit fails with EFBIG (or is short) instead of killing the process.
        unsafe {
            assert_eq!(libc::signal(libc::SIGXFSZ, libc::SIG_IGN), libc::SIG_DFL);
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &rlim), 0);
        }
    }
    let mut out = std::io::stdout().lock();
    // End libtest's "test writer_child ... " line: every line below starts a line.
    writeln!(out).unwrap();
    let (mut log, report) = match RecordLog::open(&path) {
        Ok(opened) => opened,
        Err(e) => {
            writeln!(out, "open-error {e:#}").unwrap();
            out.flush().unwrap();
            std::process::exit(3);
        }
    };
    writeln!(
        out,
        "open {} {} {}",
        report.records_ok,
        report.corrupt.len(),
        report.torn_bytes
    )
    .unwrap();
    out.flush().unwrap();
    let mut failures = 0;
    while failures < 5 {
        let i = log.next_index();
        match log.append(&record(i)) {
            Ok(index) => {
                assert_eq!(index, i);
                failures = 0;
                writeln!(out, "saved {index}").unwrap();
            }
            Err(e) => {
                failures += 1;
                writeln!(out, "error {}", format!("{e:#}").replace('\n', " ")).unwrap();
            }
        }
        out.flush().unwrap();
    }
    std::process::exit(0);
}

/// What a child printed.
#[derive(Debug, Default)]
struct ChildOutput {
    /// `(records_ok, corrupt, torn_bytes)` from its open.
    open: Option<(u64, u64, u64)>,
    open_error: Option<String>,
    saved: Vec<u64>,
    errors: Vec<String>,
}

/// Parses everything the child prints; `opened` gets a message when the log is open.
fn parse_output(stdout: impl BufRead, opened: Option<mpsc::Sender<()>>) -> ChildOutput {
    let mut out = ChildOutput::default();
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("open ") {
            let v: Vec<u64> = rest.split(' ').map(|s| s.parse().unwrap()).collect();
            out.open = Some((v[0], v[1], v[2]));
            if let Some(tx) = &opened {
                let _ = tx.send(());
            }
        } else if let Some(rest) = line.strip_prefix("open-error ") {
            out.open_error = Some(rest.to_string());
        } else if let Some(rest) = line.strip_prefix("saved ") {
            out.saved.push(rest.parse().unwrap());
        } else if let Some(rest) = line.strip_prefix("error ") {
            out.errors.push(rest.to_string());
        }
    }
    out
}

fn writer(path: &Path, fsize_limit: Option<u64>) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["writer_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(limit) = fsize_limit {
        cmd.env(LIMIT_ENV, limit.to_string());
    }
    cmd
}

/// Every record in the file is `record(k)` at position `k`, nothing was skipped, and all
/// `confirmed` records are there. Returns how many records the file holds and the length of
/// its torn tail.
fn check_log(path: &Path, confirmed: u64, context: &str) -> (u64, u64) {
    let (records, report) = read_all(path).unwrap();
    assert!(report.corrupt.is_empty(), "{context}: {report}");
    assert!(
        records.len() as u64 >= confirmed,
        "{context}: {} records, {confirmed} were confirmed ({report})",
        records.len()
    );
    for (k, r) in records.iter().enumerate() {
        assert_eq!(*r, record(k as u64), "{context}: record {k} differs");
    }
    (records.len() as u64, report.torn_bytes)
}

#[test]
fn killed_writer_never_loses_a_confirmed_record() {
    let seed = std::env::var("MA_RECORDS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_240_501u64);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("records.log");
    let started = Instant::now();
    // Records confirmed so far (indices 0..confirmed), and records in the file.
    let (mut confirmed, mut in_file) = (0u64, 0u64);
    let (mut killed_before_open, mut killed_appending, mut torn_found) = (0, 0, 0);
    let (mut cut_tails, mut zero_tails, mut unconfirmed_kept) = (0, 0, 0);
    for round in 0..ROUNDS {
        let context = format!("round {round} (seed {seed})");
        let mut child = writer(&path, None).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        // Read as it comes, so the child never blocks on a full pipe.
        let (opened_tx, opened) = mpsc::channel();
        let reader =
            std::thread::spawn(move || parse_output(BufReader::new(stdout), Some(opened_tx)));
        // Some rounds kill during start-up (opening or creating the file); the others once
        // the log is open, while appending. Waiting for the open keeps the mix the same on
        // a busy machine, where start-up takes longer.
        if rng.random_ratio(1, 8) {
            std::thread::sleep(MAX_KILL_DELAY.mul_f64(rng.random::<f64>() / 10.0));
        } else {
            let _ = opened.recv_timeout(Duration::from_secs(30));
            std::thread::sleep(MAX_KILL_DELAY.mul_f64(rng.random::<f64>()));
        }
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "{context}: the writer stopped by itself ({status})"
        );
        let out = reader.join().unwrap();
        assert!(out.open_error.is_none(), "{context}: {:?}", out.open_error);
        assert!(out.errors.is_empty(), "{context}: {:?}", out.errors);

        match out.open {
            None => killed_before_open += 1,
            Some((ok, corrupt, torn)) => {
                // The reopen found exactly what the last check read, and no damage other
                // than a torn tail.
                assert_eq!((ok, corrupt), (in_file, 0), "{context}: open");
                torn_found += u64::from(torn > 0);
                // Indices continue after the records found, one by one.
                let expected: Vec<u64> = (ok..ok + out.saved.len() as u64).collect();
                assert_eq!(out.saved, expected, "{context}: saved indices");
                if !out.saved.is_empty() {
                    killed_appending += 1;
                }
            }
        }
        if let Some(&last) = out.saved.last() {
            confirmed = confirmed.max(last + 1);
        }
        let (held, torn) = check_log(&path, confirmed, &context);
        // Besides what was there before, at most the record being appended when the kill
        // came is there unconfirmed.
        let before = confirmed.max(in_file);
        assert!(
            held <= before + 1,
            "{context}: {held} records, {confirmed} confirmed, {in_file} before the round"
        );
        unconfirmed_kept += u64::from(held > before);

        // A power cut during the unconfirmed write may keep any prefix of it, or leave
        // blocks of zeros where the file had grown.
        let len = std::fs::metadata(&path).map_or(0, |m| m.len());
        let confirmed_end = if len == 0 {
            0
        } else {
            end_of_record(&path, confirmed)
        };
        if len > confirmed_end && rng.random_ratio(1, 3) {
            let cut = rng.random_range(confirmed_end..len);
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            file.set_len(cut).unwrap();
            cut_tails += 1;
        } else if confirmed > 0 && torn == 0 && rng.random_ratio(1, 8) {
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            file.set_len(len + rng.random_range(1..9000)).unwrap();
            zero_tails += 1;
        }
        in_file = check_log(&path, confirmed, &context).0;
    }
    // A last clean open: everything confirmed is there.
    let (log, report) = RecordLog::open(&path).unwrap();
    assert!(report.corrupt.is_empty(), "{report}");
    assert!(log.next_index() >= confirmed);
    println!(
        "{ROUNDS} kill rounds in {:.1} s (seed {seed}): {confirmed} records confirmed, \
         {killed_before_open} kills before the log was open, {killed_appending} while appending, \
         {unconfirmed_kept} unconfirmed records found complete, {torn_found} torn tails cut at \
         reopen; tails cut {cut_tails} times and zero-extended {zero_tails} times",
        started.elapsed().as_secs_f64()
    );
    assert!(
        killed_appending >= ROUNDS as u64 / 2,
        "too few kills hit appends"
    );
    assert!(torn_found > 0);
}

#[test]
fn file_size_limit_gives_clear_errors_and_a_clean_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("records.log");
    // Room for the header and about 15 records: the 16th (index 15) is the first large one,
    // so the limit falls inside a frame.
    let limit = log_len(15) + 4000;
    let child = writer(&path, Some(limit)).spawn().unwrap();
    let output = child.wait_with_output().unwrap();
    let out = parse_output(BufReader::new(&output.stdout[..]), None);
    assert_eq!(output.status.code(), Some(0), "{out:?}");
    assert_eq!(out.open, Some((0, 0, 0)));
    assert_eq!(out.saved, (0..15).collect::<Vec<_>>());
    assert_eq!(out.errors.len(), 5, "{out:?}");
    for e in &out.errors {
        assert!(
            e.contains("records.log") && e.contains("not saved") && e.contains("disk full"),
            "{e}"
        );
    }
    println!("first error at the size limit: {}", out.errors[0]);
    // The partial frame was cut off: the file ends after the last confirmed record.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), log_len(15));
    let (records, report) = read_all(&path).unwrap();
    assert!(report.is_clean(), "{report}");
    assert_eq!(records, (0..15).map(record).collect::<Vec<_>>());

    // Without the limit the same log takes more records.
    let (mut log, report) = RecordLog::open(&path).unwrap();
    assert!(report.is_clean() && report.records_ok == 15, "{report}");
    assert_eq!(log.append(&record(15)).unwrap(), 15);
    drop(log);
    assert_eq!(check_log(&path, 16, "after the limit"), (16, 0));
}

#[test]
fn file_size_limit_below_the_header_fails_to_open_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("records.log");
    let child = writer(&path, Some(3)).spawn().unwrap();
    let output = child.wait_with_output().unwrap();
    let out = parse_output(BufReader::new(&output.stdout[..]), None);
    assert_eq!(output.status.code(), Some(3), "{out:?}");
    let err = out.open_error.unwrap();
    assert!(
        err.contains("header") && err.contains("records.log"),
        "{err}"
    );
    println!("open error with a 3-byte limit: {err}");
    // A partial header is a crash while creating the file: reopened as a new log.
    let (mut log, report) = RecordLog::open(&path).unwrap();
    assert!(report.created && report.records_ok == 0, "{report}");
    assert_eq!(log.append(&record(0)).unwrap(), 0);
    drop(log);
    assert_eq!(check_log(&path, 1, "after a failed creation"), (1, 0));
}

/// Writes the seed inputs of the `records` fuzz target (device/fuzz/corpus/records/):
/// `cargo test -p ma-device --test records_crash -- --ignored regenerate_fuzz_seeds`.
#[test]
#[ignore]
fn regenerate_fuzz_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/records");
    std::fs::create_dir_all(&dir).unwrap();
    let frame = |i: u64| encode_frame(&record(i)).unwrap();
    let body = |ids: &[u64]| ids.iter().flat_map(|&i| frame(i)).collect::<Vec<u8>>();
    let f0 = frame(0);
    // One frame without its terminator (what decode_frame gets).
    std::fs::write(dir.join("frame-0"), &f0[..f0.len() - 1]).unwrap();
    let f4 = frame(4);
    std::fs::write(dir.join("frame-4-error"), &f4[..f4.len() - 1]).unwrap();
    // Log bodies: clean, with a torn tail, with a damaged frame, with resync zeros.
    std::fs::write(dir.join("body-3"), body(&[0, 1, 2])).unwrap();
    let mut torn = body(&[0, 1]);
    torn.extend_from_slice(&frame(2)[..10]);
    std::fs::write(dir.join("body-torn"), torn).unwrap();
    let mut damaged = body(&[0, 1, 2]);
    let mid = f0.len() + 5;
    damaged[mid] ^= 0x20;
    std::fs::write(dir.join("body-damaged"), damaged).unwrap();
    let mut zeros = body(&[3]);
    zeros.extend([0, 0, 0]);
    zeros.extend(body(&[5]));
    std::fs::write(dir.join("body-zeros"), zeros).unwrap();
    // A whole file with its header.
    let mut file = ma_device::records::MAGIC.to_vec();
    file.push(ma_device::records::FORMAT_VERSION);
    file.extend(body(&[0, 6]));
    std::fs::write(dir.join("file-2"), file).unwrap();
}
