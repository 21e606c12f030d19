//! The reference weights of a model set: the training weights (safetensors) each float
//! ONNX file was exported from, shipped beside the models and hashed in the signed
//! manifest (`[[reference_weights]]`), so the workstation's reference cascade
//! (`ma-trainer validate`, libtorch) runs exactly the networks the device runs (tract).
//! The device never loads them.
//!
//! Weights are only ever attached with proof: exported again here, they must give the set's
//! float ONNX file byte for byte.

use std::path::Path;

use anyhow::{Context, Result, bail};
use prost::Message;
use tch::nn::VarStore;

use ma_core::digest::sha256_hex;
use ma_core::manifest::{Manifest, Role, Variant, WeightsEntry};

use super::WeightFormat;
use crate::nets::Stage;

/// File name of a role's reference weights inside the models folder.
pub fn file_name(role: Role) -> String {
    format!("{role}.safetensors")
}

/// The weights of `role` at `path`, in a var store.
pub fn load(role: Role, path: &Path) -> Result<VarStore> {
    Ok(match role {
        Role::Stage1 => crate::train::load_net(path, Stage::Candidates)?.0,
        Role::Stage2 => crate::train::load_net(path, Stage::Verdict)?.0,
        Role::Referral => crate::referral::load(path)?.0,
        Role::Zoom => crate::zoom::load(path)?.0,
    })
}

/// The float ONNX bytes `vs` (the weights of `role`) export to with `manifest`'s settings.
pub fn float_onnx(role: Role, vs: &VarStore, manifest: &Manifest) -> Result<Vec<u8>> {
    let format = WeightFormat::Float;
    let referral = || {
        manifest
            .referral
            .as_ref()
            .context("the model set has no [referral] section")
    };
    let model = match role {
        Role::Stage1 => super::onnx_model(Stage::Candidates, vs, format)?,
        Role::Stage2 => super::onnx_model(Stage::Verdict, vs, format)?,
        Role::Referral => super::referral::onnx_model(vs, referral()?.input_side, format)?,
        Role::Zoom => {
            let zoom = referral()?
                .zoom
                .as_ref()
                .context("the model set has no [referral.zoom] section")?;
            super::referral::zoom_onnx_model(vs, zoom.crop_side, format)?
        }
    };
    Ok(model.encode_to_vec())
}

/// Copies the weights of `role` at `source` into the set (`<role>.safetensors` beside the
/// manifest) and lists them in `manifest` (replacing an earlier entry), after checking that
/// they export to the set's float ONNX file of `role` byte for byte. The manifest is not
/// written here.
pub fn attach(manifest: &mut Manifest, role: Role, source: &Path) -> Result<()> {
    let vs = load(role, source)?;
    let entry = manifest.entry(role, Variant::Float)?.clone();
    let shipped = manifest.verify_file(&entry)?;
    if float_onnx(role, &vs, manifest)? != shipped {
        bail!(
            "{} are not the weights {} was exported from (exported again they give another \
             file); attach the weights of that release",
            source.display(),
            manifest.path_of(&entry).display()
        );
    }
    let file = file_name(role);
    let target = manifest.dir.join(&file);
    let bytes = std::fs::read(source).with_context(|| format!("reading {}", source.display()))?;
    // Same file already in place (attaching again) is fine; anything else is replaced.
    if std::fs::read(&target).ok().as_deref() != Some(bytes.as_slice()) {
        std::fs::write(&target, &bytes).with_context(|| format!("writing {}", target.display()))?;
    }
    manifest.reference_weights.retain(|e| e.role != role);
    manifest.reference_weights.push(WeightsEntry {
        role,
        file,
        sha256: sha256_hex(&bytes),
    });
    manifest.reference_weights.sort_by_key(|e| {
        [Role::Stage1, Role::Stage2, Role::Referral, Role::Zoom]
            .iter()
            .position(|r| *r == e.role)
    });
    Ok(())
}
