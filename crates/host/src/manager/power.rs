//! Powering a VM off and on with its disks kept, and the user of its own
//! each QEMU runs as while it runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use polydev_api::agent::Request;
use polydev_api::vm::{HypervisorKind, VmInfo, VmState};
use tracing::{info, warn};

use super::{io_err, kill_processes, Manager, ManagerError, Vm};
use crate::config::{ResolvedSpec, SpecError};

/// `restored_from` of a VM last started from its own saved memory.
pub const HIBERNATION: &str = "hibernation";

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

    /// Hibernate a VM: pause it, save its memory and device state into its
    /// own directory ([`crate::vmdir::VmDir::hibernation`], 0600 files,
    /// since guest memory holds tokens), then end its hypervisor with the
    /// disks kept. [`Manager::power_on`] resumes it where it was. If the
    /// state cannot be saved the VM is shut down as by
    /// [`Manager::power_off`] instead (`hibernated` false), so a stop never
    /// fails for want of a snapshot.
    pub async fn hibernate(&self, id: &str) -> Result<VmInfo, ManagerError> {
        let vm = self.running(id).await?;
        let driver = self.driver(&vm).await?;
        let saved_at = vm.dir.hibernation();
        let _ = std::fs::remove_dir_all(&saved_at);
        let saved = async {
            crate::private::create_dir(&saved_at).map_err(io_err(&saved_at))?;
            {
                // Under the record's lock: nothing else may start, stop or
                // snapshot the VM between the check and the pause.
                let mut r = vm.record.lock().await;
                if r.info.state != VmState::Running {
                    return Err(ManagerError::Conflict(format!(
                        "VM {} is {}, not running",
                        vm.id, r.info.state
                    )));
                }
                driver.pause(&vm.dir).await?;
                r.info.state = VmState::Stopping;
                r.save(&vm.dir.record()).map_err(io_err(&vm.dir.record()))?;
            }
            driver.snapshot(&vm.dir, &saved_at).await?;
            super::snapshots::private_files(&saved_at).map_err(io_err(&saved_at))?;
            Ok(())
        }
        .await;
        match saved {
            Ok(()) => {
                self.settle_off(&vm, None).await;
                let mut r = vm.record.lock().await;
                r.info.hibernated = true;
                r.save(&vm.dir.record()).map_err(io_err(&vm.dir.record()))?;
                info!(vm = %vm.id, "vm hibernated");
                Ok(r.info.clone())
            }
            Err(ManagerError::Conflict(m)) => {
                let _ = std::fs::remove_dir_all(&saved_at);
                Err(ManagerError::Conflict(m))
            }
            Err(e) => {
                warn!(vm = %vm.id, error = %e, "cannot save the VM's memory; shutting it down instead");
                let _ = std::fs::remove_dir_all(&saved_at);
                {
                    let mut r = vm.record.lock().await;
                    if r.info.state == VmState::Stopping {
                        r.info.state = VmState::Running;
                    }
                }
                if let Err(e) = driver.resume(&vm.dir).await {
                    warn!(vm = %vm.id, error = %e, "cannot resume the VM's vCPUs before its shutdown");
                }
                self.power_off(id).await
            }
        }
    }

    /// Start a VM that is off, with the same spec, id and disks: resumed
    /// from its saved memory when it was hibernated (fresh entropy and the
    /// clock pushed in on the way), else booted. A saved state that will
    /// not load is dropped and the VM booted from its disks instead.
    pub async fn power_on(self: &Arc<Self>, id: &str) -> Result<VmInfo, ManagerError> {
        let vm = self.live(id)?;
        let (spec, saved) = {
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
            if r.info.restored_from.as_deref() == Some(HIBERNATION) {
                r.info.restored_from = None;
            }
            r.save(&vm.dir.record()).map_err(io_err(&vm.dir.record()))?;
            let saved = vm.dir.hibernation();
            let saved = (r.info.hibernated && saved.is_dir()).then_some(saved);
            (r.spec.clone(), saved)
        };
        let driver = self
            .drivers
            .get(&spec.hypervisor)
            .cloned()
            .ok_or(ManagerError::Invalid(SpecError::NoFirecracker))?;
        vm.exited.store(false, std::sync::atomic::Ordering::SeqCst);
        let mut result = self
            .boot(&vm, driver.clone(), &spec, saved.clone(), Instant::now())
            .await;
        if let Some(saved) = &saved {
            // Resumed or not, the saved state is spent: the disks move on
            // from here, and memory from before would not match them.
            let _ = std::fs::remove_dir_all(saved);
            {
                let mut r = vm.record.lock().await;
                r.info.hibernated = false;
                if result.is_ok() {
                    r.info.restored_from = Some(HIBERNATION.into());
                }
                if let Err(e) = r.save(&vm.dir.record()) {
                    warn!(vm = %vm.id, error = %e, "cannot record the VM as resumed");
                }
            }
            if let Ok(info) = &mut result {
                info.restored_from = Some(HIBERNATION.into());
            }
            if let Err(e) = &result {
                warn!(vm = %vm.id, error = %e, "resuming from the saved memory failed; booting from the disks");
                self.settle_off(&vm, None).await;
                {
                    let mut r = vm.record.lock().await;
                    r.info.state = VmState::Starting;
                    r.save(&vm.dir.record()).map_err(io_err(&vm.dir.record()))?;
                }
                vm.exited.store(false, std::sync::atomic::Ordering::SeqCst);
                result = self.boot(&vm, driver, &spec, None, Instant::now()).await;
            }
        }
        match result {
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
