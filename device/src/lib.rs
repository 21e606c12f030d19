//! `ma-device`: the microaneurysm detector's runtime on a board.
//!
//! Data flows one way: a frame from [`capture`] -> the tract [`cascade`] (which runs
//! `ma-core`'s preprocessing, candidates and scoring around the two networks) ->
//! detections -> the panel ([`display`]) and the crash-safe [`records`], with the frame
//! itself kept first in the [`archive`]. [`board`] reads the board config, [`station`]
//! builds the loop's parts from it, [`run_loop`] drives the loop; [`bundle`] exports
//! records and frames for the workstation's field validation.
//!
//! What the trainer must compute identically (decoding, preprocessing, patch geometry,
//! detections, the manifest and its signature) is not here but in `ma-core`, which both
//! depend on.

pub mod archive;
pub mod board;
pub mod bundle;
pub mod capture;
pub mod cascade;
pub mod console;
pub mod controls;
pub mod display;
pub mod files;
pub mod records;
pub mod run_loop;
pub mod station;
