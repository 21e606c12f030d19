//! `ma-trainer`: dataset readers, FROC evaluation and (with `tch`) the two-stage training.

pub mod camera_aug;
pub mod cv;
pub mod dataset_stats;
pub mod datasets;
pub mod dense;
pub mod eval;
pub mod export;
pub mod froc;
pub mod grading;
pub mod ground_truth;
pub mod gt_enhance;
pub mod nets;
pub mod parallel;
pub mod patches;
pub mod pipeline;
pub mod plot;
pub mod prepare;
pub mod reference;
pub mod referral;
pub mod referral_cv;
pub mod referral_run;
pub mod train;
pub mod training_data;
pub mod validate;
pub mod zoom;
