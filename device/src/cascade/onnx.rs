//! Running the exported CNNs with tract.
//!
//! Models are only loaded from bytes the manifest verified ([`Manifest::model_bytes`]).
//! tract optimises for concrete shapes, so:
//! - stage 1 (fully convolutional, symbolic height and width) is typed and decluttered
//!   once, then optimised per input size; the plans of the last few sizes are cached
//!   (canonical sizes differ a little between cameras, but one camera gives one size);
//! - stage 2 is optimised once for a fixed batch; the last batch is padded with zeros.

use std::io::Cursor;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail, ensure};
use tract_onnx::prelude::*;

use ma_core::candidates::ProbMap;
use ma_core::geometry::{CHANNELS, Planes};
use ma_core::manifest::{Manifest, ModelGeometry, Role, Variant};

/// Optimised plans kept by [`Stage1Model`] (one per input size).
const STAGE1_PLAN_CACHE: usize = 4;

/// Stage-2 batch: one patch per call. Above batch 1 tract builds each convolution's whole
/// im2col matrix on one thread: measured with `ma-bench` on the earlier 101x101 stage 2,
/// batch 1 was faster (263 against 466 ms at 32) and used less memory (BENCHMARKS.md).
pub const STAGE2_BATCH: usize = 1;

/// Stage 1 runs on a whole image in this many horizontal bands ([`Stage1Model::run_in_bands`]),
/// to bound the memory of its full-resolution feature maps (BENCHMARKS.md).
pub const STAGE1_BANDS: usize = 3;

/// An optimised, runnable tract model for one concrete input shape.
pub type Plan = Arc<TypedRunnableModel>;

/// Most threads accepted (`inference.threads`, `detect --threads`): far above any board's
/// cores, low enough that a typo cannot ask the OS for millions of threads.
pub const MAX_THREADS: usize = 256;

/// The thread count of the last [`set_threads`] (1 before any).
static THREADS: AtomicUsize = AtomicUsize::new(1);

/// Use `n` threads for tract's matrix products (process-wide), and as many workers for
/// the patch models ([`PatchModel::run`]).
///
/// `n <= 1` restores tract's own single-threaded executor rather than a one-thread pool:
/// a one-thread pool has been reported to still use every core (sonos/tract#2894).
pub fn set_threads(n: usize) {
    use tract_linalg::multithread::{Executor, set_default_executor};
    THREADS.store(n.max(1), Ordering::Relaxed);
    if n <= 1 {
        set_default_executor(Executor::SingleThread);
    } else {
        set_default_executor(Executor::multithread(n));
    }
}

/// Parse ONNX bytes (`what` names the model in the error).
pub fn parse(bytes: &[u8], what: &str) -> Result<InferenceModel> {
    tract_onnx::onnx()
        .model_for_read(&mut Cursor::new(bytes))
        .with_context(|| format!("parsing the {what} ONNX model"))
}

/// The stage-1 plan for one `height` x `width` input: what [`Stage1Model`] runs, and what
/// `ma-bench` times and profiles (one builder, so the two cannot drift apart).
pub fn stage1_plan(model: &InferenceModel, height: usize, width: usize) -> Result<Plan> {
    model
        .clone()
        .with_input_fact(0, f32::fact([1, CHANNELS, height, width]).into())
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .with_context(|| format!("optimising the stage-1 model for {width}x{height}"))
}

/// The stage-2 plan for a batch of `batch` patches of `patch` x `patch`.
pub fn stage2_plan(model: InferenceModel, batch: usize, patch: usize) -> Result<Plan> {
    model
        .with_input_fact(0, f32::fact([batch, CHANNELS, patch, patch]).into())
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .with_context(|| format!("optimising the stage-2 model for batch {batch}"))
}

/// The stage-1 fully-convolutional net: input `1 x 3 x H x W` (H and W multiples of
/// `input_multiple`, zero-padded convolutions), output the `1 x 1 x H/s x W/s` margin map.
///
/// The graph is typed for each concrete input size, not once with symbolic sides: after
/// two poolings and an upsampling the decoder's height is `2 * floor(H / 4)` and the
/// skip's `floor(H / 2)`, which tract cannot prove equal for a symbolic H (its Concat
/// analysis fails), although they are for every H the model accepts.
pub struct Stage1Model {
    /// Parsed, not typed.
    model: InferenceModel,
    stride: usize,
    receptive_field: usize,
    input_multiple: usize,
    /// Most recently used first.
    plans: Mutex<Vec<((usize, usize), Plan)>>,
}

impl Stage1Model {
    /// Load the manifest's stage-1 model of `variant` (hash checked).
    pub fn from_manifest(manifest: &Manifest, variant: Variant) -> Result<Self> {
        let entry = manifest.entry(Role::Stage1, variant)?;
        let ModelGeometry::Map {
            receptive_field,
            output_stride,
            input_multiple,
        } = entry.geometry()?
        else {
            bail!("the stage1 entry of {} is not a map model", entry.file);
        };
        let bytes = manifest.verify_file(entry)?;
        Self::load(&bytes, output_stride, receptive_field, input_multiple)
            .with_context(|| format!("loading {}", manifest.path_of(entry).display()))
    }

    /// Load from ONNX bytes; prefer [`Stage1Model::from_manifest`], which checks the hash.
    pub fn load(
        bytes: &[u8],
        stride: usize,
        receptive_field: usize,
        input_multiple: usize,
    ) -> Result<Self> {
        ensure!(
            stride > 0 && input_multiple.is_multiple_of(stride),
            "stage-1 input multiple {input_multiple} is not a multiple of its stride {stride}"
        );
        let model = parse(bytes, "stage-1")?;
        let loaded = Self {
            model,
            stride,
            receptive_field,
            input_multiple,
            plans: Mutex::new(Vec::new()),
        };
        // Type and optimise one small size now, so a model that cannot run fails at load
        // (naming the file) rather than on the first image.
        let probe = 16 * input_multiple;
        loaded
            .plan(probe, probe)
            .context("checking the stage-1 model on a small input")?;
        Ok(loaded)
    }

    /// Output stride of the map.
    pub fn stride(&self) -> usize {
        self.stride
    }

    pub fn receptive_field(&self) -> usize {
        self.receptive_field
    }

    /// Input rows a band reads beyond the map rows it keeps, on each side: more than half
    /// the receptive field, so every kept value sees exactly what it sees in a
    /// whole-image run, rounded up to the input multiple so the pooling grids line up.
    pub fn halo(&self) -> usize {
        (self.receptive_field / 2 + self.stride).next_multiple_of(self.input_multiple)
    }

    fn plan(&self, height: usize, width: usize) -> Result<Plan> {
        let key = (height, width);
        {
            let mut plans = self.plans.lock().unwrap();
            if let Some(i) = plans.iter().position(|(k, _)| *k == key) {
                let hit = plans.remove(i);
                let plan = hit.1.clone();
                plans.insert(0, hit);
                return Ok(plan);
            }
        }
        // Optimise outside the lock; a concurrent miss for the same size only wastes work.
        let plan = stage1_plan(&self.model, height, width)?;
        let mut plans = self.plans.lock().unwrap();
        plans.insert(0, (key, plan.clone()));
        plans.truncate(STAGE1_PLAN_CACHE);
        Ok(plan)
    }

    /// Margin map of `input` as the network input (sides multiples of the input
    /// multiple): value (i, j) covers input pixels `(s j .. s j + s - 1, s i .. s i + s - 1)`.
    pub fn run(&self, input: &Planes) -> Result<ProbMap> {
        let (w, h) = (input.width, input.height);
        let m = self.input_multiple;
        ensure!(
            w > 0 && h > 0 && w.is_multiple_of(m) && h.is_multiple_of(m),
            "stage-1 input {w}x{h} must be a non-empty multiple of {m} on both sides"
        );
        ensure!(
            input.data.len() == CHANNELS * w * h,
            "planes hold {} values, {w}x{h}x{CHANNELS} expected",
            input.data.len()
        );
        let plan = self.plan(h, w)?;
        let tensor = Tensor::from_shape(&[1, CHANNELS, h, w], &input.data)?;
        let out = plan
            .run(tvec!(tensor.into()))
            .with_context(|| format!("running stage 1 on {w}x{h}"))?;
        let out = out[0].try_as_plain_ram()?;
        let (mh, mw) = (h / self.stride, w / self.stride);
        ensure!(
            out.shape() == [1, 1, mh, mw],
            "stage-1 output has shape {:?} for a {w}x{h} input, [1, 1, {mh}, {mw}] expected",
            out.shape()
        );
        Ok(ProbMap {
            width: mw,
            height: mh,
            data: out.as_slice::<f32>()?.to_vec(),
            stride: self.stride,
            offset: 0,
        })
    }

    /// Margin map of a whole preprocessed image, computed in `bands` horizontal bands to
    /// bound memory (the device uses [`STAGE1_BANDS`]); the map covers the image
    /// (`ceil(W / s) x ceil(H / s)` cells) and has the same values as one run on the whole image padded with zero rows and columns up to the input
    /// multiple (what the trainer computes). Each band reads [`Stage1Model::halo`] extra
    /// rows on both sides, but never beyond the image's first row or its padded last row:
    /// the convolutions' zero padding then falls where it falls in the whole-image run.
    pub fn run_in_bands(&self, planes: &Planes, bands: usize) -> Result<ProbMap> {
        let (m, s) = (self.input_multiple, self.stride);
        let (padded_h, padded_w) = (
            planes.height.next_multiple_of(m),
            planes.width.next_multiple_of(m),
        );
        let map_rows = padded_h / s;
        // Bands start on input rows that are multiples of `m`.
        let step = m / s;
        let band_rows = map_rows.div_ceil(bands.max(1)).next_multiple_of(step);
        let halo = self.halo();
        let (keep_h, keep_w) = (planes.height.div_ceil(s), planes.width.div_ceil(s));
        let mut data = Vec::with_capacity(keep_w * keep_h);
        let mut r0 = 0;
        while r0 < keep_h {
            let r1 = (r0 + band_rows).min(map_rows);
            let y0 = (r0 * s).saturating_sub(halo);
            let y1 = (r1 * s + halo).min(padded_h);
            let part = self.run(&band(planes, y0, y1 - y0, padded_w))?;
            let first = (r0 * s - y0) / s;
            for r in r0..r1.min(keep_h) {
                let row = &part.data[(first + r - r0) * part.width..][..part.width];
                data.extend_from_slice(&row[..keep_w]);
            }
            r0 = r1;
        }
        Ok(ProbMap {
            width: keep_w,
            height: keep_h,
            data,
            stride: s,
            offset: 0,
        })
    }
}

/// Rows `y0 .. y0 + rows` of `planes`, `width` columns wide; rows and columns beyond the
/// image are 0 (as preprocessing leaves everything outside the field of view).
pub fn band(planes: &Planes, y0: usize, rows: usize, width: usize) -> Planes {
    let mut out = Planes::zeros(width, rows);
    let cols = planes.width.min(width);
    for c in 0..CHANNELS {
        let (src, dst) = (planes.channel(c), out.channel_mut(c));
        for r in 0..rows {
            let sy = y0 + r;
            if sy >= planes.height {
                break;
            }
            dst[r * width..][..cols].copy_from_slice(&src[sy * planes.width..][..cols]);
        }
    }
    out
}

/// A classifier of square patches (input `batch x 3 x side x side`, output the margin
/// `batch x 1`), optimised for a fixed batch: stage 2's verdict on candidate patches, and
/// the referral network's zoom-in crop classifier, which has the same layout.
pub struct PatchModel {
    plan: Plan,
    batch: usize,
    patch_size: usize,
}

impl PatchModel {
    /// Load the manifest's `role` model (stage2 or zoom) of `variant` (hash checked).
    pub fn from_manifest(
        manifest: &Manifest,
        role: Role,
        variant: Variant,
        batch: usize,
    ) -> Result<Self> {
        let entry = manifest.entry(role, variant)?;
        let side = match (role, entry.geometry()?) {
            (Role::Stage2, ModelGeometry::Patch(side))
            | (Role::Zoom, ModelGeometry::Crop(side)) => side,
            _ => bail!("the {role} entry of {} is not a patch model", entry.file),
        };
        let bytes = manifest.verify_file(entry)?;
        Self::load(&bytes, batch, side)
            .with_context(|| format!("loading {}", manifest.path_of(entry).display()))
    }

    /// Load from ONNX bytes; prefer [`PatchModel::from_manifest`], which checks the hash.
    pub fn load(bytes: &[u8], batch: usize, patch_size: usize) -> Result<Self> {
        ensure!(batch > 0, "patch-model batch must be positive");
        let plan = stage2_plan(parse(bytes, "patch")?, batch, patch_size)?;
        Ok(Self {
            plan,
            batch,
            patch_size,
        })
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Values per patch (CHW).
    pub fn patch_len(&self) -> usize {
        CHANNELS * self.patch_size * self.patch_size
    }

    pub fn patch_size(&self) -> usize {
        self.patch_size
    }

    /// Logit margin of each of the `n` patches in `patches` (`n` CHW patches back to
    /// back, as `PatchGeometry::extract` writes them).
    ///
    /// With several threads ([`set_threads`]) the patches are split between that many
    /// workers, each running whole batches with tract on one thread: a patch's products
    /// are too small for tract to share them between threads with a gain (it was slower
    /// at two threads than at one; BENCHMARKS.md). The margins are the same either way:
    /// every batch is computed alone.
    pub fn run(&self, patches: &[f32], n: usize) -> Result<Vec<f32>> {
        use tract_linalg::multithread::{Executor, multithread_tract_scope};
        let len = self.patch_len();
        ensure!(
            patches.len() == n * len,
            "{} values for {n} patches of {len}",
            patches.len()
        );
        let workers = THREADS.load(Ordering::Relaxed).min(n.div_ceil(self.batch));
        if workers <= 1 {
            return self.run_batches(patches);
        }
        let per_worker = n.div_ceil(workers).div_ceil(self.batch) * self.batch * len;
        std::thread::scope(|scope| {
            let handles: Vec<_> = patches
                .chunks(per_worker)
                .map(|chunk| {
                    scope.spawn(move || {
                        multithread_tract_scope(Executor::SingleThread, || self.run_batches(chunk))
                    })
                })
                .collect();
            let mut margins = Vec::with_capacity(n);
            for handle in handles {
                let part = handle
                    .join()
                    .map_err(|_| anyhow!("a patch-model worker thread panicked"))??;
                margins.extend(part);
            }
            Ok(margins)
        })
    }

    /// The margins of whole CHW patches, batch after batch on this thread.
    fn run_batches(&self, patches: &[f32]) -> Result<Vec<f32>> {
        let len = self.patch_len();
        let n = patches.len() / len;
        let p = self.patch_size;
        let mut margins = Vec::with_capacity(n);
        let mut padded = Vec::new();
        for chunk in patches.chunks(self.batch * len) {
            let count = chunk.len() / len;
            let full = if count == self.batch {
                chunk
            } else {
                padded.clear();
                padded.extend_from_slice(chunk);
                padded.resize(self.batch * len, 0.0);
                &padded
            };
            let tensor = Tensor::from_shape(&[self.batch, CHANNELS, p, p], full)?;
            let out = self
                .plan
                .run(tvec!(tensor.into()))
                .context("running the patch model")?;
            let out = out[0].try_as_plain_ram()?;
            ensure!(
                out.shape() == [self.batch, 1],
                "patch-model output has shape {:?}, [{}, 1] expected",
                out.shape(),
                self.batch
            );
            margins.extend_from_slice(&out.as_slice::<f32>()?[..count]);
        }
        Ok(margins)
    }
}

/// The referral network: input `1 x 3 x side x side` (the referral view), outputs the
/// referral margin `1 x 1` and the attention map `1 x 1 x s x s`. Optimised once: its
/// input size is fixed.
pub struct ReferralModel {
    plan: Plan,
    side: usize,
}

/// What the referral network says about one photo.
#[derive(Clone, Debug, PartialEq)]
pub struct ReferralOutput {
    /// Referable minus not.
    pub margin: f32,
    /// Row-major, `attention_side` squared values in (0, 1).
    pub attention: Vec<f32>,
    pub attention_side: usize,
}

impl ReferralModel {
    /// Load the manifest's referral model of `variant` (hash checked).
    pub fn from_manifest(manifest: &Manifest, variant: Variant) -> Result<Self> {
        let entry = manifest.entry(Role::Referral, variant)?;
        let ModelGeometry::Image(side) = entry.geometry()? else {
            bail!("the referral entry of {} is not an image model", entry.file);
        };
        let bytes = manifest.verify_file(entry)?;
        Self::load(&bytes, side)
            .with_context(|| format!("loading {}", manifest.path_of(entry).display()))
    }

    /// Load from ONNX bytes; prefer [`ReferralModel::from_manifest`].
    pub fn load(bytes: &[u8], side: usize) -> Result<Self> {
        let plan = parse(bytes, "referral")?
            .with_input_fact(0, f32::fact([1, CHANNELS, side, side]).into())
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .with_context(|| format!("optimising the referral model for {side}x{side}"))?;
        Ok(Self { plan, side })
    }

    /// Run on one referral view (`side` x `side` planes).
    pub fn run(&self, input: &Planes) -> Result<ReferralOutput> {
        let side = self.side;
        ensure!(
            input.width == side
                && input.height == side
                && input.data.len() == CHANNELS * side * side,
            "referral input is {}x{} ({} values), {side}x{side}x{CHANNELS} expected",
            input.width,
            input.height,
            input.data.len()
        );
        let tensor = Tensor::from_shape(&[1, CHANNELS, side, side], &input.data)?;
        let out = self
            .plan
            .run(tvec!(tensor.into()))
            .context("running the referral model")?;
        ensure!(
            out.len() == 2,
            "the referral model gave {} outputs, 2 expected",
            out.len()
        );
        let margin = out[0].try_as_plain_ram()?;
        ensure!(
            margin.shape() == [1, 1],
            "referral margin has shape {:?}, [1, 1] expected",
            margin.shape()
        );
        let attention = out[1].try_as_plain_ram()?;
        let shape = attention.shape().to_vec();
        ensure!(
            shape.len() == 4 && shape[..2] == [1, 1] && shape[2] == shape[3] && shape[2] > 0,
            "referral attention has shape {shape:?}, [1, 1, s, s] expected"
        );
        Ok(ReferralOutput {
            margin: margin.as_slice::<f32>()?[0],
            attention: attention.as_slice::<f32>()?.to_vec(),
            attention_side: shape[2],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Stage1Model>();
        send_sync::<PatchModel>();
    }

    #[test]
    fn bands_copy_rows_and_pad_with_zeros() {
        let mut planes = Planes::zeros(3, 2);
        for (i, v) in planes.data.iter_mut().enumerate() {
            *v = i as f32 + 1.0;
        }
        let b = band(&planes, 1, 3, 4);
        assert_eq!((b.width, b.height), (4, 3));
        for c in 0..CHANNELS {
            // Row 0 of the band is row 1 of the planes; the 4th column and the rows
            // below the image are zero.
            for x in 0..3 {
                assert_eq!(b.get(c, x, 0), planes.get(c, x, 1));
            }
            assert_eq!(b.get(c, 3, 0), 0.0);
            assert!((0..4).all(|x| b.get(c, x, 1) == 0.0 && b.get(c, x, 2) == 0.0));
        }
    }
}
