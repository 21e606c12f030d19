//! Output files that never destroy inputs, and output names valid on any file system.
//!
//! Outputs are compared with inputs by *identity* (device and inode), not by name: two
//! names for one file (a hard link, a symlink, `./a` and `a`) are still one file, and
//! `records export --output r.log` or `detect --output photo.png` once truncated the very
//! log or photo they were reading.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Which file a path is: device and inode number (symlinks followed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The identity of the file `path` names, following symlinks.
    pub fn of(path: &Path) -> io::Result<FileId> {
        Ok(Self::from_metadata(&std::fs::metadata(path)?))
    }

    /// The identity of an open file.
    pub fn of_file(file: &File) -> io::Result<FileId> {
        Ok(Self::from_metadata(&file.metadata()?))
    }

    fn from_metadata(m: &std::fs::Metadata) -> FileId {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

/// True when `a` and `b` both exist and are the same file (hard links and symlinks
/// included).
pub fn same_file(a: &Path, b: &Path) -> bool {
    matches!((FileId::of(a), FileId::of(b)), (Ok(x), Ok(y)) if x == y)
}

/// Files an output must never be written over (a command's inputs), by identity.
#[derive(Debug)]
pub struct Protected {
    ids: HashMap<FileId, PathBuf>,
    /// What the files are, for the error ("input image", "records log").
    role: &'static str,
}

impl Protected {
    /// Remembers the identity of each of `paths`; a path that cannot be stat'ed (missing,
    /// dangling link) is no file an output could land on, and is left out.
    pub fn new<'a>(paths: impl IntoIterator<Item = &'a Path>, role: &'static str) -> Self {
        let ids = paths
            .into_iter()
            .filter_map(|p| FileId::of(p).ok().map(|id| (id, p.to_path_buf())))
            .collect();
        Self { ids, role }
    }

    /// The protected file that `id` is, if any.
    fn find(&self, id: FileId) -> Option<&Path> {
        self.ids.get(&id).map(PathBuf::as_path)
    }

    /// Opens `output` for writing and empties it, unless it is one of the protected files.
    /// The identity is taken from the opened file *before* anything is truncated, so no
    /// name trick (link, `..`, a symlink swapped in) gets past it. The error names both
    /// paths.
    pub fn create(&self, output: &Path) -> Result<File> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(output)
            .with_context(|| format!("cannot create {}", output.display()))?;
        let id =
            FileId::of_file(&file).with_context(|| format!("cannot stat {}", output.display()))?;
        if let Some(input) = self.find(id) {
            bail!(
                "refusing to write {}: it is the {} {} (the same file, by device and inode); \
                 choose another output",
                output.display(),
                self.role,
                input.display()
            );
        }
        file.set_len(0)
            .with_context(|| format!("cannot truncate {}", output.display()))?;
        Ok(file)
    }

    /// Fails if standard output is one of the protected files (`>> records.log`).
    pub fn check_stdout(&self) -> Result<()> {
        use std::os::fd::AsFd;
        // A closed stdout is no file at all: nothing can be written over.
        let Ok(fd) = io::stdout().as_fd().try_clone_to_owned() else {
            return Ok(());
        };
        let Ok(id) = FileId::of_file(&File::from(fd)) else {
            return Ok(());
        };
        if let Some(input) = self.find(id) {
            bail!(
                "refusing to write to standard output: it is the {} {} (the same file, by \
                 device and inode); use --output or another redirection",
                self.role,
                input.display()
            );
        }
        Ok(())
    }
}

/// Longest part of a file name kept from the input's name: with the hash and extension
/// added, names stay far below the 255-byte limit of common file systems.
const MAX_NAME_STEM: usize = 120;

/// A flat file name (no extension added) for an output derived from an input at
/// `relative` (a path below the input folder, or a file name), valid and unique on any
/// file system: characters other than ASCII letters, digits, `.`, `_` and `-` become `_`,
/// and the name is cut to [`MAX_NAME_STEM`] bytes. Whenever that changed anything, or
/// could collide on a case-insensitive file system (upper-case letters) or hit a reserved
/// Windows name, `-` and 12 hex digits of the SHA-256 of the full relative path are
/// appended: `a/b.png` gives `a_b.png-<hash>`, while `a_b.png` stays `a_b.png`.
pub fn portable_name(relative: &Path) -> String {
    let original = relative.as_os_str().as_bytes();
    let mut name: String = String::from_utf8_lossy(original)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(MAX_NAME_STEM)
        .collect();
    let reserved = {
        let base = name.split('.').next().unwrap_or("").to_ascii_lowercase();
        matches!(base.as_str(), "con" | "prn" | "aux" | "nul")
            || ((base.starts_with("com") || base.starts_with("lpt"))
                && base.len() == 4
                && base.as_bytes()[3].is_ascii_digit())
    };
    let unchanged = name.as_bytes() == original;
    let lower_case = !name.bytes().any(|b| b.is_ascii_uppercase());
    let special = name.is_empty() || name == "." || name == "..";
    let plain = unchanged && lower_case && !reserved && !special;
    if !plain {
        name.push('-');
        name.push_str(&ma_core::digest::sha256_hex(original)[..12]);
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn identity_sees_through_hard_links_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.log");
        std::fs::write(&a, b"data").unwrap();
        let hard = dir.path().join("hard.log");
        std::fs::hard_link(&a, &hard).unwrap();
        let soft = dir.path().join("soft.log");
        std::os::unix::fs::symlink(&a, &soft).unwrap();
        let other = dir.path().join("other.log");
        std::fs::write(&other, b"data").unwrap();
        assert!(same_file(&a, &hard) && same_file(&a, &soft));
        assert!(same_file(&a, &dir.path().join(".").join("a.log")));
        assert!(!same_file(&a, &other));
        assert!(!same_file(&a, &dir.path().join("missing")));

        let protected = Protected::new([a.as_path()], "records log");
        for name in [&a, &hard, &soft] {
            let err = format!("{:#}", protected.create(name).unwrap_err());
            assert!(
                err.contains(&name.display().to_string())
                    && err.contains(&a.display().to_string())
                    && err.contains("records log"),
                "{err}"
            );
        }
        assert_eq!(std::fs::read(&a).unwrap(), b"data", "nothing truncated");
        // Another file (existing or new) is emptied and written.
        let mut f = protected.create(&other).unwrap();
        f.write_all(b"x").unwrap();
        assert_eq!(std::fs::read(&other).unwrap(), b"x");
        protected.create(&dir.path().join("new.jsonl")).unwrap();
    }

    #[test]
    fn portable_names_are_unique_bounded_and_plain() {
        let name = |s: &str| portable_name(Path::new(s));
        // Plain lower-case names are kept as they are.
        assert_eq!(name("a_b.png"), "a_b.png");
        assert_eq!(name("image001.png"), "image001.png");
        // A nested name no longer equals the flat one it resembles.
        let nested = name("a/b.png");
        assert!(
            nested.starts_with("a_b.png-") && nested.len() == 8 + 12,
            "{nested}"
        );
        assert_ne!(nested, name("a_b.png"));
        assert_ne!(name("a/b.png"), name("a\\b.png"));
        // Case-insensitive file systems, reserved names, odd characters.
        assert_ne!(name("A.png"), name("a.png"));
        assert!(name("nul.png").starts_with("nul.png-"));
        assert!(name("com1.jpg").starts_with("com1.jpg-"));
        assert_eq!(name("compact.jpg"), "compact.jpg");
        for odd in ["x\ny.png", "x:y?.png", "é.png", "..", "a\u{1b}[31m.png"] {
            let n = name(odd);
            assert!(
                n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
                "{odd:?} -> {n:?}"
            );
            assert_ne!(n, "..");
        }
        // A path longer than any file system allows gives a bounded, still unique name.
        let long_a = format!("{}/a.png", "d".repeat(300));
        let long_b = format!("{}/b.png", "d".repeat(300));
        assert!(name(&long_a).len() <= MAX_NAME_STEM + 13);
        assert_ne!(name(&long_a), name(&long_b));
        // Non-UTF-8 bytes: still a valid name, distinct from the lossy look-alike.
        let raw = Path::new(std::ffi::OsStr::from_bytes(b"caf\xe9.png"));
        assert_ne!(portable_name(raw), name("caf\u{fffd}.png"));
    }
}
