//! Files, directories and sockets only this user may touch, whatever the
//! umask of whoever started us.
//!
//! VM disks hold delivered credentials, snapshot memory holds whatever the
//! guest had in RAM, and every socket is a way to drive a VM or the host
//! agent. Modes are therefore set explicitly rather than left to the
//! umask: directories 0700, files and sockets 0600. A socket is bound
//! inside a fresh 0700 directory, given its mode there and then renamed
//! into place, so it is never reachable with a looser mode, not even for
//! the moment between `bind` and `chmod`. Processes we start (hypervisors,
//! the vsock bridge, `cp`, `mkfs`) run with umask 0177, so what they
//! create (QMP and chardev sockets, snapshot state) is 0600 too; none of
//! them creates directories, which that umask would make untraversable.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

/// Mode of private directories.
pub const DIR_MODE: u32 = 0o700;
/// Mode of private files and sockets.
pub const FILE_MODE: u32 = 0o600;

/// Bytes [`bind`] adds to a socket's path while it is staged
/// (`/.b<8 hex>`), which must fit in `sun_path` as well.
pub const BIND_STAGING_LEN: usize = 11;

/// Create `path` and its missing parents as 0700, and make `path` itself
/// 0700 if it already existed.
pub fn dir_all(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)?;
    set_mode(path, DIR_MODE)
}

/// Create `path` (which must not exist) as 0700.
pub fn create_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().mode(DIR_MODE).create(path)?;
    set_mode(path, DIR_MODE)
}

/// Set `path`'s permission bits.
pub fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Bind a Unix socket at `path` (replacing a stale one) with mode 0600:
/// bound in a fresh 0700 directory next to it, made 0600 there, then
/// renamed into place.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or(path.as_os_str());
    // Short: the staged path must fit in sun_path too.
    let id = crate::new_id("");
    let staging = parent.join(format!(".b{}", &id[..BIND_STAGING_LEN - 3]));
    create_dir(&staging)?;
    let result = (|| {
        let tmp = staging.join(name);
        let listener = UnixListener::bind(&tmp)?;
        set_mode(&tmp, FILE_MODE)?;
        std::fs::rename(&tmp, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// [`bind`] for tokio; call from within a runtime.
pub fn bind_tokio(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let l = bind(path)?;
    l.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(l)
}

/// Create (or truncate) the file at `path` with mode 0600, for writing.
pub fn create_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    // An existing file keeps its mode through open(2).
    f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// Send `data` on the Unix socket `sock` with `fd` attached (SCM_RIGHTS),
/// once; returns how many bytes went (the descriptor goes with them).
pub fn send_with_fd(
    sock: &impl std::os::fd::AsRawFd,
    data: &[u8],
    fd: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let raw = fd.as_raw_fd();
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the
    // sendmsg call, and the control buffer holds exactly one cmsg of one
    // int, as CMSG_SPACE computed.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), raw);
        libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sent as usize)
}

/// Make `cmd` run with umask 0177, so the files and sockets it creates are
/// 0600 (only for programs that create no directories).
pub fn restrictive_umask(cmd: &mut tokio::process::Command) {
    umask(cmd, 0o177);
}

/// Make `cmd` run with umask `mask`.
pub fn umask(cmd: &mut tokio::process::Command, mask: libc::mode_t) {
    // SAFETY: umask(2) is async-signal-safe and touches only the child's
    // own state between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(mask);
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[tokio::test]
    async fn modes_do_not_depend_on_the_umask() {
        let tmp = tempfile::tempdir().unwrap();
        // SAFETY: umask(2) on this test process; restored below. Other
        // tests in this binary create only temp dirs, which they check
        // nowhere.
        let old = unsafe { libc::umask(0) };
        let d = tmp.path().join("a/b");
        dir_all(&d).unwrap();
        let s = d.join("x.sock");
        std::fs::write(&s, b"stale").unwrap();
        let l = bind_tokio(&s).unwrap();
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c").arg("echo > \"$0\"").arg(d.join("child"));
        restrictive_umask(&mut cmd);
        let st = cmd.status().await.unwrap();
        unsafe { libc::umask(old) };
        assert!(st.success());
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&tmp.path().join("a")), 0o700);
        assert_eq!(mode(&s), 0o600);
        assert_eq!(mode(&d.join("child")), 0o600);
        // The socket works where it was renamed to, and no staging
        // directory is left.
        tokio::net::UnixStream::connect(&s).await.unwrap();
        drop(l);
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
    }
}
