//! `ma-trainer score-sweep` (`cv::sweep_stage1_weight`) rescoring a CV folder: each row
//! must be what scoring the held-out fold with that stage-1 weight gives
//! (`cv::evaluate_fold`, the code `fold-eval` runs), folds without weights are left out,
//! and bad input is an error that says what is wrong.

use ma_core::preprocess::{FovSource, PreprocessConfig, preprocess};
use ma_core::scoring::Scoring;
use ma_synthetic::{SyntheticParams, generate};
use ma_trainer::cv::{ScoreSource, evaluate_fold, sweep_stage1_weight};
use ma_trainer::ground_truth::GroundTruth;
use ma_trainer::nets::{Net, Stage};
use ma_trainer::pipeline::{Cascade, PipelineConfig};
use ma_trainer::prepare::PreparedImage;

fn images() -> Vec<PreparedImage> {
    let params = SyntheticParams {
        n_microaneurysms: 20,
        ..SyntheticParams::default()
    };
    (1..=4)
        .map(|seed| {
            let frame = generate(&params, seed);
            let pre = preprocess(
                &frame.image,
                FovSource::Estimate,
                &PreprocessConfig::default(),
            )
            .unwrap();
            PreparedImage::from_parts(
                "synthetic",
                format!("synthetic-{seed}"),
                pre,
                GroundTruth::from_synthetic(&frame),
            )
        })
        .collect()
}

/// Seeded untrained nets: random margins are enough to compare two scorers.
fn untrained(seed: i64) -> Cascade {
    tch::manual_seed(seed);
    let vs1 = tch::nn::VarStore::new(tch::Device::Cpu);
    let net1 = Net::new(&vs1.root(), Stage::Candidates);
    let vs2 = tch::nn::VarStore::new(tch::Device::Cpu);
    let net2 = Net::new(&vs2.root(), Stage::Verdict);
    Cascade {
        stage1: (vs1, net1),
        stage2: (vs2, net2),
    }
}

#[test]
fn each_row_is_the_fold_scored_with_that_weight() {
    let images = images();
    let cfg = PipelineConfig::default();
    let dir = tempfile::tempdir().unwrap();
    // Fold 2 of 2 only: fold 1 was "not run", so it must not appear.
    let cascade = untrained(7);
    let fold_dir = dir.path().join("fold-2");
    std::fs::create_dir_all(&fold_dir).unwrap();
    cascade
        .stage1
        .0
        .save(fold_dir.join("stage1.safetensors"))
        .unwrap();
    cascade
        .stage2
        .0
        .save(fold_dir.join("stage2.safetensors"))
        .unwrap();

    let weights = [0.0, cfg.scoring.stage1_weight, 3.0];
    let sweep = sweep_stage1_weight(&images, 2, dir.path(), &weights, &cfg).unwrap();
    assert_eq!(sweep.folds_run, vec![2]);
    assert_eq!(sweep.rows.len(), weights.len());

    let (reports, _) = evaluate_fold(&images, 2, 1, &cascade, &cfg).unwrap();
    let cpm_of = |source: ScoreSource| {
        reports[ScoreSource::ALL.iter().position(|s| *s == source).unwrap()].cpm
    };
    let stage2_alone = &sweep.rows[0];
    assert_eq!(stage2_alone.cpm_per_fold, vec![cpm_of(ScoreSource::Stage2)]);
    let shipped = &sweep.rows[1];
    assert_eq!(shipped.cpm_per_fold, vec![cpm_of(ScoreSource::Both)]);
    // One fold: its CPM is the mean and the pooled CPM.
    for row in &sweep.rows {
        assert_eq!(row.mean_cpm, row.cpm_per_fold[0]);
        assert!((row.pooled_cpm - row.cpm_per_fold[0]).abs() < 1e-12);
    }

    // A weight of 3 is a different scorer: evaluate_fold must agree with it too.
    let cfg3 = PipelineConfig {
        scoring: Scoring {
            stage1_weight: 3.0,
            ..cfg.scoring.clone()
        },
        ..PipelineConfig::default()
    };
    let (reports3, _) = evaluate_fold(&images, 2, 1, &cascade, &cfg3).unwrap();
    let both = ScoreSource::ALL
        .iter()
        .position(|s| *s == ScoreSource::Both)
        .unwrap();
    assert_eq!(sweep.rows[2].cpm_per_fold, vec![reports3[both].cpm]);
}

#[test]
fn bad_input_is_an_error_that_names_it() {
    let images = images();
    let cfg = PipelineConfig::default();
    let dir = tempfile::tempdir().unwrap();
    let err = format!(
        "{:#}",
        sweep_stage1_weight(&images, 2, dir.path(), &[0.5], &cfg).unwrap_err()
    );
    assert!(err.contains("no trained fold"), "{err}");
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
    for bad in [vec![], vec![-1.0], vec![f64::NAN]] {
        let err = format!(
            "{:#}",
            sweep_stage1_weight(&images, 2, dir.path(), &bad, &cfg).unwrap_err()
        );
        assert!(err.contains("stage-1 weights"), "{bad:?}: {err}");
    }
}
