//! The shipped board configs parse and validate; mistakes in a config are rejected with the
//! offending key named.

use std::fs;
use std::path::{Path, PathBuf};

use ma_device::board::{BoardConfig, DisplayConfig, SourceConfig};

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../board-configs")
}

fn config_files() -> Vec<PathBuf> {
    let dir = configs_dir();
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_config_parses_and_validates() {
    let files = config_files();
    assert!(
        files.len() >= 4,
        "expected at least 4 board configs, found {files:?}"
    );
    for file in &files {
        let config = BoardConfig::load(file).unwrap_or_else(|e| panic!("{e:#}"));
        let stem = file.file_stem().unwrap().to_str().unwrap();
        assert_eq!(config.name, stem, "name of {}", file.display());
        assert!(!config.description.is_empty(), "{}", file.display());
    }
}

#[test]
fn desktop_sim_is_the_hardware_free_default() {
    let config = BoardConfig::load(configs_dir().join("desktop-sim.toml")).unwrap();
    // The main command of the README replays the demo photos, whose licence asks for the
    // attribution file beside them.
    let SourceConfig::Folder(folder) = &config.source else {
        panic!("desktop-sim replays demo photos: {:?}", config.source)
    };
    assert_eq!(folder.folder(), Path::new("demo/photos"));
    let demo = configs_dir().join("../demo/photos");
    let attribution = fs::read_to_string(demo.join("ATTRIBUTION.md")).unwrap();
    for entry in fs::read_dir(&demo).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name != "ATTRIBUTION.md" {
            assert!(
                attribution.contains(&format!("`{name}`")),
                "{name} is not in the attribution"
            );
        }
    }
    assert!(matches!(config.display, DisplayConfig::Png { .. }));
    assert_eq!(config.display.size(), (800, 480));
    assert_eq!(config.inference.threads, 2);
    assert_eq!(config.inference.models, Path::new("models"));
    assert_eq!(config.records.log, Path::new("out/records.log"));
    // The desktop's heatmap key is the line "h" on the terminal.
    assert!(!config.controls.heatmap);
    assert_eq!(
        config.controls.heatmap_toggle,
        Some(ma_device::board::Trigger::Key {})
    );
}

#[test]
fn jetson_configs_use_camera_and_framebuffer() {
    for (name, threads) in [
        ("jetson-nano", 4),
        ("jetson-orin-nano", 6),
        ("jetson-xavier-nx", 6),
    ] {
        let config = BoardConfig::load(configs_dir().join(format!("{name}.toml"))).unwrap();
        assert!(matches!(config.source, SourceConfig::Camera(_)), "{name}");
        assert!(
            matches!(config.display, DisplayConfig::Framebuffer { .. }),
            "{name}"
        );
        assert_eq!(config.inference.threads, threads, "{name}");
        assert!(config.records.log.is_absolute(), "{name}");
    }
}

/// Writes the desktop config with `from` replaced by `to` and loads it.
fn load_modified(from: &str, to: &str) -> String {
    let text = fs::read_to_string(configs_dir().join("desktop-sim.toml")).unwrap();
    assert!(text.contains(from), "{from:?} not in desktop-sim.toml");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("modified.toml");
    fs::write(&path, text.replacen(from, to, 1)).unwrap();
    let err = BoardConfig::load(&path).expect_err("the modified config should be rejected");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("modified.toml"),
        "the file is not named: {msg}"
    );
    msg
}

fn camera_config(format: &str) -> String {
    let text = fs::read_to_string(configs_dir().join("jetson-nano.toml")).unwrap();
    text.replacen("format = \"mjpeg\"", &format!("format = \"{format}\""), 1)
}

#[test]
fn unknown_key_is_rejected_by_name() {
    let msg = load_modified("threads = 2", "threads = 2\nthread_count = 2");
    assert!(msg.contains("thread_count"), "{msg}");
    let msg = load_modified("[records]", "[records]\nrotate = true");
    assert!(msg.contains("rotate"), "{msg}");
    let msg = load_modified("loop = false", "loop = false\nframes = 3");
    assert!(msg.contains("frames"), "{msg}");
    let msg = load_modified("[display]", "[displays]\nx = 1\n[display]");
    assert!(msg.contains("displays"), "{msg}");
}

#[test]
fn wrong_enum_value_is_rejected_by_name() {
    let err = BoardConfig::parse(&camera_config("h264")).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("h264"), "{msg}");
    assert!(BoardConfig::parse(&camera_config("yuyv")).is_ok());

    let msg = load_modified("operating_point = \"2fp\"", "operating_point = \"3fp\"");
    assert!(msg.contains("3fp"), "{msg}");
    let msg = load_modified("kind = \"png\"", "kind = \"hdmi\"");
    assert!(msg.contains("hdmi"), "{msg}");
}

#[test]
fn zero_threads_is_rejected_by_name() {
    let msg = load_modified("threads = 2", "threads = 0");
    assert!(msg.contains("threads"), "{msg}");
}

#[test]
fn missing_file_is_named() {
    let err = BoardConfig::load("no/such/board.toml").unwrap_err();
    assert!(format!("{err:#}").contains("no/such/board.toml"));
}

#[test]
fn systemd_unit_runs_the_installed_board() {
    let unit = fs::read_to_string(configs_dir().join("ma-device.service")).unwrap();
    for line in [
        "ExecStart=/usr/local/bin/ma-device run --board /etc/ma-device/board.toml",
        "Restart=on-failure",
        "StateDirectory=ma-device",
        "KillSignal=SIGTERM",
        "User=ma-device",
    ] {
        assert!(unit.lines().any(|l| l == line), "missing {line:?}");
    }
    let timeout = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec");
    assert!(timeout.parse::<u32>().unwrap() >= 30, "{timeout}");
}
