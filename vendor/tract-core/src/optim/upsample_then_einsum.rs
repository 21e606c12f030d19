//! Nearest upsampling followed by an einsum that keeps the upsampled axes (a 1x1
//! convolution, once convolutions are einsums): run the einsum on the small tensor and
//! upsample its output. Both are exact: every output value of the einsum reads a single
//! position along those axes, and nearest upsampling only repeats positions. The work of
//! the einsum (and the copy of its input) shrinks by the product of the scales.
//!
//! This is what a U-net decoder does after `Upsample -> Concat -> Conv 1x1` once
//! [`super::concat_then_einsum`] has split the einsum over the concatenation.

use crate::internal::*;
use crate::ops::einsum::EinSum;
use crate::ops::nn::NearestUpsample;

#[derive(Clone, Debug, Default)]
pub struct UpsampleThenEinsum;

impl super::TypedPass for UpsampleThenEinsum {
    fn reset(&mut self) -> TractResult<()> {
        Ok(())
    }

    fn next(
        &mut self,
        _session: &mut super::OptimizerSession,
        model: &TypedModel,
    ) -> TractResult<Option<TypedModelPatch>> {
        for node in model.eval_order()?.into_iter().map(|id| &model.nodes[id]) {
            let Some(einsum) = node.op_as::<EinSum>() else { continue };
            if einsum.q_params.is_some() {
                continue;
            }
            for (slot, input) in node.inputs.iter().enumerate() {
                let up_node = model.node(input.node);
                let Some(up) = up_node.op_as::<NearestUpsample>() else { continue };
                // The upsampled tensor must not be needed elsewhere, or both would be computed.
                if model.outlet_successors(*input).len() != 1 || model.outputs.contains(input) {
                    continue;
                }
                if let Some(out_scales) =
                    output_scales(einsum, slot, &up.scales, node.inputs.len())?
                {
                    let mut patch = TypedModelPatch::new(format!(
                        "Einsum {} before the nearest upsampling {}",
                        node.name, up_node.name
                    ));
                    let mut inputs = patch.taps(model, &node.inputs)?;
                    inputs[slot] = patch.tap_model(model, up_node.inputs[0])?;
                    let small = patch.wire_node(
                        format!("{}.before-upsample", node.name),
                        einsum.clone(),
                        &inputs,
                    )?;
                    let wire = patch.wire_node(
                        format!("{}.upsample", node.name),
                        NearestUpsample { scales: out_scales },
                        &small,
                    )?;
                    patch.shunt_outside(model, node.id.into(), wire[0])?;
                    return Ok(Some(patch));
                }
            }
        }
        Ok(None)
    }
}

/// The scales of an upsampling moved after `einsum`, or `None` when it cannot move: each
/// upsampled axis of input `slot` must be an output axis read by no other input.
fn output_scales(
    einsum: &EinSum,
    slot: usize,
    scales: &[usize],
    inputs: usize,
) -> TractResult<Option<TVec<usize>>> {
    let mut out = tvec![1; einsum.axes.rank(InOut::Out(0))];
    for (axis, &scale) in scales.iter().enumerate() {
        if scale == 1 {
            continue;
        }
        let info = einsum.axes.axis((InOut::In(slot), axis))?;
        let others_read_it = (0..inputs).any(|i| i != slot && !info.inputs[i].is_empty());
        if info.inputs[slot].len() != 1 || info.outputs[0].len() != 1 || others_read_it {
            return Ok(None);
        }
        out[info.outputs[0][0]] = scale;
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::array::TypedConcat;
    use crate::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
    use crate::ops::nn::DataFormat::NCHW;

    fn values(shape: &[usize], seed: usize) -> TractResult<Tensor> {
        let n = shape.iter().product::<usize>();
        Tensor::from_shape(
            shape,
            &(0..n).map(|i| ((i * 31 + seed) % 97) as f32 * 0.02 - 1.0).collect::<Vec<_>>(),
        )
    }

    /// A U-net decoder step: coarse (1,6,4,5) upsampled 2x, concatenated with the skip
    /// (1,3,8,10), then a 1x1 convolution to 4 channels. With `also_output`, the
    /// upsampled tensor is a model output too.
    fn decoder(also_output: bool) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let coarse = model.add_source("coarse", f32::fact([1, 6, 4, 5]))?;
        let skip = model.add_source("skip", f32::fact([1, 3, 8, 10]))?;
        let up = model.wire_node("up", NearestUpsample { scales: tvec![1, 1, 2, 2] }, &[coarse])?;
        let cat = model.wire_node("cat", TypedConcat { axis: 1 }, &[up[0], skip])?;
        let kernel = model.add_const("kernel", values(&[4, 9, 1, 1], 3)?)?;
        let bias = model.add_const("bias", values(&[4], 5)?)?;
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format: NCHW,
                kernel_shape: tvec!(1, 1),
                padding: PaddingSpec::Valid,
                dilations: None,
                strides: None,
                input_channels: 9,
                output_channels: 4,
            },
            kernel_fmt: KernelFormat::OIHW,
            group: 1,
            q_params: None,
        };
        let out = model.wire_node("conv", conv, &[cat[0], kernel, bias])?;
        let mut outputs = out.to_vec();
        if also_output {
            outputs.push(up[0]);
        }
        model.select_output_outlets(&outputs)?;
        Ok(model)
    }

    fn max_diff(a: &TValue, b: &TValue) -> TractResult<f32> {
        let (a, b) = (a.try_as_plain_ram()?, b.try_as_plain_ram()?);
        let (a, b) = (a.as_slice::<f32>()?, b.as_slice::<f32>()?);
        ensure!(a.len() == b.len());
        Ok(a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max))
    }

    /// Whether the model upsamples the output of an einsum (rather than its input).
    fn upsamples_after_einsum(model: &TypedModel) -> bool {
        model
            .nodes
            .iter()
            .any(|n| n.op_is::<NearestUpsample>() && model.node(n.inputs[0].node).op_is::<EinSum>())
    }

    #[test]
    fn einsum_moves_before_the_upsampling_with_the_same_outputs() -> TractResult<()> {
        let model = decoder(false)?;
        let inputs = tvec!(
            values(&[1, 6, 4, 5], 1)?.into_tvalue(),
            values(&[1, 3, 8, 10], 2)?.into_tvalue()
        );
        let plain = model.clone().into_runnable()?.run(inputs.clone())?;
        let decluttered = model.clone().into_decluttered()?;
        assert!(upsamples_after_einsum(&decluttered), "{decluttered}");
        let ran = decluttered.into_runnable()?.run(inputs.clone())?;
        assert!(max_diff(&plain[0], &ran[0])? < 1e-5);
        let ran = model.into_optimized()?.into_runnable()?.run(inputs)?;
        assert!(max_diff(&plain[0], &ran[0])? < 1e-5);
        Ok(())
    }

    #[test]
    fn upsampling_needed_elsewhere_stays() -> TractResult<()> {
        let decluttered = decoder(true)?.into_decluttered()?;
        assert!(!upsamples_after_einsum(&decluttered), "{decluttered}");
        Ok(())
    }
}
