//! `polydev bench desktop`: time from creating a browser VM to "desktop
//! ready" (every readiness probe of its services passing, as the guest
//! agent reports them), and the host memory of that VM once idle.
//!
//! Numbers only; nothing passes or fails. Runs an in-process host agent on
//! a temporary data directory; the VM has no egress policy, so nothing
//! leaves it.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use polydev_api::agent::{Request, Response};
use polydev_api::vm::VmSpec;
use polydev_host::Manager;

use crate::bench::{stats, status_kib};
use crate::hostd;

/// Options of `polydev bench desktop`.
#[derive(Args, Clone, Debug)]
pub struct DesktopBenchArgs {
    /// VMs to boot, one after another.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Image to boot (one whose services have readiness probes).
    #[arg(long, default_value = "browser")]
    pub image: String,
    /// vCPUs per VM.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Memory per VM, MiB.
    #[arg(long, default_value_t = 2048)]
    pub memory_mib: u32,
    /// Seconds the desktop idles before its memory is read.
    #[arg(long, default_value_t = 60)]
    pub settle_s: u64,
    /// Give up on a VM that is not ready after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// Accelerator: auto, kvm or tcg.
    #[arg(long, default_value = "auto")]
    pub accel: String,
    /// TCG only: translation cache per VM, MiB.
    #[arg(long, default_value_t = 256)]
    pub tcg_tb_size_mib: u32,
}

/// Poll the agent until every probed service is ready; the probes' names
/// when the deadline passes first.
async fn wait_ready(mgr: &Manager, id: &str, deadline: Instant) -> anyhow::Result<()> {
    loop {
        let waiting: Vec<String> = match mgr.agent_call(id, Request::Services).await? {
            Response::Services { services } => services
                .into_iter()
                .filter(|s| s.awaiting_readiness())
                .map(|s| s.name)
                .collect(),
            other => bail!("unexpected answer to services: {other:?}"),
        };
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{id} not ready in time; waiting for {}", waiting.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Run the benchmark.
pub async fn run(a: DesktopBenchArgs) -> anyhow::Result<i32> {
    let tmp = tempfile::Builder::new()
        .prefix("pdbench")
        .tempdir_in("/tmp")?;
    let tb = a.tcg_tb_size_mib.to_string();
    let host = hostd::host_args_with(&[
        "--accel",
        &a.accel,
        "--boot-timeout-s",
        "300",
        "--tcg-tb-size-mib",
        &tb,
    ])
    .context("--accel must be auto, kvm or tcg; --tcg-tb-size-mib 32..=4096")?;
    let cfg = hostd::config(tmp.path().to_path_buf(), &host).await?;
    println!(
        "polydev bench desktop: image {} ({} vCPU, {} MiB) under {}, TCG cache {} MiB, {} runs",
        a.image, a.vcpus, a.memory_mib, cfg.accel, a.tcg_tb_size_mib, a.runs
    );
    let mgr = Manager::start(cfg).await?;
    let spec = VmSpec {
        image: Some(a.image.clone()),
        vcpus: Some(a.vcpus),
        memory_mib: Some(a.memory_mib),
        ..Default::default()
    };
    let (mut boot, mut ready, mut rss, mut pss) = (vec![], vec![], vec![], vec![]);
    for _ in 0..a.runs.max(1) {
        let t = Instant::now();
        let vm = mgr.create(&spec).await?;
        boot.push(t.elapsed().as_secs_f64() * 1000.0);
        let result = wait_ready(&mgr, &vm.id, t + Duration::from_secs(a.timeout_s)).await;
        if result.is_ok() {
            ready.push(t.elapsed().as_secs_f64() * 1000.0);
            tokio::time::sleep(Duration::from_secs(a.settle_s)).await;
            if let Some(pid) = mgr.get(&vm.id).await?.pid {
                rss.push(status_kib(pid, "status", "VmRSS:").unwrap_or(0.0) / 1024.0);
                pss.push(status_kib(pid, "smaps_rollup", "Pss:").unwrap_or(0.0) / 1024.0);
            }
        }
        mgr.destroy(&vm.id).await?;
        result?;
    }
    stats("create to agent-ready", "ms", boot);
    stats("create to desktop ready", "ms", ready);
    let settled = format!("after {} s idle", a.settle_s);
    stats(&format!("host RSS {settled}"), "MiB", rss);
    stats(&format!("host PSS {settled}"), "MiB", pss);
    Ok(0)
}
