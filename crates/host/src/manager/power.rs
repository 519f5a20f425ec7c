//! Powering a VM off and on with its disks kept, and the user of its own
//! each QEMU runs as while it runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use polydev_api::agent::Request;
use polydev_api::vm::{HypervisorKind, VmInfo, VmState};
use tracing::{info, warn};

use super::{io_err, kill_processes, Manager, ManagerError, Vm};
use crate::config::{ResolvedSpec, SpecError};

impl Manager {
    /// Leave a VM powered off with its state directory and disks: kill
    /// whatever of it still runs, drop its sockets, record `off`.
    pub(super) async fn settle_off(&self, vm: &Arc<Vm>, failure: Option<String>) {
        let (hv_pid, be_pid) = {
            let r = vm.record.lock().await;
            (r.hypervisor_pid, r.backend_pid)
        };
        kill_processes(vm, hv_pid, be_pid).await;
        if let Ok(rd) = std::fs::read_dir(vm.dir.root()) {
            for e in rd.flatten() {
                let is_socket = e.file_type().map(|t| {
                    use std::os::unix::fs::FileTypeExt;
                    t.is_socket()
                });
                if is_socket.unwrap_or(false) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let mut r = vm.record.lock().await;
        r.info.state = VmState::Off;
        r.info.failure = failure;
        r.info.pid = None;
        r.hypervisor_pid = None;
        r.backend_pid = None;
        if let Err(e) = r.save(&vm.dir.record()) {
            warn!(vm = %vm.id, error = %e, "cannot record the VM as off");
        }
        vm.exited.store(false, std::sync::atomic::Ordering::SeqCst);
        info!(vm = %vm.id, "vm off");
    }

    /// A uid of its own for `vm`'s QEMU, none other running VM's, when
    /// QEMU runs as per-VM users.
    pub(super) fn take_uid(&self, vm: &Vm, spec: &ResolvedSpec) -> Option<u32> {
        use std::sync::atomic::Ordering;
        let base = self.qemu_uid_base?;
        if spec.hypervisor != HypervisorKind::Qemu {
            return None;
        }
        // Under the VM map's lock, so two launches cannot take one uid.
        let vms = self.vms.lock().unwrap_or_else(|p| p.into_inner());
        let used: std::collections::HashSet<u32> = vms
            .values()
            .map(|v| v.run_as.load(Ordering::SeqCst))
            .collect();
        let uid = (0..crate::config::QEMU_UIDS)
            .map(|n| base + n)
            .find(|u| !used.contains(u))?;
        vm.run_as.store(uid, Ordering::SeqCst);
        Some(uid)
    }

    /// Power a VM off and keep it: the guest agent stops its services,
    /// syncs its disks and powers off; the state directory (disks
    /// included) stays, and [`Manager::power_on`] boots it again.
    pub async fn power_off(&self, id: &str) -> Result<VmInfo, ManagerError> {
        let vm = self.running(id).await?;
        {
            let mut r = vm.record.lock().await;
            if r.info.state != VmState::Running {
                return Err(ManagerError::Conflict(format!(
                    "VM {} is {}, not running",
                    vm.id, r.info.state
                )));
            }
            r.info.state = VmState::Stopping;
            r.save(&vm.dir.record()).map_err(io_err(&vm.dir.record()))?;
        }
        // The agent answers, then powers off; a dropped answer means the same.
        if let Err(e) = vm
            .agent()
            .call(
                &Request::Shutdown { reboot: false },
                Duration::from_secs(10),
            )
            .await
        {
            info!(vm = %vm.id, error = %e, "no answer to the shutdown request");
        }
        let watcher = vm.watcher.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut w) = watcher {
            if tokio::time::timeout(self.cfg.stop_timeout, &mut w)
                .await
                .is_err()
            {
                warn!(vm = %vm.id, "the guest did not power off in time; killing it");
                // Hand the watcher back so the teardown reaps the process.
                *vm.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(w);
            }
        }
        self.settle_off(&vm, None).await;
        let info = vm.record.lock().await.info.clone();
        Ok(info)
    }

    /// Boot a VM that is off, with the same spec, id and disks.
    pub async fn power_on(self: &Arc<Self>, id: &str) -> Result<VmInfo, ManagerError> {
        let vm = self.live(id)?;
        let spec = {
            let mut r = vm.record.lock().await;
            if r.info.state != VmState::Off {
                return Err(ManagerError::Conflict(format!(
                    "VM {} is {}; only a VM that is off (`polydev vm stop`) can be started",
                    vm.id, r.info.state
                )));
            }
            r.info.state = VmState::Starting;
            r.info.failure = None;
            r.info.boot_ms = None;
            r.save(&vm.dir.record()).map_err(io_err(&vm.dir.record()))?;
            r.spec.clone()
        };
        let driver = self
            .drivers
            .get(&spec.hypervisor)
            .cloned()
            .ok_or(ManagerError::Invalid(SpecError::NoFirecracker))?;
        vm.exited.store(false, std::sync::atomic::Ordering::SeqCst);
        match self.boot(&vm, driver, &spec, None, Instant::now()).await {
            Ok(info) => Ok(info),
            Err(e) => {
                let reason = e.to_string();
                self.settle_off(&vm, Some(format!("start failed: {reason}")))
                    .await;
                Err(ManagerError::StartFailed {
                    id: vm.id.clone(),
                    reason,
                })
            }
        }
    }
}
