//! Lifecycle of the Firecracker driver against a real `firecracker` binary:
//! launch, pause, resume, snapshot, restore into another directory, and
//! clean failure on bad input.
//!
//! The binary comes from `FIRECRACKER_BIN` at build time (see `build.rs`):
//! without it the tests that need one are ignored, so nextest reports them as
//! SKIP; with it they run, and a missing `/dev/kvm` fails them loudly. The
//! kernel is a tiny generated ELF that greets on COM1 and halts its only
//! vCPU: Firecracker checks the kernel's ELF headers at `InstanceStart`, a
//! guest that sits halted is all the API lifecycle needs, and the greeting
//! shows the console reaching `console.log`.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use polydev_api::vm::{Accel, HypervisorKind};
use polydev_host::config::ResolvedSpec;
use polydev_host::hypervisor::firecracker::{Firecracker, MEMORY_FILE, STATE_FILE};
use polydev_host::hypervisor::{Hypervisor, HypervisorError, LaunchPlan, Launched};
use polydev_host::vmdir::VmDir;
use tokio::net::UnixStream;

const MEM_MIB: u32 = 64;
const DATA_MIB: u32 = 8;

/// The binary named by `FIRECRACKER_BIN`; fails the test when it or
/// `/dev/kvm` is unusable, because the run asked for Firecracker.
fn firecracker() -> Firecracker {
    let bin = std::env::var_os("FIRECRACKER_BIN")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .expect("FIRECRACKER_BIN must name the firecracker binary");
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("firecracker needs /dev/kvm, which is not usable here ({e}); unset FIRECRACKER_BIN");
    }
    Firecracker::new(bin)
}

/// What the generated kernel prints on its serial port.
const GUEST_GREETING: &str = "polydev firecracker test guest\n";

/// A minimal x86-64 ELF kernel loaded at 1 MiB (Firecracker refuses entry
/// points below that): it writes [`GUEST_GREETING`] to COM1 and halts with
/// interrupts off, so it costs no CPU afterwards.
fn tiny_elf() -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    const EHDR: u16 = 64;
    const PHDR: u16 = 56;
    let mut code: Vec<u8> = vec![
        0x48, 0x8d, 0x35, 0x10, 0x00, 0x00, 0x00, // lea rsi, [rip + 16] (the text)
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8 (COM1)
        0xac, // next: lodsb
        0x84, 0xc0, // test al, al
        0x74, 0x03, // jz done
        0xee, // out dx, al
        0xeb, 0xf8, // jmp next
        0xfa, // done: cli
        0xf4, // halt: hlt
        0xeb, 0xfd, // jmp halt
    ];
    code.extend_from_slice(GUEST_GREETING.as_bytes());
    code.push(0);
    let mut e = Vec::new();
    // e_ident: magic, 64-bit, little endian, version 1, padding.
    e.extend_from_slice(b"\x7fELF\x02\x01\x01");
    e.extend_from_slice(&[0; 9]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e.extend_from_slice(&1u32.to_le_bytes()); // e_version
    e.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    e.extend_from_slice(&u64::from(EHDR).to_le_bytes()); // e_phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    e.extend_from_slice(&EHDR.to_le_bytes()); // e_ehsize
    e.extend_from_slice(&PHDR.to_le_bytes()); // e_phentsize
    e.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    e.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    e.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    e.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
                                              // One PT_LOAD, read + execute.
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&5u32.to_le_bytes());
    e.extend_from_slice(&u64::from(EHDR + PHDR).to_le_bytes()); // p_offset
    e.extend_from_slice(&LOAD.to_le_bytes()); // p_vaddr
    e.extend_from_slice(&LOAD.to_le_bytes()); // p_paddr
    e.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    e.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    e.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    e.extend_from_slice(&code);
    e
}

/// The first file matching `~/.cache/polydev/<kind>/*/<name>`.
fn cached(kind: &str, name: &str) -> Option<PathBuf> {
    let home = PathBuf::from(std::env::var_os("HOME")?);
    let mut found: Vec<PathBuf> = std::fs::read_dir(home.join(".cache/polydev").join(kind))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(name))
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() > 0))
        .collect();
    found.sort();
    found.pop()
}

/// Kernel and initramfs: the generated kernel, which greets on its serial
/// port (what the console test looks for; a real kernel may print nothing
/// under a KVM that cannot run it, as kvm_pvm), and the cached real
/// initramfs, else a stand-in in `scratch`.
fn boot_files(scratch: &Path) -> (PathBuf, PathBuf) {
    let kernel = scratch.join("vmlinux");
    std::fs::write(&kernel, tiny_elf()).expect("write test kernel");
    let initramfs = cached("initramfs", "initramfs.cpio").unwrap_or_else(|| {
        let p = scratch.join("initramfs.cpio");
        std::fs::write(&p, b"not a real initramfs; only loaded into guest memory\n")
            .expect("write test initramfs");
        p
    });
    (kernel, initramfs)
}

/// A launch plan for a fresh VM directory `<base>/vms/<id>`.
fn plan(
    base: &Path,
    id: &str,
    kernel: PathBuf,
    initramfs: PathBuf,
    data_disk_mib: u32,
) -> LaunchPlan {
    let dir = VmDir::new(&base.join("vms"), id);
    std::fs::create_dir_all(dir.root()).expect("create VM dir");
    if data_disk_mib > 0 {
        let f = std::fs::File::create(dir.data_disk()).expect("create data disk");
        f.set_len(u64::from(data_disk_mib) << 20)
            .expect("size data disk");
    }
    LaunchPlan {
        id: id.to_string(),
        dir,
        spec: ResolvedSpec {
            name: None,
            vcpus: 1,
            memory_mib: MEM_MIB,
            image: "test".into(),
            kernel,
            initramfs,
            hypervisor: HypervisorKind::Firecracker,
            env: Default::default(),
            services: Vec::new(),
            data_disk_mib,
            egress: None,
            rootfs: None,
        },
        accel: Accel::Kvm,
        cmdline: "console=ttyS0 reboot=k panic=0 pci=off".into(),
        restore_from: None,
        run_as: None,
    }
}

/// `GET /` on the API socket: the instance state ("Running", "Paused", …).
async fn api_state(dir: &VmDir) -> String {
    let stream = UnixStream::connect(dir.control())
        .await
        .expect("connect to the API socket");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP handshake");
    let conn = tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "localhost")
        .header("accept", "application/json")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("API answers in time")
        .expect("API answers");
    assert!(resp.status().is_success(), "GET / -> {}", resp.status());
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    conn.abort();
    let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON instance info");
    v["state"].as_str().unwrap_or_default().to_string()
}

fn is_socket(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// Whether any process's command line mentions `needle`.
fn process_mentioning(needle: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok())
        .find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(needle)
                .then_some(pid)
        })
}

async fn kill(mut l: Launched) {
    assert!(l.backend.is_none(), "firecracker needs no backend process");
    l.hypervisor.start_kill().expect("kill firecracker");
    let status = tokio::time::timeout(Duration::from_secs(10), l.hypervisor.wait())
        .await
        .expect("firecracker exits after SIGKILL")
        .expect("reap firecracker");
    assert!(!status.success());
}

fn assert_alive(l: &mut Launched, dir: &VmDir) {
    if let Ok(Some(status)) = l.hypervisor.try_wait() {
        let log = std::fs::read_to_string(dir.hypervisor_log()).unwrap_or_default();
        panic!("firecracker exited ({status}); its log:\n{log}");
    }
}

#[tokio::test]
#[cfg_attr(
    not(firecracker_bin),
    ignore = "needs a Firecracker binary: set FIRECRACKER_BIN (see build.rs)"
)]
async fn launch_pause_resume_snapshot_and_restore_elsewhere() {
    let fc = firecracker();
    let scratch = tempfile::tempdir().expect("tempdir");
    let (kernel, initramfs) = boot_files(scratch.path());

    // Boot.
    let base_a = tempfile::tempdir().expect("tempdir");
    let plan_a = plan(
        base_a.path(),
        "vm-a",
        kernel.clone(),
        initramfs.clone(),
        DATA_MIB,
    );
    let a = &plan_a.dir;
    // The host's console reader, as the manager starts it before a launch.
    let (console, _) =
        polydev_host::console::start_fifo(&a.console_fifo(), a.console_log(), 1 << 20)
            .expect("console fifo");
    let mut vm_a = fc.launch(&plan_a).await.expect("launch");
    assert_alive(&mut vm_a, a);
    assert_eq!(api_state(a).await, "Running");
    assert!(
        is_socket(&a.vsock()),
        "vsock.sock is created in the VM's directory"
    );
    let log = std::fs::read_to_string(a.hypervisor_log()).expect("hypervisor log");
    assert!(
        log.contains("Running Firecracker"),
        "firecracker logs to hypervisor.log: {log}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(a.console_log())
        .unwrap_or_default()
        .contains(GUEST_GREETING)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the serial console reaches console.log through the FIFO"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Pause and resume.
    fc.pause(a).await.expect("pause");
    assert_eq!(api_state(a).await, "Paused");
    fc.resume(a).await.expect("resume");
    assert_eq!(api_state(a).await, "Running");

    // Snapshot of a running VM: it keeps running.
    let snap = tempfile::tempdir().expect("tempdir");
    fc.snapshot(a, snap.path()).await.expect("snapshot");
    assert_eq!(
        api_state(a).await,
        "Running",
        "a running VM is resumed after its snapshot"
    );
    let state = std::fs::metadata(snap.path().join(STATE_FILE)).expect("vmstate written");
    assert!(state.len() > 0);
    let memory = std::fs::metadata(snap.path().join(MEMORY_FILE)).expect("memory written");
    let expected = u64::from(MEM_MIB) << 20;
    assert!(
        memory.len() >= expected * 9 / 10 && memory.len() <= expected * 11 / 10,
        "memory file is {} bytes for {MEM_MIB} MiB of guest memory",
        memory.len()
    );

    // Snapshot of a paused VM: it stays paused.
    fc.pause(a).await.expect("pause");
    let snap_paused = tempfile::tempdir().expect("tempdir");
    fc.snapshot(a, snap_paused.path())
        .await
        .expect("snapshot while paused");
    assert_eq!(api_state(a).await, "Paused", "a paused VM stays paused");
    assert!(snap_paused.path().join(STATE_FILE).is_file());
    fc.resume(a).await.expect("resume");
    assert_alive(&mut vm_a, a);

    // Restore in another directory while the original still runs: the
    // snapshot's relative vsock path must land in the new VM's directory.
    let base_b = tempfile::tempdir().expect("tempdir");
    let mut plan_b = plan(base_b.path(), "vm-b", kernel, initramfs, DATA_MIB);
    plan_b.restore_from = Some(snap.path().to_path_buf());
    let b = &plan_b.dir;
    let mut vm_b = fc.launch(&plan_b).await.expect("restore");
    assert_alive(&mut vm_b, b);
    assert_eq!(api_state(b).await, "Running");
    assert!(
        is_socket(&b.vsock()),
        "the restored VM binds vsock.sock in its own directory"
    );
    assert!(
        UnixStream::connect(b.vsock()).await.is_ok(),
        "its vsock socket accepts connections"
    );
    assert_eq!(
        api_state(a).await,
        "Running",
        "the original VM is unaffected"
    );

    // The restored VM can be paused and snapshotted in turn.
    fc.pause(b).await.expect("pause restored");
    fc.resume(b).await.expect("resume restored");

    kill(vm_b).await;
    kill(vm_a).await;
    console.abort();
}

#[tokio::test]
#[cfg_attr(
    not(firecracker_bin),
    ignore = "needs a Firecracker binary: set FIRECRACKER_BIN (see build.rs)"
)]
async fn missing_kernel_is_a_control_error_and_leaves_no_process() {
    let fc = firecracker();
    let scratch = tempfile::tempdir().expect("tempdir");
    let (_, initramfs) = boot_files(scratch.path());
    let base = tempfile::tempdir().expect("tempdir");
    let p = plan(
        base.path(),
        "vm-nokernel",
        scratch.path().join("no-such-vmlinux"),
        initramfs,
        0,
    );
    let err = fc
        .launch(&p)
        .await
        .expect_err("a missing kernel must fail the launch");
    match &err {
        HypervisorError::Control { op, message } => {
            assert_eq!(*op, "boot source");
            assert!(!message.is_empty());
        }
        other => panic!("expected a Control error, got {other:?}"),
    }
    eprintln!("as expected: {err}");
    let needle = p.dir.root().display().to_string();
    assert_eq!(
        process_mentioning(&needle),
        None,
        "the failed firecracker is gone"
    );
    assert!(
        UnixStream::connect(p.dir.control()).await.is_err(),
        "nobody serves the API socket"
    );
}

#[tokio::test]
#[cfg_attr(
    not(firecracker_bin),
    ignore = "needs a Firecracker binary: set FIRECRACKER_BIN (see build.rs)"
)]
async fn restore_from_a_missing_snapshot_fails_cleanly() {
    let fc = firecracker();
    let scratch = tempfile::tempdir().expect("tempdir");
    let (kernel, initramfs) = boot_files(scratch.path());
    let base = tempfile::tempdir().expect("tempdir");
    let mut p = plan(base.path(), "vm-nosnap", kernel, initramfs, 0);
    p.restore_from = Some(scratch.path().join("no-such-snapshot"));
    let err = fc
        .launch(&p)
        .await
        .expect_err("a missing snapshot must fail the launch");
    assert!(
        matches!(
            &err,
            HypervisorError::Control {
                op: "snapshot load",
                ..
            }
        ),
        "expected a Control error, got {err:?}"
    );
    let needle = p.dir.root().display().to_string();
    assert_eq!(
        process_mentioning(&needle),
        None,
        "the failed firecracker is gone"
    );
}

#[tokio::test]
async fn tcg_is_refused_before_anything_starts() {
    // No binary needed: the driver refuses before spawning.
    let fc = Firecracker::new("/nonexistent/firecracker");
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut p = plan(
        scratch.path(),
        "vm-tcg",
        scratch.path().join("vmlinux"),
        scratch.path().join("initramfs"),
        0,
    );
    p.accel = Accel::Tcg;
    let err = fc.launch(&p).await.expect_err("TCG is refused");
    assert!(matches!(err, HypervisorError::Unsupported(_)), "{err:?}");
}

#[tokio::test]
async fn missing_binary_is_a_spawn_error() {
    let fc = Firecracker::new("/nonexistent/firecracker");
    let scratch = tempfile::tempdir().expect("tempdir");
    let p = plan(
        scratch.path(),
        "vm-nobin",
        scratch.path().join("vmlinux"),
        scratch.path().join("initramfs"),
        0,
    );
    let err = fc.launch(&p).await.expect_err("no binary");
    assert!(matches!(err, HypervisorError::Spawn { .. }), "{err:?}");
}
