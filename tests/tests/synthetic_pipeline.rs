//! Device and trainer together: synthetic fundus images with known MAs go through the
//! device's preprocessing and the trainer's FROC scorer.

use ma_core::detection::Detection;
use ma_core::preprocess::{FovSource, PreprocessConfig, preprocess};
use ma_synthetic::{SyntheticFundus, SyntheticParams, generate};
use ma_trainer::froc::{FrocReport, ImageOutcome};
use ma_trainer::ground_truth::GroundTruth;

fn truth(frame: &SyntheticFundus) -> GroundTruth {
    GroundTruth::from_synthetic(frame)
}

fn frames() -> Vec<SyntheticFundus> {
    (1..=3)
        .map(|seed| generate(&SyntheticParams::default(), seed))
        .collect()
}

#[test]
fn detections_at_the_generated_mas_score_cpm_one_and_lookalikes_score_zero() {
    let frames = frames();
    let score = |pick: &dyn Fn(&SyntheticFundus) -> Vec<Detection>| {
        let outcomes: Vec<_> = frames
            .iter()
            .enumerate()
            .map(|(i, f)| ImageOutcome::score(&format!("frame{i}"), &truth(f), &pick(f)).unwrap())
            .collect();
        FrocReport::from_outcomes(&outcomes).unwrap()
    };

    let perfect = score(&|f| {
        f.microaneurysms
            .iter()
            .map(|m| Detection {
                x: m.x + 1.5,
                y: m.y - 1.0,
                score: 0.9,
            })
            .collect()
    });
    assert_eq!(perfect.cpm, 1.0);
    assert_eq!(
        perfect.lesions,
        frames.iter().map(|f| f.microaneurysms.len()).sum::<usize>()
    );

    // Look-alikes are kept away from MAs by the generator: all false positives.
    let fooled = score(&|f| {
        f.lookalikes
            .iter()
            .map(|l| Detection {
                x: l.x,
                y: l.y,
                score: 0.9,
            })
            .collect()
    });
    assert_eq!(fooled.cpm, 0.0);
    let fps: usize = fooled.per_image.iter().map(|s| s.false_positives).sum();
    assert_eq!(
        fps,
        frames.iter().map(|f| f.lookalikes.len()).sum::<usize>()
    );
}

#[test]
fn generated_mas_are_dark_spots_where_preprocessing_maps_them() {
    // A smaller FOV than DiaretDB1's: preprocessing must enlarge the image, and the
    // generator's MA positions, mapped to canonical pixels, must land on dark spots.
    let params = SyntheticParams {
        width: 1000,
        height: 800,
        fov_diameter: 900.0,
        ..SyntheticParams::default()
    };
    let frame = generate(&params, 11);
    let pre = preprocess(
        &frame.image,
        FovSource::Estimate,
        &PreprocessConfig::default(),
    )
    .unwrap();
    assert!(
        pre.scale.sx > 1.4,
        "expected enlargement, got {:?}",
        pre.scale
    );
    assert!(!frame.microaneurysms.is_empty());
    for m in &frame.microaneurysms {
        let (cx, cy) = pre.scale.to_canonical(m.x, m.y);
        let green = pre.planes.get(1, cx.round() as usize, cy.round() as usize);
        assert!(
            green < -2.0,
            "MA at ({:.1}, {:.1}) has normalised green {green}",
            m.x,
            m.y
        );
        let (ox, oy) = pre.scale.to_original(cx, cy);
        assert!((ox - m.x).abs() < 1e-9 && (oy - m.y).abs() < 1e-9);
    }
}
