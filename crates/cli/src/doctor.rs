//! `polydev doctor`: what works on this machine, one line per check, with
//! the fix for each failure. The accelerator is chosen by a real boot, not by
//! the mere existence of `/dev/kvm` (on kvm_pvm hosts it exists and stock
//! guest kernels still cannot run).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use polydev_api::vm::{Accel, VmSpec};
use polydev_host::{HostConfig, Manager};
use sha2::{Digest, Sha256};

use crate::artifacts;

/// Options of `polydev doctor`.
#[derive(Args, Clone, Debug)]
pub struct DoctorArgs {
    /// Skip the boot probes (fast, but cannot tell whether VMs really run).
    #[arg(long)]
    pub no_boot: bool,
}

struct Report {
    failures: usize,
}

impl Report {
    fn ok(&self, what: &str, detail: impl AsRef<str>) {
        println!("ok    {what:<20} {}", detail.as_ref());
    }
    fn warn(&self, what: &str, detail: impl AsRef<str>) {
        println!("warn  {what:<20} {}", detail.as_ref());
    }
    fn fail(&mut self, what: &str, detail: impl AsRef<str>, fix: &str) {
        self.failures += 1;
        println!("FAIL  {what:<20} {} — fix: {fix}", detail.as_ref());
    }
}

fn version_of(bin: &Path, arg: &str) -> Option<String> {
    let out = std::process::Command::new(bin).arg(arg).output().ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines().next().map(|l| l.trim().to_string())
}

pub async fn run(data_dir: PathBuf, a: DoctorArgs) -> anyhow::Result<i32> {
    let mut r = Report { failures: 0 };
    let probe_cfg = HostConfig::with_defaults(data_dir.clone(), PathBuf::new(), PathBuf::new());

    match version_of(&probe_cfg.qemu_bin, "--version") {
        Some(v) if v.contains("QEMU") => r.ok("qemu", v),
        _ => r.fail(
            "qemu",
            "qemu-system-x86_64 not found",
            "./polydev.sh setup (apt-get install qemu-system-x86 from bookworm-backports)",
        ),
    }
    match polydev_host::hypervisor::qemu::users(&probe_cfg) {
        Some(base) => r.ok(
            "qemu users",
            format!("each VM's QEMU runs as a user of its own (uid {base} and up)"),
        ),
        None => r.warn(
            "qemu users",
            "QEMU VMs run as root (needs a root host agent and QEMU 9 or later with -run-with)",
        ),
    }
    if probe_cfg.qboot.is_file() {
        r.ok("qboot", probe_cfg.qboot.display().to_string());
    } else {
        r.fail(
            "qboot",
            "qboot.rom missing",
            "apt-get install qemu-system-data",
        );
    }
    match version_of(&probe_cfg.vhost_vsock_bin, "--version") {
        Some(v) => r.ok("vhost-device-vsock", v),
        None => r.fail(
            "vhost-device-vsock",
            "not found",
            "cargo install vhost-device-vsock --version 0.3.0 --locked",
        ),
    }
    match &probe_cfg.firecracker_bin {
        Some(fc) => match version_of(fc, "--version") {
            Some(v) => r.ok("firecracker", v),
            None => r.warn("firecracker", format!("{} does not run", fc.display())),
        },
        None => r.warn(
            "firecracker",
            "not installed (optional; set FIRECRACKER_BIN to use it)",
        ),
    }
    if polydev_host::config::find_in_path("mkfs.ext4").is_some()
        || Path::new("/sbin/mkfs.ext4").exists()
    {
        r.ok("mkfs.ext4", "found");
    } else {
        r.fail(
            "mkfs.ext4",
            "not found (needed for data disks)",
            "apt-get install e2fsprogs",
        );
    }
    let kvm = kvm_usable();
    match &kvm {
        Ok(()) => r.ok("/dev/kvm", "present and accessible"),
        Err(e) => r.warn(
            "/dev/kvm",
            format!("{e} (VMs will use TCG software emulation)"),
        ),
    }
    // Detection with the host agent's defaults: what `polydev host` would get.
    match polydev_host::cgroup::Cgroups::detect(polydev_host::cgroup::CgroupMode::Auto, None) {
        Ok(c) if c.available() => r.ok("vm cgroups", c.describe()),
        Ok(c) => r.warn(
            "vm cgroups",
            format!(
                "{} — VMs would run without memory/CPU/pids limits; run the host agent \
                 with systemd's Delegate=yes (deploy/systemd) or --cgroup-parent",
                c.describe()
            ),
        ),
        Err(e) => r.warn("vm cgroups", e.to_string()),
    }
    match free_space(&data_dir) {
        Some(free) if free >= 2 << 30 => r.ok(
            "disk space",
            format!("{} GiB free in {}", free >> 30, data_dir.display()),
        ),
        Some(free) => r.fail(
            "disk space",
            format!("only {} MiB free in {}", free >> 20, data_dir.display()),
            "free space or choose another --data-dir",
        ),
        None => r.warn(
            "disk space",
            format!(
                "cannot stat {} (it is created on first start)",
                data_dir.display()
            ),
        ),
    }
    let agent = artifacts::guest_agent_path();
    match &agent {
        Ok(p) => r.ok("guest agent", p.display().to_string()),
        Err(e) => r.fail("guest agent", e.to_string(), "./polydev.sh setup"),
    }
    let files = if agent.is_ok() {
        match artifacts::ensure_boot_files(false).await {
            Ok(f) => {
                r.ok("kernel", format!("{} ({})", f.kernel.display(), f.release));
                r.ok("initramfs", f.initramfs.display().to_string());
                Some(f)
            }
            Err(e) => {
                r.fail(
                    "kernel/initramfs",
                    format!("{e:#}"),
                    "apt-get update, then `polydev image kernel`",
                );
                None
            }
        }
    } else {
        None
    };
    if let (Some(f), false) = (files, a.no_boot) {
        let cfg = HostConfig::with_defaults(data_dir.clone(), f.kernel, f.initramfs);
        let mut chosen = Accel::Tcg;
        if kvm.is_ok() {
            match boot_probe(&cfg, Accel::Kvm).await {
                Ok(ms) => {
                    r.ok("boot under kvm", format!("agent ready in {ms} ms"));
                    chosen = Accel::Kvm;
                }
                Err(e) => r.warn("boot under kvm", format!("failed: {e}")),
            }
        }
        if chosen == Accel::Tcg {
            match boot_probe(&cfg, Accel::Tcg).await {
                Ok(ms) => r.ok("boot under tcg", format!("agent ready in {ms} ms")),
                Err(e) => r.fail(
                    "boot under tcg",
                    format!("failed: {e}"),
                    "see the logs named in the message",
                ),
            }
        }
        let _ = save_choice(&cfg, chosen);
        println!();
        println!(
            ">>> accelerator: {} <<<",
            match chosen {
                Accel::Kvm => "KVM (hardware virtualization)",
                Accel::Tcg => "TCG (software emulation: slower CPU, everything else the same)",
            }
        );
    }
    println!();
    if r.failures == 0 {
        println!("all checks passed");
        Ok(0)
    } else {
        println!("{} check(s) failed; apply the fixes above", r.failures);
        Ok(1)
    }
}

fn kvm_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))
}

fn free_space(p: &Path) -> Option<u64> {
    let mut dir = p.to_path_buf();
    while !dir.exists() {
        dir = dir.parent()?.to_path_buf();
    }
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs fills the struct we pass; the path is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

/// Boot the minimal guest under `accel` in a throw-away data directory and
/// return the time to agent-ready.
pub async fn boot_probe(cfg: &HostConfig, accel: Accel) -> Result<u64, String> {
    let tmp = tempfile::Builder::new()
        .prefix("pdprobe")
        .tempdir_in("/tmp")
        .map_err(|e| e.to_string())?;
    let mut c = cfg.clone();
    c.data_dir = tmp.path().to_path_buf();
    c.accel = accel;
    // Under working KVM the minimal guest is ready in well under a second;
    // where KVM cannot run it (kvm_pvm) it never becomes ready.
    c.boot_timeout = Duration::from_secs(if accel == Accel::Kvm { 15 } else { 60 });
    let mgr = Manager::start(c).await.map_err(|e| e.to_string())?;
    let t = Instant::now();
    let result = mgr.create(&VmSpec::default()).await;
    let ms = t.elapsed().as_millis() as u64;
    match result {
        Ok(vm) => {
            let _ = mgr.destroy(&vm.id).await;
            Ok(ms)
        }
        Err(e) => Err(e.to_string()),
    }
}

fn choice_path() -> PathBuf {
    polydev_image::Cache::default_root()
        .unwrap_or_else(|_| std::env::temp_dir().join("polydev"))
        .join("accel.json")
}

fn choice_key(cfg: &HostConfig) -> String {
    let mut h = Sha256::new();
    // Whether KVM boots guests is a property of the host, the kernel and
    // QEMU; a new guest agent (initramfs) does not change it.
    for p in [&cfg.kernel, &cfg.qemu_bin] {
        h.update(p.as_os_str().as_encoded_bytes());
        if let Ok(m) = std::fs::metadata(p) {
            h.update(m.len().to_le_bytes());
            if let Ok(t) = m.modified() {
                h.update(format!("{t:?}").as_bytes());
            }
        }
    }
    h.update([u8::from(Path::new("/dev/kvm").exists())]);
    hex::encode(h.finalize())
}

fn save_choice(cfg: &HostConfig, accel: Accel) -> std::io::Result<()> {
    let p = choice_path();
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    let v = serde_json::json!({ "key": choice_key(cfg), "accel": accel });
    std::fs::write(p, v.to_string())
}

/// The accelerator for this host: a cached probe result while nothing it
/// depends on changed, otherwise a real KVM boot probe (TCG when it fails).
pub async fn choose_accel(cfg: &HostConfig, verbose: bool) -> Accel {
    if kvm_usable().is_err() {
        return Accel::Tcg;
    }
    let key = choice_key(cfg);
    if let Ok(text) = std::fs::read_to_string(choice_path()) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            if v.get("key").and_then(|k| k.as_str()) == Some(key.as_str()) {
                if let Some(a) = v
                    .get("accel")
                    .and_then(|a| serde_json::from_value::<Accel>(a.clone()).ok())
                {
                    return a;
                }
            }
        }
    }
    eprintln!("probing KVM with a real boot (once; the result is cached)…");
    let accel = match boot_probe(cfg, Accel::Kvm).await {
        Ok(_) => Accel::Kvm,
        Err(e) => {
            if verbose {
                eprintln!("KVM boot failed ({e}); using TCG");
            }
            eprintln!("!!! KVM does not boot guests here: using TCG software emulation !!!");
            Accel::Tcg
        }
    };
    let _ = save_choice(cfg, accel);
    accel
}
