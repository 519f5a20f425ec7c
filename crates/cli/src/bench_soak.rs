//! `polydev bench soak`: create → exec → destroy cycles of the minimal
//! image on an in-process host agent, bounded in cycles and in time, then a
//! leak census against the state after the first cycle (which warms lazy
//! pools and caches): processes still naming the data directory (QEMU, the
//! vsock bridge), socket files, VM directories, the host agent's file
//! descriptors and sockets, VM records it still lists, and its RSS.
//!
//! Unlike the other benches this one passes or fails: any failed cycle or
//! any leak exits 1.

use std::path::Path;
use std::time::{Duration, Instant};

use clap::Args;
use polydev_api::agent::{ExecRequest, Response as Frame};
use polydev_api::vm::VmSpec;
use polydev_host::Manager;

use crate::bench::status_kib;
use crate::hostd;

/// Options of `polydev bench soak`.
#[derive(Args, Clone, Debug)]
pub struct SoakArgs {
    /// Create → exec → destroy cycles to run.
    #[arg(long, default_value_t = 1000)]
    pub cycles: u64,
    /// Stop starting new cycles after this many minutes.
    #[arg(long, default_value_t = 60)]
    pub max_minutes: u64,
    /// Accelerator: auto, kvm or tcg.
    #[arg(long, default_value = "auto")]
    pub accel: String,
}

/// What can leak, counted at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Census {
    processes: usize,
    socket_files: usize,
    vm_dirs: usize,
    fds: usize,
    socket_fds: usize,
    records: usize,
}

impl Census {
    async fn take(mgr: &Manager, data: &Path) -> Census {
        let fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .map(|t| t.to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        Census {
            processes: processes_naming(data),
            socket_files: socket_files(data),
            vm_dirs: std::fs::read_dir(data.join("vms"))
                .map(|rd| rd.flatten().count())
                .unwrap_or(0),
            fds: fds.len(),
            socket_fds: fds.iter().filter(|t| t.starts_with("socket:")).count(),
            records: mgr.list(false).await.len(),
        }
    }

    /// `(what, before, after)` for everything that grew.
    fn grown(&self, before: &Census) -> Vec<(&'static str, usize, usize)> {
        [
            ("processes (qemu, bridge)", before.processes, self.processes),
            ("socket files", before.socket_files, self.socket_files),
            ("VM directories", before.vm_dirs, self.vm_dirs),
            ("host agent fds", before.fds, self.fds),
            ("host agent sockets", before.socket_fds, self.socket_fds),
            ("VM records", before.records, self.records),
        ]
        .into_iter()
        .filter(|(_, b, a)| a > b)
        .collect()
    }
}

/// Processes other than this one whose command line names `data`.
fn processes_naming(data: &Path) -> usize {
    let me = std::process::id().to_string();
    let needle = data.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.chars().all(|c| c.is_ascii_digit()) && name != me
                })
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .filter(|c| String::from_utf8_lossy(c).contains(&needle))
                .count()
        })
        .unwrap_or(0)
}

/// Socket files anywhere under `dir`.
fn socket_files(dir: &Path) -> usize {
    use std::os::unix::fs::FileTypeExt;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => socket_files(&e.path()),
            Ok(t) if t.is_socket() => 1,
            _ => 0,
        })
        .sum()
}

/// One cycle: boot, run `echo`, check its output and status, destroy.
async fn cycle(mgr: &std::sync::Arc<Manager>, n: u64) -> anyhow::Result<()> {
    let vm = mgr.create(&VmSpec::default()).await?;
    let result = async {
        let word = format!("soak-{n}");
        let mut frames = mgr
            .exec(
                &vm.id,
                ExecRequest {
                    argv: vec!["echo".into(), word.clone()],
                    timeout_ms: Some(60_000),
                    ..Default::default()
                },
            )
            .await?;
        let mut out = Vec::new();
        let mut code = None;
        while let Some(f) = frames.next().await? {
            match f {
                Frame::Stdout { data } => out.extend_from_slice(&data),
                Frame::Exit(e) => code = e.code,
                _ => {}
            }
        }
        anyhow::ensure!(
            code == Some(0) && out == format!("{word}\n").as_bytes(),
            "exec answered {:?} with status {code:?}",
            String::from_utf8_lossy(&out)
        );
        Ok(())
    }
    .await;
    let destroyed = mgr.destroy(&vm.id).await;
    result?;
    destroyed?;
    Ok(())
}

/// Run the soak; exit status 1 on any failure or leak.
pub async fn run(a: SoakArgs) -> anyhow::Result<i32> {
    let tmp = tempfile::Builder::new()
        .prefix("pdsoak")
        .tempdir_in("/tmp")?;
    let host = hostd::host_args_with(&["--accel", &a.accel])
        .map_err(|e| anyhow::anyhow!("--accel must be auto, kvm or tcg: {e}"))?;
    let cfg = hostd::config(tmp.path().to_path_buf(), &host).await?;
    println!(
        "polydev bench soak: up to {} create → exec → destroy cycles of the minimal image under {}, at most {} min",
        a.cycles, cfg.accel, a.max_minutes
    );
    let mgr = Manager::start(cfg).await?;
    let data = tmp.path().to_path_buf();
    let me = std::process::id();

    // The first cycle warms what is created once (runtime threads, caches).
    let mut failures = 0u64;
    if let Err(e) = cycle(&mgr, 0).await {
        failures += 1;
        eprintln!("cycle 0 failed: {e:#}");
    }
    let before = Census::take(&mgr, &data).await;
    let rss_start = status_kib(me, "status", "VmRSS:").unwrap_or(0.0) / 1024.0;

    let budget = Duration::from_secs(a.max_minutes.saturating_mul(60));
    let started = Instant::now();
    let mut done = 0u64;
    while done + 1 < a.cycles.max(1) && started.elapsed() < budget {
        done += 1;
        if let Err(e) = cycle(&mgr, done).await {
            failures += 1;
            eprintln!("cycle {done} failed: {e:#}");
        }
        if done.is_multiple_of(25) {
            let rss = status_kib(me, "status", "VmRSS:").unwrap_or(0.0) / 1024.0;
            println!(
                "  {done} cycles, {failures} failed, {:.1} cycles/min, host agent RSS {rss:.1} MiB",
                done as f64 / started.elapsed().as_secs_f64() * 60.0
            );
        }
    }
    let elapsed = started.elapsed();
    let after = Census::take(&mgr, &data).await;
    let rss_end = status_kib(me, "status", "VmRSS:").unwrap_or(0.0) / 1024.0;

    let total = done + 1;
    println!(
        "cycles                 {total} ({done} timed after the warm-up one) in {:.1} min",
        elapsed.as_secs_f64() / 60.0
    );
    println!(
        "cycles per minute      {:.2}",
        if elapsed.is_zero() {
            0.0
        } else {
            done as f64 / elapsed.as_secs_f64() * 60.0
        }
    );
    println!("failures               {failures}");
    println!(
        "leaked                 processes {} · socket files {} · VM directories {} · host agent fds {} (sockets {}) · VM records {}",
        after.processes.saturating_sub(before.processes),
        after.socket_files.saturating_sub(before.socket_files),
        after.vm_dirs.saturating_sub(before.vm_dirs),
        after.fds.saturating_sub(before.fds),
        after.socket_fds.saturating_sub(before.socket_fds),
        after.records.saturating_sub(before.records),
    );
    println!("host agent RSS         start {rss_start:.1} MiB · end {rss_end:.1} MiB");
    let grown = after.grown(&before);
    for (what, b, a) in &grown {
        println!("LEAK: {what}: {b} after the first cycle, {a} at the end");
    }
    if after.vm_dirs > 0 || after.processes > 0 || after.records > 0 {
        println!(
            "LEAK: with every VM destroyed, {} VM directories, {} processes and {} VM records remain",
            after.vm_dirs, after.processes, after.records
        );
    }
    let leaked = !grown.is_empty() || after.vm_dirs > 0 || after.processes > 0 || after.records > 0;
    Ok(if failures > 0 || leaked { 1 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_growth_counts_as_a_leak() {
        let before = Census {
            processes: 0,
            socket_files: 1,
            vm_dirs: 0,
            fds: 20,
            socket_fds: 4,
            records: 0,
        };
        assert!(before.grown(&before).is_empty());
        let fewer = Census { fds: 18, ..before };
        assert!(fewer.grown(&before).is_empty());
        let more = Census {
            fds: 21,
            vm_dirs: 1,
            ..before
        };
        let grown: Vec<&str> = more.grown(&before).iter().map(|g| g.0).collect();
        assert_eq!(grown, ["VM directories", "host agent fds"]);
    }

    #[test]
    fn socket_files_are_found_in_subdirectories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("vms/a")).unwrap();
        let _l = std::os::unix::net::UnixListener::bind(dir.path().join("vms/a/s.sock")).unwrap();
        std::fs::write(dir.path().join("vms/a/file"), b"x").unwrap();
        assert_eq!(socket_files(dir.path()), 1);
    }
}
