//! Hypervisor drivers behind one trait.
//!
//! A driver turns a validated VM description into running processes and
//! performs the operations that need the hypervisor itself (pause, resume,
//! snapshot). Everything else — the guest agent, logs, records — is the same
//! for every driver because both expose the guest through a hybrid vsock
//! socket at [`VmDir::vsock`].

pub mod firecracker;
pub mod jailer;
pub mod qemu;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use polydev_api::vm::{Accel, HypervisorKind};

use crate::config::ResolvedSpec;
use crate::vmdir::VmDir;

/// What a driver needs to start one VM.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    /// VM id.
    pub id: String,
    /// Its state directory (already created and empty).
    pub dir: VmDir,
    /// Validated request.
    pub spec: ResolvedSpec,
    /// Accelerator to use.
    pub accel: Accel,
    /// Kernel command line.
    pub cmdline: String,
    /// Restore guest state from this snapshot directory instead of booting.
    pub restore_from: Option<PathBuf>,
    /// The uid (and gid) the hypervisor switches to once it has opened its
    /// files (QEMU's `-run-with user=`); `None`: it runs as we do.
    pub run_as: Option<u32>,
}

/// Processes a driver started for one VM.
#[derive(Debug)]
pub struct Launched {
    /// The hypervisor process.
    pub hypervisor: tokio::process::Child,
    /// The vsock backend process, when the hypervisor needs one.
    pub backend: Option<tokio::process::Child>,
}

/// Failures of a hypervisor operation.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// A binary could not be started.
    #[error("cannot start {what} ({path}): {source}; run `polydev doctor` to see what is missing")]
    Spawn {
        /// Which program.
        what: &'static str,
        /// Its path.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The process exited during start-up.
    #[error("{what} exited during start-up ({status}); its output is in {log}")]
    EarlyExit {
        /// Which program.
        what: &'static str,
        /// How it ended.
        status: String,
        /// Where its output went.
        log: String,
    },
    /// A control socket did not appear or answer in time.
    #[error("{0} did not become ready in time")]
    NotReady(&'static str),
    /// The hypervisor's control API returned an error.
    #[error("the hypervisor refused {op}: {message}")]
    Control {
        /// Operation attempted.
        op: &'static str,
        /// What it said.
        message: String,
    },
    /// I/O on a control socket or a file failed.
    #[error("hypervisor I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The operation is impossible with this driver or configuration.
    #[error("{0}")]
    Unsupported(String),
}

/// One hypervisor implementation.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Which hypervisor this is.
    fn kind(&self) -> HypervisorKind;

    /// Start the processes for a VM; returns once the hypervisor runs (or is
    /// waiting for restored state to be loaded and resumed).
    async fn launch(&self, plan: &LaunchPlan) -> Result<Launched, HypervisorError>;

    /// Stop the vCPUs.
    async fn pause(&self, dir: &VmDir) -> Result<(), HypervisorError>;

    /// Resume the vCPUs.
    async fn resume(&self, dir: &VmDir) -> Result<(), HypervisorError>;

    /// Save the paused or running VM's device and memory state into `dest`
    /// (an empty directory). The VM is left in the state it was in.
    async fn snapshot(&self, dir: &VmDir, dest: &Path) -> Result<(), HypervisorError>;

    /// Start the VM's vsock backend again after it died, for a hypervisor
    /// still running as `hypervisor_pid`. `None`: this driver's backend
    /// cannot be restarted under a live hypervisor (or it has none).
    async fn restart_backend(
        &self,
        _dir: &VmDir,
        _hypervisor_pid: u32,
    ) -> Result<Option<tokio::process::Child>, HypervisorError> {
        Ok(None)
    }
}

/// How long a freshly spawned process may take to serve its socket.
const SOCKET_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Wait until `path` accepts connections, failing fast if `child` exits (the
/// error quotes the tail of `logs`) and killing it if the deadline passes.
pub(crate) async fn wait_for_socket(
    path: &Path,
    child: &mut tokio::process::Child,
    what: &'static str,
    logs: &[PathBuf],
) -> Result<(), HypervisorError> {
    let deadline = std::time::Instant::now() + SOCKET_TIMEOUT;
    loop {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(HypervisorError::EarlyExit {
                what,
                status: crate::process::describe_exit(&status),
                log: tail(logs),
            });
        }
        if std::time::Instant::now() > deadline {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(HypervisorError::NotReady(what));
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// The last non-empty lines of the first of `logs` that has any, to put a
/// process's own words into an error.
pub(crate) fn tail(logs: &[PathBuf]) -> String {
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if !lines.is_empty() {
            let start = lines.len().saturating_sub(5);
            return format!("{}: {}", log.display(), lines[start..].join(" | "));
        }
    }
    match logs.first() {
        Some(log) => format!("{} (no output)", log.display()),
        None => "(no output)".to_string(),
    }
}
