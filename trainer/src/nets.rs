//! The two CNNs of the cascade, described once as a list of layers.
//!
//! The same description builds the `tch` modules for training and the ONNX graphs for the
//! device (see `export`), so the two cannot drift apart.
//!
//! Both nets end in two logits (non-MA, MA). The device only needs their difference, the
//! *logit margin* `MA - non-MA`: it ranks candidates without the float32 saturation of a
//! softmax (thousands of stage-1 cells reach a probability of exactly 1.0, which would
//! tie and lose their order), and stage 1's and stage 2's margins add up into the final
//! score (`ma_core::scoring::Scoring`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use tch::nn::{self, Module, ModuleT};
use tch::{Kind, Tensor};

/// One layer. Convolutions, batch norms and linear layers own weights named
/// `<name>.weight` and `<name>.bias` (batch norms also `<name>.running_mean` and
/// `<name>.running_var`) in the var store.
#[derive(Clone, Debug, PartialEq)]
pub enum Layer {
    /// Square kernel, stride 1, "same" zero padding (`dilation * (kernel / 2)` on every
    /// side): the output has the input's size.
    Conv {
        name: &'static str,
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        dilation: i64,
    },
    /// Batch normalisation over channels; folded into the preceding convolution on export.
    BatchNorm { name: &'static str, channels: i64 },
    /// LeakyReLU with slope 0.01 (the papers').
    LeakyRelu,
    /// 2x2 max-pooling, stride 2, floor mode.
    MaxPool2,
    /// Dropout with this probability while training (whole channels on feature maps);
    /// identity at inference (not exported).
    Dropout(f64),
    /// Remember the current feature map for the next [`Layer::UpsampleConcat`].
    Skip,
    /// Nearest-neighbour 2x upsampling, then concatenated (channels: upsampled first) with
    /// the feature map of the matching [`Layer::Skip`].
    UpsampleConcat,
    /// Mean over height and width: N x C x H x W -> N x C.
    GlobalAvgPool,
    Linear {
        name: &'static str,
        inputs: i64,
        outputs: i64,
    },
    /// The same `trunk` (one set of weights) on the input downscaled by each factor (2x2
    /// average pooling for 2, 4x4 for 4, ...; 1 is the input itself), each output brought
    /// back to the factor-1 output's size by nearest upsampling, and all concatenated
    /// (channels: the factors in order). Stage 1's multi-scale form ([`InputScales`]).
    MultiScale {
        factors: Vec<i64>,
        trunk: Vec<Layer>,
    },
}

/// Which network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Stage 1, run over the whole image: a small fully-convolutional encoder-decoder
    /// whose output map has stride 2 (see [`Stage::layers`]).
    Candidates,
    /// Stage 2, a verdict per candidate: the papers' final CNN on small patches.
    Verdict,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Candidates => "stage1",
            Stage::Verdict => "stage2",
        }
    }

    /// The layers.
    ///
    /// Candidates (stage 1): 3x3 conv (16) at full resolution, pool, 3x3 conv (32) at
    /// stride 2 (kept as the skip), pool, three 3x3 convs (48) at stride 4 with dilations
    /// 1, 2 and 4 (receptive field 71 px: vessels and their crossings are in view), then
    /// back to stride 2: upsampled, joined with the skip, a 1x1 conv (24) and a 3x3 conv
    /// (24), and a 1x1 head. This replaces the papers' basic CNN (stride 8, 101-px
    /// windows): on cross-validation its map ranks MAs better and places them within a
    /// pixel or two, for about half the arithmetic (measured in `models/MODEL_CARD.md`).
    /// This is the single-scale net; [`InputScales`] builds the multi-scale one.
    ///
    /// Verdict (stage 2): the papers' final CNN, 5 x (3x3 conv, batch norm, LeakyReLU,
    /// 2x2 pool) with 16, 32, 32, 64, 64 filters, then fully connected 100-2 with dropout,
    /// on 41x41 patches (41 -> 20 -> 10 -> 5 -> 2 -> 1). Batch norm is what lets it train
    /// from scratch on the hard negatives: without it it stayed at chance.
    pub fn layers(self) -> Vec<Layer> {
        use Layer::*;
        match self {
            Stage::Candidates => InputScales::single().layers(),
            Stage::Verdict => {
                let c = 64;
                let mut layers = conv_bn_blocks(&[16, 32, 32, 64, c], 5);
                // 41 -> 1 after five pools: the average over the 1x1 map is a flatten.
                layers.extend([
                    GlobalAvgPool,
                    Dropout(0.25),
                    Linear {
                        name: "fc1",
                        inputs: c,
                        outputs: 100,
                    },
                    LeakyRelu,
                    Dropout(0.25),
                    Linear {
                        name: "fc2",
                        inputs: 100,
                        outputs: 2,
                    },
                ]);
                layers
            }
        }
    }

    /// Pixels between neighbouring values of the stage-1 map.
    pub const CANDIDATES_STRIDE: usize = 2;

    /// Stage-1 input sides must be multiples of this (two pools, then one upsampling
    /// that must meet the skip's size exactly).
    pub const CANDIDATES_INPUT_MULTIPLE: usize = 4;

    /// Side of the stage-2 patches: the device's patch geometry, so the two cannot differ.
    pub const VERDICT_PATCH: usize = ma_core::geometry::PatchGeometry::VERDICT.size;

    /// Receptive field of one output value, in input pixels (square). For stage 1 it
    /// says how far the image around a pixel matters, and so how much overlap the
    /// device's horizontal bands need.
    pub fn receptive_field(self) -> usize {
        receptive_field(&self.layers())
    }
}

/// Stage 1's layers before its 1x1 head (described at [`Stage::layers`]).
fn candidates_trunk() -> Vec<Layer> {
    use Layer::*;
    let conv = |name, in_channels, out_channels, kernel, dilation| Conv {
        name,
        in_channels,
        out_channels,
        kernel,
        dilation,
    };
    vec![
        conv("conv1", 3, 16, 3, 1),
        LeakyRelu,
        MaxPool2,
        conv("conv2", 16, 32, 3, 1),
        LeakyRelu,
        Skip,
        MaxPool2,
        conv("conv3", 32, 48, 3, 1),
        LeakyRelu,
        conv("conv4", 48, 48, 3, 2),
        LeakyRelu,
        conv("conv5", 48, 48, 3, 4),
        LeakyRelu,
        UpsampleConcat,
        conv("conv6", 48 + 32, 24, 1, 1),
        LeakyRelu,
        Dropout(0.1),
        conv("conv7", 24, 24, 3, 1),
        LeakyRelu,
    ]
}

/// Channels of [`candidates_trunk`]'s output.
const CANDIDATES_FEATURES: i64 = 24;

/// The input scales stage 1 sees (`--stage1-scales`, after Sarhan et al. 2019), as
/// downscaling factors: 1 is the image itself, 2 the image at half size, 4 at a quarter.
/// The single-scale net (`[1]`, the default) is [`Stage::layers`]; with more factors
/// the trunk runs once per factor with the same weights, and the 1x1 head fuses the
/// concatenated features. The exported graph takes the same single image and does the
/// downscaling and upsampling inside, so the device needs nothing new: the receptive
/// field and input multiple it reads from the manifest grow with the coarsest factor.
///
/// A multi-scale net records its factors in its var store (a non-trained variable
/// [`InputScales::VAR`]), so a weight file says which net it belongs to: loading and
/// exporting need no setting beside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputScales(Vec<i64>);

impl InputScales {
    /// Name of the variable holding a multi-scale net's factors.
    pub const VAR: &'static str = "input_scales";
    /// The coarsest factor allowed: stage 1's training crops must divide by the input
    /// multiple it implies.
    pub const MAX_FACTOR: i64 = 8;

    /// The single-scale stage 1.
    pub fn single() -> Self {
        Self(vec![1])
    }

    /// Factors 1 first, then increasing powers of two up to [`Self::MAX_FACTOR`].
    pub fn from_factors(factors: Vec<i64>) -> Result<Self> {
        ensure!(
            factors.first() == Some(&1),
            "stage-1 scales must start with 1 (the image itself), got {factors:?}"
        );
        for pair in factors.windows(2) {
            ensure!(
                pair[1] > pair[0],
                "stage-1 scales must be given from the largest to the smallest, each once:                  got factors {factors:?}"
            );
        }
        for &f in &factors {
            ensure!(
                f > 0 && (f as u64).is_power_of_two() && f <= Self::MAX_FACTOR,
                "stage-1 scale 1/{f} is not one of 1, 0.5, 0.25, 0.125"
            );
        }
        Ok(Self(factors))
    }

    /// Parses `--stage1-scales`: scales as fractions of the image, e.g. `1,0.5`.
    pub fn parse(text: &str) -> Result<Self> {
        let factors = text
            .split(',')
            .map(|part| {
                let scale: f64 = part.trim().parse().with_context(|| {
                    format!("--stage1-scales: `{part}` is not a number (e.g. 1,0.5)")
                })?;
                ensure!(
                    scale > 0.0 && scale <= 1.0,
                    "--stage1-scales: {scale} is not in (0, 1]"
                );
                let factor = (1.0 / scale).round();
                ensure!(
                    (1.0 / factor - scale).abs() < 1e-9,
                    "--stage1-scales: {scale} is not 1 over a power of two (1, 0.5, 0.25, 0.125)"
                );
                Ok(factor as i64)
            })
            .collect::<Result<Vec<_>>>()?;
        Self::from_factors(factors).context("--stage1-scales")
    }

    pub fn factors(&self) -> &[i64] {
        &self.0
    }

    pub fn is_single(&self) -> bool {
        self.0 == [1]
    }

    /// The scales as `--stage1-scales` takes them, e.g. `1,0.5`.
    pub fn describe(&self) -> String {
        self.0
            .iter()
            .map(|&f| (1.0 / f as f64).to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Stage 1's layers at these scales.
    pub fn layers(&self) -> Vec<Layer> {
        let head = |inputs| Layer::Conv {
            name: "head",
            in_channels: inputs,
            out_channels: 2,
            kernel: 1,
            dilation: 1,
        };
        if self.is_single() {
            let mut layers = candidates_trunk();
            layers.push(head(CANDIDATES_FEATURES));
            return layers;
        }
        vec![
            Layer::MultiScale {
                factors: self.0.clone(),
                trunk: candidates_trunk(),
            },
            head(CANDIDATES_FEATURES * self.0.len() as i64),
        ]
    }

    /// Receptive field of stage 1 at these scales ([`Stage::receptive_field`]).
    pub fn receptive_field(&self) -> usize {
        receptive_field(&self.layers())
    }

    /// Stage-1 input sides must be multiples of this.
    pub fn input_multiple(&self) -> usize {
        input_multiple(&self.layers())
    }

    /// The scales of the stage-1 net whose variables are `vars`: single unless the net
    /// recorded its factors.
    pub fn of_vars(vars: &HashMap<String, Tensor>) -> Result<Self> {
        match vars.get(Self::VAR) {
            None => Ok(Self::single()),
            Some(t) => {
                let values = Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1))
                    .context("reading the stage-1 input scales")?;
                Self::from_factors(values.iter().map(|v| v.round() as i64).collect())
                    .context("the stage-1 weights record invalid input scales")
            }
        }
    }

    /// The scales of the stage-1 weight file `path` (safetensors).
    pub fn of_file(path: &Path) -> Result<Self> {
        let tensors = Tensor::read_safetensors(path)
            .with_context(|| format!("cannot read stage-1 weights {}", path.display()))?;
        Self::of_vars(&tensors.into_iter().collect())
            .with_context(|| format!("stage-1 weights {}", path.display()))
    }
}

/// Receptive field of one output value of `layers`, in input pixels (square).
pub fn receptive_field(layers: &[Layer]) -> usize {
    walk_field(layers, 1, 1).0
}

/// Walks `layers` from a map whose values see `field` input pixels and lie `jump` input
/// pixels apart; returns both after the layers. The upsampling and the skip never widen
/// the field of the deeper branch.
fn walk_field(layers: &[Layer], mut field: usize, mut jump: usize) -> (usize, usize) {
    for layer in layers {
        match layer {
            Layer::Conv {
                kernel, dilation, ..
            } => field += (*kernel as usize - 1) * *dilation as usize * jump,
            Layer::MaxPool2 => {
                field += jump;
                jump *= 2;
            }
            Layer::UpsampleConcat => jump /= 2,
            Layer::MultiScale { factors, trunk } => {
                let fine_jump = walk_field(trunk, field, jump).1;
                let mut widest = 0;
                for &f in factors {
                    let f = f as usize;
                    // The f x f average pooling, then the trunk on the coarse grid.
                    let (coarse, _) = walk_field(trunk, field + (f - 1) * jump, jump * f);
                    // Nearest upsampling hands each fine value the coarse value of the
                    // block it lies in, whose centre is up to (f - 1) fine steps away:
                    // counted on both sides, so the field stays centred.
                    widest = widest.max(coarse + 2 * (f - 1) * fine_jump);
                }
                field = widest;
                jump = fine_jump;
            }
            _ => {}
        }
    }
    (field, jump)
}

/// Input sides `layers` need (pools must halve evenly so that upsampling meets the skip,
/// and every downscaled copy must do the same).
pub fn input_multiple(layers: &[Layer]) -> usize {
    layers
        .iter()
        .map(|layer| match layer {
            Layer::MaxPool2 => 2,
            Layer::MultiScale { factors, trunk } => {
                *factors.iter().max().unwrap_or(&1) as usize * input_multiple(trunk)
            }
            _ => 1,
        })
        .product()
}

/// Channels of the referral trunk's last feature map.
pub const REFERRAL_FEATURES: i64 = 64;

/// Input pixels per cell of the referral trunk's feature map (four 2x2 pools).
pub const REFERRAL_STRIDE: usize = 16;

/// The referral network's trunk (M-Net of Zoom-in-Net, scaled to the board): four
/// blocks of 3x3 conv, batch norm, LeakyReLU and 2x2 pool (16, 32, 48, 64 filters), then
/// a 3x3 conv (64) with batch norm and LeakyReLU at stride 16. Its two heads (attention
/// and class margin, 1x1 convs) are in [`crate::referral`].
pub fn referral_trunk() -> Vec<Layer> {
    conv_bn_blocks(&[16, 32, 48, 64, REFERRAL_FEATURES], 4)
}

/// Side of the zoom-in crops the crop classifier reads.
pub const ZOOM_CROP: usize = 96;

/// The zoom-in crop classifier (C-Net of Zoom-in-Net): stage 2's layout (five blocks of
/// 3x3 conv, batch norm, LeakyReLU and pool, 16 to 64 filters) on [`ZOOM_CROP`]-pixel
/// crops at full resolution, averaged over the 3x3 map that is left, then one linear
/// layer to two logits (not referable, referable).
pub fn zoom_classifier() -> Vec<Layer> {
    let c = 64;
    let mut layers = conv_bn_blocks(&[16, 32, 48, 64, c], 5);
    layers.extend([
        Layer::GlobalAvgPool,
        Layer::Dropout(0.25),
        Layer::Linear {
            name: "fc",
            inputs: c,
            outputs: 2,
        },
    ]);
    layers
}

/// Blocks of 3x3 conv (`convK`, the widths in order, on a 3-channel input), batch norm
/// (`bnK`) and LeakyReLU, the first `pooled` of them followed by a 2x2 max-pool.
fn conv_bn_blocks(widths: &[i64], pooled: usize) -> Vec<Layer> {
    const NAMES: [(&str, &str); 5] = [
        ("conv1", "bn1"),
        ("conv2", "bn2"),
        ("conv3", "bn3"),
        ("conv4", "bn4"),
        ("conv5", "bn5"),
    ];
    assert!(widths.len() <= NAMES.len(), "name more blocks");
    let mut layers = Vec::new();
    let mut c = 3;
    for (k, (&w, &(conv, bn))) in widths.iter().zip(&NAMES).enumerate() {
        layers.extend([
            Layer::Conv {
                name: conv,
                in_channels: c,
                out_channels: w,
                kernel: 3,
                dilation: 1,
            },
            Layer::BatchNorm {
                name: bn,
                channels: w,
            },
            Layer::LeakyRelu,
        ]);
        if k < pooled {
            layers.push(Layer::MaxPool2);
        }
        c = w;
    }
    layers
}

enum Op {
    Conv(nn::Conv2D),
    BatchNorm(nn::BatchNorm),
    Linear(nn::Linear),
    LeakyRelu,
    MaxPool2,
    Dropout(f64),
    Skip,
    UpsampleConcat,
    GlobalAvgPool,
    MultiScale { factors: Vec<i64>, trunk: Vec<Op> },
}

/// A network built from a list of layers ([`Stage::layers`], [`referral_trunk`]) in a
/// var store.
pub struct Net {
    ops: Vec<Op>,
    input_multiple: usize,
}

impl Net {
    pub fn new(vs: &nn::Path, stage: Stage) -> Self {
        Self::from_layers(vs, stage.layers())
    }

    pub fn from_layers(vs: &nn::Path, layers: Vec<Layer>) -> Self {
        Self {
            input_multiple: input_multiple(&layers),
            ops: ops(vs, layers),
        }
    }

    /// Input sides a fully-convolutional net (stage 1) needs to be multiples of.
    pub fn input_multiple(&self) -> usize {
        self.input_multiple
    }

    /// Logits: N x 2 x H/2 x W/2 for stage 1 (H and W multiples of
    /// [`Net::input_multiple`]), N x 2 for stage 2. `train` switches dropout
    /// on and batch norm to batch statistics.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        apply(&self.ops, xs, train)
    }

    /// Training only: [`Net::forward_t`] with the feature maps of the first layer (after
    /// its activation, at input resolution) multiplied by `1 + enhancement` (N x 1 x H x
    /// W, [`crate::gt_enhance`]). The exported network is the plain one.
    pub fn forward_enhanced(&self, xs: &Tensor, enhancement: &Tensor, train: bool) -> Tensor {
        // (Single-scale only: `train_cascade` refuses --gt-enhance with --stage1-scales.)
        let first = self
            .ops
            .iter()
            .position(|op| matches!(op, Op::LeakyRelu))
            .expect("a single-scale network with an activation")
            + 1;
        let (head, rest) = self.ops.split_at(first);
        let features = apply(head, xs, train) * (enhancement + 1.0);
        apply(rest, &features, train)
    }

    /// Logits and the embedding they are computed from: the input of the last layer
    /// (stage 2: the 100 features after the hidden fully-connected layer and its
    /// LeakyReLU). The triplet loss shapes it; the exported graph is unchanged.
    pub fn forward_with_embedding(&self, xs: &Tensor, train: bool) -> (Tensor, Tensor) {
        let (trunk, head) = self.ops.split_at(self.ops.len() - 1);
        let embedding = apply(trunk, xs, train);
        let logits = apply(head, &embedding, train);
        (logits, embedding)
    }

    /// Logit margin (MA minus non-MA): N x H/2 x W/2 for stage 1, N for stage 2.
    pub fn margin(&self, xs: &Tensor, train: bool) -> Tensor {
        let logits = self.forward_t(xs, train);
        logits.select(1, 1) - logits.select(1, 0)
    }
}

/// The tch modules of `layers`, their weights in `vs`.
fn ops(vs: &nn::Path, layers: Vec<Layer>) -> Vec<Op> {
    layers
        .into_iter()
        .map(|layer| match layer {
            Layer::Conv {
                name,
                in_channels,
                out_channels,
                kernel,
                dilation,
            } => Op::Conv(nn::conv2d(
                vs / name,
                in_channels,
                out_channels,
                kernel,
                nn::ConvConfig {
                    padding: dilation * (kernel / 2),
                    dilation,
                    ..Default::default()
                },
            )),
            Layer::BatchNorm { name, channels } => {
                Op::BatchNorm(nn::batch_norm2d(vs / name, channels, Default::default()))
            }
            Layer::Linear {
                name,
                inputs,
                outputs,
            } => Op::Linear(nn::linear(vs / name, inputs, outputs, Default::default())),
            Layer::LeakyRelu => Op::LeakyRelu,
            Layer::MaxPool2 => Op::MaxPool2,
            Layer::Dropout(p) => Op::Dropout(p),
            Layer::Skip => Op::Skip,
            Layer::UpsampleConcat => Op::UpsampleConcat,
            Layer::GlobalAvgPool => Op::GlobalAvgPool,
            Layer::MultiScale { factors, trunk } => {
                // Recorded beside the weights (not trained): see `InputScales`.
                let mut record = vs.zeros_no_train(InputScales::VAR, &[factors.len() as i64]);
                let values: Vec<f32> = factors.iter().map(|&f| f as f32).collect();
                tch::no_grad(|| record.copy_(&Tensor::from_slice(&values)));
                Op::MultiScale {
                    factors,
                    trunk: ops(vs, trunk),
                }
            }
        })
        .collect()
}

/// `ops` in order on `xs`; a `Skip` is joined by the `UpsampleConcat` that pairs with it
/// within `ops`.
fn apply(ops: &[Op], xs: &Tensor, train: bool) -> Tensor {
    let mut x = xs.shallow_clone();
    let mut skips = Vec::new();
    for op in ops {
        x = match op {
            Op::Conv(c) => c.forward(&x),
            Op::BatchNorm(b) => b.forward_t(&x, train),
            Op::Linear(l) => l.forward(&x),
            Op::LeakyRelu => x.leaky_relu(),
            Op::MaxPool2 => x.max_pool2d_default(2),
            Op::Dropout(p) if x.dim() == 4 => x.feature_dropout(*p, train),
            Op::Dropout(p) => x.dropout(*p, train),
            Op::Skip => {
                skips.push(x.shallow_clone());
                x
            }
            Op::UpsampleConcat => {
                let skip = skips
                    .pop()
                    .expect("layer lists pair Skip with UpsampleConcat");
                let size = x.size();
                let up = x.upsample_nearest2d([size[2] * 2, size[3] * 2], None, None);
                Tensor::cat(&[up, skip], 1)
            }
            Op::GlobalAvgPool => x.mean_dim([2i64, 3].as_slice(), false, Kind::Float),
            Op::MultiScale { factors, trunk } => {
                let branches: Vec<Tensor> = factors
                    .iter()
                    .map(|&f| {
                        if f == 1 {
                            return apply(trunk, &x, train);
                        }
                        let small = x.avg_pool2d([f, f], [f, f], [0, 0], false, true, None);
                        let y = apply(trunk, &small, train);
                        let size = y.size();
                        y.upsample_nearest2d([size[2] * f, size[3] * f], None, None)
                    })
                    .collect();
                Tensor::cat(&branches, 1)
            }
        };
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn shapes() {
        let vs = nn::VarStore::new(Device::Cpu);
        let s1 = Net::new(&vs.root().sub("a"), Stage::Candidates);
        let s2 = Net::new(&vs.root().sub("b"), Stage::Verdict);
        let image = Tensor::zeros([1, 3, 64, 96], (Kind::Float, Device::Cpu));
        assert_eq!(s1.forward_t(&image, false).size(), [1, 2, 32, 48]);
        assert_eq!(s1.margin(&image, false).size(), [1, 32, 48]);
        let p = Stage::VERDICT_PATCH as i64;
        let patches = Tensor::zeros([4, 3, p, p], (Kind::Float, Device::Cpu));
        assert_eq!(s2.forward_t(&patches, false).size(), [4, 2]);
        assert_eq!(s2.margin(&patches, false).size(), [4]);
    }

    #[test]
    fn receptive_fields() {
        // conv1 3 -> pool 4 -> conv2 (jump 2) 8 -> pool 10 -> conv3..5 (jump 4, dilations
        // 1, 2, 4) 18, 34, 66 -> back to jump 2 -> conv7 3x3 70.
        assert_eq!(Stage::Candidates.receptive_field(), 70);
    }

    /// A change of the input farther than `field / 2` from a map value leaves it
    /// alone, a change 3 pixels away does not: the device's band overlap relies on it.
    /// Probed on both sides, since a multi-scale net's coarse blocks are not centred.
    fn check_field(net: &Net, field: usize) {
        // Map value (c / 2, c / 2) is centred near input pixel (c + 0.5, c + 0.5).
        let side = (field + 64).next_multiple_of(32) as i64;
        let c = side / 2;
        let base = Tensor::randn([1, 3, side, side], (Kind::Float, Device::Cpu));
        let m0 = net.margin(&base, false);
        let probe = |dx: i64| {
            let x = base.copy();
            let _ = x.narrow(3, c + dx, 1).narrow(2, c, 1).fill_(5.0);
            let m = net.margin(&x, false);
            (m.double_value(&[0, c / 2, c / 2]) - m0.double_value(&[0, c / 2, c / 2])).abs()
        };
        let reach = field as i64 / 2;
        assert!(probe(reach + 2) == 0.0, "outside the field, right");
        assert!(probe(-reach - 1) == 0.0, "outside the field, left");
        assert!(probe(3) > 0.0, "inside the field");
        assert!(probe(-3) > 0.0, "inside the field");
    }

    #[test]
    fn stage1_only_sees_its_receptive_field() {
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Net::new(&vs.root(), Stage::Candidates);
        check_field(&net, Stage::Candidates.receptive_field());
    }

    #[test]
    fn multi_scale_stage1_shapes_field_and_input_multiple() {
        let scales = InputScales::parse("1,0.5").unwrap();
        assert_eq!(scales.factors(), [1, 2]);
        assert_eq!(scales.describe(), "1,0.5");
        assert_eq!(scales.input_multiple(), 8);
        // The half-size copy: 2x2 pooling (field 2, jump 2), the trunk at jump 2 adds
        // twice its 69, and the nearest upsampling up to one fine step each side.
        assert_eq!(scales.receptive_field(), 2 + 2 * 69 + 2 * 2);
        assert_eq!(InputScales::single().receptive_field(), 70);
        assert_eq!(
            InputScales::single().input_multiple(),
            Stage::CANDIDATES_INPUT_MULTIPLE
        );
        assert_eq!(InputScales::single().layers(), Stage::Candidates.layers());

        tch::manual_seed(6);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Net::from_layers(&vs.root(), scales.layers());
        assert_eq!(net.input_multiple(), 8);
        let image = Tensor::randn([2, 3, 64, 96], (Kind::Float, Device::Cpu));
        assert_eq!(net.forward_t(&image, false).size(), [2, 2, 32, 48]);
        // One set of trunk weights, a head over both scales' features, the factors kept.
        let vars = vs.variables();
        assert_eq!(vars["head.weight"].size(), [2, 48, 1, 1]);
        assert_eq!(vars["conv1.weight"].size(), [16, 3, 3, 3]);
        assert_eq!(InputScales::of_vars(&vars).unwrap(), scales);
        assert_eq!(
            vs.trainable_variables().len(),
            vars.len() - 1,
            "factors not trained"
        );
        check_field(&net, scales.receptive_field());

        let quarter = InputScales::parse("1, 0.5, 0.25").unwrap();
        assert_eq!(quarter.input_multiple(), 16);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Net::from_layers(&vs.root(), quarter.layers());
        check_field(&net, quarter.receptive_field());
    }

    #[test]
    fn both_scales_are_trained() {
        // The head's gradient reaches the half-scale features: the coarse branch is
        // part of what the loss trains, not a passenger.
        tch::manual_seed(7);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Net::from_layers(&vs.root(), InputScales::parse("1,0.5").unwrap().layers());
        let image = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        net.margin(&image, true).sum(Kind::Float).backward();
        let grad = vs.variables()["head.weight"].grad().abs().view([2, 2, 24]);
        for scale in 0..2 {
            assert!(grad.select(1, scale).sum(Kind::Float).double_value(&[]) > 0.0);
        }
        let coarse = vs.variables()["conv1.weight"].grad();
        assert!(coarse.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn stage1_scales_are_checked() {
        for (text, why) in [
            ("1,0.25,0.5", "largest to the smallest"),
            ("0.5", "start with 1"),
            ("1,0.3", "power of two"),
            ("1,0.0625", "not one of"),
            ("1,1", "each once"),
            ("1,x", "not a number"),
            ("1,2", "not in (0, 1]"),
        ] {
            let err = format!("{:#}", InputScales::parse(text).unwrap_err());
            assert!(err.contains(why), "{text}: {err}");
        }
    }
}
