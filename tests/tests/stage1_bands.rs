//! Stage 1 over horizontal bands (how `detect` runs it, to bound memory) gives the map of
//! one whole-image run (the image padded with zeros to the input multiple, as the trainer
//! runs it), for any number of bands and image sizes that do not divide evenly.

use std::path::Path;

use ma_core::manifest::{Manifest, Variant};
use ma_core::preprocess::{FovSource, PreprocessConfig, preprocess};
use ma_core::signing::ModelTrust;
use ma_device::cascade::onnx::{Stage1Model, band};
use ma_synthetic::{SyntheticParams, generate};

#[test]
fn banded_stage1_map_equals_the_whole_image_map() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("stage1-bands-models");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let key = ma_tests::export_untrained_models(&dir, 5, "bands-test", [0.5, 0.5, 0.5]);
    let manifest = Manifest::load_trusted(&dir, &ModelTrust::key_file(&key).unwrap()).unwrap();
    let stage1 = Stage1Model::from_manifest(&manifest, Variant::Float).unwrap();
    for (width, height) in [(420, 380), (333, 517)] {
        let params = SyntheticParams {
            width,
            height,
            fov_diameter: width.min(height) as f64 * 0.9,
            ..SyntheticParams::default()
        };
        let frame = generate(&params, 2);
        // A small canonical scale keeps the maps small (the test is about stitching).
        let cfg = PreprocessConfig {
            canonical_fov_diameter: 360.0,
            ..PreprocessConfig::default()
        };
        let pre = preprocess(&frame.image, FovSource::Estimate, &cfg).unwrap();
        assert!(pre.planes.height < 700, "{}", pre.planes.height);
        let (h, w) = (pre.planes.height, pre.planes.width);
        let padded = band(&pre.planes, 0, h.next_multiple_of(4), w.next_multiple_of(4));
        let full = stage1.run(&padded).unwrap();
        // The cells covering the image.
        let (mw, mh) = (w.div_ceil(2), h.div_ceil(2));
        let mut whole = full.clone();
        whole.width = mw;
        whole.height = mh;
        whole.data = (0..mh)
            .flat_map(|r| full.data[r * full.width..][..mw].to_vec())
            .collect();
        let spread = whole
            .data
            .iter()
            .fold(0f32, |m, &v| m.max((v - whole.data[0]).abs()));
        assert!(spread > 1e-4, "a constant map would not test the stitching");
        for bands in [1, 2, 3, 4, 7, 1000] {
            let banded = stage1.run_in_bands(&pre.planes, bands).unwrap();
            assert_eq!(
                (banded.width, banded.height, banded.stride, banded.offset),
                (whole.width, whole.height, whole.stride, whole.offset),
                "{bands} bands"
            );
            let diff = banded
                .data
                .iter()
                .zip(&whole.data)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                diff <= 1e-6,
                "{width}x{height}, {bands} bands: max difference {diff}"
            );
        }
    }
}
