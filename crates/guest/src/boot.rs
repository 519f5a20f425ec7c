//! PID 1 duties: early mounts, console, kernel modules, loopback, and the
//! switch from the initramfs into the VM's root filesystem.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use std::time::{Duration, Instant};

use crate::logger;

/// How long to wait for a block device to appear.
pub const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the boot sequence.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A mount failed.
    #[error("cannot mount {what} on {target}: {source}")]
    Mount {
        /// What was mounted.
        what: String,
        /// Where.
        target: String,
        /// The OS error.
        source: io::Error,
    },
    /// A block device never appeared.
    #[error("block device {0} did not appear within {secs}s; check the VM's disk configuration and that virtio_blk is in /etc/polydev/modules", secs = DEVICE_TIMEOUT.as_secs())]
    NoDevice(String),
    /// No filesystem type could mount the root device.
    #[error("cannot mount root device {dev} as any of {types}: {errors}; check polydev.rootfstype and that the filesystem module is in /etc/polydev/modules")]
    RootMount {
        /// The device.
        dev: String,
        /// Types tried.
        types: String,
        /// Why each failed.
        errors: String,
    },
    /// A value on the kernel command line is invalid.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// A step of switch_root failed.
    #[error("switch_root: {what}: {source}")]
    Switch {
        /// Which step.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

fn cstr(s: &str) -> CString {
    // Our own literal paths never contain NUL; fall back to an empty string
    // (which the syscall rejects) rather than panicking.
    CString::new(s).unwrap_or_default()
}

/// `mount(2)`; `EBUSY` on an already-mounted target counts as success when
/// `busy_ok` (the kernel may have mounted devtmpfs itself).
fn mount(
    src: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let (s, t) = (cstr(src), cstr(target));
    let f = fstype.map(cstr);
    let d = data.map(cstr);
    // SAFETY: all pointers are valid NUL-terminated strings or null.
    let r = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            f.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            d.as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast::<libc::c_void>()),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mount the pseudo filesystems every Linux userspace expects.
pub fn mount_early() {
    let nosuid = libc::MS_NOSUID;
    let table: &[(&str, &str, &str, libc::c_ulong, Option<&str>)] = &[
        (
            "proc",
            "/proc",
            "proc",
            nosuid | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            nosuid | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        ),
        ("devtmpfs", "/dev", "devtmpfs", nosuid, Some("mode=0755")),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            nosuid | libc::MS_NOEXEC,
            Some("gid=5,mode=0620,ptmxmode=0666"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            nosuid | libc::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            nosuid | libc::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            nosuid | libc::MS_NODEV,
            Some("mode=1777"),
        ),
    ];
    for (src, target, fstype, flags, data) in table {
        let _ = std::fs::create_dir_all(target);
        match mount(src, target, Some(fstype), *flags, *data) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => logger::error(format!("cannot mount {fstype} on {target}: {e}")),
        }
    }
    // udev normally makes these; shells and tools (bash process
    // substitution) need them.
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(to, link);
    }
}

/// Point stdin at /dev/null and stdout/stderr at /dev/console. The kernel
/// may have started us without fds 0-2 (no /dev/console in the
/// initramfs), so every target fd is set explicitly.
pub fn open_console() {
    let null = File::options().read(true).write(true).open("/dev/null");
    let console = File::options().read(true).write(true).open("/dev/console");
    // SAFETY: dup2 onto the standard fds; the source fds stay valid until
    // the Files drop.
    unsafe {
        if let Ok(n) = &null {
            libc::dup2(n.as_raw_fd(), 0);
        }
        if let Ok(c) = &console {
            libc::dup2(c.as_raw_fd(), 1);
            libc::dup2(c.as_raw_fd(), 2);
        }
    }
    // Dropping the Files closes their fds; if one of them landed on 0-2
    // (because those were closed), that close would undo the dup2, so leak
    // such a File instead.
    for f in [null, console].into_iter().flatten() {
        if f.as_raw_fd() <= 2 {
            std::mem::forget(f);
        }
    }
}

/// Module paths from the text of `/etc/polydev/modules`: one absolute path
/// per line; blank lines and `#` comments are skipped.
pub fn parse_module_list(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// Load every module listed in `list_path`, in order, with
/// `finit_module`. Failures are logged and the rest still load.
pub fn load_modules(list_path: &str) {
    let text = match std::fs::read_to_string(list_path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            logger::error(format!(
                "cannot read {list_path}: {e}; no kernel modules loaded"
            ));
            return;
        }
    };
    for path in parse_module_list(&text) {
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) => {
                logger::error(format!("module {path}: cannot open: {e}"));
                continue;
            }
        };
        let params = cstr("");
        // SAFETY: finit_module(fd, params, flags) with a valid fd and string.
        let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                logger::error(format!(
                    "module {path}: finit_module failed: {e} (errno {}); for ENOENT/unknown symbol check the module order",
                    e.raw_os_error().unwrap_or(0)
                ));
            }
        }
    }
}

/// Bring up `lo`: there is no other interface, but everything inside the VM
/// (the egress proxy, Chromium's OAuth callbacks, forwards to
/// 127.0.0.1) lives on loopback, and nobody else configures it.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket syscall; the fd is wrapped right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned only here.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: ifr is a valid ifreq for these ioctls.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            return Err(io::Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The writable layer of the root overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Overlay {
    /// In memory; gone with the VM.
    Tmpfs,
    /// An ext4 block device (a persistent per-VM disk).
    Disk(String),
}

/// Root filesystem settings from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootConfig {
    /// Block device of the read-only base.
    pub device: String,
    /// Filesystem types to try, in order.
    pub fstypes: Vec<String>,
    /// The writable layer.
    pub overlay: Overlay,
}

/// Split a kernel command line into words, honouring double quotes.
fn cmdline_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(cur);
    }
    words
}

/// Parse `polydev.root=`, `polydev.rootfstype=` and `polydev.overlay=`
/// from `/proc/cmdline` text. `Ok(None)`: stay in the initramfs.
pub fn parse_cmdline(s: &str) -> Result<Option<RootConfig>, BootError> {
    let mut root = None;
    let mut fstype = None;
    let mut overlay = None;
    for w in cmdline_words(s) {
        if let Some(v) = w.strip_prefix("polydev.root=") {
            root = Some(v.to_string());
        } else if let Some(v) = w.strip_prefix("polydev.rootfstype=") {
            fstype = Some(v.to_string());
        } else if let Some(v) = w.strip_prefix("polydev.overlay=") {
            overlay = Some(v.to_string());
        }
    }
    let Some(device) = root.filter(|r| !r.is_empty()) else {
        return Ok(None);
    };
    if !device.starts_with("/dev/") {
        return Err(BootError::Cmdline(format!(
            "polydev.root={device} must be a /dev path such as /dev/vda"
        )));
    }
    let fstypes = match fstype.as_deref() {
        None | Some("") => vec!["erofs".into(), "squashfs".into(), "ext4".into()],
        Some(t @ ("erofs" | "squashfs" | "ext4")) => vec![t.to_string()],
        Some(t) => {
            return Err(BootError::Cmdline(format!(
                "polydev.rootfstype={t} is not one of erofs, squashfs, ext4"
            )))
        }
    };
    let overlay = match overlay.as_deref() {
        None | Some("") | Some("tmpfs") => Overlay::Tmpfs,
        Some(d) if d.starts_with("/dev/") => Overlay::Disk(d.to_string()),
        Some(o) => {
            return Err(BootError::Cmdline(format!(
                "polydev.overlay={o} must be `tmpfs` or a /dev path such as /dev/vdb"
            )))
        }
    };
    Ok(Some(RootConfig {
        device,
        fstypes,
        overlay,
    }))
}

/// How the agent reaches the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// AF_VSOCK (Firecracker, QEMU with vhost-user-vsock).
    Vsock,
    /// The `polydev-mux` protocol over this virtio-serial port device.
    Mux(std::path::PathBuf),
}

/// What `polydev.transport=` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportChoice {
    /// Mux if the VM has a `polydev.mux` port, else vsock.
    Auto,
    /// Always vsock.
    Vsock,
    /// Always the mux.
    Mux,
}

/// `polydev.transport=` from the command line (`auto` when absent).
pub fn parse_transport(cmdline: &str) -> Result<TransportChoice, BootError> {
    let mut choice = TransportChoice::Auto;
    for w in cmdline_words(cmdline) {
        if let Some(v) = w.strip_prefix("polydev.transport=") {
            choice = match v {
                "auto" | "" => TransportChoice::Auto,
                "vsock" => TransportChoice::Vsock,
                "mux" => TransportChoice::Mux,
                other => {
                    return Err(BootError::Cmdline(format!(
                        "polydev.transport={other} is not one of auto, vsock, mux"
                    )))
                }
            };
        }
    }
    Ok(choice)
}

/// Virtio device id of a console (virtio-serial) device.
const VIRTIO_ID_CONSOLE: u32 = 3;

fn has_virtio_device(id: u32) -> bool {
    let Ok(dir) = std::fs::read_dir("/sys/bus/virtio/devices") else {
        return false;
    };
    dir.flatten().any(|e| {
        std::fs::read_to_string(e.path().join("device"))
            .ok()
            .and_then(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
            == Some(id)
    })
}

/// Decide how to reach the host. Port names arrive from the host shortly
/// after virtio_console loads, so a VM that has a virtio-serial device is
/// given a few seconds for its `polydev.mux` port to show up.
pub fn choose_transport(choice: TransportChoice) -> Transport {
    let wait = match choice {
        TransportChoice::Vsock => return Transport::Vsock,
        TransportChoice::Mux => DEVICE_TIMEOUT,
        TransportChoice::Auto if has_virtio_device(VIRTIO_ID_CONSOLE) => Duration::from_secs(5),
        TransportChoice::Auto => return Transport::Vsock,
    };
    let start = Instant::now();
    loop {
        if let Ok(dev) = polydev_mux::find_virtio_port(polydev_mux::PORT_NAME) {
            if dev.exists() {
                return Transport::Mux(dev);
            }
        }
        if start.elapsed() >= wait {
            logger::warn(format!(
                "no virtio-serial port named {} after {}s; using vsock (is virtio_console in /etc/polydev/modules?)",
                polydev_mux::PORT_NAME,
                wait.as_secs()
            ));
            return Transport::Vsock;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_device(dev: &str) -> Result<(), BootError> {
    let start = Instant::now();
    loop {
        if File::open(dev).is_ok() {
            return Ok(());
        }
        if start.elapsed() >= DEVICE_TIMEOUT {
            return Err(BootError::NoDevice(dev.to_string()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mkdir(p: &str) -> Result<(), BootError> {
    std::fs::create_dir_all(p).map_err(|source| BootError::Switch {
        what: "mkdir",
        source,
    })
}

/// Mount the root overlay at /newroot and switch into it. On an error
/// before the point of no return the agent stays in the initramfs.
pub fn switch_root(cfg: &RootConfig) -> Result<(), BootError> {
    wait_for_device(&cfg.device)?;
    mkdir("/mnt/lower")?;
    let mut errors = Vec::new();
    let mut mounted = false;
    for t in &cfg.fstypes {
        match mount(&cfg.device, "/mnt/lower", Some(t), libc::MS_RDONLY, None) {
            Ok(()) => {
                logger::info(format!("mounted {} ({t}) read-only", cfg.device));
                mounted = true;
                break;
            }
            Err(e) => errors.push(format!("{t}: {e}")),
        }
    }
    if !mounted {
        return Err(BootError::RootMount {
            dev: cfg.device.clone(),
            types: cfg.fstypes.join(", "),
            errors: errors.join("; "),
        });
    }
    mkdir("/mnt/rw")?;
    let m = |what: &str, target: &str, r: io::Result<()>| {
        r.map_err(|source| BootError::Mount {
            what: what.to_string(),
            target: target.to_string(),
            source,
        })
    };
    match &cfg.overlay {
        Overlay::Tmpfs => m(
            "tmpfs",
            "/mnt/rw",
            mount("tmpfs", "/mnt/rw", Some("tmpfs"), 0, Some("mode=0755")),
        )?,
        Overlay::Disk(dev) => {
            wait_for_device(dev)?;
            m(dev, "/mnt/rw", mount(dev, "/mnt/rw", Some("ext4"), 0, None))?;
        }
    }
    mkdir("/mnt/rw/upper")?;
    mkdir("/mnt/rw/work")?;
    mkdir("/newroot")?;
    m(
        "overlay",
        "/newroot",
        mount(
            "overlay",
            "/newroot",
            Some("overlay"),
            0,
            Some("lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work"),
        ),
    )?;
    for dir in ["/proc", "/sys", "/dev", "/run", "/tmp"] {
        let target = format!("/newroot{dir}");
        mkdir(&target)?;
        m(dir, &target, mount(dir, &target, None, libc::MS_MOVE, None))?;
    }
    // What busybox switch_root does; pivot_root is impossible from the
    // initramfs (rootfs cannot be unmounted).
    std::env::set_current_dir("/newroot").map_err(|source| BootError::Switch {
        what: "chdir /newroot",
        source,
    })?;
    m("/newroot", "/", mount(".", "/", None, libc::MS_MOVE, None))?;
    let dot = cstr(".");
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::chroot(dot.as_ptr()) } < 0 {
        return Err(BootError::Switch {
            what: "chroot .",
            source: io::Error::last_os_error(),
        });
    }
    std::env::set_current_dir("/").map_err(|source| BootError::Switch {
        what: "chdir /",
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_root_means_initramfs() {
        assert_eq!(parse_cmdline("console=ttyS0 quiet").ok(), Some(None));
        assert_eq!(parse_cmdline("").ok(), Some(None));
    }

    #[test]
    fn root_defaults() {
        let c = parse_cmdline("console=ttyS0 polydev.root=/dev/vda reboot=t\n")
            .ok()
            .flatten();
        assert_eq!(
            c,
            Some(RootConfig {
                device: "/dev/vda".into(),
                fstypes: vec!["erofs".into(), "squashfs".into(), "ext4".into()],
                overlay: Overlay::Tmpfs,
            })
        );
    }

    #[test]
    fn root_with_type_and_disk_overlay() {
        let c = parse_cmdline(
            "polydev.root=/dev/vda polydev.rootfstype=squashfs polydev.overlay=/dev/vdb",
        )
        .ok()
        .flatten();
        assert_eq!(
            c.as_ref().map(|c| c.fstypes.clone()),
            Some(vec!["squashfs".to_string()])
        );
        assert_eq!(c.map(|c| c.overlay), Some(Overlay::Disk("/dev/vdb".into())));
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(parse_cmdline("polydev.root=vda").is_err());
        assert!(parse_cmdline("polydev.root=/dev/vda polydev.rootfstype=xfs").is_err());
        assert!(parse_cmdline("polydev.root=/dev/vda polydev.overlay=disk").is_err());
    }

    #[test]
    fn quotes_group_words() {
        assert_eq!(
            cmdline_words(r#"a "b c" d="e f"  g"#),
            vec!["a", "b c", "d=e f", "g"]
        );
    }

    #[test]
    fn transport_param() {
        assert_eq!(parse_transport("quiet").ok(), Some(TransportChoice::Auto));
        assert_eq!(
            parse_transport("polydev.transport=mux").ok(),
            Some(TransportChoice::Mux)
        );
        assert_eq!(
            parse_transport("polydev.transport=vsock").ok(),
            Some(TransportChoice::Vsock)
        );
        assert!(parse_transport("polydev.transport=tcp").is_err());
    }

    #[test]
    fn module_list() {
        let t = "# deps first\n/lib/a.ko\n\n  /lib/b.ko  \n";
        assert_eq!(parse_module_list(t), vec!["/lib/a.ko", "/lib/b.ko"]);
    }
}
