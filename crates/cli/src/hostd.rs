//! `polydev host` / `polydev up`: the long-running host agent.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, ValueEnum};
use polydev_api::vm::{Accel, HypervisorKind};
use polydev_host::cgroup::CgroupMode;
use polydev_host::config::QemuVsock;
use polydev_host::{HostConfig, Manager};

use crate::artifacts::ensure_boot_files;
use crate::doctor;

/// Accelerator choice on the command line.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum AccelArg {
    /// Probe KVM with a real boot; fall back to TCG.
    Auto,
    /// Hardware virtualization.
    Kvm,
    /// Software emulation.
    Tcg,
}

/// The host agent's options at their documented defaults but for `args`
/// (command-line style, e.g. `["--accel", "tcg"]`): what a benchmark's
/// in-process host agent runs with, so a new option gets its default there
/// too.
pub fn host_args_with(args: &[&str]) -> Result<HostArgs, clap::Error> {
    #[derive(clap::Parser)]
    struct Defaults {
        #[command(flatten)]
        host: HostArgs,
    }
    use clap::Parser;
    Defaults::try_parse_from(std::iter::once("polydev-host").chain(args.iter().copied()))
        .map(|d| d.host)
}

/// Options of the host agent.
#[derive(Args, Clone, Debug)]
pub struct HostArgs {
    /// Accelerator for QEMU VMs.
    #[arg(long, value_enum, default_value = "auto", env = "POLYDEV_ACCEL")]
    pub accel: AccelArg,
    /// Default hypervisor.
    #[arg(long, default_value = "qemu", value_parser = parse_hypervisor)]
    pub hypervisor: HypervisorKind,
    /// vCPUs of a VM whose request names none.
    #[arg(long, default_value_t = 1)]
    pub default_vcpus: u32,
    /// Memory (MiB) of a VM whose request names none and whose image
    /// declares no default in the recipe (cli and browser do: 1024).
    #[arg(long, default_value_t = 256)]
    pub default_memory_mib: u32,
    /// Dead VMs whose logs are kept.
    #[arg(long, default_value_t = 200)]
    pub log_retention: usize,
    /// Cap in bytes of each VM log file (console.log, agent.log,
    /// egress.log); at the cap it rotates to <name>.1, keeping one old file.
    #[arg(long, default_value_t = polydev_host::logfile::DEFAULT_LOG_MAX_BYTES,
          value_parser = clap::value_parser!(u64).range(polydev_host::logfile::MIN_LOG_MAX_BYTES..))]
    pub log_max_bytes: u64,
    /// Cap in bytes of all ended VMs' kept logs together; the oldest go
    /// first.
    #[arg(long, default_value_t = polydev_host::config::DEFAULT_LOGS_ARCHIVE_MAX_BYTES)]
    pub logs_archive_max_bytes: u64,
    /// Seconds a VM may take to boot to agent-ready.
    #[arg(long, default_value_t = 60)]
    pub boot_timeout_s: u64,
    /// TCG only: translation cache per VM in MiB (QEMU's default, 1024,
    /// becomes most of a browser VM's host memory).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(32..=4096))]
    pub tcg_tb_size_mib: u32,
    /// vsock transport of QEMU VMs: serial-mux (snapshots work) or
    /// vhost-user (vhost-device-vsock; QEMU cannot snapshot it).
    #[arg(long, default_value = "serial-mux", value_parser = parse_qemu_vsock)]
    pub qemu_vsock: QemuVsock,
    /// Kernel to boot (default: the cached Debian cloud kernel).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs to boot (default: built with the current guest agent).
    #[arg(long)]
    pub initramfs: Option<PathBuf>,
    /// Egress connections one VM may have open at once.
    #[arg(long, default_value_t = 256)]
    pub egress_max_connections: usize,
    /// Seconds without traffic after which an egress connection is closed.
    #[arg(long, default_value_t = 300)]
    pub egress_idle_timeout_s: u64,
    /// Egress bandwidth per VM in bytes per second, both directions
    /// together (0: unlimited).
    #[arg(long, default_value_t = 25 * 1024 * 1024)]
    pub egress_bytes_per_sec: u64,
    /// How each VM's processes are confined.
    #[command(flatten)]
    pub confinement: ConfinementArgs,
}

/// Options of the host agent that confine each VM's processes.
#[derive(Args, Clone, Debug)]
pub struct ConfinementArgs {
    /// Run QEMU without its seccomp sandbox (`-sandbox on,…`; for
    /// debugging a QEMU that dies with SIGSYS).
    #[arg(long)]
    pub no_qemu_sandbox: bool,
    /// Per-VM cgroups with memory, CPU and pids limits: auto (when the
    /// host offers them, else a warning), required, or off.
    #[arg(long, default_value = "auto", value_parser = parse_cgroup_mode)]
    pub vm_cgroups: CgroupMode,
    /// cgroup v2 path (relative to the cgroup2 mount) under which VM
    /// cgroups go; default: the host agent's own, delegated cgroup.
    #[arg(long)]
    pub cgroup_parent: Option<PathBuf>,
    /// Host memory (MiB) a VM's processes may use beyond its guest memory
    /// and TCG translation cache, before the kernel reclaims or kills.
    #[arg(long, default_value_t = 256)]
    pub vm_memory_overhead_mib: u32,
    /// CPU per vCPU a VM's processes may use, in percent of one host CPU.
    #[arg(long, default_value_t = 150, value_parser = clap::value_parser!(u32).range(10..=10_000))]
    pub vm_cpu_percent: u32,
    /// Threads and processes one VM's processes may have.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(16..))]
    pub vm_pids_max: u64,
    /// Start Firecracker VMs through this `jailer` binary (chroot, mount
    /// namespace, --jailer-uid/--jailer-gid); without it Firecracker runs
    /// as the host agent's user (development only).
    #[arg(long, env = "POLYDEV_JAILER", requires_all = ["jailer_uid", "jailer_gid"])]
    pub jailer: Option<PathBuf>,
    /// Run QEMU as the host agent's user instead of a user of each VM's
    /// own (uid and gid from --qemu-uid-base on).
    #[arg(long)]
    pub qemu_as_host_user: bool,
    /// First uid (and gid) of QEMU's per-VM users; the next 1,048,576 must
    /// belong to nobody on this host.
    #[arg(long, default_value_t = polydev_host::config::DEFAULT_QEMU_UID_BASE,
          value_parser = clap::value_parser!(u32).range(1000..=0xFFE0_0000))]
    pub qemu_uid_base: u32,
    /// uid jailed Firecracker processes run as (a dedicated, unused one).
    #[arg(long)]
    pub jailer_uid: Option<u32>,
    /// gid jailed Firecracker processes run as.
    #[arg(long)]
    pub jailer_gid: Option<u32>,
}

impl Default for ConfinementArgs {
    fn default() -> Self {
        let d = polydev_host::config::Confinement::default();
        ConfinementArgs {
            no_qemu_sandbox: false,
            qemu_as_host_user: false,
            qemu_uid_base: d
                .qemu_uid_base
                .unwrap_or(polydev_host::config::DEFAULT_QEMU_UID_BASE),
            vm_cgroups: d.cgroups,
            cgroup_parent: d.cgroup_parent,
            vm_memory_overhead_mib: d.memory_overhead_mib,
            vm_cpu_percent: d.cpu_percent_per_vcpu,
            vm_pids_max: d.pids_max,
            jailer: None,
            jailer_uid: None,
            jailer_gid: None,
        }
    }
}

fn parse_cgroup_mode(s: &str) -> Result<CgroupMode, String> {
    match s {
        "auto" => Ok(CgroupMode::Auto),
        "required" => Ok(CgroupMode::Required),
        "off" => Ok(CgroupMode::Off),
        _ => Err("use auto, required or off".into()),
    }
}

fn parse_qemu_vsock(s: &str) -> Result<QemuVsock, String> {
    match s {
        "serial-mux" => Ok(QemuVsock::SerialMux),
        "vhost-user" => Ok(QemuVsock::VhostUser),
        _ => Err("use serial-mux or vhost-user".into()),
    }
}

fn parse_hypervisor(s: &str) -> Result<HypervisorKind, String> {
    match s {
        "qemu" => Ok(HypervisorKind::Qemu),
        "firecracker" => Ok(HypervisorKind::Firecracker),
        _ => Err("use qemu or firecracker".into()),
    }
}

/// Build the host configuration: artifacts, accelerator, limits.
pub async fn config(data_dir: PathBuf, a: &HostArgs) -> anyhow::Result<HostConfig> {
    let (kernel, initramfs) = match (&a.kernel, &a.initramfs) {
        (Some(k), Some(i)) => (k.clone(), i.clone()),
        _ => {
            let f = ensure_boot_files(true).await?;
            (
                a.kernel.clone().unwrap_or(f.kernel),
                a.initramfs.clone().unwrap_or(f.initramfs),
            )
        }
    };
    let mut cfg = HostConfig::with_defaults(data_dir, kernel, initramfs);
    cfg.hypervisor = a.hypervisor;
    cfg.qemu_vsock = a.qemu_vsock;
    cfg.default_vcpus = a.default_vcpus;
    cfg.default_memory_mib = a.default_memory_mib;
    cfg.log_retention = a.log_retention;
    cfg.log_max_bytes = a.log_max_bytes;
    cfg.logs_archive_max_bytes = a.logs_archive_max_bytes;
    if a.egress_max_connections == 0 || a.egress_idle_timeout_s == 0 {
        anyhow::bail!("--egress-max-connections and --egress-idle-timeout-s must be at least 1");
    }
    cfg.egress.max_connections = a.egress_max_connections;
    cfg.egress.idle_timeout = std::time::Duration::from_secs(a.egress_idle_timeout_s);
    cfg.egress.bytes_per_sec = a.egress_bytes_per_sec;
    cfg.boot_timeout = std::time::Duration::from_secs(a.boot_timeout_s);
    cfg.tcg_tb_mib = a.tcg_tb_size_mib;
    let c = &a.confinement;
    cfg.qemu_sandbox = !c.no_qemu_sandbox;
    cfg.confinement.cgroups = c.vm_cgroups;
    cfg.confinement.cgroup_parent = c.cgroup_parent.clone();
    cfg.confinement.memory_overhead_mib = c.vm_memory_overhead_mib;
    cfg.confinement.cpu_percent_per_vcpu = c.vm_cpu_percent;
    cfg.confinement.pids_max = c.vm_pids_max;
    cfg.confinement.qemu_uid_base = (!c.qemu_as_host_user).then_some(c.qemu_uid_base);
    cfg.confinement.jailer = match (&c.jailer, c.jailer_uid, c.jailer_gid) {
        (Some(bin), Some(uid), Some(gid)) => {
            if uid == 0 || gid == 0 {
                anyhow::bail!("--jailer-uid and --jailer-gid must not be 0: the jail's point is an unprivileged user");
            }
            Some(polydev_host::hypervisor::jailer::Jailer {
                bin: bin.clone(),
                uid,
                gid,
            })
        }
        _ => None,
    };
    cfg.accel = match a.accel {
        AccelArg::Kvm => Accel::Kvm,
        AccelArg::Tcg => Accel::Tcg,
        AccelArg::Auto => doctor::choose_accel(&cfg, false).await,
    };
    Ok(cfg)
}

/// `polydev up`: the host agent and, in the same process, the controller
/// (HTTP API + driver) talking to it directly.
#[derive(Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub host: HostArgs,
    #[command(flatten)]
    pub controller: crate::server::ControllerArgs,
}

/// `polydev host` (`controller: None`) or `polydev up`.
pub async fn run(
    data_dir: PathBuf,
    a: HostArgs,
    controller: Option<crate::server::ControllerArgs>,
) -> anyhow::Result<i32> {
    let up = controller.is_some();
    polydev_host::private::dir_all(&data_dir).with_context(|| {
        format!(
            "cannot create data directory {} (mode 0700)",
            data_dir.display()
        )
    })?;
    let cfg = config(data_dir.clone(), &a).await?;
    let socket = cfg.socket_path();
    eprintln!(
        "polydev {}: accelerator {} (hypervisor {}), data in {}",
        if up { "up" } else { "host" },
        cfg.accel,
        cfg.hypervisor,
        cfg.data_dir.display()
    );
    let mgr = Manager::start(cfg)
        .await
        .context("starting the host agent")?;
    eprintln!("confinement: {}", mgr.cgroups().describe());
    let adopted = mgr.list(false).await.len();
    if adopted > 0 {
        eprintln!("adopted {adopted} running VM(s) from a previous run");
    }
    eprintln!("host agent listening on {}", socket.display());
    let shutdown = crate::server::shutdown_on_signals();
    let controller_task = match controller {
        Some(c) => {
            let host = Arc::new(polydev_controller::recovery::LocalHost {
                host_id: polydev_controller::driver::LOCAL_HOST_ID.to_string(),
                manager: Arc::clone(&mgr),
            });
            let rx = shutdown.clone();
            let dir = data_dir.clone();
            Some(tokio::spawn(async move {
                crate::server::run_controller(&dir, &c, host, rx).await
            }))
        }
        None => {
            eprintln!("try: polydev vm run && polydev vm ls");
            None
        }
    };
    let mut rx = shutdown.clone();
    let stop = async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let m2 = Arc::clone(&mgr);
    let flat = |c: Result<anyhow::Result<()>, tokio::task::JoinError>| match c {
        Ok(r) => r.context("the controller stopped"),
        Err(e) => Err(anyhow::anyhow!("the controller task failed: {e}")),
    };
    // (host agent, controller): a failed controller (bad database URL, port
    // taken) ends `up` too; a host agent that could not serve (another one
    // holds the socket) stops the controller.
    let (served, controller) = match controller_task {
        Some(mut task) => {
            let host = polydev_host::server::serve(mgr, &socket, stop);
            tokio::pin!(host);
            tokio::select! {
                r = &mut host => match r {
                    Ok(()) => (Ok(()), flat(task.await)),
                    Err(e) => {
                        task.abort();
                        let _ = task.await;
                        (Err(e), Ok(()))
                    }
                },
                c = &mut task => (Ok(()), flat(c)),
            }
        }
        None => (
            polydev_host::server::serve(mgr, &socket, stop).await,
            Ok(()),
        ),
    };
    // Not serving means the socket is someone else's: leave it alone.
    served.context("serving the host API")?;
    // VMs keep running; the next host agent adopts them.
    m2.detach();
    let _ = std::fs::remove_file(&socket);
    controller?;
    eprintln!("host agent stopped; VMs keep running and will be adopted on the next start");
    Ok(0)
}
