//! The Firecracker driver through a real `jailer`: Firecracker runs as the
//! jail's uid inside its chroot, its API and vsock sockets reach the state
//! directory, a snapshot moves out of the jail and restores into another
//! VM's jail, and the state directory stays root's.
//!
//! Ignored unless run on purpose, because it needs `FIRECRACKER_BIN`
//! (statically linked: the jail holds no libraries), `JAILER_BIN` (the
//! same release), a usable `/dev/kvm` and root:
//! `FIRECRACKER_BIN=… JAILER_BIN=… cargo nextest run -p polydev-host
//! --test firecracker_jailer --run-ignored all`. Run that way without them,
//! it fails and says what is missing.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use polydev_api::vm::{Accel, HypervisorKind};
use polydev_host::config::ResolvedSpec;
use polydev_host::hypervisor::firecracker::{Firecracker, MEMORY_FILE, STATE_FILE};
use polydev_host::hypervisor::jailer::Jailer;
use polydev_host::hypervisor::{Hypervisor, LaunchPlan};
use polydev_host::vmdir::VmDir;
use tokio::net::UnixStream;

/// The jail's identity: `nobody`/`nogroup`, which own nothing here.
const JAIL_ID: u32 = 65534;

fn required(var: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .unwrap_or_else(|| panic!("set {var} to the binary (this test is run on purpose only)"))
}

/// The cached kernel and initramfs (`polydev image kernel`).
fn boot_files() -> (PathBuf, PathBuf) {
    let home = PathBuf::from(std::env::var_os("HOME").expect("HOME"));
    let newest = |kind: &str, name: &str| {
        let mut found: Vec<PathBuf> = std::fs::read_dir(home.join(".cache/polydev").join(kind))
            .map(|rd| rd.flatten().map(|e| e.path().join(name)).collect())
            .unwrap_or_default();
        found.retain(|p| p.is_file());
        found.sort();
        found
            .pop()
            .unwrap_or_else(|| panic!("no cached {kind}: run `polydev image kernel`"))
    };
    (
        newest("kernel", "vmlinux"),
        newest("initramfs", "initramfs.cpio"),
    )
}

fn plan(base: &Path, id: &str, restore_from: Option<PathBuf>) -> LaunchPlan {
    let (kernel, initramfs) = boot_files();
    let dir = VmDir::new(&base.join("vms"), id);
    std::fs::create_dir_all(dir.root()).expect("VM dir");
    let disk = std::fs::File::create(dir.data_disk()).expect("data disk");
    disk.set_len(8 << 20).expect("size data disk");
    LaunchPlan {
        id: id.to_string(),
        dir,
        spec: ResolvedSpec {
            name: None,
            vcpus: 1,
            memory_mib: 128,
            image: "test".into(),
            kernel,
            initramfs,
            hypervisor: HypervisorKind::Firecracker,
            env: Default::default(),
            services: Vec::new(),
            data_disk_mib: 8,
            egress: None,
            rootfs: None,
        },
        accel: Accel::Kvm,
        cmdline: "console=ttyS0 reboot=k panic=0 pci=off".into(),
        restore_from,
        run_as: None,
    }
}

async fn state(dir: &VmDir) -> String {
    let stream = UnixStream::connect(dir.control())
        .await
        .expect("API socket");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let conn = tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("in time")
        .expect("answer");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    conn.abort();
    let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    v["state"].as_str().unwrap_or_default().to_string()
}

fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .expect("Uid line")
}

#[tokio::test]
#[ignore = "needs FIRECRACKER_BIN, JAILER_BIN, /dev/kvm and root; run with --run-ignored all"]
async fn a_jailed_firecracker_boots_snapshots_and_restores_as_its_own_uid() {
    let fc = Firecracker::new(required("FIRECRACKER_BIN")).with_jailer(Some(Jailer {
        bin: required("JAILER_BIN"),
        uid: JAIL_ID,
        gid: JAIL_ID,
    }));
    let tmp = tempfile::Builder::new()
        .prefix("pdjail")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let p = plan(tmp.path(), "vm-jail0000001", None);
    let mut launched = fc.launch(&p).await.expect("launch through the jailer");
    let pid = launched.hypervisor.id().expect("pid");
    assert_eq!(uid_of(pid), JAIL_ID, "firecracker runs as the jail's uid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    assert!(
        String::from_utf8_lossy(&cmdline).contains(&p.dir.root().display().to_string()),
        "the command line names the state directory (adoption after a restart)"
    );
    assert_eq!(state(&p.dir).await, "Running");
    for s in [p.dir.control(), p.dir.vsock()] {
        assert!(
            std::fs::symlink_metadata(&s).is_ok_and(|m| m.file_type().is_socket()),
            "{s:?}"
        );
    }
    let root_meta = std::fs::metadata(p.dir.root()).expect("state dir");
    assert_eq!(root_meta.uid(), 0, "the state directory stays root's");

    let snap = tmp.path().join("snap");
    std::fs::create_dir(&snap).expect("snapshot dir");
    fc.snapshot(&p.dir, &snap).await.expect("snapshot");
    for f in [STATE_FILE, MEMORY_FILE] {
        let m = std::fs::symlink_metadata(snap.join(f)).expect("snapshot file");
        assert!(m.file_type().is_file() && m.uid() == 0, "{f}");
    }
    assert_eq!(state(&p.dir).await, "Running", "left running");

    let q = plan(tmp.path(), "vm-jail0000002", Some(snap.clone()));
    let mut restored = fc.launch(&q).await.expect("restore through the jailer");
    assert_eq!(state(&q.dir).await, "Running");
    assert_eq!(uid_of(restored.hypervisor.id().expect("pid")), JAIL_ID);

    for child in [&mut launched.hypervisor, &mut restored.hypervisor] {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}
