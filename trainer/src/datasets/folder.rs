//! A plain folder of images without ground truth (inference on field data).

use std::path::Path;

use anyhow::Result;

use super::{DatasetImage, TruthSource, dataset_image, image_files};

/// Every image below `root`, recursively.
pub(super) fn load(root: &Path) -> Result<Vec<DatasetImage>> {
    image_files(root)?
        .into_iter()
        .map(|p| dataset_image(root, p, TruthSource::None))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::*;

    #[test]
    fn lists_images_without_truth() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_rgb(&root.join("sub/b.jpg"), 8, 6);
        write_rgb(&root.join("a.png"), 8, 6);
        let ds = Dataset::load(DatasetKind::Folder, root, &LoadOptions::default()).unwrap();
        let rel: Vec<_> = ds.images.iter().map(|i| i.rel_path.as_str()).collect();
        assert_eq!(rel, ["a.png", "sub/b.jpg"]);
        let b = ds.find("b.jpg").unwrap();
        assert_eq!(b.path, root.join("sub/b.jpg"));
        assert!(!b.has_truth());
        assert!(b.fov_mask.is_none());
        let e = err_text(b.load_truth().unwrap_err());
        assert!(e.contains("b.jpg") && e.contains("no ground truth"), "{e}");
    }

    #[test]
    fn empty_folder_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("readme.txt"), "x").unwrap();
        let e = err_text(
            Dataset::load(DatasetKind::Folder, dir.path(), &LoadOptions::default()).unwrap_err(),
        );
        assert!(
            e.contains("no images") && e.contains(&dir.path().display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn duplicate_file_names_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write_rgb(&dir.path().join("a/x.png"), 4, 4);
        write_rgb(&dir.path().join("b/x.png"), 4, 4);
        let e = err_text(
            Dataset::load(DatasetKind::Folder, dir.path(), &LoadOptions::default()).unwrap_err(),
        );
        assert!(e.contains("x.png") && e.contains("unique"), "{e}");
    }
}
