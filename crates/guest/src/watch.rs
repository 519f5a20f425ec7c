//! `watch_files`: a long poll over a user's credential files, so the host
//! learns of a CLI's token refresh without polling the VM itself.
//!
//! The agent runs as root and the files live in a home the user controls,
//! so each read opens the path with `openat2(RESOLVE_NO_SYMLINKS)` (no
//! symlink anywhere on the path, the last component included) and
//! non-blocking (a FIFO cannot hang it), then reads only a regular file
//! the user owns, of bounded size: whatever the user plants, the answer
//! holds their own file or a refusal, never another file's content.

use std::fs::File;
use std::io::Read as _;
use std::os::fd::FromRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::time::{Duration, Instant};

use polydev_api::agent::{
    AgentError, AgentErrorKind, Response, WatchSpec, WatchedFile, MAX_WATCH_FILE, MAX_WATCH_FILES,
    MAX_WATCH_MS, WATCH_MISSING, WATCH_REFUSED,
};
use sha2::{Digest as _, Sha256};

/// How often the files are looked at while nothing changed: credential
/// files are a few KiB, so this costs next to nothing.
const POLL: Duration = Duration::from_millis(500);

/// Answer a watch: at once when a file differs from what the host knows,
/// else when one changes or the timeout passes.
pub fn handle(spec: WatchSpec) -> Response {
    if spec.files.is_empty() || spec.files.len() > MAX_WATCH_FILES {
        return bad(format!(
            "watch_files takes 1 to {MAX_WATCH_FILES} files, not {}",
            spec.files.len()
        ));
    }
    if let Some(f) = spec
        .files
        .iter()
        .find(|f| !f.path.starts_with('/') || f.path.contains('\0'))
    {
        return bad(format!(
            "watched path {:?} is not an absolute path without NUL bytes",
            f.path
        ));
    }
    let uid = match crate::process::lookup_user(&spec.user) {
        Ok(c) => c.uid,
        Err(e) => return bad(e.to_string()),
    };
    let max = spec.max_bytes.min(MAX_WATCH_FILE);
    let deadline = Instant::now() + Duration::from_millis(spec.timeout_ms.min(MAX_WATCH_MS));
    loop {
        let now: Vec<WatchedFile> = spec
            .files
            .iter()
            .map(|f| read_one(&f.path, uid, max))
            .collect();
        let changed = now.iter().zip(&spec.files).any(|(n, k)| n.key != k.known);
        let left = deadline.saturating_duration_since(Instant::now());
        if changed || left.is_zero() {
            return Response::Watched { files: now };
        }
        std::thread::sleep(POLL.min(left));
    }
}

fn bad(message: String) -> Response {
    Response::Error(AgentError {
        kind: AgentErrorKind::BadRequest,
        message,
    })
}

fn refused(path: &str, problem: String) -> WatchedFile {
    WatchedFile {
        path: path.to_string(),
        key: WATCH_REFUSED.into(),
        data: None,
        problem: Some(problem),
    }
}

/// The file at `path` as the watch reports it.
pub fn read_one(path: &str, uid: libc::uid_t, max: u64) -> WatchedFile {
    let file = match open_no_symlinks(path) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            return WatchedFile {
                path: path.to_string(),
                key: WATCH_MISSING.into(),
                data: None,
                problem: None,
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return refused(path, "a symlink is on its path; it is not followed".into())
        }
        Err(e) => return refused(path, format!("cannot open it: {e}")),
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return refused(path, format!("cannot stat it: {e}")),
    };
    if !meta.file_type().is_file() {
        return refused(path, "not a regular file".into());
    }
    if meta.uid() != uid {
        return refused(
            path,
            format!("owned by uid {}, not the watched user", meta.uid()),
        );
    }
    let mut data = Vec::new();
    // One byte more than allowed tells a file that grew past the cap.
    if let Err(e) = file.take(max + 1).read_to_end(&mut data) {
        return refused(path, format!("cannot read it: {e}"));
    }
    if data.len() as u64 > max {
        return refused(path, format!("larger than {max} bytes"));
    }
    WatchedFile {
        path: path.to_string(),
        key: hex::encode(Sha256::digest(&data)),
        data: Some(data),
        problem: None,
    }
}

/// `openat2(AT_FDCWD, path, O_RDONLY|O_NONBLOCK, RESOLVE_NO_SYMLINKS)`.
fn open_no_symlinks(path: &str) -> std::io::Result<File> {
    let c = std::ffi::CString::new(path).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // openat2(2)'s `struct open_how` (libc's is non-exhaustive, so it
    // cannot be built here).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK) as u64,
        mode: 0,
        resolve: libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2(2) with a NUL-terminated path and a fully initialised
    // open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::ErrorKind::InvalidData)?;
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use polydev_api::agent::WatchPath;

    fn me() -> libc::uid_t {
        // SAFETY: getuid(2) cannot fail.
        unsafe { libc::getuid() }
    }

    #[test]
    fn reads_a_regular_file_and_refuses_links_anywhere_on_the_path() {
        let d = tempfile::tempdir().expect("tempdir");
        let real = d.path().join("real");
        std::fs::create_dir(&real).expect("dir");
        std::fs::write(real.join("auth.json"), b"{}").expect("write");
        let f = read_one(real.join("auth.json").to_str().expect("utf8"), me(), 100);
        assert_eq!(f.data.as_deref(), Some(&b"{}"[..]));
        assert_eq!(f.key, hex::encode(Sha256::digest(b"{}")));

        std::os::unix::fs::symlink(&real, d.path().join("dirlink")).expect("symlink");
        let via = d.path().join("dirlink/auth.json");
        let f = read_one(via.to_str().expect("utf8"), me(), 100);
        assert_eq!(f.key, WATCH_REFUSED, "{f:?}");
        assert!(f.data.is_none());

        std::os::unix::fs::symlink("/etc/passwd", real.join("link")).expect("symlink");
        let f = read_one(real.join("link").to_str().expect("utf8"), me(), 1 << 20);
        assert_eq!(f.key, WATCH_REFUSED, "{f:?}");

        let f = read_one(real.join("none").to_str().expect("utf8"), me(), 100);
        assert_eq!(f.key, WATCH_MISSING);

        let f = read_one(real.join("auth.json").to_str().expect("utf8"), me(), 1);
        assert_eq!(f.key, WATCH_REFUSED, "over the size cap: {f:?}");
        let f = read_one(
            real.join("auth.json").to_str().expect("utf8"),
            me() + 1,
            100,
        );
        assert_eq!(f.key, WATCH_REFUSED, "another owner: {f:?}");
    }

    #[test]
    fn answers_at_once_on_a_difference_and_after_the_timeout_otherwise() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("a");
        std::fs::write(&p, b"x").expect("write");
        let path = p.to_str().expect("utf8").to_string();
        let spec = |known: &str, timeout_ms| WatchSpec {
            user: me().to_string(),
            files: vec![WatchPath {
                path: path.clone(),
                known: known.into(),
            }],
            timeout_ms,
            max_bytes: 100,
        };
        let Response::Watched { files } = handle(spec("", 60_000)) else {
            panic!("not watched")
        };
        let key = files[0].key.clone();
        let t = Instant::now();
        let Response::Watched { files } = handle(spec(&key, 600)) else {
            panic!("not watched")
        };
        assert_eq!(files[0].key, key);
        assert!(t.elapsed() >= Duration::from_millis(600));
        assert!(matches!(
            handle(WatchSpec {
                files: vec![],
                ..spec("", 1)
            }),
            Response::Error(_)
        ));
    }
}
