//! The graded photo set (`dr_grading/`): image-level grades on the International Clinical
//! DR scale, no lesion marks, and patient-level folds for cross-validation.
//!
//! Layout: `<root>/DR and maculopathy 10 classes/<k - class name>/PatientNNN_{L,R}.jpg`,
//! where `k` (1..=10) is the grade; `root` may also be the `DR and maculopathy 10
//! classes` folder itself. Referable = grade 4 (moderate) or worse.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

use ma_core::image_io::has_image_extension;

/// Folder inside the set's root that holds the class folders.
pub const CLASSES_DIR: &str = "DR and maculopathy 10 classes";

/// The first referable grade (moderate DR).
pub const FIRST_REFERABLE_GRADE: u8 = 4;

/// One graded photo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GradedPhoto {
    pub path: PathBuf,
    /// File name, e.g. `Patient011_L.jpg`.
    pub name: String,
    /// Patient identifier, e.g. `Patient011`: both eyes of a patient share a fold.
    pub patient: String,
    /// Grade 1..=10 (the class folder's number).
    pub grade: u8,
}

impl GradedPhoto {
    /// Moderate DR or worse: the eye should see an ophthalmologist.
    pub fn referable(&self) -> bool {
        self.grade >= FIRST_REFERABLE_GRADE
    }
}

/// Every photo of the set, sorted by name. Fails on a class folder whose name does not
/// start with its grade, on a photo not named `<patient>_<eye>.<ext>`, and on a photo
/// that appears under two grades.
pub fn load(root: &Path) -> Result<Vec<GradedPhoto>> {
    let classes = if root.join(CLASSES_DIR).is_dir() {
        root.join(CLASSES_DIR)
    } else {
        root.to_path_buf()
    };
    let entries = std::fs::read_dir(&classes).with_context(|| {
        format!(
            "reading the graded set {} (expected `{CLASSES_DIR}/<k - class>/` folders)",
            classes.display()
        )
    })?;
    let mut photos: BTreeMap<String, GradedPhoto> = BTreeMap::new();
    for entry in entries {
        let dir = entry?.path();
        if !dir.is_dir() {
            continue;
        }
        let folder = dir.file_name().unwrap_or_default().to_string_lossy();
        let grade: u8 = folder
            .split(" - ")
            .next()
            .and_then(|k| k.trim().parse().ok())
            .filter(|k| (1..=10).contains(k))
            .with_context(|| {
                format!(
                    "class folder {} does not start with its grade (`k - name`, k in 1..=10)",
                    dir.display()
                )
            })?;
        for file in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = file?.path();
            if !has_image_extension(&path) {
                continue;
            }
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            let stem = path.file_stem().unwrap_or_default().to_string_lossy();
            let patient = match stem.rsplit_once('_') {
                Some((p, eye)) if !p.is_empty() && matches!(eye, "L" | "R") => p.to_string(),
                _ => bail!(
                    "graded photo {} is not named <patient>_L or <patient>_R",
                    path.display()
                ),
            };
            let photo = GradedPhoto {
                path: path.clone(),
                name: name.clone(),
                patient,
                grade,
            };
            if let Some(other) = photos.insert(name.clone(), photo) {
                bail!(
                    "{name} appears under grade {} ({}) and grade {grade} ({})",
                    other.grade,
                    other.path.display(),
                    path.display()
                );
            }
        }
    }
    ensure!(
        !photos.is_empty(),
        "no graded photos under {}",
        classes.display()
    );
    Ok(photos.into_values().collect())
}

/// The fold (0-based) of each photo for `k`-fold CV by patient: patients in name order,
/// patient j in fold j mod k, separately for patients with and without a referable eye
/// so every fold gets its share of both.
pub fn patient_folds(photos: &[GradedPhoto], k: usize) -> Result<Vec<usize>> {
    ensure!(k >= 2, "cross-validation needs at least 2 folds, got {k}");
    let mut referable: BTreeMap<&str, bool> = BTreeMap::new();
    for p in photos {
        *referable.entry(&p.patient).or_default() |= p.referable();
    }
    let mut fold_of: BTreeMap<&str, usize> = BTreeMap::new();
    for class in [true, false] {
        let patients = referable.iter().filter(|&(_, &r)| r == class);
        for (j, (patient, _)) in patients.enumerate() {
            fold_of.insert(patient, j % k);
        }
    }
    ensure!(
        fold_of.len() >= k,
        "{} patients cannot fill {k} folds",
        fold_of.len()
    );
    Ok(photos.iter().map(|p| fold_of[p.patient.as_str()]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make(root: &Path, files: &[(&str, &str)]) {
        for (class, name) in files {
            let dir = root.join(CLASSES_DIR).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), b"jpeg").unwrap();
        }
    }

    #[test]
    fn grades_patients_and_referable() {
        let tmp = tempfile::tempdir().unwrap();
        make(
            tmp.path(),
            &[
                ("1 - No DR", "Patient001_L.jpg"),
                ("5 - Moderate DR with maculopathy", "Patient001_R.jpg"),
                ("10 - ADED", "Patient002_L.jpg"),
                ("3 - Mild DR with maculopathy", "Patient003_R.JPG"),
            ],
        );
        let photos = load(tmp.path()).unwrap();
        let summary: Vec<_> = photos
            .iter()
            .map(|p| (p.name.as_str(), p.patient.as_str(), p.grade, p.referable()))
            .collect();
        assert_eq!(
            summary,
            [
                ("Patient001_L.jpg", "Patient001", 1, false),
                ("Patient001_R.jpg", "Patient001", 5, true),
                ("Patient002_L.jpg", "Patient002", 10, true),
                ("Patient003_R.JPG", "Patient003", 3, false),
            ]
        );
        // Also from the class folder itself.
        assert_eq!(load(&tmp.path().join(CLASSES_DIR)).unwrap(), photos);
        // Both eyes of a patient share a fold; referable patients spread over folds.
        let folds = patient_folds(&photos, 2).unwrap();
        assert_eq!(folds[0], folds[1]);
        assert_ne!(folds[0], folds[2], "the two referable patients split");
    }

    #[test]
    fn bad_layouts_are_errors_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        make(tmp.path(), &[("Moderate", "Patient001_L.jpg")]);
        let e = format!("{:#}", load(tmp.path()).unwrap_err());
        assert!(e.contains("does not start with its grade"), "{e}");

        let tmp = tempfile::tempdir().unwrap();
        make(tmp.path(), &[("4 - Moderate", "left.jpg")]);
        let e = format!("{:#}", load(tmp.path()).unwrap_err());
        assert!(e.contains("left.jpg") && e.contains("<patient>_L"), "{e}");

        let tmp = tempfile::tempdir().unwrap();
        make(
            tmp.path(),
            &[("1 - No DR", "P1_L.jpg"), ("4 - Moderate", "P1_L.jpg")],
        );
        let e = format!("{:#}", load(tmp.path()).unwrap_err());
        assert!(e.contains("appears under grade"), "{e}");

        let tmp = tempfile::tempdir().unwrap();
        let e = format!("{:#}", load(&tmp.path().join("missing")).unwrap_err());
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn shared_set_counts() {
        // The shared copy: 397 photos, 145 referable (102 moderate, 26 severe, 11 PDR,
        // 6 ADED), every patient's eyes in one fold.
        let root = crate::datasets::test_util::shared_datasets().join("dr_grading");
        let photos = load(&root).unwrap();
        assert_eq!(photos.len(), 397);
        assert_eq!(photos.iter().filter(|p| p.referable()).count(), 145);
        let folds = patient_folds(&photos, 5).unwrap();
        for (a, b) in photos.iter().zip(&folds) {
            for (c, d) in photos.iter().zip(&folds) {
                if a.patient == c.patient {
                    assert_eq!(b, d, "{} and {} split", a.name, c.name);
                }
            }
        }
    }
}
