//! Golden-image tests of the display overlay.
//!
//! Each case draws a fixed synthetic frame with fixed detections and status onto an
//! 800x480 and a 320x240 canvas and compares the pixels, byte for byte, with the PNGs
//! in `tests/golden/` (decoded pixels are compared, not file bytes, so a new PNG
//! encoder version does not break the tests).
//!
//! After an intended change to the drawing, regenerate the files and look at each one
//! before committing them:
//!
//! ```sh
//! UPDATE_GOLDEN=1 cargo test -p ma-device --test display_golden
//! ```
//!
//! On a mismatch the test writes the picture it drew into
//! `$TMPDIR/ma-device-golden/` and names the file in the failure message.
//!
//! The frames are drawn here with plain arithmetic (no `synthetic` module, no
//! trigonometry from the platform's libm), so they are identical on every machine.

use std::path::PathBuf;

use image::{Rgb, RgbImage};
use ma_core::detection::Detection;
use ma_device::display::{Canvas, OverlayInfo, draw_overlay};

const PANELS: [(u32, u32); 2] = [(800, 480), (320, 240)];

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Renders `frame` + `view` on every panel size and checks (or, with
/// `UPDATE_GOLDEN=1`, rewrites) `golden/<case>-<w>x<h>.png`.
fn check(case: &str, frame: &RgbImage, view: &OverlayInfo) {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let mut failures = Vec::new();
    for (w, h) in PANELS {
        let mut canvas = Canvas::new(w, h);
        let Ok(()) = draw_overlay(&mut canvas, frame, view);
        let actual = canvas.into_image();
        let name = format!("{case}-{w}x{h}.png");
        let golden = golden_dir().join(&name);
        if update {
            std::fs::create_dir_all(golden_dir()).unwrap();
            actual
                .save(&golden)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", golden.display()));
            eprintln!("wrote {}", golden.display());
            continue;
        }
        if !golden.exists() {
            failures.push(format!(
                "golden image {} is missing; create it with \
                 `UPDATE_GOLDEN=1 cargo test -p ma-device --test display_golden` \
                 and look at it before committing",
                golden.display()
            ));
            continue;
        }
        let expected = image::open(&golden)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", golden.display()))
            .to_rgb8();
        if let Some(difference) = compare(&expected, &actual) {
            let out_dir = std::env::temp_dir().join("ma-device-golden");
            std::fs::create_dir_all(&out_dir).unwrap();
            let out = out_dir.join(&name);
            actual.save(&out).unwrap();
            failures.push(format!(
                "{name}: {difference}; drew {} (compare with {}; if the change is \
                 intended, rerun with UPDATE_GOLDEN=1)",
                out.display(),
                golden.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `None` when identical, else what differs.
fn compare(expected: &RgbImage, actual: &RgbImage) -> Option<String> {
    if expected.dimensions() != actual.dimensions() {
        return Some(format!(
            "size {:?} instead of {:?}",
            actual.dimensions(),
            expected.dimensions()
        ));
    }
    let mut differing = expected
        .enumerate_pixels()
        .zip(actual.pixels())
        .filter(|((_, _, e), a)| e != a);
    let ((x, y, e), a) = differing.next()?;
    Some(format!(
        "{} pixels differ, the first at ({x}, {y}): {:?} instead of {:?}",
        differing.count() + 1,
        a.0,
        e.0
    ))
}

/// A fundus-like frame: `surround` outside an orange-red disk darkening towards its
/// rim, a pale optic disc, a few dark vessels (straight segments) and dark dots at
/// `dots`.
fn fundus(
    (w, h): (u32, u32),
    surround: [u8; 3],
    disc: (f64, f64),
    vessels: &[[f64; 4]],
    dots: &[(f64, f64)],
) -> RgbImage {
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    let radius = cx.min(cy) * 0.92;
    RgbImage::from_fn(w, h, |x, y| {
        let (x, y) = (x as f64, y as f64);
        let r2 = ((x - cx) * (x - cx) + (y - cy) * (y - cy)) / (radius * radius);
        if r2 > 1.0 {
            return Rgb(surround);
        }
        let shade = 1.0 - 0.45 * r2;
        let mut rgb = [200.0 * shade, 85.0 * shade, 35.0 * shade];
        let d_disc = ((x - disc.0) * (x - disc.0) + (y - disc.1) * (y - disc.1)).sqrt();
        let disc_r = radius * 0.16;
        if d_disc < disc_r {
            let k = 1.0 - d_disc / disc_r * 0.5;
            rgb = [
                rgb[0] + (250.0 - rgb[0]) * k,
                rgb[1] + (215.0 - rgb[1]) * k,
                rgb[2] + (150.0 - rgb[2]) * k,
            ];
        }
        let width = radius * 0.012 + 1.0;
        if vessels.iter().any(|s| segment_distance(x, y, s) < width) {
            rgb = [rgb[0] * 0.6, rgb[1] * 0.45, rgb[2] * 0.5];
        }
        let dot_r = radius * 0.01 + 1.5;
        if dots
            .iter()
            .any(|&(dx, dy)| (x - dx) * (x - dx) + (y - dy) * (y - dy) < dot_r * dot_r)
        {
            rgb = [110.0, 25.0, 15.0];
        }
        Rgb(rgb.map(|v| v.round().clamp(0.0, 255.0) as u8))
    })
}

fn segment_distance(x: f64, y: f64, [x0, y0, x1, y1]: &[f64; 4]) -> f64 {
    let (dx, dy) = (x1 - x0, y1 - y0);
    let t = (((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy)).clamp(0.0, 1.0);
    let (px, py) = (x0 + t * dx, y0 + t * dy);
    ((x - px) * (x - px) + (y - py) * (y - py)).sqrt()
}

fn det(x: f64, y: f64, score: f64) -> Detection {
    Detection { x, y, score }
}

/// Three MAs above the threshold (scores near it, mid-way and near 1), one below it;
/// 4:3 frame, letterboxed left and right.
#[test]
fn referable_frame_with_three_mas() {
    let detections = vec![
        det(210.0, 170.0, 0.97),
        det(380.0, 330.0, 0.72),
        det(250.0, 300.0, 0.52),
        det(470.0, 260.0, 0.35),
    ];
    let dots: Vec<_> = detections.iter().map(|d| (d.x, d.y)).collect();
    let frame = fundus(
        (640, 480),
        [0, 0, 0],
        (450.0, 220.0),
        &[
            [450.0, 220.0, 200.0, 90.0],
            [450.0, 220.0, 230.0, 380.0],
            [450.0, 220.0, 560.0, 100.0],
        ],
        &dots,
    );
    let view = OverlayInfo {
        detections,
        threshold: 0.5,
        ma_count: 3,
        refer: true,
        refer_score: None,
        latency_ms: 812.4,
        frame_number: 42,
        source_state: "camera ok".into(),
        source_ok: true,
        model_version: Some("cascade v1".into()),
    };
    check("refer", &frame, &view);
}

/// Nothing above the threshold, camera lost (amber state), unknown latency, a large
/// frame number; square frame.
#[test]
fn no_refer_with_camera_lost() {
    let detections = vec![det(140.0, 320.0, 0.2)];
    let frame = fundus(
        (500, 500),
        [0, 0, 0],
        (330.0, 250.0),
        &[[330.0, 250.0, 120.0, 150.0], [330.0, 250.0, 150.0, 390.0]],
        &[(140.0, 320.0)],
    );
    let view = OverlayInfo {
        detections,
        threshold: 0.5,
        ma_count: 0,
        refer: false,
        refer_score: None,
        latency_ms: f64::NAN,
        frame_number: 1_234_567,
        source_state: "camera lost, retrying in 4 s".into(),
        source_ok: false,
        model_version: None,
    };
    check("no-refer-camera-lost", &frame, &view);
}

/// A wide frame (letterboxed top and bottom) with marks on two corners and the
/// centre, and long status texts: the model version is dropped at 800 px, the source
/// state shortened at 320 px.
#[test]
fn wide_frame_with_marks_on_the_edges() {
    let detections = vec![
        det(0.0, 0.0, 1.0),
        det(1199.0, 399.0, 0.8),
        det(599.5, 199.5, 0.6),
    ];
    // A grey surround, so the black letterbox bands show.
    let frame = fundus(
        (1200, 400),
        [60, 60, 70],
        (700.0, 200.0),
        &[[700.0, 200.0, 420.0, 60.0]],
        &[],
    );
    let view = OverlayInfo {
        detections,
        threshold: 0.6,
        ma_count: 3,
        refer: true,
        refer_score: None,
        latency_ms: 1534.0,
        frame_number: 7,
        source_state: "camera ok: /dev/video0 1920x1080 MJPG 30 fps".into(),
        source_ok: true,
        model_version: Some("ma-cascade 2025-06-01 int8".into()),
    };
    check("wide-edges", &frame, &view);
}
