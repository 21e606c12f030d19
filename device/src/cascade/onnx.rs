//! Running the exported CNNs with tract.
//!
//! Models are only loaded from bytes the manifest verified ([`Manifest::model_bytes`]).
//! tract optimises for concrete shapes, so:
//! - stage 1 (fully convolutional, symbolic height and width) is typed and decluttered
//!   once, then optimised per input size; the plans of the last few sizes are cached
//!   (canonical sizes differ a little between cameras, but one camera gives one size);
//! - stage 2 is optimised once for a fixed batch; the last batch is padded with zeros.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail, ensure};
use tract_onnx::prelude::*;

use crate::cascade::candidates::ProbMap;
use crate::geometry::{CHANNELS, Planes};
use crate::manifest::{Manifest, Role, Variant};

/// Optimised plans kept by [`Stage1Model`] (one per input size).
const STAGE1_PLAN_CACHE: usize = 4;

/// Stage-2 batch: one patch per call. Above batch 1 tract builds each convolution's whole
/// im2col matrix on one thread (127 MB for 32 patches): measured with `ma-bench`, stage 2
/// took 263 ms at batch 1 against 466 ms at 32, and the peak RSS of `detect` fell from 349
/// to 296 MiB (BENCHMARKS.md).
pub const STAGE2_BATCH: usize = 1;

/// Stage 1 runs on a whole image in this many horizontal bands ([`Stage1Model::run_on_image`]).
/// On one plan the whole-image run holds conv1's output (127 MB for 1500x1152) next to a
/// padded copy of the image; in three bands the peak RSS of `detect` fell from 296 to 143
/// MiB for 27-38 ms more stage 1, with a bit-identical map (BENCHMARKS.md, proposal 2).
pub const STAGE1_BANDS: usize = 3;

type Plan = Arc<TypedRunnableModel>;

/// Use `n` threads for tract's matrix products (process-wide).
///
/// `n <= 1` restores tract's own single-threaded executor rather than a one-thread pool:
/// a one-thread pool has been reported to still use every core (sonos/tract#2894).
pub fn set_threads(n: usize) {
    use tract_linalg::multithread::{Executor, set_default_executor};
    if n <= 1 {
        set_default_executor(Executor::SingleThread);
    } else {
        set_default_executor(Executor::multithread(n));
    }
}

/// `planes` with `pad` zero pixels on every side: with `pad = patch_size / 2`, the map
/// value `(col, row)` is centred on pixel `(stride * col, stride * row)` of `planes`.
pub fn pad_planes(planes: &Planes, pad: usize) -> Planes {
    padded_band(planes, pad, 0, planes.height + 2 * pad)
}

fn parse(bytes: &[u8], what: &str) -> Result<InferenceModel> {
    tract_onnx::onnx()
        .model_for_read(&mut Cursor::new(bytes))
        .with_context(|| format!("parsing the {what} ONNX model"))
}

/// The stage-1 fully-convolutional net.
pub struct Stage1Model {
    /// Typed and decluttered with symbolic height and width.
    model: TypedModel,
    height: Symbol,
    width: Symbol,
    stride: usize,
    patch_size: usize,
    /// Most recently used first.
    plans: Mutex<Vec<((usize, usize), Plan)>>,
}

impl Stage1Model {
    /// Load the manifest's stage-1 model of `variant` (hash checked).
    pub fn from_manifest(manifest: &Manifest, variant: Variant) -> Result<Self> {
        let entry = manifest.entry(Role::Stage1, variant)?;
        let bytes = manifest.verify_file(entry)?;
        let stride = entry
            .output_stride
            .context("stage1 manifest entry has no output_stride")?;
        Self::load(&bytes, stride, entry.patch_size)
            .with_context(|| format!("loading {}", manifest.path_of(entry).display()))
    }

    /// Load from ONNX bytes; prefer [`Stage1Model::from_manifest`], which checks the hash.
    pub fn load(bytes: &[u8], stride: usize, patch_size: usize) -> Result<Self> {
        let model = parse(bytes, "stage-1")?;
        let model = model
            .into_typed()
            .context("typing the stage-1 model")?
            .into_decluttered()
            .context("decluttering the stage-1 model")?;
        let input = model.input_fact(0)?;
        ensure!(
            input.rank() == 4,
            "stage-1 input must be NCHW, got {:?}",
            input
        );
        let sym = |axis: usize, name: &str| -> Result<Symbol> {
            match &input.shape[axis] {
                TDim::Sym(s) => Ok(s.clone()),
                d => bail!("stage-1 input {name} must be symbolic, got {d}"),
            }
        };
        let (height, width) = (sym(2, "height")?, sym(3, "width")?);
        Ok(Self {
            model,
            height,
            width,
            stride,
            patch_size,
            plans: Mutex::new(Vec::new()),
        })
    }

    /// Output stride of the map.
    pub fn stride(&self) -> usize {
        self.stride
    }

    pub fn patch_size(&self) -> usize {
        self.patch_size
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
        let subs = HashMap::from([
            (self.height.clone(), TDim::Val(height as i64)),
            (self.width.clone(), TDim::Val(width as i64)),
        ]);
        let plan = self
            .model
            .set_symbols(&subs)
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .with_context(|| format!("optimising the stage-1 model for {width}x{height}"))?;
        let mut plans = self.plans.lock().unwrap();
        plans.insert(0, (key, plan.clone()));
        plans.truncate(STAGE1_PLAN_CACHE);
        Ok(plan)
    }

    /// MA probability map of `input`, taken as the network input as it is (see
    /// [`pad_planes`] for centring the map on the image).
    pub fn run(&self, input: &Planes) -> Result<ProbMap> {
        let (w, h) = (input.width, input.height);
        ensure!(
            w >= self.patch_size && h >= self.patch_size,
            "stage-1 input {w}x{h} is smaller than one {0}x{0} patch",
            self.patch_size
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
        let shape = out.shape().to_vec();
        ensure!(
            shape.len() == 4 && shape[0] == 1 && shape[1] == 2,
            "stage-1 output has shape {shape:?}, [1, 2, H, W] expected"
        );
        let (mh, mw) = (shape[2], shape[3]);
        let expect = |n: usize| (n - self.patch_size) / self.stride + 1;
        ensure!(
            (mh, mw) == (expect(h), expect(w)),
            "stage-1 map is {mw}x{mh} for a {w}x{h} input; stride {} and patch {} give {}x{}",
            self.stride,
            self.patch_size,
            expect(w),
            expect(h)
        );
        let data = out.as_slice::<f32>()?[mh * mw..].to_vec();
        Ok(ProbMap {
            width: mw,
            height: mh,
            data,
            stride: self.stride,
            // Value (0, 0) classifies the patch centred half a patch into the input.
            offset: (self.patch_size / 2) as isize,
        })
    }

    /// MA probability map of a whole preprocessed image: the planes are padded by half
    /// a patch (zeros, as outside the FOV), so the map covers the image up to its edges
    /// and its cell centres are in the image's (canonical) coordinates. Computed in
    /// [`STAGE1_BANDS`] bands to bound memory.
    pub fn run_on_image(&self, planes: &Planes) -> Result<ProbMap> {
        self.run_in_bands(planes, STAGE1_BANDS)
    }

    /// [`Stage1Model::run_on_image`] over `bands` horizontal bands: the same values (each
    /// map row depends only on its own input rows), less memory. Every band has the same
    /// height, so one optimised plan serves them all (the last band is moved up and
    /// recomputes a few rows); each band is cut from the unpadded planes with its zero
    /// border, so the padded image is never built whole.
    pub fn run_in_bands(&self, planes: &Planes, bands: usize) -> Result<ProbMap> {
        let (patch, stride) = (self.patch_size, self.stride);
        let pad = patch / 2;
        let rows = (planes.height + 2 * pad - patch) / stride + 1;
        let band_rows = rows.div_ceil(bands.max(1));
        let in_rows = (band_rows - 1) * stride + patch;
        let mut map: Option<ProbMap> = None;
        let mut r0 = 0;
        while r0 < rows {
            let start = r0.min(rows - band_rows);
            let part = self.run(&padded_band(planes, pad, start * stride, in_rows))?;
            ensure!(
                part.height == band_rows,
                "stage-1 band gave {} map rows, {band_rows} expected",
                part.height
            );
            let m = map.get_or_insert_with(|| ProbMap {
                width: part.width,
                height: rows,
                stride,
                offset: part.offset - pad as isize,
                data: vec![0.0; part.width * rows],
            });
            for r in r0..start + band_rows {
                m.data[r * m.width..][..m.width]
                    .copy_from_slice(&part.data[(r - start) * part.width..][..part.width]);
            }
            r0 = start + band_rows;
        }
        map.context("empty stage-1 map")
    }
}

/// Rows `y0 .. y0 + rows` of `planes` padded by `pad` zero pixels on every side: one band
/// of what [`pad_planes`] gives.
fn padded_band(planes: &Planes, pad: usize, y0: usize, rows: usize) -> Planes {
    let w = planes.width + 2 * pad;
    let mut out = Planes::zeros(w, rows);
    for c in 0..CHANNELS {
        let (src, dst) = (planes.channel(c), out.channel_mut(c));
        for r in 0..rows {
            let Some(sy) = (y0 + r).checked_sub(pad) else {
                continue;
            };
            if sy >= planes.height {
                continue;
            }
            dst[r * w + pad..][..planes.width]
                .copy_from_slice(&src[sy * planes.width..][..planes.width]);
        }
    }
    out
}

/// The stage-2 patch classifier, optimised for a fixed batch.
pub struct Stage2Model {
    plan: Plan,
    batch: usize,
    patch_size: usize,
}

impl Stage2Model {
    /// Load the manifest's stage-2 model of `variant` (hash checked).
    pub fn from_manifest(manifest: &Manifest, variant: Variant, batch: usize) -> Result<Self> {
        let entry = manifest.entry(Role::Stage2, variant)?;
        let bytes = manifest.verify_file(entry)?;
        Self::load(&bytes, batch, entry.patch_size)
            .with_context(|| format!("loading {}", manifest.path_of(entry).display()))
    }

    /// Load from ONNX bytes; prefer [`Stage2Model::from_manifest`], which checks the hash.
    pub fn load(bytes: &[u8], batch: usize, patch_size: usize) -> Result<Self> {
        ensure!(batch > 0, "stage-2 batch must be positive");
        let p = patch_size;
        let plan = parse(bytes, "stage-2")?
            .with_input_fact(0, f32::fact([batch, CHANNELS, p, p]).into())
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .with_context(|| format!("optimising the stage-2 model for batch {batch}"))?;
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

    /// MA probability of each of the `n` patches in `patches` (`n` CHW patches back to
    /// back, as `PatchGeometry::extract` writes them).
    pub fn run(&self, patches: &[f32], n: usize) -> Result<Vec<f32>> {
        let len = self.patch_len();
        ensure!(
            patches.len() == n * len,
            "{} values for {n} patches of {len}",
            patches.len()
        );
        let p = self.patch_size;
        let mut probs = Vec::with_capacity(n);
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
                .context("running stage 2")?;
            let out = out[0].try_as_plain_ram()?;
            ensure!(
                out.shape() == [self.batch, 2],
                "stage-2 output has shape {:?}, [{}, 2] expected",
                out.shape(),
                self.batch
            );
            let values = out.as_slice::<f32>()?;
            probs.extend((0..count).map(|i| values[2 * i + 1]));
        }
        Ok(probs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Stage1Model>();
        send_sync::<Stage2Model>();
    }

    #[test]
    fn padding_centres_the_map_on_the_image() {
        let mut planes = Planes::zeros(3, 2);
        for (i, v) in planes.data.iter_mut().enumerate() {
            *v = i as f32 + 1.0;
        }
        let padded = pad_planes(&planes, 2);
        assert_eq!((padded.width, padded.height), (7, 6));
        for c in 0..CHANNELS {
            for y in 0..2 {
                for x in 0..3 {
                    assert_eq!(padded.get(c, x + 2, y + 2), planes.get(c, x, y));
                }
            }
        }
        let total: f32 = padded.data.iter().sum();
        assert_eq!(total, planes.data.iter().sum::<f32>());
        let map = ProbMap {
            width: 2,
            height: 1,
            data: vec![0.1, 0.9],
            stride: 8,
            offset: 2,
        };
        // Value (row 0, column 1) of a patch-5 net is centred on input pixel (8 + 2, 2).
        assert_eq!(map.centre(0, 1), (8 + 2, 2));
        assert_eq!(map.get(0, 1), 0.9);
    }
}
