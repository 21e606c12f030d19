//! The models shipped in `models/`, through the device cascade (tract): they are signed by
//! the release key, their hashes are checked, a flipped byte anywhere is refused, and they
//! find microaneurysms where the synthetic generator put them.

use std::path::PathBuf;

use ma_core::manifest::{Manifest, Variant};
use ma_core::signing::{ModelTrust, PublicKey};
use ma_device::cascade::Cascade;
use ma_synthetic::{SyntheticParams, generate};

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
        let cascade = Cascade::load(&dir, Some(variant), &ModelTrust::release())
            .expect("shipped models load");
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
    // Measured: models 0.4.0 35/36 float, 36/36 int8; 0.3.2 (stage-1 weight 0.75) 34/36
    // float, 33/36 int8; 0.3.1 and 0.3.0
    // (weight 1.0) 35/36 per variant; 0.2.0 29/36. At weight 0.5 the 0.3.2 nets found 28-29/36
    // and failed this test: stage 2 alone transfers badly to images unlike DiaretDB1.
    assert!(
        found * 10 >= total * 9,
        "only {found} of {total} synthetic MAs found within 3 px"
    );
}

#[test]
fn shipped_manifest_describes_the_shipped_files() {
    let dir = shipped();
    let m = Manifest::load_trusted(&dir, &ModelTrust::release())
        .expect("manifest signed by the release key");
    assert_eq!(
        m.models.len(),
        8,
        "stage 1, stage 2, referral and zoom, float and int8"
    );
    let referral = m.referral.as_ref().expect("a [referral] section");
    assert!(referral.cv_auc > 0.5 && referral.cv_auc < 1.0);
    let zoom = referral.zoom.as_ref().expect("a [referral.zoom] section");
    assert_eq!(
        zoom.crops, referral.boxes,
        "the crops are the reported boxes"
    );
    for entry in &m.models {
        m.verify_file(entry).expect("sha256 matches");
        // The target: every shipped file under 1 MB.
        let size = std::fs::metadata(dir.join(&entry.file)).unwrap().len();
        assert!(size < 1_000_000, "{} is {size} B", entry.file);
    }
    let ops = &m.operating_points;
    assert!(
        ops.fp_per_image_1 >= ops.fp_per_image_2 && ops.fp_per_image_2 >= ops.fp_per_image_4,
        "fewer false positives need a higher score: {ops:?}"
    );
    assert!(m.training.cv_cpm > 0.0 && m.training.cv_cpm < 1.0);
}

/// The shipped referral network through tract: a score in [0, 1] and attention boxes
/// on the photo, int8 within a few hundredths of float (the CV's AUC is float's).
#[test]
fn shipped_referral_network_scores_every_photo_and_int8_follows_float() {
    let dir = shipped();
    let float = Cascade::load(&dir, Some(Variant::Float), &ModelTrust::release()).unwrap();
    let int8 = Cascade::load(&dir, Some(Variant::Int8), &ModelTrust::release()).unwrap();
    let boxes = float.referral_config().expect("a referral network").boxes;
    let mut worst: f64 = 0.0;
    for seed in 1..=3 {
        let frame = generate(&SyntheticParams::default(), seed);
        let (w, h) = frame.image.dimensions();
        let a = float
            .detect(&frame.image)
            .unwrap()
            .referral
            .expect("float referral");
        let b = int8
            .detect(&frame.image)
            .unwrap()
            .referral
            .expect("int8 referral");
        assert!((0.0..=1.0).contains(&a.score), "{}", a.score);
        assert_eq!(a.boxes.len(), boxes);
        for bx in &a.boxes {
            // Boxes overlap the photo (the input square may stick out of it).
            assert!(bx.x1 > 0.0 && bx.y1 > 0.0 && bx.x0 < w as f64 && bx.y0 < h as f64);
        }
        worst = worst.max((a.score - b.score).abs());
    }
    // Measured on the shipped set: see the model card ("Referral network", int8 vs float).
    assert!(
        worst <= 0.05,
        "int8 refer_score differs from float by {worst}"
    );
}

#[test]
fn a_flipped_byte_anywhere_in_the_shipped_bundle_is_refused() {
    let dir = shipped();
    // The committed key file is the built-in release key.
    let committed = PublicKey::read(&dir.join("../keys/models.pub")).expect("keys/models.pub");
    assert_eq!(committed.fingerprint(), PublicKey::release().fingerprint());

    let m = Manifest::load(&dir).unwrap();
    let mut files = vec!["manifest.toml".to_string(), "manifest.toml.sig".to_string()];
    files.extend(m.models.iter().map(|e| e.file.clone()));
    for file in &files {
        let bytes = std::fs::read(dir.join(file)).unwrap();
        // A few positions spread over the file; in the signature, over its hex line
        // (its # comment lines are for people and not signed).
        let start = if file.ends_with(".sig") {
            bytes[..bytes.len() - 1]
                .iter()
                .rposition(|&b| b == b'\n')
                .unwrap()
                + 1
        } else {
            0
        };
        let span = bytes.len() - start;
        for at in [start, start + span / 2, bytes.len() - 2] {
            let copy = tempfile::tempdir().unwrap();
            for f in &files {
                std::fs::copy(dir.join(f), copy.path().join(f)).unwrap();
            }
            let mut bad = bytes.clone();
            // Keep the hex file's digits hex, so the signature itself is what fails.
            bad[at] = if file.ends_with(".sig") {
                if bad[at] == b'0' { b'1' } else { b'0' }
            } else {
                bad[at] ^ 0x01
            };
            std::fs::write(copy.path().join(file), &bad).unwrap();
            // A model file is refused by the variant that lists it, the manifest and its
            // signature by both.
            let variants = match m.models.iter().find(|e| &e.file == file) {
                Some(e) => vec![e.variant],
                None => vec![Variant::Float, Variant::Int8],
            };
            for v in variants {
                let err = match Cascade::load(copy.path(), Some(v), &ModelTrust::release()) {
                    Ok(_) => panic!("{file}: byte {at} changed and the {v} bundle still loads"),
                    Err(e) => format!("{e:#}"),
                };
                assert!(
                    err.contains(file.as_str()) || err.contains("not a valid signature"),
                    "{file}: {err}"
                );
            }
        }
    }
}
