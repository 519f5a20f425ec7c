//! A minimal PID 1 for the real-QEMU test (`tests/qemu.rs`): loads the
//! virtio modules from `/m`, opens the `polydev.mux` virtio-serial port and
//! serves, over the mux:
//!
//! - port 1024: echo (copies until EOF, then half-closes);
//! - port 1026: on each connection, opens a guest-initiated stream to host
//!   port 1025, sends `hello from guest\n`, and relays the host's answer back.
//!
//! Built statically (`-C target-feature=+crt-static`) so it runs alone in an
//! initramfs. Not part of the library.

use std::io::{self, Read, Write};
use std::thread;
use std::time::Duration;

use polydev_mux::{find_virtio_port, MuxEndpoint, PORT_NAME};

fn log(msg: &str) {
    // The console is the serial port; stderr may not be set up, so write to
    // /dev/console directly and ignore failures.
    if let Ok(mut c) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
        let _ = writeln!(c, "mux-guest: {msg}");
    }
}

fn mount(src: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| std::ffi::CString::new(s).unwrap_or_default();
    let (src, target, fstype) = (c(src), c(target), c(fstype));
    // SAFETY: valid NUL-terminated strings; failure is tolerated (already mounted).
    unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        );
    }
}

fn insmod(path: &str) {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(path) else {
        log(&format!("no module {path}"));
        return;
    };
    let empty = c"";
    // SAFETY: finit_module with an open module file and empty params.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), empty.as_ptr(), 0) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            log(&format!("insmod {path}: {e}"));
        }
    }
}

fn main() {
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    mount("devtmpfs", "/dev", "devtmpfs");
    for m in ["virtio_ring", "virtio", "virtio_mmio", "virtio_console"] {
        insmod(&format!("/m/{m}.ko"));
    }
    let dev = loop {
        match find_virtio_port(PORT_NAME) {
            Ok(d) if d.exists() => break d,
            _ => thread::sleep(Duration::from_millis(50)),
        }
    };
    log(&format!("port {}", dev.display()));
    let ep = match MuxEndpoint::guest(&dev) {
        Ok(ep) => ep,
        Err(e) => {
            log(&format!("cannot start: {e}"));
            loop {
                thread::sleep(Duration::from_secs(3600));
            }
        }
    };
    let echo = ep.listen(1024);
    let relay = ep.listen(1026);
    let (Ok(echo), Ok(relay)) = (echo, relay) else {
        log("cannot listen");
        return;
    };
    log("READY");
    let ep2 = ep.clone();
    thread::spawn(move || {
        while let Ok(s) = relay.accept() {
            let ep = ep2.clone();
            thread::spawn(move || {
                let Ok(out) = ep.connect(1025) else {
                    let _ = (&s).write_all(b"connect to host 1025 failed\n");
                    return;
                };
                let _ = (&out).write_all(b"hello from guest\n");
                let _ = out.shutdown_write();
                let mut answer = Vec::new();
                let _ = (&out).read_to_end(&mut answer);
                let _ = (&s).write_all(&answer);
            });
        }
    });
    while let Ok(s) = echo.accept() {
        thread::spawn(move || {
            let Ok(mut r) = s.try_clone() else { return };
            let mut w = s;
            let _ = io::copy(&mut r, &mut w);
            let _ = w.shutdown_write();
        });
    }
    log("endpoint closed");
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}
