//! DiaretDB1 v1.1: fused expert confidence maps for "red small dots" (microaneurysms).
//!
//! Layout below the root (as published):
//! `resources/images/ddb1_fundusimages/imageNNN.png`,
//! `resources/images/ddb1_groundtruth/redsmalldots/imageNNN.png` (grey, 252 = every expert
//! marked the pixel with high confidence), `resources/images/ddb1_fundusmask/fmask.tif`
//! (one FOV mask for all images), and the split lists `resources/traindatasets/trainset.txt`
//! and `resources/testdatasets/testset.txt` (the publisher keeps the test list, with
//! `testevalfiles_example.txt`, in its own folder; no known copy has it elsewhere).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image::GrayImage;
use ma_core::mask::Mask;

use super::{
    DatasetImage, LoadOptions, Split, TruthSource, dataset_image, decode_matching, image_files,
    lesions_of,
};
use crate::ground_truth::{GroundTruth, Lesion};

const IMAGES: &str = "resources/images/ddb1_fundusimages";
const MAPS: &str = "resources/images/ddb1_groundtruth/redsmalldots";
const FOV: &str = "resources/images/ddb1_fundusmask/fmask.tif";
const TRAIN_LIST: &str = "resources/traindatasets/trainset.txt";
const TEST_LIST: &str = "resources/testdatasets/testset.txt";

/// Map value meaning full confidence (all experts, high confidence).
const FULL_CONFIDENCE: f64 = 252.0;

pub(super) fn load(root: &Path, opts: &LoadOptions) -> Result<Vec<DatasetImage>> {
    let t = opts.confidence_threshold;
    if !(t > 0.0 && t <= 1.0) {
        bail!("DiaretDB1 confidence threshold must be in (0, 1], got {t}");
    }
    let images_dir = root.join(IMAGES);
    let maps_dir = root.join(MAPS);
    let fov = root.join(FOV);
    for (what, path, is_dir) in [
        ("image folder", &images_dir, true),
        ("red-small-dots ground-truth folder", &maps_dir, true),
        ("field-of-view mask", &fov, false),
    ] {
        let ok = if is_dir {
            path.is_dir()
        } else {
            path.is_file()
        };
        if !ok {
            bail!(
                "{} is not a DiaretDB1 v1.1 root: its {what} {} is missing",
                root.display(),
                path.display()
            );
        }
    }

    let paths = match opts.split {
        None => image_files(&images_dir)?,
        Some(split) => split_images(root, &images_dir, split)?,
    };
    paths
        .into_iter()
        .map(|path| {
            let name = super::file_name(&path)?;
            let map = maps_dir.join(&name);
            if !map.is_file() {
                bail!(
                    "DiaretDB1 image {} has no red-small-dots ground truth: {} is missing",
                    path.display(),
                    map.display()
                );
            }
            let source = TruthSource::ConfidenceMap { map, threshold: t };
            let mut im = dataset_image(root, path, source)?;
            im.fov_mask = Some(fov.clone());
            Ok(im)
        })
        .collect()
}

/// The images named by a split list, in list order (the caller sorts).
fn split_images(root: &Path, images_dir: &Path, split: Split) -> Result<Vec<PathBuf>> {
    let list = root.join(match split {
        Split::Train => TRAIN_LIST,
        Split::Test => TEST_LIST,
    });
    if !list.is_file() {
        bail!(
            "DiaretDB1 {split} split list {} does not exist (is that split held out of this copy?)",
            list.display()
        );
    }
    let text = std::fs::read_to_string(&list)
        .with_context(|| format!("cannot read DiaretDB1 split list {}", list.display()))?;
    let mut names = parse_split_list(&text);
    if names.is_empty() {
        bail!("DiaretDB1 split list {} names no images", list.display());
    }
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let path = images_dir.join(&name);
            if !path.is_file() {
                bail!(
                    "DiaretDB1 split list {} names {name}, but {} does not exist",
                    list.display(),
                    path.display()
                );
            }
            Ok(path)
        })
        .collect()
}

/// File names listed one per line; tolerant of CRLF, a BOM, blank lines, `#` comments and
/// paths (either separator) in front of the name.
fn parse_split_list(text: &str) -> Vec<String> {
    text.trim_start_matches('\u{feff}')
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(['/', '\\']).next())
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

pub(super) fn load_truth(image: &Path, map: &Path, threshold: f64) -> Result<GroundTruth> {
    let (conf, width, height) = decode_matching(image, map)?;
    let (lesions, uncertain) = split_confidence(&conf, threshold);
    Ok(GroundTruth {
        width,
        height,
        lesions,
        uncertain: Some(uncertain),
    })
}

/// Lesions = 8-connected components of `value / 252 >= threshold`; uncertain region =
/// `0 < value / 252 < threshold` (neither a hit nor a false positive when scoring).
fn split_confidence(conf: &GrayImage, threshold: f64) -> (Vec<Lesion>, Mask) {
    let sure = Mask::from_luma(conf, |v| f64::from(v) / FULL_CONFIDENCE >= threshold);
    let uncertain = Mask::from_luma(conf, |v| {
        v > 0 && f64::from(v) / FULL_CONFIDENCE < threshold
    });
    (lesions_of(&sure), uncertain)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::*;
    use super::*;

    const W: u32 = 12;
    const H: u32 = 8;

    /// A map with: a full-confidence diagonal pair (one lesion under 8-connectivity), a
    /// 126 (= 0.5) blob, a 63 (= 0.25) blob, and a 252 pixel touching a 100 pixel.
    fn sample_map(x: u32, y: u32) -> u8 {
        match (x, y) {
            (1, 1) | (2, 2) => 252,
            (6, 1) | (7, 1) => 126,
            (10, 1) => 63,
            (3, 6) => 252,
            (4, 6) => 100,
            _ => 0,
        }
    }

    /// Writes a minimal DiaretDB1 layout with the given images, each with `sample_map`,
    /// and the training list (no test list: see `official_layout_loads_both_splits`).
    fn make_root(root: &Path, names: &[&str], trainset: &str) {
        for n in names {
            write_rgb(&root.join(IMAGES).join(n), W, H);
            write_gray(&root.join(MAPS).join(n), W, H, sample_map);
        }
        write_gray(&root.join(FOV), W, H, |x, _| if x > 0 { 255 } else { 0 });
        write_text(&root.join(TRAIN_LIST), trainset);
    }

    fn write_text(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn names(ds: &Dataset) -> Vec<&str> {
        ds.images.iter().map(|i| i.name.as_str()).collect()
    }

    /// The layout of the published v1.1 archive: `trainset.txt` in `traindatasets/`,
    /// `testset.txt` and `testevalfiles_example.txt` in `testdatasets/`.
    #[test]
    fn official_layout_loads_both_splits() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let all = [
            "image001.png",
            "image002.png",
            "image003.png",
            "image004.png",
        ];
        make_root(root, &all, "image002.png\nimage004.png\n");
        write_text(
            &root.join("resources/testdatasets/testset.txt"),
            "image001.png\nimage003.png\n",
        );
        write_text(
            &root.join("resources/testdatasets/testevalfiles_example.txt"),
            "whatever the example lists\n",
        );
        let train =
            Dataset::load(DatasetKind::Diaretdb1, root, &opts(Some(Split::Train), 0.5)).unwrap();
        assert_eq!(names(&train), ["image002.png", "image004.png"]);
        let test =
            Dataset::load(DatasetKind::Diaretdb1, root, &opts(Some(Split::Test), 0.5)).unwrap();
        assert_eq!(names(&test), ["image001.png", "image003.png"]);
        assert_eq!(test.images[0].load_truth().unwrap().lesions.len(), 3);
        let every = Dataset::load(DatasetKind::Diaretdb1, root, &opts(None, 0.5)).unwrap();
        assert_eq!(names(&every), all);
    }

    /// A copy without the test list (as in ../shared, where the test split is held out):
    /// the error names the path the publisher uses.
    #[test]
    fn missing_test_list_names_the_official_path() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        make_root(root, &["image001.png"], "image001.png\n");
        // A list in the training folder is not the test list.
        write_text(
            &root.join("resources/traindatasets/testset.txt"),
            "image001.png\n",
        );
        let e = err_text(
            Dataset::load(DatasetKind::Diaretdb1, root, &opts(Some(Split::Test), 0.5)).unwrap_err(),
        );
        let expected = root.join("resources/testdatasets/testset.txt");
        assert!(
            e.contains(&expected.display().to_string()) && e.contains("test split list"),
            "{e}"
        );
    }

    fn opts(split: Option<Split>, t: f64) -> LoadOptions {
        LoadOptions {
            split,
            confidence_threshold: t,
        }
    }

    #[test]
    fn threshold_splits_lesions_and_uncertain() {
        let img = GrayImage::from_fn(W, H, |x, y| image::Luma([sample_map(x, y)]));
        let (lesions, unc) = split_confidence(&img, 0.5);
        let px: Vec<_> = lesions.iter().map(|l| l.pixels.clone()).collect();
        assert_eq!(
            px,
            vec![vec![(1, 1), (2, 2)], vec![(6, 1), (7, 1)], vec![(3, 6)]]
        );
        assert!(unc.get(10, 1) && unc.get(4, 6));
        assert_eq!(unc.count(), 2);

        let (lesions, unc) = split_confidence(&img, 0.75);
        assert_eq!(lesions.len(), 2);
        assert!(unc.get(6, 1) && unc.get(7, 1) && unc.get(10, 1) && unc.get(4, 6));
        assert_eq!(unc.count(), 4);
        assert!(!unc.get(1, 1) && !unc.get(0, 0));
    }

    #[test]
    fn loads_split_and_truth() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        make_root(
            root,
            &["image002.png", "image001.png", "image003.png"],
            "\u{feff}image002.png\r\n\r\n# comment\r\nresources\\images\\ddb1_fundusimages\\image001.png\r\n",
        );
        let ds =
            Dataset::load(DatasetKind::Diaretdb1, root, &opts(Some(Split::Train), 0.5)).unwrap();
        let names: Vec<_> = ds.images.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["image001.png", "image002.png"]);
        let im = ds.find("image002.png").unwrap();
        assert_eq!(
            im.rel_path,
            "resources/images/ddb1_fundusimages/image002.png"
        );
        assert!(im.has_truth());
        assert_eq!(im.fov_mask.as_deref(), Some(root.join(FOV).as_path()));
        let gt = im.load_truth().unwrap();
        assert_eq!((gt.width, gt.height), (W, H));
        assert_eq!(gt.lesions.len(), 3);
        assert_eq!(gt.uncertain.unwrap().count(), 2);
        let fov = im.load_fov().unwrap().unwrap();
        assert!(!fov.get(0, 0) && fov.get(1, 0));

        // No split: every image in the folder.
        let all = Dataset::load(DatasetKind::Diaretdb1, root, &opts(None, 0.75)).unwrap();
        assert_eq!(all.images.len(), 3);
        assert_eq!(all.images[0].load_truth().unwrap().lesions.len(), 2);
    }

    #[test]
    fn missing_files_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        make_root(root, &["image001.png"], "image001.png\nimage009.png\n");

        // Split naming an absent image.
        let e = err_text(
            Dataset::load(DatasetKind::Diaretdb1, root, &opts(Some(Split::Train), 0.5))
                .unwrap_err(),
        );
        assert!(
            e.contains("image009.png") && e.contains("trainset.txt"),
            "{e}"
        );

        // Image without its confidence map.
        write_rgb(&root.join(IMAGES).join("image005.png"), W, H);
        let e =
            err_text(Dataset::load(DatasetKind::Diaretdb1, root, &opts(None, 0.5)).unwrap_err());
        assert!(
            e.contains("redsmalldots") && e.contains("image005.png"),
            "{e}"
        );

        // Map of the wrong size.
        write_gray(&root.join(MAPS).join("image005.png"), W + 1, H, |_, _| 0);
        let ds = Dataset::load(DatasetKind::Diaretdb1, root, &opts(None, 0.5)).unwrap();
        let e = err_text(ds.find("image005.png").unwrap().load_truth().unwrap_err());
        assert!(
            e.contains("redsmalldots/image005.png") && e.contains("ddb1_fundusimages/image005.png"),
            "{e}"
        );

        // Bad threshold.
        let e =
            err_text(Dataset::load(DatasetKind::Diaretdb1, root, &opts(None, 0.0)).unwrap_err());
        assert!(e.contains("threshold"), "{e}");
    }

    #[test]
    fn wrong_root_names_the_missing_folder() {
        let dir = tempfile::tempdir().unwrap();
        write_rgb(&dir.path().join("ROCtraining/image0_training.jpg"), W, H);
        let e = err_text(
            Dataset::load(DatasetKind::Diaretdb1, dir.path(), &opts(None, 0.5)).unwrap_err(),
        );
        assert!(
            e.contains("not a DiaretDB1") && e.contains("ddb1_fundusimages"),
            "{e}"
        );
    }

    #[test]
    fn split_list_parsing() {
        assert_eq!(
            parse_split_list(" a.png \r\n\n#x\nsome/dir/b.png\nC:\\d\\c.png\n"),
            ["a.png", "b.png", "c.png"]
        );
    }

    /// The real training split: 28 images, lesion counts pinned at both thresholds.
    #[test]
    fn real_train_split() {
        let root = shared_datasets().join("diaretdb1");
        let mut totals = Vec::new();
        for t in [0.5, 0.75] {
            let ds =
                Dataset::load(DatasetKind::Diaretdb1, &root, &opts(Some(Split::Train), t)).unwrap();
            assert_eq!(ds.images.len(), 28);
            let mut total = 0;
            for im in &ds.images {
                let gt = im.load_truth().unwrap();
                assert_eq!((gt.width, gt.height), (1500, 1152), "{}", im.name);
                println!("threshold {t}: {} {} lesions", im.name, gt.lesions.len());
                total += gt.lesions.len();
            }
            println!("threshold {t}: {total} lesions in total");
            totals.push(total);
        }
        assert_eq!(totals, [245, 84], "lesions at thresholds 0.5 and 0.75");

        let ds = Dataset::load(DatasetKind::Diaretdb1, &root, &opts(None, 0.5)).unwrap();
        let fov = ds.images[0].load_fov().unwrap().unwrap();
        assert!(fov.get(750, 576) && !fov.get(0, 0), "FOV mask polarity");
    }
}
