//! VM lifecycle on one host: create, watch, adopt, pause, snapshot, restore,
//! destroy — each step persisted in the VM's record so a restart of the host
//! agent resumes where it was.
//!
//! Invariant: a VM that is not `stopped`/`failed` owns exactly one state
//! directory and its processes; when it ends for any reason its processes
//! are killed and reaped, its sockets and disks removed, and its logs moved
//! to `<data>/logs/<id>/` together with its final record.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use polydev_api::agent::{self, ExecRequest, GuestConfig, Request, Response};
use polydev_api::vm::{HypervisorKind, VmInfo, VmSpec, VmState};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::agent_client::{AgentCallError, AgentClient, FrameStream};
use crate::config::{HostConfig, ResolvedSpec, SpecError};
use crate::hypervisor::qemu::Qemu;
use crate::hypervisor::{Hypervisor, HypervisorError, LaunchPlan};
use crate::process;
use crate::vmdir::{VmDir, VmRecord};
use crate::{new_id, now_ms};
use snapshots::copy_disk;

mod logs;
mod power;
mod snapshots;
mod watch;

pub use logs::LogTail;

/// Failures of VM operations, each mapping to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// No VM or snapshot with that id.
    #[error("no {what} with id {id:?}{hint}")]
    NotFound {
        /// "VM" or "snapshot".
        what: &'static str,
        /// The id asked for.
        id: String,
        /// Extra advice.
        hint: String,
    },
    /// The request is invalid.
    #[error(transparent)]
    Invalid(#[from] SpecError),
    /// The operation does not fit the VM's current state.
    #[error("{0}")]
    Conflict(String),
    /// The VM failed to start; it has been cleaned up and its logs kept.
    #[error("VM {id} failed to start: {reason}; its console and agent logs are kept (`polydev vm logs {id}`)")]
    StartFailed {
        /// The VM's id.
        id: String,
        /// Why.
        reason: String,
    },
    /// A hypervisor operation failed.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// The guest agent failed.
    #[error(transparent)]
    Agent(#[from] AgentCallError),
    /// Host file system trouble.
    #[error("host I/O error on {path}: {source}")]
    Io {
        /// Path involved.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The data directory is too deep for Unix socket paths.
    #[error("socket path {0} is longer than 107 bytes: choose a shorter --data-dir")]
    PathTooLong(String),
    /// Per-VM cgroups could not be set up.
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ManagerError + '_ {
    move |source| ManagerError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One live VM.
struct Vm {
    id: String,
    name: Option<String>,
    dir: VmDir,
    record: Mutex<VmRecord>,
    /// Watches the vsock backend and restarts it if it dies under a live
    /// hypervisor.
    backend_task: StdMutex<Option<JoinHandle<()>>>,
    watcher: StdMutex<Option<JoinHandle<()>>>,
    log_task: StdMutex<Option<JoinHandle<()>>>,
    /// Receives a QEMU VM's serial console (`console.sock`).
    console_task: StdMutex<Option<JoinHandle<()>>>,
    /// Whether the console is connected (see [`crate::console::start`]).
    console_connected: StdMutex<Option<tokio::sync::watch::Receiver<bool>>>,
    /// The VM's egress proxy (`vsock.sock_1026`).
    egress_task: StdMutex<Option<JoinHandle<()>>>,
    exited: Arc<std::sync::atomic::AtomicBool>,
    /// The uid its hypervisor runs as while it runs, 0 for none: taken at
    /// launch (or adoption), given back when the hypervisor is gone.
    run_as: std::sync::atomic::AtomicU32,
}

/// Abort the task in `slot`, if any.
fn abort(slot: &StdMutex<Option<JoinHandle<()>>>) {
    if let Some(t) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
        t.abort();
    }
}

/// Kill and reap a VM's hypervisor and vsock backend and stop its listeners.
/// Processes already gone are fine.
async fn kill_processes(vm: &Vm, hv_pid: Option<u32>, be_pid: Option<u32>) {
    let needle = vm.dir.root().display().to_string();
    if let Some(pid) = hv_pid {
        process::kill_matching(pid, &needle).await;
    }
    vm.run_as.store(0, std::sync::atomic::Ordering::SeqCst);
    let watcher = vm.watcher.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(w) = watcher {
        // The watcher reaps our own child; for an adopted one it returns
        // once the pidfd fires.
        let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
    }
    // The hypervisor is gone: let the console receiver write what QEMU had
    // already sent before it is stopped (its last words are often why).
    let connected = vm
        .console_connected
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Some(mut c) = connected {
        let _ = tokio::time::timeout(Duration::from_secs(2), c.wait_for(|up| !up)).await;
    }
    if let Some(pid) = be_pid {
        process::kill_matching(pid, &needle).await;
    }
    // The backend watcher reaps the process and, the VM no longer live,
    // does not restart it.
    let task = vm
        .backend_task
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(mut t) = task {
        if tokio::time::timeout(Duration::from_secs(10), &mut t)
            .await
            .is_err()
        {
            t.abort();
        }
    }
    vm.stop_listeners();
    // After the processes: an emptied cgroup can be removed at once.
    crate::cgroup::remove(&vm.dir).await;
}

/// A VM's vsock backend process as the manager knows it.
enum BackendProc {
    /// Started by this host agent.
    Child(tokio::process::Child),
    /// Found running when the host agent started.
    Adopted(u32),
}

impl Vm {
    /// A VM known by its state directory and record, with nothing running yet.
    fn new(id: String, dir: VmDir, record: VmRecord) -> Arc<Self> {
        Arc::new(Vm {
            id,
            name: record.info.name.clone(),
            dir,
            record: Mutex::new(record),
            backend_task: StdMutex::new(None),
            watcher: StdMutex::new(None),
            log_task: StdMutex::new(None),
            console_task: StdMutex::new(None),
            console_connected: StdMutex::new(None),
            egress_task: StdMutex::new(None),
            exited: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            run_as: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// Stop receiving the guest's console, log and egress streams.
    fn stop_listeners(&self) {
        abort(&self.log_task);
        abort(&self.console_task);
        abort(&self.egress_task);
    }

    fn agent(&self) -> AgentClient {
        AgentClient::new(&self.dir.vsock())
    }
}

/// Owns every VM on this host.
pub struct Manager {
    cfg: Arc<HostConfig>,
    drivers: HashMap<HypervisorKind, Arc<dyn Hypervisor>>,
    vms: StdMutex<HashMap<String, Arc<Vm>>>,
    cgroups: crate::cgroup::Cgroups,
    /// The first uid of QEMU's per-VM users, when QEMU runs as one (see
    /// [`crate::config::Confinement::qemu_uid_base`]).
    qemu_uid_base: Option<u32>,
}

impl Manager {
    /// Create the data directories, adopt VMs still running from a previous
    /// run and clean up the remains of dead ones.
    pub async fn start(cfg: HostConfig) -> Result<Arc<Self>, ManagerError> {
        // Private whatever the umask: VM directories hold disks with
        // delivered credentials, and sockets that drive the VMs.
        for d in [
            cfg.data_dir.clone(),
            cfg.vms_dir(),
            cfg.logs_dir(),
            cfg.snapshots_dir(),
        ] {
            crate::private::dir_all(&d).map_err(io_err(&d))?;
        }
        let cgroups = crate::cgroup::Cgroups::detect(
            cfg.confinement.cgroups,
            cfg.confinement.cgroup_parent.as_deref(),
        )?;
        if cgroups.available() {
            info!("{}", cgroups.describe());
        } else {
            warn!(
                "{}; VMs run without memory, CPU and pids limits (`polydev doctor`)",
                cgroups.describe()
            );
        }
        let mut drivers: HashMap<HypervisorKind, Arc<dyn Hypervisor>> = HashMap::new();
        drivers.insert(
            HypervisorKind::Qemu,
            Arc::new(Qemu {
                qemu_bin: cfg.qemu_bin.clone(),
                qboot: cfg.qboot.clone(),
                vhost_vsock_bin: cfg.vhost_vsock_bin.clone(),
                vsock: cfg.qemu_vsock,
                bridge_bin: cfg.bridge_bin.clone(),
                tcg_tb_mib: cfg.tcg_tb_mib,
                sandbox: cfg.qemu_sandbox,
            }),
        );
        if let Some(bin) = &cfg.firecracker_bin {
            drivers.insert(
                HypervisorKind::Firecracker,
                Arc::new(
                    crate::hypervisor::firecracker::Firecracker::new(bin.clone())
                        .with_jailer(cfg.confinement.jailer.clone()),
                ),
            );
        }
        let qemu_uid_base = crate::hypervisor::qemu::users(&cfg);
        let mgr = Arc::new(Manager {
            cfg: Arc::new(cfg),
            drivers,
            vms: StdMutex::new(HashMap::new()),
            cgroups,
            qemu_uid_base,
        });
        mgr.reconcile().await?;
        Ok(mgr)
    }

    /// The configuration in force.
    pub fn config(&self) -> &HostConfig {
        &self.cfg
    }

    /// The per-VM cgroups this host offers.
    pub fn cgroups(&self) -> &crate::cgroup::Cgroups {
        &self.cgroups
    }

    fn live(&self, id: &str) -> Result<Arc<Vm>, ManagerError> {
        let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(vm) = vms.get(id) {
            return Ok(vm.clone());
        }
        // Names work wherever ids do.
        if let Some(vm) = vms.values().find(|v| v.name.as_deref() == Some(id)) {
            return Ok(vm.clone());
        }
        let hint = if self.archived_record(id).is_some() {
            format!(" running; it has ended, its logs are kept (`polydev vm logs {id}`)")
        } else {
            " on this host (`polydev vm ls` lists them)".to_string()
        };
        Err(ManagerError::NotFound {
            what: "VM",
            id: id.to_string(),
            hint,
        })
    }

    /// The record of an ended VM whose logs are kept, by id or, as for
    /// live VMs, by name (the newest ended VM of that name).
    fn archived_record(&self, id: &str) -> Option<VmRecord> {
        if valid_id(id) {
            if let Ok(r) = VmRecord::load(&self.cfg.logs_dir().join(id).join("vm.json")) {
                return Some(r);
            }
        }
        // At most `--log-retention` (200) small records to read.
        std::fs::read_dir(self.cfg.logs_dir())
            .ok()?
            .flatten()
            .filter_map(|e| VmRecord::load(&e.path().join("vm.json")).ok())
            .filter(|r| r.info.name.as_deref() == Some(id))
            .max_by_key(|r| r.info.created_ms)
    }

    /// The live VMs now (taken out of the lock, which no `await` may hold).
    fn live_vms(&self) -> Vec<Arc<Vm>> {
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Live VMs, and with `all` also ended ones whose logs are kept.
    pub async fn list(&self, all: bool) -> Vec<VmInfo> {
        let vms = self.live_vms();
        let mut out = Vec::new();
        for vm in vms {
            out.push(vm.record.lock().await.info.clone());
        }
        if all {
            if let Ok(rd) = std::fs::read_dir(self.cfg.logs_dir()) {
                for e in rd.flatten() {
                    if let Ok(r) = VmRecord::load(&e.path().join("vm.json")) {
                        out.push(r.info);
                    }
                }
            }
        }
        out.sort_by_key(|i| i.created_ms);
        out
    }

    /// One VM, live or ended.
    pub async fn get(&self, id: &str) -> Result<VmInfo, ManagerError> {
        match self.live(id) {
            Ok(vm) => Ok(vm.record.lock().await.info.clone()),
            Err(e) => self.archived_record(id).map(|r| r.info).ok_or(e),
        }
    }

    /// Create and boot a VM; returns once its guest agent answers.
    pub async fn create(self: &Arc<Self>, req: &VmSpec) -> Result<VmInfo, ManagerError> {
        let spec = self.cfg.resolve(req)?;
        self.launch(spec, None).await
    }

    async fn launch(
        self: &Arc<Self>,
        spec: ResolvedSpec,
        snapshot: Option<(PathBuf, String)>,
    ) -> Result<VmInfo, ManagerError> {
        let driver = self
            .drivers
            .get(&spec.hypervisor)
            .cloned()
            .ok_or(ManagerError::Invalid(SpecError::NoFirecracker))?;
        let id = new_id("vm-");
        let dir = VmDir::new(&self.cfg.vms_dir(), &id);
        dir.check_socket_paths()
            .map_err(|p| ManagerError::PathTooLong(p.display().to_string()))?;
        let started = Instant::now();
        let info = VmInfo {
            id: id.clone(),
            name: spec.name.clone(),
            state: VmState::Starting,
            failure: None,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            image: spec.image.clone(),
            hypervisor: spec.hypervisor,
            accel: self.cfg.accel,
            pid: None,
            created_ms: now_ms(),
            boot_ms: None,
            restored_from: snapshot.as_ref().map(|(_, s)| s.clone()),
            hibernated: false,
        };
        let record = VmRecord {
            info,
            spec: spec.clone(),
            hypervisor_pid: None,
            backend_pid: None,
            run_as: None,
        };
        {
            // Name uniqueness and registration under one lock, so two
            // concurrent creates cannot both take a name.
            let mut vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(name) = &spec.name {
                let taken = vms.values().any(|v| v.name.as_deref() == Some(name));
                if taken {
                    return Err(ManagerError::Conflict(format!(
                        "a VM named {name:?} already exists; pick another name or remove it first"
                    )));
                }
            }
            // create_dir (not _all): an existing directory is a collision.
            crate::private::create_dir(dir.root()).map_err(io_err(dir.root()))?;
            vms.insert(id.clone(), Vm::new(id.clone(), dir.clone(), record.clone()));
        }
        let vm = self.live(&id)?;
        if let Err(e) = record.save(&dir.record()) {
            self.finish(
                &vm,
                VmState::Failed,
                Some(format!("cannot write record: {e}")),
            )
            .await;
            return Err(ManagerError::Io {
                path: dir.record().display().to_string(),
                source: e,
            });
        }
        match self
            .boot(&vm, driver, &spec, snapshot.map(|(p, _)| p), started)
            .await
        {
            Ok(info) => Ok(info),
            Err(reason) => {
                let reason = reason.to_string();
                self.finish(&vm, VmState::Failed, Some(reason.clone()))
                    .await;
                Err(ManagerError::StartFailed { id, reason })
            }
        }
    }

    async fn boot(
        self: &Arc<Self>,
        vm: &Arc<Vm>,
        driver: Arc<dyn Hypervisor>,
        spec: &ResolvedSpec,
        restore_from: Option<PathBuf>,
        started: Instant,
    ) -> Result<VmInfo, ManagerError> {
        let dir = &vm.dir;
        if spec.data_disk_mib > 0 && restore_from.is_none() && !dir.data_disk().exists() {
            create_data_disk(&dir.data_disk(), spec.data_disk_mib).await?;
        }
        if let Some(snap) = &restore_from {
            let src = snap.join("data.img");
            if src.exists() {
                copy_disk(&src, &dir.data_disk()).await?;
            }
        }
        self.start_log_listener(vm)?;
        self.start_console(vm, spec.hypervisor)?;
        self.start_egress(vm, spec)?;
        self.cgroups
            .create(&vm.id, dir, self.cfg.cgroup_limits(spec))?;
        let plan = LaunchPlan {
            id: vm.id.clone(),
            dir: dir.clone(),
            spec: spec.clone(),
            accel: self.cfg.accel,
            cmdline: self.cmdline(&vm.id, spec),
            restore_from: restore_from.clone(),
            run_as: self.take_uid(vm, spec),
        };
        let launched = match driver.launch(&plan).await {
            Ok(l) => l,
            Err(e) => {
                vm.run_as.store(0, std::sync::atomic::Ordering::SeqCst);
                return Err(e.into());
            }
        };
        let pid = launched.hypervisor.id();
        let backend_pid = launched.backend.as_ref().and_then(|b| b.id());
        if let Some(b) = launched.backend {
            self.watch_backend(vm, BackendProc::Child(b));
        }
        {
            let mut r = vm.record.lock().await;
            r.hypervisor_pid = pid;
            r.backend_pid = backend_pid;
            r.run_as = plan.run_as;
            r.info.pid = pid;
            r.save(&dir.record()).map_err(io_err(&dir.record()))?;
        }
        self.watch_child(vm, launched.hypervisor);

        let agent = vm.agent();
        let exited = vm.exited.clone();
        agent
            .wait_ready(started + self.cfg.boot_timeout, move || {
                !exited.load(std::sync::atomic::Ordering::SeqCst)
            })
            .await?;
        // Fresh entropy and the clock on every start, so VMs restored from one
        // snapshot never share random state or a stale clock.
        let mut config = GuestConfig {
            entropy: Some(random_bytes(64)),
            clock_unix_ns: Some(now_ns()),
            ..Default::default()
        };
        if restore_from.is_none() {
            config.hostname = Some(vm.id.clone());
            config.env = spec.env.clone();
            config.services = spec.services.clone();
        }
        agent
            .call(&Request::Configure(config), Duration::from_secs(30))
            .await?;
        let mut r = vm.record.lock().await;
        if r.info.state != VmState::Starting {
            return Err(ManagerError::Conflict(format!(
                "VM {} changed to {} while starting",
                vm.id, r.info.state
            )));
        }
        r.info.state = VmState::Running;
        r.info.boot_ms = Some(started.elapsed().as_millis() as u64);
        r.save(&dir.record()).map_err(io_err(&dir.record()))?;
        info!(vm = %vm.id, boot_ms = r.info.boot_ms, "vm running");
        Ok(r.info.clone())
    }

    fn cmdline(&self, id: &str, spec: &ResolvedSpec) -> String {
        let mut c = String::from("console=ttyS0 reboot=t panic=-1 quiet");
        if let Some(khz) = self.cfg.tsc_khz {
            c.push_str(&format!(" tsc_early_khz={khz}"));
        }
        c.push_str(&format!(" polydev.id={id}"));
        if let Some(root) = spec.root_cmdline() {
            c.push(' ');
            c.push_str(&root);
        }
        c
    }

    /// Serve the VM's egress connections (guest-initiated vsock to
    /// EGRESS_PORT) under its policy; see [`crate::egress`].
    fn start_egress(&self, vm: &Arc<Vm>, spec: &ResolvedSpec) -> Result<(), ManagerError> {
        let path = vm.dir.vsock_port(agent::EGRESS_PORT);
        let task = crate::egress::start(
            &vm.id,
            &path,
            spec.egress.as_ref(),
            self.cfg.egress,
            vm.dir.egress_log(),
            self.cfg.log_max_bytes,
        )
        .map_err(io_err(&path))?;
        *vm.egress_task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(())
    }

    /// Tear a VM down and preserve its logs: kill and reap its processes,
    /// move logs and the final record to `logs/<id>/`, remove its state
    /// directory, forget it.
    async fn finish(&self, vm: &Arc<Vm>, state: VmState, failure: Option<String>) {
        let (hv_pid, be_pid) = {
            let mut r = vm.record.lock().await;
            if r.info.state.is_final() {
                return;
            }
            if !matches!(r.info.state, VmState::Stopping) {
                r.info.state = VmState::Stopping;
                let _ = r.save(&vm.dir.record());
            }
            (r.hypervisor_pid, r.backend_pid)
        };
        kill_processes(vm, hv_pid, be_pid).await;
        let mut record = vm.record.lock().await.clone();
        record.info.state = state;
        record.info.failure = failure;
        record.info.pid = None;
        if let Err(e) = self.archive(vm, &record) {
            warn!(vm = %vm.id, error = %e, "cannot archive logs");
        }
        if let Err(e) = std::fs::remove_dir_all(vm.dir.root()) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(vm = %vm.id, error = %e, "cannot remove state directory");
            }
        }
        *vm.record.lock().await = record;
        self.vms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&vm.id);
        self.prune_logs();
    }

    async fn reconcile(self: &Arc<Self>) -> Result<(), ManagerError> {
        let vms_dir = self.cfg.vms_dir();
        let rd = std::fs::read_dir(&vms_dir).map_err(io_err(&vms_dir))?;
        for entry in rd.flatten() {
            let path = entry.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            let dir = VmDir::new(&vms_dir, &id);
            let record = match VmRecord::load(&dir.record()) {
                Ok(r) => r,
                Err(e) => {
                    warn!(%id, error = %e, "removing state directory without a readable record");
                    let _ = std::fs::remove_dir_all(&path);
                    continue;
                }
            };
            let vm = Vm::new(id.clone(), dir.clone(), record.clone());
            self.vms
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.clone(), vm.clone());
            let needle = dir.root().display().to_string();
            let alive = record
                .hypervisor_pid
                .is_some_and(|pid| process::alive_with(pid, &needle));
            if record.info.state == VmState::Off && !alive {
                info!(%id, "keeping powered-off vm");
                continue;
            }
            if !alive && record.spec.data_disk_mib > 0 {
                self.settle_off(
                    &vm,
                    Some("hypervisor exited while the host agent was not running; its disk is kept, start it again".into()),
                )
                .await;
                continue;
            }
            if !alive {
                self.finish(
                    &vm,
                    VmState::Failed,
                    Some("hypervisor exited while the host agent was not running".into()),
                )
                .await;
                continue;
            }
            if record.info.state == VmState::Starting || record.info.state == VmState::Stopping {
                let why = format!(
                    "host agent restarted while the VM was {}",
                    record.info.state
                );
                if record.spec.data_disk_mib > 0 {
                    self.settle_off(&vm, Some(format!("{why}; its disk is kept")))
                        .await;
                } else {
                    self.finish(&vm, VmState::Failed, Some(why)).await;
                }
                continue;
            }
            if let Some(uid) = record.run_as {
                vm.run_as.store(uid, std::sync::atomic::Ordering::SeqCst);
            }
            let adopted = async {
                self.start_log_listener(&vm)?;
                self.start_console(&vm, record.spec.hypervisor)?;
                self.start_egress(&vm, &record.spec)?;
                if let Some(pid) = record.hypervisor_pid {
                    self.watch_adopted(&vm, pid).map_err(io_err(dir.root()))?;
                }
                if let Some(pid) = record.backend_pid {
                    self.watch_backend(&vm, BackendProc::Adopted(pid));
                }
                if record.info.state == VmState::Running {
                    vm.agent()
                        .call(&Request::Health, Duration::from_secs(10))
                        .await?;
                }
                Ok::<(), ManagerError>(())
            }
            .await;
            match adopted {
                Ok(()) => info!(%id, "adopted running vm"),
                Err(e) => {
                    self.finish(&vm, VmState::Failed, Some(format!("could not adopt: {e}")))
                        .await
                }
            }
        }
        Ok(())
    }

    /// Stop and remove a VM, keeping its logs.
    pub async fn destroy(&self, id: &str) -> Result<VmInfo, ManagerError> {
        let vm = self.live(id)?;
        self.finish(&vm, VmState::Stopped, None).await;
        let info = vm.record.lock().await.info.clone();
        Ok(info)
    }

    async fn running(&self, id: &str) -> Result<Arc<Vm>, ManagerError> {
        let vm = self.live(id)?;
        let state = vm.record.lock().await.info.state;
        if state != VmState::Running {
            return Err(ManagerError::Conflict(format!(
                "VM {} is {state}, not running{}",
                vm.id,
                match state {
                    VmState::Paused => " (resume it first)",
                    VmState::Off => " (start it with `polydev vm start`)",
                    _ => "",
                }
            )));
        }
        Ok(vm)
    }

    /// Run a command in a VM; frames stream as the guest produces them.
    pub async fn exec(&self, id: &str, req: ExecRequest) -> Result<FrameStream, ManagerError> {
        if req.argv.is_empty() || req.argv[0].is_empty() {
            return Err(ManagerError::Invalid(SpecError::Service {
                name: "exec".into(),
                why: "argv must name a program".into(),
            }));
        }
        let vm = self.running(id).await?;
        Ok(vm.agent().stream(&Request::Exec(req)).await?)
    }

    /// A raw byte stream to a TCP port or Unix socket inside a running VM
    /// (VNC, a terminal), through the guest agent.
    pub async fn forward(
        &self,
        id: &str,
        target: agent::ForwardTarget,
    ) -> Result<tokio::net::UnixStream, ManagerError> {
        let vm = self.running(id).await?;
        Ok(vm.agent().forward(target).await?)
    }

    /// Ask the guest agent something that has one final answer.
    pub async fn agent_call(&self, id: &str, req: Request) -> Result<Response, ManagerError> {
        let vm = self.running(id).await?;
        Ok(vm.agent().call(&req, Duration::from_secs(60)).await?)
    }

    /// Stop a VM's vCPUs.
    pub async fn pause(&self, id: &str) -> Result<VmInfo, ManagerError> {
        let vm = self.running(id).await?;
        let driver = self.driver(&vm).await?;
        let mut r = vm.record.lock().await;
        driver.pause(&vm.dir).await?;
        r.info.state = VmState::Paused;
        r.save(&vm.dir.record()).map_err(io_err(&vm.dir.record()))?;
        Ok(r.info.clone())
    }

    /// Resume a paused VM.
    pub async fn resume(&self, id: &str) -> Result<VmInfo, ManagerError> {
        let vm = self.live(id)?;
        let driver = self.driver(&vm).await?;
        let mut r = vm.record.lock().await;
        if r.info.state != VmState::Paused {
            return Err(ManagerError::Conflict(format!(
                "VM {} is {}, not paused",
                vm.id, r.info.state
            )));
        }
        driver.resume(&vm.dir).await?;
        r.info.state = VmState::Running;
        r.save(&vm.dir.record()).map_err(io_err(&vm.dir.record()))?;
        Ok(r.info.clone())
    }

    async fn driver(&self, vm: &Vm) -> Result<Arc<dyn Hypervisor>, ManagerError> {
        let kind = vm.record.lock().await.info.hypervisor;
        self.drivers
            .get(&kind)
            .cloned()
            .ok_or(ManagerError::Invalid(SpecError::NoFirecracker))
    }

    /// Stop watching VMs without touching them (they keep running and are
    /// adopted by the next host agent).
    pub fn detach(&self) {
        let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        for vm in vms.values() {
            abort(&vm.watcher);
            vm.stop_listeners();
        }
    }
}

/// Bytes of the files directly in `dir`.
fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Ids are generated by us; anything else (say `../x`) is not one.
pub fn valid_id(id: &str) -> bool {
    let rest = id.strip_prefix("vm-").or_else(|| id.strip_prefix("snap-"));
    rest.is_some_and(|r| r.len() == 12 && r.bytes().all(|b| b.is_ascii_hexdigit()))
}

async fn create_data_disk(path: &Path, mib: u32) -> Result<(), ManagerError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    // 0600: the disk will hold the user's files and delivered tokens.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(crate::private::FILE_MODE)
        .open(path)
        .map_err(io_err(path))?;
    f.set_len(u64::from(mib) * 1024 * 1024)
        .map_err(io_err(path))?;
    run_tool(
        tokio::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"])
            .arg(path),
        path,
    )
    .await
}

/// Run a host tool on `path`; its stderr becomes the error.
async fn run_tool(cmd: &mut tokio::process::Command, path: &Path) -> Result<(), ManagerError> {
    crate::private::restrictive_umask(cmd);
    let out = cmd.output().await.map_err(io_err(path))?;
    if !out.status.success() {
        return Err(ManagerError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).into_owned()),
        });
    }
    Ok(())
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    let _ = getrandom::fill(&mut b);
    b
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_strict() {
        assert!(valid_id("vm-0123456789ab"));
        assert!(valid_id("snap-0123456789ab"));
        for bad in [
            "",
            "vm-",
            "vm-../../etc",
            "vm-0123456789abc",
            "x-0123456789ab",
            "vm-0123456789aZ",
        ] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}
