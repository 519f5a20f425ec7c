//! Bad input gets a clear error and leaves nothing half-created.

use polydev_e2e::Host;

#[test]
fn unknown_ids_absurd_sizes_and_missing_files_are_refused_cleanly() {
    let host = Host::start();

    let r = host.cli(&["vm", "exec", "vm-0123456789ab", "--", "true"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("no VM with id"), "{}", r.stderr);

    let r = host.cli(&["vm", "rm", "../../etc"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("invalid VM or snapshot id"),
        "{}",
        r.stderr
    );

    let r = host.cli(&["vm", "run", "--memory", "99999999"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("memory_mib must be from"), "{}", r.stderr);

    let r = host.cli(&["vm", "run", "--vcpus", "0"]);
    assert!(
        r.stderr.contains("vcpus must be a whole number"),
        "{}",
        r.stderr
    );

    let r = host.cli(&["vm", "run", "--name", "Bad/Name"]);
    assert!(r.stderr.contains("invalid VM name"), "{}", r.stderr);

    let r = host.cli(&["vm", "run", "--image", "nope"]);
    assert!(r.stderr.contains("unknown image"), "{}", r.stderr);

    let r = host.cli(&["vm", "logs", "vm-0123456789ab"]);
    assert_eq!(r.code, 1);

    assert_eq!(host.vm_dirs(), 0, "nothing was created");
    assert!(host.processes().is_empty());
    assert_eq!(host.ok(&["vm", "ls", "--json"]).stdout.trim(), "[]");
}

#[test]
fn a_missing_kernel_is_a_clear_error_and_creates_nothing() {
    let host = Host::start();
    let r = host.cli(&["vm", "run", "--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("kernel \"/nonexistent/vmlinux\" does not exist"),
        "{}",
        r.stderr
    );
    assert_eq!(host.vm_dirs(), 0);
    assert!(host.processes().is_empty());
}

#[test]
fn a_socket_path_already_in_use_is_refused_and_a_stale_one_replaced() {
    let host = Host::start();
    // A second host agent on the same data directory must not steal the socket.
    let out = std::process::Command::new(polydev_e2e::polydev_bin())
        .arg("--data-dir")
        .arg(host.data())
        .arg("host")
        .output()
        .expect("run");
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another host agent is serving"), "{err}");
    // The first one still works.
    host.ok(&["vm", "ls"]);
}

#[test]
fn a_stale_socket_from_a_crash_is_replaced() {
    let mut host = Host::start();
    host.kill(libc::SIGKILL);
    assert!(
        host.data().join("host.sock").exists(),
        "SIGKILL leaves the socket file"
    );
    host.spawn();
    host.ok(&["vm", "ls"]);
}

/// Send one raw HTTP/1.1 request to the host agent's socket.
fn raw_http(host: &Host, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(host.data().join("host.sock"))
        .expect("connect host.sock");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // The server may answer (413) and close before an oversized body is
    // fully sent; the answer is what matters.
    let _ = s.write_all(req.as_bytes());
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

#[test]
fn malformed_requests_get_problem_documents_and_create_nothing() {
    let host = Host::start();
    for (body, want) in [
        ("{not json", 400),
        (r#"{"memory_mib": "lots"}"#, 422),
        (r#"{"bogus_field": 1}"#, 422),
        (r#"{"hypervisor": "bochs"}"#, 422),
        (r#"{"memory_mib": 99999999}"#, 422),
        (r#"{"name": "../../etc"}"#, 422),
    ] {
        let (status, text) = raw_http(&host, "POST", "/v1/vms", body);
        assert_eq!(status, want, "{body}: {text}");
        assert!(text.contains("application/problem+json"), "{text}");
        assert!(text.contains("\"detail\""), "{text}");
    }
    let big = format!(r#"{{"env": {{"X": "{}"}}}}"#, "a".repeat(9 * 1024 * 1024));
    let (status, _) = raw_http(&host, "POST", "/v1/vms", &big);
    assert_eq!(status, 413, "oversized bodies are refused");
    let (status, text) = raw_http(&host, "GET", "/v1/nope", "");
    assert_eq!(status, 404, "{text}");
    assert_eq!(host.vm_dirs(), 0);
    assert!(host.processes().is_empty());
}

#[test]
fn doctor_passes_here_and_fails_without_qemu() {
    let host = Host::start();
    // `./polydev.sh setup` installs everything doctor requires, so on this
    // machine every required check is "ok" and the exit status is 0.
    let r = host.cli(&["doctor", "--no-boot"]);
    for check in [
        "qemu",
        "qboot",
        "vhost-device-vsock",
        "mkfs.ext4",
        "guest agent",
        "kernel",
        "initramfs",
        "disk space",
    ] {
        assert!(
            r.stdout
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(check)),
            "{check} is not ok in:\n{}",
            r.stdout
        );
    }
    assert!(!r.stdout.contains("FAIL"), "{}", r.stdout);
    assert!(r.stdout.contains("all checks passed"), "{}", r.stdout);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);

    // Without QEMU on the path the same checks fail, with a fix, and the
    // status says so.
    let empty = tempfile::tempdir().expect("tempdir");
    let home = empty.path().to_str().expect("utf-8 temp path");
    let r = host.cli_env(
        &["doctor", "--no-boot"],
        &[("PATH", "/nonexistent"), ("HOME", home)],
    );
    let qemu = r
        .stdout
        .lines()
        .find(|l| l.contains("qemu-system-x86_64 not found"))
        .unwrap_or_else(|| panic!("no qemu line in:\n{}", r.stdout));
    assert!(
        qemu.starts_with("FAIL") && qemu.contains("fix: ./polydev.sh setup"),
        "{qemu}"
    );
    assert!(r.stdout.contains("check(s) failed"), "{}", r.stdout);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
}
