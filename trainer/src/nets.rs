//! The two CNNs of the cascade, described once as a list of layers.
//!
//! The same description builds the `tch` modules for training and the ONNX graphs for the
//! device (see `export`), so the two cannot drift apart.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// One layer. Convolutions and linear layers own weights named `<name>.weight` and
/// `<name>.bias` in the var store.
#[derive(Clone, Debug, PartialEq)]
pub enum Layer {
    /// Square kernel, stride 1, zero padding `pad` on every side.
    Conv {
        name: &'static str,
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        pad: i64,
    },
    /// LeakyReLU with slope 0.01 (the papers').
    LeakyRelu,
    /// 2x2 max-pooling, stride 2, floor mode.
    MaxPool2,
    /// Dropout with this probability while training; identity at inference (not exported).
    Dropout(f64),
    /// NCHW -> N x (C*H*W).
    Flatten,
    Linear {
        name: &'static str,
        inputs: i64,
        outputs: i64,
    },
}

/// Which network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The small "basic" CNN: candidates over the whole image.
    Basic,
    /// The deeper "final" CNN: verdict on candidate patches.
    Final,
    /// Stage 2 as the basic CNN's architecture used as a patch classifier (its 1x1 map
    /// flattened), started from the trained stage-1 weights and fine-tuned on stage 1's
    /// own false alarms. Trained from scratch on those hard negatives, the final CNN
    /// stayed at chance (validation AUC 0.49-0.59 in the fold-1 pilot, balanced or not);
    /// this one starts from what stage 1 already knows.
    Refine,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Basic => "stage1",
            Stage::Final | Stage::Refine => "stage2",
        }
    }

    /// The layers; both nets end in 2 logits (non-MA, MA).
    ///
    /// Basic: 3 conv (16 filters of 6x6, 5x5, 3x3) each with 2x2 max-pool, then the
    /// fully-connected 200-100-2 written as convolutions (10x10, 1x1, 1x1) so the net runs
    /// fully-convolutionally over a whole image with output stride 8; on a 101x101 patch
    /// it is exactly the patch classifier.
    ///
    /// Final: 5 conv 3x3 + pool (16, 32, 32, 64, 64 filters; 101 -> 50 -> 25 -> 12 -> 6 ->
    /// 3), then fully-connected 100-2.
    pub fn layers(self) -> Vec<Layer> {
        use Layer::*;
        let conv = |name, in_channels, out_channels, kernel, pad| Conv {
            name,
            in_channels,
            out_channels,
            kernel,
            pad,
        };
        match self {
            Stage::Refine => {
                let mut layers = Stage::Basic.layers();
                layers.push(Flatten);
                layers
            }
            Stage::Basic => vec![
                conv("conv1", 3, 16, 6, 0),
                LeakyRelu,
                MaxPool2,
                conv("conv2", 16, 16, 5, 0),
                LeakyRelu,
                MaxPool2,
                conv("conv3", 16, 16, 3, 0),
                LeakyRelu,
                MaxPool2,
                conv("fc1", 16, 200, 10, 0),
                LeakyRelu,
                Dropout(0.25),
                conv("fc2", 200, 100, 1, 0),
                LeakyRelu,
                Dropout(0.25),
                conv("fc3", 100, 2, 1, 0),
            ],
            Stage::Final => vec![
                conv("conv1", 3, 16, 3, 1),
                LeakyRelu,
                MaxPool2,
                conv("conv2", 16, 32, 3, 1),
                LeakyRelu,
                MaxPool2,
                conv("conv3", 32, 32, 3, 1),
                LeakyRelu,
                MaxPool2,
                conv("conv4", 32, 64, 3, 1),
                LeakyRelu,
                MaxPool2,
                conv("conv5", 64, 64, 3, 1),
                LeakyRelu,
                MaxPool2,
                Flatten,
                Linear {
                    name: "fc1",
                    inputs: 64 * 3 * 3,
                    outputs: 100,
                },
                LeakyRelu,
                Dropout(0.25),
                Linear {
                    name: "fc2",
                    inputs: 100,
                    outputs: 2,
                },
            ],
        }
    }

    /// Output stride of the fully-convolutional stage-1 map (three 2x2 pools).
    pub const BASIC_STRIDE: usize = 8;
}

enum Op {
    Conv(nn::Conv2D),
    Linear(nn::Linear),
    LeakyRelu,
    MaxPool2,
    Dropout(f64),
    Flatten,
}

/// A network built from [`Stage::layers`] in a var store.
pub struct Net {
    pub stage: Stage,
    ops: Vec<Op>,
}

impl Net {
    pub fn new(vs: &nn::Path, stage: Stage) -> Self {
        let ops = stage
            .layers()
            .into_iter()
            .map(|layer| match layer {
                Layer::Conv {
                    name,
                    in_channels,
                    out_channels,
                    kernel,
                    pad,
                } => Op::Conv(nn::conv2d(
                    vs / name,
                    in_channels,
                    out_channels,
                    kernel,
                    nn::ConvConfig {
                        padding: pad,
                        ..Default::default()
                    },
                )),
                Layer::Linear {
                    name,
                    inputs,
                    outputs,
                } => Op::Linear(nn::linear(vs / name, inputs, outputs, Default::default())),
                Layer::LeakyRelu => Op::LeakyRelu,
                Layer::MaxPool2 => Op::MaxPool2,
                Layer::Dropout(p) => Op::Dropout(p),
                Layer::Flatten => Op::Flatten,
            })
            .collect();
        Self { stage, ops }
    }

    /// Logits. For a batch of 101x101 patches: N x 2 (stage 1 squeezes its 1x1 map).
    /// For stage 1 over a larger image: N x 2 x H' x W' (see [`Net::forward_map`]).
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut x = xs.shallow_clone();
        for op in &self.ops {
            x = match op {
                Op::Conv(c) => c.forward(&x),
                Op::Linear(l) => l.forward(&x),
                Op::LeakyRelu => x.leaky_relu(),
                Op::MaxPool2 => x.max_pool2d_default(2),
                Op::Dropout(p) => x.dropout(*p, train),
                Op::Flatten => x.flatten(1, -1),
            };
        }
        x
    }

    /// Patch logits, N x 2, whatever the stage.
    pub fn patch_logits(&self, patches: &Tensor, train: bool) -> Tensor {
        let out = self.forward_t(patches, train);
        if out.dim() == 4 {
            out.flatten(1, -1)
        } else {
            out
        }
    }

    /// MA probability of each patch (softmax of the logits, class 1).
    pub fn patch_probabilities(&self, patches: &Tensor) -> Tensor {
        self.patch_logits(patches, false)
            .softmax(-1, Kind::Float)
            .select(1, 1)
    }

    /// Stage-1 MA probability map over a whole (padded) image: 1 x 3 x H x W in,
    /// H' x W' out, output (i, j) being the patch whose top-left corner is (8j, 8i).
    pub fn forward_map(&self, image: &Tensor) -> Tensor {
        self.forward_t(image, false)
            .softmax(1, Kind::Float)
            .select(1, 1)
            .squeeze_dim(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn patch_shapes() {
        let vs = nn::VarStore::new(Device::Cpu);
        let basic = Net::new(&vs.root().sub("b"), Stage::Basic);
        let fin = Net::new(&vs.root().sub("f"), Stage::Final);
        let x = Tensor::zeros([4, 3, 101, 101], (Kind::Float, Device::Cpu));
        assert_eq!(basic.patch_logits(&x, false).size(), [4, 2]);
        assert_eq!(fin.patch_logits(&x, false).size(), [4, 2]);
    }

    #[test]
    fn stage1_map_equals_patch_classifier() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let net = Net::new(&vs.root(), Stage::Basic);
        let image = Tensor::randn([1, 3, 101 + 8 * 3, 101 + 8 * 2], (Kind::Float, Device::Cpu));
        let map = net.forward_map(&image);
        assert_eq!(map.size(), [4, 3]);
        for (i, j) in [(0i64, 0i64), (3, 2), (1, 2)] {
            let patch = image.narrow(2, 8 * i, 101).narrow(3, 8 * j, 101);
            let p = net.patch_probabilities(&patch).double_value(&[0]);
            let m = map.double_value(&[i, j]);
            assert!((p - m).abs() < 1e-5, "({i}, {j}): patch {p} map {m}");
        }
    }
}
