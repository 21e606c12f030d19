//! Cross-crate tests live in `tests/tests/`; this library holds the fixtures they share.

use std::path::Path;

use ma_device::manifest::{Training, Variant};
use ma_trainer::export::export_model_set;
use ma_trainer::nets::{Net, Stage};

/// Export a model set of untrained networks (seeded) into `out`: real ONNX files and a
/// manifest with hashes, in seconds, for tests of what surrounds the cascade (the loop,
/// bad inputs) rather than its accuracy. `operating_points`: scores at 1, 2 and 4 FP/image.
pub fn export_untrained_models(out: &Path, seed: i64, version: &str, operating_points: [f64; 3]) {
    tch::manual_seed(seed);
    let stage1 = tch::nn::VarStore::new(tch::Device::Cpu);
    let _net1 = Net::new(&stage1.root(), Stage::Basic);
    let stage2 = tch::nn::VarStore::new(tch::Device::Cpu);
    let _net2 = Net::new(&stage2.root(), Stage::Final);
    let training = Training {
        data: format!("none (untrained, {version})"),
        images: 0,
        licence: "test fixture".into(),
        cv_cpm: 0.0,
    };
    export_model_set(
        &stage1,
        (Stage::Final, &stage2),
        out,
        version,
        Variant::Float,
        operating_points,
        training,
    )
    .expect("exporting an untrained model set");
}
