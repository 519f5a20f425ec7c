//! The one place that waits for child processes.
//!
//! As PID 1 the agent must reap every orphan, yet exec and services need the
//! exit status of their own children. A single thread calls `waitpid(-1)` and
//! hands each status to a callback registered for that pid; unregistered
//! pids are orphans and are simply reaped.
//!
//! Races, and why this layout avoids them:
//! - A child may exit before its spawner registers it. Spawning happens under
//!   the same lock the reaper takes before it calls `waitpid`, and the pid is
//!   registered before that lock is released, so the reaper cannot collect a
//!   child whose callback is not yet known.
//! - `std::process::Command::spawn` itself calls `waitpid` on a child whose
//!   `exec` failed (and panics if that wait fails). Because the reaper only
//!   waits while holding the lock, it can never steal that child.
//!
//! Nothing else in the agent may wait for a child (no `Child::wait`).

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Mutex, OnceLock};

use polydev_api::agent::ExitStatus;

use crate::util::lock;

/// Called (on the reaper thread, without locks held) when a child exits.
pub type OnExit = Box<dyn FnOnce(ExitStatus) + Send>;

/// Errors of reaper setup.
#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    /// SIGCHLD could not be blocked.
    #[error("cannot block SIGCHLD: {0}; the agent cannot supervise children")]
    Mask(io::Error),
    /// The reaper thread could not start.
    #[error("cannot start the reaper thread: {0}; the guest is probably out of memory")]
    Thread(io::Error),
}

static WAITERS: OnceLock<Mutex<HashMap<i32, OnExit>>> = OnceLock::new();

fn waiters() -> &'static Mutex<HashMap<i32, OnExit>> {
    WAITERS.get_or_init(|| Mutex::new(HashMap::new()))
}

fn sigchld_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        set
    }
}

/// Block SIGCHLD in the calling thread; call it before starting any thread
/// so that every thread inherits the mask and only the reaper consumes the
/// signal. (Children start with an empty mask: std resets it.)
pub fn block_sigchld() -> Result<(), ReaperError> {
    let set = sigchld_set();
    // SAFETY: set is initialised; the old mask is not wanted.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(ReaperError::Mask(io::Error::from_raw_os_error(r)));
    }
    Ok(())
}

/// Start the reaper thread.
pub fn start() -> Result<(), ReaperError> {
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(reap_forever)
        .map(|_| ())
        .map_err(ReaperError::Thread)
}

fn reap_forever() {
    let set = sigchld_set();
    // A periodic sweep guards against a lost wakeup; SIGCHLD is the fast path.
    let timeout = libc::timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    loop {
        // SAFETY: set and timeout are valid; siginfo is not wanted.
        unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        for (cb, status) in reap_pending() {
            cb(status);
        }
    }
}

/// Reap every exited child; returns the callbacks to run.
fn reap_pending() -> Vec<(OnExit, ExitStatus)> {
    let mut done = Vec::new();
    let mut w = lock(waiters());
    loop {
        let mut raw = 0;
        // SAFETY: raw is a valid int to write the status into.
        let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
        if pid > 0 {
            if let Some(cb) = w.remove(&pid) {
                done.push((cb, decode_status(raw)));
            }
            continue;
        }
        if pid < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        // 0: children remain but none exited; ECHILD: no children at all.
        break;
    }
    done
}

/// Turn a `waitpid` status into the protocol's exit status.
pub fn decode_status(raw: libc::c_int) -> ExitStatus {
    let (code, signal) = if libc::WIFEXITED(raw) {
        (Some(libc::WEXITSTATUS(raw)), None)
    } else if libc::WIFSIGNALED(raw) {
        (None, Some(libc::WTERMSIG(raw)))
    } else {
        (None, None)
    };
    ExitStatus {
        code,
        signal,
        timed_out: false,
    }
}

/// Spawn `cmd` and register `on_exit` for it, atomically with respect to
/// the reaper. The returned `Child` must never be waited on; take its pipes
/// and drop it.
#[allow(clippy::zombie_processes)] // the reaper thread waits for it
pub fn spawn(cmd: &mut Command, on_exit: OnExit) -> io::Result<Child> {
    let mut w = lock(waiters());
    let child = cmd.spawn()?;
    match i32::try_from(child.id()) {
        Ok(pid) => {
            w.insert(pid, on_exit);
        }
        Err(_) => {
            // Cannot happen on Linux (pid_max < 2^22); the child is reaped
            // as an orphan.
        }
    }
    Ok(child)
}

/// Send `sig` to the process group led by `pid` (every child is started as
/// a session and group leader). Refuses pids that would address the agent
/// itself or every process.
pub fn kill_group(pid: u32, sig: libc::c_int) {
    if let Ok(p) = i32::try_from(pid) {
        if p > 1 {
            // SAFETY: plain syscall; ESRCH (already gone) is fine.
            unsafe { libc::kill(-p, sig) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_exit_and_signal() {
        // Exit code 3: status 0x0300. Signal 9: status 0x0009.
        let e = decode_status(3 << 8);
        assert_eq!((e.code, e.signal), (Some(3), None));
        let s = decode_status(9);
        assert_eq!((s.code, s.signal), (None, Some(9)));
    }
}
