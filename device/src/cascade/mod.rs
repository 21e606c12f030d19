//! The CNN cascade on the device: stage-1 map -> candidates -> stage-2 verdicts.

pub mod candidates;
pub mod onnx;
