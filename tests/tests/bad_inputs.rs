//! Bad images through the real `ma-device detect` binary (CONTRACTS.md section 1): every
//! input gives exactly one JSON line, a result or `{"image", "error"}` with a one-line
//! reason, never a panic; the exit code is 1 when any image failed and 0 when none did;
//! headers claiming huge sizes are refused before anything large is allocated.
//!
//! The models are untrained nets exported in a temporary folder, with a referral network
//! (CONTRACTS.md section 3: every result line carries `refer_score`, no error line does):
//! what is tested is the handling of inputs, not accuracy.
//!
//! The binary is built (or found fresh) by running `cargo build -p ma-device` from the
//! test: integration tests of another package do not get `CARGO_BIN_EXE_*`. Set
//! `MA_DEVICE_BIN` to test a given binary instead.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, LumaA, Rgb, RgbImage, Rgba};
use ma_core::detection::{DetectLine, read_jsonl};
use ma_core::image_io::{MAX_SIDE, MIN_SIDE};
use ma_synthetic::generate;

/// Peak resident memory allowed for a run whose only input claims a huge size: the models
/// and the binary, nothing in proportion to the claimed size.
const HUGE_HEADER_RSS_LIMIT_MB: u64 = 300;
/// Input side of the test models' referral network (small: the nets are untrained).
const REFERRAL_SIDE: usize = 64;
/// A run that takes longer than this is killed and fails the test (a hang).
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

// ---- fixture: binary, models, runner ---------------------------------------------------

struct Fixture {
    binary: PathBuf,
    models: PathBuf,
    /// The public key the test models are signed with.
    key: PathBuf,
    _dir: tempfile::TempDir,
}

/// One binary and one model set for every test here; runs are serialised (two cores,
/// and the memory measurements must not overlap).
fn fixture() -> &'static Mutex<Fixture> {
    static FIXTURE: OnceLock<Mutex<Fixture>> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        let key = ma_tests::export_untrained_models_with_referral(
            &models,
            7,
            "bad-inputs-test",
            [0.5, 0.5, 0.5],
            REFERRAL_SIDE,
        );
        Mutex::new(Fixture {
            binary: ma_tests::ma_device_binary().to_path_buf(),
            models,
            key,
            _dir: dir,
        })
    })
}

fn lock_fixture() -> std::sync::MutexGuard<'static, Fixture> {
    fixture().lock().unwrap_or_else(|e| e.into_inner())
}

/// What one `ma-device detect` run did.
struct Run {
    /// Exit code; `None` if killed by a signal.
    code: Option<i32>,
    signal: Option<i32>,
    stderr: String,
    lines: Vec<DetectLine>,
    max_rss_mb: f64,
    elapsed: Duration,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "exit {:?} signal {:?}, {:.0} MB peak, {:.1} s, stderr:\n{}",
            self.code,
            self.signal,
            self.max_rss_mb,
            self.elapsed.as_secs_f64(),
            self.stderr
        )
    }
}

/// Runs `detect` on `input` and measures the child's peak RSS with `wait4`.
fn detect(fx: &Fixture, input: &Path) -> Run {
    let dir = tempfile::tempdir().unwrap();
    detect_with(fx, input, &dir.path().join("out.jsonl"), &[])
}

/// Runs `detect --input input --output output` plus `extra` arguments; `lines` are read
/// from `output` if it is a JSONL file the run wrote.
fn detect_with(fx: &Fixture, input: &Path, output: &Path, extra: &[&std::ffi::OsStr]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let stderr_path = dir.path().join("stderr.txt");
    let before = std::fs::metadata(output)
        .ok()
        .map(|m| m.modified().unwrap());
    let started = Instant::now();
    let child = Command::new(&fx.binary)
        .arg("detect")
        .arg("--models")
        .arg(&fx.models)
        .arg("--public-key")
        .arg(&fx.key)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    // Watchdog: a hang must fail the test, not block it forever.
    let (done, timed_out) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if timed_out.recv_timeout(RUN_TIMEOUT).is_err() {
            // SAFETY: plain syscall; the child is not reaped until wait4 below returns.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return true;
        }
        false
    });
    let mut status = 0;
    // SAFETY: rusage is plain old data; wait4 fills it in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid, "wait4: {}", std::io::Error::last_os_error());
    let _ = done.send(());
    let hung = watchdog.join().unwrap();
    drop(child); // already reaped
    let elapsed = started.elapsed();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(
        !hung,
        "detect on {} hung for {RUN_TIMEOUT:?}",
        input.display()
    );
    let (code, signal) = if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else {
        (None, Some(libc::WTERMSIG(status)))
    };
    let written = std::fs::metadata(output)
        .ok()
        .map(|m| m.modified().unwrap());
    let lines = if written.is_some() && written != before {
        read_jsonl(output).unwrap_or_else(|e| panic!("{e:#}\n{stderr}"))
    } else {
        Vec::new()
    };
    Run {
        code,
        signal,
        stderr,
        lines,
        // ru_maxrss is in KiB on Linux.
        max_rss_mb: usage.ru_maxrss as f64 / 1024.0,
        elapsed,
    }
}

// ---- the corpus ------------------------------------------------------------------------

/// What an input must give.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// A result line.
    Ok,
    /// An error line whose reason contains this text (any reason when empty).
    Error(&'static str),
    /// Either, as long as it is one clean line.
    Either,
}

struct Case {
    name: String,
    bytes: Vec<u8>,
    expect: Expect,
}

struct Corpus {
    cases: Vec<Case>,
}

impl Corpus {
    fn add(&mut self, name: impl Into<String>, bytes: Vec<u8>, expect: Expect) {
        let name = format!("{:03}-{}", self.cases.len(), name.into());
        self.cases.push(Case {
            name,
            bytes,
            expect,
        });
    }

    fn write(&self, dir: &Path) {
        for case in &self.cases {
            std::fs::write(dir.join(&case.name), &case.bytes).unwrap();
        }
    }
}

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// A small fundus-like frame: big enough to be accepted, small enough to be cheap.
fn small_fundus() -> RgbImage {
    generate(&ma_tests::small_fundus_params(), 5).image
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend(data);
    out.extend(&body);
    out.extend(crc32(&body).to_be_bytes());
}

/// A PNG whose header claims `width x height` (colour type, bit depth as given) followed
/// by a few bytes of (invalid) image data: nothing backs the claimed size.
fn png_header_only(width: u32, height: u32, depth: u8, colour: u8) -> Vec<u8> {
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([depth, colour, 0, 0, 0]);
    png_chunk(&mut png, b"IHDR", &ihdr);
    png_chunk(&mut png, b"IDAT", &[0x78, 0x9C, 0x63, 0x00]);
    png_chunk(&mut png, b"IEND", &[]);
    png
}

/// A valid PNG of `width x height` pixels, all `rgb`, written row by row (a 20000-px
/// image never exists in memory here).
fn uniform_png(path: &Path, width: u32, height: u32, rgb: [u8; 3]) {
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut encoder = png::Encoder::new(file, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    encoder.set_filter(png::Filter::Up);
    let mut writer = encoder.write_header().unwrap();
    let mut stream = writer.stream_writer().unwrap();
    let row: Vec<u8> = (0..width).flat_map(|_| rgb).collect();
    for _ in 0..height {
        stream.write_all(&row).unwrap();
    }
    stream.finish().unwrap();
}

/// A valid PNG of black and white pixels alternating in both directions.
fn alternating_png(path: &Path, width: u32, height: u32) {
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut encoder = png::Encoder::new(file, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Balanced);
    let mut writer = encoder.write_header().unwrap();
    let mut stream = writer.stream_writer().unwrap();
    let row = |phase: u32| -> Vec<u8> {
        (0..width)
            .flat_map(|x| {
                [if (x + phase).is_multiple_of(2) {
                    255
                } else {
                    0
                }; 3]
            })
            .collect()
    };
    let rows = [row(0), row(1)];
    for y in 0..height {
        stream.write_all(&rows[(y % 2) as usize]).unwrap();
    }
    stream.finish().unwrap();
}

/// Offsets to cut a file at: every byte of the first `head`, `spread` more spaced over the
/// rest, and the last few bytes.
fn cut_points(len: usize, head: usize, spread: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = (1..head.min(len)).collect();
    cuts.extend((1..spread).map(|i| head + (len - head) * i / spread));
    cuts.extend([len - 12, len - 6, len - 2, len - 1]);
    cuts.sort_unstable();
    cuts.dedup();
    cuts.retain(|&c| c > 0 && c < len);
    cuts
}

/// Sets the height and width of a JPEG's first start-of-frame segment.
fn jpeg_with_size(jpeg: &[u8], width: u16, height: u16) -> Vec<u8> {
    let mut out = jpeg.to_vec();
    let sof = out
        .windows(2)
        .position(|w| w[0] == 0xFF && matches!(w[1], 0xC0..=0xC2))
        .expect("a start-of-frame marker");
    // FF Cx, length (2), precision (1), height (2), width (2).
    out[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    out[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    out
}

fn bad_images() -> Corpus {
    let mut c = Corpus { cases: Vec::new() };
    let fundus = small_fundus();
    let rgb = DynamicImage::ImageRgb8(fundus.clone());
    let png = encode(&rgb, ImageFormat::Png);
    let jpeg = encode(&rgb, ImageFormat::Jpeg);

    // Empty files and noise under every extension.
    for ext in [
        "png", "jpg", "jpeg", "tif", "tiff", "bmp", "ppm", "PNG", "JPG",
    ] {
        c.add(format!("empty.{ext}"), Vec::new(), Expect::Error("empty"));
    }
    for (i, ext) in ["png", "jpg", "tif", "bmp", "ppm"].iter().enumerate() {
        for (k, len) in [1usize, 7, 64, 5000, 200_000].into_iter().enumerate() {
            c.add(
                format!("noise-{len}.{ext}"),
                noise(len, (i * 10 + k) as u64),
                Expect::Error(""),
            );
        }
    }
    c.add(
        "text.jpg",
        b"This is not a photograph.\n".to_vec(),
        Expect::Error("not an image"),
    );
    // Noise behind a valid signature: the format is recognised, the rest is garbage.
    for (name, magic) in [
        ("png", &b"\x89PNG\r\n\x1a\n"[..]),
        ("jpg", &b"\xFF\xD8\xFF\xE0"[..]),
        ("tif", &b"II*\x00"[..]),
        ("tiff", &b"MM\x00*"[..]),
        ("bmp", &b"BM"[..]),
        ("ppm", &b"P6\n"[..]),
    ] {
        for len in [0usize, 10, 3000] {
            let mut bytes = magic.to_vec();
            bytes.extend(noise(len, len as u64 + bytes.len() as u64));
            c.add(
                format!("magic-noise-{len}.{name}"),
                bytes,
                Expect::Error(""),
            );
        }
    }

    // Truncated files. A PNG cut inside its end chunk may still decode (the image data
    // is complete); a JPEG without its end-of-image marker never does.
    for cut in cut_points(png.len(), 60, 25) {
        let expect = if cut >= png.len() - 12 {
            Expect::Either
        } else {
            Expect::Error("")
        };
        c.add(format!("cut-{cut}.png"), png[..cut].to_vec(), expect);
    }
    for cut in cut_points(jpeg.len(), 40, 25) {
        c.add(
            format!("cut-{cut}.jpg"),
            jpeg[..cut].to_vec(),
            Expect::Error(""),
        );
    }
    for (format, ext) in [
        (ImageFormat::Tiff, "tif"),
        (ImageFormat::Bmp, "bmp"),
        (ImageFormat::Pnm, "ppm"),
    ] {
        let bytes = encode(&rgb, format);
        for cut in [1, 8, 20, 40, bytes.len() / 2, bytes.len() - 1] {
            c.add(
                format!("cut-{cut}.{ext}"),
                bytes[..cut].to_vec(),
                Expect::Error(""),
            );
        }
    }

    // Flipped bits: a damaged CRC in a PNG chunk, a damaged JPEG scan.
    let mut bad_crc = png.clone();
    bad_crc[29] ^= 0xFF; // the IHDR CRC
    c.add("bad-ihdr-crc.png", bad_crc, Expect::Error(""));
    let mut damaged = png.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x55;
    c.add("damaged-idat.png", damaged, Expect::Error(""));
    let mut damaged = jpeg.clone();
    let mid = damaged.len() / 2;
    for b in &mut damaged[mid..mid + 16] {
        *b = 0x5A;
    }
    c.add("damaged-scan.jpg", damaged, Expect::Either);

    // Headers claiming sizes outside the limits, with nothing behind them.
    c.add(
        "claims-100000x100000.png",
        png_header_only(100_000, 100_000, 8, 2),
        Expect::Error("larger than"),
    );
    c.add(
        "claims-0x300.png",
        png_header_only(0, 300, 8, 2),
        Expect::Error(""),
    );
    c.add(
        "claims-65500x65500.jpg",
        jpeg_with_size(&jpeg, 65_500, 65_500),
        Expect::Error("larger than"),
    );
    let mut ppm = b"P6\n100000 100000\n255\n".to_vec();
    ppm.extend(noise(100, 1));
    c.add(
        "claims-100000x100000.ppm",
        ppm,
        Expect::Error("larger than"),
    );
    let mut bmp = encode(&rgb, ImageFormat::Bmp);
    bmp[18..22].copy_from_slice(&100_000i32.to_le_bytes());
    bmp[22..26].copy_from_slice(&100_000i32.to_le_bytes());
    c.add("claims-100000x100000.bmp", bmp, Expect::Error(""));

    // Sizes at the limits.
    let tiny = DynamicImage::ImageRgb8(RgbImage::from_pixel(1, 1, Rgb([200, 90, 30])));
    c.add(
        "one-pixel.png",
        encode(&tiny, ImageFormat::Png),
        Expect::Error("smaller than"),
    );
    let narrow = DynamicImage::ImageRgb8(RgbImage::from_pixel(
        MIN_SIDE - 1,
        MIN_SIDE,
        Rgb([200, 90, 30]),
    ));
    c.add(
        "255x256.png",
        encode(&narrow, ImageFormat::Png),
        Expect::Error("smaller than"),
    );
    let black = DynamicImage::ImageRgb8(RgbImage::new(MIN_SIDE, MIN_SIDE));
    c.add(
        "black-256x256.png",
        encode(&black, ImageFormat::Png),
        Expect::Error("no field of view"),
    );
    // All white: no dark surround either (was accepted, with detections off the photo).
    let white = DynamicImage::ImageRgb8(RgbImage::from_pixel(512, 512, Rgb([255, 255, 255])));
    c.add(
        "white-512x512.png",
        encode(&white, ImageFormat::Png),
        Expect::Error("no field of view"),
    );

    // Pixel formats the contract accepts: each must give a result.
    c.add("rgb.png", png.clone(), Expect::Ok);
    c.add("rgb.jpg", jpeg.clone(), Expect::Ok);
    let grey = DynamicImage::ImageLuma8(rgb.to_luma8());
    c.add("grey.png", encode(&grey, ImageFormat::Png), Expect::Ok);
    let grey16: ImageBuffer<Luma<u16>, Vec<u16>> =
        ImageBuffer::from_fn(fundus.width(), fundus.height(), |x, y| {
            Luma([u16::from(fundus.get_pixel(x, y).0[0]) * 257])
        });
    c.add(
        "grey16.png",
        encode(&grey16.into(), ImageFormat::Png),
        Expect::Ok,
    );
    let grey_alpha: ImageBuffer<LumaA<u8>, Vec<u8>> =
        ImageBuffer::from_fn(fundus.width(), fundus.height(), |x, y| {
            LumaA([fundus.get_pixel(x, y).0[0], 128])
        });
    c.add(
        "grey-alpha.png",
        encode(&grey_alpha.into(), ImageFormat::Png),
        Expect::Ok,
    );
    let rgba: ImageBuffer<Rgba<u8>, Vec<u8>> =
        ImageBuffer::from_fn(fundus.width(), fundus.height(), |x, y| {
            let [r, g, b] = fundus.get_pixel(x, y).0;
            Rgba([r, g, b, (x % 256) as u8])
        });
    c.add(
        "rgba.png",
        encode(&rgba.into(), ImageFormat::Png),
        Expect::Ok,
    );
    let rgb16 = DynamicImage::ImageRgb16(rgb.to_rgb16());
    c.add("rgb16.png", encode(&rgb16, ImageFormat::Png), Expect::Ok);
    c.add("rgb16.tif", encode(&rgb16, ImageFormat::Tiff), Expect::Ok);
    c.add("rgb.bmp", encode(&rgb, ImageFormat::Bmp), Expect::Ok);
    c.add("rgb.ppm", encode(&rgb, ImageFormat::Pnm), Expect::Ok);
    // A JPEG under a PNG name: the format comes from the content.
    c.add("jpeg-named.png", jpeg.clone(), Expect::Ok);
    // CMYK and progressive JPEGs (made with ImageMagick; image's encoder writes neither).
    let seeds =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../device/fuzz/corpus/decode_preprocess");
    for (name, expect) in [
        ("cmyk-fundus.jpg", Expect::Either),
        ("progressive-fundus.jpg", Expect::Ok),
        ("tiff16-disk.tif", Expect::Ok),
        ("bmp-rle8-disk.bmp", Expect::Either),
    ] {
        let bytes = std::fs::read(seeds.join(name)).unwrap();
        c.add(name, bytes, expect);
    }
    c
}

fn check_line(case_name: &str, expect: Expect, line: &DetectLine) {
    assert_eq!(line.image(), case_name, "lines out of order");
    match (expect, line) {
        (Expect::Error(text), DetectLine::Failed(f)) => {
            assert!(f.error.contains(text), "{case_name}: {:?}", f.error);
        }
        (Expect::Ok, DetectLine::Ok(_)) | (Expect::Either, _) => {}
        (expect, line) => panic!("{case_name}: expected {expect:?}, got {line:?}"),
    }
    if let DetectLine::Ok(d) = line {
        let r = d
            .referral
            .as_ref()
            .unwrap_or_else(|| panic!("{case_name}: a result line without refer_score"));
        assert!((0.0..=1.0).contains(&r.refer_score), "{case_name}: {r:?}");
        assert_eq!(
            r.refer,
            r.refer_score >= 0.5,
            "{case_name}: the rule is score >= 0.5"
        );
        assert_eq!(r.attention_boxes.len(), 4, "{case_name}: {r:?}");
        for b in &r.attention_boxes {
            assert!(b.x0 < b.x1 && b.y0 < b.y1, "{case_name}: {b:?}");
            assert!((0.0..=1.0).contains(&b.weight), "{case_name}: {b:?}");
        }
    }
    if let DetectLine::Failed(f) = line {
        assert!(!f.error.trim().is_empty(), "{case_name}: empty reason");
        assert!(
            !f.error.contains(['\n', '\r']) && f.error.len() < 600,
            "{case_name}: not a one-line reason: {:?}",
            f.error
        );
        assert!(!f.error.contains("panicked"), "{case_name}: {:?}", f.error);
    }
}

/// A detection lies on the photo's pixels (the centre of pixel 0 is 0).
fn on_photo(det: &ma_core::detection::Detection, width: u32, height: u32) -> bool {
    (-0.5..=width as f64 - 0.5).contains(&det.x) && (-0.5..=height as f64 - 0.5).contains(&det.y)
}

fn outcome(line: &DetectLine) -> String {
    match line {
        DetectLine::Ok(d) => format!("result, {} detections", d.detections.len()),
        DetectLine::Failed(f) => format!("error {:?}", f.error),
    }
}

fn assert_no_panic(run: &Run) {
    assert!(
        run.signal.is_none() && !run.stderr.contains("panicked"),
        "{}",
        run.describe()
    );
}

// ---- tests -----------------------------------------------------------------------------

#[test]
fn every_bad_image_gives_one_clean_line_and_exit_code_1() {
    // The good images (each a full cascade run, seconds) are the next test's.
    let mut corpus = bad_images();
    corpus.cases.retain(|c| c.expect != Expect::Ok);
    let dir = tempfile::tempdir().unwrap();
    corpus.write(dir.path());
    // A link to nowhere with an image name: unreadable, reported like a bad image.
    std::os::unix::fs::symlink(
        dir.path().join("missing"),
        dir.path().join("zzz-dangling.png"),
    )
    .unwrap();
    // A FIFO with an image name: reading it would block forever.
    let fifo = std::ffi::CString::new(dir.path().join("zzz-fifo.png").to_str().unwrap()).unwrap();
    // SAFETY: plain syscall on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    // A link back to the folder itself: searching must end, and list nothing twice.
    std::os::unix::fs::symlink(dir.path(), dir.path().join("zzz-loop")).unwrap();
    let fx = lock_fixture();
    let run = detect(&fx, dir.path());
    assert_no_panic(&run);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let tried = corpus.cases.len() + 2;
    assert_eq!(run.lines.len(), tried, "one line per input");
    for (case, line) in corpus.cases.iter().zip(&run.lines) {
        check_line(&case.name, case.expect, line);
    }
    check_line(
        "zzz-dangling.png",
        Expect::Error("cannot read"),
        &run.lines[tried - 2],
    );
    check_line(
        "zzz-fifo.png",
        Expect::Error("not a regular file"),
        &run.lines[tried - 1],
    );
    let ok = run
        .lines
        .iter()
        .filter(|l| matches!(l, DetectLine::Ok(_)))
        .count();
    for (case, line) in corpus.cases.iter().zip(&run.lines) {
        if case.expect == Expect::Either {
            println!("  {}: {}", case.name, outcome(line));
        }
    }
    println!(
        "bad-input corpus: {tried} inputs tried, {ok} gave results, {} gave error lines, \
         {:.1} s, peak RSS {:.0} MB",
        tried - ok,
        run.elapsed.as_secs_f64(),
        run.max_rss_mb
    );
}

#[test]
fn referral_fields_and_heatmaps_only_for_photos_that_worked() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    small_fundus().save(photos.join("a-good.png")).unwrap();
    std::fs::write(photos.join("b-broken.png"), b"\x89PNG\r\n\x1a\n not really").unwrap();
    let (out, heatmaps) = (dir.path().join("out.jsonl"), dir.path().join("heat"));
    let fx = lock_fixture();
    let run = detect_with(
        &fx,
        &photos,
        &out,
        &["--heatmaps".as_ref(), heatmaps.as_os_str()],
    );
    assert_no_panic(&run);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let raw = std::fs::read_to_string(&out).unwrap();
    let raw: Vec<&str> = raw.lines().collect();
    assert_eq!(raw.len(), 2, "{raw:?}");
    assert!(raw[0].contains("\"refer_score\":"), "{}", raw[0]);
    assert!(raw[0].contains("\"attention_boxes\":"), "{}", raw[0]);
    assert!(
        raw[1].contains("\"error\":") && !raw[1].contains("refer"),
        "an error line carries no score: {}",
        raw[1]
    );
    check_line("a-good.png", Expect::Ok, &run.lines[0]);
    let written: Vec<_> = std::fs::read_dir(&heatmaps)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        written,
        ["a-good.png.png"],
        "one heatmap, for the photo that worked"
    );
    let picture = image::open(heatmaps.join("a-good.png.png")).unwrap();
    assert_eq!(picture.width(), 320);
    assert!(
        run.stderr.contains("referred (rule: refer_score >= 0.500)"),
        "{}",
        run.stderr
    );
    // Annotations and heatmaps share their file names: one folder for both is refused.
    let same = detect_with(
        &fx,
        &photos,
        &dir.path().join("again.jsonl"),
        &[
            "--heatmaps".as_ref(),
            heatmaps.as_os_str(),
            "--annotate".as_ref(),
            heatmaps.as_os_str(),
        ],
    );
    assert_eq!(same.code, Some(1), "{}", same.describe());
    assert!(
        same.stderr.contains("name the same folder"),
        "{}",
        same.stderr
    );
}

#[test]
fn heatmaps_without_a_referral_network_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    let key = ma_tests::export_untrained_models(&models, 9, "no-referral", [0.5, 0.5, 0.5]);
    let photo = dir.path().join("a.png");
    small_fundus().save(&photo).unwrap();
    let out = Command::new(ma_tests::ma_device_binary())
        .arg("detect")
        .arg("--models")
        .arg(&models)
        .arg("--public-key")
        .arg(&key)
        .arg("--input")
        .arg(&photo)
        .arg("--output")
        .arg(dir.path().join("out.jsonl"))
        .arg("--heatmaps")
        .arg(dir.path().join("heat"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--heatmaps needs a model set with a referral network"),
        "{stderr}"
    );
}

#[test]
fn good_images_in_every_accepted_pixel_format_exit_0() {
    let corpus = bad_images();
    let dir = tempfile::tempdir().unwrap();
    let good: Vec<&Case> = corpus
        .cases
        .iter()
        .filter(|c| c.expect == Expect::Ok)
        .collect();
    for case in &good {
        std::fs::write(dir.path().join(&case.name), &case.bytes).unwrap();
    }
    let fx = lock_fixture();
    let run = detect(&fx, dir.path());
    assert_no_panic(&run);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    assert_eq!(run.lines.len(), good.len());
    for line in &run.lines {
        let DetectLine::Ok(d) = line else {
            panic!("{line:?}")
        };
        assert!(d.width >= MIN_SIDE && d.height >= MIN_SIDE, "{d:?}");
        for det in &d.detections {
            assert!((0.01..=1.0).contains(&det.score), "{det:?}");
            assert!(on_photo(det, d.width, d.height), "{det:?} on {d:?}");
        }
    }
    println!(
        "good images: {} inputs, exit 0, {:.1} s",
        good.len(),
        run.elapsed.as_secs_f64()
    );
}

/// One image per run, so the peak RSS is that image's.
#[test]
fn huge_headers_are_refused_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let jpeg = encode(&DynamicImage::ImageRgb8(small_fundus()), ImageFormat::Jpeg);
    let mut ppm = b"P6\n100000 100000\n255\n".to_vec();
    ppm.extend(noise(100, 2));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "claims-100000x100000.png",
            png_header_only(100_000, 100_000, 8, 2),
            "larger than",
        ),
        (
            "claims-100000x100000-rgba16.png",
            png_header_only(100_000, 100_000, 16, 6),
            "larger than",
        ),
        (
            "claims-65500x65500.jpg",
            jpeg_with_size(&jpeg, 65_500, 65_500),
            "larger than",
        ),
        ("claims-100000x100000.ppm", ppm, "larger than"),
        // At the limit: accepted by the header check, then the data is missing. The
        // decoder must not fill a full-size buffer before noticing.
        (
            "claims-12000x12000-rgba16.png",
            png_header_only(MAX_SIDE, MAX_SIDE, 16, 6),
            "",
        ),
    ];
    let fx = lock_fixture();
    for (name, bytes, text) in &cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let run = detect(&fx, &path);
        assert_no_panic(&run);
        assert_eq!(run.code, Some(1), "{name}: {}", run.describe());
        assert_eq!(run.lines.len(), 1);
        check_line(name, Expect::Error(text), &run.lines[0]);
        println!(
            "{name}: {:?}, peak RSS {:.0} MB",
            run.lines[0], run.max_rss_mb
        );
        assert!(
            run.max_rss_mb < HUGE_HEADER_RSS_LIMIT_MB as f64,
            "{name}: peak RSS {:.0} MB",
            run.max_rss_mb
        );
    }
    println!("huge headers: {} inputs tried", cases.len());
}

/// Real images at and over the largest accepted side.
#[test]
fn images_at_and_over_the_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let fx = lock_fixture();
    let mut tried = 0;

    // Over the limit: refused from the header, whatever the file holds.
    let over = dir.path().join("uniform-20000x20000.png");
    uniform_png(&over, 20_000, 20_000, [180, 90, 40]);
    let run = detect(&fx, &over);
    tried += 1;
    assert_no_panic(&run);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    check_line(
        "uniform-20000x20000.png",
        Expect::Error("larger than the 12000"),
        &run.lines[0],
    );
    println!(
        "20000x20000 ({} KB file): {:?}, peak RSS {:.0} MB, {:.1} s",
        std::fs::metadata(&over).unwrap().len() / 1024,
        run.lines[0],
        run.max_rss_mb,
        run.elapsed.as_secs_f64()
    );
    assert!(run.max_rss_mb < HUGE_HEADER_RSS_LIMIT_MB as f64);
    std::fs::remove_file(&over).unwrap();

    // Long thin frames at the limit: the whole frame is lit, so the "FOV" is 12000 px wide
    // and the canonical image only a few dozen pixels high, less than a patch.
    for (w, h) in [(MAX_SIDE, MIN_SIDE), (MIN_SIDE, MAX_SIDE)] {
        let name = format!("uniform-{w}x{h}.png");
        let path = dir.path().join(&name);
        uniform_png(&path, w, h, [180, 90, 40]);
        let run = detect(&fx, &path);
        tried += 1;
        assert_no_panic(&run);
        assert_eq!(run.lines.len(), 1, "{}", run.describe());
        check_line(&name, Expect::Either, &run.lines[0]);
        println!(
            "{name}: {:?}, peak RSS {:.0} MB, {:.1} s",
            run.lines[0],
            run.max_rss_mb,
            run.elapsed.as_secs_f64()
        );
    }

    // At the limit on both sides: accepted and processed (or refused with a reason).
    let name = format!("uniform-{MAX_SIDE}x{MAX_SIDE}.png");
    let path = dir.path().join(&name);
    uniform_png(&path, MAX_SIDE, MAX_SIDE, [180, 90, 40]);
    let run = detect(&fx, &path);
    tried += 1;
    assert_no_panic(&run);
    assert_eq!(run.lines.len(), 1, "{}", run.describe());
    check_line(&name, Expect::Either, &run.lines[0]);
    println!(
        "{name} ({} KB file): {}, peak RSS {:.0} MB, {:.1} s",
        std::fs::metadata(&path).unwrap().len() / 1024,
        outcome(&run.lines[0]),
        run.max_rss_mb,
        run.elapsed.as_secs_f64()
    );

    // Alternating pixels at the limit (a 650 KB file): the field-of-view mask has 72
    // million runs. Labelling them compared every pair of runs on neighbouring rows and
    // took 7 minutes here; the sweep takes seconds. Its memory (runs and labels, about
    // 2.5 GB) is what the size limit allows.
    let name = format!("alternating-{MAX_SIDE}x{MAX_SIDE}.png");
    let path = dir.path().join(&name);
    alternating_png(&path, MAX_SIDE, MAX_SIDE);
    let run = detect(&fx, &path);
    tried += 1;
    assert_no_panic(&run);
    assert_eq!(run.lines.len(), 1, "{}", run.describe());
    check_line(&name, Expect::Either, &run.lines[0]);
    println!(
        "{name} ({} KB file): {}, peak RSS {:.0} MB, {:.1} s",
        std::fs::metadata(&path).unwrap().len() / 1024,
        outcome(&run.lines[0]),
        run.max_rss_mb,
        run.elapsed.as_secs_f64()
    );
    assert!(
        run.elapsed < Duration::from_secs(120),
        "{name} took {:.0} s",
        run.elapsed.as_secs_f64()
    );
    println!("size limits: {tried} inputs tried");
}

/// A PNG whose colour profile (iCCP chunk, zlib) inflates to 1 GiB in a file of about
/// 1 MB: the decoder's memory is bounded by the image's own size, so the run costs what
/// the plain image costs (it took 1.07 GB) and the photo gets its line.
#[test]
fn a_colour_profile_bomb_costs_bounded_memory() {
    use flate2::{Compression, write::ZlibEncoder};

    let png = encode(&DynamicImage::ImageRgb8(small_fundus()), ImageFormat::Png);
    let mut profile = b"bomb\0\0".to_vec(); // name, NUL, compression method 0
    let mut zlib = ZlibEncoder::new(&mut profile, Compression::default());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        zlib.write_all(&zeros).unwrap();
    }
    zlib.finish().unwrap();
    assert!(profile.len() < 4 << 20, "{} bytes", profile.len());
    // The profile must come before the image data: right after IHDR (8 + 25 bytes).
    let mut bomb = png[..33].to_vec();
    png_chunk(&mut bomb, b"iCCP", &profile);
    bomb.extend_from_slice(&png[33..]);

    let dir = tempfile::tempdir().unwrap();
    let fx = lock_fixture();
    let plain = dir.path().join("plain.png");
    std::fs::write(&plain, &png).unwrap();
    let baseline = detect(&fx, &plain);
    let path = dir.path().join("icc-bomb.png");
    std::fs::write(&path, &bomb).unwrap();
    let run = detect(&fx, &path);
    assert_no_panic(&run);
    assert_eq!(run.lines.len(), 1, "{}", run.describe());
    // The profile is dropped (nothing uses it); the pixels are fine.
    check_line("icc-bomb.png", Expect::Ok, &run.lines[0]);
    assert_eq!(run.code, Some(0), "{}", run.describe());
    println!(
        "iCCP inflating to 1 GiB ({} KB file): {}, peak RSS {:.0} MB (plain image {:.0} MB)",
        bomb.len() / 1024,
        outcome(&run.lines[0]),
        run.max_rss_mb,
        baseline.max_rss_mb
    );
    assert!(
        run.max_rss_mb < baseline.max_rss_mb + 64.0,
        "peak RSS {:.0} MB, {:.0} MB without the profile",
        run.max_rss_mb,
        baseline.max_rss_mb
    );
}

/// `--output` naming an input photo, directly or through a link, is refused before
/// anything is truncated; the error names both files.
#[test]
fn detect_output_never_overwrites_an_input_photo() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    let png = encode(&DynamicImage::ImageRgb8(small_fundus()), ImageFormat::Png);
    let keep = photos.join("keep.png");
    std::fs::write(&keep, &png).unwrap();
    std::fs::write(photos.join("other.png"), &png).unwrap();
    let hard = dir.path().join("hard-link.jsonl");
    std::fs::hard_link(&keep, &hard).unwrap();
    let soft = dir.path().join("symlink.jsonl");
    std::os::unix::fs::symlink(&keep, &soft).unwrap();

    let fx = lock_fixture();
    let cases: [(&Path, &Path); 4] = [
        (&keep, &keep),   // detect --input photo.png --output photo.png
        (&photos, &keep), // --input dir --output dir/keep.png
        (&photos, &hard), // a hard link to a photo
        (&photos, &soft), // a symlink to a photo
    ];
    for (input, output) in cases {
        let run = detect_with(&fx, input, output, &[]);
        assert_no_panic(&run);
        assert_eq!(run.code, Some(1), "{}", run.describe());
        assert!(
            run.stderr.contains("refusing to write")
                && run.stderr.contains(&output.display().to_string())
                && run.stderr.contains(&keep.display().to_string()),
            "{}",
            run.describe()
        );
        assert_eq!(std::fs::read(&keep).unwrap(), png, "the photo was changed");
    }
    println!("output over an input: {} cases refused", cases.len());
}

/// Annotation names are flat, bounded and unique: `a/b.png` and `a_b.png` used to write
/// the same `a_b.png.png`, and a nested name over 255 bytes stopped the batch. A photo
/// whose annotation cannot be written gets an error line and the batch goes on. Names
/// keep `\` as it is.
#[test]
fn annotation_names_are_unique_and_a_failed_one_does_not_stop_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    let long = format!("{}/{}", "d".repeat(200), "e".repeat(200));
    for sub in ["a", long.as_str()] {
        std::fs::create_dir_all(photos.join(sub)).unwrap();
    }
    let png = encode(&DynamicImage::ImageRgb8(small_fundus()), ImageFormat::Png);
    let names = [
        "a/b.png".to_string(),
        "a_b.png".to_string(),
        format!("{long}/x.png"),
        "back\\slash.png".to_string(),
        "z-blocked.png".to_string(),
    ];
    for name in &names {
        std::fs::write(photos.join(name), &png).unwrap();
    }
    let annotations = dir.path().join("annotated");
    // The annotation of the last photo cannot be written: its name is taken by a folder.
    std::fs::create_dir_all(annotations.join("z-blocked.png.png/in-the-way")).unwrap();

    let fx = lock_fixture();
    let output = dir.path().join("out.jsonl");
    let run = detect_with(
        &fx,
        &photos,
        &output,
        &[std::ffi::OsStr::new("--annotate"), annotations.as_os_str()],
    );
    assert_no_panic(&run);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let mut sorted = names.to_vec();
    sorted.sort();
    let got: Vec<&str> = run.lines.iter().map(DetectLine::image).collect();
    assert_eq!(got, sorted, "one line per photo, names as on disk");
    for line in &run.lines {
        if line.image() == "z-blocked.png" {
            check_line("z-blocked.png", Expect::Error("annotated image"), line);
        } else {
            check_line(line.image(), Expect::Ok, line);
        }
    }
    let mut written: Vec<String> = std::fs::read_dir(&annotations)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "z-blocked.png.png")
        .collect();
    written.sort();
    assert_eq!(written.len(), 4, "{written:?}");
    assert!(
        written.iter().all(|n| n.len() < 160 && n.ends_with(".png")),
        "{written:?}"
    );
    assert!(written.contains(&"a_b.png.png".to_string()), "{written:?}");
    for name in &written {
        let img = image::open(annotations.join(name)).unwrap();
        assert_eq!(img.width(), small_fundus().width(), "{name}");
    }
    println!("annotations: {written:?}");
}
