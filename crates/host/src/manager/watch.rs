//! Watching a VM's processes: the hypervisor (our child, or adopted
//! through a pidfd) and its vsock backend, which is restarted while the
//! hypervisor lives. An unexpected exit fails the VM, or powers it off when
//! its disk holds the user's files.

use std::sync::Arc;
use std::time::Duration;

use polydev_api::vm::VmState;
use tracing::{info, warn};

use super::{BackendProc, Manager, Vm};
use crate::process;

impl Manager {
    pub(super) fn watch_child(self: &Arc<Self>, vm: &Arc<Vm>, mut child: tokio::process::Child) {
        self.watch(vm, async move {
            match child.wait().await {
                Ok(status) => format!("hypervisor {}", process::describe_exit(&status)),
                Err(e) => format!("hypervisor could not be waited for: {e}"),
            }
        });
    }

    pub(super) fn watch_adopted(self: &Arc<Self>, vm: &Arc<Vm>, pid: u32) -> std::io::Result<()> {
        let fd = process::pidfd_open(pid)?;
        self.watch(vm, async move {
            match process::wait_pidfd(fd).await {
                Ok(()) => "hypervisor exited (adopted process; exit status unknown)".to_string(),
                Err(e) => format!("hypervisor could not be watched: {e}"),
            }
        });
        Ok(())
    }

    /// Watch the VM's vsock backend; when it dies while the hypervisor
    /// lives, start a new one (with backoff) so the VM stays reachable.
    pub(super) fn watch_backend(self: &Arc<Self>, vm: &Arc<Vm>, first: BackendProc) {
        let mgr = Arc::downgrade(self);
        let vm2 = vm.clone();
        let needle = vm.dir.root().display().to_string();
        let task = tokio::spawn(async move {
            let mut proc = first;
            loop {
                let how = match proc {
                    BackendProc::Child(mut c) => match c.wait().await {
                        Ok(st) => process::describe_exit(&st),
                        Err(e) => format!("could not be waited for: {e}"),
                    },
                    BackendProc::Adopted(pid) => {
                        if process::alive_with(pid, &needle) {
                            if let Ok(fd) = process::pidfd_open(pid) {
                                let _ = process::wait_pidfd(fd).await;
                            }
                        }
                        "exited (adopted process)".to_string()
                    }
                };
                let mut backoff = Duration::from_millis(100);
                proc = loop {
                    let Some(mgr) = mgr.upgrade() else { return };
                    let (state, hv_pid) = {
                        let r = vm2.record.lock().await;
                        (r.info.state, r.hypervisor_pid)
                    };
                    let live = matches!(
                        state,
                        VmState::Starting | VmState::Running | VmState::Paused
                    );
                    let (true, false, Some(hv_pid)) = (
                        live,
                        vm2.exited.load(std::sync::atomic::Ordering::SeqCst),
                        hv_pid,
                    ) else {
                        return;
                    };
                    warn!(vm = %vm2.id, %how, "vsock backend died; starting a new one");
                    let driver = match mgr.driver(&vm2).await {
                        Ok(d) => d,
                        Err(_) => return,
                    };
                    match driver.restart_backend(&vm2.dir, hv_pid).await {
                        Ok(Some(child)) => {
                            let mut r = vm2.record.lock().await;
                            r.backend_pid = child.id();
                            if let Err(e) = r.save(&vm2.dir.record()) {
                                warn!(vm = %vm2.id, error = %e, "cannot record the new backend pid");
                            }
                            info!(vm = %vm2.id, pid = child.id(), "vsock backend restarted");
                            break BackendProc::Child(child);
                        }
                        Ok(None) => {
                            warn!(vm = %vm2.id, "this vsock backend cannot be restarted; the VM is unreachable until it is removed");
                            return;
                        }
                        Err(e) => {
                            warn!(vm = %vm2.id, error = %e, "restarting the vsock backend failed; retrying in {backoff:?}");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                        }
                    }
                };
            }
        });
        *vm.backend_task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    /// Run `exit` (which resolves with a reason when the hypervisor is gone)
    /// as the VM's watcher, then fail the VM unless it was being stopped.
    fn watch(
        self: &Arc<Self>,
        vm: &Arc<Vm>,
        exit: impl std::future::Future<Output = String> + Send + 'static,
    ) {
        let mgr = Arc::downgrade(self);
        let vm2 = vm.clone();
        let task = tokio::spawn(async move {
            let reason = exit.await;
            vm2.exited.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Some(mgr) = mgr.upgrade() {
                mgr.on_exit(&vm2, reason).await;
            }
        });
        *vm.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    async fn on_exit(self: &Arc<Self>, vm: &Arc<Vm>, reason: String) {
        let (state, keeps_disk) = {
            let r = vm.record.lock().await;
            (r.info.state, r.spec.data_disk_mib > 0)
        };
        // Starting: the boot path sees `exited` and settles the VM itself.
        if matches!(state, VmState::Starting | VmState::Stopping | VmState::Off) || state.is_final()
        {
            return;
        }
        warn!(vm = %vm.id, %reason, "vm died");
        let me = self.clone();
        let vm = vm.clone();
        // From a separate task: both paths await this watcher task.
        tokio::spawn(async move {
            if keeps_disk {
                // A VM with a persistent disk holds the user's files: a crash
                // powers it off with the reason instead of deleting them.
                me.settle_off(
                    &vm,
                    Some(format!("{reason}; its disk is kept, start it again")),
                )
                .await;
            } else {
                me.finish(&vm, VmState::Failed, Some(reason)).await;
            }
        });
    }
}
