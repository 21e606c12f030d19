//! ONNX export of the two CNNs for the device.
//!
//! `tch` has no ONNX exporter, so the graph is written from [`Stage::layers`] (the same
//! description that builds the training net) with tract-onnx's protobuf types. Only ops
//! that both tract (device) and onnxruntime (reference check) implement are used: Conv,
//! LeakyRelu, MaxPool, AveragePool, Resize, Concat, GlobalAveragePool, Flatten, Gemm and,
//! for int8 weights, DequantizeLinear.
//!
//! Layout:
//! - stage 1: input `image` float `[1, 3, height, width]` (symbolic H and W, multiples of
//!   4, or of 4 times the coarsest factor of a multi-scale net), output `margin`
//!   `[1, 1, height/2, width/2]`. A multi-scale net ([`InputScales`]) downscales inside
//!   (AveragePool), runs its trunk once per scale on the same initialisers, upsamples
//!   (Resize) and concatenates before the head.
//! - stage 2: input `patches` float `[batch, 3, 41, 41]`, output `margin` `[batch, 1]`.
//!
//! Rewritten on the way, to what the device needs and nothing more:
//! - the last layer's two logits become one output, their difference (MA minus non-MA):
//!   its weights are the difference of the two rows;
//! - batch norm (stage 2) is folded into the convolution before it, with the running
//!   statistics: `w' = w * g / sqrt(v + eps)`, `b' = (b - m) * g / sqrt(v + eps) + beta`;
//! - dropout is the identity at inference and is not written.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use prost::Message;
use tch::{Device, Kind, Tensor};
use tract_onnx::pb;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension};

use ma_core::manifest::{
    Manifest, ModelEntry, ModelGeometry, OUTPUT_NAME, OperatingPoints, Training, Variant,
};

pub mod referral;
pub mod weights;

use crate::nets::{InputScales, Layer, Stage};
use crate::training_data::DeviceSettings;

/// ONNX IR version written (IR 8 goes with opsets up to 17; onnxruntime and tract read it).
pub const IR_VERSION: i64 = 8;
/// Default-domain opset: 13 is the first with per-axis DequantizeLinear.
pub const OPSET: i64 = 13;
/// LeakyReLU slope of [`Layer::LeakyRelu`] (tch's default).
pub const LEAKY_RELU_ALPHA: f32 = 0.01;
/// Epsilon of tch's batch norm (its default configuration).
pub const BATCH_NORM_EPS: f64 = 1e-5;

/// How weights are stored in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// Everything float32.
    Float,
    /// Conv and Gemm weights as int8 with a float scale per output channel (symmetric,
    /// zero point 0) feeding `DequantizeLinear`; biases float. The runtime folds the
    /// dequantisation into float weights at load: a 4x smaller file, float speed.
    Int8Weights,
}

impl WeightFormat {
    /// Name used in file names and the manifest (`variant`).
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Float => "float",
            WeightFormat::Int8Weights => "int8",
        }
    }
}

/// Graph input name.
pub fn input_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Candidates => "image",
        Stage::Verdict => "patches",
    }
}

/// The ONNX model of `stage` with the weights of `vs`.
///
/// The net must have been built on the var store's root (`Net::new(&vs.root(), stage)`),
/// so its variables are named `<layer>.weight`, `<layer>.bias`, ...
pub fn onnx_model(
    stage: Stage,
    vs: &tch::nn::VarStore,
    weights: WeightFormat,
) -> Result<pb::ModelProto> {
    let vars = vs.variables();
    // Stage 1's weights say its input scales; stage 2 has one form.
    let (scales, layers) = match stage {
        Stage::Candidates => {
            let scales = InputScales::of_vars(&vars)?;
            let layers = scales.layers();
            (scales, layers)
        }
        Stage::Verdict => (InputScales::single(), stage.layers()),
    };
    let mut b = GraphBuilder::default();
    add_layers(
        &mut b,
        &vars,
        &layers,
        input_name(stage),
        Head::Margin,
        weights,
        "",
    )?;
    b.check_all_used(&vars)?;

    let patch = Stage::VERDICT_PATCH as i64;
    let (input_dims, output_dims, doc) = match stage {
        Stage::Candidates => (
            vec![val(1), val(3), param("height"), param("width")],
            vec![val(1), val(1), param("map_height"), param("map_width")],
            format!(
                "Stage 1: MA logit margin map, output stride {}, receptive field {} px; \
                 input sides multiples of {}",
                Stage::CANDIDATES_STRIDE,
                scales.receptive_field(),
                scales.input_multiple()
            ),
        ),
        Stage::Verdict => (
            vec![param("batch"), val(3), val(patch), val(patch)],
            vec![param("batch"), val(1)],
            format!("Stage 2: MA logit margin of {patch}x{patch} patches"),
        ),
    };
    let graph = pb::GraphProto {
        name: format!("ma_{}", stage.name()),
        node: b.nodes,
        initializer: b.initializers,
        input: vec![value_info(input_name(stage), input_dims)],
        output: vec![value_info(OUTPUT_NAME, output_dims)],
        doc_string: doc,
        ..Default::default()
    };
    let mut metadata = vec![meta("stage", stage.name()), meta("weights", weights.name())];
    match stage {
        Stage::Candidates => {
            metadata.push(meta("output_stride", &Stage::CANDIDATES_STRIDE.to_string()));
            metadata.push(meta(
                "receptive_field",
                &scales.receptive_field().to_string(),
            ));
            // Only multi-scale nets say so: single-scale files stay byte for byte what
            // they were (released reference weights are checked against them).
            if !scales.is_single() {
                metadata.push(meta("input_scales", &scales.describe()));
            }
        }
        Stage::Verdict => metadata.push(meta("patch_size", &patch.to_string())),
    }
    Ok(model_proto(
        graph,
        "Microaneurysm detector CNN; research use only",
        metadata,
    ))
}

/// A model of the graph at [`IR_VERSION`] and [`OPSET`], produced by this trainer.
fn model_proto(
    graph: pb::GraphProto,
    doc: &str,
    metadata: Vec<pb::StringStringEntryProto>,
) -> pb::ModelProto {
    pb::ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "ma-trainer".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: doc.into(),
        graph: Some(graph),
        metadata_props: metadata,
        ..Default::default()
    }
}

/// What [`add_layers`] does with the last weighted layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Head {
    /// Its two logits become one output, their difference, named [`OUTPUT_NAME`].
    Margin,
    /// Written as it is; the graph goes on after the layers.
    None,
}

/// Write `layers` into the graph, reading from tensor `input`; returns the name of the
/// last tensor written. Node and intermediate tensor names start with `prefix` (one per
/// branch of a [`Layer::MultiScale`], whose branches share the weights' initialisers).
fn add_layers(
    b: &mut GraphBuilder,
    vars: &HashMap<String, Tensor>,
    layers: &[Layer],
    input: &str,
    head: Head,
    weights: WeightFormat,
    prefix: &str,
) -> Result<String> {
    let mut x = input.to_string();
    // The last layer with weights gives the logits: with `Head::Margin` it is written as
    // the margin, and nothing after it.
    let head = match head {
        Head::Margin => layers
            .iter()
            .rposition(|l| matches!(l, Layer::Conv { .. } | Layer::Linear { .. }))
            .context("a net without a weighted layer")?,
        Head::None => usize::MAX,
    };
    let mut skips: Vec<String> = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let out = if i == head {
            OUTPUT_NAME.to_string()
        } else {
            format!("{prefix}t{i}")
        };
        match *layer {
            Layer::Conv {
                name,
                in_channels,
                out_channels,
                kernel,
                dilation,
            } => {
                let dims = [out_channels, in_channels, kernel, kernel];
                let mut p = b.read(vars, name, &dims)?;
                if let Some(Layer::BatchNorm { name: bn, channels }) = layers.get(i + 1) {
                    ensure!(
                        *channels == out_channels,
                        "batch norm `{bn}` has {channels} channels after `{name}`'s {out_channels}"
                    );
                    p = b.fold_batch_norm(vars, bn, p)?;
                }
                if i == head {
                    p = p.margin()?;
                }
                let (w, bias) = b.add_params(name, p, weights);
                let pad = dilation * (kernel / 2);
                b.node(
                    "Conv",
                    &format!("{prefix}{name}"),
                    &[&x, &w, &bias],
                    &out,
                    vec![
                        ints("kernel_shape", &[kernel, kernel]),
                        ints("pads", &[pad, pad, pad, pad]),
                        ints("strides", &[1, 1]),
                        ints("dilations", &[dilation, dilation]),
                        int("group", 1),
                    ],
                );
            }
            // Folded into the convolution before it.
            Layer::BatchNorm { name, .. } => {
                ensure!(
                    matches!(layers.get(i.wrapping_sub(1)), Some(Layer::Conv { .. })),
                    "batch norm `{name}` must follow a convolution to be exported"
                );
                continue;
            }
            Layer::Linear {
                name,
                inputs,
                outputs,
            } => {
                // tch stores Linear weights [out, in] and computes x W^T + b: Gemm transB.
                let mut p = b.read(vars, name, &[outputs, inputs])?;
                if i == head {
                    p = p.margin()?;
                }
                let (w, bias) = b.add_params(name, p, weights);
                b.node(
                    "Gemm",
                    &format!("{prefix}{name}"),
                    &[&x, &w, &bias],
                    &out,
                    vec![
                        float("alpha", 1.0),
                        float("beta", 1.0),
                        int("transA", 0),
                        int("transB", 1),
                    ],
                );
            }
            Layer::LeakyRelu => b.node(
                "LeakyRelu",
                &format!("{prefix}leaky_relu{i}"),
                &[&x],
                &out,
                vec![float("alpha", LEAKY_RELU_ALPHA)],
            ),
            Layer::MaxPool2 => b.node(
                "MaxPool",
                &format!("{prefix}max_pool{i}"),
                &[&x],
                &out,
                vec![
                    ints("kernel_shape", &[2, 2]),
                    ints("strides", &[2, 2]),
                    ints("pads", &[0, 0, 0, 0]),
                    int("ceil_mode", 0),
                ],
            ),
            Layer::Skip => {
                skips.push(x.clone());
                continue;
            }
            Layer::UpsampleConcat => {
                let skip = skips
                    .pop()
                    .context("UpsampleConcat without a Skip before it")?;
                let up = format!("{prefix}upsampled{i}");
                b.upsample_nearest(&x, 2, &format!("{prefix}upsample{i}"), &up);
                b.node(
                    "Concat",
                    &format!("{prefix}concat{i}"),
                    &[&up, &skip],
                    &out,
                    vec![int("axis", 1)],
                );
            }
            Layer::GlobalAvgPool => {
                let pooled = format!("{prefix}pooled{i}");
                b.node(
                    "GlobalAveragePool",
                    &format!("{prefix}global_avg_pool{i}"),
                    &[&x],
                    &pooled,
                    vec![],
                );
                b.node(
                    "Flatten",
                    &format!("{prefix}flatten{i}"),
                    &[&pooled],
                    &out,
                    vec![int("axis", 1)],
                );
            }
            Layer::Dropout(_) => continue,
            Layer::MultiScale {
                ref factors,
                ref trunk,
            } => {
                // `onnx_model` built these layers from the recorded factors.
                b.used.push(InputScales::VAR.to_string());
                let mut branches = Vec::new();
                for &f in factors {
                    let branch = format!("{prefix}scale{f}_");
                    let input = if f == 1 {
                        x.clone()
                    } else {
                        // torch's avg_pool2d without padding: the mean of each f x f block.
                        let small = format!("{branch}input");
                        b.node(
                            "AveragePool",
                            &format!("{branch}downscale"),
                            &[&x],
                            &small,
                            vec![
                                ints("kernel_shape", &[f, f]),
                                ints("strides", &[f, f]),
                                ints("pads", &[0, 0, 0, 0]),
                                int("ceil_mode", 0),
                                int("count_include_pad", 1),
                            ],
                        );
                        small
                    };
                    let y = add_layers(b, vars, trunk, &input, Head::None, weights, &branch)?;
                    if f == 1 {
                        branches.push(y);
                        continue;
                    }
                    let up = format!("{branch}upscaled");
                    b.upsample_nearest(&y, f, &format!("{branch}upscale"), &up);
                    branches.push(up);
                }
                let inputs: Vec<&str> = branches.iter().map(String::as_str).collect();
                b.node(
                    "Concat",
                    &format!("{prefix}concat_scales{i}"),
                    &inputs,
                    &out,
                    vec![int("axis", 1)],
                );
            }
        }
        x = out;
        if i == head {
            break;
        }
    }
    Ok(x)
}

/// The weight and bias of one layer, as f32 values, first axis the output channel.
#[derive(Clone, Debug)]
struct Params {
    dims: Vec<i64>,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Params {
    /// The two-output layer as its one-output difference (row 1 minus row 0).
    fn margin(self) -> Result<Params> {
        ensure!(
            self.dims[0] == 2,
            "the last layer has {} outputs, 2 expected",
            self.dims[0]
        );
        let per = self.weight.len() / 2;
        let mut dims = self.dims;
        dims[0] = 1;
        Ok(Params {
            dims,
            weight: (0..per)
                .map(|k| self.weight[per + k] - self.weight[k])
                .collect(),
            bias: vec![self.bias[1] - self.bias[0]],
        })
    }
}

/// Encode `model` to `path`.
pub fn write_onnx(path: impl AsRef<Path>, model: &pb::ModelProto) -> Result<()> {
    let path = path.as_ref();
    std::fs::write(path, model.encode_to_vec())
        .with_context(|| format!("writing ONNX model {}", path.display()))
}

/// Symmetric per-output-channel int8 quantisation of a weight whose first axis is the
/// output channel: `(values, scales)` with `w ~= q * scale`, `q` in -127..=127.
///
/// -128 is left unused so the range is symmetric; an all-zero channel gets scale 1.
pub fn quantize_per_channel(data: &[f32], out_channels: usize) -> (Vec<i8>, Vec<f32>) {
    assert!(
        out_channels > 0 && data.len().is_multiple_of(out_channels),
        "weight of {} values does not split into {out_channels} channels",
        data.len()
    );
    let per = data.len() / out_channels;
    let mut q = Vec::with_capacity(data.len());
    let mut scales = Vec::with_capacity(out_channels);
    for channel in data.chunks(per) {
        let max = channel.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
        q.extend(
            channel
                .iter()
                .map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8),
        );
        scales.push(scale);
    }
    (q, scales)
}

/// What `DequantizeLinear` computes from [`quantize_per_channel`]'s output.
pub fn dequantize_per_channel(q: &[i8], scales: &[f32]) -> Vec<f32> {
    let per = q.len() / scales.len();
    q.chunks(per)
        .zip(scales)
        .flat_map(|(c, &s)| c.iter().map(move |&v| v as f32 * s))
        .collect()
}

/// A tensor of the var store as a flat f32 vector, checking its shape.
pub fn tensor_values(vars: &HashMap<String, Tensor>, name: &str, dims: &[i64]) -> Result<Vec<f32>> {
    let t = vars.get(name).with_context(|| {
        let mut names: Vec<_> = vars.keys().collect();
        names.sort();
        format!("var store has no `{name}` (has {names:?}); build the net on the root path")
    })?;
    ensure!(
        t.size() == dims,
        "`{name}` has shape {:?}, the layer description wants {dims:?}",
        t.size()
    );
    let flat = t
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous()
        .flatten(0, -1);
    Vec::<f32>::try_from(&flat).with_context(|| format!("reading `{name}`"))
}

#[derive(Default)]
struct GraphBuilder {
    nodes: Vec<pb::NodeProto>,
    initializers: Vec<pb::TensorProto>,
    used: Vec<String>,
}

impl GraphBuilder {
    fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        output: &str,
        attribute: Vec<pb::AttributeProto>,
    ) {
        self.nodes.push(pb::NodeProto {
            op_type: op.into(),
            name: name.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            attribute,
            ..Default::default()
        });
    }

    /// The weight (of shape `dims`) and bias of layer `name`, marked as used.
    fn read(&mut self, vars: &HashMap<String, Tensor>, name: &str, dims: &[i64]) -> Result<Params> {
        let (w_name, b_name) = (format!("{name}.weight"), format!("{name}.bias"));
        let weight = tensor_values(vars, &w_name, dims)?;
        let bias = tensor_values(vars, &b_name, &dims[..1])?;
        if let Some(bad) = weight.iter().chain(&bias).find(|v| !v.is_finite()) {
            bail!("layer `{name}` has a non-finite weight ({bad}); refusing to export");
        }
        self.used.extend([w_name, b_name]);
        Ok(Params {
            dims: dims.to_vec(),
            weight,
            bias,
        })
    }

    /// `conv` with the batch norm `name` after it folded in (inference statistics).
    fn fold_batch_norm(
        &mut self,
        vars: &HashMap<String, Tensor>,
        name: &str,
        conv: Params,
    ) -> Result<Params> {
        let c = conv.dims[0];
        let mut get = |what: &str| -> Result<Vec<f32>> {
            let key = format!("{name}.{what}");
            let v = tensor_values(vars, &key, &[c])?;
            self.used.push(key);
            Ok(v)
        };
        let (gamma, beta, mean, var) = (
            get("weight")?,
            get("bias")?,
            get("running_mean")?,
            get("running_var")?,
        );
        let per = conv.weight.len() / c as usize;
        let scale: Vec<f64> = gamma
            .iter()
            .zip(&var)
            .map(|(&g, &v)| g as f64 / (v as f64 + BATCH_NORM_EPS).sqrt())
            .collect();
        let weight = conv
            .weight
            .chunks(per)
            .zip(&scale)
            .flat_map(|(w, &s)| w.iter().map(move |&v| (v as f64 * s) as f32))
            .collect();
        let bias = (0..c as usize)
            .map(|o| ((conv.bias[o] as f64 - mean[o] as f64) * scale[o] + beta[o] as f64) as f32)
            .collect();
        Ok(Params {
            dims: conv.dims,
            weight,
            bias,
        })
    }

    /// Nearest upsampling of `x` by `factor` as torch does it (source pixel
    /// floor(dst / factor)), in a node named `name` writing tensor `out`.
    fn upsample_nearest(&mut self, x: &str, factor: i64, name: &str, out: &str) {
        let scales = format!("{name}_scales");
        let f = factor as f32;
        self.initializers
            .push(float_tensor(&scales, &[4], &[1.0, 1.0, f, f]));
        self.node(
            "Resize",
            name,
            &[x, "", &scales],
            out,
            vec![
                string("mode", "nearest"),
                string("coordinate_transformation_mode", "asymmetric"),
                string("nearest_mode", "floor"),
            ],
        );
    }

    /// Adds `p` as initialisers of layer `name` (the weight in `format`) and returns the
    /// names of the tensors the layer's node reads.
    /// A layer written a second time (the shared trunk of a multi-scale net) reads the
    /// same initialisers.
    fn add_params(&mut self, name: &str, p: Params, format: WeightFormat) -> (String, String) {
        let (w_name, b_name) = (format!("{name}.weight"), format!("{name}.bias"));
        if self.initializers.iter().any(|t| t.name == b_name) {
            return (w_name, b_name);
        }
        let dims = &p.dims;
        self.initializers
            .push(float_tensor(&b_name, &dims[..1], &p.bias));
        match format {
            WeightFormat::Float => self
                .initializers
                .push(float_tensor(&w_name, dims, &p.weight)),
            WeightFormat::Int8Weights => {
                let out = dims[0];
                let (q, scales) = quantize_per_channel(&p.weight, out as usize);
                let (q_name, s_name, z_name) = (
                    format!("{w_name}_quantized"),
                    format!("{w_name}_scale"),
                    format!("{w_name}_zero_point"),
                );
                self.initializers.push(pb::TensorProto {
                    name: q_name.clone(),
                    dims: dims.to_vec(),
                    data_type: DataType::Int8 as i32,
                    raw_data: q.iter().map(|&v| v as u8).collect(),
                    ..Default::default()
                });
                self.initializers
                    .push(float_tensor(&s_name, &[out], &scales));
                self.initializers.push(pb::TensorProto {
                    name: z_name.clone(),
                    dims: vec![out],
                    data_type: DataType::Int8 as i32,
                    raw_data: vec![0; out as usize],
                    ..Default::default()
                });
                // The node's output takes the float weight's name, so the Conv/Gemm node
                // is the same in both formats.
                self.node(
                    "DequantizeLinear",
                    &format!("{w_name}_dequantize"),
                    &[&q_name, &s_name, &z_name],
                    &w_name,
                    vec![int("axis", 0)],
                );
            }
        }
        (w_name, b_name)
    }

    /// Every variable of the var store must be in the graph: a leftover means the
    /// layer description and the trained net disagree.
    fn check_all_used(&self, vars: &HashMap<String, Tensor>) -> Result<()> {
        let mut unused: Vec<_> = vars.keys().filter(|k| !self.used.contains(k)).collect();
        unused.sort();
        ensure!(
            unused.is_empty(),
            "var store has variables the layer description does not use: {unused:?}"
        );
        Ok(())
    }
}

fn float_tensor(name: &str, dims: &[i64], data: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn value_info(name: &str, dims: Vec<Dimension>) -> pb::ValueInfoProto {
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(pb::TensorShapeProto { dim: dims }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn val(v: i64) -> Dimension {
    Dimension {
        value: Some(dimension::Value::DimValue(v)),
        ..Default::default()
    }
}

fn param(name: &str) -> Dimension {
    Dimension {
        value: Some(dimension::Value::DimParam(name.into())),
        ..Default::default()
    }
}

fn meta(key: &str, value: &str) -> pb::StringStringEntryProto {
    pb::StringStringEntryProto {
        key: key.into(),
        value: value.into(),
    }
}

fn int(name: &str, i: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn ints(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn string(name: &str, s: &str) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::String as i32,
        s: s.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn float(name: &str, f: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        f,
        ..Default::default()
    }
}

/// What a model set's manifest says besides its files.
#[derive(Clone, Debug)]
pub struct Release {
    /// Release name (shown in records and on screen).
    pub version: String,
    /// Variant the device loads by default.
    pub default_variant: Variant,
    /// Scores at 1, 2 and 4 FP/image (from the CV).
    pub operating_points: [f64; 3],
    pub training: Training,
    /// The settings the weights were trained with.
    pub settings: DeviceSettings,
}

/// Write a shippable model set into `out`: both stages as float and int8-weight ONNX,
/// and `manifest.toml` with every file's sha256, the preprocessing, candidate and scoring
/// settings the weights were trained with, the operating points (scores at 1, 2 and 4 FP/image) and the
/// training provenance.
pub fn export_model_set(
    stage1: &tch::nn::VarStore,
    stage2: &tch::nn::VarStore,
    out: &Path,
    release: &Release,
) -> Result<Manifest> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut models = Vec::new();
    let scales = InputScales::of_vars(&stage1.variables())?;
    let map = ModelGeometry::Map {
        receptive_field: scales.receptive_field(),
        output_stride: Stage::CANDIDATES_STRIDE,
        input_multiple: scales.input_multiple(),
    };
    for (stage, vs, geometry) in [
        (Stage::Candidates, stage1, map),
        (
            Stage::Verdict,
            stage2,
            ModelGeometry::Patch(Stage::VERDICT_PATCH),
        ),
    ] {
        for (format, variant) in [
            (WeightFormat::Float, Variant::Float),
            (WeightFormat::Int8Weights, Variant::Int8),
        ] {
            let file = format!("{}-{}.onnx", stage.name(), format.name());
            write_onnx(out.join(&file), &onnx_model(stage, vs, format)?)?;
            models.push(ModelEntry::for_file(out, &file, variant, geometry)?);
        }
    }
    let [op1, op2, op4] = release.operating_points;
    let settings = &release.settings;
    let manifest = Manifest {
        version: release.version.clone(),
        default_variant: release.default_variant,
        patch_size: Stage::VERDICT_PATCH,
        preprocess: settings.preprocess.clone(),
        stage1: settings.candidates.clone(),
        scoring: settings.scoring.clone(),
        operating_points: OperatingPoints {
            fp_per_image_1: op1,
            fp_per_image_2: op2,
            fp_per_image_4: op4,
        },
        training: release.training.clone(),
        referral: None,
        models,
        reference_weights: Vec::new(),
        dir: out.to_path_buf(),
    };
    write_unsigned(&manifest, out)?;
    Ok(manifest)
}

/// Write `manifest` into `dir` and remove the signature of the previous one, which would
/// now be invalid: the bundle is plainly unsigned until `signing::sign_manifest` signs it.
pub fn write_unsigned(manifest: &Manifest, dir: &Path) -> Result<()> {
    manifest.write(dir)?;
    let stale = dir.join(ma_core::signing::SIGNATURE_FILE);
    if stale.exists() {
        std::fs::remove_file(&stale)
            .with_context(|| format!("removing the stale signature {}", stale.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantisation_round_trips_within_half_a_step() {
        let w = [0.5f32, -1.0, 0.25, 0.0, 0.0, 0.0, 3.0, -0.1, 0.2];
        let (q, s) = quantize_per_channel(&w, 3);
        assert_eq!(q[1], -127);
        assert_eq!(s[1], 1.0, "all-zero channel");
        let back = dequantize_per_channel(&q, &s);
        for (i, (a, b)) in w.iter().zip(&back).enumerate() {
            assert!((a - b).abs() <= s[i / 3] / 2.0 + 1e-7, "{a} vs {b}");
        }
    }
}
