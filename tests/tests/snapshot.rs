//! Snapshot a running VM and restore it into a new one.

use polydev_api::vm::{SnapshotInfo, VmState};
use polydev_e2e::Host;

#[test]
fn a_restored_vm_has_the_state_written_before_the_snapshot() {
    let host = Host::start();
    let vm = host.run_vm(&[]);
    host.sh(&vm.id, "echo before-snapshot > /tmp/marker");

    let snap: SnapshotInfo =
        serde_json::from_str(host.ok(&["vm", "snapshot", &vm.id, "--json"]).stdout.trim())
            .expect("snapshot json");
    assert_eq!(snap.source_vm, vm.id);
    assert!(snap.size_bytes > 0);

    // The source keeps running and diverges after the snapshot.
    host.sh(&vm.id, "echo after > /tmp/marker");

    let restored = restore(&host, &snap.id);
    assert_ne!(restored.id, vm.id);
    assert_eq!(restored.state, VmState::Running);
    assert_eq!(restored.restored_from.as_deref(), Some(snap.id.as_str()));
    let twin = restore(&host, &snap.id);

    let r = host.ok(&["vm", "exec", &vm.id, "--", "cat", "/tmp/marker"]);
    assert_eq!(r.stdout, "after\n");

    // Fresh entropy was pushed: two restores of one snapshot start from the
    // same memory, run the same commands, and still draw different bytes.
    let draw = |id: &str| {
        let r = host.ok(&["vm", "exec", id, "--", "cat", "/tmp/marker"]);
        assert_eq!(r.stdout, "before-snapshot\n");
        host.ok(&[
            "vm",
            "exec",
            id,
            "--",
            "sh",
            "-c",
            "head -c 16 /dev/urandom | od -An -tx1",
        ])
        .stdout
    };
    let (a, b) = (draw(&restored.id), draw(&twin.id));
    assert_eq!(a.split_whitespace().count(), 16, "{a}");
    assert_ne!(
        a, b,
        "two restores of one snapshot drew the same random bytes"
    );
    host.ok(&["vm", "rm", &twin.id]);

    // Pause/resume on the restored VM.
    host.ok(&["vm", "pause", &restored.id]);
    assert_eq!(host.inspect(&restored.id).state, VmState::Paused);
    let r = host.cli(&["vm", "exec", &restored.id, "--", "true"]);
    assert!(r.stderr.contains("resume it first"), "{}", r.stderr);
    host.ok(&["vm", "resume", &restored.id]);
    host.ok(&["vm", "exec", &restored.id, "--", "true"]);

    host.ok(&["vm", "rm", &vm.id, &restored.id]);
    assert!(host.processes().is_empty());
}

fn restore(host: &Host, snap: &str) -> polydev_api::vm::VmInfo {
    let out = host.ok(&["vm", "restore", snap, "--json"]).stdout;
    serde_json::from_str(out.trim()).expect("vm json")
}

#[test]
fn restoring_an_unknown_snapshot_is_a_clear_error() {
    let host = Host::start();
    let r = host.cli(&["vm", "restore", "snap-0123456789ab"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("no snapshot with id"), "{}", r.stderr);
    assert_eq!(host.vm_dirs(), 0);
}
