//! The exported ONNX models compute what the tch nets compute: in tract (the device
//! runtime, loaded through a manifest as on the device) and in onnxruntime (the
//! reference, after `onnx.checker.check_model(full_check=True)`), for both stages and
//! both weight formats. Randomly initialised nets (with random batch-norm statistics, so
//! their folding is exercised): no training needed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use ma_core::candidates::{CandidateConfig, ProbMap};
use ma_core::geometry::Planes;
use ma_core::manifest::{
    Manifest, ModelEntry, ModelGeometry, OperatingPoints, Role, Training, Variant,
};
use ma_core::preprocess::PreprocessConfig;
use ma_core::scoring::Scoring;
use ma_device::cascade::onnx::{PatchModel, ReferralModel, Stage1Model, band};
use ma_trainer::export::{WeightFormat, onnx_model, write_onnx};
use ma_trainer::nets::{InputScales, Layer, Net, Stage, referral_trunk};
use ma_trainer::referral::ReferralNet;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Float export vs tch, in tract and onnxruntime; int8 export in tract vs onnxruntime.
const FLOAT_TOLERANCE: f32 = 1e-4;
/// int8-weights export vs the float one: quantisation error only, a sanity bound on
/// margins tempered to a spread of 1.5 ([`temper`]). Random nets overstate it: the
/// random batch-norm scales (up to 3x) multiply stage 2's weight errors (measured 0.15).
/// How much int8 costs a *trained* model is measured by its CV CPM (model card), not here.
const INT8_VS_FLOAT_TOLERANCE: f32 = 0.25;

/// tch's random initialisation uses one global generator: one test at a time builds nets.
static TCH: Mutex<()> = Mutex::new(());

fn net(stage: Stage, seed: i64) -> (VarStore, Net) {
    tch::manual_seed(seed);
    let vs = VarStore::new(Device::Cpu);
    let net = Net::new(&vs.root(), stage);
    randomise_batch_norms(&vs, &stage.layers());
    (vs, net)
}

/// Batch norms start as the identity (mean 0, variance 1, scale 1, shift 0), which would
/// fold to nothing: give them statistics as training leaves them.
fn randomise_batch_norms(vs: &VarStore, layers: &[Layer]) {
    let vars = vs.variables();
    for layer in layers.iter().cloned() {
        if let Layer::BatchNorm { name, channels } = layer {
            let set = |what: &str, t: Tensor| {
                let mut v = vars[&format!("{name}.{what}")].shallow_clone();
                tch::no_grad(|| v.copy_(&t));
            };
            let rand = || Tensor::rand([channels], (Kind::Float, Device::Cpu));
            set("weight", rand() + 0.5);
            set("bias", rand() - 0.5);
            set("running_mean", rand() * 0.4 - 0.2);
            set("running_var", rand() * 2.0 + 0.2);
        }
    }
}

/// Rescales and shifts the last layer so the margin (MA minus non-MA) on `input` has
/// mean 0 and standard deviation 1.5: random nets give near-constant margins, against
/// which any export would "match".
fn temper(stage: Stage, vs: &VarStore, net: &Net, input: &Tensor) {
    let last = match stage {
        Stage::Candidates => "head",
        Stage::Verdict => "fc2",
    };
    let d = net.margin(input, false);
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

/// Scales the head layer `head` (weights and bias) so that `margins`, the net's margins
/// before, get a standard deviation of 1.5 (see [`temper`]).
fn scale_head(vs: &VarStore, head: &str, margins: &Tensor) {
    let factor = 1.5 / margins.std(true).double_value(&[]).max(1e-6);
    let vars = vs.variables();
    for what in ["weight", "bias"] {
        let mut v = vars[&format!("{head}.{what}")].shallow_clone();
        tch::no_grad(|| {
            let _ = v.f_mul_scalar_(factor).unwrap();
        });
    }
}

/// The checks every exported network passes: tract's float output (`float`) varies and is
/// within `d_float` (measured by the caller) of tch's; the int8 file's output (`int8`) is
/// close to float's; the int8 file is at most 30% of the float file (`sizes`: float, int8).
fn check_float_and_int8(net: &str, d_float: f32, float: &[f32], int8: &[f32], sizes: [u64; 2]) {
    assert_spread(float);
    let d_quant = max_abs_diff(int8, float);
    let [float_size, int8_size] = sizes;
    eprintln!(
        "{net}: tract vs tch float {d_float:.2e}; int8 vs float {d_quant:.2e}; \
         files {float_size} B float, {int8_size} B int8"
    );
    assert!(d_float <= FLOAT_TOLERANCE, "{net} float: {d_float}");
    assert!(
        d_quant < INT8_VS_FLOAT_TOLERANCE,
        "{net} int8 vs float: {d_quant}"
    );
    assert!(
        int8_size * 10 <= float_size * 3,
        "{net}: int8 file {int8_size} B is over 30% of the float file {float_size} B"
    );
}

/// The margins must vary for a comparison to mean anything.
fn assert_spread(m: &[f32]) {
    let (lo, hi) = m
        .iter()
        .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    assert!(hi - lo > 1.0, "margins in [{lo}, {hi}]");
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
/// through verified bytes exactly as in the field; stage 1's geometry is that of `scales`.
fn manifest(dir: &Path, scales: &InputScales, entries: &[(Stage, Variant, &str)]) -> Manifest {
    let models = entries
        .iter()
        .map(|&(stage, variant, file)| {
            let geometry = match stage {
                Stage::Candidates => ModelGeometry::Map {
                    receptive_field: scales.receptive_field(),
                    output_stride: Stage::CANDIDATES_STRIDE,
                    input_multiple: scales.input_multiple(),
                },
                Stage::Verdict => ModelGeometry::Patch(Stage::VERDICT_PATCH),
            };
            ModelEntry::for_file(dir, file, variant, geometry).unwrap()
        })
        .collect();
    let m = Manifest {
        version: "parity-test".into(),
        default_variant: Variant::Float,
        patch_size: Stage::VERDICT_PATCH,
        preprocess: PreprocessConfig::default(),
        stage1: CandidateConfig::default(),
        scoring: Scoring::default(),
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
        referral: None,
        models,
        reference_weights: Vec::new(),
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
    // expected: tch margins [1, H', W'].
    let size = expected.size();
    assert_eq!(
        (map.height, map.width),
        (size[1] as usize, size[2] as usize)
    );
    max_abs_diff(&map.data, &to_vec(expected))
}

#[test]
fn stage1_export_matches_tch_in_tract_and_onnxruntime() {
    let guard = TCH.lock().unwrap_or_else(|e| e.into_inner());
    let stage = Stage::Candidates;
    let (vs, net) = net(stage, 11);
    let image = Tensor::randn([1, 3, 180, 244], (Kind::Float, Device::Cpu));
    let small = Tensor::randn([1, 3, 116, 140], (Kind::Float, Device::Cpu));
    temper(stage, &vs, &net, &image);
    drop(guard);
    let tmp = tempfile::tempdir().unwrap();
    let [(float_file, float_size), (int8_file, int8_size)] = export_both(stage, &vs, tmp.path());
    let m = manifest(
        tmp.path(),
        &InputScales::single(),
        &[
            (stage, Variant::Float, &float_file),
            (stage, Variant::Int8, &int8_file),
        ],
    );

    let want = net.margin(&image, false);
    assert_eq!(want.size(), [1, 90, 122]);

    let float = Stage1Model::from_manifest(&m, Variant::Float).unwrap();
    let int8 = Stage1Model::from_manifest(&m, Variant::Int8).unwrap();
    let got = float.run(&planes_of(&image)).unwrap();
    let got8 = int8.run(&planes_of(&image)).unwrap();
    assert_eq!((got.stride, got.offset), (2, 0));
    let d_float = map_matches(&got, &want);
    check_float_and_int8(
        "stage 1",
        d_float,
        &got.data,
        &got8.data,
        [float_size, int8_size],
    );

    // Same numbers on a thread pool (process-wide; other tests only see a speed change).
    ma_device::cascade::onnx::set_threads(2);
    let pooled = float.run(&planes_of(&image));
    ma_device::cascade::onnx::set_threads(1);
    assert!(max_abs_diff(&pooled.unwrap().data, &got.data) <= 1e-6);

    // A second input size gets its own plan; the first size's plan still gives the
    // same answer afterwards.
    let got_small = float.run(&planes_of(&small)).unwrap();
    assert!(map_matches(&got_small, &net.margin(&small, false)) <= FLOAT_TOLERANCE);
    assert_eq!(float.run(&planes_of(&image)).unwrap(), got);
    let err = format!("{:#}", float.run(&Planes::zeros(102, 300)).unwrap_err());
    assert!(err.contains("multiple of 4"), "{err}");

    // onnxruntime: the float file against tch, the int8 file against tract.
    let tract8 = Tensor::from_slice(&got8.data).view([1, 1, 90, 122]);
    for (file, expected) in [(&float_file, want.unsqueeze(1)), (&int8_file, tract8)] {
        check_with_onnxruntime(&tmp.path().join(file), &image, &expected, FLOAT_TOLERANCE);
    }
}

#[test]
fn multi_scale_stage1_export_matches_tch_in_tract_and_onnxruntime() {
    // `--stage1-scales 1,0.5`: one image in, the half-size copy made inside the graph.
    let guard = TCH.lock().unwrap_or_else(|e| e.into_inner());
    let scales = InputScales::parse("1,0.5").unwrap();
    tch::manual_seed(17);
    let vs = VarStore::new(Device::Cpu);
    let net = Net::from_layers(&vs.root(), scales.layers());
    let image = Tensor::randn([1, 3, 176, 240], (Kind::Float, Device::Cpu));
    temper(Stage::Candidates, &vs, &net, &image);
    drop(guard);
    let tmp = tempfile::tempdir().unwrap();
    let [(float_file, float_size), (int8_file, int8_size)] =
        export_both(Stage::Candidates, &vs, tmp.path());
    let m = manifest(
        tmp.path(),
        &scales,
        &[
            (Stage::Candidates, Variant::Float, &float_file),
            (Stage::Candidates, Variant::Int8, &int8_file),
        ],
    );
    // The trunk's weights are written once and read by both branches.
    let model = onnx_model(Stage::Candidates, &vs, WeightFormat::Float).unwrap();
    let graph = model.graph.as_ref().unwrap();
    let conv1 = graph
        .initializer
        .iter()
        .filter(|t| t.name == "conv1.weight")
        .count();
    assert_eq!(conv1, 1);
    let ops = |op: &str| graph.node.iter().filter(|n| n.op_type == op).count();
    assert_eq!((ops("AveragePool"), ops("Conv")), (1, 2 * 7 + 1));
    let meta = |key: &str| {
        model
            .metadata_props
            .iter()
            .find(|p| p.key == key)
            .map(|p| p.value.clone())
    };
    assert_eq!(meta("input_scales").as_deref(), Some("1,0.5"));
    assert_eq!(
        meta("receptive_field"),
        Some(scales.receptive_field().to_string())
    );

    let want = net.margin(&image, false);
    assert_eq!(want.size(), [1, 88, 120]);
    let float = Stage1Model::from_manifest(&m, Variant::Float).unwrap();
    let int8 = Stage1Model::from_manifest(&m, Variant::Int8).unwrap();
    let got = float.run(&planes_of(&image)).unwrap();
    let got8 = int8.run(&planes_of(&image)).unwrap();
    let d_float = map_matches(&got, &want);
    check_float_and_int8(
        "stage 1, scales 1,0.5",
        d_float,
        &got.data,
        &got8.data,
        [float_size, int8_size],
    );
    let err = format!("{:#}", float.run(&Planes::zeros(108, 300)).unwrap_err());
    assert!(err.contains("multiple of 8"), "{err}");

    // The device's bands (their overlap from the manifest's receptive field) stitch to
    // the whole-image map, on an image whose sides are not multiples of 8.
    let odd = planes_of(&Tensor::randn([1, 3, 171, 229], (Kind::Float, Device::Cpu)));
    let whole = float
        .run(&band(&odd, 0, 176, 232))
        .expect("whole padded image");
    let (mw, mh) = (229usize.div_ceil(2), 171usize.div_ceil(2));
    for bands in [2, 3, 7] {
        let banded = float.run_in_bands(&odd, bands).unwrap();
        assert_eq!((banded.width, banded.height), (mw, mh));
        for r in 0..mh {
            let row = &whole.data[r * whole.width..][..mw];
            let diff = max_abs_diff(&banded.data[r * mw..][..mw], row);
            assert!(diff <= 1e-5, "{bands} bands, row {r}: {diff}");
        }
    }

    let tract8 = Tensor::from_slice(&got8.data).view([1, 1, 88, 120]);
    for (file, expected) in [(&float_file, want.unsqueeze(1)), (&int8_file, tract8)] {
        check_with_onnxruntime(&tmp.path().join(file), &image, &expected, FLOAT_TOLERANCE);
    }
}

#[test]
fn stage2_export_matches_tch_in_tract_and_onnxruntime() {
    let guard = TCH.lock().unwrap_or_else(|e| e.into_inner());
    let stage = Stage::Verdict;
    let (vs, net) = net(stage, 12);
    let p = Stage::VERDICT_PATCH as i64;
    let patches = Tensor::randn([5, 3, p, p], (Kind::Float, Device::Cpu));
    temper(stage, &vs, &net, &patches);
    drop(guard);
    let tmp = tempfile::tempdir().unwrap();
    let [(float_file, float_size), (int8_file, int8_size)] = export_both(stage, &vs, tmp.path());
    let m = manifest(
        tmp.path(),
        &InputScales::single(),
        &[
            (stage, Variant::Float, &float_file),
            (stage, Variant::Int8, &int8_file),
        ],
    );

    let want = net.margin(&patches, false);
    let want_v = to_vec(&want);
    let flat = to_vec(&patches);

    let float = PatchModel::from_manifest(&m, Role::Stage2, Variant::Float, 32).unwrap();
    let int8 = PatchModel::from_manifest(&m, Role::Stage2, Variant::Int8, 32).unwrap();
    // Batch 2: two full batches and a padded one.
    let float2 = PatchModel::from_manifest(&m, Role::Stage2, Variant::Float, 2).unwrap();
    let got = float.run(&flat, 5).unwrap();
    let got8 = int8.run(&flat, 5).unwrap();
    let got2 = float2.run(&flat, 5).unwrap();
    let d_float = max_abs_diff(&got, &want_v);
    check_float_and_int8("stage 2", d_float, &got, &got8, [float_size, int8_size]);
    assert!(max_abs_diff(&got2, &want_v) <= FLOAT_TOLERANCE, "batch 2");
    // With several threads the patches are split between workers (whole batches each,
    // in order): the very same numbers, including the padded last batch.
    let float1 = PatchModel::from_manifest(&m, Role::Stage2, Variant::Float, 1).unwrap();
    let got1 = float1.run(&flat, 5).unwrap();
    ma_device::cascade::onnx::set_threads(3);
    let (pooled1, pooled2) = (float1.run(&flat, 5), float2.run(&flat, 5));
    ma_device::cascade::onnx::set_threads(1);
    assert_eq!(pooled1.unwrap(), got1, "batch 1 on 3 workers");
    assert_eq!(pooled2.unwrap(), got2, "batch 2 on 3 workers");
    assert!(
        float.run(&flat, 4).is_err(),
        "patch count must match the data"
    );
    assert_eq!(float.run(&[], 0).unwrap(), Vec::<f32>::new());

    let tract8 = Tensor::from_slice(&got8).view([5, 1]);
    for (file, expected) in [(&float_file, want.unsqueeze(1)), (&int8_file, tract8)] {
        check_with_onnxruntime(&tmp.path().join(file), &patches, &expected, FLOAT_TOLERANCE);
    }
}

#[test]
fn referral_export_matches_tch_in_tract_and_onnxruntime() {
    use ma_trainer::export::referral::onnx_model as referral_onnx;
    let side = 64usize;
    let guard = TCH.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(16);
    let vs = VarStore::new(Device::Cpu);
    let net = ReferralNet::new(&vs.root());
    randomise_batch_norms(&vs, &referral_trunk());
    let images = Tensor::randn([4, 3, side as i64, side as i64], (Kind::Float, Device::Cpu));
    scale_head(&vs, "classes", &net.forward_t(&images, false).margin);
    let want = net.forward_t(&images, false);
    drop(guard);
    let tmp = tempfile::tempdir().unwrap();
    let mut sizes = Vec::new();
    let mut margins = [Vec::new(), Vec::new()];
    for (k, format) in [WeightFormat::Float, WeightFormat::Int8Weights]
        .into_iter()
        .enumerate()
    {
        let path = tmp.path().join(format!("referral-{}.onnx", format.name()));
        write_onnx(&path, &referral_onnx(&vs, side, format).unwrap()).unwrap();
        sizes.push(std::fs::metadata(&path).unwrap().len());
        let model = ReferralModel::load(&std::fs::read(&path).unwrap(), side).unwrap();
        for i in 0..4 {
            let x = images.get(i);
            let out = model.run(&planes_of(&x.unsqueeze(0))).unwrap();
            assert_eq!(out.attention_side, side / 16);
            margins[k].push(out.margin);
            if format == WeightFormat::Float {
                let d_att = max_abs_diff(&out.attention, &to_vec(&want.attention.get(i)));
                assert!(d_att <= FLOAT_TOLERANCE, "attention of image {i}: {d_att}");
                // onnxruntime: the float file against tch (the margin, its first output).
                if i == 0 {
                    check_with_onnxruntime(
                        &path,
                        &x.unsqueeze(0),
                        &want.margin.get(0).view([1, 1]),
                        FLOAT_TOLERANCE,
                    );
                }
            }
        }
    }
    let d_float = max_abs_diff(&margins[0], &to_vec(&want.margin));
    check_float_and_int8(
        "referral",
        d_float,
        &margins[0],
        &margins[1],
        [sizes[0], sizes[1]],
    );
    let err = format!(
        "{:#}",
        ReferralModel::load(
            &std::fs::read(tmp.path().join("referral-float.onnx")).unwrap(),
            side
        )
        .unwrap()
        .run(&Planes::zeros(32, 32))
        .unwrap_err()
    );
    assert!(err.contains("64x64"), "{err}");
}

#[test]
fn zoom_export_matches_tch_in_tract_and_onnxruntime() {
    use ma_trainer::export::referral::zoom_onnx_model;
    use ma_trainer::zoom::ZoomNet;
    let side = ma_trainer::nets::ZOOM_CROP;
    let guard = TCH.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(17);
    let vs = VarStore::new(Device::Cpu);
    let net = ZoomNet::new(&vs.root());
    randomise_batch_norms(&vs, &ma_trainer::nets::zoom_classifier());
    let s = side as i64;
    // Crops that differ in brightness as well as in noise, so the random net's margins
    // spread without much tempering (which would magnify the quantisation error).
    let offsets = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([6, 1, 1, 1]) * 0.4 - 1.0;
    let crops = Tensor::randn([6, 3, s, s], (Kind::Float, Device::Cpu)) + offsets;
    scale_head(&vs, "fc", &net.margin(&crops, false));
    let want = net.margin(&crops, false);
    drop(guard);
    let tmp = tempfile::tempdir().unwrap();
    let flat = to_vec(&crops);
    let mut got = Vec::new();
    let mut sizes = Vec::new();
    for format in [WeightFormat::Float, WeightFormat::Int8Weights] {
        let path = tmp.path().join(format!("zoom-{}.onnx", format.name()));
        write_onnx(&path, &zoom_onnx_model(&vs, side, format).unwrap()).unwrap();
        sizes.push(std::fs::metadata(&path).unwrap().len());
        // Batch 4, as the device runs it: one full batch and a padded one.
        let model = PatchModel::load(&std::fs::read(&path).unwrap(), 4, side).unwrap();
        got.push(model.run(&flat, 6).unwrap());
        if format == WeightFormat::Float {
            check_with_onnxruntime(&path, &crops, &want.unsqueeze(1), FLOAT_TOLERANCE);
        }
    }
    let d_float = max_abs_diff(&got[0], &to_vec(&want));
    check_float_and_int8("zoom", d_float, &got[0], &got[1], [sizes[0], sizes[1]]);
}

#[test]
fn export_refuses_a_var_store_that_does_not_fit_the_stage() {
    let guard = TCH.lock().unwrap_or_else(|e| e.into_inner());
    let (vs, _net) = net(Stage::Candidates, 13);
    drop(guard);
    let err = format!(
        "{:#}",
        onnx_model(Stage::Verdict, &vs, WeightFormat::Float).unwrap_err()
    );
    assert!(err.contains("conv1.weight"), "{err}");
}

#[test]
fn a_modified_model_file_is_not_loaded() {
    let guard = TCH.lock().unwrap_or_else(|e| e.into_inner());
    let (vs, _net) = net(Stage::Verdict, 14);
    drop(guard);
    let tmp = tempfile::tempdir().unwrap();
    let [(float_file, _), (int8_file, _)] = export_both(Stage::Verdict, &vs, tmp.path());
    let m = manifest(
        tmp.path(),
        &InputScales::single(),
        &[
            (Stage::Verdict, Variant::Float, &float_file),
            (Stage::Verdict, Variant::Int8, &int8_file),
        ],
    );
    // Overwrite the float file with the int8 one: a valid model, but not the one listed.
    std::fs::copy(tmp.path().join(&int8_file), tmp.path().join(&float_file)).unwrap();
    let err = format!(
        "{:#}",
        PatchModel::from_manifest(&m, Role::Stage2, Variant::Float, 8)
            .err()
            .unwrap()
    );
    assert!(
        err.contains(&float_file) && err.contains("SHA-256"),
        "{err}"
    );
    PatchModel::from_manifest(&m, Role::Stage2, Variant::Int8, 8).unwrap();
}

#[test]
fn check_onnx_py_reports_a_wrong_output_and_a_broken_file() {
    let guard = TCH.lock().unwrap_or_else(|e| e.into_inner());
    let (vs, net) = net(Stage::Verdict, 15);
    let p = Stage::VERDICT_PATCH as i64;
    let patches = Tensor::randn([2, 3, p, p], (Kind::Float, Device::Cpu));
    drop(guard);
    let tmp = tempfile::tempdir().unwrap();
    let [(file, _), _] = export_both(Stage::Verdict, &vs, tmp.path());
    let model = tmp.path().join(&file);
    let want = net.margin(&patches, false).unsqueeze(1);
    let (ok, text) = run_check_onnx(&model, &patches, &(want + 0.01), FLOAT_TOLERANCE);
    assert!(!ok && text.contains("differs"), "{text}");
    std::fs::write(&model, b"not a model").unwrap();
    let (ok, text) = run_check_onnx(&model, &patches, &patches, FLOAT_TOLERANCE);
    assert!(!ok && text.contains(&file), "{text}");
}
