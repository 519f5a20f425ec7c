//! End to end through a real QEMU virtio-serial port, including a snapshot
//! (migrate to file) and a restore into a new QEMU process.
//!
//! It boots the Debian cloud kernel (PVH `vmlinux`) and its modules (a
//! directory holding `virtio_ring.ko`, `virtio.ko`, `virtio_mmio.ko`,
//! `virtio_console.ko`, found recursively, uncompressed) that
//! `./polydev.sh setup` caches in `~/.cache/polydev/kernel/<hash>/`;
//! `POLYDEV_TEST_KERNEL` and `POLYDEV_TEST_MODULES` name others.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use polydev_mux::{run_bridge_with, BridgeOptions};

const MODULES: [&str; 4] = ["virtio_ring", "virtio", "virtio_mmio", "virtio_console"];

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

fn build_guest_init() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../../target"));
    // A separate target dir: the outer cargo holds the lock on its own.
    let target_dir = base.join("qemu-guest");
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "-p",
            "polydev-mux",
            "--example",
            "mux_guest_init",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(manifest)
        .status()
        .expect("run cargo");
    assert!(status.success(), "building the guest init failed");
    target_dir.join("x86_64-unknown-linux-gnu/release/examples/mux_guest_init")
}

fn make_initrd(dir: &Path, init: &Path, modules: &Path) -> PathBuf {
    let root = dir.join("ir");
    std::fs::create_dir_all(root.join("m")).unwrap();
    std::fs::copy(init, root.join("init")).unwrap();
    for m in MODULES {
        let f = find_file(modules, &format!("{m}.ko"))
            .unwrap_or_else(|| panic!("{m}.ko not found under {}", modules.display()));
        std::fs::copy(f, root.join("m").join(format!("{m}.ko"))).unwrap();
    }
    let out = dir.join("initrd");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
            root.display(),
            out.display()
        ))
        .status()
        .unwrap();
    assert!(status.success(), "cpio failed");
    out
}

struct Vm {
    child: Child,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_qemu(dir: &Path, kernel: &Path, initrd: &Path, incoming: Option<&Path>, tag: &str) -> Vm {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm,acpi=on", "-cpu", "max", "-m", "256"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-bios", "/usr/share/qemu/qboot.rom"])
        .arg("-serial")
        .arg(format!(
            "file:{}",
            dir.join(format!("console-{tag}.log")).display()
        ))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(append())
        .args(["-device", "virtio-serial-device"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=mux,path={},server=on,wait=off",
            dir.join("mux.sock").display()
        ))
        .args(["-device", "virtserialport,chardev=mux,name=polydev.mux"])
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join("qmp.sock").display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(state) = incoming {
        cmd.arg("-incoming")
            .arg(format!("file:{}", state.display()));
    }
    Vm {
        child: cmd.spawn().expect("start qemu"),
    }
}

/// The kernel command line. Under TCG the kernel cannot calibrate its
/// clock (no PIT or HPET on microvm) and stalls unless told the TSC rate.
fn append() -> String {
    let mut line = String::from("console=ttyS0 quiet panic=-1");
    let mhz = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("cpu MHz"))?
                .split(':')
                .nth(1)?
                .trim()
                .parse::<f64>()
                .ok()
        });
    if let Some(mhz) = mhz {
        line.push_str(&format!(" tsc_early_khz={}", (mhz * 1000.0) as u64));
    }
    line
}

/// A tiny QMP client: one command at a time, events skipped.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Self {
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                Err(e) => panic!("qmp: {e}"),
            }
        };
        let mut q = Self {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting).unwrap();
        q.cmd(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    fn cmd(&mut self, c: &str) -> String {
        self.w.write_all(c.as_bytes()).unwrap();
        self.w.write_all(b"\n").unwrap();
        loop {
            let mut line = String::new();
            assert!(self.r.read_line(&mut line).unwrap() > 0, "qmp closed");
            if line.contains("\"return\"") || line.contains("\"error\"") {
                assert!(!line.contains("\"error\""), "qmp {c}: {line}");
                return line;
            }
        }
    }

    fn wait_migration(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.cmd(r#"{"execute":"query-migrate"}"#);
            if r.contains("\"completed\"") {
                return;
            }
            assert!(!r.contains("\"failed\""), "migration failed: {r}");
            assert!(Instant::now() < deadline, "migration stuck: {r}");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

fn connect_retry(uds: &Path, port: u32, within: Duration) -> UnixStream {
    let deadline = Instant::now() + within;
    loop {
        match host_connect(uds, port) {
            Ok(s) => return s,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "guest port {port} never answered: {e}"
                );
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn echo(uds: &Path, size: usize) -> f64 {
    let s = connect_retry(uds, 1024, Duration::from_secs(60));
    let data = pattern(size as u64, size);
    let mut w = s.try_clone().unwrap();
    let d = data.clone();
    let start = Instant::now();
    let t = thread::spawn(move || {
        w.write_all(&d).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    (&s).read_to_end(&mut back).unwrap();
    t.join().unwrap();
    assert!(back == data, "echo through QEMU corrupted data");
    (2 * size) as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// The newest kernel directory in the default cache holding a `vmlinux`.
fn cached_kernel_dir() -> Option<PathBuf> {
    let home = PathBuf::from(std::env::var_os("HOME")?);
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(home.join(".cache/polydev/kernel"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|d| d.join("vmlinux").is_file() && d.join("modules").is_dir())
        .collect();
    dirs.sort_by_key(|d| std::fs::metadata(d).and_then(|m| m.modified()).ok());
    dirs.pop()
}

/// Kernel and modules: the variables when set, else the cached ones.
fn kernel_and_modules() -> (PathBuf, PathBuf) {
    if let (Some(k), Some(m)) = (
        std::env::var_os("POLYDEV_TEST_KERNEL"),
        std::env::var_os("POLYDEV_TEST_MODULES"),
    ) {
        return (PathBuf::from(k), PathBuf::from(m));
    }
    let dir = cached_kernel_dir().expect(
        "no cached kernel in ~/.cache/polydev/kernel: run `./polydev.sh setup` \
         (or set POLYDEV_TEST_KERNEL and POLYDEV_TEST_MODULES)",
    );
    (dir.join("vmlinux"), dir.join("modules"))
}

#[test]
fn qemu_virtio_serial_with_snapshot_restore() {
    let (kernel, modules) = kernel_and_modules();
    let dir = TempDir::new();
    let init = build_guest_init();
    let initrd = make_initrd(dir.path(), &init, &modules);

    let boot = Instant::now();
    let mut vm = start_qemu(dir.path(), &kernel, &initrd, None, "boot");
    let uds = dir.path().join("v.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let opts = BridgeOptions {
        stop: Some(stop.clone()),
        gone_after: Duration::from_secs(20),
        ..BridgeOptions::default()
    };
    let (c, u) = (dir.path().join("mux.sock"), uds.clone());
    let bridge = thread::spawn(move || run_bridge_with(&c, &u, opts));

    // Host → guest echo.
    let first = connect_retry(&uds, 1024, Duration::from_secs(60));
    eprintln!("guest answered {:?} after QEMU start", boot.elapsed());
    drop(first);
    let mbps = echo(&uds, 4 << 20);
    eprintln!("echo through QEMU TCG virtio-serial: {mbps:.1} MB/s (both directions)");

    // Guest → host: the guest dials host port 1025 when we connect to 1026.
    let mut l_path = uds.as_os_str().to_owned();
    l_path.push("_1025");
    let host_l = UnixListener::bind(&l_path).unwrap();
    let server = thread::spawn(move || {
        let (mut c, _) = host_l.accept().unwrap();
        let mut hello = String::new();
        (&c).read_to_string(&mut hello).unwrap();
        c.write_all(format!("host got: {hello}").as_bytes())
            .unwrap();
    });
    let mut relay = connect_retry(&uds, 1026, Duration::from_secs(10));
    let mut answer = String::new();
    relay.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "host got: hello from guest\n");
    server.join().unwrap();

    // A stream open across the snapshot.
    let mut old = connect_retry(&uds, 1024, Duration::from_secs(10));
    old.write_all(b"before").unwrap();
    let mut b = [0u8; 6];
    old.read_exact(&mut b).unwrap();

    // Snapshot: stop, migrate to a file, quit; restore into a new process.
    let state = dir.path().join("state");
    let t = Instant::now();
    let mut qmp = Qmp::connect(&dir.path().join("qmp.sock"));
    qmp.cmd(r#"{"execute":"stop"}"#);
    qmp.cmd(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"file:{}"}}}}"#,
        state.display()
    ));
    qmp.wait_migration();
    eprintln!("snapshot saved in {:?}", t.elapsed());
    let _ = qmp.cmd(r#"{"execute":"quit"}"#);
    let _ = vm.child.wait();
    drop(vm);

    // The bridge lost the chardev: the old host connection ends.
    read_until_closed(&old);

    let _ = std::fs::remove_file(dir.path().join("qmp.sock"));
    let t = Instant::now();
    vm = start_qemu(dir.path(), &kernel, &initrd, Some(&state), "restore");
    let mut qmp = Qmp::connect(&dir.path().join("qmp.sock"));
    qmp.wait_migration();
    qmp.cmd(r#"{"execute":"cont"}"#);
    let again = connect_retry(&uds, 1024, Duration::from_secs(30));
    eprintln!("restored and reachable again in {:?}", t.elapsed());
    drop(again);
    let mbps = echo(&uds, 1 << 20);
    eprintln!("echo after restore: {mbps:.1} MB/s");

    stop.store(true, Ordering::SeqCst);
    bridge.join().unwrap().unwrap();
    drop(vm);
}
