//! QEMU driver: `-M microvm` with qboot and a PVH `vmlinux`, QMP for
//! pause/resume/snapshot, TCG or KVM. The guest's vsock transport is either
//! `vhost-device-vsock` (`vhost-user-vsock-device` over a shared memfd memory
//! backend; QEMU refuses to migrate it) or a virtio-serial port carrying
//! `polydev-mux`, bridged by `polydev vsock-bridge` to the same hybrid vsock
//! socket (migratable, so snapshots work). Either way the host side sees one
//! `vsock.sock` per VM.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use polydev_api::vm::{Accel, HypervisorKind};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{wait_for_socket, Hypervisor, HypervisorError, LaunchPlan, Launched};
use crate::config::QemuVsock;
use crate::process::spawn_logged_in;
use crate::vmdir::VmDir;

/// Guest CID given to every QEMU VM. Each VM has its own vsock backend and
/// its own sibling group, so equal CIDs never meet.
pub const GUEST_CID: u32 = 3;

/// File name of the memory/device state inside a snapshot directory.
pub const STATE_FILE: &str = "state.bin";

/// The QEMU driver.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// `qemu-system-x86_64`.
    pub qemu_bin: PathBuf,
    /// qboot firmware.
    pub qboot: PathBuf,
    /// `vhost-device-vsock`.
    pub vhost_vsock_bin: PathBuf,
    /// vsock transport.
    pub vsock: QemuVsock,
    /// Binary providing `vsock-bridge` (the `polydev` binary).
    pub bridge_bin: PathBuf,
    /// TCG translation cache per VM in MiB (QEMU's default is 1 GiB, which
    /// a browser fills: it would be most of an idle VM's host memory).
    pub tcg_tb_mib: u32,
    /// Run QEMU under its seccomp filter ([`SANDBOX`]).
    pub sandbox: bool,
}

/// QEMU's seccomp filter (`-sandbox`): besides QEMU's default deny list,
/// no obsolete syscalls, no set*id (QEMU never needs to change user; we
/// start it as the user it should run as), no fork/exec (nothing in our
/// use of QEMU spawns: snapshots migrate to a `file:` URI, not `exec:`),
/// no changes of scheduling or resource limits. A guest that escapes into
/// QEMU is then confined to the syscalls a running VM needs.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// [`SANDBOX`] for a QEMU that switches to the VM's own user
/// (`-run-with user=`): QEMU installs the filter before it switches, so
/// set*id stays allowed; once switched, without root, it cannot raise its
/// privileges again anyway.
pub const SANDBOX_SWITCHING: &str = "on,obsolete=deny,spawn=deny,resourcecontrol=deny";

impl Qemu {
    /// The QEMU command line for a plan (without the binary).
    pub fn args(&self, plan: &LaunchPlan) -> Vec<String> {
        let d = &plan.dir;
        let mem = plan.spec.memory_mib;
        let (accel, cpu) = match plan.accel {
            // kvm_pvm and some nested setups reject the arch-capabilities MSR.
            Accel::Kvm => ("kvm".to_string(), "host,-arch-capabilities"),
            Accel::Tcg => (format!("tcg,tb-size={}", self.tcg_tb_mib), "max"),
        };
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("polydev-{}", plan.id),
            // ACPI stays on: virtio-mmio discovery and poweroff need it.
            "-M".into(),
            "microvm,acpi=on,pit=off,pic=off,rtc=on".into(),
            "-accel".into(),
            accel,
            "-cpu".into(),
            cpu.into(),
            "-smp".into(),
            plan.spec.vcpus.to_string(),
            "-m".into(),
            format!("{mem}M"),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-bios".into(),
            self.qboot.display().to_string(),
            "-kernel".into(),
            plan.spec.kernel.display().to_string(),
            "-initrd".into(),
            plan.spec.initramfs.display().to_string(),
            "-append".into(),
            plan.cmdline.clone(),
            // The console goes to the host agent, which caps console.log
            // (crate::console); a file chardev would grow without bound.
            // QEMU serves it (a restarted host agent connects again) and
            // waits for the host before running the guest.
            "-chardev".into(),
            format!(
                "socket,id=console,path={},server=on,wait=on",
                d.console_sock().display()
            ),
            "-serial".into(),
            "chardev:console".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", d.control().display()),
        ];
        match self.vsock {
            QemuVsock::VhostUser => a.extend([
                // vhost-user needs guest memory the backend can map.
                "-object".into(),
                format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
                "-numa".into(),
                "node,memdev=mem".into(),
                "-chardev".into(),
                format!("socket,id=vsock,path={}", d.vhost().display()),
                "-device".into(),
                "vhost-user-vsock-device,chardev=vsock".into(),
            ]),
            QemuVsock::SerialMux => a.extend([
                "-device".into(),
                "virtio-serial-device,max_ports=2".into(),
                "-chardev".into(),
                format!(
                    "socket,id=mux,path={},server=on,wait=off",
                    d.mux().display()
                ),
                "-device".into(),
                "virtserialport,chardev=mux,name=polydev.mux".into(),
            ]),
        }
        // The golden image first, so the guest sees it as /dev/vda and the
        // data disk as /dev/vdb (ResolvedSpec::root_cmdline). Read-only and
        // shared by every VM of the image: nothing is copied, and the host
        // page cache serves all of them.
        if let Some(root) = &plan.spec.rootfs {
            a.push("-drive".into());
            a.push(format!(
                "file={},format=raw,if=none,id=root,readonly=on,aio=threads",
                // QEMU option syntax: a literal comma is written twice.
                root.path.display().to_string().replace(',', ",,")
            ));
            a.push("-device".into());
            a.push("virtio-blk-device,drive=root".into());
        }
        if plan.spec.data_disk_mib > 0 {
            // Opened by us and passed in (see `data_disk_fds`): QEMU reopens
            // the disk when it deactivates and activates it around a
            // snapshot, which it could not do by path as its own user. No
            // image locking: the set keeps every descriptor QEMU took locks
            // through open, so its own locks would outlive each reopen and
            // refuse the next; the disk is this VM's alone anyway.
            for (fd, opaque) in [(3, "data-rw"), (4, "data-ro")] {
                a.push("-add-fd".into());
                a.push(format!("fd={fd},set={DATA_FDSET},opaque={opaque}"));
            }
            a.push("-drive".into());
            a.push(format!(
                "file=/dev/fdset/{DATA_FDSET},file.locking=off,format=raw,if=none,id=data,cache=none,aio=threads"
            ));
            a.push("-device".into());
            a.push("virtio-blk-device,drive=data".into());
        }
        // Free page reporting: the guest hands back pages it has freed, so an
        // idle VM's host memory follows what it uses now, not its peak (a
        // browser VM's boot touches far more than it keeps). After the
        // disks, so they keep their virtio-mmio slots (vda, vdb).
        a.push("-device".into());
        a.push("virtio-balloon-device,free-page-reporting=on".into());
        if let Some(uid) = plan.run_as {
            // QEMU opens every file, disk and socket it is given on its
            // command line as root, then runs the guest as a user of the
            // VM's own that owns nothing: a guest escaping into QEMU can
            // neither read the host's files nor touch another VM's QEMU.
            a.push("-run-with".into());
            a.push(format!("user={uid}:{uid}"));
        }
        if self.sandbox {
            a.push("-sandbox".into());
            a.push(
                if plan.run_as.is_some() {
                    SANDBOX_SWITCHING
                } else {
                    SANDBOX
                }
                .into(),
            );
        }
        if plan.restore_from.is_some() {
            a.push("-incoming".into());
            a.push("defer".into());
        }
        a
    }

    async fn start_backend(
        &self,
        plan: &LaunchPlan,
    ) -> Result<tokio::process::Child, HypervisorError> {
        let d = &plan.dir;
        let mut cmd = tokio::process::Command::new(&self.vhost_vsock_bin);
        cmd.arg("--vm").arg(format!(
            "guest-cid={GUEST_CID},socket={},uds-path={},groups={}",
            d.vhost().display(),
            d.vsock().display(),
            // A group of its own: VMs in one group can reach each other.
            plan.id
        ));
        let mut child = spawn_logged_in(&mut cmd, &d.backend_log(), d).map_err(|source| {
            HypervisorError::Spawn {
                what: "vhost-device-vsock",
                path: self.vhost_vsock_bin.display().to_string(),
                source,
            }
        })?;
        wait_for_socket(
            &d.vhost(),
            &mut child,
            "vhost-device-vsock",
            &[d.backend_log()],
        )
        .await?;
        Ok(child)
    }
}

impl Qemu {
    async fn start_bridge(
        &self,
        d: &VmDir,
        qemu_pid: Option<u32>,
    ) -> Result<tokio::process::Child, HypervisorError> {
        let mut cmd = tokio::process::Command::new(&self.bridge_bin);
        cmd.arg("vsock-bridge")
            .arg("--chardev")
            .arg(d.mux())
            .arg("--uds")
            .arg(d.vsock());
        if let Some(pid) = qemu_pid {
            cmd.arg("--watch-pid").arg(pid.to_string());
        }
        let mut child = spawn_logged_in(&mut cmd, &d.backend_log(), d).map_err(|source| {
            HypervisorError::Spawn {
                what: "polydev vsock-bridge",
                path: self.bridge_bin.display().to_string(),
                source,
            }
        })?;
        wait_for_socket(&d.vsock(), &mut child, "vsock-bridge", &[d.backend_log()]).await?;
        Ok(child)
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Qemu
    }

    async fn launch(&self, plan: &LaunchPlan) -> Result<Launched, HypervisorError> {
        let d = &plan.dir;
        // vhost-user: the backend serves the socket QEMU connects to, so it
        // starts first. Serial mux: QEMU serves the chardev the bridge
        // connects to, so the bridge starts after QEMU.
        let mut backend = match self.vsock {
            QemuVsock::VhostUser => Some(self.start_backend(plan).await?),
            QemuVsock::SerialMux => None,
        };
        let mut cmd = tokio::process::Command::new(&self.qemu_bin);
        cmd.args(self.args(plan));
        if plan.spec.data_disk_mib > 0 {
            crate::process::pass_fds(&mut cmd, data_disk_fds(&d.data_disk())?)?;
        }
        let mut qemu = match spawn_logged_in(&mut cmd, &d.hypervisor_log(), d) {
            Ok(c) => c,
            Err(source) => {
                if let Some(mut b) = backend {
                    let _ = b.start_kill();
                    let _ = b.wait().await;
                }
                return Err(HypervisorError::Spawn {
                    what: "qemu-system-x86_64",
                    path: self.qemu_bin.display().to_string(),
                    source,
                });
            }
        };
        let ready = async {
            wait_for_socket(&d.control(), &mut qemu, "qemu", &[d.hypervisor_log()]).await?;
            if self.vsock == QemuVsock::SerialMux {
                backend = Some(self.start_bridge(&plan.dir, qemu.id()).await?);
            }
            if let Some(snap) = &plan.restore_from {
                let mut q = Qmp::connect(&d.control()).await?;
                // Opened here and handed over: QEMU may run as a user that
                // cannot open anything in the host's directories.
                let state = std::fs::File::open(snap.join(STATE_FILE))?;
                let set = q.add_fd(&state).await?;
                let uri = format!("file:/dev/fdset/{set}");
                q.execute("migrate-incoming", json!({ "uri": uri })).await?;
                q.wait_migration("restore").await?;
                q.execute("cont", json!({})).await?;
            }
            Ok::<(), HypervisorError>(())
        };
        let result = ready.await;
        if let Err(e) = result {
            let _ = qemu.start_kill();
            let _ = qemu.wait().await;
            if let Some(mut b) = backend {
                let _ = b.start_kill();
                let _ = b.wait().await;
            }
            return Err(e);
        }
        Ok(Launched {
            hypervisor: qemu,
            backend,
        })
    }

    /// The bridge holds no state the guest depends on: a new one connects
    /// to QEMU's chardev and the mux resynchronises (HELLO/nonce), resetting
    /// the streams that were open. vhost-device-vsock cannot be replaced
    /// under a running QEMU.
    async fn restart_backend(
        &self,
        dir: &VmDir,
        hypervisor_pid: u32,
    ) -> Result<Option<tokio::process::Child>, HypervisorError> {
        match self.vsock {
            QemuVsock::SerialMux => {
                // The dead bridge's socket would make the new one's
                // readiness check pass at once.
                let _ = std::fs::remove_file(dir.vsock());
                Ok(Some(self.start_bridge(dir, Some(hypervisor_pid)).await?))
            }
            QemuVsock::VhostUser => Ok(None),
        }
    }

    async fn pause(&self, dir: &VmDir) -> Result<(), HypervisorError> {
        Qmp::connect(&dir.control())
            .await?
            .execute("stop", json!({}))
            .await?;
        Ok(())
    }

    async fn resume(&self, dir: &VmDir) -> Result<(), HypervisorError> {
        Qmp::connect(&dir.control())
            .await?
            .execute("cont", json!({}))
            .await?;
        Ok(())
    }

    async fn snapshot(&self, dir: &VmDir, dest: &Path) -> Result<(), HypervisorError> {
        let mut q = Qmp::connect(&dir.control()).await?;
        let status = q.execute("query-status", json!({})).await?;
        let was_running = status
            .get("running")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if was_running {
            q.execute("stop", json!({})).await?;
        }
        let result = async {
            // Created here (0600 whatever the umask) and handed over: QEMU
            // may run as a user that cannot create files in the host's
            // directories.
            let state = crate::private::create_file(&dest.join(STATE_FILE))?;
            let set = q.add_fd(&state).await?;
            let uri = format!("file:/dev/fdset/{set}");
            q.execute("migrate", json!({ "uri": uri })).await?;
            q.wait_migration("snapshot").await
        }
        .await;
        if was_running {
            q.execute("cont", json!({})).await?;
        }
        result
    }
}

/// The first uid of QEMU's per-VM users, if QEMU is to run as them: asked
/// for ([`crate::config::Confinement::qemu_uid_base`]), possible (we are
/// root) and supported (QEMU 9 and later have `-run-with`). Says which in
/// the log.
pub fn users(cfg: &crate::config::HostConfig) -> Option<u32> {
    let base = cfg.confinement.qemu_uid_base?;
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        tracing::warn!(
            "QEMU runs as the host agent's own user: switching to per-VM users needs root"
        );
        return None;
    }
    let help = std::process::Command::new(&cfg.qemu_bin)
        .arg("-help")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    match help {
        Ok(o) if String::from_utf8_lossy(&o.stdout).contains("-run-with") => {
            tracing::info!(
                "QEMU VMs run as users of their own, uid and gid {base} to {}",
                base.saturating_add(crate::config::QEMU_UIDS - 1)
            );
            Some(base)
        }
        _ => {
            tracing::warn!(
                "{} has no -run-with (QEMU 9 or later has): QEMU VMs run as root",
                cfg.qemu_bin.display()
            );
            None
        }
    }
}

/// The fd set QEMU finds the data disk's descriptors in.
const DATA_FDSET: u32 = 1000;

/// The data disk opened read-write and read-only, for QEMU's fd set (it
/// picks the one whose access mode it needs), with O_DIRECT as QEMU's
/// `cache=none` opens it.
fn data_disk_fds(path: &Path) -> Result<Vec<std::os::fd::OwnedFd>, HypervisorError> {
    use std::os::unix::fs::OpenOptionsExt;
    [true, false]
        .into_iter()
        .map(|write| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(libc::O_DIRECT | libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)
                .map(std::os::fd::OwnedFd::from)
                .map_err(|e| HypervisorError::Control {
                    op: "opening the data disk",
                    message: format!(
                        "{}: {e} (it needs a file system with O_DIRECT, as QEMU's cache=none does)",
                        path.display()
                    ),
                })
        })
        .collect()
}

/// One QMP command as a line.
fn command_line(cmd: &str, args: Value) -> String {
    let mut msg = json!({ "execute": cmd });
    if args.as_object().is_some_and(|o| !o.is_empty()) {
        msg["arguments"] = args;
    }
    let mut line = msg.to_string();
    line.push('\n');
    line
}

/// A minimal QMP client: one command at a time, events skipped.
pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    /// Connect and negotiate capabilities.
    pub async fn connect(path: &Path) -> Result<Self, HypervisorError> {
        let s = UnixStream::connect(path).await?;
        let (r, w) = s.into_split();
        let mut q = Qmp {
            reader: BufReader::new(r),
            writer: w,
        };
        let mut greeting = String::new();
        q.reader.read_line(&mut greeting).await?;
        if !greeting.contains("QMP") {
            return Err(HypervisorError::Control {
                op: "qmp handshake",
                message: greeting,
            });
        }
        q.execute("qmp_capabilities", json!({})).await?;
        Ok(q)
    }

    /// Run one command and return its `return` value.
    pub async fn execute(
        &mut self,
        cmd: &'static str,
        args: Value,
    ) -> Result<Value, HypervisorError> {
        self.writer
            .write_all(command_line(cmd, args).as_bytes())
            .await?;
        self.reply(cmd).await
    }

    /// Hand `file` to QEMU in a new fd set (`add-fd`, the descriptor
    /// passed with the command as SCM_RIGHTS) and return the set's id, for
    /// a later `/dev/fdset/ID` path. QEMU opens such a path by duplicating
    /// the set's descriptor of the same access mode.
    pub async fn add_fd(&mut self, file: &impl std::os::fd::AsFd) -> Result<u64, HypervisorError> {
        let line = command_line("add-fd", json!({}));
        let sock: &UnixStream = self.writer.as_ref();
        let fd = file.as_fd();
        let sent = loop {
            sock.writable().await?;
            match sock.try_io(tokio::io::Interest::WRITABLE, || {
                crate::private::send_with_fd(sock, line.as_bytes(), fd)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        };
        // The descriptor went with the first byte; the rest of a short
        // write follows as plain data.
        self.writer.write_all(&line.as_bytes()[sent..]).await?;
        let r = self.reply("add-fd").await?;
        r.get("fdset-id")
            .and_then(Value::as_u64)
            .ok_or_else(|| HypervisorError::Control {
                op: "add-fd",
                message: format!("no fdset-id in {r}"),
            })
    }

    /// Read until the answer to `cmd`, skipping events.
    async fn reply(&mut self, cmd: &'static str) -> Result<Value, HypervisorError> {
        loop {
            let mut buf = String::new();
            let n = tokio::time::timeout(Duration::from_secs(30), self.reader.read_line(&mut buf))
                .await
                .map_err(|_| HypervisorError::NotReady("qmp"))??;
            if n == 0 {
                return Err(HypervisorError::Control {
                    op: cmd,
                    message: "QMP connection closed".into(),
                });
            }
            let v: Value = serde_json::from_str(&buf).map_err(|e| HypervisorError::Control {
                op: cmd,
                message: format!("invalid QMP reply: {e}"),
            })?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(HypervisorError::Control {
                    op: cmd,
                    message: e
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown error")
                        .to_string(),
                });
            }
            // Anything else is an asynchronous event; skip it.
        }
    }

    /// Poll `query-migrate` until the migration completes or fails.
    pub async fn wait_migration(&mut self, op: &'static str) -> Result<(), HypervisorError> {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let r = self.execute("query-migrate", json!({})).await?;
            match r.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    return Err(HypervisorError::Control {
                        op,
                        message: r
                            .get("error-desc")
                            .and_then(Value::as_str)
                            .unwrap_or("migration failed")
                            .to_string(),
                    })
                }
                None => {
                    // No migration at all: QEMU refused to start it.
                    let reasons = r
                        .get("blocked-reasons")
                        .map(|b| b.to_string())
                        .unwrap_or_else(|| r.to_string());
                    return Err(HypervisorError::Control {
                        op,
                        message: format!("migration did not start: {reasons}"),
                    });
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(HypervisorError::NotReady("migration"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
