//! Firecracker driver: one `firecracker` process per VM, configured and
//! controlled through its HTTP API on the VM's control socket
//! ([`VmDir::control`]). Firecracker provides the hybrid vsock socket
//! ([`VmDir::vsock`]) itself, so there is no backend process, and snapshots
//! are its native `vmstate` + `memory` pair.
//!
//! # Files and paths
//!
//! The process runs with the VM's state directory as its working directory,
//! and everything the VM owns is addressed **relative** to it:
//!
//! - `vsock.sock` (and the `vsock.sock_<port>` listeners for guest-initiated
//!   streams). Firecracker stores this path in a snapshot; because it is
//!   relative, a VM restored from that snapshot in another directory binds
//!   its socket in *its own* directory.
//! - `data.img`, the optional writable data disk (also stored in snapshots,
//!   so a restored VM needs its own `data.img`).
//! - `hypervisor.log`: Firecracker's own log (`--log-path`).
//!
//! The guest serial console is Firecracker's stdout, a FIFO the host reads
//! into the capped `console.log` ([`crate::console::start_fifo`]);
//! Firecracker's stderr (and the jailer's) goes to `hypervisor.log`, where
//! its logger writes too: errors from before the logger runs land there.
//!
//! The API socket is passed as an absolute path so that the command line
//! names the state directory, which is how the manager recognises the
//! process after a restart (see [`crate::process::alive_with`]).
//! Paths that live outside the state directory (kernel, initramfs, snapshot
//! files) are passed as absolute paths, resolved against *our* working
//! directory, because Firecracker resolves relative paths against its own.
//!
//! # Under the jailer
//!
//! With [`Firecracker::jailer`] set, the process is started by `jailer`
//! (chroot, mount namespace, unprivileged uid/gid); the relative layout
//! above is what makes that work. See [`super::jailer`] for what crosses
//! the chroot boundary. Without it (tests, development) Firecracker runs
//! as the host agent's user.
//!
//! # Memory of restored VMs
//!
//! A restored VM maps the snapshot's `memory` file privately (copy on
//! write), so that file must stay in place, unmodified, for as long as the
//! restored VM runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use polydev_api::vm::{Accel, HypervisorKind};
use serde_json::{json, Value};
use tokio::net::UnixStream;

use super::jailer::{self, Jailer};
use super::{wait_for_socket, Hypervisor, HypervisorError, LaunchPlan, Launched};
use crate::process::spawn_with_stdio_in;
use crate::vmdir::VmDir;

/// Guest CID given to every Firecracker VM. Each VM has its own vsock
/// device and socket, so equal CIDs never meet.
pub const GUEST_CID: u32 = 3;

/// File name of the device/vCPU state inside a snapshot directory.
pub const STATE_FILE: &str = "vmstate";

/// File name of the guest memory inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// Drive id of the writable data disk.
pub const DATA_DRIVE_ID: &str = "data";

/// Limit for ordinary API calls (configuration, pause, resume, start).
const API_TIMEOUT: Duration = Duration::from_secs(30);

/// Limit for snapshot create/load, which copy or map all of guest memory.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// The Firecracker driver.
#[derive(Debug, Clone)]
pub struct Firecracker {
    /// The `firecracker` binary.
    pub bin: PathBuf,
    /// Start it through this jailer (`None`: directly, as our own user).
    pub jailer: Option<Jailer>,
}

/// Snapshot files as Firecracker writes them inside a jail, before they
/// are moved out (distinct from a restore's hard-linked inputs).
const JAILED_SNAPSHOT: (&str, &str) = ("snapshot.vmstate", "snapshot.memory");

impl Firecracker {
    /// A driver running the `firecracker` binary at `bin`.
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Firecracker {
            bin: bin.into(),
            jailer: None,
        }
    }

    /// The same driver, started through `jailer` when given.
    pub fn with_jailer(mut self, jailer: Option<Jailer>) -> Self {
        self.jailer = jailer;
        self
    }

    /// The jail's root for the VM in `dir`, when jailed.
    fn jail_root(&self, dir: &VmDir) -> Result<Option<PathBuf>, HypervisorError> {
        if self.jailer.is_none() {
            return Ok(None);
        }
        let id = dir
            .root()
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| HypervisorError::Unsupported("VM directory without a name".into()))?;
        Jailer::root(dir, &self.bin, id).map(Some)
    }

    /// The command line for a plan (without the binary).
    pub fn args(&self, plan: &LaunchPlan) -> Result<Vec<String>, HypervisorError> {
        // Absolute, so that the command line names the state directory (the
        // manager matches it against /proc/<pid>/cmdline) and so that it
        // does not depend on the working directory we give the process.
        let api_sock = std::path::absolute(plan.dir.control())?;
        let mut a = vec![
            "--api-sock".to_string(),
            api_sock.display().to_string(),
            "--log-path".to_string(),
            file_name(&plan.dir.hypervisor_log())?,
            "--level".to_string(),
            "Info".to_string(),
            "--show-level".to_string(),
        ];
        // Firecracker refuses ids it considers invalid; the id only labels
        // log lines, so an unusual one is left out rather than fail the VM.
        // The jailer passes its own --id.
        if valid_instance_id(&plan.id) && self.jailer.is_none() {
            a.push("--id".to_string());
            a.push(plan.id.clone());
        }
        Ok(a)
    }

    /// Configure and start a freshly spawned, unconfigured Firecracker.
    async fn configure_and_start(
        &self,
        plan: &LaunchPlan,
        api: &Api,
        jailed: bool,
    ) -> Result<(), HypervisorError> {
        // In a jail, the copies `Jailer::prepare` made at its root.
        let (kernel, initrd) = if jailed {
            (jailer::KERNEL.to_string(), jailer::INITRAMFS.to_string())
        } else {
            (
                path_string(&std::path::absolute(&plan.spec.kernel)?)?,
                path_string(&std::path::absolute(&plan.spec.initramfs)?)?,
            )
        };
        let d = &plan.dir;
        api.call(
            Method::PUT,
            "/machine-config",
            Some(json!({
                "vcpu_count": plan.spec.vcpus,
                "mem_size_mib": plan.spec.memory_mib,
            })),
            "machine configuration",
            API_TIMEOUT,
        )
        .await?;
        api.call(
            Method::PUT,
            "/boot-source",
            Some(json!({
                "kernel_image_path": kernel,
                "initrd_path": initrd,
                "boot_args": plan.cmdline,
            })),
            "boot source",
            API_TIMEOUT,
        )
        .await?;
        if plan.spec.data_disk_mib > 0 {
            api.call(
                Method::PUT,
                &format!("/drives/{DATA_DRIVE_ID}"),
                Some(json!({
                    "drive_id": DATA_DRIVE_ID,
                    // Relative: resolves in the VM's own directory (cwd).
                    "path_on_host": file_name(&d.data_disk())?,
                    "is_root_device": false,
                    "is_read_only": false,
                })),
                "data disk",
                API_TIMEOUT,
            )
            .await?;
        }
        api.call(
            Method::PUT,
            "/vsock",
            Some(json!({
                "guest_cid": GUEST_CID,
                // Relative: snapshots store it, and a restored VM must bind
                // it in its own directory, not in the original VM's.
                "uds_path": file_name(&d.vsock())?,
            })),
            "vsock device",
            API_TIMEOUT,
        )
        .await?;
        api.call(
            Method::PUT,
            "/actions",
            Some(json!({ "action_type": "InstanceStart" })),
            "instance start",
            API_TIMEOUT,
        )
        .await?;
        Ok(())
    }

    /// Load a snapshot into a freshly spawned Firecracker and resume it.
    async fn restore(&self, snap: &Path, api: &Api, jailed: bool) -> Result<(), HypervisorError> {
        // In a jail, the hard links `launch` made at its root.
        let (state, memory) = if jailed {
            (STATE_FILE.to_string(), MEMORY_FILE.to_string())
        } else {
            let snap = std::path::absolute(snap)?;
            (
                path_string(&snap.join(STATE_FILE))?,
                path_string(&snap.join(MEMORY_FILE))?,
            )
        };
        api.call(
            Method::PUT,
            "/snapshot/load",
            Some(json!({
                "snapshot_path": state,
                "mem_backend": {
                    "backend_type": "File",
                    "backend_path": memory,
                },
                "resume_vm": true,
            })),
            "snapshot load",
            SNAPSHOT_TIMEOUT,
        )
        .await?;
        Ok(())
    }
}

#[async_trait]
impl Hypervisor for Firecracker {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Firecracker
    }

    async fn launch(&self, plan: &LaunchPlan) -> Result<Launched, HypervisorError> {
        if plan.accel != Accel::Kvm {
            return Err(HypervisorError::Unsupported(
                "firecracker needs KVM; use the qemu hypervisor on hosts without it".into(),
            ));
        }
        let d = &plan.dir;
        let jail = self.jail_root(d)?;
        let mut cmd = match (&self.jailer, &jail) {
            (Some(j), Some(root)) => {
                if !valid_instance_id(&plan.id) {
                    return Err(HypervisorError::Unsupported(format!(
                        "the jailer refuses the id {:?}",
                        plan.id
                    )));
                }
                j.prepare(d, root, &plan.spec.kernel, &plan.spec.initramfs)?;
                if let Some(snap) = &plan.restore_from {
                    for f in [STATE_FILE, MEMORY_FILE] {
                        j.link_snapshot(&snap.join(f), &root.join(f))?;
                    }
                }
                let mut c = tokio::process::Command::new(&j.bin);
                c.args(j.args(d, &self.bin, &plan.id, &self.args(plan)?));
                c
            }
            _ => {
                let mut c = tokio::process::Command::new(&self.bin);
                c.args(self.args(plan)?);
                c
            }
        };
        cmd.current_dir(d.root());
        // stdout is the guest serial console: a FIFO the host reads into
        // the capped console.log (crate::console). stderr (what Firecracker
        // or the jailer says before its logger runs) goes to
        // hypervisor.log, whoever reads the console.
        if jail.is_some() {
            // The jailer creates the jail's directories and copies
            // Firecracker in, which must stay traversable and executable
            // for the jail's user (0177 made the copy 0600: EACCES at its
            // exec). The jail is inside the 0700 VM directory.
            crate::private::umask(&mut cmd, 0o022);
        } else {
            crate::private::restrictive_umask(&mut cmd);
        }
        let mut child = crate::console::open_fifo_writer(&d.console_fifo())
            .and_then(|out| Ok((out, crate::process::open_log(&d.hypervisor_log())?)))
            .and_then(|(out, err)| spawn_with_stdio_in(&mut cmd, out, err, d))
            .map_err(|source| HypervisorError::Spawn {
                what: if jail.is_some() {
                    "jailer"
                } else {
                    "firecracker"
                },
                path: self.bin.display().to_string(),
                source,
            })?;
        let logs = [d.hypervisor_log(), d.console_log()];
        let ready = async {
            // Firecracker's logger may never start (argument errors go to
            // stdout), so fall back to the console log.
            match &jail {
                Some(root) => {
                    let inner = root.join(d.control().strip_prefix("/").unwrap_or(&d.control()));
                    jailer::link_out_socket(&inner, &d.control(), &mut child, &logs).await?;
                }
                None => wait_for_socket(&d.control(), &mut child, "firecracker", &logs).await?,
            }
            let api = Api::new(d.control());
            match &plan.restore_from {
                Some(snap) => self.restore(snap, &api, jail.is_some()).await?,
                None => self.configure_and_start(plan, &api, jail.is_some()).await?,
            }
            // The vsock device bound its socket inside the jail.
            if let Some(root) = &jail {
                jailer::link_out_socket(
                    &root.join(file_name(&d.vsock())?),
                    &d.vsock(),
                    &mut child,
                    &logs,
                )
                .await?;
            }
            Ok::<(), HypervisorError>(())
        };
        if let Err(e) = ready.await {
            // Nothing half-started: a process that failed any step is gone.
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(e);
        }
        Ok(Launched {
            hypervisor: child,
            backend: None,
        })
    }

    async fn pause(&self, dir: &VmDir) -> Result<(), HypervisorError> {
        Api::new(dir.control()).set_state("Paused", "pause").await
    }

    async fn resume(&self, dir: &VmDir) -> Result<(), HypervisorError> {
        Api::new(dir.control()).set_state("Resumed", "resume").await
    }

    async fn snapshot(&self, dir: &VmDir, dest: &Path) -> Result<(), HypervisorError> {
        let api = Api::new(dir.control());
        let info = api
            .call(Method::GET, "/", None, "instance info", API_TIMEOUT)
            .await?;
        let state = info.get("state").and_then(Value::as_str).unwrap_or("");
        let was_running = match state {
            "Running" => true,
            "Paused" => false,
            other => {
                return Err(HypervisorError::Control {
                    op: "snapshot",
                    message: format!("the VM is not running (state {other:?})"),
                })
            }
        };
        if was_running {
            api.set_state("Paused", "pause").await?;
        }
        let dest = std::path::absolute(dest)?;
        let jail = self.jail_root(dir)?;
        let result = async {
            // A jailed Firecracker writes inside its jail; the files move out.
            let (state, memory) = match &jail {
                Some(_) => (JAILED_SNAPSHOT.0.to_string(), JAILED_SNAPSHOT.1.to_string()),
                None => (
                    path_string(&dest.join(STATE_FILE))?,
                    path_string(&dest.join(MEMORY_FILE))?,
                ),
            };
            api.call(
                Method::PUT,
                "/snapshot/create",
                Some(json!({
                    "snapshot_type": "Full",
                    "snapshot_path": state,
                    "mem_file_path": memory,
                })),
                "snapshot create",
                SNAPSHOT_TIMEOUT,
            )
            .await?;
            if let Some(root) = &jail {
                jailer::move_out_file(&root.join(JAILED_SNAPSHOT.0), &dest.join(STATE_FILE))?;
                jailer::move_out_file(&root.join(JAILED_SNAPSHOT.1), &dest.join(MEMORY_FILE))?;
            }
            Ok::<_, HypervisorError>(())
        }
        .await;
        // Leave the VM as it was even when the snapshot failed; the
        // snapshot's error is the one worth reporting.
        if was_running {
            let resumed = api.set_state("Resumed", "resume").await;
            result?;
            resumed?;
        } else {
            result?;
        }
        Ok(())
    }
}

/// A client of one Firecracker API socket: one connection per request,
/// which keeps it independent of the server's keep-alive behaviour.
struct Api {
    socket: PathBuf,
}

impl Api {
    fn new(socket: PathBuf) -> Self {
        Api { socket }
    }

    /// `PATCH /vm` with the given state.
    async fn set_state(&self, state: &str, op: &'static str) -> Result<(), HypervisorError> {
        self.call(
            Method::PATCH,
            "/vm",
            Some(json!({ "state": state })),
            op,
            API_TIMEOUT,
        )
        .await?;
        Ok(())
    }

    /// Send one request; returns the JSON body of a successful answer
    /// (`Value::Null` when there is none) or the API's `fault_message` as a
    /// [`HypervisorError::Control`].
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        op: &'static str,
        limit: Duration,
    ) -> Result<Value, HypervisorError> {
        let stream = UnixStream::connect(&self.socket).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http_error(op, e))?;
        // The connection is driven by its own task; aborted below so that a
        // timed-out request leaves nothing behind.
        let conn = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("accept", "application/json");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| http_error(op, e))?;
        let exchange = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| http_error(op, e))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| http_error(op, e))?
                .to_bytes();
            Ok::<_, HypervisorError>((status, body))
        };
        let outcome = tokio::time::timeout(limit, exchange).await;
        conn.abort();
        let (status, body) = match outcome {
            Ok(r) => r?,
            Err(_) => return Err(HypervisorError::NotReady("the firecracker API")),
        };
        let json: Option<Value> = if body.is_empty() {
            None
        } else {
            serde_json::from_slice(&body).ok()
        };
        if status.is_success() {
            return Ok(json.unwrap_or(Value::Null));
        }
        let message = json
            .as_ref()
            .and_then(|v| v.get("fault_message"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim()));
        Err(HypervisorError::Control { op, message })
    }
}

fn http_error(op: &'static str, e: impl std::fmt::Display) -> HypervisorError {
    HypervisorError::Control {
        op,
        message: format!("API request failed: {e}"),
    }
}

/// The last component of a path inside the VM directory, used as a path
/// relative to Firecracker's working directory.
fn file_name(p: &Path) -> Result<String, HypervisorError> {
    p.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| {
            HypervisorError::Unsupported(format!("not a usable file name: {}", p.display()))
        })
}

/// A path as the UTF-8 string the JSON API needs.
fn path_string(p: &Path) -> Result<String, HypervisorError> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| HypervisorError::Unsupported(format!("path is not UTF-8: {}", p.display())))
}

/// Firecracker's rule for `--id`: 1 to 64 ASCII letters, digits and '-'.
fn valid_instance_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids() {
        assert!(valid_instance_id("vm-0123abcd"));
        assert!(!valid_instance_id(""));
        assert!(!valid_instance_id("vm_1"));
        assert!(!valid_instance_id(&"a".repeat(65)));
    }

    #[test]
    fn relative_names() {
        let d = VmDir::new(Path::new("/var/lib/polydev/vms"), "vm-1");
        assert_eq!(file_name(&d.vsock()).ok().as_deref(), Some("vsock.sock"));
        assert_eq!(file_name(&d.data_disk()).ok().as_deref(), Some("data.img"));
    }
}
