//! Any bytes through image decoding and preprocessing, as `detect` and the folder source
//! read files: errors are fine, panics, hangs and runaway memory are not.
//!
//! Preprocessing runs at a canonical FOV diameter of 256 px instead of 1410: the same code
//! paths, a thirtieth of the pixels, so the fuzzer tries far more inputs per second.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ma_core::image_io::{MAX_SIDE, MIN_SIDE, decode_image, one_line};
use ma_core::preprocess::{FovSource, PreprocessConfig, preprocess};

fuzz_target!(|data: &[u8]| {
    let img = match decode_image(data) {
        Ok(img) => img,
        Err(e) => {
            // The reason goes into a one-line JSON field.
            let _ = one_line(&format!("{e:#}"));
            return;
        }
    };
    let (w, h) = img.dimensions();
    assert!((MIN_SIDE..=MAX_SIDE).contains(&w) && (MIN_SIDE..=MAX_SIDE).contains(&h));
    let cfg = PreprocessConfig {
        canonical_fov_diameter: 256.0,
        ..PreprocessConfig::default()
    };
    let Ok(pre) = preprocess(&img, FovSource::Estimate, &cfg) else {
        return;
    };
    assert_eq!(pre.original_size, (w, h));
    assert_eq!(
        pre.planes.data.len(),
        3 * pre.planes.width * pre.planes.height
    );
    assert!(
        pre.planes
            .data
            .iter()
            .all(|v| v.is_finite() && v.abs() <= cfg.clip),
        "planes hold a value that is not finite or not clipped"
    );
    let (x, y) = pre.scale.to_original(0.0, 0.0);
    assert!(x.is_finite() && y.is_finite());
});
