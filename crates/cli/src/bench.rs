//! `polydev bench vm`: timings of the VM runtime, printed as
//! min/median/max. Numbers only; nothing here passes or fails.

use std::time::{Duration, Instant};

use clap::Subcommand;
use polydev_api::agent::ExecRequest;
use polydev_api::vm::VmSpec;
use polydev_host::Manager;

use crate::hostd::{self, AccelArg, HostArgs};

/// `polydev bench …`
#[derive(Subcommand)]
pub enum BenchCmd {
    /// Boot, restore, exec and memory figures of minimal VMs.
    Vm {
        /// Runs per measurement (at least 5 for a meaningful median).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Accelerator.
        #[arg(long, value_enum, default_value = "auto")]
        accel: AccelArg,
    },
    /// Egress path: download throughput, added latency and connection
    /// setup rate through a VM's shim, against direct from the host.
    Egress(crate::bench_egress::EgressBenchArgs),
    /// Browser VMs: create to "desktop ready" and idle host memory.
    Desktop(crate::bench_desktop::DesktopBenchArgs),
    /// Controller HTTP API: session create/read req/s and latency under
    /// concurrent load, on SQLite and PostgreSQL.
    Api(crate::bench_api::ApiBenchArgs),
    /// Create → exec → destroy cycles of the minimal image, then a leak
    /// census; exits 1 on any failure or leak.
    Soak(crate::bench_soak::SoakArgs),
}

/// Print min/median/max of `v`.
pub(crate) fn stats(name: &str, unit: &str, mut v: Vec<f64>) {
    if v.is_empty() {
        println!("{name:<34} no samples");
        return;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let med = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    println!(
        "{name:<34} min {:>9.1} {unit}  median {:>9.1} {unit}  max {:>9.1} {unit}  (n={})",
        v[0],
        med,
        v[v.len() - 1],
        v.len()
    );
}

/// Nearest-rank percentile `p` (0–100] of ascending `sorted`: the
/// smallest sample at or below which at least p% of the samples lie, so a
/// reported p99 is always a latency some request really had. The one
/// definition every bench prints.
pub(crate) fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

/// A `kB` figure from `/proc/<pid>/<file>`'s line starting with `key`.
pub(crate) fn status_kib(pid: u32, file: &str, key: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub async fn run(cmd: BenchCmd) -> anyhow::Result<i32> {
    let (runs, accel) = match cmd {
        BenchCmd::Vm { runs, accel } => (runs, accel),
        BenchCmd::Egress(a) => return crate::bench_egress::run(a).await,
        BenchCmd::Desktop(a) => return crate::bench_desktop::run(a).await,
        BenchCmd::Api(a) => return crate::bench_api::run(a).await,
        BenchCmd::Soak(a) => return crate::bench_soak::run(a).await,
    };
    let runs = runs.max(1);
    let tmp = tempfile::Builder::new()
        .prefix("pdbench")
        .tempdir_in("/tmp")?;
    let args = HostArgs {
        accel,
        hypervisor: polydev_api::vm::HypervisorKind::Qemu,
        default_vcpus: 1,
        default_memory_mib: 256,
        log_retention: 50,
        log_max_bytes: polydev_host::logfile::DEFAULT_LOG_MAX_BYTES,
        logs_archive_max_bytes: polydev_host::config::DEFAULT_LOGS_ARCHIVE_MAX_BYTES,
        boot_timeout_s: 120,
        tcg_tb_size_mib: 256,
        qemu_vsock: polydev_host::config::QemuVsock::SerialMux,
        kernel: None,
        initramfs: None,
        egress_max_connections: 256,
        egress_idle_timeout_s: 300,
        egress_bytes_per_sec: 25 * 1024 * 1024,
        confinement: Default::default(),
    };
    let cfg = hostd::config(tmp.path().to_path_buf(), &args).await?;
    println!(
        "polydev bench vm: accelerator {} hypervisor {} (1 vCPU, 256 MiB, minimal image), {} runs",
        cfg.accel, cfg.hypervisor, runs
    );
    let mgr = Manager::start(cfg).await?;

    let mut boots = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let vm = mgr.create(&VmSpec::default()).await?;
        boots.push(t.elapsed().as_secs_f64() * 1000.0);
        mgr.destroy(&vm.id).await?;
    }
    stats("cold boot to agent-ready", "ms", boots);

    let vm = mgr.create(&VmSpec::default()).await?;
    let mut execs = Vec::new();
    for _ in 0..runs.max(20) {
        let t = Instant::now();
        let mut frames = mgr
            .exec(
                &vm.id,
                ExecRequest {
                    argv: vec!["true".into()],
                    ..Default::default()
                },
            )
            .await?;
        while frames.next().await?.is_some() {}
        execs.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    stats("exec round trip (`true`)", "ms", execs);

    // Let the guest settle so the figure is the idle footprint.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let info = mgr.get(&vm.id).await?;
    if let Some(pid) = info.pid {
        let rss = status_kib(pid, "status", "VmRSS:").unwrap_or(0.0) / 1024.0;
        let pss = status_kib(pid, "smaps_rollup", "Pss:").unwrap_or(0.0) / 1024.0;
        println!(
            "{:<34} RSS {:>7.1} MiB  PSS {:>7.1} MiB (hypervisor process, idle, 256 MiB guest)",
            "host memory per idle VM", rss, pss
        );
    }

    match mgr.snapshot(&vm.id).await {
        Ok(snap) => {
            let mut restores = Vec::new();
            for _ in 0..runs {
                let t = Instant::now();
                let r = mgr.restore(&snap.id, None).await?;
                restores.push(t.elapsed().as_secs_f64() * 1000.0);
                mgr.destroy(&r.id).await?;
            }
            stats("snapshot restore to agent-ready", "ms", restores);
            let _ = mgr.delete_snapshot(&snap.id).await;
        }
        Err(e) => println!("{:<34} unavailable: {e}", "snapshot restore to agent-ready"),
    }
    mgr.destroy(&vm.id).await?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), Some(2.0));
        assert_eq!(percentile::<u64>(&[], 50.0), None);
    }
}
