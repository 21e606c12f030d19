//! Signed model bundles: a device runs only the models it was given.
//!
//! A model bundle is a models folder: `manifest.toml`, the ONNX files it lists (each with
//! its SHA-256) and `manifest.toml.sig`, an ed25519 signature of the manifest's exact
//! bytes. Checking that one signature and then each file's hash (as
//! [`Manifest::verify_file`](crate::manifest::Manifest::verify_file) always does) covers
//! every byte of the bundle, so a flipped byte anywhere, a swapped file or a bundle
//! signed with another key is refused before anything is parsed.
//!
//! Keys and signatures are small text files: `#` comment lines (what the file is, which
//! key) and one line of lower-case hex. `ma-trainer keygen` writes a key pair,
//! `ma-trainer export --sign KEY` signs, the board config's `inference.public_key` names
//! the key a device trusts.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::digest::sha256_hex;

/// The public half of the key that signs released model bundles.
const RELEASE_KEY: &str = include_str!("../../keys/models.pub");

/// File name of the manifest in a models folder: the file a signature covers.
pub const MANIFEST_FILE: &str = "manifest.toml";

/// File name of the manifest's signature, beside the manifest.
pub const SIGNATURE_FILE: &str = "manifest.toml.sig";

/// Which model bundles a device accepts.
// Made once per process: the unboxed key costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum ModelTrust {
    /// Only a manifest signed by this key (read from the named file, for messages).
    SignedBy { key: PublicKey },
    /// Development only (`--allow-unsigned`): the signature is not checked. The files'
    /// hashes still are.
    Unsigned,
}

impl ModelTrust {
    /// Trust the key in the file `path`.
    pub fn key_file(path: &Path) -> Result<Self> {
        Ok(Self::SignedBy {
            key: PublicKey::read(path)?,
        })
    }

    /// Trust the release key built into this binary ([`PublicKey::release`]).
    pub fn release() -> Self {
        Self::SignedBy {
            key: PublicKey::release(),
        }
    }
}

/// An ed25519 public key and where it came from.
#[derive(Clone)]
pub struct PublicKey {
    key: VerifyingKey,
    /// The file it was read from, or a description.
    pub source: String,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({} from {})", self.fingerprint(), self.source)
    }
}

/// An ed25519 secret key (kept out of `Debug` output).
pub struct SecretKey {
    key: SigningKey,
}

// The first line of each kind of file; checked on reading, so that a public key given
// where the secret key belongs (or the reverse) is named as such.
const PUBLIC_LABEL: &str = "ma-device model-signing public key (ed25519)";
const SECRET_LABEL: &str =
    "ma-device model-signing SECRET key (ed25519): never commit or copy to a device";
const SIGNATURE_LABEL: &str = "ma-device model bundle signature (ed25519)";

/// Short, stable name of a public key: the first 16 hex digits of its SHA-256.
fn fingerprint_of(key: &VerifyingKey) -> String {
    sha256_hex(key.as_bytes())[..16].to_string()
}

impl PublicKey {
    /// Read a public key file written by [`KeyPair::write`].
    pub fn read(path: &Path) -> Result<Self> {
        let text = read_small_file(path, "public key")?;
        Self::parse(&text, &format!("file {}", path.display()))
    }

    /// The key the project's released model bundles are signed with (`keys/models.pub`,
    /// built into the binary): what `detect` trusts unless told otherwise.
    pub fn release() -> Self {
        Self::parse(
            RELEASE_KEY,
            "the release key built into this binary (keys/models.pub)",
        )
        .expect("keys/models.pub is a valid public key file")
    }

    /// A public key from the text of a key file; `source` names it in messages.
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let bytes: [u8; 32] =
            parse_hex_text(text, PUBLIC_LABEL).with_context(|| format!("public key {source}"))?;
        let key = VerifyingKey::from_bytes(&bytes).with_context(|| {
            format!("public key {source}: 32 bytes that are not an ed25519 public key")
        })?;
        Ok(Self {
            key,
            source: source.to_string(),
        })
    }

    /// See [`fingerprint_of`].
    pub fn fingerprint(&self) -> String {
        fingerprint_of(&self.key)
    }

    /// Check `signature` over `message`. Strict verification: no malleable or weak-key
    /// signatures.
    fn verify(&self, message: &[u8], signature: &Signature) -> bool {
        self.key.verify_strict(message, signature).is_ok()
    }
}

impl SecretKey {
    /// Read a secret key file written by [`KeyPair::write`].
    pub fn read(path: &Path) -> Result<Self> {
        let seed: [u8; 32] = read_hex_file(path, "secret key", SECRET_LABEL)?;
        Ok(Self {
            key: SigningKey::from_bytes(&seed),
        })
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            key: self.key.verifying_key(),
            source: "the signing key".into(),
        }
    }
}

/// A fresh key pair.
pub struct KeyPair {
    pub secret: SecretKey,
}

impl KeyPair {
    /// A new key from the operating system's random source.
    pub fn generate() -> Result<Self> {
        let mut seed = [0u8; 32];
        // Key material straight from the OS, not from a user-space generator.
        rand::TryRngCore::try_fill_bytes(&mut rand::rngs::OsRng, &mut seed)
            .context("the operating system's random source failed")?;
        Ok(Self {
            secret: SecretKey {
                key: SigningKey::from_bytes(&seed),
            },
        })
    }

    /// Write `<stem>.key` (secret, mode 0600) and `<stem>.pub`; refuses to overwrite
    /// either, so a key that signed shipped models cannot be lost by a second `keygen`.
    /// Returns both paths. The extensions are appended, never substituted: a stem such as
    /// `release-0.4` gives `release-0.4.key`, not `release-0.key`.
    pub fn write(&self, stem: &Path) -> Result<(PathBuf, PathBuf)> {
        let with = |ext: &str| {
            let mut name = stem.as_os_str().to_owned();
            name.push(ext);
            PathBuf::from(name)
        };
        let (secret_path, public_path) = (with(".key"), with(".pub"));
        for p in [&secret_path, &public_path] {
            ensure!(
                !p.exists(),
                "{} already exists; a key pair is never overwritten (move it away first)",
                p.display()
            );
        }
        if let Some(dir) = stem.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the key folder {}", dir.display()))?;
        }
        let public = self.secret.public();
        let comment = format!("key {}", public.fingerprint());
        write_new_file(
            &secret_path,
            &hex_file(SECRET_LABEL, &comment, self.secret.key.as_bytes()),
            0o600,
        )?;
        write_new_file(
            &public_path,
            &hex_file(PUBLIC_LABEL, &comment, public.key.as_bytes()),
            0o644,
        )?;
        Ok((secret_path, public_path))
    }
}

/// Sign the manifest in `models_dir`: writes `manifest.toml.sig` beside it. Signs the
/// bytes on disk, so sign after the manifest is final.
pub fn sign_manifest(models_dir: &Path, key: &SecretKey) -> Result<PathBuf> {
    let manifest_path = models_dir.join(MANIFEST_FILE);
    let bytes = std::fs::read(&manifest_path)
        .with_context(|| format!("reading {} to sign it", manifest_path.display()))?;
    let signature = key.key.sign(&bytes);
    let sig_path = models_dir.join(SIGNATURE_FILE);
    let comment = format!(
        "signature of {} by key {}",
        MANIFEST_FILE,
        key.public().fingerprint()
    );
    let text = hex_file(SIGNATURE_LABEL, &comment, &signature.to_bytes());
    std::fs::write(&sig_path, text)
        .with_context(|| format!("writing the signature {}", sig_path.display()))?;
    Ok(sig_path)
}

/// The manifest's bytes from `models_dir`, returned only if `trust` accepts them: with a
/// key, `manifest.toml.sig` must be a valid signature of exactly these bytes. The caller
/// parses the returned bytes (never re-reads the file), so what was checked is what runs.
pub fn read_trusted_manifest(models_dir: &Path, trust: &ModelTrust) -> Result<Vec<u8>> {
    let manifest_path = models_dir.join(MANIFEST_FILE);
    let bytes = std::fs::read(&manifest_path)
        .with_context(|| format!("reading model manifest {}", manifest_path.display()))?;
    let ModelTrust::SignedBy { key } = trust else {
        return Ok(bytes);
    };
    let sig_path = models_dir.join(SIGNATURE_FILE);
    if !sig_path.exists() {
        bail!(
            "the model bundle in {} is not signed ({} is missing), and this device only \
             runs models signed by key {} ({}). Sign it with `ma-trainer export --sign \
             <KEY>`, or pass --allow-unsigned for development",
            models_dir.display(),
            sig_path.display(),
            key.fingerprint(),
            key.source
        );
    }
    let raw: [u8; 64] = read_hex_file(&sig_path, "signature", SIGNATURE_LABEL)?;
    let signature = Signature::from_bytes(&raw);
    if !key.verify(&bytes, &signature) {
        bail!(
            "the model bundle in {} is refused: {} is not a valid signature of {} by key {} \
             ({}). Either the manifest was changed after signing, or the bundle was signed \
             with another key",
            models_dir.display(),
            sig_path.display(),
            manifest_path.display(),
            key.fingerprint(),
            key.source
        );
    }
    Ok(bytes)
}

/// `# label`, `# comment`, then the bytes in hex.
fn hex_file(label: &str, comment: &str, bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("# {label}\n# {comment}\n{hex}\n")
}

/// The one non-comment line of `path`, decoded from hex into exactly `N` bytes; the file
/// must start with `# label`.
fn read_hex_file<const N: usize>(path: &Path, what: &str, label: &str) -> Result<[u8; N]> {
    let text = read_small_file(path, what)?;
    parse_hex_text(&text, label).with_context(|| format!("the {what} file {}", path.display()))
}

/// The text of a key or signature file (`what` names the kind in messages).
fn read_small_file(path: &Path, what: &str) -> Result<String> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("reading the {what} file {}", path.display()))?;
    // Key and signature files are a few hundred bytes; refuse a FIFO or a huge file
    // instead of blocking on or reading it.
    ensure!(
        meta.is_file() && meta.len() <= 4096,
        "the {what} file {} is not a small regular file",
        path.display()
    );
    std::fs::read_to_string(path)
        .with_context(|| format!("reading the {what} file {}", path.display()))
}

/// The one non-comment line of a key or signature file's text, decoded; the text must
/// start with `# label`.
fn parse_hex_text<const N: usize>(text: &str, label: &str) -> Result<[u8; N]> {
    let first = text.lines().next().unwrap_or_default().trim();
    ensure!(
        first.strip_prefix('#').map(str::trim) == Some(label),
        "its first line must be `# {label}`, found `{}`",
        first.chars().take(80).collect::<String>()
    );
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let [line] = lines.as_slice() else {
        bail!(
            "must hold one line of hex (besides # comments), found {} lines",
            lines.len()
        );
    };
    decode_hex(line)
}

fn decode_hex<const N: usize>(hex: &str) -> Result<[u8; N]> {
    ensure!(
        hex.len() == 2 * N,
        "expected {} hex digits, found {} characters",
        2 * N,
        hex.len()
    );
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        let pair = hex.get(2 * i..2 * i + 2).context("not hex")?;
        *byte = u8::from_str_radix(pair, 16)
            .with_context(|| format!("`{pair}` at character {} is not hex", 2 * i))?;
    }
    Ok(out)
}

/// Create `path` (which must not exist) with `mode`, and flush it to disk.
fn write_new_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(dir: &Path) {
        std::fs::write(dir.join(MANIFEST_FILE), "version = \"t\"\n").unwrap();
    }

    #[test]
    fn keygen_sign_verify_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let pair = KeyPair::generate().unwrap();
        let (secret, public) = pair.write(&tmp.path().join("keys/release")).unwrap();
        assert!(secret.ends_with("keys/release.key") && public.ends_with("keys/release.pub"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let models = tmp.path().join("models");
        std::fs::create_dir(&models).unwrap();
        bundle(&models);
        sign_manifest(&models, &SecretKey::read(&secret).unwrap()).unwrap();
        let trust = ModelTrust::key_file(&public).unwrap();
        let bytes = read_trusted_manifest(&models, &trust).unwrap();
        assert_eq!(bytes, b"version = \"t\"\n");
        // The public key's fingerprint is written in every file, for people.
        let fp = trust_fingerprint(&trust);
        for f in [&secret, &public, &models.join(SIGNATURE_FILE)] {
            assert!(std::fs::read_to_string(f).unwrap().contains(&fp), "{f:?}");
        }
    }

    fn trust_fingerprint(t: &ModelTrust) -> String {
        match t {
            ModelTrust::SignedBy { key } => key.fingerprint(),
            ModelTrust::Unsigned => unreachable!(),
        }
    }

    #[test]
    fn keygen_never_overwrites() {
        let tmp = tempfile::tempdir().unwrap();
        let stem = tmp.path().join("k");
        KeyPair::generate().unwrap().write(&stem).unwrap();
        let before = std::fs::read(stem.with_extension("key")).unwrap();
        let err = format!(
            "{:#}",
            KeyPair::generate().unwrap().write(&stem).unwrap_err()
        );
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(std::fs::read(stem.with_extension("key")).unwrap(), before);
    }

    #[test]
    fn keygen_appends_the_extensions_to_a_dotted_name() {
        let tmp = tempfile::tempdir().unwrap();
        let (secret, public) = KeyPair::generate()
            .unwrap()
            .write(&tmp.path().join("release-0.4"))
            .unwrap();
        assert_eq!(secret, tmp.path().join("release-0.4.key"));
        assert_eq!(public, tmp.path().join("release-0.4.pub"));
        assert!(secret.is_file() && public.is_file());
    }

    #[test]
    fn changed_manifest_wrong_key_and_missing_signature_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let signer = KeyPair::generate().unwrap();
        let (secret, public) = signer.write(&tmp.path().join("a")).unwrap();
        let (_, other_public) = KeyPair::generate()
            .unwrap()
            .write(&tmp.path().join("b"))
            .unwrap();
        let models = tmp.path().join("m");
        std::fs::create_dir(&models).unwrap();
        bundle(&models);
        let trust = ModelTrust::key_file(&public).unwrap();

        let err = format!("{:#}", read_trusted_manifest(&models, &trust).unwrap_err());
        assert!(
            err.contains("not signed") && err.contains("--allow-unsigned"),
            "{err}"
        );
        // Unsigned trust reads it anyway.
        read_trusted_manifest(&models, &ModelTrust::Unsigned).unwrap();

        sign_manifest(&models, &SecretKey::read(&secret).unwrap()).unwrap();
        let wrong = ModelTrust::key_file(&other_public).unwrap();
        let err = format!("{:#}", read_trusted_manifest(&models, &wrong).unwrap_err());
        assert!(err.contains("another key"), "{err}");

        // Every single-bit flip of the manifest is refused.
        let path = models.join(MANIFEST_FILE);
        let good = std::fs::read(&path).unwrap();
        for i in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[i / 8] ^= 1 << (i % 8);
            std::fs::write(&path, &bad).unwrap();
            assert!(read_trusted_manifest(&models, &trust).is_err(), "bit {i}");
        }
        std::fs::write(&path, &good).unwrap();
        read_trusted_manifest(&models, &trust).unwrap();

        // And of the signature.
        let sig_path = models.join(SIGNATURE_FILE);
        let text = std::fs::read_to_string(&sig_path).unwrap();
        let hex_line = text.lines().last().unwrap();
        let flipped = format!(
            "{}{}",
            if hex_line.starts_with('0') { '1' } else { '0' },
            &hex_line[1..]
        );
        std::fs::write(&sig_path, text.replace(hex_line, &flipped)).unwrap();
        assert!(read_trusted_manifest(&models, &trust).is_err());
    }

    #[test]
    fn release_key_parses() {
        assert_eq!(PublicKey::release().fingerprint().len(), 16);
    }

    #[test]
    fn malformed_key_files_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let label = format!("# {PUBLIC_LABEL}\n");
        for (name, content, why) in [
            ("empty.pub", String::new(), "first line"),
            ("nolabel.pub", "11".repeat(32), "first line"),
            ("short.pub", format!("{label}abcd\n"), "64 hex digits"),
            (
                "two.pub",
                format!("{label}{0}\n{0}\n", "11".repeat(32)),
                "found 2 lines",
            ),
            (
                "nothex.pub",
                format!("{label}{}", "zz".repeat(32)),
                "not hex",
            ),
        ] {
            let p = tmp.path().join(name);
            std::fs::write(&p, content).unwrap();
            let err = format!("{:#}", PublicKey::read(&p).unwrap_err());
            assert!(err.contains(name) && err.contains(why), "{err}");
            // And given as a secret key: named as the wrong kind of file.
            if name == "nolabel.pub" {
                let err = format!("{:#}", SecretKey::read(&p).err().unwrap());
                assert!(err.contains("secret key file"), "{err}");
            }
        }
        let err = format!(
            "{:#}",
            PublicKey::read(&tmp.path().join("missing.pub")).unwrap_err()
        );
        assert!(err.contains("missing.pub"), "{err}");
    }
}
