//! `ma-bench`: how long the cascade takes on one image, stage by stage, and how much
//! memory it needs (issues 4 and 7).
//!
//! ```sh
//! ma-bench --models models --image ../shared/datasets/diaretdb1/resources/images/ddb1_fundusimages/image001.png \
//!     --threads 2 --variant float --runs 10 [--dump DIR] [--json] [--profile]
//! ```
//!
//! Two phases, in one process:
//! 1. **End to end**, as the device runs it: the file's bytes are decoded and
//!    [`Cascade::detect`] runs on them, `runs` times after `warmup` untimed runs (the first
//!    one also optimises stage 1 for the image's canonical size; it is reported apart).
//!    The peak resident set (`VmHWM`) is read at the end of this phase, so it is the
//!    memory of a device process that decodes and detects.
//! 2. **Networks alone**, on the same inputs: stage 1 on the padded canonical planes,
//!    candidate search, patch extraction and stage 2 on the candidates' patches (batches
//!    of [`STAGE2_BATCH`], the last one zero-padded, as the cascade does), each timed
//!    `runs` times. `--dump DIR` writes these inputs and tract's outputs as `.npy`
//!    (plus `meta.json`) so that `scripts/bench_ort.py` runs onnxruntime on exactly the
//!    same numbers and checks that both agree.
//!
//! `--profile` adds the time of every node of the optimised stage-1 plan (tract's own
//! evaluation, timed node by node), to see which layer the time goes to.
//!
//! Prints a table, or one JSON object with `--json` (what `scripts/bench.sh` reads).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use serde_json::{Value, json};
use tract_onnx::prelude::*;

use ma_core::candidates::{self, ProbMap, find_candidates};
use ma_core::geometry::{CHANNELS, PatchGeometry};
use ma_core::image_io;
use ma_core::manifest::{ModelGeometry, Role, Variant};
use ma_core::preprocess::{FovSource, preprocess};
use ma_core::signing::ModelTrust;
use ma_device::cascade::onnx::{
    PatchModel, STAGE2_BATCH, Stage1Model, band, parse, set_threads, stage1_plan, stage2_plan,
};
use ma_device::cascade::{Cascade, ImageResult, Runtime};

#[derive(Parser)]
#[command(
    name = "ma-bench",
    about = "Time the microaneurysm cascade per stage on one image and report peak memory"
)]
struct Args {
    /// Models folder (manifest.toml and the ONNX files).
    #[arg(long, default_value = "models")]
    models: PathBuf,
    /// Image to time (any format `ma-device detect` reads).
    #[arg(long)]
    image: PathBuf,
    /// Threads for tract's matrix products.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Model variant (float or int8); default: the manifest's.
    #[arg(long)]
    variant: Option<Variant>,
    /// Load a model bundle that is not signed by the release key (experiments).
    #[arg(long)]
    allow_unsigned: bool,
    /// Timed runs of every measurement (the median is reported).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Untimed runs before the timed ones (after the first, cold, detection).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Write the network inputs and tract's outputs here (.npy), for bench_ort.py.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Also time every node of the optimised stage-1 and stage-2 plans.
    #[arg(long)]
    profile: bool,
    /// Stage-2 batch of the "networks alone" phase (the cascade's is fixed).
    #[arg(long, default_value_t = STAGE2_BATCH)]
    stage2_batch: usize,
    /// Experiment: also run stage 1 over this many horizontal bands and report time,
    /// peak memory and the difference from the whole-image map.
    #[arg(long, default_value_t = 1)]
    stage1_bands: usize,
    /// Experiment: instead of the phases above, run the cascade with stage 1 in
    /// --stage1-bands bands and stage 2 in batches of --stage2-batch, and report its
    /// times and the peak RSS of this process (compare with the peak of a normal run).
    #[arg(long)]
    emulate: bool,
    /// Time this stage-1 ONNX file instead of the manifest's in the "networks alone"
    /// phase (to A/B a candidate export; not hash-checked, end to end unchanged).
    #[arg(long)]
    stage1_onnx: Option<PathBuf>,
    /// Same for stage 2.
    #[arg(long)]
    stage2_onnx: Option<PathBuf>,
    /// Experiments: one end-to-end run only, then the networks alone as usual.
    #[arg(long)]
    nets_only: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Milliseconds since `t`.
fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Wall-clock and CPU milliseconds of repeated runs.
#[derive(Clone, Debug, Default)]
struct Samples {
    wall: Vec<f64>,
    /// CPU time of the calling thread (all of the work with one thread; only the calling
    /// thread's share with more): much less sensitive to other processes than `wall`.
    cpu: Vec<f64>,
}

impl Samples {
    fn wall_only(wall: Vec<f64>) -> Self {
        Self { wall, cpu: vec![] }
    }
}

fn median_min_max(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

/// Median, min and max of some timings, with the samples.
fn stats(s: &Samples) -> Value {
    let (median, min, max) = median_min_max(&s.wall);
    let mut out = json!({
        "median": round3(median),
        "min": round3(min),
        "max": round3(max),
        "n": s.wall.len(),
        "samples": s.wall.iter().map(|&x| round3(x)).collect::<Vec<_>>(),
    });
    if !s.cpu.is_empty() {
        let (median, min, _) = median_min_max(&s.cpu);
        out["cpu_median"] = json!(round3(median));
        out["cpu_min"] = json!(round3(min));
        out["cpu_samples"] = json!(s.cpu.iter().map(|&x| round3(x)).collect::<Vec<_>>());
    }
    out
}

/// CPU time of the calling thread so far, in ms (Linux `schedstat`, nanoseconds).
fn thread_cpu_ms() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |ns| ns / 1e6)
}

fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

/// Reset the peak resident set (`VmHWM`) to the current one (Linux `clear_refs` 5).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A field of `/proc/self/status` in MiB (`VmHWM` peak resident set, `VmRSS` now).
fn proc_status_mib(field: &str) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(round3(kib / 1024.0))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Time `f` `runs` times after `warmup` untimed calls; the last result is returned.
fn time_runs<T>(
    runs: usize,
    warmup: usize,
    mut f: impl FnMut() -> Result<T>,
) -> Result<(Samples, T)> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Samples::default();
    let mut last = None;
    for _ in 0..runs.max(1) {
        let c = thread_cpu_ms();
        let t = Instant::now();
        let out = f()?;
        times.wall.push(ms(t));
        times.cpu.push(thread_cpu_ms() - c);
        last = Some(out);
    }
    Ok((times, last.expect("at least one run")))
}

/// Write a little-endian f32 array as a `.npy` file (format version 1.0).
fn write_npy(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    ensure!(
        shape.iter().product::<usize>() == data.len(),
        "npy shape {shape:?} does not hold {} values",
        data.len()
    );
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}").into_bytes();
    // Magic (6) + version (2) + header length (2) + header, padded to a multiple of 64.
    let total = (10 + header.len() + 1).div_ceil(64) * 64;
    header.resize(total - 10 - 1, b' ');
    header.push(b'\n');
    let mut out = Vec::with_capacity(total + 4 * data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(&header);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// The first `width` x `height` cells of `map`.
fn crop_map(map: &ProbMap, width: usize, height: usize) -> ProbMap {
    let mut data = Vec::with_capacity(width * height);
    for r in 0..height {
        data.extend_from_slice(&map.data[r * map.width..][..width]);
    }
    ProbMap {
        width,
        height,
        data,
        ..map.clone()
    }
}

/// Mean time of every node of `plan` over `runs` runs (after one untimed run), with
/// tract's own evaluation of each node timed as `tract-cli --profile` does.
fn profile_plan(plan: &Arc<TypedRunnableModel>, input: Tensor, runs: usize) -> Result<Value> {
    let mut totals: HashMap<usize, f64> = HashMap::new();
    let mut state = tract_onnx::tract_core::plan::SimpleState::new(plan)?;
    for run in 0..=runs {
        let mut times: Vec<(usize, f64)> = Vec::new();
        state.run_plan_with_eval(
            tvec!(input.clone().into()),
            |session, op_state, node, inputs| {
                let t = Instant::now();
                let out = tract_onnx::tract_core::plan::eval(session, op_state, node, inputs);
                times.push((node.id, ms(t)));
                out
            },
        )?;
        if run > 0 {
            for (id, t) in times {
                *totals.entry(id).or_default() += t;
            }
        }
    }
    let model = plan.model();
    let mut nodes: Vec<Value> = Vec::new();
    for &id in plan.order_without_consts() {
        let node = model.node(id);
        let out_shape = model
            .outlet_fact(OutletId::new(id, 0))
            .map(|f| format!("{:?}", f.shape))
            .unwrap_or_default();
        nodes.push(json!({
            "id": id,
            "name": node.name,
            "op": node.op.name(),
            "info": node.op.info().unwrap_or_default().join("; "),
            "output": out_shape,
            "ms": round3(totals.get(&id).copied().unwrap_or(0.0) / runs.max(1) as f64),
        }));
    }
    Ok(Value::Array(nodes))
}

/// `--emulate`: the cascade itself ([`Cascade::detect`]) with stage 1 in
/// `--stage1-bands` bands and stage 2 in batches of `--stage2-batch`.
fn emulate(a: &Args, bytes: &[u8], trust: &ModelTrust) -> Result<Value> {
    let runtime = Runtime {
        stage1_bands: a.stage1_bands,
        stage2_batch: a.stage2_batch,
    };
    let cascade = Cascade::load_with(&a.models, a.variant, trust, runtime)?;
    // Decoding and detection, as the device runs them: the cascade's own step times
    // (wall) and the calling thread's CPU time of the whole detection.
    let detect = || -> Result<(ImageResult, f64)> {
        let c = thread_cpu_ms();
        let img = image_io::decode_image(bytes)?;
        let result = cascade.detect(&img)?;
        Ok((result, thread_cpu_ms() - c))
    };
    let t = Instant::now();
    let (first, _) = detect()?;
    let first_ms = ms(t);
    let mut samples = vec![Samples::default(); 5];
    for i in 0..a.warmup + a.runs.max(1) {
        let (r, cpu) = detect()?;
        if i >= a.warmup {
            let t = r.timings;
            for (s, wall) in
                samples
                    .iter_mut()
                    .zip([t.preprocess, t.stage1, t.stage2, t.total, t.referral])
            {
                s.wall.push(wall);
            }
            samples[3].cpu.push(cpu);
        }
    }
    let [pre, s1, s2, total, referral] = [0, 1, 2, 3, 4].map(|k| stats(&samples[k]));
    Ok(json!({
        "emulate": true,
        "image": a.image,
        "variant": cascade.variant.to_string(),
        "threads": a.threads,
        "stage1_bands": a.stage1_bands,
        "stage2_batch": a.stage2_batch,
        "first_detect_ms": round3(first_ms),
        "candidates": first.candidates,
        "top_scores": first.detections.iter().take(5).map(|d| d.score).collect::<Vec<_>>(),
        "ms": {
            "preprocess": pre,
            "stage1": s1,
            "stage2": s2,
            "referral": referral,
            "detect": total,
        },
        "peak_rss_mib": proc_status_mib("VmHWM:"),
        "loadavg": loadavg(),
    }))
}

fn main() -> Result<()> {
    let a = Args::parse();
    let runs = a.runs.max(1);
    set_threads(a.threads);

    // ---- phase 1: end to end, as the device runs it --------------------------------
    let bytes =
        std::fs::read(&a.image).with_context(|| format!("reading {}", a.image.display()))?;
    // Benchmarks run what ships: the release key's bundle, or an explicitly unsigned one.
    let trust = if a.allow_unsigned {
        ModelTrust::Unsigned
    } else {
        ModelTrust::release()
    };
    if a.emulate {
        println!("{}", serde_json::to_string(&emulate(&a, &bytes, &trust)?)?);
        return Ok(());
    }
    let t = Instant::now();
    let cascade = Cascade::load(&a.models, a.variant, &trust)?;
    let load_ms = ms(t);
    let variant = cascade.variant;
    let manifest = cascade.manifest.clone();
    let rss_after_load = proc_status_mib("VmRSS:");

    let t = Instant::now();
    let img = image_io::decode_image(&bytes)?;
    let first = cascade.detect(&img)?;
    let first_ms = ms(t);
    drop(img);
    let e2e_runs = if a.nets_only { 1 } else { runs };
    for _ in 0..if a.nets_only { 0 } else { a.warmup } {
        cascade.detect(&image_io::decode_image(&bytes)?)?;
    }
    let (mut decode, mut pre, mut s1, mut s2, mut rf) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut detect, mut e2e) = (Samples::default(), Samples::default());
    let mut candidates = first.candidates;
    let mut detections = first.detections.len();
    let (width, height);
    {
        let mut last = None;
        for _ in 0..e2e_runs {
            let c0 = thread_cpu_ms();
            let t = Instant::now();
            let img = image_io::decode_image(&bytes)?;
            let d = ms(t);
            let c1 = thread_cpu_ms();
            let r = cascade.detect(&img)?;
            let c2 = thread_cpu_ms();
            e2e.wall.push(ms(t));
            e2e.cpu.push(c2 - c0);
            decode.push(d);
            pre.push(r.timings.preprocess);
            s1.push(r.timings.stage1);
            s2.push(r.timings.stage2);
            rf.push(r.timings.referral);
            detect.wall.push(r.timings.total);
            detect.cpu.push(c2 - c1);
            last = Some(r);
        }
        let r = last.expect("runs >= 1");
        candidates = candidates.max(r.candidates);
        detections = detections.max(r.detections.len());
        (width, height) = (r.width, r.height);
    }
    let peak_e2e = proc_status_mib("VmHWM:");
    let rss_e2e = proc_status_mib("VmRSS:");
    drop(cascade);

    // ---- phase 2: each network alone, on the same inputs -----------------------------
    let geometry = PatchGeometry::new(manifest.patch_size)?;
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let stage1_bytes = manifest.model_bytes(Role::Stage1, variant)?;
    let stage2_bytes = match &a.stage2_onnx {
        Some(p) => read(p)?,
        None => manifest.model_bytes(Role::Stage2, variant)?,
    };
    let ModelGeometry::Map {
        receptive_field,
        output_stride,
        input_multiple,
    } = manifest.entry(Role::Stage1, variant)?.geometry()?
    else {
        bail!("the manifest's stage-1 entry is not a map model");
    };
    let stage1 = Stage1Model::load(
        &stage1_bytes,
        output_stride,
        receptive_field,
        input_multiple,
    )?;
    let stage2 = PatchModel::load(&stage2_bytes, a.stage2_batch, geometry.size)?;
    let img = image_io::decode_image(&bytes)?;
    let (pre_times, prep) = time_runs(runs, 0, || {
        preprocess(&img, FovSource::Estimate, &manifest.preprocess)
    })?;
    // The whole image padded to the input multiple, as one network input.
    let (pad_times, padded) = time_runs(runs, 0, || {
        Ok(band(
            &prep.planes,
            0,
            prep.planes.height.next_multiple_of(input_multiple),
            prep.planes.width.next_multiple_of(input_multiple),
        ))
    })?;
    let rss_before_stage1 = proc_status_mib("VmRSS:");
    let hwm_reset = reset_peak_rss();
    let (mut s1_net, map) = time_runs(runs, a.warmup, || stage1.run(&padded))?;
    let peak_stage1 = if hwm_reset {
        proc_status_mib("VmHWM:")
    } else {
        None
    };
    // The whole padded map, then cut to the cells that cover the image (as `detect`).
    let full_map = map.clone();
    let map = crop_map(
        &map,
        prep.planes.width.div_ceil(output_stride),
        prep.planes.height.div_ceil(output_stride),
    );
    // Experiment: stage 1 over horizontal bands (as `detect` runs it with
    // `STAGE1_BANDS`), compared with the whole-image map.
    let mut bands_result = None;
    if a.stage1_bands > 1 {
        let band_rows = full_map.height.div_ceil(a.stage1_bands);
        let in_rows = band_rows * stage1.stride() + 2 * stage1.halo();
        let hwm_reset = reset_peak_rss();
        let (times, stitched) = time_runs(runs, a.warmup, || {
            Ok(stage1.run_in_bands(&prep.planes, a.stage1_bands)?.data)
        })?;
        let peak = if hwm_reset {
            proc_status_mib("VmHWM:")
        } else {
            None
        };
        let diff = stitched
            .iter()
            .zip(&map.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        bands_result = Some(json!({
            "bands": a.stage1_bands, "band_input_rows": in_rows, "ms": stats(&times),
            "peak_rss_mib": peak, "max_abs_diff": diff,
        }));
    }
    // An experimental stage-1 graph (it may have concrete input dims, which
    // `Stage1Model` refuses): timed through a plan of its own, and its margins
    // compared with the shipped model's.
    let mut stage1_override_diff = None;
    if let Some(path) = &a.stage1_onnx {
        let plan = stage1_plan(
            &parse(&read(path)?, "stage-1")?,
            padded.height,
            padded.width,
        )?;
        let (times, out) = time_runs(runs, a.warmup, || {
            let t = Tensor::from_shape(&[1, CHANNELS, padded.height, padded.width], &padded.data)?;
            plan.run(tvec!(t.into()))
        })?;
        let out = out[0].try_as_plain_ram()?;
        let margins = out.as_slice::<f32>()?;
        ensure!(
            margins.len() == full_map.data.len(),
            "experimental stage 1 gives another map size"
        );
        let diff = margins
            .iter()
            .zip(&full_map.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        stage1_override_diff = Some(diff);
        s1_net = times;
    }
    let stage1_bytes = match &a.stage1_onnx {
        Some(p) => read(p)?,
        None => stage1_bytes,
    };
    let (cand_times, found) = time_runs(runs, 0, || {
        Ok(find_candidates(
            &map,
            &prep.planes,
            &prep.fov,
            &manifest.stage1,
        ))
    })?;
    let len = geometry.len();
    let (patch_times, patches) = time_runs(runs, 0, || {
        Ok(candidates::patches(&geometry, &prep.planes, &found))
    })?;
    let n = found.len();
    let rss_before_stage2 = proc_status_mib("VmRSS:");
    let hwm_reset = reset_peak_rss();
    let (s2_net, scores) = time_runs(runs, a.warmup, || stage2.run(&patches, n))?;
    let peak_stage2 = if hwm_reset {
        proc_status_mib("VmHWM:")
    } else {
        None
    };
    let batches = n.div_ceil(stage2.batch());
    let stage2_override_diff = match &a.stage2_onnx {
        Some(_) => {
            let base = PatchModel::from_manifest(&manifest, Role::Stage2, variant, a.stage2_batch)?;
            let want = base.run(&patches, n)?;
            Some(
                want.iter()
                    .zip(&scores)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0f32, f32::max),
            )
        }
        None => None,
    };

    if let Some(dir) = &a.dump {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (pw, ph) = (padded.width, padded.height);
        write_npy(
            &dir.join("stage1_input.npy"),
            &[1, CHANNELS, ph, pw],
            &padded.data,
        )?;
        write_npy(
            &dir.join("stage1_margin.npy"),
            &[full_map.height, full_map.width],
            &full_map.data,
        )?;
        let p = geometry.size;
        write_npy(
            &dir.join("stage2_input.npy"),
            &[n, CHANNELS, p, p],
            &patches,
        )?;
        write_npy(&dir.join("stage2_margin.npy"), &[n], &scores)?;
        let meta = json!({
            "image": a.image, "width": width, "height": height,
            "canonical": [prep.planes.width, prep.planes.height],
            "stage1_input": [pw, ph], "stage1_map": [map.width, map.height],
            "candidates": n, "stage2_batch": stage2.batch(), "stage2_batches": batches,
            "patch_size": p, "variant": variant.to_string(),
        });
        std::fs::write(dir.join("meta.json"), serde_json::to_string_pretty(&meta)?)?;
    }

    let (profile1, profile2) = if a.profile {
        let plan = stage1_plan(
            &parse(&stage1_bytes, "stage-1")?,
            padded.height,
            padded.width,
        )?;
        let input = Tensor::from_shape(&[1, CHANNELS, padded.height, padded.width], &padded.data)?;
        let p1 = profile_plan(&plan, input, runs.min(5))?;
        drop(plan);
        let (b, p) = (stage2.batch(), geometry.size);
        let plan = stage2_plan(parse(&stage2_bytes, "stage-2")?, b, p)?;
        let mut data = patches.clone();
        data.resize(b * len, 0.0);
        data.truncate(b * len);
        let input = Tensor::from_shape(&[b, CHANNELS, p, p], &data)?;
        let p2 = profile_plan(&plan, input, runs.min(5))?;
        (Some(p1), Some(p2))
    } else {
        (None, None)
    };

    let out = json!({
        "image": a.image,
        "width": width,
        "height": height,
        "canonical": [prep.planes.width, prep.planes.height],
        "stage1_input": [padded.width, padded.height],
        "models": a.models,
        "stage1_onnx": a.stage1_onnx,
        "stage2_onnx": a.stage2_onnx,
        "stage1_onnx_max_abs_diff": stage1_override_diff,
        "stage2_onnx_max_abs_diff": stage2_override_diff,
        "model_version": manifest.version,
        "variant": variant.to_string(),
        "threads": a.threads,
        "runs": runs,
        "candidates": n,
        "candidates_max_seen": candidates,
        "detections": detections,
        "top_scores": first.detections.iter().take(5).map(|d| d.score).collect::<Vec<_>>(),
        "stage2_batch": stage2.batch(),
        "stage2_batches": batches,
        "load_ms": round3(load_ms),
        "first_detect_ms": round3(first_ms),
        "ms": {
            "decode": stats(&Samples::wall_only(decode)),
            "preprocess": stats(&Samples::wall_only(pre)),
            "stage1": stats(&Samples::wall_only(s1)),
            "stage2": stats(&Samples::wall_only(s2)),
            "referral": stats(&Samples::wall_only(rf)),
            "detect": stats(&detect),
            "decode_detect": stats(&e2e),
            "preprocess_alone": stats(&pre_times),
            "pad": stats(&pad_times),
            "stage1_net": stats(&s1_net),
            "candidates": stats(&cand_times),
            "patches": stats(&patch_times),
            "stage2_net": stats(&s2_net),
        },
        "rss_mib": {
            "after_load": rss_after_load,
            "after_e2e": rss_e2e,
            "peak_e2e": peak_e2e,
            "before_stage1_net": rss_before_stage1,
            "peak_stage1_net": peak_stage1,
            "before_stage2_net": rss_before_stage2,
            "peak_stage2_net": peak_stage2,
        },
        "loadavg": loadavg(),
        "stage1_bands": bands_result,
        "stage1_profile": profile1,
        "stage2_profile": profile2,
    });

    let stdout = std::io::stdout();
    let mut o = stdout.lock();
    if a.json {
        writeln!(o, "{}", serde_json::to_string(&out)?)?;
        return Ok(());
    }
    let med = |k: &str| out["ms"][k]["median"].as_f64().unwrap_or(f64::NAN);
    writeln!(
        o,
        "{} ({}x{}, canonical {}x{}), models {} {} ({variant}), {} thread(s), {runs} runs, load {}",
        a.image.display(),
        width,
        height,
        prep.planes.width,
        prep.planes.height,
        a.models.display(),
        manifest.version,
        a.threads,
        out["loadavg"].as_str().unwrap_or("")
    )?;
    writeln!(
        o,
        "model load {load_ms:.0} ms, first detection (optimises stage 1) {first_ms:.0} ms"
    )?;
    writeln!(o, "{:<34} {:>10}", "median of", "ms")?;
    for (k, what) in [
        ("decode", "decode"),
        ("preprocess", "preprocess"),
        ("stage1", "stage 1 (net + candidates)"),
        ("stage2", "stage 2 (patches + net)"),
        ("referral", "referral network + zoom-in crops (0: none)"),
        ("detect", "end to end (decoded image in)"),
        ("decode_detect", "end to end (file bytes in)"),
        ("pad", "  stage-1 input padding"),
        ("stage1_net", "  stage-1 net alone"),
        ("candidates", "  candidate search"),
        ("patches", "  patch extraction"),
        ("stage2_net", "  stage-2 net alone"),
    ] {
        writeln!(o, "{what:<34} {:>10.1}", med(k))?;
    }
    writeln!(
        o,
        "candidates {n} ({batches} stage-2 batch(es) of {}), detections {detections}",
        stage2.batch()
    )?;
    writeln!(
        o,
        "peak RSS (decode + detect) {:.1} MiB; stage-1 net alone: {:.1} MiB peak from {:.1} MiB",
        peak_e2e.unwrap_or(f64::NAN),
        peak_stage1.unwrap_or(f64::NAN),
        rss_before_stage1.unwrap_or(f64::NAN)
    )?;
    for (key, what) in [
        ("stage1_profile", "stage-1 plan"),
        ("stage2_profile", "stage-2 plan (one batch)"),
    ] {
        let Some(nodes) = out[key].as_array() else {
            continue;
        };
        writeln!(o, "{what}, per node (mean ms):")?;
        for n in nodes {
            writeln!(
                o,
                "  {:>8.2}  {:<28} {:<22} {} {}",
                n["ms"].as_f64().unwrap_or(0.0),
                n["name"].as_str().unwrap_or(""),
                n["op"].as_str().unwrap_or(""),
                n["output"].as_str().unwrap_or(""),
                n["info"].as_str().unwrap_or("")
            )?;
        }
    }
    Ok(())
}
