//! Cross-crate tests live in `tests/tests/`; this library holds the fixtures they share.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use ma_core::manifest::{Role, Training, Variant};
use ma_core::signing::{self, KeyPair};
use ma_trainer::export::{Release, export_model_set, weights, write_unsigned};
use ma_trainer::nets::{Net, Stage};
use ma_trainer::training_data::DeviceSettings;

/// Export a model set of untrained networks (seeded) into `out`: real ONNX files and a
/// manifest with hashes, in seconds, for tests of what surrounds the cascade (the loop,
/// bad inputs) rather than its accuracy. `operating_points`: scores at 1, 2 and 4 FP/image.
///
/// The networks' weights are attached as the set's reference weights (`validate` runs
/// them). The bundle is signed, as a device requires, with a fresh key pair written beside it
/// (`<out>-key.key`, `<out>-key.pub`, replaced if present). Returns the public key's path.
pub fn export_untrained_models(
    out: &Path,
    seed: i64,
    version: &str,
    operating_points: [f64; 3],
) -> PathBuf {
    export_untrained(out, seed, version, operating_points, None)
}

/// [`export_untrained_models`] with an untrained referral network of input side `side`
/// and its zoom-in crop classifier added (refer rule: `refer_score >= 0.5`), signed the
/// same way. The two networks' weights are written beside the set too
/// ([`untrained_referral_weights`]), for workstation commands on the same networks.
pub fn export_untrained_models_with_referral(
    out: &Path,
    seed: i64,
    version: &str,
    operating_points: [f64; 3],
    side: usize,
) -> PathBuf {
    export_untrained(out, seed, version, operating_points, Some(side))
}

fn export_untrained(
    out: &Path,
    seed: i64,
    version: &str,
    operating_points: [f64; 3],
    referral_side: Option<usize>,
) -> PathBuf {
    tch::manual_seed(seed);
    let stage1 = tch::nn::VarStore::new(tch::Device::Cpu);
    let _net1 = Net::new(&stage1.root(), Stage::Candidates);
    let stage2 = tch::nn::VarStore::new(tch::Device::Cpu);
    let _net2 = Net::new(&stage2.root(), Stage::Verdict);
    let training = Training {
        data: format!("none (untrained, {version})"),
        images: 0,
        licence: "test fixture".into(),
        cv_cpm: 0.0,
    };
    let mut manifest = export_model_set(
        &stage1,
        &stage2,
        out,
        &Release {
            version: version.to_string(),
            default_variant: Variant::Float,
            operating_points,
            training,
            settings: DeviceSettings::default(),
        },
    )
    .expect("exporting an untrained model set");
    // The reference weights, as `ma-trainer export` attaches them.
    for (role, vs) in [(Role::Stage1, &stage1), (Role::Stage2, &stage2)] {
        let path = out.join(weights::file_name(role));
        vs.save(&path).expect("saving the weights");
        weights::attach(&mut manifest, role, &path).expect("attaching the weights");
    }
    write_unsigned(&manifest, out).expect("writing the manifest");
    if let Some(side) = referral_side {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let _net = ma_trainer::referral::ReferralNet::new(&vs.root());
        // With the zoom-in step, so every referral test runs it too.
        let zoom = tch::nn::VarStore::new(tch::Device::Cpu);
        let _zoom_net = ma_trainer::zoom::ZoomNet::new(&zoom.root());
        let cfg = ma_core::referral::ReferralConfig {
            input_side: side,
            attention_stride: ma_trainer::nets::REFERRAL_STRIDE,
            boxes: 4,
            rule: ma_core::referral::ReferRule {
                score_threshold: 0.5,
                ma_count: None,
                operating_point: None,
            },
            training_data: "none (untrained)".into(),
            cv_auc: 0.5,
            zoom: Some(ma_core::referral::ZoomConfig {
                crops: 4,
                crop_cells: 1.5,
                crop_side: ma_trainer::nets::ZOOM_CROP,
            }),
        };
        let mut manifest =
            ma_trainer::export::referral::add_to_model_set(&vs, Some(&zoom), out, &cfg, version)
                .expect("adding an untrained referral network");
        let (referral_weights, zoom_weights) = untrained_referral_weights(out);
        vs.save(&referral_weights)
            .expect("saving the referral weights");
        zoom.save(&zoom_weights).expect("saving the zoom weights");
        weights::attach(&mut manifest, Role::Referral, &referral_weights)
            .expect("attaching the referral weights");
        weights::attach(&mut manifest, Role::Zoom, &zoom_weights)
            .expect("attaching the zoom weights");
        write_unsigned(&manifest, out).expect("writing the manifest");
    }
    let name = out
        .file_name()
        .expect("models folder name")
        .to_string_lossy();
    let stem = out.with_file_name(format!("{name}-key"));
    for ext in ["key", "pub"] {
        let _ = std::fs::remove_file(stem.with_extension(ext));
    }
    let pair = KeyPair::generate().expect("key pair");
    let (_, public) = pair.write(&stem).expect("writing the test key pair");
    signing::sign_manifest(out, &pair.secret).expect("signing the test bundle");
    public
}

/// Where [`export_untrained_models_with_referral`] writes the referral network's and the
/// crop classifier's weights for the set in `out`: beside it, `<out>-referral.safetensors`
/// and `<out>-zoom.safetensors`.
pub fn untrained_referral_weights(out: &Path) -> (PathBuf, PathBuf) {
    let name = out
        .file_name()
        .expect("models folder name")
        .to_string_lossy();
    (
        out.with_file_name(format!("{name}-referral.safetensors")),
        out.with_file_name(format!("{name}-zoom.safetensors")),
    )
}

/// The `ma-device` binary of this checkout and test profile, built if stale (a binary of
/// another package is not in `CARGO_BIN_EXE_*`). `MA_DEVICE_BIN` overrides it.
pub fn ma_device_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("MA_DEVICE_BIN") {
            return PathBuf::from(bin);
        }
        // Tests run from <target>/<profile>/deps/.
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().and_then(Path::parent).unwrap();
        let target_dir = profile_dir.parent().unwrap();
        let profile = profile_dir.file_name().unwrap().to_str().unwrap();
        let profile = if profile == "debug" { "dev" } else { profile };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let out = Command::new(cargo)
            .current_dir(workspace)
            .args(["build", "-p", "ma-device", "--bin", "ma-device"])
            .args([
                "--profile",
                profile,
                "--message-format=json-render-diagnostics",
            ])
            .arg("--target-dir")
            .arg(target_dir)
            .stderr(Stdio::inherit())
            .output()
            .expect("cannot run cargo to build ma-device");
        assert!(out.status.success(), "cargo build -p ma-device failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "ma-device")
            .find_map(|v| v["executable"].as_str().map(PathBuf::from))
            .expect("cargo did not report the ma-device executable")
    })
}

/// Small synthetic fundus photos' parameters (320x288, 3 MAs, 2 look-alikes): big enough
/// for the cascade, cheap to run.
pub fn small_fundus_params() -> ma_synthetic::SyntheticParams {
    ma_synthetic::SyntheticParams {
        width: 320,
        height: 288,
        fov_diameter: 300.0,
        n_microaneurysms: 3,
        n_lookalikes: 2,
        ..ma_synthetic::SyntheticParams::default()
    }
}

/// Makes `command` run with a file size limit of `bytes` (RLIMIT_FSIZE, what a full disk
/// is for the writer) and SIGXFSZ ignored, so a write past it fails with EFBIG instead of
/// killing the process.
pub fn limit_file_size(command: &mut Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
