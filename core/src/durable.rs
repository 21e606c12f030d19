//! Files that are either complete or absent after a power loss: written through a
//! temporary file that is synced and renamed into place, then the folder synced.

use std::path::Path;

use anyhow::{Context, Result};

/// Prefix of the temporary file [`write_durably`] writes first; a reader that finds one
/// left by a power loss may delete it.
pub const TEMP_PREFIX: &str = ".incoming-";

/// Writes `bytes` to `path` through a temporary file in the same folder, synced and renamed
/// into place, then syncs the folder: the file is either complete or absent.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let temp = dir.join(format!("{TEMP_PREFIX}{}", name.to_string_lossy()));
    let written = std::fs::File::create(&temp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&temp, path))
        .and_then(|()| sync_dir(dir));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

/// fsync on a folder (entries created, renamed, deleted); filesystems that cannot are
/// accepted.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}
