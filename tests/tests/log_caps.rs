//! A guest cannot fill the host's disk through its logs: a real VM that
//! loops refused egress connections (each one a line in `egress.log`) and
//! floods its serial console leaves `egress.log`, `console.log` and
//! `agent.log` (and their one rotated `.1` file) under the host's
//! `--log-max-bytes`, the host's counter says exactly how many egress lines
//! were dropped, the log itself says so in its first line, and the logs
//! endpoint serves bounded tails.
//!
//! The guest makes 100,000 connections (`POLYDEV_E2E_EGRESS_FLOOD` sets
//! another count) with `polydev-egress-flood`, a static test program copied
//! into the VM: a shell loop of busybox `nc` spends about 20 ms per
//! connection forking under TCG.

mod egress_support;

use egress_support::{sample, scrape};
use polydev_e2e::Host;

const CAP: u64 = 16 * 1024;
const MARKER: &str = "[polydev: ";

fn len(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Log lines in `path` that are not the drop marker.
fn kept_lines(path: &std::path::Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with(MARKER))
        .count() as u64
}

#[test]
fn a_flooding_guest_leaves_its_logs_under_their_caps_and_the_drops_counted() {
    let n: u64 = std::env::var("POLYDEV_E2E_EGRESS_FLOOD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let flood_bin = polydev_e2e::static_test_bin("polydev-egress-flood");
    let cap = CAP.to_string();
    let host = Host::start_with(&["--log-max-bytes", &cap], None);
    let vm = host.run_vm(&["--name", "flood"]);
    host.ok(&[
        "vm",
        "exec",
        &vm.id,
        "--stdin",
        &flood_bin.to_string_lossy(),
        "--",
        "sh",
        "-c",
        "cat > /tmp/flood && chmod 0755 /tmp/flood",
    ]);
    let dir = host.data().join("vms").join(&vm.id);
    let before = scrape(host.data());
    let dropped_key = "polydev_log_lines_dropped_total{log=\"egress\"}";

    // No policy: every connection is refused by the host and logged.
    let timeout = (n / 20 + 300).to_string();
    let script = format!(
        "/tmp/flood 127.0.0.1:3128 10.9.8.7:80 {n} 8 && \
         yes 'console flood console flood console flood console flood console flood' | head -c 200000 > /dev/console; echo flooded"
    );
    let r = host.ok(&[
        "vm",
        "exec",
        &vm.id,
        "--timeout",
        &timeout,
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert!(
        r.stdout.contains(&format!(
            "flooded {n}: {n} refused, 0 other answers, 0 failed"
        )),
        "{}",
        r.stdout
    );
    assert!(r.stdout.trim_end().ends_with("flooded"), "{}", r.stdout);

    // Every connection has its line written or counted once the last one
    // is logged (the host writes the line when the connection ends).
    let egress = dir.join("egress.log");
    let egress_old = dir.join("egress.log.1");
    let after = host.wait_for(
        "every egress line written or counted",
        std::time::Duration::from_secs(60),
        || {
            let m = scrape(host.data());
            let dropped = (sample(&m, dropped_key) - sample(&before, dropped_key)) as u64;
            (dropped + kept_lines(&egress) + kept_lines(&egress_old) == n).then_some(m)
        },
    );
    let dropped = (sample(&after, dropped_key) - sample(&before, dropped_key)) as u64;
    assert!(
        dropped > 0,
        "a {n}-line flood must overflow a {CAP}-byte cap"
    );
    println!(
        "{n} refused connections: {dropped} egress lines dropped, {} kept",
        n - dropped
    );

    // Each log and its rotated file stay under the cap.
    for name in ["egress.log", "console.log", "agent.log"] {
        for f in [name.to_string(), format!("{name}.1")] {
            let size = len(&dir.join(&f));
            assert!(size <= CAP, "{f} is {size} bytes, over the {CAP}-byte cap");
        }
    }
    // The console flood (200 kB) rotated the console too.
    assert!(
        sample(&after, "polydev_log_bytes_dropped_total{log=\"console\"}") > 0.0,
        "{after:?}"
    );

    // The log says so where a reader starts: its first line.
    let text = std::fs::read_to_string(&egress).expect("egress.log");
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(MARKER) && first.contains(&format!("{dropped} lines")),
        "{first}"
    );

    // Tails: bounded by lines and bytes, newest last, whole lines.
    let tail = host.ok(&["vm", "logs", &vm.id, "--egress", "-n", "3"]);
    let lines: Vec<&str> = tail.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", tail.stdout);
    assert!(lines.iter().all(|l| l.contains("10.9.8.7:80")), "{lines:?}");
    assert_eq!(lines[2], text.lines().last().unwrap_or_default());
    let tail = host.ok(&["vm", "logs", &vm.id, "--egress", "--tail-bytes", "2000"]);
    assert!(tail.stdout.len() <= 2000 && tail.stdout.ends_with('\n'));
    assert!(
        tail.stdout.lines().all(|l| l.starts_with('{')),
        "{}",
        tail.stdout
    );
    let too_much = host.cli(&["vm", "logs", &vm.id, "--tail-bytes", "999999999"]);
    assert_ne!(too_much.code, 0);
    assert!(
        too_much.stderr.contains("tail_bytes"),
        "{}",
        too_much.stderr
    );

    // Archived with the VM, rotated file included, still bounded.
    host.ok(&["vm", "rm", &vm.id]);
    let kept = host.data().join("logs").join(&vm.id);
    assert!(kept.join("egress.log").is_file() && kept.join("egress.log.1").is_file());
    let tail = host.ok(&["vm", "logs", &vm.id, "--egress", "-n", "1"]);
    assert_eq!(tail.stdout.lines().count(), 1, "{}", tail.stdout);
}
