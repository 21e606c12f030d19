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
    ///
    /// Verdict (stage 2): the papers' final CNN, 5 x (3x3 conv, batch norm, LeakyReLU,
    /// 2x2 pool) with 16, 32, 32, 64, 64 filters, then fully connected 100-2 with dropout,
    /// on 41x41 patches (41 -> 20 -> 10 -> 5 -> 2 -> 1). Batch norm is what lets it train
    /// from scratch on the hard negatives: without it it stayed at chance.
    pub fn layers(self) -> Vec<Layer> {
        use Layer::*;
        let conv = |name, in_channels, out_channels, kernel, dilation| Conv {
            name,
            in_channels,
            out_channels,
            kernel,
            dilation,
        };
        match self {
            Stage::Candidates => vec![
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
                conv("head", 24, 2, 1, 1),
            ],
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
        // Walk the layers tracking the field and the spacing (jump) of the current map;
        // the upsampling and the skip never widen the field of the deeper branch.
        let (mut field, mut jump) = (1usize, 1usize);
        for layer in self.layers() {
            match layer {
                Layer::Conv {
                    kernel, dilation, ..
                } => field += (kernel as usize - 1) * dilation as usize * jump,
                Layer::MaxPool2 => {
                    field += jump;
                    jump *= 2;
                }
                Layer::UpsampleConcat => jump /= 2,
                _ => {}
            }
        }
        field
    }
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
}

/// A network built from a list of layers ([`Stage::layers`], [`referral_trunk`]) in a
/// var store.
pub struct Net {
    ops: Vec<Op>,
}

impl Net {
    pub fn new(vs: &nn::Path, stage: Stage) -> Self {
        Self::from_layers(vs, stage.layers())
    }

    pub fn from_layers(vs: &nn::Path, layers: Vec<Layer>) -> Self {
        let ops = layers
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
            })
            .collect();
        Self { ops }
    }

    /// Logits: N x 2 x H/2 x W/2 for stage 1 (H and W multiples of
    /// [`Stage::CANDIDATES_INPUT_MULTIPLE`]), N x 2 for stage 2. `train` switches dropout
    /// on and batch norm to batch statistics.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        apply(&self.ops, xs, train)
    }

    /// Training only: [`Net::forward_t`] with the feature maps of the first layer (after
    /// its activation, at input resolution) multiplied by `1 + enhancement` (N x 1 x H x
    /// W, [`crate::gt_enhance`]). The exported network is the plain one.
    pub fn forward_enhanced(&self, xs: &Tensor, enhancement: &Tensor, train: bool) -> Tensor {
        let first = self
            .ops
            .iter()
            .position(|op| matches!(op, Op::LeakyRelu))
            .expect("a network with an activation")
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

    #[test]
    fn stage1_only_sees_its_receptive_field() {
        // A change of the input farther than the receptive field reaches leaves a map
        // value alone, a change within it does not: the device's band overlap relies on it.
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Net::new(&vs.root(), Stage::Candidates);
        let (h, w) = (160i64, 160i64);
        let base = Tensor::randn([1, 3, h, w], (Kind::Float, Device::Cpu));
        let m0 = net.margin(&base, false);
        // Map value (40, 40) is centred near input pixel (80.5, 80.5).
        let probe = |dx: i64| {
            let x = base.copy();
            let _ = x.narrow(3, 80 + dx, 1).narrow(2, 80, 1).fill_(5.0);
            let m = net.margin(&x, false);
            (m.double_value(&[0, 40, 40]) - m0.double_value(&[0, 40, 40])).abs()
        };
        let reach = Stage::Candidates.receptive_field() as i64 / 2;
        assert!(probe(reach + 2) == 0.0, "outside the field");
        assert!(probe(3) > 0.0, "inside the field");
    }
}
