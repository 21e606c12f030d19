//! The referral network's lesion-level evaluations on a real lesion set: Quellec et al.'s
//! FROC of S1-heatmap maxima and Zoom-in-Net's attention coverage, end to end with an
//! untrained network (what is tested is that every photo and lesion is scored, not the
//! figures; those are in the model card).

use std::path::Path;

use ma_trainer::datasets::{Dataset, DatasetKind, LoadOptions, Split};
use ma_trainer::referral::ReferralNet;
use ma_trainer::referral_run::{attention_coverage, heatmap_froc, heatmaps};

#[test]
fn heatmap_froc_and_coverage_score_every_lesion_of_diaretdb1() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/datasets/diaretdb1");
    assert!(
        root.is_dir(),
        "the real datasets are missing: {}",
        root.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    ma_tests::export_untrained_models_with_referral(&models, 21, "froc-test", [0.5; 3], 64);
    tch::manual_seed(21);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _net = ReferralNet::new(&vs.root());
    let weights = dir.path().join("referral.safetensors");
    vs.save(&weights).unwrap();
    let load = LoadOptions {
        split: Some(Split::Train),
        confidence_threshold: 0.5,
    };
    let data = Dataset::load(DatasetKind::Diaretdb1, &root, &load).unwrap();

    let (report, found, lesions) = heatmap_froc(&weights, &models, &data).unwrap();
    assert_eq!(lesions, 245, "every lesion of the 28 training photos");
    assert!(found <= lesions);
    assert_eq!(report.sensitivities.len(), 7);
    assert!((0.0..=1.0).contains(&report.cpm), "{}", report.cpm);

    let c = attention_coverage(&weights, &models, &data).unwrap();
    assert_eq!((c.photos, c.lesions, c.cells), (28, 245, 16));
    assert!(c.cells_for_50 <= c.cells_for_80 && c.cells_for_80 <= c.cells + 1);

    // A model set without a referral network says so.
    let plain = dir.path().join("plain");
    ma_tests::export_untrained_models(&plain, 22, "plain", [0.5; 3]);
    let e = format!("{:#}", heatmap_froc(&weights, &plain, &data).unwrap_err());
    assert!(e.contains("no [referral] section"), "{e}");
}

/// The workstation's `heatmap` scores a photo as the device does: with the crop
/// classifier's weights, its score is the device's `refer_score` (tch against tract, the
/// zoom-in crops included); it writes both pictures.
#[test]
fn workstation_heatmap_scores_a_photo_as_the_device_does() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    let key =
        ma_tests::export_untrained_models_with_referral(&models, 23, "heat-test", [0.5; 3], 64);
    let (weights, zoom) = ma_tests::untrained_referral_weights(&models);
    let photo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo/photos/IDRiD_03.jpg");
    let out = dir.path().join("heat");
    let scores = heatmaps(&weights, Some(&zoom), &models, &photo, &out).unwrap();
    assert_eq!(scores.len(), 1);
    for name in ["IDRiD_03-s1.png", "IDRiD_03-attention.png"] {
        assert!(out.join(name).is_file(), "{name}");
    }
    let trust = ma_core::signing::ModelTrust::key_file(&key).unwrap();
    let device =
        ma_device::cascade::Cascade::load(&models, Some(ma_core::manifest::Variant::Float), &trust)
            .unwrap();
    let image = ma_core::image_io::read_image(&photo).unwrap();
    let on_device = device.detect(&image).unwrap().referral.unwrap().score;
    let d = (scores[0].1 - on_device).abs();
    assert!(
        d < 1e-4,
        "workstation {} vs device {on_device}",
        scores[0].1
    );
    // Without the crop classifier the network's own score, which differs.
    let own = heatmaps(&weights, None, &models, &photo, &out).unwrap();
    assert!(
        (own[0].1 - on_device).abs() > 1e-6,
        "{} vs {on_device}",
        own[0].1
    );
}
