//! Bad input gets a clear error and leaves nothing half-created.

use polydev_e2e::Host;

fn vm_dirs(host: &Host) -> usize {
    std::fs::read_dir(host.data().join("vms"))
        .map(|rd| rd.count())
        .unwrap_or(0)
}

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

    assert_eq!(vm_dirs(&host), 0, "nothing was created");
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
    assert_eq!(vm_dirs(&host), 0);
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
