//! Building a [`Station`] from a board config: the cascade (signature and hashes
//! checked), the frame source, the panel and the records log. Each part is built here and
//! nowhere else, and an error names the setting or file at fault.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ma_core::manifest::{self, Variant};
use ma_core::signing::ModelTrust;

use crate::archive::FrameArchive;
use crate::board::{self, BoardConfig, DisplayConfig, SourceConfig};
use crate::capture::trigger::TriggerInput;
use crate::capture::{
    self, CameraConfig, CameraSource, FolderSource, FrameSource, V4l2Capture, V4l2Config,
};
use crate::cascade::Cascade;
use crate::controls::Toggle;
use crate::display::{FramebufferSink, Panel, PngSink};
use crate::errln;
use crate::records::{OpenReport, RecordLog};
use crate::run_loop::{DisplayTarget, Station};

impl Station {
    /// Builds every part a board config names: the cascade (from `inference.models`, with
    /// its hashes checked, `inference.threads` threads), the source, the panel and the
    /// records log (created if missing; what opening it found is returned, e.g. a torn
    /// final record that was cut off). Errors name the setting or file at fault. Models
    /// are loaded first, so a board without models fails before anything is written.
    ///
    /// The model bundle must be signed by the key in `inference.public_key`; with
    /// `allow_unsigned` (development) the signature is not checked and every record and
    /// screen says `UNSIGNED`.
    pub fn from_board(config: &BoardConfig, allow_unsigned: bool) -> Result<(Station, OpenReport)> {
        let trust = model_trust(config, allow_unsigned)?;
        let camera = match &config.source {
            SourceConfig::Camera(c) => Some(camera_parts(c)?),
            _ => None,
        };
        let detector = load_cascade(
            &config.inference.models,
            config.inference.variant,
            config.inference.threads,
            &trust,
        )?;
        let threshold = detector
            .manifest
            .operating_points
            .threshold(config.inference.operating_point);

        let source: Box<dyn FrameSource> = match &config.source {
            #[cfg(feature = "synthetic")]
            SourceConfig::Synthetic(s) => Box::new(crate::capture::SyntheticSource::new(
                ma_synthetic::SyntheticParams::default(),
                s.seed,
                u64::from(s.count),
            )),
            #[cfg(not(feature = "synthetic"))]
            SourceConfig::Synthetic(_) => bail!(
                "source.kind \"synthetic\": this ma-device was built without the `synthetic` \
                 feature (build it with `--features synthetic`, or use a folder or camera source)"
            ),
            SourceConfig::Folder(f) => {
                let root = f.folder();
                Box::new(
                    FolderSource::new(root, f.repeat)
                        .with_context(|| format!("source.path {}", root.display()))?,
                )
            }
            SourceConfig::Camera(_) => {
                let (v4l2, trigger, camera_config) = camera.expect("built above");
                Box::new(CameraSource::new(
                    V4l2Capture::new(v4l2),
                    &trigger,
                    camera_config,
                ))
            }
        };

        let (panel, display): (Box<dyn Panel>, DisplayTarget) = match &config.display {
            DisplayConfig::Png {
                output_dir,
                width,
                height,
            } => (
                Box::new(PngSink::new(output_dir, *width, *height).context("display.output_dir")?),
                DisplayTarget::PngFolder(output_dir.clone()),
            ),
            DisplayConfig::Framebuffer {
                device,
                width,
                height,
            } => {
                let sink = FramebufferSink::open(device).context("display.device")?;
                if sink.size() != (*width, *height) {
                    let (w, h) = sink.size();
                    errln!(
                        "warning: {} is {w}x{h}, the board config says {width}x{height}; \
                         drawing at {w}x{h}",
                        device.display()
                    );
                }
                (Box::new(sink), DisplayTarget::Framebuffer(device.clone()))
            }
        };

        let heatmap_toggle = heatmap_toggle(&config.controls)?;
        let archive = match config.records.archive() {
            Some((dir, budget)) => {
                let (archive, found) = FrameArchive::open(dir, budget).context("records.frames")?;
                errln!(
                    "frames archive {}: {} frames, {:.1} of {} MiB{}",
                    dir.display(),
                    found.frames,
                    found.bytes as f64 / f64::from(1 << 20),
                    budget >> 20,
                    if found.removed_incomplete > 0 {
                        format!(
                            "; removed {} incomplete frame file(s) of an interrupted write",
                            found.removed_incomplete
                        )
                    } else {
                        String::new()
                    }
                );
                Some(archive)
            }
            None => None,
        };
        let (log, report) = RecordLog::open(&config.records.log).context("records.log")?;
        let station = Station {
            source,
            detector: Box::new(detector),
            panel,
            display,
            log,
            board: config.name.clone(),
            operating_point: config.inference.operating_point,
            threshold,
            heatmap: config.controls.heatmap,
            heatmap_toggle,
            archive,
        };
        Ok((station, report))
    }
}

/// Loads the cascade for the device, with an explicit message when the folder holds no
/// model set (the usual case on a fresh clone before models are shipped).
pub fn load_cascade(
    models: &Path,
    variant: Option<Variant>,
    threads: usize,
    trust: &ModelTrust,
) -> Result<Cascade> {
    let manifest_path = models.join(manifest::FILE_NAME);
    if !manifest_path.is_file() {
        bail!(
            "no models: {} does not exist. The models folder {} (inference.models in the \
             board config) must hold manifest.toml and the ONNX files it lists; export a set \
             with `ma-trainer export --out {}` or point inference.models at a folder that \
             holds one",
            manifest_path.display(),
            models.display(),
            models.display()
        );
    }
    crate::cascade::onnx::set_threads(threads);
    Cascade::load(models, variant, trust)
        .with_context(|| format!("cannot load the models in {}", models.display()))
}

/// What a board accepts: bundles signed by `inference.public_key`, or anything with
/// `allow_unsigned`. A board without a key refuses to start unless `allow_unsigned`.
pub fn model_trust(config: &BoardConfig, allow_unsigned: bool) -> Result<ModelTrust> {
    if allow_unsigned {
        return Ok(ModelTrust::Unsigned);
    }
    match &config.inference.public_key {
        Some(key) => ModelTrust::key_file(key).context("inference.public_key"),
        None => bail!(
            "inference.public_key is not set: a device only runs model bundles signed by the \
             key it names (e.g. public_key = \"keys/models.pub\", the release key). Set it, \
             or pass --allow-unsigned for development"
        ),
    }
}

/// The V4L2 settings, trigger and retry behaviour of a camera board config.
fn camera_parts(c: &board::CameraSource) -> Result<(V4l2Config, capture::Trigger, CameraConfig)> {
    let format = match c.format {
        board::PixelFormat::Yuyv => capture::PixelFormat::Yuyv,
        board::PixelFormat::Mjpeg => capture::PixelFormat::Mjpeg,
    };
    let trigger = capture_trigger(&c.trigger, "source.trigger")?;
    let retry = CameraConfig {
        initial_backoff: Duration::from_millis(c.retry_backoff_ms.initial),
        max_backoff: Duration::from_millis(c.retry_backoff_ms.max),
        ..CameraConfig::default()
    };
    Ok((
        V4l2Config::new(&c.device, format, c.width, c.height),
        trigger,
        retry,
    ))
}

/// The capture-side form of a board trigger; `key` names the setting in errors.
fn capture_trigger(t: &board::Trigger, key: &str) -> Result<capture::Trigger> {
    Ok(match t {
        board::Trigger::Key {} => capture::Trigger::Key,
        board::Trigger::Interval { seconds } => capture::Trigger::Interval(
            Duration::try_from_secs_f64(*seconds)
                .with_context(|| format!("{key}.seconds ({seconds}) is not a usable duration"))?,
        ),
        board::Trigger::Gpio { chip, line } => capture::Trigger::Gpio {
            chip: gpio_chip_number(chip, key)?,
            line: line.with_context(|| format!("{key}.line is required for kind \"gpio\""))?,
        },
    })
}

/// The heatmap toggle of `[controls]`, watched from now on (`None` without one).
fn heatmap_toggle(controls: &board::ControlsConfig) -> Result<Option<Toggle>> {
    let Some(t) = &controls.heatmap_toggle else {
        return Ok(None);
    };
    let key = "controls.heatmap_toggle";
    let input = TriggerInput::toggle(&capture_trigger(t, key)?, key)?;
    Ok(Some(Toggle::watch(input).context(key)?))
}

/// N of `/dev/gpiochipN`; `key` names the setting in errors.
fn gpio_chip_number(chip: &Path, key: &str) -> Result<u32> {
    chip.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("gpiochip"))
        .and_then(|n| n.parse().ok())
        .with_context(|| {
            format!(
                "{key}.chip must name a GPIO chip device like /dev/gpiochip0, got {}",
                chip.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpio_chip_and_config_errors_name_the_setting() {
        assert_eq!(
            gpio_chip_number(Path::new("/dev/gpiochip3"), "source.trigger").unwrap(),
            3
        );
        let e = format!(
            "{:#}",
            gpio_chip_number(Path::new("/dev/gpio"), "source.trigger").unwrap_err()
        );
        assert!(e.contains("source.trigger.chip"), "{e}");
        let bad_button = board::ControlsConfig {
            heatmap: false,
            heatmap_toggle: Some(board::Trigger::Gpio {
                chip: "/dev/gpio".into(),
                line: Some(3),
            }),
        };
        let e = format!("{:#}", heatmap_toggle(&bad_button).err().unwrap());
        assert!(e.contains("controls.heatmap_toggle.chip"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("no-models-here");
        let e = format!(
            "{:#}",
            load_cascade(&models, None, 1, &ModelTrust::Unsigned)
                .err()
                .unwrap()
        );
        assert!(
            e.contains("no-models-here") && e.contains("manifest.toml"),
            "{e}"
        );

        let config = |extra: &str| {
            BoardConfig::parse(&format!(
                "name = \"t\"\n[source]\nkind = \"synthetic\"\ncount = 1\n\
                 [display]\nkind = \"png\"\noutput_dir = \"{}\"\nwidth = 64\nheight = 48\n\
                 [inference]\nthreads = 1\nmodels = \"{}\"\noperating_point = \"1fp\"\n{extra}\
                 [records]\nlog = \"{}\"\n",
                dir.path().join("png").display(),
                models.display(),
                dir.path().join("r.log").display()
            ))
            .unwrap()
        };
        let e = format!(
            "{:#}",
            Station::from_board(&config(""), true).err().unwrap()
        );
        assert!(e.contains("no-models-here"), "{e}");
        // Nothing was written before the models were found missing.
        assert!(!dir.path().join("r.log").exists() && !dir.path().join("png").exists());
        // No key and no --allow-unsigned; a key file that is missing.
        for extra in ["", "public_key = \"missing.pub\"\n"] {
            let e = format!(
                "{:#}",
                Station::from_board(&config(extra), false).err().unwrap()
            );
            assert!(e.contains("inference.public_key"), "{e}");
            assert!(extra.is_empty() || e.contains("missing.pub"), "{e}");
            assert!(!extra.is_empty() || e.contains("--allow-unsigned"), "{e}");
        }
    }
}
