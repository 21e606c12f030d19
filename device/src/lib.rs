//! `ma-device`: the microaneurysm detector's runtime library.
//!
//! Data flows one way: image file or frame -> [`image_io`] (decode, checked) ->
//! [`preprocess`] (field of view, canonical scale, background subtraction) ->
//! cascade -> [`detection`]s in original image coordinates.
//!
//! The trainer depends on this crate for everything both sides must compute
//! identically (decoding, preprocessing, patch geometry, detection types), so a
//! model sees the same numbers in the field as on the workstation.

pub mod board;
pub mod capture;
pub mod cascade;
pub mod console;
pub mod detection;
pub mod display;
pub mod files;
pub mod fov;
pub mod geometry;
pub mod image_io;
pub mod manifest;
pub mod mask;
pub mod median;
pub mod preprocess;
pub mod records;
pub mod run_loop;
pub mod signing;
pub mod synthetic;
