//! Retinopathy Online Challenge training set: consensus MA marks, one disk per mark.
//!
//! `annotations-consensus-ma-only.xml` holds
//! `<set><annotations-per-image imagename="..."><annotation><mark x=".." y=".."><radius>r</radius></mark><lesion>microaneurysm</lesion>...`.
//! The XML is parsed (and checked) when the dataset is loaded, so a bad file fails before
//! any work; disks are drawn lazily because they need the image size.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::{DatasetImage, TruthSource, dataset_image, image_files, image_size};
use crate::ground_truth::{GroundTruth, Lesion};

const XML: &str = "annotations-consensus-ma-only.xml";
const SUBFOLDER: &str = "ROCtraining";

/// One consensus mark: a disk in image pixel coordinates.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Mark {
    pub x: f64,
    pub y: f64,
    pub radius: f64,
    /// Line in the XML, for error messages.
    pub line: u32,
}

/// Accepts the folder holding the XML (`ROCtraining/`) or its parent.
pub(super) fn load(root: &Path) -> Result<Vec<DatasetImage>> {
    let candidates = [root.join(XML), root.join(SUBFOLDER).join(XML)];
    let Some(xml) = candidates.iter().find(|p| p.is_file()) else {
        bail!(
            "{} is not a ROC training root: neither {} nor {} exists",
            root.display(),
            candidates[0].display(),
            candidates[1].display()
        );
    };
    let folder = xml.parent().unwrap_or(root);
    let text = std::fs::read_to_string(xml)
        .with_context(|| format!("cannot read ROC annotations {}", xml.display()))?;
    let mut marks = parse_annotations(&text)
        .with_context(|| format!("malformed ROC annotation file {}", xml.display()))?;

    let files = image_files(folder)?;
    let by_name: HashMap<String, &PathBuf> = files
        .iter()
        .map(|p| Ok((super::file_name(p)?, p)))
        .collect::<Result<_>>()?;
    let mut named: Vec<_> = marks.keys().cloned().collect();
    named.sort();
    for name in named {
        if !by_name.contains_key(&name) {
            bail!(
                "ROC annotation file {} names image {name}, but {} does not exist",
                xml.display(),
                folder.join(&name).display()
            );
        }
    }
    files
        .iter()
        .map(|p| {
            let name = super::file_name(p)?;
            let source = TruthSource::Disks {
                xml: xml.clone(),
                marks: marks.remove(&name).unwrap_or_default(),
            };
            dataset_image(root, p.clone(), source)
        })
        .collect()
}

/// Marks per image file name. Images without marks may be absent or listed empty.
/// Annotations whose `<lesion>` names something other than a microaneurysm are skipped.
fn parse_annotations(text: &str) -> Result<HashMap<String, Vec<Mark>>> {
    let doc = roxmltree::Document::parse(text).context("not well-formed XML")?;
    let line = |n: roxmltree::Node| doc.text_pos_at(n.range().start).row;
    let top = doc.root_element();
    if !top.has_tag_name("set") {
        bail!(
            "expected a <set> root element, found <{}>",
            top.tag_name().name()
        );
    }
    let mut out: HashMap<String, Vec<Mark>> = HashMap::new();
    for per_image in top
        .descendants()
        .filter(|n| n.has_tag_name("annotations-per-image"))
    {
        let raw = per_image.attribute("imagename").with_context(|| {
            format!(
                "line {}: <annotations-per-image> without an imagename attribute",
                line(per_image)
            )
        })?;
        // The file name only: some copies carry a path.
        let name = raw.rsplit(['/', '\\']).next().unwrap_or(raw).trim();
        if name.is_empty() {
            bail!("line {}: empty imagename", line(per_image));
        }
        let marks = out.entry(name.to_owned()).or_default();
        for ann in per_image
            .children()
            .filter(|n| n.has_tag_name("annotation"))
        {
            let lesion = ann
                .children()
                .find(|n| n.has_tag_name("lesion"))
                .and_then(|n| n.text())
                .map(str::trim);
            if lesion.is_some_and(|l| !l.eq_ignore_ascii_case("microaneurysm")) {
                continue;
            }
            let mut found = false;
            for mark in ann.children().filter(|n| n.has_tag_name("mark")) {
                found = true;
                let at = line(mark);
                let num = |what: &str, value: Option<&str>| -> Result<f64> {
                    value
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        .filter(|v| v.is_finite() && *v >= 0.0)
                        .with_context(|| {
                            format!(
                                "line {at}: mark of image {name} has no non-negative numeric \
                                 {what} (found {value:?})"
                            )
                        })
                };
                let radius_text = mark
                    .children()
                    .find(|n| n.has_tag_name("radius"))
                    .and_then(|n| n.text());
                marks.push(Mark {
                    x: num("x", mark.attribute("x"))?,
                    y: num("y", mark.attribute("y"))?,
                    radius: num("radius", radius_text)?,
                    line: at,
                });
            }
            if !found {
                bail!(
                    "line {}: annotation of image {name} has no <mark>",
                    line(ann)
                );
            }
        }
    }
    Ok(out)
}

pub(super) fn load_truth(image: &Path, xml: &Path, marks: &[Mark]) -> Result<GroundTruth> {
    let (width, height) = image_size(image)?;
    let lesions = marks
        .iter()
        .map(|m| {
            if m.x >= f64::from(width) || m.y >= f64::from(height) {
                bail!(
                    "ROC annotation file {} line {}: mark at ({}, {}) lies outside image {} \
                     ({width}x{height})",
                    xml.display(),
                    m.line,
                    m.x,
                    m.y,
                    image.display()
                );
            }
            Ok(Lesion::disk(m.x, m.y, m.radius, width, height))
        })
        .collect::<Result<_>>()?;
    Ok(GroundTruth {
        width,
        height,
        lesions,
        uncertain: None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::*;
    use super::*;

    const GOOD: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<!-- comment -->
<set>
  <annotations-per-image  imagename="image1_training.jpg">
    <annotation name="roi-1">
      <mark x="10" y="12"><radius>3</radius></mark>
      <lesion>microaneurysm</lesion>
      <probability>1.0</probability>
    </annotation>
    <annotation>
      <mark x="30" y="5"><radius> 2 </radius></mark>
      <lesion>microaneurysm</lesion>
    </annotation>
    <annotation>
      <mark x="30" y="20"><radius>4</radius></mark>
      <lesion>haemorrhage</lesion>
    </annotation>
  </annotations-per-image>
  <annotations-per-image imagename="image0_training.jpg">
  </annotations-per-image>
</set>
"#;

    fn make_root(root: &Path, xml: &str) -> PathBuf {
        let folder = root.join(SUBFOLDER);
        for i in 0..3 {
            write_rgb(&folder.join(format!("image{i}_training.jpg")), 40, 30);
        }
        std::fs::write(folder.join(XML), xml).unwrap();
        folder
    }

    #[test]
    fn parses_marks_and_healthy_images() {
        let dir = tempfile::tempdir().unwrap();
        let folder = make_root(dir.path(), GOOD);
        for root in [dir.path(), folder.as_path()] {
            let ds = Dataset::load(DatasetKind::Roc, root, &LoadOptions::default()).unwrap();
            assert_eq!(ds.images.len(), 3);
            let lesions: Vec<_> = ds
                .images
                .iter()
                .map(|im| im.load_truth().unwrap().lesions.len())
                .collect();
            // image0 listed without marks, image2 not listed: both healthy.
            assert_eq!(lesions, [0, 2, 0]);
        }
        let ds = Dataset::load(DatasetKind::Roc, dir.path(), &LoadOptions::default()).unwrap();
        let im = ds.find("image1_training.jpg").unwrap();
        assert_eq!(im.rel_path, "ROCtraining/image1_training.jpg");
        assert!(im.has_truth() && im.fov_mask.is_none());
        let gt = im.load_truth().unwrap();
        assert_eq!((gt.width, gt.height), (40, 30));
        assert!(gt.uncertain.is_none());
        assert_eq!(gt.lesions[0], Lesion::disk(10.0, 12.0, 3.0, 40, 30));
        assert_eq!(gt.lesions[1], Lesion::disk(30.0, 5.0, 2.0, 40, 30));
    }

    fn load_err(xml: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        make_root(dir.path(), xml);
        err_text(Dataset::load(DatasetKind::Roc, dir.path(), &LoadOptions::default()).unwrap_err())
    }

    #[test]
    fn malformed_xml_names_the_file() {
        let e = load_err("<set><annotations-per-image imagename=\"a\"></set>");
        assert!(e.contains(XML) && e.contains("malformed"), "{e}");
    }

    #[test]
    fn non_numeric_mark_is_an_error() {
        let e = load_err(
            r#"<set><annotations-per-image imagename="image1_training.jpg">
<annotation><mark x="ten" y="3"><radius>2</radius></mark></annotation>
</annotations-per-image></set>"#,
        );
        assert!(
            e.contains(XML) && e.contains("line 2") && e.contains("\"ten\""),
            "{e}"
        );
        let e = load_err(
            r#"<set><annotations-per-image imagename="image1_training.jpg">
<annotation><mark x="1" y="3"></mark></annotation>
</annotations-per-image></set>"#,
        );
        assert!(e.contains(XML) && e.contains("radius"), "{e}");
    }

    #[test]
    fn unknown_image_is_an_error_naming_it() {
        let e = load_err(r#"<set><annotations-per-image imagename="image9_training.jpg"/></set>"#);
        assert!(e.contains(XML) && e.contains("image9_training.jpg"), "{e}");
    }

    #[test]
    fn mark_outside_image_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        make_root(
            dir.path(),
            r#"<set><annotations-per-image imagename="image2_training.jpg">
<annotation><mark x="40" y="3"><radius>2</radius></mark></annotation>
</annotations-per-image></set>"#,
        );
        let ds = Dataset::load(DatasetKind::Roc, dir.path(), &LoadOptions::default()).unwrap();
        let e = err_text(
            ds.find("image2_training.jpg")
                .unwrap()
                .load_truth()
                .unwrap_err(),
        );
        assert!(
            e.contains("outside") && e.contains("image2_training.jpg"),
            "{e}"
        );
    }

    #[test]
    fn wrong_root_names_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        write_rgb(&dir.path().join("image001.png"), 4, 4);
        let e = err_text(
            Dataset::load(DatasetKind::Roc, dir.path(), &LoadOptions::default()).unwrap_err(),
        );
        assert!(e.contains("not a ROC") && e.contains(XML), "{e}");
    }

    /// The real 5 training images and their 21 consensus marks.
    #[test]
    fn real_roc() {
        let root = shared_datasets().join("roc");
        let ds = Dataset::load(DatasetKind::Roc, &root, &LoadOptions::default()).unwrap();
        assert_eq!(ds.images.len(), 5);
        let mut total = 0;
        for im in &ds.images {
            let gt = im.load_truth().unwrap();
            println!(
                "{} {}x{}: {} marks",
                im.name,
                gt.width,
                gt.height,
                gt.lesions.len()
            );
            assert!(gt.lesions.iter().all(|l| l.pixels.len() > 1));
            total += gt.lesions.len();
        }
        assert_eq!(total, 21);
        let healthy = ds.find("image0_training.jpg").unwrap();
        assert!(healthy.load_truth().unwrap().lesions.is_empty());
    }
}
