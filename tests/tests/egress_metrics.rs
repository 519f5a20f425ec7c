//! The host agent's Prometheus endpoint (`GET /v1/metrics` on host.sock)
//! counts real egress traffic from real VMs exactly: connections by outcome
//! and reason, bytes each way (equal to what the origin server on loopback
//! received and sent), active connections, and VMs by state.

mod egress_support;

use std::collections::BTreeMap;
use std::time::Duration;

use egress_support::{exec, sample, scrape, scrape_text, seen_now, start_server};
use polydev_e2e::Host;

const CLOSED: &str = "polydev_egress_connections_total{outcome=\"closed\",reason=\"eof\"}";
const DENIED_LIST: &str =
    "polydev_egress_connections_total{outcome=\"denied\",reason=\"deny_list\"}";
const DENIED_POLICY: &str =
    "polydev_egress_connections_total{outcome=\"denied\",reason=\"no_policy\"}";
const UP: &str = "polydev_egress_bytes_total{direction=\"up\"}";
const DOWN: &str = "polydev_egress_bytes_total{direction=\"down\"}";
const ACTIVE: &str = "polydev_egress_active_connections";

fn delta(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>, key: &str) -> f64 {
    sample(after, key) - sample(before, key)
}

#[test]
fn metrics_count_egress_connections_bytes_and_vms_exactly() {
    let host = Host::start();
    let (sport, seen) = start_server();

    // Before any VM: every VM state series is there, at 0, and typed.
    let text = scrape_text(host.data());
    for state in [
        "starting", "running", "paused", "stopping", "off", "stopped", "failed",
    ] {
        assert!(
            text.lines()
                .any(|l| l == format!("polydev_vms{{state=\"{state}\"}} 0")),
            "{state}: {text}"
        );
    }
    for name in [
        "polydev_vms gauge",
        "polydev_egress_connections_total counter",
        "polydev_egress_bytes_total counter",
        "polydev_egress_active_connections gauge",
    ] {
        assert!(text.contains(&format!("# TYPE {name}\n")), "{name}: {text}");
    }

    let allow = format!("127.0.0.1:{sport}");
    let d = host.run_vm(&["--name", "d", "--egress-direct", "--egress-allow", &allow]);
    let none = host.run_vm(&["--name", "none"]);
    let before = scrape(host.data());
    assert_eq!(sample(&before, "polydev_vms{state=\"running\"}"), 2.0);
    assert_eq!(sample(&before, ACTIVE), 0.0);

    // Three allowed downloads (one large), two refusals of each kind.
    const BIG: usize = 3 * 1024 * 1024;
    for path in ["/a".to_string(), format!("/big/{BIG}"), "/b".to_string()] {
        let r = exec(
            &host,
            &d.id,
            &format!("wget -q -O - http://127.0.0.1:{sport}{path} | wc -c"),
        );
        assert_eq!(r.code, 0, "{path}: {}", r.stderr);
    }
    for target in ["10.1.2.3:80", "169.254.169.254:80"] {
        let r = exec(&host, &d.id, &format!("wget -q -O - http://{target}/x"));
        assert!(r.stderr.contains("403"), "{target}: {}", r.stderr);
    }
    // A public address (TEST-NET-2, RFC 5737) passes the deny list, and a VM
    // without a policy still may not leave; nothing is dialled.
    for _ in 0..2 {
        let r = exec(&host, &none.id, "wget -q -O - http://198.51.100.7/no");
        assert!(r.stderr.contains("403"), "{}", r.stderr);
    }

    // The server records a request once the client closed, and the host
    // counts a connection once both directions ended: wait for both.
    let served = host.wait_for(
        "the server to see 3 requests",
        Duration::from_secs(60),
        || {
            let s = seen_now(&seen);
            (s.len() == 3).then_some(s)
        },
    );
    let after = host.wait_for("the counters to settle", Duration::from_secs(60), || {
        let m = scrape(host.data());
        (delta(&m, &before, CLOSED) >= 3.0 && sample(&m, ACTIVE) == 0.0).then_some(m)
    });
    assert_eq!(delta(&after, &before, CLOSED), 3.0, "{after:?}");
    assert_eq!(delta(&after, &before, DENIED_LIST), 2.0, "{after:?}");
    assert_eq!(delta(&after, &before, DENIED_POLICY), 2.0, "{after:?}");
    // Bytes each way are exactly what crossed the origin server's socket:
    // refusals carry none, and the host's own reply line to the guest is
    // not egress.
    let received: u64 = served.iter().map(|s| s.received).sum();
    let sent: u64 = served.iter().map(|s| s.sent).sum();
    assert!(sent > BIG as u64, "{served:?}");
    assert_eq!(delta(&after, &before, UP), received as f64, "{served:?}");
    assert_eq!(delta(&after, &before, DOWN), sent as f64, "{served:?}");

    // A connection held open shows as active, and goes away when closed.
    let held = std::process::Command::new(polydev_e2e::polydev_bin())
        .arg("--data-dir")
        .arg(host.data())
        .args(["vm", "exec", &d.id, "--", "sh", "-c"])
        .arg(format!(
            "{{ printf 'CONNECT 127.0.0.1:{sport} HTTP/1.1\\r\\n\\r\\n'; sleep 600; }} | nc 127.0.0.1 3128 & echo $! > /tmp/held.pid; wait"
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn exec");
    let mut held = KillOnDrop(held);
    host.wait_for("one active connection", Duration::from_secs(60), || {
        (sample(&scrape(host.data()), ACTIVE) == 1.0).then_some(())
    });
    let _ = held.0.kill();
    let _ = held.0.wait();
    // End the client in the VM by its pid (killing the exec client on the
    // host need not reach it).
    exec(&host, &d.id, "kill $(cat /tmp/held.pid)");
    host.wait_for("no active connections", Duration::from_secs(60), || {
        (sample(&scrape(host.data()), ACTIVE) == 0.0).then_some(())
    });

    // VM counts follow the lifecycle: a removed VM is counted as stopped.
    host.ok(&["vm", "rm", &none.id]);
    let m = scrape(host.data());
    assert_eq!(sample(&m, "polydev_vms{state=\"running\"}"), 1.0);
    assert_eq!(sample(&m, "polydev_vms{state=\"stopped\"}"), 1.0);
}

/// Kills the child if the test fails before it does.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
