//! Snapshots of VMs: save (`<data>/snapshots/<id>/`, mode 0700, files
//! 0600), list, restore into a new VM, delete.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use polydev_api::vm::{HypervisorKind, SnapshotInfo, VmInfo, VmSpec, VmState};

use super::{dir_size, io_err, run_tool, valid_id, Manager, ManagerError};
use crate::config::{ResolvedSpec, SpecError};
use crate::vmdir::write_atomic;
use crate::{new_id, now_ms};

impl Manager {
    /// Save a running or paused VM to a new snapshot.
    pub async fn snapshot(&self, id: &str) -> Result<SnapshotInfo, ManagerError> {
        let vm = self.live(id)?;
        let driver = self.driver(&vm).await?;
        let r = vm.record.lock().await;
        if !matches!(r.info.state, VmState::Running | VmState::Paused) {
            return Err(ManagerError::Conflict(format!(
                "VM {} is {}; only running or paused VMs can be snapshotted",
                vm.id, r.info.state
            )));
        }
        let snap_id = new_id("snap-");
        let dest = self.cfg.snapshots_dir().join(&snap_id);
        crate::private::create_dir(&dest).map_err(io_err(&dest))?;
        let result = async {
            driver.snapshot(&vm.dir, &dest).await?;
            if vm.dir.data_disk().exists() {
                copy_disk(&vm.dir.data_disk(), &dest.join("data.img")).await?;
            }
            // The memory state holds whatever the guest had in RAM (tokens
            // included): 0600 whoever wrote it.
            private_files(&dest).map_err(io_err(&dest))?;
            let info = SnapshotInfo {
                id: snap_id.clone(),
                source_vm: vm.id.clone(),
                hypervisor: r.info.hypervisor,
                memory_mib: r.spec.memory_mib,
                vcpus: r.spec.vcpus,
                size_bytes: dir_size(&dest),
                created_ms: now_ms(),
            };
            // Egress policy belongs to a VM (its user), not to a snapshot:
            // a restored VM gets none until one is given for it.
            let meta = SnapshotMeta {
                info: info.clone(),
                spec: ResolvedSpec {
                    egress: None,
                    ..r.spec.clone()
                },
            };
            let path = dest.join("snapshot.json");
            write_atomic(
                &path,
                &serde_json::to_vec_pretty(&meta)
                    .map_err(std::io::Error::other)
                    .map_err(io_err(&path))?,
            )
            .map_err(io_err(&path))?;
            Ok::<SnapshotInfo, ManagerError>(info)
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&dest);
        }
        result
    }

    /// Snapshots on this host.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        let mut out: Vec<SnapshotInfo> = std::fs::read_dir(self.cfg.snapshots_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| load_snapshot(&e.path()).ok())
            .map(|m| m.info)
            .collect();
        out.sort_by_key(|s| s.created_ms);
        out
    }

    pub(super) fn snapshot_dir(&self, snap_id: &str) -> Result<PathBuf, ManagerError> {
        let dir = self.cfg.snapshots_dir().join(snap_id);
        if !valid_id(snap_id) || !dir.join("snapshot.json").is_file() {
            return Err(ManagerError::NotFound {
                what: "snapshot",
                id: snap_id.to_string(),
                hint: " (`polydev vm snapshots` lists them)".into(),
            });
        }
        Ok(dir)
    }

    /// Start a new VM from a snapshot.
    pub async fn restore(
        self: &Arc<Self>,
        snap_id: &str,
        name: Option<String>,
    ) -> Result<VmInfo, ManagerError> {
        let dir = self.snapshot_dir(snap_id)?;
        let meta = load_snapshot(&dir).map_err(io_err(&dir))?;
        let mut spec = meta.spec;
        if let Some(n) = &name {
            self.cfg.resolve(&VmSpec {
                name: Some(n.clone()),
                ..Default::default()
            })?;
        }
        spec.name = name;
        for f in [&spec.kernel, &spec.initramfs] {
            if !f.is_file() {
                return Err(ManagerError::Invalid(SpecError::MissingFile {
                    what: "snapshot's boot file",
                    path: f.clone(),
                }));
            }
        }
        self.launch(spec, Some((dir, snap_id.to_string()))).await
    }

    /// Delete a snapshot.
    pub async fn delete_snapshot(&self, snap_id: &str) -> Result<(), ManagerError> {
        let dir = self.snapshot_dir(snap_id)?;
        // Firecracker maps a restored VM's memory from the snapshot file for
        // as long as the VM runs; QEMU reads it once.
        let vms = self.live_vms();
        for vm in vms {
            let r = vm.record.lock().await;
            if r.info.hypervisor == HypervisorKind::Firecracker
                && r.info.restored_from.as_deref() == Some(snap_id)
            {
                return Err(ManagerError::Conflict(format!(
                    "snapshot {snap_id} backs the memory of running VM {}; remove that VM first",
                    vm.id
                )));
            }
        }
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))
    }
}

/// What a snapshot directory records besides the hypervisor's state.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct SnapshotMeta {
    info: SnapshotInfo,
    spec: ResolvedSpec,
}

fn load_snapshot(dir: &Path) -> std::io::Result<SnapshotMeta> {
    let bytes = std::fs::read(dir.join("snapshot.json"))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

pub(super) async fn copy_disk(src: &Path, dst: &Path) -> Result<(), ManagerError> {
    // --reflink=auto: instant on file systems that share extents, a plain
    // sparse copy elsewhere.
    run_tool(
        tokio::process::Command::new("cp")
            .args(["--reflink=auto", "--sparse=always"])
            .arg(src)
            .arg(dst),
        src,
    )
    .await?;
    crate::private::set_mode(dst, crate::private::FILE_MODE).map_err(io_err(dst))
}

/// Make every file in `dir` 0600.
pub(super) fn private_files(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_file() {
            crate::private::set_mode(&e.path(), crate::private::FILE_MODE)?;
        }
    }
    Ok(())
}
