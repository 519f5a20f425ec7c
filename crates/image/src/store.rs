//! Atomic publication of artifact directories.
//!
//! Every artifact is assembled in a `.staging-*` directory next to its final
//! place and renamed into place in one step, so a reader sees either nothing
//! or a complete artifact, and an interrupted build leaves only a staging
//! directory that a later build sweeps away.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tempfile::TempDir;

use crate::ImageError;

const STAGING_PREFIX: &str = ".staging-";
/// Older than any real build; a younger staging dir may belong to a build
/// running right now in another process.
const STALE_AFTER: Duration = Duration::from_secs(6 * 3600);

/// A fresh staging directory under `parent` (created if needed). Dropping it
/// without publishing removes it.
pub(crate) fn staging(parent: &Path) -> Result<TempDir, ImageError> {
    std::fs::create_dir_all(parent).map_err(ImageError::io("creating directory", parent))?;
    sweep_stale(parent);
    tempfile::Builder::new()
        .prefix(STAGING_PREFIX)
        .tempdir_in(parent)
        .map_err(ImageError::io("creating staging directory in", parent))
}

fn sweep_stale(parent: &Path) {
    let Ok(rd) = std::fs::read_dir(parent) else {
        return;
    };
    let now = SystemTime::now();
    for entry in rd.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(STAGING_PREFIX) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age > STALE_AFTER);
        if old {
            // Best effort: a leftover we cannot remove only costs disk space.
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %e, "could not remove stale staging directory");
            }
        }
    }
}

/// Renames the finished `built` directory to `target`. If another process
/// published the same content-addressed artifact first, ours is discarded
/// and theirs kept; both are identical by construction.
pub(crate) fn publish(built: &Path, target: &Path) -> Result<(), ImageError> {
    match std::fs::rename(built, target) {
        Ok(()) => Ok(()),
        Err(_) if target.join("manifest.json").is_file() => Ok(()),
        Err(e) => Err(ImageError::io("publishing artifact to", target)(e)),
    }
}

/// An exclusive, cross-process lock on a cache, held while building. Cache
/// hits never take it; a builder re-checks the cache after acquiring it, so
/// two processes asking for the same artifact build it once.
pub(crate) struct BuildLock {
    _file: std::fs::File,
}

impl BuildLock {
    /// Blocks until the lock on `<root>/.lock` is ours.
    pub(crate) fn acquire(root: &Path) -> Result<Self, ImageError> {
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(root).map_err(ImageError::io("creating directory", root))?;
        let path = root.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(ImageError::io("opening", &path))?;
        loop {
            // SAFETY: flock on a descriptor we own; it is released when the
            // file is closed on drop.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(BuildLock { _file: file });
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(ImageError::io("locking", &path)(err));
            }
        }
    }
}

/// Writes `value` as pretty JSON with a trailing newline.
pub(crate) fn write_json(path: &Path, value: &impl Serialize) -> Result<Vec<u8>, ImageError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| ImageError::Manifest {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    bytes.push(b'\n');
    std::fs::write(path, &bytes).map_err(ImageError::io("writing", path))?;
    Ok(bytes)
}

/// Reads JSON written by [`write_json`], with its raw bytes.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<(T, Vec<u8>), ImageError> {
    let bytes = std::fs::read(path).map_err(ImageError::io("reading", path))?;
    let value = serde_json::from_slice(&bytes).map_err(|e| ImageError::Manifest {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    Ok((value, bytes))
}

/// Subdirectories of `dir` that are published artifacts (not staging).
pub(crate) fn artifact_dirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_is_all_or_nothing_and_tolerates_a_race() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("abc");
        let a = staging(root.path()).unwrap();
        std::fs::write(a.path().join("manifest.json"), "{}").unwrap();
        publish(a.path(), &target).unwrap();
        assert!(target.join("manifest.json").is_file());
        // A second builder of the same key loses the race gracefully.
        let b = staging(root.path()).unwrap();
        std::fs::write(b.path().join("manifest.json"), "{}").unwrap();
        std::fs::write(b.path().join("extra"), "x").unwrap();
        publish(b.path(), &target).unwrap();
        drop(b);
        assert_eq!(artifact_dirs(root.path()), vec![target]);
    }
}
