//! What a training run learned from and the settings it ran with, written by `train`
//! beside its weights (`training-data.json`). `export` takes the manifest's data
//! description and its `[preprocess]`, `[stage1]` and `[scoring]` tables from here, so the
//! device computes what training computed, rather than two defaults that happen to agree.

use std::path::Path;

use anyhow::{Context, Result};
use ma_core::candidates::CandidateConfig;
use ma_core::preprocess::PreprocessConfig;
use ma_core::scoring::Scoring;

use crate::pipeline::PipelineConfig;
use crate::prepare::PreparedImage;

/// The settings the device must use with a run's weights: the preprocessing the images
/// were prepared with, and the candidate picking and scoring the run was evaluated with.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeviceSettings {
    pub preprocess: PreprocessConfig,
    pub candidates: CandidateConfig,
    pub scoring: Scoring,
}

impl DeviceSettings {
    pub fn of(preprocess: &PreprocessConfig, pipeline: &PipelineConfig) -> Self {
        Self {
            preprocess: preprocess.clone(),
            candidates: pipeline.candidates.clone(),
            scoring: pipeline.scoring.clone(),
        }
    }
}

impl Default for DeviceSettings {
    /// The settings of a run with every default (test fixtures, untrained model sets).
    fn default() -> Self {
        Self::of(&PreprocessConfig::default(), &PipelineConfig::default())
    }
}

/// One dataset of a training run.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DatasetUse {
    /// Reader name, e.g. "DiaretDB1".
    pub dataset: String,
    /// How its images were chosen, e.g. "train split" or "every image".
    pub selection: String,
    pub images: usize,
    pub lesions: usize,
}

/// The datasets of a training run, in command-line order, its camera augmentation and
/// its device settings.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainingData {
    pub datasets: Vec<DatasetUse>,
    /// `CameraAugment::describe` of the run (absent in runs made before it was recorded).
    #[serde(default)]
    pub augmentation: Option<String>,
    pub settings: DeviceSettings,
    /// Training-only methods on (`PipelineConfig::methods`), in words; absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

impl TrainingData {
    pub const FILE_NAME: &'static str = "training-data.json";

    /// Counts the photos and lesions of each dataset in `images` (camera-augmented copies
    /// are not counted); `selection(name)` says how that dataset's photos were chosen.
    pub fn of<'a>(
        images: impl IntoIterator<Item = &'a PreparedImage>,
        selection: impl Fn(&str) -> String,
        augmentation: Option<String>,
        settings: DeviceSettings,
    ) -> Self {
        let mut datasets: Vec<DatasetUse> = Vec::new();
        for im in images.into_iter().filter(|im| im.copy_of.is_none()) {
            let i = match datasets.iter().position(|d| d.dataset == im.dataset) {
                Some(i) => i,
                None => {
                    datasets.push(DatasetUse {
                        dataset: im.dataset.clone(),
                        selection: selection(&im.dataset),
                        images: 0,
                        lesions: 0,
                    });
                    datasets.len() - 1
                }
            };
            datasets[i].images += 1;
            datasets[i].lesions += im.truth.lesions.len();
        }
        Self {
            datasets,
            augmentation,
            settings,
            methods: Vec::new(),
        }
    }

    pub fn images(&self) -> usize {
        self.datasets.iter().map(|d| d.images).sum()
    }

    /// One line for the manifest, e.g. "DiaretDB1 train split (28 images, 245 lesions,
    /// redsmalldots >= 0.5) + IDRiD train split (54 images, ...); 1 camera copy per
    /// photo: ...".
    pub fn describe(&self) -> String {
        let data = self
            .datasets
            .iter()
            .map(|d| {
                format!(
                    "{} {} ({} images, {} lesions)",
                    d.dataset, d.selection, d.images, d.lesions
                )
            })
            .collect::<Vec<_>>()
            .join(" + ");
        let mut text = match &self.augmentation {
            Some(aug) => format!("{data}; {aug}"),
            None => data,
        };
        for m in &self.methods {
            text.push_str("; ");
            text.push_str(m);
        }
        text
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(Self::FILE_NAME);
        std::fs::write(&path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(Self::FILE_NAME);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {} (written by `ma-trainer train`; weights trained before it \
                 existed need a new `train` run)",
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("malformed {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_each_dataset_and_round_trips() {
        let data = TrainingData {
            datasets: vec![
                DatasetUse {
                    dataset: "DiaretDB1".into(),
                    selection: "train split, redsmalldots >= 0.5".into(),
                    images: 28,
                    lesions: 245,
                },
                DatasetUse {
                    dataset: "IDRiD".into(),
                    selection: "train split".into(),
                    images: 54,
                    lesions: 900,
                },
            ],
            augmentation: None,
            settings: DeviceSettings::default(),
            methods: Vec::new(),
        };
        assert_eq!(data.images(), 82);
        assert_eq!(
            data.describe(),
            "DiaretDB1 train split, redsmalldots >= 0.5 (28 images, 245 lesions) + IDRiD \
             train split (54 images, 900 lesions)"
        );
        let dir = tempfile::tempdir().unwrap();
        data.save(dir.path()).unwrap();
        assert_eq!(TrainingData::load(dir.path()).unwrap(), data);
        let augmented = TrainingData {
            augmentation: Some("1 camera copy per photo: JPEG quality 40-95".into()),
            ..data.clone()
        };
        assert!(
            augmented
                .describe()
                .ends_with("(54 images, 900 lesions); 1 camera copy per photo: JPEG quality 40-95"),
            "{}",
            augmented.describe()
        );
        augmented.save(dir.path()).unwrap();
        assert_eq!(TrainingData::load(dir.path()).unwrap(), augmented);
        let with_methods = TrainingData {
            methods: vec!["stage-2 triplet loss (weight 0.5, margin 0.2)".into()],
            ..augmented.clone()
        };
        assert!(
            with_methods
                .describe()
                .ends_with("JPEG quality 40-95; stage-2 triplet loss (weight 0.5, margin 0.2)")
        );
        with_methods.save(dir.path()).unwrap();
        assert_eq!(TrainingData::load(dir.path()).unwrap(), with_methods);
        // Files written before the augmentation was recorded still load.
        let old = serde_json::to_string(&data)
            .unwrap()
            .replace("\"augmentation\":null,", "");
        assert!(!old.contains("augmentation"), "{old}");
        assert_eq!(serde_json::from_str::<TrainingData>(&old).unwrap(), data);
        let e = format!(
            "{:#}",
            TrainingData::load(&dir.path().join("x")).unwrap_err()
        );
        assert!(
            e.contains("training-data.json") && e.contains("train"),
            "{e}"
        );
    }
}
