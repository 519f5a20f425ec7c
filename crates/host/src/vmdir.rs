//! The per-VM state directory and the record persisted in it.
//!
//! Every VM owns exactly one directory, `<data>/vms/<id>/`, holding its
//! sockets, pid files, disks and logs, so that cleanup is "remove one
//! directory" and nothing can collide between VMs. When a VM ends, its logs
//! and final record move to `<data>/logs/<id>/`.

use std::path::{Path, PathBuf};

use polydev_api::vm::VmInfo;
use serde::{Deserialize, Serialize};

use crate::config::ResolvedSpec;

/// Longest Unix socket path the kernel accepts (`sun_path` minus NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Paths inside one VM's state directory.
#[derive(Debug, Clone)]
pub struct VmDir {
    root: PathBuf,
}

impl VmDir {
    /// The directory for `id` under `vms_dir`.
    pub fn new(vms_dir: &Path, id: &str) -> Self {
        VmDir {
            root: vms_dir.join(id),
        }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Persisted [`VmRecord`].
    pub fn record(&self) -> PathBuf {
        self.root.join("vm.json")
    }

    /// Hybrid vsock socket (host-initiated streams).
    pub fn vsock(&self) -> PathBuf {
        self.root.join("vsock.sock")
    }

    /// Where guest-initiated streams to host port `port` arrive.
    pub fn vsock_port(&self, port: u32) -> PathBuf {
        self.root.join(format!("vsock.sock_{port}"))
    }

    /// vhost-user control socket between QEMU and the vsock backend.
    pub fn vhost(&self) -> PathBuf {
        self.root.join("vhost.sock")
    }

    /// QEMU chardev socket of the virtio-serial port carrying the stream
    /// multiplexer (the vsock transport of snapshot-capable QEMU VMs).
    pub fn mux(&self) -> PathBuf {
        self.root.join("mux.sock")
    }

    /// Hypervisor control socket (QMP or the Firecracker API).
    pub fn control(&self) -> PathBuf {
        self.root.join("control.sock")
    }

    /// Where QEMU serves its serial console (the host connects and writes
    /// what arrives to [`VmDir::console_log`]).
    pub fn console_sock(&self) -> PathBuf {
        self.root.join("console.sock")
    }

    /// The FIFO Firecracker's stdout (the serial console) is written to;
    /// the host reads it into [`VmDir::console_log`].
    pub fn console_fifo(&self) -> PathBuf {
        self.root.join("console.fifo")
    }

    /// Serial console output.
    pub fn console_log(&self) -> PathBuf {
        self.root.join("console.log")
    }

    /// Guest agent log stream, as received by the host.
    pub fn agent_log(&self) -> PathBuf {
        self.root.join("agent.log")
    }

    /// One JSON line per egress connection of the VM.
    pub fn egress_log(&self) -> PathBuf {
        self.root.join("egress.log")
    }

    /// Hypervisor's own stdout/stderr.
    pub fn hypervisor_log(&self) -> PathBuf {
        self.root.join("hypervisor.log")
    }

    /// vsock backend's stdout/stderr.
    pub fn backend_log(&self) -> PathBuf {
        self.root.join("vsock-backend.log")
    }

    /// Writable data disk, when the VM has one.
    pub fn data_disk(&self) -> PathBuf {
        self.root.join("data.img")
    }

    /// The memory and device state of a hibernated VM (a directory, 0700).
    pub fn hibernation(&self) -> PathBuf {
        self.root.join("hibernation")
    }

    /// The VM's cgroup directories, one a line (see [`crate::cgroup`]).
    pub fn cgroup(&self) -> PathBuf {
        self.root.join("cgroup")
    }

    /// Check that every socket path fits in `sun_path`, including the
    /// staging directory the host's own listeners are bound in
    /// ([`crate::private::bind`]).
    pub fn check_socket_paths(&self) -> Result<(), PathBuf> {
        for (p, extra) in [
            (self.vsock_port(65535), crate::private::BIND_STAGING_LEN),
            (self.console_sock(), 0),
            (self.vhost(), 0),
            (self.mux(), 0),
            (self.control(), 0),
        ] {
            if p.as_os_str().len() + extra > MAX_SOCKET_PATH {
                return Err(p);
            }
        }
        Ok(())
    }
}

/// What the host agent remembers about a VM across its own restarts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    /// What the API reports.
    pub info: VmInfo,
    /// The validated request it was created from.
    pub spec: ResolvedSpec,
    /// Hypervisor process.
    pub hypervisor_pid: Option<u32>,
    /// vsock backend process (QEMU only).
    pub backend_pid: Option<u32>,
    /// The uid (and gid) the hypervisor runs as, when not ours (see
    /// [`crate::hypervisor::LaunchPlan::run_as`]).
    #[serde(default)]
    pub run_as: Option<u32>,
}

impl VmRecord {
    /// Load a record from its file.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let bytes = std::fs::read(path)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Write a record atomically (temp file + rename), so a crash never
    /// leaves a torn record behind.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        write_atomic(
            path,
            &serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )
    }
}

/// Write `bytes` to `path` via a temp file in the same directory. The file
/// is created with mode 0600: records may hold egress upstream credentials.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    drop(f);
    std::fs::rename(&tmp, path)
}
