//! Processes the host agent starts on behalf of VMs (hypervisors, vsock
//! backends): spawned in their own process group so that they outlive a
//! restart of the host agent, watched through pidfds so that processes
//! adopted after a restart are watched the same way as our own children.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;

/// Start `cmd` detached from our process group, with stdout and stderr
/// appended to `log` (mode 0600) and umask 0177, so that the sockets and
/// files it creates (QMP, chardevs, snapshot state) are private.
pub fn spawn_logged(
    cmd: &mut tokio::process::Command,
    log: &Path,
) -> std::io::Result<tokio::process::Child> {
    let out = open_log(log)?;
    let err = out.try_clone()?;
    crate::private::restrictive_umask(cmd);
    spawn_with_stdio(cmd, out, err)
}

/// `log` opened for appending, created 0600.
pub fn open_log(log: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    File::options()
        .create(true)
        .append(true)
        .mode(crate::private::FILE_MODE)
        .open(log)
}

/// Start `cmd` detached from our process group with stdout to `out` and
/// stderr to `err` (the caller sets its umask).
pub fn spawn_with_stdio(
    cmd: &mut tokio::process::Command,
    out: File,
    err: File,
) -> std::io::Result<tokio::process::Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0)
        .kill_on_drop(false);
    cmd.spawn()
}

/// Give `cmd`'s process `fds` as descriptors 3, 4, … (open across its
/// exec), e.g. for QEMU's `-add-fd fd=3,…`.
pub fn pass_fds(cmd: &mut tokio::process::Command, fds: Vec<OwnedFd>) -> std::io::Result<()> {
    let first = 3;
    // Copies numbered above every target first, so that placing one never
    // overwrites another still to be placed.
    let high = fds
        .iter()
        .map(|fd| {
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor we own returns
            // a new one we then own.
            let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, first + 64) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `n` was just returned by fcntl and is owned by nobody else.
            Ok(unsafe { OwnedFd::from_raw_fd(n) })
        })
        .collect::<std::io::Result<Vec<OwnedFd>>>()?;
    // SAFETY: dup2(2) is async-signal-safe; it touches only the child's
    // descriptor table between fork and exec, and the result has no
    // close-on-exec flag.
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in high.iter().enumerate() {
                if libc::dup2(fd.as_raw_fd(), first + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// [`spawn_logged`] for a process of the VM in `dir`: it joins the VM's
/// cgroups (recorded by [`crate::cgroup::Cgroups::create`]) before it
/// execs, and the spawn fails if it cannot.
pub fn spawn_logged_in(
    cmd: &mut tokio::process::Command,
    log: &Path,
    dir: &crate::vmdir::VmDir,
) -> std::io::Result<tokio::process::Child> {
    crate::cgroup::join_in_child(cmd, crate::cgroup::open_procs(dir)?);
    spawn_logged(cmd, log)
}

/// [`spawn_with_stdio`] for a process of the VM in `dir` (see
/// [`spawn_logged_in`]).
pub fn spawn_with_stdio_in(
    cmd: &mut tokio::process::Command,
    out: File,
    err: File,
    dir: &crate::vmdir::VmDir,
) -> std::io::Result<tokio::process::Child> {
    crate::cgroup::join_in_child(cmd, crate::cgroup::open_procs(dir)?);
    spawn_with_stdio(cmd, out, err)
}

/// Whether `pid` is alive and its command line mentions `needle` (a VM's
/// state directory), so that a recycled pid is never mistaken for our VM.
pub fn alive_with(pid: u32, needle: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    if is_zombie(pid) {
        return false;
    }
    let text = String::from_utf8_lossy(&cmdline);
    text.contains(needle)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rfind(')')?;
            s[after + 1..].split_whitespace().next().map(|st| st == "Z")
        })
        .unwrap_or(true)
}

/// SIGKILL `pid` if it is alive and matches `needle`, then wait (bounded)
/// until it is gone or a zombie awaiting its parent.
pub async fn kill_matching(pid: u32, needle: &str) {
    if !alive_with(pid, needle) {
        return;
    }
    // SAFETY: plain syscall on a pid we verified belongs to our VM.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && alive_with(pid, needle) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A pidfd for a process that may not be our child.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Wait until the process behind `pidfd` exits. Works for any process,
/// child or not; it does not reap.
pub async fn wait_pidfd(pidfd: OwnedFd) -> std::io::Result<()> {
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and refers to
    // the same pidfd until the AsyncFd is dropped.
    let afd = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)? };
    let _guard = afd.readable().await?;
    let _ = afd.get_ref().as_raw_fd();
    Ok(())
}

/// Describe how a child ended, for failure reasons.
pub fn describe_exit(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        let name = match sig {
            libc::SIGKILL => "SIGKILL",
            libc::SIGTERM => "SIGTERM",
            libc::SIGSEGV => "SIGSEGV",
            libc::SIGABRT => "SIGABRT",
            libc::SIGINT => "SIGINT",
            _ => "a signal",
        };
        format!("killed by {name} ({sig})")
    } else {
        format!("exited with code {}", status.code().unwrap_or(-1))
    }
}
