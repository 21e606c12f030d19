//! IDRiD (Indian Diabetic Retinopathy Image Dataset), segmentation part: pixel-level MA
//! masks; lesions are their 8-connected components (as for e-ophtha-MA).
//!
//! Layout below the root (the folder holding `A. Segmentation/`, or that folder itself),
//! as published:
//! `1. Original Images/{a. Training Set,b. Testing Set}/IDRiD_NN.jpg` and
//! `2. All Segmentation Groundtruths/{a. Training Set,b. Testing Set}/1. Microaneurysms/IDRiD_NN_MA.tif`.
//! The masks come in two encodings, both accepted: the original 1-bit palette TIFF (index
//! 1 = MA, drawn red) and 8-bit grey (0 / 255); either way non-zero means MA.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use super::{DatasetImage, LoadOptions, Split, TruthSource, dataset_image, image_files};

const SEGMENTATION: &str = "A. Segmentation";
const IMAGES: &str = "1. Original Images";
const TRUTH: &str = "2. All Segmentation Groundtruths";
const MA: &str = "1. Microaneurysms";

fn set_folder(split: Split) -> &'static str {
    match split {
        Split::Train => "a. Training Set",
        Split::Test => "b. Testing Set",
    }
}

pub(super) fn load(root: &Path, opts: &LoadOptions) -> Result<Vec<DatasetImage>> {
    let seg = if root.join(SEGMENTATION).is_dir() {
        root.join(SEGMENTATION)
    } else if root.join(IMAGES).is_dir() {
        root.to_path_buf()
    } else {
        bail!(
            "{} is not an IDRiD root: neither {} nor {} exists",
            root.display(),
            root.join(SEGMENTATION).display(),
            root.join(IMAGES).display()
        );
    };
    let splits: Vec<Split> = match opts.split {
        Some(split) => vec![split],
        // Every set this copy has (the testing set is often held out).
        None => [Split::Train, Split::Test]
            .into_iter()
            .filter(|&s| seg.join(IMAGES).join(set_folder(s)).is_dir())
            .collect(),
    };
    if splits.is_empty() {
        bail!(
            "IDRiD root {} has neither {} nor {}",
            root.display(),
            seg.join(IMAGES).join(set_folder(Split::Train)).display(),
            seg.join(IMAGES).join(set_folder(Split::Test)).display()
        );
    }
    let mut out = Vec::new();
    for split in splits {
        let images = seg.join(IMAGES).join(set_folder(split));
        let masks = seg.join(TRUTH).join(set_folder(split)).join(MA);
        for (what, dir) in [("image", &images), ("microaneurysm mask", &masks)] {
            if !dir.is_dir() {
                bail!(
                    "IDRiD {split} set: the {what} folder {} is missing (is that set held \
                     out of this copy?)",
                    dir.display()
                );
            }
        }
        for image in image_files(&images)? {
            let mask = mask_path(&masks, &image)?;
            out.push(dataset_image(root, image, TruthSource::LesionMask(mask))?);
        }
    }
    Ok(out)
}

/// `IDRiD_NN.jpg` -> `<masks>/IDRiD_NN_MA.tif`; every image of the set has one (every
/// IDRiD segmentation image shows MAs).
fn mask_path(masks: &Path, image: &Path) -> Result<PathBuf> {
    let stem = image
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| anyhow::anyhow!("{} has no UTF-8 file name", image.display()))?;
    let mask = masks.join(format!("{stem}_MA.tif"));
    if !mask.is_file() {
        bail!(
            "IDRiD image {} has no microaneurysm mask: {} is missing",
            image.display(),
            mask.display()
        );
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::*;
    use super::*;

    fn opts(split: Option<Split>) -> LoadOptions {
        LoadOptions {
            split,
            ..LoadOptions::default()
        }
    }

    fn make_set(root: &Path, split: Split, names: &[&str]) {
        let seg = root.join(SEGMENTATION);
        for n in names {
            write_rgb(
                &seg.join(IMAGES)
                    .join(set_folder(split))
                    .join(format!("{n}.jpg")),
                20,
                10,
            );
            let mask = seg
                .join(TRUTH)
                .join(set_folder(split))
                .join(MA)
                .join(format!("{n}_MA.tif"));
            // Two lesions: a diagonal pair (one 8-connected component) and a pixel.
            write_gray(&mask, 20, 10, |x, y| match (x, y) {
                (2, 2) | (3, 3) | (15, 8) => 255,
                _ => 0,
            });
        }
    }

    #[test]
    fn loads_official_layout_and_splits() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        make_set(root, Split::Train, &["IDRiD_02", "IDRiD_01"]);
        make_set(root, Split::Test, &["IDRiD_55"]);
        let names = |ds: &Dataset| ds.images.iter().map(|i| i.name.clone()).collect::<Vec<_>>();
        let train = Dataset::load(DatasetKind::Idrid, root, &opts(Some(Split::Train))).unwrap();
        assert_eq!(names(&train), ["IDRiD_01.jpg", "IDRiD_02.jpg"]);
        let gt = train.images[0].load_truth().unwrap();
        assert_eq!((gt.width, gt.height), (20, 10));
        let px: Vec<_> = gt.lesions.iter().map(|l| l.pixels.clone()).collect();
        assert_eq!(px, vec![vec![(2, 2), (3, 3)], vec![(15, 8)]]);
        let test = Dataset::load(DatasetKind::Idrid, root, &opts(Some(Split::Test))).unwrap();
        assert_eq!(names(&test), ["IDRiD_55.jpg"]);
        let every = Dataset::load(DatasetKind::Idrid, root, &opts(None)).unwrap();
        assert_eq!(every.images.len(), 3);
        // The `A. Segmentation` folder itself is accepted as the root too.
        let inner = Dataset::load(
            DatasetKind::Idrid,
            &root.join(SEGMENTATION),
            &opts(Some(Split::Train)),
        )
        .unwrap();
        assert_eq!(names(&inner), names(&train));
    }

    #[test]
    fn held_out_set_and_missing_mask_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        make_set(root, Split::Train, &["IDRiD_01"]);
        let e = err_text(
            Dataset::load(DatasetKind::Idrid, root, &opts(Some(Split::Test))).unwrap_err(),
        );
        assert!(
            e.contains("b. Testing Set") && e.contains("held out"),
            "{e}"
        );
        write_rgb(
            &root
                .join(SEGMENTATION)
                .join(IMAGES)
                .join(set_folder(Split::Train))
                .join("IDRiD_07.jpg"),
            20,
            10,
        );
        let e = err_text(Dataset::load(DatasetKind::Idrid, root, &opts(None)).unwrap_err());
        assert!(
            e.contains("IDRiD_07_MA.tif") && e.contains("missing"),
            "{e}"
        );
    }

    #[test]
    fn wrong_root_is_named() {
        let dir = tempfile::tempdir().unwrap();
        write_rgb(&dir.path().join("MA/a.jpg"), 4, 4);
        let e = err_text(Dataset::load(DatasetKind::Idrid, dir.path(), &opts(None)).unwrap_err());
        assert!(e.contains("not an IDRiD root"), "{e}");
    }

    /// The real training set: 54 photos, both mask encodings (IDRiD_01's original 1-bit
    /// palette TIFF and the 8-bit grey ones) give lesions.
    #[test]
    fn real_idrid_train() {
        let root = shared_datasets().join("idrid");
        let ds = Dataset::load(DatasetKind::Idrid, &root, &opts(Some(Split::Train))).unwrap();
        assert_eq!(ds.images.len(), 54);
        let mut total = 0;
        for name in ["IDRiD_01.jpg", "IDRiD_02.jpg"] {
            let gt = ds.find(name).unwrap().load_truth().unwrap();
            assert_eq!((gt.width, gt.height), (4288, 2848), "{name}");
            println!("{name}: {} lesions", gt.lesions.len());
            assert!(!gt.lesions.is_empty(), "{name} has no lesions");
            // A lesion is a few pixels wide, never a large part of the photo (a palette
            // index read as grey background would make the whole image one component).
            let largest = gt.lesions.iter().map(|l| l.pixels.len()).max().unwrap();
            assert!(largest < 2000, "{name}: a lesion of {largest} pixels");
            total += gt.lesions.len();
        }
        assert!(total > 10, "{total}");
    }
}
