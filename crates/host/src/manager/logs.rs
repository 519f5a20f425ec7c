//! A VM's logs: receiving them while it runs (console, guest log stream),
//! serving tails of them, and keeping them after it ends in
//! `<data>/logs/<id>/`, bounded by count and total size.

use std::path::PathBuf;
use std::sync::Arc;

use polydev_api::agent;
use polydev_api::vm::{HypervisorKind, LogKind};
use tracing::info;

use super::{abort, dir_size, io_err, Manager, ManagerError, Vm};
use crate::logfile::{rotated, DEFAULT_TAIL_BYTES, MAX_TAIL_BYTES};
use crate::metrics::LOG_CAPS;
use crate::vmdir::{write_atomic, VmRecord};

/// How much of the end of a log to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogTail {
    /// At most this many bytes (clamped to [`MAX_TAIL_BYTES`]).
    pub bytes: u64,
    /// At most this many lines, when given.
    pub lines: Option<usize>,
}

impl Default for LogTail {
    fn default() -> Self {
        LogTail {
            bytes: DEFAULT_TAIL_BYTES,
            lines: None,
        }
    }
}

impl Manager {
    /// Receive the guest's log stream into `agent.log`; see
    /// [`crate::guest_log`].
    pub(super) fn start_log_listener(&self, vm: &Arc<Vm>) -> Result<(), ManagerError> {
        let path = vm.dir.vsock_port(agent::LOG_PORT);
        let task =
            crate::guest_log::start(&vm.id, &path, vm.dir.agent_log(), self.cfg.log_max_bytes)
                .map_err(io_err(&path))?;
        *vm.log_task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(())
    }

    /// Receive a VM's serial console into `console.log`: QEMU's socket or
    /// Firecracker's stdout FIFO; see [`crate::console`].
    pub(super) fn start_console(
        &self,
        vm: &Arc<Vm>,
        kind: HypervisorKind,
    ) -> Result<(), ManagerError> {
        // A VM started again after a power-off: its old receiver is done.
        abort(&vm.console_task);
        let (log, max) = (vm.dir.console_log(), self.cfg.log_max_bytes);
        let (task, connected) = match kind {
            HypervisorKind::Qemu => {
                let path = vm.dir.console_sock();
                crate::console::start(path.clone(), log, max).map_err(io_err(&path))?
            }
            HypervisorKind::Firecracker => {
                let path = vm.dir.console_fifo();
                crate::console::start_fifo(&path, log, max).map_err(io_err(&path))?
            }
        };
        *vm.console_task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        *vm.console_connected
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(connected);
        Ok(())
    }

    /// Move a VM's logs (rotated files included) and its final record,
    /// without secrets, to `<data>/logs/<id>/` (mode 0700).
    pub(super) fn archive(&self, vm: &Vm, record: &VmRecord) -> std::io::Result<()> {
        let dest = self.cfg.logs_dir().join(&vm.id);
        crate::private::dir_all(&dest)?;
        for log in [
            vm.dir.console_log(),
            vm.dir.agent_log(),
            vm.dir.hypervisor_log(),
            vm.dir.backend_log(),
            vm.dir.egress_log(),
        ] {
            for src in [rotated(&log), log] {
                if let Some(name) = src.file_name() {
                    if src.exists() {
                        std::fs::rename(&src, dest.join(name))?;
                    }
                }
            }
        }
        // Logs outlive the VM; its upstream password must not.
        let kept = VmRecord {
            spec: record.spec.without_secrets(),
            ..record.clone()
        };
        write_atomic(
            &dest.join("vm.json"),
            &serde_json::to_vec_pretty(&kept).map_err(std::io::Error::other)?,
        )
    }

    /// Remove the oldest ended VMs' logs until at most `log_retention` are
    /// kept and together they take at most `logs_archive_max_bytes`.
    pub(super) fn prune_logs(&self) {
        let Ok(rd) = std::fs::read_dir(self.cfg.logs_dir()) else {
            return;
        };
        let mut dirs: Vec<(u64, PathBuf, u64)> = rd
            .flatten()
            .map(|e| {
                let created = VmRecord::load(&e.path().join("vm.json"))
                    .map(|r| r.info.created_ms)
                    .unwrap_or(0);
                (created, e.path(), dir_size(&e.path()))
            })
            .collect();
        dirs.sort();
        let mut count = dirs.len();
        let mut total: u64 = dirs.iter().map(|d| d.2).sum();
        for (_, p, size) in dirs {
            if count <= self.cfg.log_retention && total <= self.cfg.logs_archive_max_bytes {
                break;
            }
            if std::fs::remove_dir_all(&p).is_ok() {
                info!(dir = %p.display(), size, "removed an ended VM's logs (retention)");
                LOG_CAPS.archive_pruned();
            }
            count -= 1;
            total -= size;
        }
    }

    /// The end of a VM's console, agent or egress log, live or preserved
    /// (see [`crate::logfile::tail`]): read from the end of the file, so
    /// memory is bounded by `tail` whatever the log's size.
    pub async fn logs(
        &self,
        id: &str,
        kind: LogKind,
        tail: LogTail,
    ) -> Result<String, ManagerError> {
        let file = match kind {
            LogKind::Console => "console.log",
            LogKind::Agent => "agent.log",
            LogKind::Egress => "egress.log",
        };
        let path = match self.live(id) {
            Ok(vm) => vm.dir.root().join(file),
            Err(e) => match self.archived_record(id) {
                Some(r) => self.cfg.logs_dir().join(&r.info.id).join(file),
                None => return Err(e),
            },
        };
        let bytes = tail.bytes.min(MAX_TAIL_BYTES);
        let p = path.clone();
        let read = tokio::task::spawn_blocking(move || crate::logfile::tail(&p, bytes, tail.lines))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r);
        match read {
            Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
            Err(e) => Err(ManagerError::Io {
                path: path.display().to_string(),
                source: e,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ResolvedSpec;
    use crate::HostConfig;
    use polydev_api::vm::{HypervisorKind, VmInfo, VmState};
    use std::path::Path;

    fn record(id: &str, created_ms: u64, dir: &Path) -> VmRecord {
        let cfg = HostConfig::with_defaults(dir.to_path_buf(), dir.join("k"), dir.join("i"));
        VmRecord {
            info: VmInfo {
                id: id.into(),
                name: None,
                state: VmState::Stopped,
                failure: None,
                vcpus: 1,
                memory_mib: 128,
                image: "minimal".into(),
                hypervisor: HypervisorKind::Qemu,
                accel: cfg.accel,
                pid: None,
                created_ms,
                boot_ms: None,
                restored_from: None,
                hibernated: false,
            },
            spec: ResolvedSpec {
                name: None,
                vcpus: 1,
                memory_mib: 128,
                image: "minimal".into(),
                kernel: cfg.kernel.clone(),
                initramfs: cfg.initramfs.clone(),
                hypervisor: HypervisorKind::Qemu,
                env: Default::default(),
                services: vec![],
                data_disk_mib: 0,
                egress: None,
                rootfs: None,
            },
            hypervisor_pid: None,
            backend_pid: None,
            run_as: None,
        }
    }

    #[tokio::test]
    async fn log_retention_keeps_the_newest() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = HostConfig::with_defaults(
            tmp.path().to_path_buf(),
            tmp.path().join("k"),
            tmp.path().join("i"),
        );
        cfg.log_retention = 3;
        let mgr = Manager::start(cfg).await.unwrap();
        for n in 0..5u64 {
            let id = format!("vm-00000000000{n}");
            let d = tmp.path().join("logs").join(&id);
            std::fs::create_dir_all(&d).unwrap();
            record(&id, 1000 + n, tmp.path())
                .save(&d.join("vm.json"))
                .unwrap();
        }
        mgr.prune_logs();
        let mut left: Vec<String> = std::fs::read_dir(tmp.path().join("logs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["vm-000000000002", "vm-000000000003", "vm-000000000004"]
        );
        // Ended VMs stay readable until pruned.
        let all = mgr.list(true).await;
        assert_eq!(all.len(), 3);
        assert!(mgr.get("vm-000000000004").await.is_ok());
        assert!(matches!(
            mgr.get("vm-000000000000").await,
            Err(ManagerError::NotFound { .. })
        ));
    }
    #[tokio::test]
    async fn an_ended_vms_logs_are_found_by_its_name_the_newest_first() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = HostConfig::with_defaults(
            tmp.path().to_path_buf(),
            tmp.path().join("k"),
            tmp.path().join("i"),
        );
        let mgr = Manager::start(cfg).await.unwrap();
        for (n, text) in [(1u64, "the old dev"), (2, "the newest dev")] {
            let id = format!("vm-00000000000{n}");
            let d = tmp.path().join("logs").join(&id);
            std::fs::create_dir_all(&d).unwrap();
            let mut r = record(&id, 1000 + n, tmp.path());
            r.info.name = Some("dev".into());
            r.save(&d.join("vm.json")).unwrap();
            std::fs::write(d.join("console.log"), text).unwrap();
        }
        let by_name = mgr
            .logs("dev", LogKind::Console, LogTail::default())
            .await
            .unwrap();
        assert_eq!(by_name, "the newest dev");
        let by_id = mgr
            .logs("vm-000000000001", LogKind::Console, LogTail::default())
            .await
            .unwrap();
        assert_eq!(by_id, "the old dev");
        assert!(matches!(
            mgr.logs("nobody", LogKind::Console, LogTail::default())
                .await,
            Err(ManagerError::NotFound { .. })
        ));
        // A name is never a path.
        assert!(mgr
            .logs("../k", LogKind::Console, LogTail::default())
            .await
            .is_err());
    }

    #[tokio::test]
    async fn archived_logs_are_bounded_by_total_size_oldest_first() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = HostConfig::with_defaults(
            tmp.path().to_path_buf(),
            tmp.path().join("k"),
            tmp.path().join("i"),
        );
        cfg.logs_archive_max_bytes = 250_000;
        let mgr = Manager::start(cfg).await.unwrap();
        let before = LOG_CAPS.archives_pruned_count();
        for n in 0..5u64 {
            let id = format!("vm-00000000000{n}");
            let d = tmp.path().join("logs").join(&id);
            std::fs::create_dir_all(&d).unwrap();
            record(&id, 1000 + n, tmp.path())
                .save(&d.join("vm.json"))
                .unwrap();
            std::fs::write(d.join("console.log"), vec![b'x'; 100_000]).unwrap();
        }
        mgr.prune_logs();
        let mut left: Vec<String> = std::fs::read_dir(tmp.path().join("logs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        // Each takes 100 kB and a record: two fit in 250 kB.
        assert_eq!(left, ["vm-000000000003", "vm-000000000004"]);
        assert!(LOG_CAPS.archives_pruned_count() >= before + 3);
        // Tails of an archived log are bounded too.
        let t = mgr
            .logs(
                "vm-000000000004",
                LogKind::Console,
                LogTail {
                    bytes: 10,
                    lines: None,
                },
            )
            .await
            .unwrap();
        assert!(t.is_empty(), "no whole line in the last 10 bytes: {t:?}");
    }
}
