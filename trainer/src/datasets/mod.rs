//! Readers for the fundus datasets the trainer and the FROC scorer use: DiaretDB1, ROC,
//! e-ophtha-MA, IDRiD and a plain folder of images without ground truth.
//!
//! Loading a dataset only lists files and checks that everything the ground truth needs
//! exists, so a wrong root or an incomplete copy fails at once, before any training.
//! Masks are decoded lazily by [`DatasetImage::load_truth`]: a full dataset of decoded
//! maps would not fit comfortably in memory.
//!
//! Splits: only DiaretDB1 (split lists) and IDRiD (training and testing folders) ship
//! splits. Asking for a split of another dataset is an error rather than being ignored, so
//! a "test" evaluation can never silently run on training images.

mod diaretdb1;
mod eophtha;
mod folder;
mod idrid;
mod palette_tiff;
mod roc;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image::{GrayImage, ImageReader};
use ma_core::mask::Mask;

use crate::ground_truth::{GroundTruth, Lesion};

pub use ma_core::image_io::IMAGE_EXTENSIONS;

/// Which reader to use for a dataset root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DatasetKind {
    /// DiaretDB1 v1.1 (root holds `resources/`).
    Diaretdb1,
    /// Retinopathy Online Challenge training set (root is `ROCtraining/` or its parent).
    Roc,
    /// e-ophtha-MA (root holds `MA/`, `Annotation_MA/` and optionally `healthy/`).
    Eophtha,
    /// IDRiD segmentation part (root holds `A. Segmentation/`), pixel MA masks.
    Idrid,
    /// Any folder of images, searched recursively; no ground truth.
    Folder,
}

impl DatasetKind {
    /// Whether the publisher splits the dataset into training and test images.
    pub fn has_splits(self) -> bool {
        matches!(self, Self::Diaretdb1 | Self::Idrid)
    }
}

impl std::fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Diaretdb1 => "DiaretDB1",
            Self::Roc => "ROC",
            Self::Eophtha => "e-ophtha-MA",
            Self::Idrid => "IDRiD",
            Self::Folder => "image folder",
        })
    }
}

/// A published split of a dataset (DiaretDB1 and IDRiD).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    Train,
    Test,
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Train => "train",
            Self::Test => "test",
        })
    }
}

/// Where an image's ground truth comes from; resolved by [`DatasetImage::load_truth`].
#[derive(Clone, Debug, PartialEq)]
enum TruthSource {
    /// Plain folder: no ground truth.
    None,
    /// DiaretDB1 fused expert confidence map (252 = all experts, high confidence).
    ConfidenceMap { map: PathBuf, threshold: f64 },
    /// ROC: one disk per mark, taken from `xml`.
    Disks { xml: PathBuf, marks: Vec<roc::Mark> },
    /// e-ophtha-MA, IDRiD: a mask whose non-zero pixels are MA; lesions are its
    /// 8-connected components.
    LesionMask(PathBuf),
    /// Known healthy image (e-ophtha `healthy/`): no lesions.
    Healthy,
}

/// One image of a dataset, with what is needed to load its ground truth lazily.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetImage {
    /// File name, e.g. `image001.png`; unique within a dataset.
    pub name: String,
    /// Path to the image file (the dataset root joined with `rel_path`).
    pub path: PathBuf,
    /// Path relative to the dataset root, with `/` separators.
    pub rel_path: String,
    /// DiaretDB1's shared field-of-view mask; `None` elsewhere (FOV estimated from the image).
    pub fov_mask: Option<PathBuf>,
    source: TruthSource,
}

impl DatasetImage {
    /// False only for plain folders.
    pub fn has_truth(&self) -> bool {
        self.source != TruthSource::None
    }

    /// Decodes the annotation (if any) into lesions in image pixel coordinates.
    /// Width and height are the image's, read from its header only.
    pub fn load_truth(&self) -> Result<GroundTruth> {
        match &self.source {
            TruthSource::None => bail!(
                "{} has no ground truth (it comes from a plain image folder)",
                self.path.display()
            ),
            TruthSource::ConfidenceMap { map, threshold } => {
                diaretdb1::load_truth(&self.path, map, *threshold)
            }
            TruthSource::Disks { xml, marks } => roc::load_truth(&self.path, xml, marks),
            TruthSource::LesionMask(mask) => lesion_mask_truth(&self.path, mask),
            TruthSource::Healthy => {
                let (width, height) = image_size(&self.path)?;
                Ok(GroundTruth {
                    width,
                    height,
                    lesions: Vec::new(),
                    uncertain: None,
                })
            }
        }
    }

    /// Decodes the dataset's field-of-view mask, checked against the image size;
    /// `None` when the dataset has none.
    pub fn load_fov(&self) -> Result<Option<Mask>> {
        let Some(fov) = &self.fov_mask else {
            return Ok(None);
        };
        let mask = load_fov_mask(fov)?;
        let (w, h) = image_size(&self.path)?;
        if (mask.width(), mask.height()) != (w, h) {
            bail!(
                "field-of-view mask {} is {}x{} but image {} is {w}x{h}",
                fov.display(),
                mask.width(),
                mask.height(),
                self.path.display()
            );
        }
        Ok(Some(mask))
    }
}

/// A dataset's images, sorted by relative path (= by name for flat datasets).
#[derive(Clone, Debug)]
pub struct Dataset {
    pub kind: DatasetKind,
    pub root: PathBuf,
    pub images: Vec<DatasetImage>,
}

/// How to load a dataset.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadOptions {
    /// DiaretDB1 or IDRiD split; `None` = every image the copy has. Any other dataset
    /// rejects a split (they ship none).
    pub split: Option<Split>,
    /// DiaretDB1: a pixel is MA when its confidence `value / 252` reaches this, and
    /// uncertain when its confidence is non-zero but below it. In `(0, 1]`.
    pub confidence_threshold: f64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            split: None,
            confidence_threshold: 0.5,
        }
    }
}

impl Dataset {
    /// Lists the images of the dataset at `root` and checks that their annotations exist.
    /// Errors name the missing or malformed file.
    pub fn load(kind: DatasetKind, root: &Path, opts: &LoadOptions) -> Result<Dataset> {
        if !root.is_dir() {
            bail!("{kind} root {} is not a folder", root.display());
        }
        if !kind.has_splits()
            && let Some(split) = opts.split
        {
            bail!(
                "{kind} has no split files: cannot select the {split} split of {} \
                 (splits exist for DiaretDB1 and IDRiD only)",
                root.display()
            );
        }
        let mut images = match kind {
            DatasetKind::Diaretdb1 => diaretdb1::load(root, opts)?,
            DatasetKind::Roc => roc::load(root)?,
            DatasetKind::Eophtha => eophtha::load(root)?,
            DatasetKind::Idrid => idrid::load(root, opts)?,
            DatasetKind::Folder => folder::load(root)?,
        };
        if images.is_empty() {
            bail!("no images found for {kind} dataset in {}", root.display());
        }
        images.sort_by(|a, b| a.rel_path.cmp(&b.rel_path));
        let mut seen: HashMap<&str, &Path> = HashMap::new();
        for im in &images {
            if let Some(other) = seen.insert(&im.name, &im.path) {
                bail!(
                    "two images share the file name {}: {} and {} (image names must be unique \
                     within a dataset)",
                    im.name,
                    other.display(),
                    im.path.display()
                );
            }
        }
        Ok(Dataset {
            kind,
            root: root.to_path_buf(),
            images,
        })
    }

    /// The image with this file name (or this path relative to the root).
    pub fn find(&self, name: &str) -> Option<&DatasetImage> {
        self.images
            .iter()
            .find(|im| im.name == name)
            .or_else(|| self.images.iter().find(|im| im.rel_path == name))
    }
}

/// Every image file below `dir`, recursively, in sorted path order: the device's own
/// search, so `detect` and the readers see the same files.
pub use ma_core::image_io::find_images as image_files;

/// Decodes the DiaretDB1-style field-of-view mask: non-zero = inside the FOV.
pub fn load_fov_mask(path: &Path) -> Result<Mask> {
    Ok(Mask::from_luma(&decode_luma(path)?, |v| v != 0))
}

/// Builds a [`DatasetImage`] for `path` below `root`.
fn dataset_image(root: &Path, path: PathBuf, source: TruthSource) -> Result<DatasetImage> {
    let name = file_name(&path)?;
    let rel = path.strip_prefix(root).unwrap_or(&path);
    let rel_path = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/");
    Ok(DatasetImage {
        name,
        path,
        rel_path,
        fov_mask: None,
        source,
    })
}

fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .with_context(|| format!("{} has no UTF-8 file name", path.display()))
}

/// Width and height of an image, from its header only.
fn image_size(path: &Path) -> Result<(u32, u32)> {
    ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?
        .into_dimensions()
        .with_context(|| format!("cannot read the size of image {}", path.display()))
}

/// Decodes an annotation or mask image to 8-bit grey. Palette TIFFs (IDRiD's original
/// masks), which the `image` crate refuses, go through [`palette_tiff`].
fn decode_luma(path: &Path) -> Result<GrayImage> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let decoded = image::load_from_memory(&bytes);
    match decoded {
        Ok(img) => Ok(img.to_luma8()),
        Err(e) if palette_tiff::is_tiff(&bytes) => palette_tiff::decode(&bytes, path)
            .with_context(|| format!("cannot decode {} ({e})", path.display())),
        Err(e) => Err(e).with_context(|| format!("cannot decode {}", path.display())),
    }
}

/// Lesions = 8-connected components of `mask`.
fn lesions_of(mask: &Mask) -> Vec<Lesion> {
    mask.components_8()
        .into_iter()
        .map(|pixels| Lesion { pixels })
        .collect()
}

/// Ground truth from a lesion mask: non-zero pixels are MA, lesions are 8-connected
/// components. `to_luma8` keeps a 1-bit palette mask's MA pixels non-zero (index 1 is
/// drawn in a colour, index 0 black).
fn lesion_mask_truth(image: &Path, mask: &Path) -> Result<GroundTruth> {
    let (ann, width, height) = decode_matching(image, mask)?;
    Ok(GroundTruth {
        width,
        height,
        lesions: lesions_of(&Mask::from_luma(&ann, |v| v != 0)),
        uncertain: None,
    })
}

/// Decodes an annotation mask and checks it has the image's size; returns it with that size.
fn decode_matching(image: &Path, annotation: &Path) -> Result<(GrayImage, u32, u32)> {
    let (width, height) = image_size(image)?;
    let ann = decode_luma(annotation)?;
    if ann.dimensions() != (width, height) {
        bail!(
            "annotation {} is {}x{} but its image {} is {width}x{height}",
            annotation.display(),
            ann.width(),
            ann.height(),
            image.display()
        );
    }
    Ok((ann, width, height))
}

/// Shared helpers for the submodules' tests.
#[cfg(test)]
pub(crate) mod test_util {
    use std::path::{Path, PathBuf};

    /// The real shared datasets; panics (fails the test) when they are absent.
    pub fn shared_datasets() -> PathBuf {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/datasets");
        assert!(
            dir.is_dir(),
            "the real datasets are missing: expected them at {} (../shared/datasets from \
             the project root); these tests need them",
            dir.display()
        );
        dir
    }

    /// Writes a grey PNG (creating parent folders).
    pub fn write_gray(path: &Path, width: u32, height: u32, f: impl Fn(u32, u32) -> u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::GrayImage::from_fn(width, height, |x, y| image::Luma([f(x, y)]))
            .save(path)
            .unwrap();
    }

    /// Writes an RGB image in the format given by the extension (creating parent folders).
    pub fn write_rgb(path: &Path, width: u32, height: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(width, height, image::Rgb([120, 40, 20]))
            .save(path)
            .unwrap();
    }

    /// The full error chain, for matching messages.
    pub fn err_text(e: anyhow::Error) -> String {
        format!("{e:#}")
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    #[test]
    fn image_files_recursive_sorted_any_case() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_rgb(&root.join("b/z.PNG"), 4, 4);
        write_rgb(&root.join("a.jpg"), 4, 4);
        write_rgb(&root.join("b/c/y.TiF"), 4, 4);
        std::fs::write(root.join("notes.txt"), "x").unwrap();
        std::fs::write(root.join("b/x.gif"), "x").unwrap();
        let files = image_files(root).unwrap();
        let rel: Vec<_> = files
            .iter()
            .map(|p| p.strip_prefix(root).unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(rel, ["a.jpg", "b/c/y.TiF", "b/z.PNG"]);
    }

    #[test]
    fn split_rejected_outside_diaretdb1() {
        let dir = tempfile::tempdir().unwrap();
        write_rgb(&dir.path().join("a.png"), 4, 4);
        let opts = LoadOptions {
            split: Some(Split::Train),
            ..LoadOptions::default()
        };
        let e = err_text(Dataset::load(DatasetKind::Folder, dir.path(), &opts).unwrap_err());
        assert!(e.contains("no split files"), "{e}");
    }

    #[test]
    fn missing_root_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("nowhere");
        for kind in [
            DatasetKind::Diaretdb1,
            DatasetKind::Roc,
            DatasetKind::Eophtha,
            DatasetKind::Idrid,
            DatasetKind::Folder,
        ] {
            let e = err_text(Dataset::load(kind, &root, &LoadOptions::default()).unwrap_err());
            assert!(e.contains("nowhere"), "{e}");
        }
    }
}
