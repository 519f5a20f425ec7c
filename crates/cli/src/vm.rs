//! `polydev vm …`: a client of the running host agent.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;
use hyper::Method;
use polydev_api::agent::{ExecRequest, Response as Frame, RestartPolicy, ServiceSpec};
use polydev_api::vm::{EgressPolicy, Secret, SnapshotInfo, Upstream, VmInfo, VmSpec};
use polydev_host::client::HostClient;

/// `polydev vm …`
#[derive(Subcommand)]
pub enum VmCmd {
    /// Create and boot a VM (the minimal image unless one is named).
    Run {
        /// Human name.
        #[arg(long)]
        name: Option<String>,
        /// Whole vCPUs.
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory in MiB (default: the image's, e.g. 1024 for cli and
        /// browser, else the host's; at least the image's minimum).
        #[arg(long)]
        memory: Option<u32>,
        /// Image to boot.
        #[arg(long)]
        image: Option<String>,
        /// Environment for the guest, KEY=VALUE (repeatable).
        #[arg(long = "env", value_parser = parse_kv)]
        env: Vec<(String, String)>,
        /// A supervised service, NAME=COMMAND (run by `sh -c`; repeatable).
        #[arg(long = "service", value_parser = parse_kv)]
        services: Vec<(String, String)>,
        /// Persistent data disk size in MiB.
        #[arg(long)]
        data_disk: Option<u32>,
        /// Kernel to boot instead of the host's default (a host path).
        #[arg(long)]
        kernel: Option<String>,
        /// Send the VM's traffic through this proxy (http://HOST:PORT, or
        /// socks5://HOST:PORT for SOCKS5).
        /// Its password comes from $POLYDEV_EGRESS_PASSWORD, never from the
        /// command line.
        #[arg(long)]
        egress_upstream: Option<String>,
        /// User name for --egress-upstream.
        #[arg(long, requires = "egress_upstream")]
        egress_upstream_user: Option<String>,
        /// Open a denied address for the VM: ADDR[/PREFIX]:PORT or
        /// ADDR[/PREFIX]:* (repeatable).
        #[arg(long = "egress-allow")]
        egress_allow: Vec<String>,
        /// Without an upstream, let the host dial targets directly.
        #[arg(long, conflicts_with = "egress_upstream")]
        egress_direct: bool,
        /// Print the VM as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List VMs.
    Ls {
        /// Include ended VMs whose logs are kept.
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one VM.
    Inspect {
        /// VM id or name.
        id: String,
    },
    /// Run a command in a VM; exits with its exit code.
    Exec {
        /// VM id or name.
        id: String,
        /// Kill the command after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// Environment, KEY=VALUE (repeatable).
        #[arg(long = "env", value_parser = parse_kv)]
        env: Vec<(String, String)>,
        /// Feed this file to the command's standard input (`-` for this
        /// process's own; at most 4 MiB), e.g. to copy a file in:
        /// `--stdin f -- sh -c 'cat > /tmp/f'`.
        #[arg(long)]
        stdin: Option<PathBuf>,
        /// Command and arguments.
        #[arg(trailing_var_arg = true, required = true)]
        argv: Vec<String>,
    },
    /// Print a VM's logs (kept after it ends).
    Logs {
        /// VM id or name.
        id: String,
        /// The serial console instead of the agent log.
        #[arg(long, conflicts_with = "egress")]
        console: bool,
        /// The host's record of the VM's egress connections (JSON lines).
        #[arg(long)]
        egress: bool,
        /// At most this many bytes from the end of the log (the host serves
        /// at most 16 MiB; default 1 MiB).
        #[arg(long)]
        tail_bytes: Option<u64>,
        /// At most this many lines from the end of the log.
        #[arg(long, short = 'n')]
        lines: Option<usize>,
    },
    /// Show the VM's supervised services (pid, restarts, readiness).
    Services {
        /// VM id or name.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Wait until every service with a readiness probe is ready (for the
    /// browser image: the desktop, i.e. VNC answering and the terminal and
    /// Chromium windows mapped). Prints the time since the VM was created.
    Wait {
        /// VM id or name.
        id: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Power a VM off and keep it (disks included) until `vm start`.
    Stop {
        /// VM id or name.
        id: String,
    },
    /// Hibernate a VM: save its memory to disk and end its hypervisor, disks
    /// kept; `vm start` resumes it where it was (a VM whose memory cannot be
    /// saved is powered off instead).
    Hibernate {
        /// VM id or name.
        id: String,
    },
    /// Start a VM that is off, with the same id, spec and disks: resumed
    /// from its saved memory if it was hibernated, else booted.
    Start {
        /// VM id or name.
        id: String,
    },
    /// Forward a local TCP port to a port or socket inside a VM (e.g. its
    /// VNC server). Prints `listening on ADDR`, then serves until killed.
    Forward {
        /// VM id or name.
        id: String,
        /// TCP port on the VM's loopback.
        #[arg(long, conflicts_with = "unix", required_unless_present = "unix")]
        port: Option<u16>,
        /// Unix socket path inside the VM.
        #[arg(long)]
        unix: Option<String>,
        /// Local address to listen on (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
    /// A login shell in a VM on a terminal of its own (raw mode when
    /// stdin is a terminal; piped input should end with `exit`). Exits
    /// with the shell's status.
    Shell {
        /// VM id or name.
        id: String,
        /// Run as this user (default: root).
        #[arg(long)]
        user: Option<String>,
        /// Columns (default: the local terminal's, else 80).
        #[arg(long)]
        cols: Option<u16>,
        /// Rows (default: the local terminal's, else 24).
        #[arg(long)]
        rows: Option<u16>,
    },
    /// Pause a VM's vCPUs.
    Pause {
        /// VM id or name.
        id: String,
    },
    /// Resume a paused VM.
    Resume {
        /// VM id or name.
        id: String,
    },
    /// Snapshot a VM.
    Snapshot {
        /// VM id or name.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start a new VM from a snapshot.
    Restore {
        /// Snapshot id.
        snapshot: String,
        /// Name of the new VM.
        #[arg(long)]
        name: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List snapshots.
    Snapshots {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Destroy VMs (their logs are kept).
    Rm {
        /// VM ids or names.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// The most `vm exec --stdin` sends: the whole input travels in the exec
/// request, which the host bounds.
const MAX_STDIN: u64 = 4 * 1024 * 1024;

/// Read `--stdin`'s file (`-`: standard input), refusing more than
/// [`MAX_STDIN`] rather than cutting it short.
fn read_stdin(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let mut data = Vec::new();
    let limit = MAX_STDIN + 1;
    if path == std::path::Path::new("-") {
        std::io::stdin().take(limit).read_to_end(&mut data)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(limit).read_to_end(&mut data))
    }
    .with_context(|| format!("cannot read {}", path.display()))?;
    if data.len() as u64 > MAX_STDIN {
        bail!(
            "{} is over {} MiB: copy large files into the VM in parts",
            path.display(),
            MAX_STDIN >> 20
        );
    }
    Ok(data)
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// The environment variable that carries an upstream proxy password, so it
/// never appears in a process list or shell history.
const PASSWORD_ENV: &str = "POLYDEV_EGRESS_PASSWORD";

fn egress_policy(
    upstream: Option<String>,
    user: Option<String>,
    allow: Vec<String>,
    direct: bool,
) -> anyhow::Result<Option<EgressPolicy>> {
    let password = match std::env::var(PASSWORD_ENV) {
        Ok(p) if !p.is_empty() => Some(Secret::new(p)),
        Ok(_) | Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => bail!("{PASSWORD_ENV} is not valid UTF-8"),
    };
    if upstream.is_none() && allow.is_empty() && !direct {
        return Ok(None);
    }
    if password.is_some() && user.is_none() {
        bail!("{PASSWORD_ENV} is set but --egress-upstream-user is not: give both or neither");
    }
    if user.is_some() && password.is_none() {
        bail!("--egress-upstream-user needs the password in {PASSWORD_ENV}");
    }
    Ok(Some(EgressPolicy {
        upstream: upstream.map(|url| Upstream {
            url,
            username: user,
            password,
        }),
        allow,
        direct,
    }))
}

fn path_seg(s: &str) -> anyhow::Result<&str> {
    // Ids and names never contain these; refuse instead of building odd URLs.
    if s.is_empty() || s.contains(['/', '?', '#', '%', ' ']) || s == "." || s == ".." {
        bail!("invalid VM or snapshot id {s:?}");
    }
    Ok(s)
}

pub async fn run(data_dir: PathBuf, cmd: VmCmd) -> anyhow::Result<i32> {
    let c = HostClient::new(&data_dir.join("host.sock"));
    match cmd {
        VmCmd::Run {
            name,
            vcpus,
            memory,
            image,
            env,
            services,
            data_disk,
            kernel,
            egress_upstream,
            egress_upstream_user,
            egress_allow,
            egress_direct,
            json,
        } => {
            let egress = egress_policy(
                egress_upstream,
                egress_upstream_user,
                egress_allow,
                egress_direct,
            )?;
            let spec = VmSpec {
                name,
                vcpus,
                memory_mib: memory,
                image,
                env: env.into_iter().collect::<BTreeMap<_, _>>(),
                services: services
                    .into_iter()
                    .map(|(name, cmd)| ServiceSpec {
                        name,
                        argv: vec!["sh".into(), "-c".into(), cmd],
                        env: BTreeMap::new(),
                        cwd: None,
                        user: None,
                        restart: RestartPolicy::Always,
                        ready: None,
                    })
                    .collect(),
                data_disk_mib: data_disk,
                kernel,
                egress,
                ..Default::default()
            };
            let vm: VmInfo = c.call(Method::POST, "/v1/vms", Some(&spec)).await?;
            if json {
                println!("{}", serde_json::to_string(&vm)?);
            } else {
                println!(
                    "{} running ({} vCPU, {} MiB, {} under {}, booted in {} ms)",
                    vm.id,
                    vm.vcpus,
                    vm.memory_mib,
                    vm.hypervisor,
                    vm.accel,
                    vm.boot_ms.unwrap_or(0)
                );
            }
            Ok(0)
        }
        VmCmd::Ls { all, json } => {
            let vms: Vec<VmInfo> = c
                .call::<(), _>(Method::GET, &format!("/v1/vms?all={all}"), None)
                .await?;
            if json {
                println!("{}", serde_json::to_string(&vms)?);
            } else {
                println!(
                    "{:<16} {:<12} {:<9} {:>4} {:>7} {:<11} FAILURE",
                    "ID", "NAME", "STATE", "CPU", "MEM", "HV/ACCEL"
                );
                for v in vms {
                    println!(
                        "{:<16} {:<12} {:<9} {:>4} {:>6}M {:<11} {}",
                        v.id,
                        v.name.unwrap_or_else(|| "-".into()),
                        v.state.to_string(),
                        v.vcpus,
                        v.memory_mib,
                        format!("{}/{}", v.hypervisor, v.accel),
                        v.failure.unwrap_or_default()
                    );
                }
            }
            Ok(0)
        }
        VmCmd::Inspect { id } => {
            let vm: VmInfo = c
                .call::<(), _>(Method::GET, &format!("/v1/vms/{}", path_seg(&id)?), None)
                .await?;
            println!("{}", serde_json::to_string_pretty(&vm)?);
            Ok(0)
        }
        VmCmd::Exec {
            id,
            timeout,
            env,
            stdin,
            argv,
        } => {
            let req = ExecRequest {
                argv,
                env: env.into_iter().collect(),
                timeout_ms: timeout.map(|s| s.saturating_mul(1000)),
                stdin: stdin.as_deref().map(read_stdin).transpose()?,
                ..Default::default()
            };
            let mut frames = c.exec(path_seg(&id)?, &req).await?;
            let mut stdout = std::io::stdout();
            let mut stderr = std::io::stderr();
            while let Some(f) = frames.next().await? {
                match f {
                    Frame::Stdout { data } => {
                        stdout.write_all(&data)?;
                        stdout.flush()?;
                    }
                    Frame::Stderr { data } => {
                        stderr.write_all(&data)?;
                        stderr.flush()?;
                    }
                    Frame::Exit(e) => {
                        if e.timed_out {
                            eprintln!("polydev: command timed out and was killed");
                        }
                        return Ok(e.code.unwrap_or_else(|| 128 + e.signal.unwrap_or(0)));
                    }
                    Frame::Error(e) => bail!("exec failed: {}", e.message),
                    _ => {}
                }
            }
            bail!("the exec stream ended without an exit status")
        }
        VmCmd::Logs {
            id,
            console,
            egress,
            tail_bytes,
            lines,
        } => {
            let kind = match (console, egress) {
                (true, _) => "console",
                (_, true) => "egress",
                _ => "agent",
            };
            let mut q = format!("/v1/vms/{}/logs?kind={kind}", path_seg(&id)?);
            if let Some(b) = tail_bytes {
                q.push_str(&format!("&tail_bytes={b}"));
            }
            if let Some(n) = lines {
                q.push_str(&format!("&lines={n}"));
            }
            let text = c.text(&q).await?;
            print!("{text}");
            Ok(0)
        }
        VmCmd::Services { id, json } => {
            let svcs = services(&c, &id).await?;
            if json {
                println!("{}", serde_json::to_string(&svcs)?);
            } else {
                for s in svcs {
                    let ready = match (s.has_probe, s.ready_after_ms) {
                        (false, _) => "-".to_string(),
                        (true, Some(ms)) => format!("ready after {ms} ms"),
                        (true, None) => "not ready".to_string(),
                    };
                    let pid = s.pid.map_or("-".to_string(), |p| p.to_string());
                    println!("{:<16} pid {pid:<8} starts {:<4} {ready}", s.name, s.starts);
                }
            }
            Ok(0)
        }
        VmCmd::Wait { id, timeout } => {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout);
            loop {
                let svcs = services(&c, &id).await?;
                let waiting: Vec<&str> = svcs
                    .iter()
                    .filter(|s| s.awaiting_readiness())
                    .map(|s| s.name.as_str())
                    .collect();
                if waiting.is_empty() {
                    let vm: VmInfo = c
                        .call::<(), _>(Method::GET, &format!("/v1/vms/{}", path_seg(&id)?), None)
                        .await?;
                    let since = polydev_host::now_ms().saturating_sub(vm.created_ms);
                    println!("{} ready {since} ms after it was created", vm.id);
                    return Ok(0);
                }
                if std::time::Instant::now() > deadline {
                    bail!(
                        "{id} is not ready after {timeout} s; waiting for: {} (see `polydev vm services {id}` and `polydev vm logs {id}`)",
                        waiting.join(", ")
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        VmCmd::Stop { id } => simple(&c, &id, "stop").await,
        VmCmd::Hibernate { id } => simple(&c, &id, "hibernate").await,
        VmCmd::Start { id } => simple(&c, &id, "start").await,
        VmCmd::Forward {
            id,
            port,
            unix,
            listen,
        } => {
            let target = match (port, unix) {
                (Some(port), _) => polydev_api::agent::ForwardTarget::Tcp { port },
                (None, Some(path)) => polydev_api::agent::ForwardTarget::Unix { path },
                (None, None) => bail!("give --port or --unix"),
            };
            forward(&c, &id, target, listen).await
        }
        VmCmd::Shell {
            id,
            user,
            cols,
            rows,
        } => crate::vm_shell::run(&c, path_seg(&id)?, user, (cols, rows)).await,
        VmCmd::Pause { id } => simple(&c, &id, "pause").await,
        VmCmd::Resume { id } => simple(&c, &id, "resume").await,
        VmCmd::Snapshot { id, json } => {
            let s: SnapshotInfo = c
                .call::<(), _>(
                    Method::POST,
                    &format!("/v1/vms/{}/snapshot", path_seg(&id)?),
                    None,
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!("{} ({} bytes)", s.id, s.size_bytes);
            }
            Ok(0)
        }
        VmCmd::Restore {
            snapshot,
            name,
            json,
        } => {
            let body = serde_json::json!({ "name": name });
            let vm: VmInfo = c
                .call(
                    Method::POST,
                    &format!("/v1/snapshots/{}/restore", path_seg(&snapshot)?),
                    Some(&body),
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string(&vm)?);
            } else {
                println!(
                    "{} running (restored from {snapshot} in {} ms)",
                    vm.id,
                    vm.boot_ms.unwrap_or(0)
                );
            }
            Ok(0)
        }
        VmCmd::Snapshots { json } => {
            let s: Vec<SnapshotInfo> = c.call::<(), _>(Method::GET, "/v1/snapshots", None).await?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                for s in s {
                    println!(
                        "{} from {} ({} MiB, {} bytes)",
                        s.id, s.source_vm, s.memory_mib, s.size_bytes
                    );
                }
            }
            Ok(0)
        }
        VmCmd::Rm { ids } => {
            let mut code = 0;
            for id in ids {
                let r: Result<VmInfo, _> = c
                    .call::<(), _>(Method::DELETE, &format!("/v1/vms/{}", path_seg(&id)?), None)
                    .await;
                match r {
                    Ok(v) => println!("{} removed", v.id),
                    Err(e) => {
                        eprintln!("error: {e}");
                        code = 1;
                    }
                }
            }
            Ok(code)
        }
    }
}

/// Accept local connections and carry each through its own forwarded
/// stream. The first stream is opened before announcing the address, so a
/// wrong VM or target fails here rather than on the first client.
async fn forward(
    c: &HostClient,
    id: &str,
    target: polydev_api::agent::ForwardTarget,
    listen: std::net::SocketAddr,
) -> anyhow::Result<i32> {
    let id = path_seg(id)?.to_string();
    drop(
        c.forward(&id, &target)
            .await
            .with_context(|| format!("forward into {id}"))?,
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    loop {
        let (mut conn, peer) = listener.accept().await?;
        let c = c.clone();
        let id = id.clone();
        let target = target.clone();
        tokio::spawn(async move {
            match c.forward(&id, &target).await {
                Ok(mut inner) => {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut inner).await;
                }
                Err(e) => eprintln!("polydev: forward for {peer} failed: {e}"),
            }
        });
    }
}

async fn services(
    c: &HostClient,
    id: &str,
) -> anyhow::Result<Vec<polydev_api::agent::ServiceStatus>> {
    let r: Frame = c
        .call::<(), _>(
            Method::GET,
            &format!("/v1/vms/{}/services", path_seg(id)?),
            None,
        )
        .await
        .with_context(|| format!("services of {id}"))?;
    match r {
        Frame::Services { services } => Ok(services),
        other => bail!("unexpected answer from the guest agent: {other:?}"),
    }
}

async fn simple(c: &HostClient, id: &str, op: &str) -> anyhow::Result<i32> {
    let vm: VmInfo = c
        .call::<(), _>(
            Method::POST,
            &format!("/v1/vms/{}/{op}", path_seg(id)?),
            None,
        )
        .await
        .with_context(|| format!("{op} {id}"))?;
    println!("{} {}", vm.id, vm.state);
    Ok(0)
}
