//! `polydev`: one binary for every host-side role.

mod artifacts;
mod bench;
mod bench_api;
mod bench_desktop;
mod bench_egress;
mod bench_soak;
mod controller_run;
mod doctor;
mod hostd;
mod run;
mod server;
mod upstream;
mod vault;
mod vm;
mod vm_shell;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Polydev Remote: private microVMs for AI coding CLIs.
#[derive(Parser)]
#[command(name = "polydev", version, about)]
struct Cli {
    /// Where host state lives (VM directories, logs, snapshots, sockets).
    #[arg(long, global = true, env = "POLYDEV_DATA")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run everything on this machine: the host agent and the controller
    /// (HTTP API on --listen, driver); first start prints an admin login link.
    Up(hostd::UpArgs),
    /// Run the host agent: creates, tracks and destroys VMs.
    Host(hostd::HostArgs),
    /// Manage VMs through the running host agent.
    #[command(subcommand)]
    Vm(vm::VmCmd),
    /// Build or show guest artifacts (kernel, initramfs).
    #[command(subcommand)]
    Image(artifacts::ImageCmd),
    /// Check what works on this machine and how to fix what does not.
    Doctor(doctor::DoctorArgs),
    /// Run the controller (HTTP API + driver) against a host agent's socket.
    Server(server::ServerArgs),
    /// Run a prompt with a connected provider's CLI in your CLI VM (through
    /// the controller's API; `$POLYDEV_TOKEN`), printing its output; exits
    /// with the run's exit status.
    Run(run::RunArgs),
    /// Users' upstream proxy ports: ls, show, pin, release, rotate.
    Upstream(upstream::UpstreamArgs),
    /// The credential vault's master keys (rotate).
    Vault(vault::VaultArgs),
    /// Measure the system (prints numbers; never pass/fail).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// The controller's driver alone, against the host agent's socket (for
    /// tests; `polydev server` runs it with the HTTP API).
    #[command(hide = true)]
    ControllerRun(controller_run::ControllerRunArgs),
    /// Per-VM vsock bridge over a virtio-serial port (started by the host
    /// agent for QEMU VMs; not for direct use).
    #[command(hide = true)]
    VsockBridge {
        /// QEMU's chardev socket of the virtio-serial port.
        #[arg(long)]
        chardev: PathBuf,
        /// Hybrid vsock socket to serve.
        #[arg(long)]
        uds: PathBuf,
        /// Exit when this process (the VM's QEMU) exits.
        #[arg(long)]
        watch_pid: Option<i32>,
    },
}

fn main() {
    let cli = Cli::parse();
    // Benchmarks print their figures; the logs of what they drive (a line
    // per request or per egress connection) would bury them and be timed
    // as much as the path itself. `POLYDEV_LOG` still asks for more.
    let default_filter = match &cli.cmd {
        Cmd::Bench(_) => "warn",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("POLYDEV_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let data_dir = cli.data_dir.unwrap_or_else(default_data_dir);
    if let Cmd::VsockBridge {
        chardev,
        uds,
        watch_pid,
    } = &cli.cmd
    {
        // Blocking and thread-based: no async runtime needed.
        let opts = polydev_mux::bridge::BridgeOptions {
            watch_pid: *watch_pid,
            handle_signals: true,
            ..Default::default()
        };
        match polydev_mux::bridge::run_bridge_with(chardev, uds, opts) {
            Ok(exit) => {
                eprintln!("vsock-bridge: {exit:?}");
                std::process::exit(0);
            }
            Err(e) => {
                eprintln!("vsock-bridge: {e}");
                std::process::exit(1);
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Up(a) => hostd::run(data_dir, a.host, Some(a.controller)).await,
            Cmd::Host(a) => hostd::run(data_dir, a, None).await,
            Cmd::Server(a) => server::run(data_dir, a).await,
            Cmd::Vm(c) => vm::run(data_dir, c).await,
            Cmd::Image(c) => artifacts::run(c).await,
            Cmd::Doctor(a) => doctor::run(data_dir, a).await,
            Cmd::Bench(c) => bench::run(c).await,
            Cmd::Run(a) => run::run(a).await,
            Cmd::Upstream(a) => upstream::run(data_dir, a).await,
            Cmd::Vault(a) => vault::run(data_dir, a).await,
            Cmd::ControllerRun(a) => controller_run::run(data_dir, a).await,
            Cmd::VsockBridge { .. } => Ok(0),
        }
    });
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// `$XDG_DATA_HOME/polydev` or `~/.local/share/polydev`.
fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("polydev");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib"));
    home.join(".local/share/polydev")
}
