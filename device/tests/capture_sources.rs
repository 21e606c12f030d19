//! Frame sources without hardware: recorded camera buffers (tests/capture_data/),
//! scripted camera failures on a fake clock, folder replay and synthetic frames.
//!
//! The recorded buffers are made by `regenerate_capture_data` below (run it with
//! `cargo test -p ma-device --test capture_sources -- --ignored`); see
//! tests/capture_data/README.md.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use image::{ImageEncoder, Rgb, RgbImage, codecs::jpeg::JpegEncoder};
use ma_device::capture::camera::{CameraConfig, CameraSource};
use ma_device::capture::raw::scan_markers;
use ma_device::capture::recorded::Call;
use ma_device::capture::trigger::TriggerInput;
use ma_device::capture::{
    FakeClock, FolderSource, Frame, FrameEvent, FrameSource, PixelFormat, RawFrame,
    RecordedCapture, SourceError, SourceState, SyntheticSource, Trigger, decode_raw,
};
use ma_synthetic::{SyntheticParams, generate};

const W: u32 = 64;
const H: u32 = 48;
/// Row pitch of the padded YUYV recording (128 bytes of pixels + 32 of padding).
const PADDED_STRIDE: u32 = 160;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/capture_data")
}

/// The known picture in every recording: eight colour bars over a two-way gradient.
/// Colours change only at even x, so 4:2:2 chroma sharing loses nothing.
fn pattern() -> RgbImage {
    const BARS: [[u8; 3]; 8] = [
        [235, 235, 235],
        [230, 220, 30],
        [30, 200, 210],
        [40, 190, 40],
        [200, 40, 190],
        [210, 30, 40],
        [30, 40, 200],
        [20, 20, 20],
    ];
    RgbImage::from_fn(W, H, |x, y| {
        if y < H / 2 {
            Rgb(BARS[(x / (W / 8)) as usize])
        } else {
            let xe = x & !1;
            Rgb([
                (xe * 255 / (W - 1)) as u8,
                ((y - H / 2) * 255 / (H / 2 - 1)) as u8,
                128,
            ])
        }
    })
}

/// RGB to YUYV, BT.601 limited range, chroma averaged over each pixel pair; rows
/// `stride` bytes apart, padding filled with 0xEE so a decoder that reads it shows.
fn encode_yuyv(img: &RgbImage, stride: u32) -> Vec<u8> {
    let ycc = |p: &Rgb<u8>| {
        let [r, g, b] = p.0.map(i32::from);
        (
            ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16,
            ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128,
            ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128,
        )
    };
    let mut out = vec![0xEE; (stride * img.height()) as usize];
    for y in 0..img.height() {
        let row = &mut out[(y * stride) as usize..];
        for x in (0..img.width()).step_by(2) {
            let (y0, u0, v0) = ycc(img.get_pixel(x, y));
            let (y1, u1, v1) = ycc(img.get_pixel(x + 1, y));
            let i = (x * 2) as usize;
            row[i] = y0 as u8;
            row[i + 1] = ((u0 + u1 + 1) / 2) as u8;
            row[i + 2] = y1 as u8;
            row[i + 3] = ((v0 + v1 + 1) / 2) as u8;
        }
    }
    out
}

fn encode_jpeg(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, 90)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
    out
}

/// Remove every DHT (Huffman table) segment before the scan, as UVC cameras send MJPEG.
fn strip_dht(jpeg: &[u8]) -> Vec<u8> {
    let sos = scan_markers(jpeg).unwrap().sos;
    let mut out = jpeg[..2].to_vec();
    let mut i = 2;
    while i < sos {
        let len = u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
        if jpeg[i + 1] != 0xC4 {
            out.extend_from_slice(&jpeg[i..i + 2 + len]);
        }
        i += 2 + len;
    }
    out.extend_from_slice(&jpeg[sos..]);
    out
}

#[test]
#[ignore = "rewrites tests/capture_data; run by hand after changing the pattern"]
fn regenerate_capture_data() {
    let dir = data_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let img = pattern();
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).unwrap();
    write("pattern_64x48.yuyv", &encode_yuyv(&img, W * 2));
    write(
        "pattern_64x48_stride160.yuyv",
        &encode_yuyv(&img, PADDED_STRIDE),
    );
    let jpeg = encode_jpeg(&img);
    write("pattern_64x48.jpg", &jpeg);
    write("pattern_64x48_nodht.mjpg", &strip_dht(&jpeg));
    img.save(dir.join("pattern_64x48.png")).unwrap();
}

fn recorded(name: &str, format: PixelFormat, stride: u32) -> RawFrame {
    RawFrame::read_file(&data_dir().join(name), format, W, H, stride).unwrap()
}

fn yuyv_frame() -> RawFrame {
    recorded("pattern_64x48.yuyv", PixelFormat::Yuyv, 0)
}

fn mjpeg_frame() -> RawFrame {
    recorded("pattern_64x48_nodht.mjpg", PixelFormat::Mjpeg, 0)
}

/// Largest and mean absolute channel difference.
fn diff(a: &RgbImage, b: &RgbImage) -> (u8, f64) {
    assert_eq!(a.dimensions(), b.dimensions());
    let d: Vec<u8> = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| x.abs_diff(y))
        .collect();
    let max = d.iter().copied().max().unwrap();
    (
        max,
        d.iter().map(|&v| v as f64).sum::<f64>() / d.len() as f64,
    )
}

#[test]
fn recordings_are_what_the_generator_makes() {
    let reference = image::open(data_dir().join("pattern_64x48.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(reference, pattern(), "pattern changed: regenerate the data");
    assert_eq!(yuyv_frame().bytes, encode_yuyv(&pattern(), W * 2));
    let total: u64 = std::fs::read_dir(data_dir())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(total < 300_000, "capture_data is {total} bytes");
}

#[test]
fn yuyv_recording_decodes_to_the_pattern() {
    let (max, _) = diff(&decode_raw(&yuyv_frame()).unwrap(), &pattern());
    assert!(max <= 3, "YUYV round trip off by {max} levels");
}

#[test]
fn padded_yuyv_rows_decode_the_same() {
    let padded = recorded(
        "pattern_64x48_stride160.yuyv",
        PixelFormat::Yuyv,
        PADDED_STRIDE,
    );
    assert_eq!(padded.bytes.len(), (PADDED_STRIDE * H) as usize);
    assert_eq!(
        decode_raw(&padded).unwrap(),
        decode_raw(&yuyv_frame()).unwrap()
    );
    // Read as packed, the padding shifts the rows: the picture is wrong (but no panic).
    let mut misread = padded.clone();
    misread.stride = 0;
    let (max, _) = diff(&decode_raw(&misread).unwrap(), &pattern());
    assert!(max > 50);
}

#[test]
fn mjpeg_recordings_decode_with_and_without_huffman_tables() {
    let with = decode_raw(&recorded("pattern_64x48.jpg", PixelFormat::Mjpeg, 0)).unwrap();
    let stripped = mjpeg_frame();
    assert!(!scan_markers(&stripped.bytes).unwrap().has_dht);
    let without = decode_raw(&stripped).unwrap();
    // The inserted Annex K tables are the ones the encoder used: identical pixels.
    assert_eq!(with, without);
    let (max, mean) = diff(&without, &pattern());
    // Measured: mean 0.6, max 5 levels (quality 90).
    assert!(
        mean < 2.0 && max <= 16,
        "JPEG error mean {mean:.2}, max {max}"
    );
}

#[test]
fn bad_buffers_are_errors_not_panics() {
    let err = |f: RawFrame| format!("{:#}", decode_raw(&f).unwrap_err());
    let mut short = yuyv_frame();
    short.bytes.truncate(6000);
    let e = err(short);
    assert!(e.contains("6000 bytes") && e.contains("needs 6144"), "{e}");
    let mut wrong_size = yuyv_frame();
    wrong_size.height = 96;
    assert!(err(wrong_size).contains("needs 12288"));
    let mut truncated = mjpeg_frame();
    truncated.bytes.truncate(truncated.bytes.len() / 2);
    assert!(err(truncated).contains("truncated"));
    let mut garbage = mjpeg_frame();
    let n = garbage.bytes.len();
    for b in &mut garbage.bytes[n / 2..n - 2] {
        *b = 0x5A;
    }
    // Corrupt entropy data either fails or decodes to a wrong picture; never panics.
    let _ = decode_raw(&garbage);
    let mut wrong_dims = mjpeg_frame();
    wrong_dims.width = 640;
    assert!(err(wrong_dims).contains("64x48"));
}

// ---- camera source on recorded buffers -------------------------------------------

#[derive(Debug, PartialEq)]
enum Ev {
    Frame(u64),
    Error,
    Idle,
    Exhausted,
}

fn camera(capture: RecordedCapture, trigger: TriggerInput, clock: &FakeClock) -> CameraSource {
    CameraSource::with_parts(
        Box::new(capture),
        trigger,
        CameraConfig::default(),
        Arc::new(clock.clone()),
    )
}

fn continuous() -> TriggerInput {
    TriggerInput::new(&Trigger::Interval(Duration::ZERO))
}

fn kind(event: &FrameEvent) -> Ev {
    match event {
        FrameEvent::Frame(f) => Ev::Frame(f.id),
        FrameEvent::Error(_) => Ev::Error,
        FrameEvent::Idle => Ev::Idle,
        FrameEvent::Exhausted => Ev::Exhausted,
    }
}

fn retry_in(state: &SourceState) -> Duration {
    match state {
        SourceState::CameraLost { retry_in, .. } | SourceState::TriggerFailed { retry_in, .. } => {
            *retry_in
        }
        other => panic!("not a failure state: {other}"),
    }
}

#[test]
fn camera_recovers_from_unplugging_with_growing_backoff() {
    let clock = FakeClock::new();
    // Reads 3, 4, 5 fail (unplugged); the 2nd and 3rd opens fail (still unplugged).
    let capture = RecordedCapture::new("/dev/video9", vec![yuyv_frame(), mjpeg_frame()])
        .fail_reads(3..6)
        .fail_opens(1..3);
    let calls = capture.call_log();
    let mut cam = camera(capture, continuous(), &clock);
    assert_eq!(cam.state(), SourceState::CameraStarting);

    let mut frames = Vec::new();
    let mut delays = Vec::new();
    let mut errors = Vec::new();
    let mut events = 0;
    while frames.len() < 5 {
        events += 1;
        assert!(events < 100, "no recovery");
        let before = clock.elapsed();
        let event = cam.next_frame();
        match event {
            FrameEvent::Frame(f) => {
                assert_eq!(cam.state(), SourceState::CameraOk);
                frames.push(f);
            }
            FrameEvent::Error(SourceError { origin, message }) => {
                assert_eq!(origin, "camera:/dev/video9");
                let state = cam.state();
                let text = state.to_string();
                assert!(text.starts_with("camera lost: No such device"), "{text}");
                assert!(message.contains("/dev/video9"), "{message}");
                delays.push(retry_in(&state));
                errors.push(message);
            }
            // Waiting always costs time: no busy loop.
            FrameEvent::Idle => assert!(clock.elapsed() > before),
            FrameEvent::Exhausted => panic!("a camera is never exhausted"),
        }
    }
    let ms = |v: u64| Duration::from_millis(v);
    assert_eq!(delays, [ms(500), ms(1000), ms(2000), ms(4000), ms(8000)]);
    assert!(errors[0].contains("cannot read a frame"), "{}", errors[0]);
    assert!(errors[1].contains("cannot open"), "{}", errors[1]);
    // Ids keep increasing across the reconnections; frames alternate YUYV and MJPEG,
    // and both decode to the pattern.
    assert_eq!(
        frames.iter().map(|f| f.id).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    for f in &frames {
        assert_eq!(f.source, "camera:/dev/video9");
        assert!(diff(&f.image, &pattern()).1 < 4.0);
    }
    // Each retry waited out its back-off: 15.5 s in all, and no extra attempts.
    assert_eq!(clock.elapsed(), ms(15_500));
    assert!(
        clock
            .sleeps()
            .iter()
            .all(|&d| d <= CameraConfig::default().wait_slice)
    );
    let calls = calls.lock().unwrap().clone();
    let opens = calls
        .iter()
        .filter(|c| matches!(c, Call::Open { .. }))
        .count();
    assert_eq!(opens, 6);
    assert_eq!(calls.iter().filter(|c| **c == Call::Close).count(), 3);
    // After recovery the back-off starts again at the beginning.
    let capture_state = cam.state();
    assert_eq!(capture_state, SourceState::CameraOk);
}

#[test]
fn backoff_is_capped_and_reset_after_a_frame() {
    let clock = FakeClock::new();
    let capture = RecordedCapture::new("/dev/video0", vec![yuyv_frame()])
        .fail_opens(0..7)
        .fail_reads(1..2);
    let mut cam = camera(capture, continuous(), &clock);
    let mut delays = Vec::new();
    loop {
        match cam.next_frame() {
            FrameEvent::Error(_) => delays.push(retry_in(&cam.state()).as_millis()),
            FrameEvent::Frame(f) => {
                assert_eq!(f.id, 0);
                break;
            }
            _ => {}
        }
    }
    assert_eq!(delays, [500, 1000, 2000, 4000, 8000, 8000, 8000]);
    // The next failure (read 1) starts from the initial back-off again.
    assert_eq!(kind(&cam.next_frame()), Ev::Error);
    assert_eq!(retry_in(&cam.state()), Duration::from_millis(500));
}

#[test]
fn a_corrupt_frame_is_skipped_without_reconnecting() {
    let clock = FakeClock::new();
    let mut bad = yuyv_frame();
    bad.bytes.truncate(100);
    let capture = RecordedCapture::new("/dev/video0", vec![yuyv_frame(), bad, yuyv_frame()]);
    let calls = capture.call_log();
    let mut cam = camera(capture, continuous(), &clock);
    assert_eq!(kind(&cam.next_frame()), Ev::Frame(0));
    match cam.next_frame() {
        FrameEvent::Error(SourceError { message: m, .. }) => assert!(
            m.contains("bad frame skipped") && m.contains("100 bytes"),
            "{m}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(cam.state(), SourceState::CameraOk);
    assert_eq!(kind(&cam.next_frame()), Ev::Frame(1));
    assert!(!calls.lock().unwrap().contains(&Call::Close));
    assert_eq!(clock.elapsed(), Duration::ZERO);
}

#[test]
fn interval_trigger_takes_frames_on_schedule() {
    let clock = FakeClock::new();
    let capture = RecordedCapture::new("/dev/video0", vec![mjpeg_frame()])
        .with_read_time(clock.clone(), Duration::from_millis(100));
    let trigger = TriggerInput::new(&Trigger::Interval(Duration::from_secs(2)));
    let mut cam = camera(capture, trigger, &clock);
    let mut times = Vec::new();
    let mut idles = 0;
    while times.len() < 4 {
        match cam.next_frame() {
            FrameEvent::Frame(Frame { captured_at, .. }) => {
                times.push(captured_at.duration_since(clock.wall_start()).unwrap())
            }
            FrameEvent::Idle => idles += 1,
            other => panic!("{other:?}"),
        }
    }
    let ms = Duration::from_millis;
    assert_eq!(times, [ms(100), ms(2100), ms(4100), ms(6100)]);
    // 1.9 s between frames in 0.5 s slices: 3 idle returns per gap, then the call
    // that sleeps the last 0.4 s fires.
    assert_eq!(idles, 3 * 3);
    assert!(cam.describe().contains("every 2.0 s"), "{}", cam.describe());
}

#[test]
fn key_presses_while_the_camera_is_lost_are_dropped() {
    let clock = FakeClock::new();
    let capture = RecordedCapture::new("/dev/video0", vec![yuyv_frame()]).fail_reads(1..2);
    let (tx, rx) = mpsc::channel();
    let mut cam = camera(capture, TriggerInput::from_channel(rx), &clock);
    // Real-time waits on the channel: keep them short.
    let mut cam_events = |n: usize| (0..n).map(|_| kind(&cam.next_frame())).collect::<Vec<_>>();
    // Nothing pressed: idle, camera open.
    assert_eq!(cam_events(1), [Ev::Idle]);
    tx.send(()).unwrap();
    assert_eq!(cam_events(1), [Ev::Frame(0)]);
    tx.send(()).unwrap();
    assert_eq!(cam_events(1), [Ev::Error]); // unplugged on this read
    tx.send(()).unwrap(); // pressed while lost
    // Reopened after 0.5 s; the press from before is gone.
    assert_eq!(cam_events(1), [Ev::Idle]);
    tx.send(()).unwrap();
    assert_eq!(cam_events(1), [Ev::Frame(1)]);
    drop(tx);
    assert_eq!(cam_events(2), [Ev::Exhausted, Ev::Exhausted]);
    assert_eq!(cam.state(), SourceState::Finished { delivered: 2 });
}

#[test]
fn a_broken_trigger_is_reported_and_retried() {
    let clock = FakeClock::new();
    let missing = tempfile::tempdir().unwrap();
    let trigger = TriggerInput::gpio_at(missing.path(), 0, 4);
    let mut cam = camera(
        RecordedCapture::new("/dev/video0", vec![yuyv_frame()]),
        trigger,
        &clock,
    );
    match cam.next_frame() {
        FrameEvent::Error(SourceError { message: m, .. }) => {
            assert!(m.contains("gpiochip0"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    let state = cam.state();
    assert!(state.to_string().starts_with("trigger failed:"), "{state}");
    assert_eq!(retry_in(&state), Duration::from_millis(500));
    assert_eq!(kind(&cam.next_frame()), Ev::Error); // retried after the back-off
    assert_eq!(retry_in(&cam.state()), Duration::from_millis(1000));
}

// ---- folder and synthetic sources -------------------------------------------------

fn solid_png(path: &Path, value: u8) {
    RgbImage::from_pixel(256, 256, Rgb([value, 0, 0]))
        .save(path)
        .unwrap();
}

fn folder_events(source: &mut FolderSource, n: usize) -> Vec<(Ev, String)> {
    (0..n)
        .map(|_| {
            let e = source.next_frame();
            let what = match &e {
                FrameEvent::Frame(f) => format!("{} {}", f.source, f.image.get_pixel(0, 0)[0]),
                // The origin names the file that failed, as the record will.
                FrameEvent::Error(e) => format!("{} | {}", e.origin, e.message),
                _ => String::new(),
            };
            (kind(&e), what)
        })
        .collect()
}

fn test_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("b")).unwrap();
    solid_png(&dir.path().join("z.png"), 30);
    solid_png(&dir.path().join("a.png"), 10);
    solid_png(&dir.path().join("b/c.png"), 20);
    std::fs::write(dir.path().join("m.jpg"), b"not a jpeg").unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();
    dir
}

#[test]
fn folder_replays_in_order_and_reports_bad_files() {
    let dir = test_folder();
    let mut src = FolderSource::new(dir.path(), false).unwrap();
    assert_eq!(src.state().to_string(), "replaying 0/4");
    assert!(src.describe().contains("4 images"));
    let events = folder_events(&mut src, 3);
    assert_eq!(events[0], (Ev::Frame(0), "a.png 10".into()));
    assert_eq!(events[1], (Ev::Frame(1), "b/c.png 20".into()));
    assert_eq!(events[2].0, Ev::Error);
    assert!(events[2].1.starts_with("m.jpg | "), "{}", events[2].1);
    assert!(events[2].1.contains("skipping image"), "{}", events[2].1);
    assert_eq!(src.state().to_string(), "replaying 3/4");
    let events = folder_events(&mut src, 3);
    assert_eq!(events[0], (Ev::Frame(2), "z.png 30".into()));
    assert_eq!(events[1].0, Ev::Exhausted);
    assert_eq!(events[2].0, Ev::Exhausted);
    assert_eq!(src.state(), SourceState::Finished { delivered: 3 });
}

#[test]
fn folder_frames_carry_the_hash_of_their_file() {
    use sha2::{Digest, Sha256};
    let dir = test_folder();
    let mut src = FolderSource::new(dir.path(), false).unwrap();
    let FrameEvent::Frame(frame) = src.next_frame() else {
        panic!("a.png is a frame");
    };
    let bytes = std::fs::read(dir.path().join("a.png")).unwrap();
    let want: [u8; 32] = Sha256::digest(&bytes).into();
    assert_eq!(frame.file.as_ref().map(|f| f.sha256), Some(want));
}

#[test]
fn folder_loops_with_increasing_ids() {
    let dir = test_folder();
    let mut src = FolderSource::new(dir.path(), true).unwrap();
    let events = folder_events(&mut src, 10);
    let frames: Vec<_> = events
        .iter()
        .filter(|(e, _)| matches!(e, Ev::Frame(_)))
        .map(|(e, s)| (e, s.as_str()))
        .collect();
    assert_eq!(frames.len(), 8); // 10 events, 2 of them the bad file
    assert_eq!(frames[3], (&Ev::Frame(3), "a.png 10"));
    assert_eq!(frames[7], (&Ev::Frame(7), "b/c.png 20"));
}

#[test]
fn folder_of_only_bad_files_ends_instead_of_spinning() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x.png"), b"broken").unwrap();
    let mut src = FolderSource::new(dir.path(), true).unwrap();
    let events: Vec<Ev> = folder_events(&mut src, 3)
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(events, [Ev::Error, Ev::Exhausted, Ev::Exhausted]);

    let empty = tempfile::tempdir().unwrap();
    let e = format!("{:#}", FolderSource::new(empty.path(), false).unwrap_err());
    assert!(e.contains("no images"), "{e}");
    let e = format!(
        "{:#}",
        FolderSource::new(&empty.path().join("nope"), false).unwrap_err()
    );
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn synthetic_source_is_deterministic() {
    let params = SyntheticParams {
        width: 256,
        height: 256,
        fov_diameter: 240.0,
        n_microaneurysms: 2,
        n_lookalikes: 1,
        ..SyntheticParams::small()
    };
    let collect = || {
        let mut src = SyntheticSource::new(params.clone(), 41, 2);
        let mut out = Vec::new();
        loop {
            match src.next_frame() {
                FrameEvent::Frame(f) => out.push(f),
                FrameEvent::Exhausted => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(src.state(), SourceState::Finished { delivered: 2 });
        out
    };
    let (a, b) = (collect(), collect());
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.image, y.image);
    }
    assert_eq!((a[0].id, a[1].id), (0, 1));
    assert_eq!(a[1].source, "synthetic seed 42");
    assert_eq!(a[1].image, generate(&params, 42).image);
    assert_ne!(a[0].image, a[1].image);
}
