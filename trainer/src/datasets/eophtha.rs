//! e-ophtha-MA: `MA/<patient>/<name>.jpg` with a binary mask
//! `Annotation_MA/<patient>/<name>.png` (MA pixels non-zero), and
//! `healthy/<patient>/<name>.jpg` without lesions.

use std::path::Path;

use anyhow::{Result, bail};

use super::{DatasetImage, TruthSource, dataset_image, image_files};

const MA: &str = "MA";
const ANNOTATIONS: &str = "Annotation_MA";
const HEALTHY: &str = "healthy";

/// `healthy/` is optional (a copy may hold only the MA part); `MA/` and
/// `Annotation_MA/` are what identify the root.
pub(super) fn load(root: &Path) -> Result<Vec<DatasetImage>> {
    let ma_dir = root.join(MA);
    let ann_dir = root.join(ANNOTATIONS);
    for dir in [&ma_dir, &ann_dir] {
        if !dir.is_dir() {
            bail!(
                "{} is not an e-ophtha-MA root: folder {} is missing",
                root.display(),
                dir.display()
            );
        }
    }
    let mut out = Vec::new();
    for image in image_files(&ma_dir)? {
        let rel = image.strip_prefix(&ma_dir).unwrap_or(&image);
        let mask = ann_dir.join(rel).with_extension("png");
        if !mask.is_file() {
            bail!(
                "e-ophtha-MA image {} has no annotation: {} is missing",
                image.display(),
                mask.display()
            );
        }
        out.push(dataset_image(root, image, TruthSource::LesionMask(mask))?);
    }
    let healthy = root.join(HEALTHY);
    if healthy.is_dir() {
        for image in image_files(&healthy)? {
            out.push(dataset_image(root, image, TruthSource::Healthy)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::*;
    use super::*;

    fn make_root(root: &Path) {
        write_rgb(&root.join("MA/P1/C1.jpg"), 20, 10);
        // Two lesions: a diagonal pair (one 8-connected component) and a single pixel.
        write_gray(
            &root.join("Annotation_MA/P1/C1.png"),
            20,
            10,
            |x, y| match (x, y) {
                (2, 2) | (3, 3) => 255,
                (15, 8) => 1,
                _ => 0,
            },
        );
        write_rgb(&root.join("healthy/P2/C2.jpg"), 20, 10);
    }

    #[test]
    fn loads_ma_and_healthy() {
        let dir = tempfile::tempdir().unwrap();
        make_root(dir.path());
        let ds = Dataset::load(DatasetKind::Eophtha, dir.path(), &LoadOptions::default()).unwrap();
        let rel: Vec<_> = ds.images.iter().map(|i| i.rel_path.as_str()).collect();
        assert_eq!(rel, ["MA/P1/C1.jpg", "healthy/P2/C2.jpg"]);
        let gt = ds.find("C1.jpg").unwrap().load_truth().unwrap();
        assert_eq!((gt.width, gt.height), (20, 10));
        let px: Vec<_> = gt.lesions.iter().map(|l| l.pixels.clone()).collect();
        assert_eq!(px, vec![vec![(2, 2), (3, 3)], vec![(15, 8)]]);
        assert!(gt.uncertain.is_none());
        let healthy = ds.find("C2.jpg").unwrap();
        assert!(healthy.has_truth());
        let gt = healthy.load_truth().unwrap();
        assert!(gt.lesions.is_empty());
        assert_eq!((gt.width, gt.height), (20, 10));
    }

    /// The full set mixes `.jpg` and `.JPG` and sizes from 1440x960 to 2544x1696.
    #[test]
    fn upper_case_extension_and_mixed_sizes() {
        let dir = tempfile::tempdir().unwrap();
        make_root(dir.path());
        write_rgb(&dir.path().join("MA/P4/C4.JPG"), 30, 20);
        write_gray(
            &dir.path().join("Annotation_MA/P4/C4.png"),
            30,
            20,
            |x, y| {
                if (x, y) == (29, 19) { 255 } else { 0 }
            },
        );
        write_rgb(&dir.path().join("healthy/P5/C5.JPG"), 12, 8);
        let ds = Dataset::load(DatasetKind::Eophtha, dir.path(), &LoadOptions::default()).unwrap();
        let rel: Vec<_> = ds.images.iter().map(|i| i.rel_path.as_str()).collect();
        assert_eq!(
            rel,
            [
                "MA/P1/C1.jpg",
                "MA/P4/C4.JPG",
                "healthy/P2/C2.jpg",
                "healthy/P5/C5.JPG"
            ]
        );
        let gt = ds.find("C4.JPG").unwrap().load_truth().unwrap();
        assert_eq!((gt.width, gt.height), (30, 20));
        assert_eq!(gt.lesions.len(), 1);
        assert_eq!(gt.lesions[0].pixels, [(29, 19)]);
        let gt = ds.find("C1.jpg").unwrap().load_truth().unwrap();
        assert_eq!((gt.width, gt.height, gt.lesions.len()), (20, 10, 2));
        let gt = ds.find("C5.JPG").unwrap().load_truth().unwrap();
        assert_eq!((gt.width, gt.height, gt.lesions.len()), (12, 8, 0));
    }

    #[test]
    fn mask_size_mismatch_names_both_files() {
        let dir = tempfile::tempdir().unwrap();
        make_root(dir.path());
        write_gray(
            &dir.path().join("Annotation_MA/P1/C1.png"),
            21,
            10,
            |_, _| 0,
        );
        let ds = Dataset::load(DatasetKind::Eophtha, dir.path(), &LoadOptions::default()).unwrap();
        let e = err_text(ds.find("C1.jpg").unwrap().load_truth().unwrap_err());
        assert!(
            e.contains("Annotation_MA/P1/C1.png")
                && e.contains("MA/P1/C1.jpg")
                && e.contains("21x10"),
            "{e}"
        );
    }

    #[test]
    fn missing_annotation_names_it() {
        let dir = tempfile::tempdir().unwrap();
        make_root(dir.path());
        write_rgb(&dir.path().join("MA/P3/C3.jpg"), 20, 10);
        let e = err_text(
            Dataset::load(DatasetKind::Eophtha, dir.path(), &LoadOptions::default()).unwrap_err(),
        );
        assert!(
            e.contains("Annotation_MA/P3/C3.png") && e.contains("missing"),
            "{e}"
        );
    }

    #[test]
    fn wrong_root_names_the_missing_folder() {
        let dir = tempfile::tempdir().unwrap();
        write_rgb(&dir.path().join("healthy/a.jpg"), 4, 4);
        let e = err_text(
            Dataset::load(DatasetKind::Eophtha, dir.path(), &LoadOptions::default()).unwrap_err(),
        );
        assert!(e.contains("not an e-ophtha-MA") && e.contains("MA"), "{e}");
    }

    #[test]
    fn empty_dataset_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("MA")).unwrap();
        std::fs::create_dir_all(dir.path().join("Annotation_MA")).unwrap();
        let e = err_text(
            Dataset::load(DatasetKind::Eophtha, dir.path(), &LoadOptions::default()).unwrap_err(),
        );
        assert!(e.contains("no images"), "{e}");
    }

    /// The real subset: 2 MA images with lesions, 2 healthy ones.
    #[test]
    fn real_eophtha() {
        let root = shared_datasets().join("e_optha_MA");
        let ds = Dataset::load(DatasetKind::Eophtha, &root, &LoadOptions::default()).unwrap();
        assert_eq!(ds.images.len(), 4);
        let mut healthy = 0;
        for im in &ds.images {
            let gt = im.load_truth().unwrap();
            println!("{}: {} lesions", im.rel_path, gt.lesions.len());
            if im.rel_path.starts_with("healthy/") {
                healthy += 1;
                assert!(gt.lesions.is_empty(), "{}", im.rel_path);
            } else {
                assert!(!gt.lesions.is_empty(), "{}", im.rel_path);
            }
            assert_eq!((gt.width, gt.height), (2544, 1696), "{}", im.rel_path);
        }
        assert_eq!(healthy, 2);
    }
}
