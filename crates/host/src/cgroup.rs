//! Per-VM control groups: every process of a VM (hypervisor, vsock
//! backend) runs in a cgroup of its own with memory, CPU and pids limits,
//! so one runaway VM cannot take the host.
//!
//! Layout: `<base>/polydev-vms/<vm id>`. With cgroup v2 the base is, in
//! this order, `--cgroup-parent`, the cgroup systemd delegated to the
//! host agent (`Delegate=yes`; with `DelegateSubgroup=supervisor` the agent
//! runs in `<unit>/supervisor` and the base is `<unit>`), or the agent's own
//! cgroup (it moves itself into `<own>/supervisor` when it is the only
//! process there, because a cgroup v2 that gives controllers to its children
//! may hold no processes itself). On a hybrid host (memory, cpu and pids on
//! cgroup v1 hierarchies, as here) each of the three hierarchies gets the
//! same layout under the agent's own cgroup in it, so the VMs stay inside
//! whatever limits the agent itself runs under.
//!
//! The VM's cgroup directories are listed in `<vmdir>/cgroup`; a host agent
//! that adopts the VM after a restart finds them there, and
//! [`remove`] (called whenever the VM's processes are killed) empties and
//! deletes them.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::vmdir::VmDir;

/// Name of the directory under the base that holds the VMs' cgroups.
pub const VMS_GROUP: &str = "polydev-vms";

/// The leaf the host agent moves itself into under cgroup v2.
pub const SUPERVISOR_GROUP: &str = "supervisor";

/// CFS period used for `cpu.max` / `cpu.cfs_period_us`.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Whether VMs get cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// Use cgroups when the host offers them; otherwise warn and run VMs
    /// without limits.
    Auto,
    /// Refuse to start without them.
    Required,
    /// Never create cgroups.
    Off,
}

/// Limits of one VM's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `memory.max` (bytes): guest memory plus the hypervisor's own.
    pub memory_bytes: u64,
    /// CPU time per [`CPU_PERIOD_US`], in microseconds.
    pub cpu_quota_us: u64,
    /// `pids.max`: threads and processes together.
    pub pids_max: u64,
}

/// What the host offers, as found at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    /// No per-VM cgroups; the reason says why and what to do.
    Unavailable(String),
    /// cgroup v2: VM cgroups go under this directory.
    V2 {
        /// `<base>/polydev-vms`.
        vms: PathBuf,
    },
    /// cgroup v1 hierarchies: VM cgroups go under each of these.
    V1 {
        /// `<memory hierarchy>/<own>/polydev-vms`.
        memory: PathBuf,
        /// `<cpu hierarchy>/<own>/polydev-vms`.
        cpu: PathBuf,
        /// `<pids hierarchy>/<own>/polydev-vms`.
        pids: PathBuf,
    },
}

/// Failures of cgroup set-up.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `--vm-cgroups required` and the host has none to give.
    #[error("per-VM cgroups are required but unavailable: {0}")]
    Required(String),
    /// Writing a cgroup file or directory failed.
    #[error("cannot set up the VM's cgroup at {path}: {source}; check that the host agent may write there (`polydev doctor`), or run with --vm-cgroups off")]
    Io {
        /// The file or directory.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.display().to_string(),
        source,
    }
}

const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

impl Cgroups {
    /// Find what this host offers. `parent` is a cgroup v2 path (relative
    /// to the cgroup2 mount) to use instead of the agent's own cgroup.
    pub fn detect(mode: CgroupMode, parent: Option<&Path>) -> Result<Cgroups, CgroupError> {
        if mode == CgroupMode::Off {
            return Ok(Cgroups::Unavailable("turned off (--vm-cgroups off)".into()));
        }
        let found = match detect_v2(parent) {
            Ok(c) => Ok(c),
            Err(v2) if parent.is_some() => Err(v2),
            Err(v2) => detect_v1().map_err(|v1| format!("{v2}; {v1}")),
        };
        match (found, mode) {
            (Ok(c), _) => Ok(c),
            (Err(reason), CgroupMode::Required) => Err(CgroupError::Required(reason)),
            (Err(reason), _) => Ok(Cgroups::Unavailable(reason)),
        }
    }

    /// Whether VMs get cgroups.
    pub fn available(&self) -> bool {
        !matches!(self, Cgroups::Unavailable(_))
    }

    /// One line for logs and `polydev doctor`.
    pub fn describe(&self) -> String {
        match self {
            Cgroups::Unavailable(r) => format!("no per-VM cgroups: {r}"),
            Cgroups::V2 { vms } => format!("cgroup v2, VMs under {}", vms.display()),
            Cgroups::V1 { memory, cpu, pids } => format!(
                "cgroup v1 hierarchies, VMs under {}, {}, {}",
                memory.display(),
                cpu.display(),
                pids.display()
            ),
        }
    }

    /// Create the cgroup(s) of VM `id` with `limits` and record them in the
    /// VM's directory, where [`spawn_in`](crate::process::spawn_logged_in)
    /// and [`remove`] find them. Nothing happens when unavailable.
    pub fn create(&self, id: &str, dir: &VmDir, limits: Limits) -> Result<(), CgroupError> {
        let groups: Vec<PathBuf> = match self {
            Cgroups::Unavailable(_) => return Ok(()),
            Cgroups::V2 { vms } => vec![vms.join(id)],
            Cgroups::V1 { memory, cpu, pids } => vec![memory.join(id), cpu.join(id), pids.join(id)],
        };
        // Listed before they exist, so a start that fails half-way leaves
        // nothing [`remove`] does not know about.
        let list: String = groups
            .iter()
            .map(|p| format!("{}\n", p.display()))
            .collect();
        // 0600 whatever the umask, like everything in the VM directory.
        crate::vmdir::write_atomic(&dir.cgroup(), list.as_bytes()).map_err(io(&dir.cgroup()))?;
        for g in &groups {
            make_dir(g)?;
        }
        let cpu_max = format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us);
        match groups.as_slice() {
            [g] => {
                write_all(
                    g,
                    &[
                        ("memory.max", limits.memory_bytes.to_string()),
                        ("cpu.max", cpu_max),
                        ("pids.max", limits.pids_max.to_string()),
                    ],
                )?;
                // Swap would let the VM exceed memory.max; absent without
                // swap accounting, which is fine.
                let _ = std::fs::write(g.join("memory.swap.max"), "0");
            }
            [m, c, p] => {
                write_all(
                    m,
                    &[("memory.limit_in_bytes", limits.memory_bytes.to_string())],
                )?;
                write_all(
                    c,
                    &[
                        ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                        ("cpu.cfs_quota_us", limits.cpu_quota_us.to_string()),
                    ],
                )?;
                write_all(p, &[("pids.max", limits.pids_max.to_string())])?;
            }
            _ => {}
        }
        Ok(())
    }
}

fn make_dir(g: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(g) {
        Ok(()) => Ok(()),
        // A VM id is new, but a start that failed after this point and is
        // retried under the same id (power on) reuses it.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io(g)(e)),
    }
}

fn write_all(g: &Path, files: &[(&str, String)]) -> Result<(), CgroupError> {
    for (name, value) in files {
        let p = g.join(name);
        std::fs::write(&p, value).map_err(io(&p))?;
    }
    Ok(())
}

/// The cgroup directories recorded for a VM (empty: none).
pub fn recorded(dir: &VmDir) -> Vec<PathBuf> {
    std::fs::read_to_string(dir.cgroup())
        .map(|s| {
            s.lines()
                .filter(|l| !l.is_empty())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Open the `cgroup.procs` files of a VM's cgroups, so that a process
/// about to be spawned can join them between fork and exec
/// ([`join_in_child`]).
pub fn open_procs(dir: &VmDir) -> std::io::Result<Vec<OwnedFd>> {
    recorded(dir)
        .iter()
        .map(|g| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(g.join("cgroup.procs"))
                .map(OwnedFd::from)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", g.display())))
        })
        .collect()
}

/// Make `cmd`'s process join the cgroups behind `procs` before it execs,
/// so nothing it allocates is ever charged outside its VM's limits. A
/// failed join fails the spawn.
pub fn join_in_child(cmd: &mut tokio::process::Command, procs: Vec<OwnedFd>) {
    if procs.is_empty() {
        return;
    }
    let fds: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: the closure runs in the forked child and only calls write(2),
    // which is async-signal-safe, on descriptors opened before the fork.
    // `procs` is moved into the closure so they stay open until then; exec
    // closes them (O_CLOEXEC).
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &procs;
            for fd in &fds {
                // "0": the writing process itself (v1 and v2 alike).
                if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Kill whatever still runs in a VM's cgroups and delete them. Called
/// after the VM's processes were killed; anything left (a process the
/// hypervisor forked) goes too. Failures are logged: a leftover empty
/// cgroup costs nothing but is reported.
pub async fn remove(dir: &VmDir) {
    let groups = recorded(dir);
    if groups.is_empty() {
        return;
    }
    for g in &groups {
        kill_all(g);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for g in &groups {
        loop {
            match std::fs::remove_dir(g) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() < deadline => {
                    // Busy while exiting processes are still in it.
                    tracing::debug!(cgroup = %g.display(), error = %e, "cgroup busy");
                    kill_all(g);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    tracing::warn!(cgroup = %g.display(), error = %e, "cannot remove the VM's cgroup");
                    break;
                }
            }
        }
    }
    let _ = std::fs::remove_file(dir.cgroup());
}

/// SIGKILL every process in the cgroup `g` (`cgroup.kill` where the kernel
/// has it).
fn kill_all(g: &Path) {
    if std::fs::write(g.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    let Ok(procs) = std::fs::read_to_string(g.join("cgroup.procs")) else {
        return;
    };
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        if pid > 0 {
            // SAFETY: plain syscall; the pid is a member of this VM's cgroup.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Mount points of cgroup filesystems: (fstype, mount point, super options).
fn mounts() -> Vec<(String, PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let _source = post.next()?;
            let opts = post.next().unwrap_or("");
            (fstype == "cgroup2" || fstype == "cgroup").then(|| {
                (
                    fstype.to_string(),
                    PathBuf::from(unescape(mount_point)),
                    opts.to_string(),
                )
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// This process's cgroup in each hierarchy: (controllers, path); the v2
/// entry has empty controllers.
fn own_cgroups() -> Vec<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _id = it.next()?;
            let ctl = it.next()?;
            let path = it.next()?;
            Some((ctl.to_string(), path.to_string()))
        })
        .collect()
}

fn join_rel(mount: &Path, rel: &str) -> PathBuf {
    mount.join(rel.trim_start_matches('/'))
}

fn detect_v2(parent: Option<&Path>) -> Result<Cgroups, String> {
    let mount = mounts()
        .into_iter()
        .find(|(t, _, _)| t == "cgroup2")
        .map(|(_, m, _)| m)
        .ok_or("no cgroup2 filesystem is mounted")?;
    let own = own_cgroups()
        .into_iter()
        .find(|(c, _)| c.is_empty())
        .map(|(_, p)| p)
        .ok_or("this process has no cgroup v2 entry in /proc/self/cgroup")?;
    let own_dir = join_rel(&mount, &own);
    let base = match parent {
        Some(p) => join_rel(&mount, &p.display().to_string()),
        // systemd's DelegateSubgroup=supervisor put us one level down.
        None if own_dir.file_name().is_some_and(|n| n == SUPERVISOR_GROUP) => own_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or(own_dir.clone()),
        None => own_dir.clone(),
    };
    let offered = std::fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
    let missing: Vec<&str> = CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !offered.split_whitespace().any(|o| o == *c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "cgroup v2 at {} does not offer {} (a hybrid host keeps them on cgroup v1, or \
             they were not delegated: run the host agent with systemd's Delegate=yes, see \
             deploy/systemd)",
            base.display(),
            missing.join(", ")
        ));
    }
    enable_controllers(&base, &own_dir)?;
    let vms = base.join(VMS_GROUP);
    if let Err(e) = std::fs::create_dir(&vms) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(format!("cannot create {}: {e}", vms.display()));
        }
    }
    enable_controllers(&vms, &own_dir)?;
    Ok(Cgroups::V2 { vms })
}

/// Give the three controllers to `g`'s children. A cgroup with processes
/// of its own cannot (EBUSY); when the only one is this process, it moves
/// into `<g>/supervisor` first.
fn enable_controllers(g: &Path, own_dir: &Path) -> Result<(), String> {
    let ctl = g.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&ctl).unwrap_or_default();
    let want: Vec<String> = CONTROLLERS
        .iter()
        .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if want.is_empty() {
        return Ok(());
    }
    let line = want.join(" ");
    let first = std::fs::write(&ctl, &line);
    let Err(e) = first else { return Ok(()) };
    if e.raw_os_error() != Some(libc::EBUSY) || g != own_dir {
        return Err(format!("cannot enable {line} in {}: {e}", ctl.display()));
    }
    let me = std::process::id().to_string();
    let procs = std::fs::read_to_string(g.join("cgroup.procs")).unwrap_or_default();
    if procs.lines().any(|p| p.trim() != me) {
        return Err(format!(
            "{} holds other processes besides the host agent, so it cannot give controllers \
             to VM cgroups; run the host agent as a systemd service with Delegate=yes (see \
             deploy/systemd) or pass --cgroup-parent",
            g.display()
        ));
    }
    let sup = g.join(SUPERVISOR_GROUP);
    if let Err(e) = std::fs::create_dir(&sup) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(format!("cannot create {}: {e}", sup.display()));
        }
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(sup.join("cgroup.procs"))
        .and_then(|mut f| f.write_all(me.as_bytes()))
        .map_err(|e| format!("cannot move the host agent into {}: {e}", sup.display()))?;
    std::fs::write(&ctl, &line)
        .map_err(|e| format!("cannot enable {line} in {}: {e}", ctl.display()))
}

fn detect_v1() -> Result<Cgroups, String> {
    let mounts = mounts();
    let own = own_cgroups();
    let mut dirs = Vec::new();
    for c in CONTROLLERS {
        let has = |list: &str| list.split(',').any(|x| x == c);
        let mount = mounts
            .iter()
            .find(|(t, _, o)| t == "cgroup" && has(o))
            .map(|(_, m, _)| m.clone())
            .ok_or_else(|| format!("no cgroup v1 hierarchy has the {c} controller"))?;
        let path = own
            .iter()
            .find(|(ctl, _)| has(ctl))
            .map(|(_, p)| p.clone())
            .ok_or_else(|| format!("this process is in no {c} cgroup"))?;
        let vms = join_rel(&mount, &path).join(VMS_GROUP);
        if let Err(e) = std::fs::create_dir(&vms) {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(format!("cannot create {}: {e}", vms.display()));
            }
        }
        dirs.push(vms);
    }
    let mut it = dirs.into_iter();
    match (it.next(), it.next(), it.next()) {
        (Some(memory), Some(cpu), Some(pids)) => Ok(Cgroups::V1 { memory, cpu, pids }),
        _ => Err("cgroup v1 detection found fewer than three controllers".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(
            join_rel(Path::new("/sys/fs/cgroup"), "/x/y"),
            PathBuf::from("/sys/fs/cgroup/x/y")
        );
        assert_eq!(
            join_rel(Path::new("/sys/fs/cgroup"), "/"),
            PathBuf::from("/sys/fs/cgroup/")
        );
    }

    #[test]
    fn off_is_unavailable_with_a_reason() {
        let c = Cgroups::detect(CgroupMode::Off, None);
        assert!(matches!(c, Ok(Cgroups::Unavailable(ref r)) if r.contains("--vm-cgroups off")));
    }
}
