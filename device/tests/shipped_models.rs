//! The models shipped in `models/`, through the device cascade (tract): they load, their
//! hashes are checked, and they find microaneurysms where the synthetic generator put them.

use std::path::PathBuf;

use ma_device::cascade::Cascade;
use ma_device::manifest::{Manifest, Variant};
use ma_device::synthetic::{SyntheticParams, generate};

fn shipped() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models");
    assert!(
        dir.join("manifest.toml").is_file(),
        "the shipped models are missing: {} has no manifest.toml",
        dir.display()
    );
    dir
}

#[test]
fn shipped_models_find_synthetic_microaneurysms_within_3_px() {
    let dir = shipped();
    let mut total = 0;
    let mut found = 0;
    for variant in [Variant::Float, Variant::Int8] {
        let cascade = Cascade::load(&dir, Some(variant)).expect("shipped models load");
        for seed in 1..=3 {
            let frame = generate(&SyntheticParams::default(), seed);
            let result = cascade.detect(&frame.image).expect("detect");
            let mas = &frame.microaneurysms;
            assert!(!mas.is_empty());
            // The best 2 detections per MA the image holds.
            let best = &result.detections[..result.detections.len().min(2 * mas.len())];
            let hits = mas
                .iter()
                .filter(|m| best.iter().any(|d| (d.x - m.x).hypot(d.y - m.y) <= 3.0))
                .count();
            eprintln!(
                "{variant:?} seed {seed}: {hits}/{} MAs within 3 px among the best {}",
                mas.len(),
                best.len()
            );
            total += mas.len();
            found += hits;
        }
    }
    // Measured with models 0.2.0: 29/36 per variant (7-11 of 12 per frame).
    assert!(
        found * 10 >= total * 7,
        "only {found} of {total} synthetic MAs found within 3 px"
    );
}

#[test]
fn shipped_manifest_describes_the_shipped_files() {
    let dir = shipped();
    let m = Manifest::load(&dir).expect("manifest");
    assert_eq!(m.models.len(), 4, "stage 1 and 2, float and int8");
    for entry in &m.models {
        m.verify_file(entry).expect("sha256 matches");
        let size = std::fs::metadata(dir.join(&entry.file)).unwrap().len();
        if entry.variant == Variant::Int8 {
            assert!(size < 1_000_000, "{} is {size} B", entry.file);
        }
    }
    let ops = &m.operating_points;
    assert!(
        ops.fp_per_image_1 >= ops.fp_per_image_2 && ops.fp_per_image_2 >= ops.fp_per_image_4,
        "fewer false positives need a higher score: {ops:?}"
    );
    assert!(m.training.cv_cpm > 0.0 && m.training.cv_cpm < 1.0);
}
