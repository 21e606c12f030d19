//! Detections and the `detect` JSONL line format (`shared/docs/CONTRACTS.md` section 1).
//!
//! Outside tools parse these lines: fields may be added (optional), never renamed or dropped.

use std::io::BufRead;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// One candidate microaneurysm, in original-image pixel coordinates
/// (x to the right, y down, pixel centres at integers).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub x: f64,
    pub y: f64,
    /// In [0, 1]; higher is more likely an MA.
    pub score: f64,
}

/// The result line for an image that was processed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageDetections {
    /// Path relative to `--input` (the file name when `--input` is a file).
    pub image: String,
    pub width: u32,
    pub height: u32,
    /// Best first.
    pub detections: Vec<Detection>,
    pub elapsed_ms: f64,
    /// The referral network's answer, when the model set has one: its fields sit beside
    /// the others on the line (`shared/docs/CONTRACTS.md` section 3).
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub referral: Option<ReferralFields>,
}

/// The optional referral fields of a result line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReferralFields {
    /// In [0, 1], higher = more likely referable DR (moderate or worse).
    pub refer_score: f64,
    /// The refer decision of the model set's rule (referral score and MA findings).
    pub refer: bool,
    /// The strongest attention regions, strongest first, in original pixels.
    pub attention_boxes: Vec<crate::referral::AttentionBox>,
}

/// The line for an image that could not be read or processed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageFailure {
    pub image: String,
    /// One line, no newline.
    pub error: String,
}

/// One line of a `detect` output file.
#[derive(Clone, Debug, PartialEq)]
pub enum DetectLine {
    Ok(ImageDetections),
    Failed(ImageFailure),
}

impl DetectLine {
    pub fn image(&self) -> &str {
        match self {
            DetectLine::Ok(d) => &d.image,
            DetectLine::Failed(f) => &f.image,
        }
    }

    /// Serialise as one JSON line (without the trailing newline).
    pub fn to_json_line(&self) -> String {
        let json = match self {
            DetectLine::Ok(d) => serde_json::to_string(d),
            DetectLine::Failed(f) => serde_json::to_string(f),
        };
        json.expect("detection lines contain only plain numbers and strings")
    }

    /// Parse one line; an object with an `error` field is a failure line.
    pub fn parse(line: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(line).context("not valid JSON")?;
        if value.get("error").is_some() {
            Ok(DetectLine::Failed(
                serde_json::from_value(value).context("malformed error line")?,
            ))
        } else {
            let d: ImageDetections =
                serde_json::from_value(value).context("malformed detection line")?;
            for (i, det) in d.detections.iter().enumerate() {
                if !(det.x.is_finite() && det.y.is_finite() && det.score.is_finite()) {
                    bail!("detection {i} of {:?} has a non-finite value", d.image);
                }
            }
            Ok(DetectLine::Ok(d))
        }
    }
}

/// Read a whole `detect` output file; errors name the file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<DetectLine>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open detections file {}", path.display()))?;
    let mut lines = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        lines.push(
            DetectLine::parse(&line)
                .with_context(|| format!("{} line {}", path.display(), n + 1))?,
        );
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_line_kinds() {
        let ok = DetectLine::Ok(ImageDetections {
            image: "a/b.png".into(),
            width: 1500,
            height: 1152,
            detections: vec![Detection {
                x: 733.4,
                y: 564.0,
                score: 0.97,
            }],
            elapsed_ms: 812.5,
            referral: None,
        });
        let failed = DetectLine::Failed(ImageFailure {
            image: "c.jpg".into(),
            error: "truncated".into(),
        });
        for line in [ok, failed] {
            assert_eq!(DetectLine::parse(&line.to_json_line()).unwrap(), line);
        }
    }

    #[test]
    fn parses_the_contract_example() {
        let line = r#"{"image": "resources/images/ddb1_fundusimages/image001.png", "width": 1500, "height": 1152,
 "detections": [{"x": 733.4, "y": 564.0, "score": 0.97}], "elapsed_ms": 812.5}"#
            .replace('\n', "");
        let DetectLine::Ok(d) = DetectLine::parse(&line).unwrap() else {
            panic!("expected a detection line");
        };
        assert_eq!(d.detections.len(), 1);
        assert_eq!(d.width, 1500);
    }

    #[test]
    fn rejects_lines_missing_fields() {
        assert!(DetectLine::parse(r#"{"image": "a.png"}"#).is_err());
        assert!(DetectLine::parse("not json").is_err());
    }
}
