//! Running Firecracker through its `jailer`: a chroot of its own, a new
//! mount namespace, and an unprivileged uid/gid.
//!
//! The jail lives inside the VM's state directory,
//! `<vmdir>/jail/<firecracker file name>/<id>/root` (the jailer's layout
//! under `--chroot-base-dir <vmdir>/jail`), so removing the VM directory
//! removes it. The state directory itself stays root's: the jailed
//! process owns only its chroot, never `vm.json` or anything the host
//! agent later trusts.
//!
//! What crosses the chroot boundary, and how:
//!
//! - into the jail, before start: the kernel and initramfs (copied,
//!   read-only), the data disk, `hypervisor.log` and the host agent's
//!   guest-initiated stream listeners `vsock.sock_<port>` (hard links: the
//!   same inode under a second name, so the jailed process writes the VM's
//!   disk and log and connects to our listeners without seeing any host
//!   path), snapshot files for a restore (hard links, root-owned, group
//!   readable);
//! - out of the jail, after Firecracker binds them: its API socket and the
//!   hybrid vsock socket (hard links into the state directory, checked to be
//!   sockets, so a jailed process that planted a symlink cannot redirect the
//!   host agent), and snapshot files (moved out, checked to be regular files).
//!
//! The API socket is given to Firecracker as the state directory's absolute
//! path (`<vmdir>/control.sock`, recreated inside the chroot), so its
//! command line names the state directory the way the manager recognises a
//! VM's processes after a restart.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::HypervisorError;
use crate::vmdir::VmDir;

/// File names inside the jail's root.
pub const KERNEL: &str = "vmlinux";
/// The initramfs inside the jail.
pub const INITRAMFS: &str = "initramfs";

/// The `jailer` binary and the identity Firecracker runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jailer {
    /// The `jailer` binary (of the same release as the `firecracker` one).
    pub bin: PathBuf,
    /// uid Firecracker runs as (a dedicated, otherwise unused one).
    pub uid: u32,
    /// gid Firecracker runs as; snapshot files are readable by this group.
    pub gid: u32,
}

impl Jailer {
    /// `--chroot-base-dir` of a VM.
    pub fn base(dir: &VmDir) -> PathBuf {
        dir.root().join("jail")
    }

    /// The jail's root directory for a VM (the jailer computes the same).
    pub fn root(dir: &VmDir, firecracker: &Path, id: &str) -> Result<PathBuf, HypervisorError> {
        let name = firecracker.file_name().ok_or_else(|| {
            HypervisorError::Unsupported(format!(
                "not a firecracker binary path: {}",
                firecracker.display()
            ))
        })?;
        Ok(Self::base(dir).join(name).join(id).join("root"))
    }

    /// The jailer's command line (without the binary) that starts
    /// `firecracker` with `fc_args`.
    pub fn args(
        &self,
        dir: &VmDir,
        firecracker: &Path,
        id: &str,
        fc_args: &[String],
    ) -> Vec<String> {
        let mut a = vec![
            "--id".to_string(),
            id.to_string(),
            "--exec-file".to_string(),
            firecracker.display().to_string(),
            "--uid".to_string(),
            self.uid.to_string(),
            "--gid".to_string(),
            self.gid.to_string(),
            "--chroot-base-dir".to_string(),
            Self::base(dir).display().to_string(),
            "--".to_string(),
        ];
        a.extend(fc_args.iter().cloned());
        a
    }

    /// Build a fresh jail for one start: the previous one (a power-off and
    /// on) goes, because the jailer refuses to make its device nodes and
    /// pid file over existing ones.
    pub fn prepare(
        &self,
        dir: &VmDir,
        root: &Path,
        kernel: &Path,
        initramfs: &Path,
    ) -> Result<(), HypervisorError> {
        let base = Self::base(dir);
        match std::fs::remove_dir_all(&base) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        std::fs::create_dir_all(root)?;
        for (src, name) in [(kernel, KERNEL), (initramfs, INITRAMFS)] {
            let dest = root.join(name);
            std::fs::copy(src, &dest)?;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o444))?;
        }
        // Firecracker opens its log; the host keeps the state directory's name.
        let log = dir.hypervisor_log();
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        self.link_in(&log, &root.join(file_name(&log)?))?;
        if dir.data_disk().exists() {
            self.link_in(&dir.data_disk(), &root.join(file_name(&dir.data_disk())?))?;
        }
        for entry in std::fs::read_dir(dir.root())? {
            let entry = entry?;
            let name = entry.file_name();
            let is_listener = name.to_str().is_some_and(|n| n.starts_with("vsock.sock_"))
                && entry.file_type()?.is_socket();
            if is_listener {
                self.link_in(&entry.path(), &root.join(&name))?;
            }
        }
        // The API socket's directory, repeated inside the chroot (see the
        // module documentation).
        let api_dir = root.join(dir.root().strip_prefix("/").unwrap_or(dir.root()));
        std::fs::create_dir_all(&api_dir)?;
        let mut d = api_dir.as_path();
        while d != root {
            chown(d, self.uid, self.gid)?;
            d = d.parent().unwrap_or(root);
        }
        Ok(())
    }

    /// Give the jailed process a file of the VM under a second name inside
    /// the jail, owned by its uid (the inode is the VM's own: its disk, its
    /// log, a listener for its streams).
    fn link_in(&self, src: &Path, dest: &Path) -> Result<(), HypervisorError> {
        std::fs::hard_link(src, dest)?;
        chown(dest, self.uid, self.gid)
    }

    /// Hard-link snapshot files into the jail for a restore: owned by root,
    /// readable by the jail's group, so no VM can change a snapshot that
    /// others restore from.
    pub fn link_snapshot(&self, src: &Path, dest: &Path) -> Result<(), HypervisorError> {
        chown(src, own_uid(), self.gid)?;
        std::fs::set_permissions(src, std::fs::Permissions::from_mode(0o440))?;
        std::fs::hard_link(src, dest)?;
        Ok(())
    }
}

/// Wait until the jailed Firecracker has bound `inner` (a socket inside the
/// jail), then hard-link it to `outer` in the state directory. A path the
/// jailed process controls is never followed: the link is checked to be a
/// socket before anyone connects to it.
pub async fn link_out_socket(
    inner: &Path,
    outer: &Path,
    child: &mut tokio::process::Child,
    logs: &[PathBuf],
) -> Result<(), HypervisorError> {
    let deadline = Instant::now() + super::SOCKET_TIMEOUT;
    loop {
        let bound = std::fs::symlink_metadata(inner).is_ok_and(|m| m.file_type().is_socket());
        if bound {
            match std::fs::remove_file(outer) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            std::fs::hard_link(inner, outer)?;
            if !std::fs::symlink_metadata(outer)?.file_type().is_socket() {
                let _ = std::fs::remove_file(outer);
                return Err(HypervisorError::Control {
                    op: "jail",
                    message: format!("{} is not a socket", inner.display()),
                });
            }
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(HypervisorError::EarlyExit {
                what: "jailer/firecracker",
                status: crate::process::describe_exit(&status),
                log: super::tail(logs),
            });
        }
        if Instant::now() > deadline {
            return Err(HypervisorError::NotReady("the jailed firecracker's socket"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Move a file Firecracker wrote inside the jail out to `dest`, refusing
/// anything but a regular file with one link (a jailed process could
/// otherwise hand the host a symlink or a link to a file it keeps writing).
pub fn move_out_file(inner: &Path, dest: &Path) -> Result<(), HypervisorError> {
    let m = std::fs::symlink_metadata(inner)?;
    if !m.file_type().is_file() || m.nlink() != 1 {
        return Err(HypervisorError::Control {
            op: "jail",
            message: format!(
                "{} is not a regular file of its own; refusing it",
                inner.display()
            ),
        });
    }
    std::fs::rename(inner, dest)?;
    // SAFETY: getegid cannot fail.
    chown(dest, own_uid(), unsafe { libc::getegid() })?;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// The host agent's own uid (root in production).
fn own_uid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

fn chown(p: &Path, uid: u32, gid: u32) -> Result<(), HypervisorError> {
    // lchown: a path inside a jail is never followed.
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).map_err(|e| {
        HypervisorError::Io(std::io::Error::new(
            e.kind(),
            format!("chown {}: {e}", p.display()),
        ))
    })
}

fn file_name(p: &Path) -> Result<&std::ffi::OsStr, HypervisorError> {
    p.file_name()
        .ok_or_else(|| HypervisorError::Unsupported(format!("no file name: {}", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Jailer {
        // The caller's own ids, so chown works without root.
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Jailer {
            bin: PathBuf::from("/usr/bin/jailer"),
            uid,
            gid,
        }
    }

    #[test]
    fn the_command_line_puts_the_jail_in_the_vm_directory() {
        let d = VmDir::new(Path::new("/var/lib/polydev/vms"), "vm-1");
        let j = Jailer {
            uid: 990,
            gid: 991,
            ..me()
        };
        let fc = Path::new("/opt/fc/firecracker-v1.16.1");
        let a = j.args(&d, fc, "vm-1", &["--api-sock".into(), "x".into()]);
        assert_eq!(
            a.join(" "),
            "--id vm-1 --exec-file /opt/fc/firecracker-v1.16.1 --uid 990 --gid 991 \
             --chroot-base-dir /var/lib/polydev/vms/vm-1/jail -- --api-sock x"
        );
        assert_eq!(
            Jailer::root(&d, fc, "vm-1").ok(),
            Some(PathBuf::from(
                "/var/lib/polydev/vms/vm-1/jail/firecracker-v1.16.1/vm-1/root"
            ))
        );
    }

    #[tokio::test]
    async fn prepare_links_the_vm_files_and_link_out_refuses_a_planted_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let d = VmDir::new(tmp.path(), "vm-1");
        std::fs::create_dir(d.root()).unwrap();
        std::fs::write(d.data_disk(), b"disk").unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(d.vsock_port(1025)).unwrap();
        let kernel = tmp.path().join("k");
        std::fs::write(&kernel, b"kernel").unwrap();
        let j = me();
        let root = Jailer::root(&d, Path::new("/x/firecracker"), "vm-1").unwrap();
        // A jail left by an earlier start is replaced.
        std::fs::create_dir_all(root.join("dev")).unwrap();
        j.prepare(&d, &root, &kernel, &kernel).unwrap();
        assert!(!root.join("dev").exists());
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(ino(&root.join("data.img")), ino(&d.data_disk()));
        assert_eq!(ino(&root.join("vsock.sock_1025")), ino(&d.vsock_port(1025)));
        assert_eq!(ino(&root.join("hypervisor.log")), ino(&d.hypervisor_log()));
        assert_eq!(std::fs::read(root.join(KERNEL)).unwrap(), b"kernel");
        let inner_api = root.join(d.control().strip_prefix("/").unwrap());
        assert!(inner_api.parent().unwrap().is_dir());

        // What the jailed process controls is never followed out.
        let target = tmp.path().join("elsewhere.sock");
        let _other = std::os::unix::net::UnixListener::bind(&target).unwrap();
        std::os::unix::fs::symlink(&target, root.join("vsock.sock")).unwrap();
        let mut child = tokio::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let r = tokio::time::timeout(
            std::time::Duration::from_millis(300),
            link_out_socket(&root.join("vsock.sock"), &d.vsock(), &mut child, &[]),
        )
        .await;
        assert!(r.is_err(), "a symlink is not taken for the bound socket");
        assert!(!d.vsock().exists());
        std::fs::remove_file(root.join("vsock.sock")).unwrap();
        let _bound = std::os::unix::net::UnixListener::bind(root.join("vsock.sock")).unwrap();
        link_out_socket(&root.join("vsock.sock"), &d.vsock(), &mut child, &[])
            .await
            .unwrap();
        assert!(std::os::unix::net::UnixStream::connect(d.vsock()).is_ok());
        let _ = child.start_kill();
        let _ = child.wait().await;

        std::os::unix::fs::symlink("/etc/passwd", root.join("memory")).unwrap();
        let out = move_out_file(&root.join("memory"), &tmp.path().join("memory"));
        assert!(out.is_err(), "a symlink is not a snapshot file");
        std::fs::write(root.join("vmstate"), b"state").unwrap();
        move_out_file(&root.join("vmstate"), &tmp.path().join("vmstate")).unwrap();
        assert_eq!(std::fs::read(tmp.path().join("vmstate")).unwrap(), b"state");
    }
}
