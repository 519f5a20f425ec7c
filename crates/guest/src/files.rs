//! `read_file` and `write_file`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use polydev_api::agent::{AgentErrorKind, FileSpec};

/// Errors of file requests.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The path is not absolute or has no file name.
    #[error("path {0:?} is not an absolute path to a file; give a path like /etc/foo")]
    BadPath(String),
    /// The file does not exist.
    #[error("{path} does not exist{hint}")]
    NotFound {
        /// The path.
        path: String,
        /// What to do.
        hint: &'static str,
    },
    /// The file exceeds the size limit.
    #[error("{path} is larger than max_bytes ({max} bytes); raise max_bytes or read it with exec")]
    TooLarge {
        /// The path.
        path: String,
        /// The limit.
        max: u64,
    },
    /// Any other OS error.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: String,
        /// The OS error.
        source: io::Error,
    },
}

impl FileError {
    /// The protocol's error kind for this error.
    pub fn kind(&self) -> AgentErrorKind {
        match self {
            FileError::BadPath(_) => AgentErrorKind::BadRequest,
            FileError::NotFound { .. } => AgentErrorKind::NotFound,
            FileError::TooLarge { .. } => AgentErrorKind::Refused,
            FileError::Io { source, .. } => match source.kind() {
                io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                    AgentErrorKind::Refused
                }
                io::ErrorKind::IsADirectory | io::ErrorKind::NotADirectory => {
                    AgentErrorKind::BadRequest
                }
                _ => AgentErrorKind::Internal,
            },
        }
    }
}

fn io_err(what: &'static str, path: &Path, source: io::Error) -> FileError {
    if source.kind() == io::ErrorKind::NotFound {
        return FileError::NotFound {
            path: path.display().to_string(),
            hint: if what == "cannot create" {
                " (its directory is missing; pass create_dirs: true)"
            } else {
                ""
            },
        };
    }
    FileError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// Check that `path` is absolute and names a file.
pub fn check_path(path: &str) -> Result<&Path, FileError> {
    let p = Path::new(path);
    if !p.is_absolute() || p.file_name().is_none() || path.contains('\0') {
        return Err(FileError::BadPath(path.to_string()));
    }
    Ok(p)
}

/// Read a whole file of at most `max_bytes`.
pub fn read(path: &str, max_bytes: u64) -> Result<Vec<u8>, FileError> {
    let p = check_path(path)?;
    let f = File::open(p).map_err(|e| io_err("cannot open", p, e))?;
    let meta = f.metadata().map_err(|e| io_err("cannot stat", p, e))?;
    if meta.is_dir() {
        return Err(FileError::Io {
            what: "cannot read",
            path: path.into(),
            source: io::Error::from(io::ErrorKind::IsADirectory),
        });
    }
    let too_large = || FileError::TooLarge {
        path: path.into(),
        max: max_bytes,
    };
    if meta.len() > max_bytes {
        return Err(too_large());
    }
    // The size can change, and /proc files report 0: read with a hard limit.
    let mut data = Vec::new();
    f.take(max_bytes.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(|e| io_err("cannot read", p, e))?;
    if data.len() as u64 > max_bytes {
        return Err(too_large());
    }
    Ok(data)
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Write a file atomically: a temporary file in the same directory, synced,
/// then renamed over the target, so readers see the old or the new file,
/// never a partial one.
pub fn write(spec: &FileSpec) -> Result<(), FileError> {
    let p = check_path(&spec.path)?;
    let dir = p.parent().unwrap_or(Path::new("/"));
    if spec.create_dirs {
        fs::create_dir_all(dir).map_err(|e| io_err("cannot create directory", dir, e))?;
    }
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(
        ".{name}.polydev-tmp.{}.{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mode = spec.mode & 0o7777;
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| io_err("cannot create", p, e))?;
        f.write_all(&spec.data)
            .map_err(|e| io_err("cannot write", p, e))?;
        // The umask may have cleared bits the caller asked for.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| io_err("cannot chmod", p, e))?;
        f.sync_all().map_err(|e| io_err("cannot sync", p, e))?;
        fs::rename(&tmp, p).map_err(|e| io_err("cannot rename into", p, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("polydev-guest-files-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        let _ = fs::create_dir_all(&d);
        d
    }

    #[test]
    fn rejects_relative_paths() {
        assert!(matches!(check_path("etc/x"), Err(FileError::BadPath(_))));
        assert!(matches!(check_path("/"), Err(FileError::BadPath(_))));
        assert!(check_path("/etc/x").is_ok());
    }

    #[test]
    fn write_then_read_with_mode_and_limits() {
        let d = tmpdir("rw");
        let path = d.join("a/b/c.txt").display().to_string();
        let mut spec = FileSpec {
            path: path.clone(),
            data: vec![0, 1, 2, 255],
            mode: 0o600,
            create_dirs: false,
        };
        assert!(matches!(write(&spec), Err(FileError::NotFound { .. })));
        spec.create_dirs = true;
        assert!(write(&spec).is_ok());
        assert_eq!(read(&path, 4).ok(), Some(vec![0, 1, 2, 255]));
        assert!(matches!(read(&path, 3), Err(FileError::TooLarge { .. })));
        let mode = fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o777)
            .ok();
        assert_eq!(mode, Some(0o600));
        let leftovers = fs::read_dir(d.join("a/b")).map(|r| r.count()).ok();
        assert_eq!(leftovers, Some(1));
        assert_eq!(
            read(&d.join("nope").display().to_string(), 10)
                .err()
                .map(|e| e.kind()),
            Some(AgentErrorKind::NotFound)
        );
        let _ = fs::remove_dir_all(&d);
    }
}
