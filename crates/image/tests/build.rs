//! End to end: resolve Debian's cloud kernel and busybox-static through apt,
//! build an initramfs, check the caching, and, where QEMU is installed, boot
//! it and load the modules.
//!
//! Tests send no traffic beyond loopback: by default the temp cache is seeded
//! from the artifacts that `./polydev.sh setup` downloaded into the default
//! cache, so only local apt lookups happen. `POLYDEV_NETWORK_TESTS=1` makes
//! the test download cold from the Debian mirror instead.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use polydev_image::cpio::{self, mode, CpioBuilder, CpioEntry};
use polydev_image::{
    ensure_busybox, ensure_initramfs, ensure_kernel, find_cached_busybox, find_cached_initramfs,
    find_cached_kernel, Cache, MODULES_LIST_PATH,
};

/// Copy the kernel and busybox artifacts of the default cache into `cache`,
/// so the test needs no download. Returns false when there is nothing to copy.
fn seed_from_default_cache(cache: &Cache) -> bool {
    let Ok(root) = Cache::default_root() else {
        return false;
    };
    let default = Cache::new(root);
    let (Some(k), Some(b)) = (find_cached_kernel(&default), find_cached_busybox(&default)) else {
        return false;
    };
    let Some(bdir) = b.path.parent() else {
        return false;
    };
    for (src, kind) in [(k.dir.as_path(), "kernel"), (bdir, "busybox")] {
        let dest = cache.root().join(kind);
        std::fs::create_dir_all(&dest).unwrap();
        let ok = Command::new("cp")
            .arg("-a")
            .arg(src)
            .arg(&dest)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "copy {} into the test cache", src.display());
    }
    true
}

fn apt_has_lists() -> bool {
    Command::new("apt-cache")
        .args([
            "show",
            "--no-all-versions",
            polydev_image::KERNEL_METAPACKAGE,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

/// Collects progress lines so the test can assert on them.
struct Log(Mutex<Vec<String>>);

impl Log {
    fn new() -> Self {
        Log(Mutex::new(Vec::new()))
    }
    fn say(&self, line: &str) {
        eprintln!("  {line}");
        self.0.lock().unwrap().push(line.to_string());
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

#[test]
fn build_cache_and_boot() {
    // `./polydev.sh setup` makes sure of both; a missing one fails here
    // rather than passing without building anything.
    assert!(
        apt_has_lists(),
        "apt-cache cannot resolve the kernel package: run `./polydev.sh setup` (it runs apt-get update)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::new(tmp.path().join("cache"));
    let log = Log::new();
    let say = |l: &str| log.say(l);
    let download = std::env::var_os("POLYDEV_NETWORK_TESTS").is_some_and(|v| v == "1");
    if !download {
        assert!(
            seed_from_default_cache(&cache),
            "no cached kernel/busybox in the default cache: run `./polydev.sh setup` \
             (or set POLYDEV_NETWORK_TESTS=1 to download them here)"
        );
    }

    // Cold build.
    let t = Instant::now();
    let kernel = ensure_kernel(&cache, &say).unwrap();
    let busybox = ensure_busybox(&cache, &say).unwrap();
    // Any static binary will do as the agent; busybox is one.
    let initrd = ensure_initramfs(&cache, &kernel, &busybox.path, &say).unwrap();
    let cold = t.elapsed();
    let lines = log.take();
    let expect = if download {
        "kernel: downloading linux-image-"
    } else {
        "kernel: cached"
    };
    assert!(lines.iter().any(|l| l.starts_with(expect)), "{lines:?}");
    assert!(
        lines.iter().any(|l| l.starts_with("initramfs: built")),
        "{lines:?}"
    );

    let vmlinux = std::fs::read(&kernel.vmlinux).unwrap();
    assert_eq!(&vmlinux[..4], b"\x7fELF");
    assert!(kernel.manifest.pvh, "Debian's cloud kernel has a PVH entry");
    assert!(
        kernel.release().ends_with("-cloud-amd64"),
        "{}",
        kernel.release()
    );
    assert!(kernel.config.is_file());
    assert!(kernel.modules_dir.join("kernel").is_dir());
    assert_eq!(
        kernel.dir.file_name().unwrap().to_string_lossy(),
        kernel.manifest.deb_sha256
    );
    // The downloaded package is not kept once the artifact exists.
    let leftovers: Vec<_> = std::fs::read_dir(cache.root().join("downloads"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    check_archive(&initrd.path, kernel.release());

    // Warm: same artifacts, nothing rebuilt.
    let (vm_mtime, cpio_mtime) = (mtime(&kernel.vmlinux), mtime(&initrd.path));
    let t = Instant::now();
    let kernel2 = ensure_kernel(&cache, &say).unwrap();
    let initrd2 = ensure_initramfs(&cache, &kernel2, &busybox.path, &say).unwrap();
    let warm = t.elapsed();
    assert_eq!(kernel2, kernel);
    assert_eq!(initrd2, initrd);
    assert_eq!(mtime(&kernel.vmlinux), vm_mtime);
    assert_eq!(mtime(&initrd.path), cpio_mtime);
    let lines = log.take();
    assert!(
        lines.iter().any(|l| l.starts_with("kernel: cached")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("initramfs: cached")),
        "{lines:?}"
    );
    assert_eq!(
        find_cached_initramfs(&cache, &initrd.key),
        Some(initrd.clone())
    );
    assert_eq!(find_cached_kernel(&cache), Some(kernel.clone()));
    eprintln!("cold build {cold:.2?}, cached {warm:.2?}");

    // Deterministic: a rebuild from the same inputs is byte-identical.
    let before = std::fs::read(&initrd.path).unwrap();
    std::fs::remove_dir_all(initrd.path.parent().unwrap()).unwrap();
    let rebuilt = ensure_initramfs(&cache, &kernel, &busybox.path, &say).unwrap();
    assert_eq!(rebuilt.key, initrd.key);
    assert_eq!(std::fs::read(&rebuilt.path).unwrap(), before);

    // A different agent is a different key.
    let other_agent = tmp.path().join("agent");
    let mut bytes = std::fs::read(&busybox.path).unwrap();
    bytes.extend_from_slice(b"different");
    std::fs::write(&other_agent, bytes).unwrap();
    let other = ensure_initramfs(&cache, &kernel, &other_agent, &say).unwrap();
    assert_ne!(other.key, initrd.key);

    offline_fallback(&cache, &kernel, tmp.path());
    boot(&kernel.vmlinux, &initrd.path, tmp.path());
}

fn check_archive(path: &Path, release: &str) {
    let entries = cpio::read_archive(&std::fs::read(path).unwrap()).unwrap();
    let get = |n: &str| -> &CpioEntry {
        entries
            .iter()
            .find(|e| e.name == n)
            .unwrap_or_else(|| panic!("{n} missing from the initramfs"))
    };
    assert_eq!(get("init").mode, mode::S_IFREG | 0o755);
    assert_eq!(get("bin/busybox").mode, mode::S_IFREG | 0o755);
    assert_eq!(get("bin/sh").kind(), mode::S_IFLNK);
    assert_eq!(get("bin/sh").data, b"busybox");
    assert!(!entries
        .iter()
        .any(|e| e.name == "bin/init" || e.name == "bin/linuxrc"));
    assert_eq!(get("dev/console").kind(), mode::S_IFCHR);
    assert_eq!(get("dev/console").rdev, (5, 1));
    assert_eq!(get("dev/null").rdev, (1, 3));
    for d in [
        "proc",
        "sys",
        "run",
        "tmp",
        "mnt/lower",
        "mnt/rw",
        "newroot",
        "root",
        "usr/bin",
        "usr/sbin",
        "sbin",
    ] {
        assert_eq!(get(d).kind(), mode::S_IFDIR, "{d}");
    }
    assert!(entries.iter().all(|e| e.mtime == 0));
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "entries are sorted");

    let list =
        String::from_utf8(get(MODULES_LIST_PATH.trim_start_matches('/')).data.clone()).unwrap();
    let order: Vec<String> = list
        .lines()
        .map(|l| {
            let prefix = format!("/lib/modules/{release}/");
            let name = l.strip_prefix(&prefix).and_then(|n| n.strip_suffix(".ko"));
            let name = name.unwrap_or_else(|| panic!("bad module line {l}"));
            let entry = get(l.trim_start_matches('/'));
            assert_eq!(&entry.data[..4], b"\x7fELF", "{l}");
            name.to_string()
        })
        .collect();
    let pos = |n: &str| {
        order
            .iter()
            .position(|m| m == n)
            .unwrap_or_else(|| panic!("{n} not in {order:?}"))
    };
    for root in polydev_image::DEFAULT_MODULES {
        pos(root);
    }
    assert!(pos("virtio") < pos("virtio_mmio"));
    assert!(pos("virtio_ring") < pos("virtio_mmio"));
    assert!(pos("virtio_mmio") < pos("vmw_vsock_virtio_transport"));
    assert!(pos("vsock") < pos("vmw_vsock_virtio_transport_common"));
    assert!(pos("vmw_vsock_virtio_transport_common") < pos("vmw_vsock_virtio_transport"));
    assert!(pos("libcrc32c") < pos("erofs"));
    assert!(pos("virtio_ring") < pos("virtio_console"));

    let info: serde_json::Value =
        serde_json::from_slice(&get("etc/polydev/initramfs.json").data).unwrap();
    assert_eq!(info["kernel_release"], release);
    assert_eq!(info["modules"].as_array().unwrap().len(), order.len());
}

/// With apt broken, the newest cached kernel is used, with a warning.
fn offline_fallback(cache: &Cache, kernel: &polydev_image::KernelArtifact, tmp: &Path) {
    let bin = tmp.join("fake-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fake = bin.join("apt-cache");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'E: No packages found' >&2\nexit 100\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let old_path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![bin.clone()];
    paths.extend(std::env::split_paths(&old_path));
    // This binary has a single test, so no other thread reads PATH meanwhile.
    std::env::set_var("PATH", std::env::join_paths(paths).unwrap());
    let log = Log::new();
    let got = ensure_kernel(cache, &|l| log.say(l));
    let busybox = ensure_busybox(cache, &|l| log.say(l));
    std::env::set_var("PATH", &old_path);
    assert_eq!(got.unwrap(), *kernel);
    assert!(busybox.is_ok());
    let lines = log.take();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("warning") && l.contains("apt-get update")),
        "{lines:?}"
    );

    let empty = Cache::new(tmp.join("empty-cache"));
    let mut paths = vec![bin];
    paths.extend(std::env::split_paths(&old_path));
    std::env::set_var("PATH", std::env::join_paths(paths).unwrap());
    let err = ensure_kernel(&empty, &|_| {});
    std::env::set_var("PATH", &old_path);
    let err = err.unwrap_err().to_string();
    assert!(err.contains("run `apt-get update` first"), "{err}");
}

fn tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

/// Boots the kernel with the initramfs plus a second archive holding an rcS
/// that loads every listed module the way the agent will, then reboots.
/// busybox is `/init` here, so busybox init runs `/etc/init.d/rcS`.
fn boot(vmlinux: &Path, initrd: &Path, tmp: &Path) {
    let qemu = "qemu-system-x86_64";
    let bios = Path::new("/usr/share/qemu/qboot.rom");
    assert!(
        Command::new(qemu).arg("--version").output().is_ok() && bios.is_file(),
        "{qemu} or qboot.rom is not installed: run `./polydev.sh setup`"
    );
    let rcs = "#!/bin/sh\n\
        mount -t proc proc /proc\n\
        mount -t sysfs sys /sys\n\
        while read m; do insmod \"$m\" || echo \"POLYDEV-INSMOD-FAIL $m\"; done < /etc/polydev/modules\n\
        echo \"POLYDEV-LOADED $(wc -l < /proc/modules) $(wc -l < /etc/polydev/modules)\"\n\
        echo \"POLYDEV-PORTS $(cat /sys/class/virtio-ports/*/name)\"\n\
        echo \"POLYDEV-RNG $(cat /sys/class/misc/hw_random/rng_available)\"\n\
        echo POLYDEV-BOOT-OK\n\
        reboot -f\n";
    let mut extra = CpioBuilder::new();
    extra.bytes("/etc/init.d/rcS", 0o755, rcs);
    let mut boot_cpio = std::fs::read(initrd).unwrap();
    // The kernel unpacks concatenated archives in order.
    extra.write_to(&mut boot_cpio).unwrap();
    let boot_path = tmp.join("boot.cpio");
    std::fs::write(&boot_path, boot_cpio).unwrap();
    let serial = tmp.join("serial.log");

    let mut append = "console=ttyS0 reboot=t panic=-1 quiet".to_string();
    if let Some(khz) = tsc_khz() {
        append.push_str(&format!(" tsc_early_khz={khz}"));
    }
    let t = Instant::now();
    let mut child = Command::new(qemu)
        .args([
            "-M",
            "microvm,acpi=on,pit=off,pic=off,rtc=on",
            "-cpu",
            "max",
            "-m",
            "256M",
            "-smp",
            "1",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-accel",
            "tcg",
        ])
        .arg("-bios")
        .arg(bios)
        .arg("-kernel")
        .arg(vmlinux)
        .arg("-initrd")
        .arg(&boot_path)
        .args(["-append", &append])
        // Devices the modules drive, found over virtio-mmio via ACPI.
        .args(["-chardev", "null,id=mux", "-device", "virtio-serial-device"])
        .args(["-device", "virtserialport,chardev=mux,name=polydev.mux"])
        .args(["-device", "virtio-rng-device"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Duration::from_secs(240);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if t.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = std::fs::read_to_string(&serial).unwrap_or_default();
    eprintln!("boot to rcS done in {:.2?}", t.elapsed());
    assert!(
        status.is_some(),
        "guest did not finish within {deadline:?}:\n{out}"
    );
    assert!(
        out.contains("POLYDEV-BOOT-OK"),
        "no boot marker in serial output:\n{out}"
    );
    assert!(
        !out.contains("POLYDEV-INSMOD-FAIL"),
        "a module failed to load:\n{out}"
    );
    assert!(
        out.contains("POLYDEV-PORTS polydev.mux"),
        "virtio_console did not bind:\n{out}"
    );
    assert!(
        out.contains("POLYDEV-RNG virtio_rng"),
        "virtio_rng did not bind:\n{out}"
    );
    let loaded = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("POLYDEV-LOADED "))
        .unwrap_or_else(|| panic!("no module count:\n{out}"));
    let nums: Vec<&str> = loaded.split_whitespace().collect();
    assert_eq!(nums.len(), 2, "{loaded}");
    assert_eq!(
        nums[0], nums[1],
        "every listed module is in /proc/modules:\n{out}"
    );
}
