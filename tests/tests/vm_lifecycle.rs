//! The VM runtime end to end: real QEMU VMs booting our kernel, initramfs
//! and guest agent, driven through the real `polydev` CLI and host agent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use polydev_api::vm::VmState;
use polydev_e2e::Host;

const BOOT: Duration = Duration::from_secs(120);

#[test]
fn boot_exec_destroy_leaves_only_logs() {
    let host = Host::start();
    let vm = host.run_vm(&["--name", "first"]);
    assert_eq!(vm.state, VmState::Running);
    assert!(vm.id.starts_with("vm-"));

    let r = host.cli(&[
        "vm",
        "exec",
        &vm.id,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(r.code, 7, "exit code travels back: {}", r.stderr);
    assert_eq!(r.stdout, "out\n");
    assert_eq!(r.stderr, "err\n");

    // The guest is a real Linux with our kernel.
    let r = host.ok(&["vm", "exec", "first", "--", "cat", "/proc/version"]);
    assert!(r.stdout.contains("Linux version 6."), "{}", r.stdout);

    let vm_dir = host.data().join("vms").join(&vm.id);
    assert!(vm_dir.join("vsock.sock").exists());
    let cgroups = assert_confined(&host, &vm_dir, vm.pid.expect("pid"));
    host.ok(&["vm", "rm", &vm.id]);

    assert!(!vm_dir.exists(), "state directory removed");
    for g in &cgroups {
        assert!(!g.exists(), "cgroup {} removed with the VM", g.display());
    }
    let leftovers = host.processes();
    assert!(
        leftovers.is_empty(),
        "no VM process survives: {leftovers:?}"
    );
    let info = host.inspect(&vm.id);
    assert_eq!(info.state, VmState::Stopped);
    let console = host.ok(&["vm", "logs", &vm.id, "--console"]).stdout;
    assert!(
        console.contains("polydev-guest"),
        "console log kept: {console}"
    );
    let agent = host.ok(&["vm", "logs", &vm.id]).stdout;
    assert!(agent.contains("[agent/"), "agent log kept: {agent}");
    let ls = host.ok(&["vm", "ls", "--json"]).stdout;
    assert_eq!(ls.trim(), "[]");
}

/// The uid QEMU process `pid` runs as, after checking that it is no
/// root: real, effective, saved and filesystem uids and gids all one
/// number of the host's per-VM range, no other group, no capability.
fn qemu_user(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| -> Vec<String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let uids = field("Uid:");
    let uid: u32 = uids[0].parse().expect("uid");
    assert!(
        uid >= polydev_host::config::DEFAULT_QEMU_UID_BASE,
        "QEMU runs as a per-VM user, not {uid}: {status}"
    );
    assert!(uids.iter().all(|u| *u == uids[0]), "{status}");
    let gids = field("Gid:");
    assert!(gids.iter().all(|g| *g == uids[0]), "{status}");
    assert_eq!(field("Groups:"), vec![uids[0].clone()], "{status}");
    assert_eq!(field("CapEff:"), vec!["0000000000000000"], "{status}");
    assert_eq!(field("CapPrm:"), vec!["0000000000000000"], "{status}");
    uid
}

/// QEMU runs under its seccomp filter as a user of its own, and it and its
/// vsock bridge run in the VM's own cgroups with the limits the host
/// agent's defaults give a 1-vCPU, 256 MiB VM under TCG. Returns the cgroup
/// directories.
fn assert_confined(host: &Host, vm_dir: &Path, qemu: u32) -> Vec<PathBuf> {
    let status = std::fs::read_to_string(format!("/proc/{qemu}/status")).expect("status");
    assert!(
        status.lines().any(|l| l == "Seccomp:\t2"),
        "QEMU runs in seccomp filter mode: {status}"
    );
    qemu_user(qemu);
    let listed = std::fs::read_to_string(vm_dir.join("cgroup")).unwrap_or_else(|e| {
        panic!(
            "the VM has no cgroups ({e}); the host agent said: {}",
            host.agent_log()
        )
    });
    let groups: Vec<PathBuf> = listed.lines().map(PathBuf::from).collect();
    assert!(!groups.is_empty());
    let bridge: Vec<u32> = polydev_e2e::processes_mentioning(&vm_dir.display().to_string())
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("vsock-bridge"))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(bridge.len(), 1, "one vsock bridge");
    let (mut memory, mut cpu, mut pids) = (None, None, None);
    for g in &groups {
        let id = vm_dir.file_name().expect("id");
        assert_eq!(g.file_name(), Some(id), "a cgroup of the VM's own: {g:?}");
        let procs = std::fs::read_to_string(g.join("cgroup.procs")).expect("cgroup.procs");
        let members: Vec<u32> = procs.lines().filter_map(|l| l.parse().ok()).collect();
        for pid in [qemu, bridge[0]] {
            assert!(members.contains(&pid), "{pid} in {g:?}: {members:?}");
        }
        let read = |f: &str| std::fs::read_to_string(g.join(f)).ok();
        memory = memory.or(read("memory.max").or(read("memory.limit_in_bytes")));
        cpu = cpu.or(read("cpu.max").or(read("cpu.cfs_quota_us")));
        pids = pids.or(read("pids.max"));
    }
    // 256 MiB guest + 256 MiB translation cache + 256 MiB overhead.
    assert_eq!(memory.as_deref().map(str::trim), Some("805306368"));
    // 150% of one CPU per vCPU.
    let cpu = cpu.expect("a cpu limit");
    assert!(
        cpu.trim() == "150000 100000" || cpu.trim() == "150000",
        "{cpu}"
    );
    assert_eq!(pids.as_deref().map(str::trim), Some("512"));
    groups
}

#[test]
fn sigkill_of_the_hypervisor_fails_the_vm_and_keeps_its_logs() {
    let host = Host::start();
    let vm = host.run_vm(&[]);
    let pid = vm.pid.expect("running VM has a hypervisor pid");
    // SAFETY: kill(2) on the QEMU process of our own VM.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let info = host.wait_for("VM to be marked failed", BOOT, || {
        let i = host.inspect(&vm.id);
        (i.state == VmState::Failed).then_some(i)
    });
    let reason = info.failure.unwrap_or_default();
    assert!(
        reason.contains("SIGKILL"),
        "failure names the signal: {reason}"
    );
    assert!(!host.data().join("vms").join(&vm.id).exists());
    let leftovers = host.processes();
    assert!(
        leftovers.is_empty(),
        "vsock backend reaped too: {leftovers:?}"
    );
    let console = host.ok(&["vm", "logs", &vm.id, "--console"]).stdout;
    assert!(console.contains("polydev-guest"), "{console}");
    let agent = host.ok(&["vm", "logs", &vm.id]).stdout;
    assert!(!agent.is_empty());
    // It is no longer something one can act on.
    let r = host.cli(&["vm", "exec", &vm.id, "--", "true"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("has ended"), "{}", r.stderr);
}

#[test]
fn a_crashing_service_is_restarted_with_backoff_and_its_output_reaches_the_host() {
    let host = Host::start();
    let vm = host.run_vm(&["--service", "crashy=echo boom-$$; exit 3"]);
    // Poll the logs until the agent has reported three restarts.
    let log = host.wait_for("three restarts", BOOT, || {
        let r = host.ok(&["vm", "exec", &vm.id, "--", "true"]);
        assert_eq!(r.code, 0);
        let log = host.ok(&["vm", "logs", &vm.id]).stdout;
        let booms = log.lines().filter(|l| l.contains("boom-")).count();
        let restarts = log
            .lines()
            .filter(|l| l.contains("service crashy:") && l.contains("restarting in"))
            .count();
        (booms >= 3 && restarts >= 3).then_some(log)
    });
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("boom-")).collect();
    assert!(
        lines.iter().all(|l| l.contains("[service:crashy/stdout]")),
        "{lines:?}"
    );
    // Each start is a new process: distinct pids in the output.
    let mut pids: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.split("boom-").nth(1))
        .collect();
    pids.sort();
    pids.dedup();
    assert!(pids.len() >= 3, "restarted processes: {pids:?}");
    // Backoff: the delays the agent reports double from 100 ms (measured
    // gaps under TCG would say more about the host's load than the agent).
    let backoffs: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("service crashy:"))
        .filter_map(|l| {
            l.split("restarting in ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(backoffs[..3], [100, 200, 400], "reported backoffs: {log}");
    host.ok(&["vm", "rm", &vm.id]);
}

#[test]
fn four_vms_run_at_once_and_survive_a_host_agent_restart() {
    let mut host = Host::start();
    let vms: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let host = &host;
                s.spawn(move || host.run_vm(&["--name", &format!("n{i}")]))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let mut ids: Vec<_> = vms.iter().map(|v| v.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4);
    for (i, vm) in vms.iter().enumerate() {
        host.sh(&vm.id, &format!("echo {i} > /tmp/who"));
    }
    // Each QEMU runs as a user none of the others is.
    let mut users: Vec<u32> = vms.iter().map(|v| qemu_user(v.pid.expect("pid"))).collect();
    users.sort_unstable();
    users.dedup();
    assert_eq!(users.len(), 4, "{users:?}");

    // A fifth VM dies while no host agent watches it: the next one must
    // clean up its remains instead of adopting them.
    let doomed = host.run_vm(&[]);

    // Kill the host agent outright: the VMs must not notice.
    host.kill(libc::SIGKILL);
    // SAFETY: kill(2) on our own VM's QEMU process.
    unsafe {
        libc::kill(doomed.pid.expect("pid") as i32, libc::SIGKILL);
    }
    host.spawn();
    assert!(
        host.agent_log().contains("adopted 4 running VM(s)"),
        "{}",
        host.agent_log()
    );
    let gone = host.inspect(&doomed.id);
    assert_eq!(gone.state, VmState::Failed);
    assert!(
        gone.failure
            .unwrap_or_default()
            .contains("while the host agent was not running"),
        "reason recorded"
    );
    assert!(!host.data().join("vms").join(&doomed.id).exists());
    let console = host.ok(&["vm", "logs", &doomed.id, "--console"]).stdout;
    assert!(
        console.contains("polydev-guest"),
        "logs of the dead VM kept"
    );
    // Adopted VMs keep their cgroups, and removing one removes them.
    let adopted_dir = host.data().join("vms").join(&vms[1].id);
    let cgroups = assert_confined(&host, &adopted_dir, vms[1].pid.expect("pid"));
    for (i, vm) in vms.iter().enumerate() {
        assert_eq!(host.inspect(&vm.id).state, VmState::Running);
        let r = host.ok(&["vm", "exec", &vm.id, "--", "cat", "/tmp/who"]);
        assert_eq!(r.stdout.trim(), i.to_string(), "each VM kept its own state");
    }
    // The new host agent receives the adopted VMs' consoles again.
    host.sh(&vms[2].id, "echo console-after-restart > /dev/console");
    let console = host.data().join("vms").join(&vms[2].id).join("console.log");
    host.wait_for("the adopted VM's console written", BOOT, || {
        std::fs::read_to_string(&console)
            .ok()
            .filter(|c| c.contains("console-after-restart"))
    });
    // A VM started now takes a user no running VM has.
    let fresh = host.run_vm(&[]);
    let fresh_user = qemu_user(fresh.pid.expect("pid"));
    for vm in &vms {
        assert_ne!(qemu_user(vm.pid.expect("pid")), fresh_user);
    }
    host.ok(&["vm", "rm", &fresh.id]);
    // Adopted VMs are still watched: a death after adoption is noticed.
    let victim = host.inspect(&vms[0].id);
    // SAFETY: kill(2) on our own VM's QEMU process.
    unsafe {
        libc::kill(victim.pid.expect("pid") as i32, libc::SIGKILL);
    }
    host.wait_for("adopted VM death noticed", BOOT, || {
        (host.inspect(&victim.id).state == VmState::Failed).then_some(())
    });
    for vm in &vms[1..] {
        host.ok(&["vm", "rm", &vm.id]);
    }
    assert!(host.processes().is_empty(), "{:?}", host.processes());
    for g in &cgroups {
        assert!(
            !g.exists(),
            "cgroup {} removed with the adopted VM",
            g.display()
        );
    }
}

/// The per-VM vsock bridge is not a single point of failure: when it dies
/// the host agent starts a new one (the guest's mux resynchronises) and the
/// VM answers again — also for a bridge adopted after a host agent restart.
#[test]
fn a_killed_vsock_bridge_is_replaced_and_the_vm_answers_again() {
    let mut host = Host::start();
    let vm = host.run_vm(&[]);
    let bridge = |host: &Host| -> Option<u32> {
        host.processes()
            .into_iter()
            .find(|(_, cmd)| cmd.contains("vsock-bridge"))
            .map(|(pid, _)| pid)
    };
    let sigkill = |pid: u32| {
        // SAFETY: kill(2) on the bridge this test's host agent started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    };
    let answers_again = |host: &Host| {
        host.wait_for(
            "an exec through the new bridge",
            Duration::from_secs(60),
            || {
                let r = host.cli(&["vm", "exec", &vm.id, "--", "echo", "back"]);
                (r.code == 0 && r.stdout == "back\n").then_some(())
            },
        )
    };

    let first = bridge(&host).expect("the VM has a vsock bridge");
    sigkill(first);
    let second = host.wait_for("a new vsock bridge", Duration::from_secs(60), || {
        bridge(&host).filter(|p| *p != first)
    });
    answers_again(&host);
    assert_eq!(host.inspect(&vm.id).state, VmState::Running);
    assert!(
        host.agent_log().contains("vsock backend restarted"),
        "{}",
        host.agent_log()
    );

    host.kill(libc::SIGKILL);
    host.spawn();
    answers_again(&host);
    sigkill(second);
    host.wait_for(
        "a bridge for the adopted VM",
        Duration::from_secs(60),
        || bridge(&host).filter(|p| *p != second),
    );
    answers_again(&host);

    host.ok(&["vm", "rm", &vm.id]);
    assert!(host.processes().is_empty(), "{:?}", host.processes());
}

/// A create whose client goes away halfway still finishes: the VM ends up
/// running (not stuck starting) and can be used and removed.
#[test]
fn a_create_finishes_when_its_client_disconnects() {
    let host = Host::start();
    let mut client = std::process::Command::new(polydev_e2e::polydev_bin())
        .arg("--data-dir")
        .arg(host.data())
        .args(["vm", "run", "--name", "orphan"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn vm run");
    // The create is under way once the VM's state directory exists.
    host.wait_for("the create to start", Duration::from_secs(60), || {
        (host.vm_dirs() == 1).then_some(())
    });
    let _ = client.kill();
    let _ = client.wait();
    let vm = host.wait_for(
        "the VM to finish starting",
        Duration::from_secs(120),
        || {
            let vm = host.inspect("orphan");
            (vm.state != VmState::Starting).then_some(vm)
        },
    );
    assert_eq!(vm.state, VmState::Running, "{:?}", vm.failure);
    host.sh(&vm.id, "true");
    host.ok(&["vm", "rm", &vm.id]);
    assert_eq!(host.vm_dirs(), 0);
}

/// The fields of `/proc/<pid>/stat` after the command name: state, ppid, ….
fn proc_stat(host: &Host, vm: &str, pid: &str) -> Option<Vec<String>> {
    let r = host.cli(&["vm", "exec", vm, "--", "cat", &format!("/proc/{pid}/stat")]);
    if r.code != 0 {
        return None;
    }
    let after = r.stdout.rsplit(')').next()?;
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// One VM for both duties of the agent as PID 1: orphans are reaped (a
/// zombie would keep its `/proc` entry), and an exec that times out takes
/// its whole process group down, background children included.
#[test]
fn pid1_reaps_orphans_and_a_timeout_kills_the_whole_group() {
    let host = Host::start();
    let vm = host.run_vm(&[]);

    // The shell exits at once; its child is orphaned to PID 1.
    let orphan = host
        .sh(&vm.id, "sleep 3 >/dev/null 2>&1 & echo $!")
        .stdout
        .trim()
        .to_string();
    assert!(orphan.parse::<u32>().is_ok(), "{orphan}");
    if let Some(stat) = proc_stat(&host, &vm.id, &orphan) {
        // Still running: it belongs to PID 1 now.
        assert!(
            stat[0] == "Z" || stat[1] == "1",
            "orphan {orphan} not reparented to PID 1: {stat:?}"
        );
    }
    host.wait_for("the orphan to be reaped", BOOT, || {
        proc_stat(&host, &vm.id, &orphan).is_none().then_some(())
    });

    // A command that outlives its timeout, with a background child in its
    // process group writing its pid down first.
    let r = host.cli(&[
        "vm",
        "exec",
        &vm.id,
        "--timeout",
        "3",
        "--",
        "sh",
        "-c",
        "sleep 300 >/dev/null 2>&1 & echo $! > /tmp/bg; sleep 300",
    ]);
    assert_eq!(r.code, 128 + 9, "{}", r.stderr);
    assert!(
        r.stderr.contains("timed out and was killed"),
        "{}",
        r.stderr
    );
    let bg = host.sh(&vm.id, "cat /tmp/bg").stdout.trim().to_string();
    assert!(bg.parse::<u32>().is_ok(), "{bg}");
    // Killed with the group, then reaped: no process and no zombie left.
    host.wait_for("the background child to be gone", BOOT, || {
        proc_stat(&host, &vm.id, &bg).is_none().then_some(())
    });

    host.ok(&["vm", "rm", &vm.id]);
}
