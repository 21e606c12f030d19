//! The whole product path on synthetic fundus images with known MAs: train both stages
//! briefly with tch, export ONNX + manifest, load them through the device's tract cascade
//! (hashes checked), detect, and check that the workstation (tch) and the device (tract)
//! give the same detections, with the training-only options on (stage 1's ground-truth
//! feature enhancement, stage 2's triplet term), and again with the multi-scale stage 1.
//! Also: a model file with a flipped byte is refused.
//!
//! The training budget here (a few hundred steps) is far too small for an accurate
//! detector; accuracy is measured by `ma-trainer cv` on real data, not here.

use ma_core::manifest::{Training, Variant};
use ma_core::preprocess::{FovSource, PreprocessConfig, preprocess};
use ma_core::signing::ModelTrust;
use ma_device::cascade::Cascade;
use ma_synthetic::{SyntheticFundus, SyntheticParams, generate};
use ma_trainer::export::{Release, export_model_set};
use ma_trainer::ground_truth::GroundTruth;
use ma_trainer::nets::InputScales;
use ma_trainer::pipeline::{PipelineConfig, reported, run_cascade, train_cascade};
use ma_trainer::prepare::PreparedImage;
use ma_trainer::train::Triplet;
use ma_trainer::training_data::DeviceSettings;

fn truth(frame: &SyntheticFundus) -> GroundTruth {
    GroundTruth::from_synthetic(frame)
}

#[test]
fn trained_exported_and_detected_on_synthetic_images() {
    // Both training-only seed options on: stage 1 with the ground-truth feature
    // enhancement, stage 2 with the triplet term. The exported graphs are the plain
    // networks, so the device (tract) agrees with the workstation's plain forward pass
    // (tch) below only if neither option leaks into them.
    train_export_detect(PipelineConfig {
        stage1_gt_enhance: Some(1.5),
        stage2_triplet: Some(Triplet {
            weight: 0.5,
            margin: 0.2,
        }),
        ..PipelineConfig::default()
    });
}

#[test]
fn multi_scale_stage1_trained_exported_and_detected() {
    // `--stage1-scales 1,0.5`: the exported stage 1 rescales inside its graph, and the
    // device runs it in bands with the geometry the manifest gives.
    train_export_detect(PipelineConfig {
        stage1_scales: InputScales::parse("1,0.5").unwrap(),
        ..PipelineConfig::default()
    });
}

/// Trains the cascade of `pipeline` briefly on synthetic images, exports it, and checks
/// that the device and the workstation detect the same MAs on a held-out one.
fn train_export_detect(mut pipeline: PipelineConfig) {
    let params = SyntheticParams {
        n_microaneurysms: 20,
        ..SyntheticParams::default()
    };
    // Settings that differ from every default, so the device can only match the
    // workstation if they travel from training through the manifest: a canonical FOV
    // of 1200 px shrinks these 1400-px frames (the default leaves them as they are).
    let cfg = PreprocessConfig {
        canonical_fov_diameter: 1200.0,
        ..PreprocessConfig::default()
    };
    let images: Vec<PreparedImage> = (1..=4)
        .map(|seed| {
            let frame = generate(&params, seed);
            let pre = preprocess(&frame.image, FovSource::Estimate, &cfg).unwrap();
            PreparedImage::from_parts("synthetic", format!("synthetic-{seed}"), pre, truth(&frame))
        })
        .collect();
    pipeline.candidates.max_candidates = 97;
    pipeline.stage1.epochs = 2;
    pipeline.stage1_crops = 96;
    pipeline.stage2.epochs = 1;
    let dir = tempfile::tempdir().unwrap();
    let all: Vec<usize> = (0..images.len()).collect();
    let cascade = train_cascade(
        &images,
        &all,
        &[],
        &pipeline,
        &dir.path().join("run"),
        false,
    )
    .unwrap();

    let models = dir.path().join("models");
    let training = Training {
        data: "synthetic test images".into(),
        images: images.len(),
        licence: "test fixture".into(),
        cv_cpm: 0.0,
    };
    export_model_set(
        &cascade.stage1.0,
        &cascade.stage2.0,
        &models,
        &Release {
            version: "e2e-test".to_string(),
            default_variant: Variant::Float,
            operating_points: [0.5, 0.5, 0.5],
            training,
            settings: DeviceSettings::of(&cfg, &pipeline),
        },
    )
    .unwrap();
    let manifest = ma_core::manifest::Manifest::load(&models).unwrap();
    assert_eq!(manifest.preprocess, cfg);
    assert_eq!(manifest.stage1, pipeline.candidates);

    // A held-out synthetic image through the device cascade.
    let device = Cascade::load(&models, Some(Variant::Float), &ModelTrust::Unsigned).unwrap();
    let test = generate(&params, 99);
    let result = device.detect(&test.image).unwrap();
    assert!(!result.detections.is_empty());
    assert_eq!((result.width, result.height), test.image.dimensions());

    // The workstation (tch) and the device (tract) see the same candidates with the same
    // scores: one preprocessing, one candidate code, parity-checked models.
    let pre = preprocess(&test.image, FovSource::Estimate, &cfg).unwrap();
    let held_out = vec![PreparedImage::from_parts(
        "synthetic",
        "held-out".into(),
        pre,
        truth(&test),
    )];
    let run = run_cascade(&cascade, &held_out, 0, &pipeline.candidates);
    let workstation = reported(&run.detections(&held_out[0], &pipeline.scoring));
    assert_eq!(workstation.len(), result.detections.len());
    for (w, d) in workstation.iter().zip(&result.detections) {
        assert!(
            (w.x - d.x).abs() < 1e-9 && (w.y - d.y).abs() < 1e-9,
            "{w:?} vs {d:?}"
        );
        assert!((w.score - d.score).abs() < 1e-4, "{w:?} vs {d:?}");
    }
    for d in &result.detections {
        assert!((0.01..=1.0).contains(&d.score));
    }
    // int8 weights load too and give nearly the same scores on the same candidates.
    let int8 = Cascade::load(&models, Some(Variant::Int8), &ModelTrust::Unsigned)
        .unwrap()
        .detect(&test.image)
        .unwrap();
    assert!(!int8.detections.is_empty());

    // A flipped byte in a model file: refused, naming the file.
    let file = models.join("stage2-float.onnx");
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let err = format!(
        "{:#}",
        Cascade::load(&models, Some(Variant::Float), &ModelTrust::Unsigned)
            .err()
            .expect("refused")
    );
    assert!(err.contains("stage2-float.onnx"), "{err}");
}
