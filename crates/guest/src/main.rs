//! `polydev-guest`: the guest agent, PID 1 of every Polydev VM.
//!
//! As PID 1 it mounts the pseudo filesystems, loads the initramfs's kernel
//! modules, switches into the VM's root overlay (when the kernel command
//! line names one), then serves the agent API on vsock (or on the
//! `polydev-mux` virtio-serial port, which QEMU VMs use), ships its log to the
//! host, supervises services and reaps every process. With `--listen` (not
//! PID 1) it serves the same protocol on a Unix socket for development and
//! tests, and touches nothing system-wide on its own.

mod boot;
mod configure;
mod egress;
mod exec;
mod files;
mod forward;
mod logger;
mod net;
mod process;
mod pty;
mod reaper;
mod server;
mod supervisor;
mod terminals;
mod util;
mod watch;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use polydev_api::agent::{self, ServiceSpec, AGENT_PORT, EGRESS_PORT, HOST_CID, LOG_PORT};

use crate::logger::logger;
use crate::net::{Addr, Listener};
use crate::server::{ShutdownFn, State};
use crate::supervisor::{SharedEnv, Supervisor};

const MODULES_LIST: &str = "/etc/polydev/modules";
const SERVICES_JSON: &str = "/etc/polydev/services.json";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const USAGE: &str = "usage: polydev-guest [--listen ADDR] [--log-socket ADDR] [--services FILE]

As PID 1 (the VM's /init) no options are needed. Otherwise:
  --listen ADDR      serve the agent API on ADDR (unix:/path or vsock:PORT); required
  --log-socket ADDR  ship the log stream to ADDR (unix:/path or vsock:CID:PORT)
  --services FILE    start the services declared in FILE (a JSON array)";

/// Errors of the command line.
#[derive(Debug, thiserror::Error)]
enum ArgsError {
    #[error("help requested")]
    Help,
    #[error("{0} needs a value")]
    Missing(String),
    #[error("unknown argument {0:?}")]
    Unknown(String),
    #[error(
        "not running as PID 1, so --listen ADDR is required (e.g. --listen unix:/tmp/agent.sock)"
    )]
    NoListen,
    #[error(transparent)]
    Addr(#[from] net::NetError),
}

/// Errors of starting the agent.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Reaper(#[from] reaper::ReaperError),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error("cannot read services file {path}: {source}")]
    ServicesRead {
        path: String,
        source: std::io::Error,
    },
    #[error("services file {path} is not a JSON array of services: {source}")]
    ServicesParse {
        path: String,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Services(#[from] supervisor::SupervisorError),
}

#[derive(Debug, Default)]
struct Args {
    listen: Option<Addr>,
    log_socket: Option<Addr>,
    services: Option<String>,
}

fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Args, ArgsError> {
    let mut out = Args::default();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| ArgsError::Missing(name.to_string()))
        };
        match a.as_str() {
            "--listen" => out.listen = Some(value("--listen")?.parse()?),
            "--log-socket" => out.log_socket = Some(value("--log-socket")?.parse()?),
            "--services" => out.services = Some(value("--services")?),
            "-h" | "--help" => return Err(ArgsError::Help),
            _ => return Err(ArgsError::Unknown(a)),
        }
    }
    if out.listen.is_none() {
        return Err(ArgsError::NoListen);
    }
    Ok(out)
}

fn main() {
    if std::process::id() == 1 {
        pid1();
    }
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(ArgsError::Help) => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("polydev-guest: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = dev_main(args) {
        eprintln!("polydev-guest: {e}");
        std::process::exit(1);
    }
}

/// Development mode: serve on `--listen`, touch nothing system-wide.
fn dev_main(args: Args) -> Result<(), StartError> {
    reaper::block_sigchld()?;
    // Orphans of our children come to us, as they would to PID 1.
    // SAFETY: plain prctl; failure only means orphans go elsewhere.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    reaper::start()?;
    let _ = logger().start_console();
    logger::info(format!(
        "polydev-guest {} starting (development mode, pid {})",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    ));
    let env = base_env(false);
    let sup = Arc::new(Supervisor::new(env.clone()));
    let Some(listen) = args.listen else {
        return Ok(());
    };
    let listener = Listener::bind(&listen)?;
    start_shipper(args.log_socket);
    if let Some(path) = &args.services {
        let specs = read_services(path)?;
        sup.declare(specs)?;
    }
    let stop = sup.clone();
    let shutdown: ShutdownFn = Box::new(move |_reboot| {
        stop.stop_all();
        logger::info("exiting (development mode)");
        // Give the console thread a moment to print the last lines.
        std::thread::sleep(Duration::from_millis(50));
        std::process::exit(0);
    });
    ready(&listen);
    server::serve(
        listener,
        Arc::new(State {
            rootfs: false,
            env,
            supervisor: sup,
            shutdown,
        }),
    );
    Ok(())
}

/// PID 1 must never exit (the kernel panics): run the boot and then idle,
/// whatever happens.
fn pid1() -> ! {
    let _ = std::panic::catch_unwind(pid1_boot);
    logger::error(
        "the agent's main thread ended; the guest stays up but the agent API may be gone",
    );
    loop {
        std::thread::park();
    }
}

fn pid1_boot() {
    // Before any thread exists, so every thread inherits the mask.
    if let Err(e) = reaper::block_sigchld() {
        logger::error(e.to_string());
    }
    boot::mount_early();
    boot::open_console();
    if let Err(e) = logger().start_console() {
        let _ = writeln!(std::io::stderr(), "polydev-guest: no console thread: {e}");
    }
    logger::info(format!(
        "polydev-guest {} starting as PID 1",
        env!("CARGO_PKG_VERSION")
    ));
    if let Err(e) = reaper::start() {
        logger::error(e.to_string());
    }
    boot::load_modules(MODULES_LIST);
    if let Err(e) = boot::loopback_up() {
        logger::error(format!("cannot bring up the loopback interface: {e}"));
    }
    // The initramfs's copy, in case the root filesystem has none.
    let initramfs_services = std::fs::read_to_string(SERVICES_JSON).ok();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let rootfs = match boot::parse_cmdline(&cmdline) {
        Ok(None) => {
            logger::info("no polydev.root on the kernel command line; staying in the initramfs");
            false
        }
        Ok(Some(cfg)) => match boot::switch_root(&cfg) {
            Ok(()) => {
                logger::info(format!(
                    "switched into the root filesystem on {}",
                    cfg.device
                ));
                true
            }
            Err(e) => {
                logger::error(format!("{e}; staying in the initramfs"));
                false
            }
        },
        Err(e) => {
            logger::error(format!("{e}; staying in the initramfs"));
            false
        }
    };
    let env = base_env(true);
    let sup = Arc::new(Supervisor::new(env.clone()));
    let choice = boot::parse_transport(&cmdline).unwrap_or_else(|e| {
        logger::error(format!("{e}; choosing automatically"));
        boot::TransportChoice::Auto
    });
    let (listen, log_addr, egress_addr) = match boot::choose_transport(choice) {
        boot::Transport::Mux(dev) => match net::start_mux(&dev) {
            Ok(()) => {
                logger::info(format!(
                    "talking to the host over the mux on {}",
                    dev.display()
                ));
                (
                    Addr::Mux { port: AGENT_PORT },
                    Addr::Mux { port: LOG_PORT },
                    Addr::Mux { port: EGRESS_PORT },
                )
            }
            Err(e) => {
                logger::error(format!("{e}; falling back to vsock"));
                vsock_addrs()
            }
        },
        boot::Transport::Vsock => vsock_addrs(),
    };
    let listener = bind_retrying(&listen);
    start_shipper(Some(log_addr));
    // Before any service starts: services get HTTP(S)_PROXY pointing here.
    match egress::start(egress_addr) {
        Ok(()) => logger::info(format!(
            "egress proxy listening on {}",
            agent::EGRESS_PROXY_ADDR
        )),
        Err(e) => logger::error(format!(
            "cannot start the egress proxy on {}: {e}; nothing in this VM can reach the network",
            agent::EGRESS_PROXY_ADDR
        )),
    }
    let services = match std::fs::read_to_string(SERVICES_JSON) {
        Ok(t) => Some(t),
        Err(_) => initramfs_services,
    };
    if let Some(text) = services {
        match serde_json::from_str::<Vec<ServiceSpec>>(&text) {
            Ok(specs) => {
                if let Err(e) = sup.declare(specs) {
                    logger::error(format!("{SERVICES_JSON}: {e}"));
                }
            }
            Err(e) => logger::error(format!(
                "{SERVICES_JSON} is not a JSON array of services: {e}; no services started"
            )),
        }
    }
    let stop = sup.clone();
    let shutdown: ShutdownFn = Box::new(move |reboot| power_off(&stop, reboot));
    ready(&listen);
    server::serve(
        listener,
        Arc::new(State {
            rootfs,
            env,
            supervisor: sup,
            shutdown,
        }),
    );
}

/// The agent's listen address and the host's log and egress addresses over
/// vsock.
fn vsock_addrs() -> (Addr, Addr, Addr) {
    (
        Addr::Vsock {
            cid: libc::VMADDR_CID_ANY,
            port: AGENT_PORT,
        },
        Addr::Vsock {
            cid: HOST_CID,
            port: LOG_PORT,
        },
        Addr::Vsock {
            cid: HOST_CID,
            port: EGRESS_PORT,
        },
    )
}

/// Without the API the VM is unusable, but staying up keeps the console
/// log readable; keep trying in case a module shows up late.
fn bind_retrying(addr: &Addr) -> Listener {
    let mut delay = Duration::from_millis(100);
    let mut attempts = 0u32;
    loop {
        match Listener::bind(addr) {
            Ok(l) => return l,
            Err(e) => {
                if attempts < 5 || attempts.is_multiple_of(60) {
                    logger::error(e.to_string());
                }
                attempts = attempts.saturating_add(1);
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn ready(listen: &Addr) {
    logger::info(format!("agent API listening on {listen}"));
    let _ = writeln!(std::io::stderr().lock(), "polydev-guest: ready");
}

fn start_shipper(addr: Option<Addr>) {
    match addr {
        Some(a) => {
            if let Err(e) = logger().start_shipper(a) {
                logger::error(format!("cannot start the log shipper: {e}"));
            }
        }
        None => logger().disable_shipping(),
    }
}

/// The environment of children: the agent's own, with PATH (and as PID 1,
/// HOME and the egress proxy variables) set for a normal system. The host's
/// `configure` can override any of them.
fn base_env(pid1: bool) -> SharedEnv {
    let mut env: BTreeMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    if pid1 {
        env.insert("PATH".into(), PATH.into());
        env.insert("HOME".into(), "/root".into());
        // The VM has no network interface: the shim is the only way out.
        // Both spellings, because tools disagree on which one they read.
        let proxy = format!("http://{}", agent::EGRESS_PROXY_ADDR);
        for k in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            env.insert(k.into(), proxy.clone());
        }
        env.insert("NO_PROXY".into(), "localhost,127.0.0.1".into());
        env.insert("no_proxy".into(), "localhost,127.0.0.1".into());
    } else {
        env.entry("PATH".into()).or_insert_with(|| PATH.into());
    }
    Arc::new(Mutex::new(env))
}

fn read_services(path: &str) -> Result<Vec<ServiceSpec>, StartError> {
    let text = std::fs::read_to_string(path).map_err(|source| StartError::ServicesRead {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| StartError::ServicesParse {
        path: path.into(),
        source,
    })
}

/// Stop everything and power off (or reboot). Only returns if the kernel
/// refuses, which it does not for PID 1.
fn power_off(sup: &Supervisor, reboot: bool) {
    sup.stop_all();
    // SAFETY: plain syscalls; as PID 1, kill(-1) spares the agent itself.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: as above.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        libc::sync();
    }
    logger::info(if reboot { "rebooting" } else { "powering off" });
    std::thread::sleep(Duration::from_millis(100));
    let cmd = if reboot {
        libc::RB_AUTOBOOT
    } else {
        libc::RB_POWER_OFF
    };
    // SAFETY: plain syscall.
    if unsafe { libc::reboot(cmd) } < 0 {
        logger::error(format!(
            "reboot syscall failed: {}",
            std::io::Error::last_os_error()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<Args, ArgsError> {
        parse_args(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn command_line() {
        let a = args(&["--listen", "unix:/tmp/x", "--log-socket", "unix:/tmp/y"]);
        assert!(matches!(
            a,
            Ok(Args {
                listen: Some(Addr::Unix(_)),
                log_socket: Some(_),
                ..
            })
        ));
        assert!(matches!(args(&[]), Err(ArgsError::NoListen)));
        assert!(matches!(args(&["--listen"]), Err(ArgsError::Missing(_))));
        assert!(matches!(args(&["--bogus"]), Err(ArgsError::Unknown(_))));
        assert!(matches!(
            args(&["--listen", "tcp:1"]),
            Err(ArgsError::Addr(_))
        ));
    }
}
