//! The exported ONNX models compute what the tch nets compute: in tract (the device
//! runtime, loaded through a manifest as on the device) and in onnxruntime (the
//! reference, after `onnx.checker.check_model(full_check=True)`), for both stages and
//! both weight formats. Randomly initialised nets: no training needed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use ma_device::cascade::candidates::{CandidateConfig, ProbMap};
use ma_device::cascade::onnx::{Stage1Model, Stage2Model};
use ma_device::geometry::Planes;
use ma_device::manifest::{Manifest, ModelEntry, OperatingPoints, Role, Training, Variant};
use ma_device::preprocess::PreprocessConfig;
use ma_trainer::export::{
    WeightFormat, dequantize_per_channel, onnx_model, quantize_per_channel, write_onnx,
};
use ma_trainer::nets::{Layer, Net, Stage};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Float export vs tch, in tract and onnxruntime.
const FLOAT_TOLERANCE: f32 = 1e-4;
/// int8-weights export vs the float net: quantisation error only, a sanity bound. The
/// exact check of the int8 file is against tch running the dequantised weights
/// ([`FLOAT_TOLERANCE`]). Random nets overstate the error: their logits share a large
/// common offset (about 12 for stage 2 here) that quantisation perturbs by ~0.3% while
/// [`temper`] scales the small varying part up to a useful range (measured: 0.039 for
/// stage 1, 0.066 for stage 2). How much int8 costs a *trained* model is a question
/// for validation (CPM of both variants), not for this test.
const INT8_VS_FLOAT_TOLERANCE: f32 = 0.1;

/// tch's random initialisation uses one global generator: one test at a time builds nets.
static TCH: Mutex<()> = Mutex::new(());

fn net(stage: Stage, seed: i64) -> (VarStore, Net) {
    tch::manual_seed(seed);
    let vs = VarStore::new(Device::Cpu);
    let net = Net::new(&vs.root(), stage);
    (vs, net)
}

/// A copy of `vs` whose Conv/Linear weights went through the int8 round trip the
/// int8 export stores, so tch computes exactly what the int8 file means.
fn dequantised_copy(stage: Stage, vs: &VarStore) -> (VarStore, Net) {
    let mut copy = VarStore::new(Device::Cpu);
    let net = Net::new(&copy.root(), stage);
    copy.copy(vs).unwrap();
    let vars = copy.variables();
    for layer in stage.layers() {
        let name = match layer {
            Layer::Conv { name, .. } | Layer::Linear { name, .. } => name,
            _ => continue,
        };
        let mut w = vars[&format!("{name}.weight")].shallow_clone();
        let values = Vec::<f32>::try_from(&w.flatten(0, -1)).unwrap();
        let (q, s) = quantize_per_channel(&values, w.size()[0] as usize);
        let back = Tensor::from_slice(&dequantize_per_channel(&q, &s)).view(w.size().as_slice());
        tch::no_grad(|| w.copy_(&back));
    }
    (copy, net)
}

/// Rescales and shifts the last layer so the logit difference (MA minus non-MA) on
/// `input` has mean 0 and standard deviation 1.5: random nets give near-constant,
/// saturated probabilities, against which any export would "match".
fn temper(stage: Stage, vs: &VarStore, net: &Net, input: &Tensor) {
    let last = match stage {
        Stage::Basic | Stage::Refine => "fc3",
        Stage::Final => "fc2",
    };
    let logits = net.forward_t(input, false);
    let d = logits.select(1, 1) - logits.select(1, 0);
    let (mean, std) = (
        d.mean(Kind::Double).double_value(&[]),
        d.std(true).double_value(&[]),
    );
    let factor = 1.5 / std.max(1e-6);
    let vars = vs.variables();
    let mut w = vars[&format!("{last}.weight")].shallow_clone();
    let mut b = vars[&format!("{last}.bias")].shallow_clone();
    let shift = Tensor::from_slice(&[mean / 2.0, -mean / 2.0]).to_kind(Kind::Float);
    tch::no_grad(|| {
        let _ = w.f_mul_scalar_(factor).unwrap();
        let _ = b.f_add_(&shift).unwrap();
        let _ = b.f_mul_scalar_(factor).unwrap();
    });
}

/// The MA probabilities must be informative for a comparison to mean anything.
fn assert_not_saturated(p: &[f32]) {
    let (lo, hi) = p
        .iter()
        .fold((1f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    assert!(lo < 0.45 && hi > 0.55, "probabilities in [{lo}, {hi}]");
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.contiguous().flatten(0, -1)).unwrap()
}

/// The simple .npy format: magic, version 1.0, header dict padded to 64 bytes,
/// little-endian f32 data.
fn write_npy(path: &Path, shape: &[i64], data: &[f32]) {
    assert_eq!(shape.iter().product::<i64>() as usize, data.len());
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(path, bytes).unwrap();
}

/// Runs `scripts/check_onnx.py` (check_model(full_check) + onnxruntime vs `expected`)
/// with the venv's python; returns whether it passed and what it printed.
fn run_check_onnx(model: &Path, input: &Tensor, expected: &Tensor, atol: f32) -> (bool, String) {
    let venv = std::env::var("MA_VENV").expect(
        "MA_VENV is not set: source scripts/torch-env.sh (it provides the venv with onnx and \
         onnxruntime)",
    );
    let python = PathBuf::from(venv).join("bin/python");
    let dir = model.parent().unwrap();
    let stem = model.file_stem().unwrap().to_string_lossy();
    let (x, y) = (
        dir.join(format!("{stem}-input.npy")),
        dir.join(format!("{stem}-expected.npy")),
    );
    write_npy(&x, &input.size(), &to_vec(input));
    write_npy(&y, &expected.size(), &to_vec(expected));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/check_onnx.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(model)
        .arg(&x)
        .arg(&y)
        .arg("--atol")
        .arg(atol.to_string())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(
        out.status.code(),
        Some(2),
        "check_onnx.py cannot run (onnx / onnxruntime missing?):\n{text}"
    );
    (out.status.success(), text)
}

fn check_with_onnxruntime(model: &Path, input: &Tensor, expected: &Tensor, atol: f32) {
    let (ok, text) = run_check_onnx(model, input, expected, atol);
    assert!(ok, "check_onnx.py failed:\n{text}");
    eprint!("{text}");
}

/// Exports float and int8 of `stage` to `dir` and returns their file names and sizes.
fn export_both(stage: Stage, vs: &VarStore, dir: &Path) -> [(String, u64); 2] {
    [WeightFormat::Float, WeightFormat::Int8Weights].map(|format| {
        let file = format!("{}-{}.onnx", stage.name(), format.name());
        write_onnx(dir.join(&file), &onnx_model(stage, vs, format).unwrap()).unwrap();
        let size = std::fs::metadata(dir.join(&file)).unwrap().len();
        (file, size)
    })
}

/// A manifest over whatever model files of `dir` exist, so the device side loads
/// through verified bytes exactly as in the field.
fn manifest(dir: &Path, entries: &[(Role, Variant, &str)]) -> Manifest {
    let models = entries
        .iter()
        .map(|&(role, variant, file)| {
            ModelEntry::for_file(dir, file, role, variant, 101, Stage::BASIC_STRIDE).unwrap()
        })
        .collect();
    let m = Manifest {
        version: "parity-test".into(),
        default_variant: Variant::Float,
        patch_size: 101,
        preprocess: PreprocessConfig::default(),
        stage1: CandidateConfig {
            threshold: 0.5,
            max_candidates: 100,
            search_radius: 6,
            merge_distance: 4.0,
        },
        operating_points: OperatingPoints {
            fp_per_image_1: 0.5,
            fp_per_image_2: 0.4,
            fp_per_image_4: 0.3,
        },
        training: Training {
            data: "random initialisation".into(),
            images: 0,
            licence: "research use only".into(),
            cv_cpm: 0.0,
        },
        models,
        dir: dir.to_path_buf(),
    };
    m.write(dir).unwrap();
    Manifest::load(dir).unwrap()
}

fn planes_of(image: &Tensor) -> Planes {
    let size = image.size();
    Planes {
        width: size[3] as usize,
        height: size[2] as usize,
        data: to_vec(image),
    }
}

fn map_matches(map: &ProbMap, expected: &Tensor) -> f32 {
    // expected: tch softmax output [1, 2, H', W'].
    let size = expected.size();
    assert_eq!(
        (map.height, map.width),
        (size[2] as usize, size[3] as usize)
    );
    max_abs_diff(&map.data, &to_vec(&expected.select(1, 1)))
}

#[test]
fn stage1_export_matches_tch_in_tract_and_onnxruntime() {
    let guard = TCH.lock().unwrap_or_else(|e| e.into_inner());
    let stage = Stage::Basic;
    let (vs, net) = net(stage, 11);
    let image = Tensor::randn([1, 3, 181, 245], (Kind::Float, Device::Cpu));
    let small = Tensor::randn([1, 3, 117, 140], (Kind::Float, Device::Cpu));
    temper(stage, &vs, &net, &image);
    let (_vs8, net8) = dequantised_copy(stage, &vs);
    drop(guard);
    let tmp = tempfile::tempdir().unwrap();
    let [(float_file, float_size), (int8_file, int8_size)] = export_both(stage, &vs, tmp.path());
    let m = manifest(
        tmp.path(),
        &[
            (Role::Stage1, Variant::Float, &float_file),
            (Role::Stage1, Variant::Int8, &int8_file),
        ],
    );

    let probs = |n: &Net, x: &Tensor| n.forward_t(x, false).softmax(1, Kind::Float);
    let (want, want8) = (probs(&net, &image), probs(&net8, &image));
    assert_eq!(want.size(), [1, 2, 11, 19]);

    let float = Stage1Model::from_manifest(&m, Variant::Float).unwrap();
    let int8 = Stage1Model::from_manifest(&m, Variant::Int8).unwrap();
    let got = float.run(&planes_of(&image)).unwrap();
    let got8 = int8.run(&planes_of(&image)).unwrap();
    assert_eq!((got.stride, got.offset), (8, 50));
    assert_not_saturated(&got.data);
    let d_float = map_matches(&got, &want);
    let d_int8 = map_matches(&got8, &want8);
    let d_quant = max_abs_diff(&got8.data, &got.data);
    eprintln!(
        "stage 1: tract vs tch float {d_float:.2e}, int8 {d_int8:.2e}; int8 vs float {d_quant:.2e}; \
         files {float_size} B float, {int8_size} B int8; probabilities in [{:.3}, {:.3}]",
        got.data.iter().copied().fold(1.0, f32::min),
        got.data.iter().copied().fold(0.0, f32::max),
    );
    assert!(d_float <= FLOAT_TOLERANCE, "float: {d_float}");
    assert!(
        d_int8 <= FLOAT_TOLERANCE,
        "int8 vs dequantised tch: {d_int8}"
    );
    assert!(
        d_quant < INT8_VS_FLOAT_TOLERANCE,
        "int8 vs float: {d_quant}"
    );
    assert!(
        int8_size * 10 <= float_size * 3,
        "int8 file {int8_size} B is over 30% of the float file {float_size} B"
    );

    // Same numbers on a thread pool (process-wide; other tests only see a speed change).
    ma_device::cascade::onnx::set_threads(2);
    let pooled = float.run(&planes_of(&image));
    ma_device::cascade::onnx::set_threads(1);
    assert!(max_abs_diff(&pooled.unwrap().data, &got.data) <= 1e-6);

    // A second input size gets its own plan; the first size's plan still gives the
    // same answer afterwards.
    let got_small = float.run(&planes_of(&small)).unwrap();
    assert!(map_matches(&got_small, &probs(&net, &small)) <= FLOAT_TOLERANCE);
    assert_eq!(float.run(&planes_of(&image)).unwrap(), got);
    assert!(
        float.run(&Planes::zeros(100, 300)).is_err(),
        "input under one patch"
    );

    for (file, input, expected) in [(&float_file, &image, &want), (&int8_file, &image, &want8)] {
        check_with_onnxruntime(&tmp.path().join(file), input, expected, FLOAT_TOLERANCE);
    }
}

#[test]
fn stage2_export_matches_tch_in_tract_and_onnxruntime() {
    // The shipped stage 2 (the refined basic CNN) and the papers' final CNN.
    stage2_parity(Stage::Refine, 12);
    stage2_parity(Stage::Final, 16);
}

fn stage2_parity(stage: Stage, seed: i64) {
    let guard = TCH.lock().unwrap_or_else(|e| e.into_inner());
    let (vs, net) = net(stage, seed);
    let patches = Tensor::randn([5, 3, 101, 101], (Kind::Float, Device::Cpu));
    temper(stage, &vs, &net, &patches);
    let (_vs8, net8) = dequantised_copy(stage, &vs);
    drop(guard);
    let tmp = tempfile::tempdir().unwrap();
    let [(float_file, float_size), (int8_file, int8_size)] = export_both(stage, &vs, tmp.path());
    let m = manifest(
        tmp.path(),
        &[
            (Role::Stage2, Variant::Float, &float_file),
            (Role::Stage2, Variant::Int8, &int8_file),
        ],
    );

    let probs = |n: &Net| n.patch_logits(&patches, false).softmax(1, Kind::Float);
    let (want, want8) = (probs(&net), probs(&net8));
    let (want_ma, want8_ma) = (to_vec(&want.select(1, 1)), to_vec(&want8.select(1, 1)));
    let flat = to_vec(&patches);

    let float = Stage2Model::from_manifest(&m, Variant::Float, 32).unwrap();
    let int8 = Stage2Model::from_manifest(&m, Variant::Int8, 32).unwrap();
    // Batch 2: two full batches and a padded one.
    let float2 = Stage2Model::from_manifest(&m, Variant::Float, 2).unwrap();
    let got = float.run(&flat, 5).unwrap();
    let got8 = int8.run(&flat, 5).unwrap();
    let got2 = float2.run(&flat, 5).unwrap();
    assert_not_saturated(&got);
    let d_float = max_abs_diff(&got, &want_ma);
    let d_int8 = max_abs_diff(&got8, &want8_ma);
    let d_quant = max_abs_diff(&got8, &got);
    eprintln!(
        "stage 2 ({stage:?}): tract vs tch float {d_float:.2e}, int8 {d_int8:.2e}; int8 vs float {d_quant:.2e}; \
         files {float_size} B float, {int8_size} B int8; probabilities {got:?}"
    );
    assert!(d_float <= FLOAT_TOLERANCE, "float: {d_float}");
    assert!(max_abs_diff(&got2, &want_ma) <= FLOAT_TOLERANCE, "batch 2");
    assert!(
        d_int8 <= FLOAT_TOLERANCE,
        "int8 vs dequantised tch: {d_int8}"
    );
    assert!(
        d_quant < INT8_VS_FLOAT_TOLERANCE,
        "int8 vs float: {d_quant}"
    );
    assert!(
        int8_size * 10 <= float_size * 3,
        "int8 file {int8_size} B is over 30% of the float file {float_size} B"
    );
    assert!(
        float.run(&flat, 4).is_err(),
        "patch count must match the data"
    );
    assert_eq!(float.run(&[], 0).unwrap(), Vec::<f32>::new());

    for (file, expected) in [(&float_file, &want), (&int8_file, &want8)] {
        check_with_onnxruntime(&tmp.path().join(file), &patches, expected, FLOAT_TOLERANCE);
    }
}

#[test]
fn export_refuses_a_var_store_that_does_not_fit_the_stage() {
    let guard = TCH.lock().unwrap_or_else(|e| e.into_inner());
    let (vs, _net) = net(Stage::Basic, 13);
    drop(guard);
    let err = format!(
        "{:#}",
        onnx_model(Stage::Final, &vs, WeightFormat::Float).unwrap_err()
    );
    assert!(err.contains("conv1.weight"), "{err}");
}

#[test]
fn a_modified_model_file_is_not_loaded() {
    let guard = TCH.lock().unwrap_or_else(|e| e.into_inner());
    let (vs, _net) = net(Stage::Final, 14);
    drop(guard);
    let tmp = tempfile::tempdir().unwrap();
    let [(float_file, _), (int8_file, _)] = export_both(Stage::Final, &vs, tmp.path());
    let m = manifest(
        tmp.path(),
        &[
            (Role::Stage2, Variant::Float, &float_file),
            (Role::Stage2, Variant::Int8, &int8_file),
        ],
    );
    // Overwrite the float file with the int8 one: a valid model, but not the one listed.
    std::fs::copy(tmp.path().join(&int8_file), tmp.path().join(&float_file)).unwrap();
    let err = format!(
        "{:#}",
        Stage2Model::from_manifest(&m, Variant::Float, 8)
            .err()
            .unwrap()
    );
    assert!(
        err.contains(&float_file) && err.contains("SHA-256"),
        "{err}"
    );
    Stage2Model::from_manifest(&m, Variant::Int8, 8).unwrap();
}

#[test]
fn check_onnx_py_reports_a_wrong_output_and_a_broken_file() {
    let guard = TCH.lock().unwrap_or_else(|e| e.into_inner());
    let (vs, net) = net(Stage::Final, 15);
    let patches = Tensor::randn([2, 3, 101, 101], (Kind::Float, Device::Cpu));
    drop(guard);
    let tmp = tempfile::tempdir().unwrap();
    let [(file, _), _] = export_both(Stage::Final, &vs, tmp.path());
    let model = tmp.path().join(&file);
    let want = net.patch_logits(&patches, false).softmax(1, Kind::Float);
    let (ok, text) = run_check_onnx(&model, &patches, &(want + 0.01), FLOAT_TOLERANCE);
    assert!(!ok && text.contains("differs"), "{text}");
    std::fs::write(&model, b"not a model").unwrap();
    let (ok, text) = run_check_onnx(&model, &patches, &patches, FLOAT_TOLERANCE);
    assert!(!ok && text.contains(&file), "{text}");
}
