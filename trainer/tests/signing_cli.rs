//! `ma-trainer keygen` and `ma-trainer sign`: a key pair is made once and never
//! overwritten, a bundle is signed only when every file matches its manifest, and the
//! signature is what the device checks.

use std::path::Path;
use std::process::{Command, Output};

use ma_core::manifest::{Manifest, Training, Variant};
use ma_core::signing::ModelTrust;
use ma_trainer::export::{Release, export_model_set};
use ma_trainer::nets::{Net, Stage};
use ma_trainer::training_data::DeviceSettings;

fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ma-trainer"))
        .args(args)
        .output()
        .expect("running ma-trainer")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An untrained model set in `dir` (unsigned).
fn bundle(dir: &Path) {
    tch::manual_seed(3);
    let vs1 = tch::nn::VarStore::new(tch::Device::Cpu);
    let _n1 = Net::new(&vs1.root(), Stage::Candidates);
    let vs2 = tch::nn::VarStore::new(tch::Device::Cpu);
    let _n2 = Net::new(&vs2.root(), Stage::Verdict);
    let training = Training {
        data: "none".into(),
        images: 0,
        licence: "test".into(),
        cv_cpm: 0.0,
    };
    export_model_set(
        &vs1,
        &vs2,
        dir,
        &Release {
            version: "sign-test".to_string(),
            default_variant: Variant::Int8,
            operating_points: [0.9, 0.8, 0.7],
            training,
            settings: DeviceSettings::default(),
        },
    )
    .unwrap();
}

#[test]
fn keygen_then_sign_gives_a_bundle_the_device_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let stem = tmp.path().join("keys/release");
    let stem_s = stem.to_str().unwrap();
    let out = trainer(&["keygen", "--out", stem_s]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("SECRET"), "{}", text(&out));
    let (key, public) = (stem.with_extension("key"), stem.with_extension("pub"));
    let before = std::fs::read(&key).unwrap();
    // A second keygen must not destroy the key that signed released models.
    let out = trainer(&["keygen", "--out", stem_s]);
    assert!(!out.status.success());
    assert!(text(&out).contains("already exists"), "{}", text(&out));
    assert_eq!(std::fs::read(&key).unwrap(), before);

    let models = tmp.path().join("models");
    bundle(&models);
    let trust = ModelTrust::key_file(&public).unwrap();
    let err = format!("{:#}", Manifest::load_trusted(&models, &trust).unwrap_err());
    assert!(err.contains("not signed"), "{err}");

    let models_s = models.to_str().unwrap();
    let out = trainer(&["sign", "--models", models_s, "--key", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let m = Manifest::load_trusted(&models, &trust).unwrap();
    assert_eq!(m.version, "sign-test");

    // Re-exporting replaces the manifest: the old signature is removed with it, so the
    // bundle is plainly unsigned rather than carrying a signature that no longer fits.
    bundle(&models);
    assert!(!models.join("manifest.toml.sig").exists());

    // A bundle whose file no longer matches its manifest is not signed.
    let file = models.join(&m.models[0].file);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[10] ^= 0x01;
    std::fs::write(&file, bytes).unwrap();
    let out = trainer(&["sign", "--models", models_s, "--key", key.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains(&m.models[0].file), "{}", text(&out));
    assert!(!models.join("manifest.toml.sig").exists());

    // A public key is not a signing key, and is named as the wrong kind of file.
    bundle(&models);
    let out = trainer(&[
        "sign",
        "--models",
        models_s,
        "--key",
        public.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("secret key file") && text(&out).contains("SECRET key"),
        "{}",
        text(&out)
    );
    assert!(!models.join("manifest.toml.sig").exists());
}
