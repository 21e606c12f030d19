//! ONNX export of the referral network, and adding it to an existing model set.
//!
//! Layout: input `image` float `[1, 3, side, side]`; outputs `margin` `[1, 1]` (referable
//! minus not) and `attention` `[1, 1, side/16, side/16]`. The trunk is written like the
//! cascade's nets (batch norm folded); the heads as Conv (attention) -> Sigmoid and Conv
//! (class margin, one row: the difference of the two), then
//! `GAP(a * m) / (GAP(a) + eps / cells)`, which is the training graph's
//! `sum(a * m) / (sum(a) + eps)` (GlobalAveragePool, Mul, Add, Div: ops tract and
//! onnxruntime both run).
//!
//! The zoom-in crop classifier ([`zoom_onnx_model`]) is written like stage 2: input
//! `crops` `[batch, 3, side, side]`, output `margin` `[batch, 1]`.

use std::path::Path;

use anyhow::{Context, Result};
use tract_onnx::pb;

use ma_core::manifest::{
    ATTENTION_NAME, Manifest, ModelEntry, ModelGeometry, OUTPUT_NAME, Role, Variant,
};
use ma_core::referral::ReferralConfig;

use super::{
    GraphBuilder, Head, WeightFormat, add_layers, float_tensor, int, ints, meta, model_proto,
    param, val, value_info, write_onnx, write_unsigned,
};
use crate::nets::{REFERRAL_FEATURES, REFERRAL_STRIDE, referral_trunk, zoom_classifier};
use crate::referral::{ATTENTION_EPS, ATTENTION_HEAD, CLASS_HEAD};

/// Graph input name.
pub const INPUT_NAME: &str = "image";

/// The ONNX model of the referral network in `vs` for `side`-pixel inputs.
pub fn onnx_model(
    vs: &tch::nn::VarStore,
    side: usize,
    weights: WeightFormat,
) -> Result<pb::ModelProto> {
    let vars = vs.variables();
    let mut b = GraphBuilder::default();
    let features = add_layers(
        &mut b,
        &vars,
        &referral_trunk(),
        INPUT_NAME,
        Head::None,
        weights,
        "",
    )?;
    let conv1x1 =
        |b: &mut GraphBuilder, name: &str, input: &str, weight: (&str, &str), out: &str| {
            b.node(
                "Conv",
                name,
                &[input, weight.0, weight.1],
                out,
                vec![
                    ints("kernel_shape", &[1, 1]),
                    ints("pads", &[0, 0, 0, 0]),
                    ints("strides", &[1, 1]),
                    ints("dilations", &[1, 1]),
                    int("group", 1),
                ],
            )
        };
    let p = b.read(&vars, ATTENTION_HEAD, &[1, REFERRAL_FEATURES, 1, 1])?;
    let (w, bias) = b.add_params(ATTENTION_HEAD, p, weights);
    conv1x1(
        &mut b,
        ATTENTION_HEAD,
        &features,
        (&w, &bias),
        "attention_logit",
    );
    b.node(
        "Sigmoid",
        "attention_sigmoid",
        &["attention_logit"],
        ATTENTION_NAME,
        vec![],
    );
    let p = b
        .read(&vars, CLASS_HEAD, &[2, REFERRAL_FEATURES, 1, 1])?
        .margin()?;
    let (w, bias) = b.add_params(CLASS_HEAD, p, weights);
    conv1x1(&mut b, CLASS_HEAD, &features, (&w, &bias), "margin_map");
    b.check_all_used(&vars)?;

    let cells = (side / REFERRAL_STRIDE) as i64;
    b.initializers.push(float_tensor(
        "attention_eps",
        &[1],
        &[(ATTENTION_EPS / (cells * cells) as f64) as f32],
    ));
    b.node(
        "Mul",
        "weigh",
        &[ATTENTION_NAME, "margin_map"],
        "weighted_map",
        vec![],
    );
    b.node(
        "GlobalAveragePool",
        "weighted_mean",
        &["weighted_map"],
        "weighted_sum",
        vec![],
    );
    b.node(
        "GlobalAveragePool",
        "attention_mean",
        &[ATTENTION_NAME],
        "attention_sum",
        vec![],
    );
    b.node(
        "Add",
        "attention_eps_add",
        &["attention_sum", "attention_eps"],
        "attention_total",
        vec![],
    );
    b.node(
        "Div",
        "pool",
        &["weighted_sum", "attention_total"],
        "pooled",
        vec![],
    );
    b.node(
        "Flatten",
        "flatten",
        &["pooled"],
        OUTPUT_NAME,
        vec![int("axis", 1)],
    );

    let s = side as i64;
    let graph = pb::GraphProto {
        name: "ma_referral".into(),
        node: b.nodes,
        initializer: b.initializers,
        input: vec![value_info(INPUT_NAME, vec![val(1), val(3), val(s), val(s)])],
        output: vec![
            value_info(OUTPUT_NAME, vec![val(1), val(1)]),
            value_info(ATTENTION_NAME, vec![val(1), val(1), val(cells), val(cells)]),
        ],
        doc_string: format!(
            "Referral: margin referable minus not, and the attention map ({cells}x{cells} cells \
             of {REFERRAL_STRIDE} px) of a {side}x{side} view of the field of view"
        ),
        ..Default::default()
    };
    Ok(model_proto(
        graph,
        "Diabetic retinopathy referral CNN; research use only",
        vec![
            meta("stage", "referral"),
            meta("weights", weights.name()),
            meta("input_side", &side.to_string()),
            meta("attention_stride", &REFERRAL_STRIDE.to_string()),
        ],
    ))
}

/// Graph input name of the crop classifier.
pub const ZOOM_INPUT_NAME: &str = "crops";

/// The ONNX model of the zoom-in crop classifier in `vs` for `side`-pixel crops.
pub fn zoom_onnx_model(
    vs: &tch::nn::VarStore,
    side: usize,
    weights: WeightFormat,
) -> Result<pb::ModelProto> {
    let vars = vs.variables();
    let mut b = GraphBuilder::default();
    add_layers(
        &mut b,
        &vars,
        &zoom_classifier(),
        ZOOM_INPUT_NAME,
        Head::Margin,
        weights,
        "",
    )?;
    b.check_all_used(&vars)?;
    let s = side as i64;
    let graph = pb::GraphProto {
        name: "ma_zoom".into(),
        node: b.nodes,
        initializer: b.initializers,
        input: vec![value_info(
            ZOOM_INPUT_NAME,
            vec![param("batch"), val(3), val(s), val(s)],
        )],
        output: vec![value_info(OUTPUT_NAME, vec![param("batch"), val(1)])],
        doc_string: format!(
            "Zoom-in crop classifier: margin referable minus not of {side}x{side} crops around \
             the referral network's strongest attention cells"
        ),
        ..Default::default()
    };
    Ok(model_proto(
        graph,
        "Diabetic retinopathy zoom-in crop classifier; research use only",
        vec![
            meta("stage", "zoom"),
            meta("weights", weights.name()),
            meta("crop_side", &side.to_string()),
        ],
    ))
}

/// Add the referral network (and, with `cfg.zoom`, its crop classifier `zoom`) to the
/// model set in `models` (its manifest and files stay otherwise as they are): writes
/// `referral-{float,int8}.onnx` (and `zoom-{float,int8}.onnx`), replaces any earlier
/// referral and zoom entries, sets `[referral]` to `cfg` and the release name to
/// `version`. The old signature no longer matches and is removed: sign the set again.
pub fn add_to_model_set(
    vs: &tch::nn::VarStore,
    zoom: Option<&tch::nn::VarStore>,
    models: &Path,
    cfg: &ReferralConfig,
    version: &str,
) -> Result<Manifest> {
    cfg.validate()?;
    anyhow::ensure!(
        cfg.zoom.is_some() == zoom.is_some(),
        "a zoom-in step needs both the crop classifier's weights and [referral.zoom]"
    );
    anyhow::ensure!(
        cfg.attention_stride == REFERRAL_STRIDE,
        "referral.attention_stride is {}, the network's stride is {REFERRAL_STRIDE}",
        cfg.attention_stride
    );
    let mut manifest = Manifest::load(models).with_context(|| {
        format!(
            "the model set to add the referral network to ({})",
            models.display()
        )
    })?;
    manifest
        .models
        .retain(|e| e.role != Role::Referral && e.role != Role::Zoom);
    for (format, variant) in [
        (WeightFormat::Float, Variant::Float),
        (WeightFormat::Int8Weights, Variant::Int8),
    ] {
        let file = format!("referral-{}.onnx", format.name());
        write_onnx(models.join(&file), &onnx_model(vs, cfg.input_side, format)?)?;
        manifest.models.push(ModelEntry::for_file(
            models,
            &file,
            variant,
            ModelGeometry::Image(cfg.input_side),
        )?);
        if let (Some(zvs), Some(z)) = (zoom, &cfg.zoom) {
            let file = format!("zoom-{}.onnx", format.name());
            write_onnx(
                models.join(&file),
                &zoom_onnx_model(zvs, z.crop_side, format)?,
            )?;
            manifest.models.push(ModelEntry::for_file(
                models,
                &file,
                variant,
                ModelGeometry::Crop(z.crop_side),
            )?);
        }
    }
    manifest.referral = Some(cfg.clone());
    manifest.version = version.to_string();
    write_unsigned(&manifest, models)?;
    Ok(manifest)
}
