//! Board configs: one TOML file per supported board (`board-configs/`), naming where frames
//! come from, where results are shown, how inference runs and where records are logged.
//!
//! Every table rejects unknown keys (`deny_unknown_fields`), so a misspelt key fails loudly
//! instead of silently leaving a default in place. After parsing, [`BoardConfig::validate`]
//! checks what types cannot (counts >= 1, sizes > 0, keys a `kind` needs) and names the
//! offending setting.
//!
//! **Relative paths** in a config (folder source, PNG output, models, public key, records log)
//! are used as written, i.e. relative to the *current working directory* of the process, not
//! to the config file: `cargo run` runs from the repository root, so `models` and
//! `out/records.log` mean the repository's. Installed boards use absolute paths.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

/// Largest panel side accepted (`display.width`, `display.height`): a canvas is allocated
/// at the configured size before anything is shown, so 100000 x 100000 used to abort the
/// process (30 GB) instead of naming the key.
pub const MAX_PANEL_SIDE: u32 = 8192;
/// Longest trigger interval (`source.trigger.seconds`): one day. Larger values overflow
/// the clock arithmetic of the trigger.
pub const MAX_INTERVAL_SECONDS: f64 = 86_400.0;
/// Longest camera retry back-off (`source.retry_backoff_ms`): one hour. Larger values
/// overflow the clock arithmetic of the retry.
pub const MAX_BACKOFF_MS: u64 = 3_600_000;

/// One supported board.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardConfig {
    /// Short identifier, stored in every record (`Record::board`).
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub source: SourceConfig,
    pub display: DisplayConfig,
    pub inference: InferenceConfig,
    pub records: RecordsConfig,
    /// Optional: boards without it have no heatmap toggle and start with the overlay off.
    #[serde(default)]
    pub controls: ControlsConfig,
}

/// `[controls]`: keys and buttons besides the capture trigger.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlsConfig {
    /// Whether the referral network's attention heatmap is blended into the photo on the
    /// panel at start (model sets with a referral network).
    #[serde(default)]
    pub heatmap: bool,
    /// The key or button that turns the heatmap overlay on and off: `{ kind = "key" }` (the
    /// line `h` + Enter on stdin) or `{ kind = "gpio", chip = ..., line = N }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heatmap_toggle: Option<Trigger>,
}

/// Where frames come from (`[source]`, chosen by `kind`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SourceConfig {
    /// Generated fundus images (`ma_synthetic`): no hardware needed.
    Synthetic(SyntheticSource),
    /// Image files from a folder, in name order.
    Folder(FolderSource),
    /// A V4L2 camera (USB UVC).
    Camera(CameraSource),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticSource {
    /// Number of frames to generate (>= 1).
    pub count: u32,
    /// Seed of the first frame; frame i uses `seed + i`.
    #[serde(default)]
    pub seed: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FolderSource {
    /// Folder of images (required; relative to the current directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Start again from the first image after the last (`loop` in TOML).
    #[serde(rename = "loop", default)]
    pub repeat: bool,
}

impl FolderSource {
    /// The folder; present once the config is validated.
    pub fn folder(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraSource {
    /// V4L2 device node.
    #[serde(default = "default_video_device")]
    pub device: PathBuf,
    pub format: PixelFormat,
    pub width: u32,
    pub height: u32,
    /// What takes a picture.
    pub trigger: Trigger,
    /// Waiting time between attempts to (re)open a camera that is missing or failed.
    #[serde(default)]
    pub retry_backoff_ms: Backoff,
}

fn default_video_device() -> PathBuf {
    PathBuf::from("/dev/video0")
}

/// Pixel format requested from the camera.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelFormat {
    Yuyv,
    Mjpeg,
}

/// What makes the camera source take a frame (`trigger = { kind = ... }`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Trigger {
    /// Enter on the standard input (a terminal, or a USB pedal/keypad that types Enter).
    Key {},
    /// A rising edge on a GPIO line (shutter button).
    Gpio {
        /// GPIO character device.
        #[serde(default = "default_gpio_chip")]
        chip: PathBuf,
        /// Line offset on `chip` (required).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        line: Option<u32>,
    },
    /// A frame every `seconds` (> 0).
    Interval { seconds: f64 },
}

fn default_gpio_chip() -> PathBuf {
    PathBuf::from("/dev/gpiochip0")
}

/// Exponential back-off: starts at `initial`, doubles up to `max` (milliseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    pub initial: u64,
    pub max: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: 500,
            max: 30_000,
        }
    }
}

/// Where results are shown (`[display]`, chosen by `kind`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum DisplayConfig {
    /// Simulated panel: each screen is written as a PNG into `output_dir`.
    Png {
        output_dir: PathBuf,
        width: u32,
        height: u32,
    },
    /// Linux framebuffer panel.
    Framebuffer {
        #[serde(default = "default_fb_device")]
        device: PathBuf,
        width: u32,
        height: u32,
    },
}

fn default_fb_device() -> PathBuf {
    PathBuf::from("/dev/fb0")
}

impl DisplayConfig {
    /// Panel size in pixels (width, height).
    pub fn size(&self) -> (u32, u32) {
        match *self {
            DisplayConfig::Png { width, height, .. }
            | DisplayConfig::Framebuffer { width, height, .. } => (width, height),
        }
    }
}

/// `[inference]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceConfig {
    /// Worker threads for the CNNs (>= 1).
    pub threads: usize,
    /// Models folder holding the manifest.
    #[serde(default = "default_models")]
    pub models: PathBuf,
    /// Which of the manifest's FROC operating points sets the score threshold.
    pub operating_point: OperatingPoint,
    /// Which model files run: `"float"` or `"int8"` (int8 weights, 4x smaller files);
    /// default: the manifest's `default_variant`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<ma_core::manifest::Variant>,
    /// Ed25519 public key file (`ma-trainer keygen`) the model bundle must be signed
    /// with. Required to run, unless `run --allow-unsigned` (development).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<PathBuf>,
}

fn default_models() -> PathBuf {
    PathBuf::from("models")
}

pub use ma_core::manifest::OperatingPoint;

/// `[records]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordsConfig {
    /// The append-only results log (`crate::records`); created with its folder if missing.
    pub log: PathBuf,
    /// The frames archive (`crate::archive`): every analysed frame is kept here, lossless,
    /// named by its SHA-256, before its record is written. Optional: without it no frame
    /// is kept and `records export --bundle` has no frames to export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames: Option<PathBuf>,
    /// The most the frames archive may hold, in MiB (required with `frames`): the oldest
    /// frames are deleted to stay within it, and the panel and log say so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames_budget_mb: Option<u64>,
}

/// Smallest frames budget accepted: a few photos.
pub const MIN_FRAMES_BUDGET_MB: u64 = 16;

impl RecordsConfig {
    /// The frames folder and its budget in bytes, when the board keeps frames (checked by
    /// [`BoardConfig::validate`]).
    pub fn archive(&self) -> Option<(&Path, u64)> {
        match (&self.frames, self.frames_budget_mb) {
            (Some(dir), Some(mb)) => Some((dir.as_path(), mb.saturating_mul(1 << 20))),
            _ => None,
        }
    }
}

impl BoardConfig {
    /// Reads, parses and validates the config at `path`. Errors name the file and the key
    /// (parse errors carry TOML's line and column).
    pub fn load(path: impl AsRef<Path>) -> Result<BoardConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading board config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("board config {}", path.display()))
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<BoardConfig> {
        let config: BoardConfig = toml::from_str(text).map_err(|e| anyhow!("{e}"))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the constraints the types do not express; the error names the setting.
    pub fn validate(&self) -> Result<()> {
        if self.name.trim().is_empty() {
            bail!("name must not be empty");
        }
        match &self.source {
            SourceConfig::Synthetic(s) => {
                if s.count == 0 {
                    bail!("source.count must be at least 1");
                }
            }
            SourceConfig::Folder(f) => match &f.path {
                None => bail!("source.path is required for source kind \"folder\""),
                Some(p) => non_empty_path(p, "source.path")?,
            },
            SourceConfig::Camera(c) => {
                non_empty_path(&c.device, "source.device")?;
                // A frame is decoded at this size; nothing larger is decoded anyway.
                bounded_size(c.width, c.height, ma_core::image_io::MAX_SIDE, "source")?;
                if c.retry_backoff_ms.initial == 0 {
                    bail!("source.retry_backoff_ms.initial must be > 0");
                }
                if c.retry_backoff_ms.max > MAX_BACKOFF_MS {
                    bail!(
                        "source.retry_backoff_ms.max must be at most {MAX_BACKOFF_MS} (one hour), \
                         got {}",
                        c.retry_backoff_ms.max
                    );
                }
                if c.retry_backoff_ms.max < c.retry_backoff_ms.initial {
                    bail!(
                        "source.retry_backoff_ms.max ({}) must be >= initial ({})",
                        c.retry_backoff_ms.max,
                        c.retry_backoff_ms.initial
                    );
                }
                match &c.trigger {
                    Trigger::Key {} | Trigger::Gpio { .. } => {
                        validate_key_or_button(&c.trigger, "source.trigger")?
                    }
                    Trigger::Interval { seconds } => {
                        if !(seconds.is_finite() && *seconds > 0.0) {
                            bail!("source.trigger.seconds must be > 0 (got {seconds})");
                        }
                        if *seconds > MAX_INTERVAL_SECONDS {
                            bail!(
                                "source.trigger.seconds must be at most {MAX_INTERVAL_SECONDS} \
                                 (one day), got {seconds}"
                            );
                        }
                    }
                }
            }
        }
        match &self.display {
            DisplayConfig::Png { output_dir, .. } => {
                non_empty_path(output_dir, "display.output_dir")?
            }
            DisplayConfig::Framebuffer { device, .. } => non_empty_path(device, "display.device")?,
        }
        let (w, h) = self.display.size();
        bounded_size(w, h, MAX_PANEL_SIDE, "display")?;
        if let Some(toggle) = &self.controls.heatmap_toggle {
            validate_key_or_button(toggle, "controls.heatmap_toggle")?;
        }
        let max_threads = crate::cascade::onnx::MAX_THREADS;
        if self.inference.threads == 0 || self.inference.threads > max_threads {
            bail!(
                "inference.threads must be 1 to {max_threads} (got {})",
                self.inference.threads
            );
        }
        non_empty_path(&self.inference.models, "inference.models")?;
        if let Some(k) = &self.inference.public_key {
            non_empty_path(k, "inference.public_key")?;
        }
        non_empty_path(&self.records.log, "records.log")?;
        match (&self.records.frames, self.records.frames_budget_mb) {
            (Some(dir), Some(mb)) => {
                non_empty_path(dir, "records.frames")?;
                if mb < MIN_FRAMES_BUDGET_MB {
                    bail!(
                        "records.frames_budget_mb must be at least {MIN_FRAMES_BUDGET_MB} \
                         (got {mb})"
                    );
                }
            }
            (Some(_), None) => bail!(
                "records.frames_budget_mb is required with records.frames: how many MiB the \
                 frames may take before the oldest are deleted (e.g. 4096)"
            ),
            (None, Some(_)) => {
                bail!("records.frames_budget_mb is set but records.frames (the folder) is not")
            }
            (None, None) => {}
        }
        Ok(())
    }
}

/// A key or a GPIO button with its line; `key` names the setting (`source.trigger`).
fn validate_key_or_button(trigger: &Trigger, key: &str) -> Result<()> {
    match trigger {
        Trigger::Key {} => Ok(()),
        Trigger::Gpio { chip, line } => {
            non_empty_path(chip, &format!("{key}.chip"))?;
            if line.is_none() {
                bail!("{key}.line is required for kind \"gpio\"");
            }
            Ok(())
        }
        Trigger::Interval { .. } => bail!(
            "{key}: kind \"interval\" is not a key or a button; use {{ kind = \"key\" }} or \
             {{ kind = \"gpio\", chip = \"/dev/gpiochip0\", line = N }}"
        ),
    }
}

fn non_empty_path(p: &Path, key: &str) -> Result<()> {
    if p.as_os_str().is_empty() {
        bail!("{key} must not be empty");
    }
    Ok(())
}

fn bounded_size(width: u32, height: u32, max: u32, table: &str) -> Result<()> {
    for (key, value) in [("width", width), ("height", height)] {
        if value == 0 || value > max {
            bail!("{table}.{key} must be 1 to {max} pixels, got {value}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "t"
[source]
kind = "synthetic"
count = 2
[display]
kind = "png"
output_dir = "out/display"
width = 800
height = 480
[inference]
threads = 1
operating_point = "2fp"
[records]
log = "out/records.log"
"#;

    fn with(replace: &str, by: &str) -> String {
        assert!(MINIMAL.contains(replace), "{replace}");
        MINIMAL.replacen(replace, by, 1)
    }

    fn err(text: &str) -> String {
        format!("{:#}", BoardConfig::parse(text).unwrap_err())
    }

    #[test]
    fn minimal_and_defaults() {
        let c = BoardConfig::parse(MINIMAL).unwrap();
        assert_eq!(c.inference.models, PathBuf::from("models"));
        assert_eq!(c.inference.public_key, None);
        assert_eq!(
            c.source,
            SourceConfig::Synthetic(SyntheticSource { count: 2, seed: 0 })
        );
        assert_eq!(c.display.size(), (800, 480));
        assert_eq!(c.inference.operating_point, OperatingPoint::Fp2);
    }

    #[test]
    fn camera_triggers() {
        let camera = |trigger: &str| {
            with(
                "kind = \"synthetic\"\ncount = 2",
                &format!(
                    "kind = \"camera\"\nformat = \"yuyv\"\nwidth = 640\nheight = 480\n\
                     trigger = {trigger}"
                ),
            )
        };
        let c = BoardConfig::parse(&camera("{ kind = \"gpio\", line = 7 }")).unwrap();
        let SourceConfig::Camera(cam) = &c.source else {
            panic!("{c:?}")
        };
        assert_eq!(cam.device, PathBuf::from("/dev/video0"));
        assert_eq!(cam.retry_backoff_ms, Backoff::default());
        assert_eq!(
            cam.trigger,
            Trigger::Gpio {
                chip: "/dev/gpiochip0".into(),
                line: Some(7)
            }
        );
        assert!(BoardConfig::parse(&camera("{ kind = \"key\" }")).is_ok());
        // An integer is accepted for seconds.
        assert!(BoardConfig::parse(&camera("{ kind = \"interval\", seconds = 5 }")).is_ok());
        assert!(err(&camera("{ kind = \"gpio\" }")).contains("source.trigger.line"));
        assert!(
            err(&camera("{ kind = \"interval\", seconds = 0.0 }"))
                .contains("source.trigger.seconds")
        );
        assert!(err(&camera("{ kind = \"key\", line = 3 }")).contains("line"));
        assert!(err(&camera("{ kind = \"pedal\" }")).contains("pedal"));
        assert!(
            err(&camera("{ kind = \"interval\", seconds = 1e300 }"))
                .contains("source.trigger.seconds")
        );
        let huge = camera("{ kind = \"key\" }").replace("width = 640", "width = 100000");
        assert!(err(&huge).contains("source.width"), "{}", err(&huge));
        let backoff = format!(
            "{}\n[source.retry_backoff_ms]\ninitial = 500\nmax = 18446744073709551615\n",
            camera("{ kind = \"key\" }")
        );
        // TOML allows the sub-table after the other tables.
        assert!(
            err(&backoff).contains("retry_backoff_ms"),
            "{}",
            err(&backoff)
        );
    }

    #[test]
    fn folder_needs_path() {
        let text = with(
            "kind = \"synthetic\"\ncount = 2",
            "kind = \"folder\"\nloop = true",
        );
        assert!(err(&text).contains("source.path"));
        let text = with(
            "kind = \"synthetic\"\ncount = 2",
            "kind = \"folder\"\npath = \"imgs\"\nloop = true",
        );
        let c = BoardConfig::parse(&text).unwrap();
        assert_eq!(
            c.source,
            SourceConfig::Folder(FolderSource {
                path: Some("imgs".into()),
                repeat: true
            })
        );
    }

    #[test]
    fn semantic_errors_name_the_setting() {
        assert!(err(&with("threads = 1", "threads = 0")).contains("inference.threads"));
        assert!(err(&with("width = 800", "width = 0")).contains("display.width"));
        // Sizes and counts that would allocate or overflow: bounded, the key named.
        assert!(err(&with("width = 800", "width = 100000")).contains("display.width"));
        assert!(err(&with("height = 480", "height = 100000")).contains("display.height"));
        assert!(BoardConfig::parse(&with("width = 800", "width = 8192")).is_ok());
        assert!(err(&with("width = 800", "width = 8193")).contains("8192"));
        assert!(err(&with("threads = 1", "threads = 100000")).contains("inference.threads"));
        assert!(err(&with("count = 2", "count = 0")).contains("source.count"));
        assert!(err(&with("name = \"t\"", "name = \"\"")).contains("name"));
    }

    #[test]
    fn controls_are_optional_and_take_a_key_or_a_button() {
        let c = BoardConfig::parse(MINIMAL).unwrap();
        assert_eq!(c.controls, ControlsConfig::default());
        let with_controls = |table: &str| format!("{MINIMAL}\n[controls]\n{table}\n");
        let c = BoardConfig::parse(&with_controls(
            "heatmap = true\nheatmap_toggle = { kind = \"key\" }",
        ))
        .unwrap();
        assert!(c.controls.heatmap);
        assert_eq!(c.controls.heatmap_toggle, Some(Trigger::Key {}));
        let c = BoardConfig::parse(&with_controls(
            "heatmap_toggle = { kind = \"gpio\", chip = \"/dev/gpiochip1\", line = 7 }",
        ))
        .unwrap();
        assert!(!c.controls.heatmap);
        assert!(matches!(
            c.controls.heatmap_toggle,
            Some(Trigger::Gpio { line: Some(7), .. })
        ));
        let e = err(&with_controls(
            "heatmap_toggle = { kind = \"interval\", seconds = 2.0 }",
        ));
        assert!(
            e.contains("controls.heatmap_toggle") && e.contains("not a key"),
            "{e}"
        );
        let e = err(&with_controls("heatmap_toggle = { kind = \"gpio\" }"));
        assert!(e.contains("controls.heatmap_toggle.line"), "{e}");
        assert!(err(&with_controls("heatmap = 1")).contains("heatmap"));
        assert!(err(&with_controls("overlay = true")).contains("overlay"));
    }

    #[test]
    fn unknown_keys_are_named() {
        assert!(
            err(&with("threads = 1", "threads = 1\nthread_count = 3")).contains("thread_count")
        );
        assert!(err(&with("count = 2", "count = 2\ncolour = 1")).contains("colour"));
        assert!(err(&with("width = 800", "width = 800\ndepth = 16")).contains("depth"));
        assert!(err(&format!("{MINIMAL}\n[extra]\nx = 1\n")).contains("extra"));
    }

    #[test]
    fn serialises_back_to_the_same_config() {
        let c = BoardConfig::parse(MINIMAL).unwrap();
        let text = toml::to_string(&c).unwrap();
        assert_eq!(BoardConfig::parse(&text).unwrap(), c);
    }
}
