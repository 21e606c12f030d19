//! Crash safety of the frames archive with real processes, as for the records log: a writer
//! killed with SIGKILL at random moments never leaves a partial frame under a frame's name,
//! never loses a frame it confirmed, and the next open removes its temporary file.
//!
//! The writer is this test binary itself, re-run with [`CHILD_ENV`] naming the folder: its
//! `writer_child` test keeps frames and prints `kept N` after each `keep` returns.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use image::RgbImage;
use ma_device::archive::{FrameArchive, FrameContent};
use ma_device::run_loop::pixel_hash;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Folder the child writes into; unset in a normal test run.
const CHILD_ENV: &str = "MA_ARCHIVE_CRASH_CHILD";
const ROUNDS: usize = 25;

/// Frame `i`: noisy pixels (a PNG of a few hundred KB, so a write takes a while).
fn frame(i: u64) -> RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(i);
    RgbImage::from_fn(400, 300, |_, _| image::Rgb(rng.random()))
}

/// The writer (runs only when re-invoked with [`CHILD_ENV`]).
#[test]
fn writer_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let mut out = std::io::stdout().lock();
    writeln!(out).unwrap();
    let (mut archive, _) = FrameArchive::open(Path::new(&dir), u64::MAX).unwrap();
    let start: u64 = std::env::var("MA_ARCHIVE_CRASH_START")
        .unwrap()
        .parse()
        .unwrap();
    for i in start.. {
        let img = frame(i);
        archive
            .keep(&pixel_hash(&img), FrameContent::Pixels(&img))
            .unwrap();
        writeln!(out, "kept {i}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn killed_writers_leave_only_whole_frames() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut confirmed = Vec::new();
    let mut next = 0u64;
    for _ in 0..ROUNDS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["writer_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .env("MA_ARCHIVE_CRASH_START", next.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(n) = line.strip_prefix("kept ") {
                    let _ = tx.send(n.parse::<u64>().unwrap());
                }
            }
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(5..80)));
        child.kill().unwrap();
        child.wait().unwrap();
        confirmed.extend(rx.try_iter());
        next = confirmed.last().map_or(next, |&n| n + 1);

        // Reopened: the temporary file (if any) is gone, every frame file is whole (its
        // pixels hash to its name), every confirmed frame is there.
        let (archive, report) = FrameArchive::open(dir.path(), u64::MAX).unwrap();
        assert!(report.removed_incomplete <= 1, "{report:?}");
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(!name.starts_with('.'), "temporary file left: {name}");
            let img = image::open(&path).unwrap().to_rgb8();
            assert_eq!(format!("{}.png", pixel_hash(&img)), name);
        }
        for &i in &confirmed {
            assert!(
                dir.path()
                    .join(format!("{}.png", pixel_hash(&frame(i))))
                    .is_file(),
                "confirmed frame {i} lost"
            );
        }
        assert!(archive.len() >= confirmed.len());
    }
    assert!(!confirmed.is_empty(), "the writer never got a frame out");
}
