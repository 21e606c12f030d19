//! `ma-core`: everything the trainer and the device must compute identically, so that a
//! model sees the same numbers in the field as on the workstation.
//!
//! Data flows one way: image file or frame -> [`image_io`] (decode, checked) ->
//! [`preprocess`] (field of view, canonical scale, background subtraction) -> stage 1
//! (run by the device's tract cascade or the trainer's libtorch nets) -> [`candidates`]
//! -> stage 2 on their [`geometry`] patches -> [`scoring`] -> [`detection`]s in original
//! image coordinates. The [`manifest`] carries the settings of every step from training
//! to the device, and [`signing`] decides which manifests a device trusts.
//!
//! No network runtime lives here: the device crate runs the ONNX graphs with tract, the
//! trainer trains them with libtorch.

pub mod bundle;
pub mod candidates;
pub mod detection;
pub mod digest;
pub mod durable;
pub mod fov;
pub mod geometry;
pub mod heatmap;
pub mod image_io;
pub mod manifest;
pub mod mask;
pub mod median;
pub mod preprocess;
pub mod referral;
pub mod scoring;
pub mod signing;
