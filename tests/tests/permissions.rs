//! Everything the host agent and the controller keep on disk is private
//! whatever the umask they start with: under umask 000 the data directory,
//! VM, log and snapshot directories are 0700; disks, snapshot memory, logs,
//! the database and every socket (`host.sock` included) are 0600.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Stdio};

use polydev_e2e::{polydev_bin, Host};

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o7777
}

/// Every entry directly in `dir` with a mode other than 0600 (files,
/// sockets) or 0700 (directories).
fn loose(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let t = e.file_type().expect("type");
        let want = if t.is_dir() { 0o700 } else { 0o600 };
        let m = mode(&e.path());
        if m != want {
            out.push(format!("{} {m:o}", e.path().display()));
        }
    }
    out
}

#[test]
fn modes_are_private_under_umask_000() {
    let host = Host::start_with(&[], Some(0o000));
    let data = host.data();
    let vm = host.run_vm(&["--name", "perm", "--data-disk", "16"]);
    let dir = data.join("vms").join(&vm.id);

    assert_eq!(mode(data), 0o700, "data dir");
    for d in ["vms", "logs", "snapshots"] {
        assert_eq!(mode(&data.join(d)), 0o700, "{d}");
    }
    assert_eq!(mode(&dir), 0o700, "VM dir");
    assert_eq!(mode(&data.join("host.sock")), 0o600, "host.sock");
    assert_eq!(mode(&dir.join("data.img")), 0o600, "disk");
    let sockets: Vec<String> = std::fs::read_dir(&dir)
        .expect("VM dir")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for s in [
        "vsock.sock",
        "vsock.sock_1025",
        "vsock.sock_1026",
        "mux.sock",
        "control.sock",
        "console.sock",
    ] {
        assert!(sockets.iter().any(|x| x == s), "{s} in {sockets:?}");
    }
    // Sockets, disk, logs, record: nothing in the VM dir is looser.
    assert_eq!(loose(&dir), Vec::<String>::new());

    // Snapshot: its directory, memory state and disk copy.
    let r = host.ok(&["vm", "snapshot", &vm.id, "--json"]);
    let snap: serde_json::Value = serde_json::from_str(r.stdout.trim()).expect("snapshot json");
    let snap_dir = data
        .join("snapshots")
        .join(snap["id"].as_str().expect("id"));
    assert_eq!(mode(&snap_dir), 0o700, "snapshot dir");
    assert_eq!(mode(&snap_dir.join("state.bin")), 0o600, "snapshot memory");
    assert_eq!(mode(&snap_dir.join("data.img")), 0o600, "snapshot disk");
    assert_eq!(loose(&snap_dir), Vec::<String>::new());

    // Kept logs of an ended VM.
    host.ok(&["vm", "rm", &vm.id]);
    let kept = data.join("logs").join(&vm.id);
    assert_eq!(mode(&kept), 0o700, "kept logs dir");
    assert_eq!(loose(&kept), Vec::<String>::new());

    // The controller's database (and its WAL files), created under umask 000.
    let out = Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" \"$@\"")
        .arg(polydev_bin())
        .arg("--data-dir")
        .arg(data)
        .args(["upstream", "ls"])
        .stdin(Stdio::null())
        .output()
        .expect("run polydev upstream ls");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let db = data.join("controller.db");
    assert_eq!(mode(&db), 0o600, "controller.db");
    for suffix in ["-wal", "-shm"] {
        let p = data.join(format!("controller.db{suffix}"));
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }
    assert_eq!(mode(data), 0o700, "data dir after the controller");
}
