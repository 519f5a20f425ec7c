//! The host-side bridge: turns QEMU's virtio-serial chardev socket into a
//! Firecracker-style hybrid vsock Unix socket, so the rest of the host code
//! has one vsock code path for both hypervisors.
//!
//! - Host-initiated: a client connects to `uds_path` and writes
//!   `CONNECT <port>\n`; the bridge opens a mux stream to the guest's `port`
//!   and answers `OK <local port>\n`, then splices bytes. A refused or
//!   unanswered open, or a malformed request line, closes the connection
//!   without a reply, as Firecracker does.
//! - Guest-initiated: an OPEN to `port` is connected to the Unix socket
//!   `<uds_path>_<port>`; if nothing listens there the open is refused.
//!
//! The bridge exits when the VM is gone: the chardev socket cannot be
//! connected for [`BridgeOptions::gone_after`] after a link was lost (or for
//! [`BridgeOptions::startup_timeout`] before the first one), or the process
//! in [`BridgeOptions::watch_pid`] (QEMU) has exited. It also stops on
//! [`BridgeOptions::stop`] and, if asked to, on SIGTERM/SIGINT/SIGHUP. It
//! removes its own `uds_path` on every exit path that returns.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::endpoint::{EndpointConfig, Incoming, MuxEndpoint, MuxStream};
use crate::error::MuxError;
use crate::link::{Link, LinkSource, StopSignal};
use crate::sys::{pid_alive, poll_one};

/// Longest `CONNECT <port>\n` line accepted, as in Firecracker.
const MAX_CONNECT_LINE: usize = 32;

/// Firecracker numbers host-side ends of host-initiated connections from
/// 2^30 upwards and reports the number in `OK <n>`; we do the same so that
/// clients that parse it see familiar values.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Settings of [`run_bridge_with`].
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    /// Exit as soon as this process has exited: the VM's QEMU, or the
    /// parent that spawned the bridge (checked every 200 ms). Without it, the
    /// bridge relies on the chardev socket disappearing, which also lets one
    /// bridge follow a VM across a restore into a new QEMU process at the
    /// same socket path.
    pub watch_pid: Option<i32>,
    /// How long to wait for the chardev socket to accept a first connection.
    pub startup_timeout: Duration,
    /// After a link is lost, how long the chardev socket may stay
    /// unconnectable (missing, or refusing because QEMU died) before the VM
    /// counts as gone.
    pub gone_after: Duration,
    /// Set to `true` to make the bridge exit.
    pub stop: Option<Arc<AtomicBool>>,
    /// Install handlers for SIGTERM, SIGINT and SIGHUP that make the bridge
    /// exit cleanly (removing its socket). Meant for the `polydev
    /// vsock-bridge` process; leave off when embedding the bridge.
    pub handle_signals: bool,
    /// How long a host client may take to send its `CONNECT` line.
    pub handshake_timeout: Duration,
    /// Mux endpoint settings.
    pub endpoint: EndpointConfig,
}

impl Default for BridgeOptions {
    fn default() -> Self {
        Self {
            watch_pid: None,
            startup_timeout: Duration::from_secs(30),
            gone_after: Duration::from_secs(5),
            stop: None,
            handle_signals: false,
            handshake_timeout: Duration::from_secs(10),
            endpoint: EndpointConfig::default(),
        }
    }
}

/// Why [`run_bridge`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeExit {
    /// The chardev socket stayed unconnectable: the VM is gone.
    ChardevGone,
    /// The watched process exited.
    WatchedProcessExited,
    /// Asked to stop (flag or signal).
    Stopped,
}

/// Runs the bridge for one VM until the VM is gone, with default options
/// (no pid to watch, no signal handling). Blocking.
pub fn run_bridge(chardev_socket: &Path, uds_path: &Path) -> Result<BridgeExit, MuxError> {
    run_bridge_with(chardev_socket, uds_path, BridgeOptions::default())
}

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() -> Result<(), MuxError> {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an
        // atomic, which is async-signal-safe.
        let r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(MuxError::io(
                "installing signal handlers",
                io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

type ExitSlot = Arc<Mutex<Option<BridgeExit>>>;

fn set_exit(slot: &ExitSlot, why: BridgeExit) {
    let mut g = slot.lock().unwrap_or_else(PoisonError::into_inner);
    g.get_or_insert(why);
}

/// Connects to QEMU's chardev socket, again and again, until the VM is gone.
struct ChardevSource {
    path: PathBuf,
    opts: BridgeOptions,
    connected_once: bool,
    exit: ExitSlot,
}

impl ChardevSource {
    fn stop_requested(&self) -> bool {
        SIGNALLED.load(Ordering::SeqCst) && self.opts.handle_signals
            || self
                .opts
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::SeqCst))
    }
}

impl LinkSource for ChardevSource {
    fn next_link(&mut self, stop: &StopSignal) -> Result<Option<Link>, MuxError> {
        let started = Instant::now();
        let limit = if self.connected_once {
            self.opts.gone_after
        } else {
            self.opts.startup_timeout
        };
        let mut backoff = Duration::from_millis(20);
        loop {
            if stop.is_stopped() || self.stop_requested() {
                set_exit(&self.exit, BridgeExit::Stopped);
                return Ok(None);
            }
            if let Some(pid) = self.opts.watch_pid {
                if !pid_alive(pid) {
                    set_exit(&self.exit, BridgeExit::WatchedProcessExited);
                    return Ok(None);
                }
            }
            match UnixStream::connect(&self.path) {
                Ok(s) => {
                    self.connected_once = true;
                    let link = Link::unix(s)
                        .map_err(|e| MuxError::io("duplicating the chardev socket", e))?;
                    return Ok(Some(link));
                }
                Err(_) if started.elapsed() >= limit => {
                    set_exit(&self.exit, BridgeExit::ChardevGone);
                    return Ok(None);
                }
                Err(_) => {}
            }
            stop.sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }
}

/// Removes the listening socket on drop, but only if the file is still the
/// one we created (a successor bridge may have replaced it).
struct SocketGuard {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Ok(md) = std::fs::symlink_metadata(&self.path) {
            if md.dev() == self.dev && md.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

fn bind_uds(path: &Path) -> Result<(UnixListener, SocketGuard), MuxError> {
    match std::fs::symlink_metadata(path) {
        Ok(md) => {
            if !md.file_type().is_socket() {
                return Err(MuxError::UdsNotSocket {
                    path: path.to_owned(),
                });
            }
            if UnixStream::connect(path).is_ok() {
                return Err(MuxError::UdsInUse {
                    path: path.to_owned(),
                });
            }
            // A stale socket left by a bridge that was killed.
            if let Err(e) = std::fs::remove_file(path) {
                if e.kind() != io::ErrorKind::NotFound {
                    return Err(MuxError::Bind {
                        path: path.to_owned(),
                        source: e,
                    });
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(MuxError::Bind {
                path: path.to_owned(),
                source: e,
            })
        }
    }
    let bind_err = |source| MuxError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    let md = std::fs::symlink_metadata(path).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok((
        listener,
        SocketGuard {
            path: path.to_owned(),
            dev: md.dev(),
            ino: md.ino(),
        },
    ))
}

/// Runs the bridge for one VM until the VM is gone or a stop is requested.
/// Blocking; spawns threads per connection.
///
/// `chardev_socket` is QEMU's `-chardev socket,path=…,server=on,wait=off`
/// of the `polydev.mux` virtio-serial port; `uds_path` is where the hybrid
/// vsock socket is served (and `<uds_path>_<port>` where guest-initiated
/// streams are delivered).
pub fn run_bridge_with(
    chardev_socket: &Path,
    uds_path: &Path,
    opts: BridgeOptions,
) -> Result<BridgeExit, MuxError> {
    if opts.handle_signals {
        install_signal_handlers()?;
    }
    let (listener, guard) = bind_uds(uds_path)?;
    let exit: ExitSlot = Arc::new(Mutex::new(None));
    let source = ChardevSource {
        path: chardev_socket.to_owned(),
        opts: opts.clone(),
        connected_once: false,
        exit: exit.clone(),
    };
    let ep = MuxEndpoint::host_accepting_any(source, opts.endpoint.clone())?;

    let ep_in = ep.clone();
    let base = uds_path.as_os_str().to_owned();
    let incoming = thread::Builder::new()
        .name("mux-bridge-incoming".into())
        .spawn(move || {
            while !ep_in.is_closed() {
                if let Some(inc) = ep_in.next_incoming(Duration::from_millis(200)) {
                    let mut target = base.clone();
                    target.push(format!("_{}", inc.port()));
                    let _ = thread::Builder::new()
                        .name("mux-bridge-conn".into())
                        .spawn(move || guest_initiated(inc, PathBuf::from(target)));
                }
            }
        })
        .map_err(|e| MuxError::io("starting the bridge thread", e))?;

    let next_port = Arc::new(AtomicU32::new(FIRST_LOCAL_PORT));
    let stop_requested = || {
        SIGNALLED.load(Ordering::SeqCst) && opts.handle_signals
            || opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
    };
    while !ep.is_closed() {
        if stop_requested() {
            set_exit(&exit, BridgeExit::Stopped);
            break;
        }
        // Also checked here, not only between links, so that watching a
        // parent (rather than QEMU) ends the bridge while the link is up.
        if opts.watch_pid.is_some_and(|pid| !pid_alive(pid)) {
            set_exit(&exit, BridgeExit::WatchedProcessExited);
            break;
        }
        match poll_one(
            listener.as_raw_fd(),
            libc::POLLIN,
            Duration::from_millis(200),
        ) {
            Ok(rev) if rev & libc::POLLIN != 0 => {}
            Ok(_) => continue,
            Err(_) => {
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        }
        match listener.accept() {
            Ok((conn, _)) => {
                let ep = ep.clone();
                let port = local_port(&next_port);
                let hs = opts.handshake_timeout;
                let _ = thread::Builder::new()
                    .name("mux-bridge-conn".into())
                    .spawn(move || host_initiated(conn, &ep, port, hs));
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            // Out of descriptors or similar: wait for connections to finish.
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
    ep.shutdown();
    let _ = incoming.join();
    drop(listener);
    drop(guard);
    let why = exit
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .unwrap_or(BridgeExit::Stopped);
    Ok(why)
}

fn local_port(next: &AtomicU32) -> u32 {
    let p = next.fetch_add(1, Ordering::Relaxed);
    // Stay within [2^30, 2^31) like Firecracker.
    FIRST_LOCAL_PORT | (p & (FIRST_LOCAL_PORT - 1))
}

/// Parses Firecracker's request line: `connect` in any case, whitespace,
/// a u32 port; further words are ignored as Firecracker ignores them.
pub(crate) fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let mut words = s.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("connect") {
        return None;
    }
    words.next()?.parse().ok()
}

/// Reads the request line one byte at a time so that bytes the client sent
/// after the newline stay in the socket for the stream.
fn read_connect_line(conn: &mut UnixStream) -> Option<u32> {
    let mut buf = [0u8; MAX_CONNECT_LINE];
    let mut n = 0;
    loop {
        if n == buf.len() {
            return None;
        }
        match conn.read(&mut buf[n..n + 1]) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
        n += 1;
        if buf[n - 1] == b'\n' {
            return parse_connect(&buf[..n]);
        }
    }
}

fn host_initiated(
    mut conn: UnixStream,
    ep: &MuxEndpoint,
    local_port: u32,
    handshake_timeout: Duration,
) {
    if conn.set_nonblocking(false).is_err()
        || conn.set_read_timeout(Some(handshake_timeout)).is_err()
    {
        return;
    }
    let Some(port) = read_connect_line(&mut conn) else {
        return;
    };
    if conn.set_read_timeout(None).is_err() {
        return;
    }
    let Ok(stream) = ep.connect(port) else {
        // Refused, timed out or no session: close without a word, like
        // Firecracker when the guest resets the connection request.
        return;
    };
    if conn
        .write_all(format!("OK {local_port}\n").as_bytes())
        .is_err()
    {
        return;
    }
    splice(conn, stream);
}

fn guest_initiated(inc: Incoming, target: PathBuf) {
    let Ok(conn) = UnixStream::connect(&target) else {
        // Dropping `inc` answers OPEN_REFUSED.
        return;
    };
    let Ok(stream) = inc.accept() else {
        return;
    };
    splice(conn, stream);
}

/// Copies both directions until both are done, mapping EOF to half-close
/// and errors to a full close on the other side.
fn splice(conn: UnixStream, stream: MuxStream) {
    let (Ok(conn_rd), Ok(stream_wr)) = (conn.try_clone(), stream.try_clone()) else {
        return;
    };
    let up = thread::Builder::new()
        .name("mux-bridge-up".into())
        .spawn(move || uds_to_mux(conn_rd, stream_wr));
    let Ok(up) = up else {
        let _ = conn.shutdown(Shutdown::Both);
        return;
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match (&stream).read(&mut buf) {
            Ok(0) => {
                let _ = conn.shutdown(Shutdown::Write);
                // Once the guest has closed the stream entirely, close the
                // host connection too (Firecracker does); a mere half-close
                // keeps the other direction open.
                stream.wait_peer_done();
                let _ = conn.shutdown(Shutdown::Both);
                break;
            }
            Ok(n) => {
                if (&conn).write_all(&buf[..n]).is_err() {
                    let _ = conn.shutdown(Shutdown::Both);
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                let _ = conn.shutdown(Shutdown::Both);
                break;
            }
        }
    }
    let _ = up.join();
}

fn uds_to_mux(mut conn: UnixStream, stream: MuxStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => {
                let _ = stream.shutdown_write();
                return;
            }
            Ok(n) => {
                if (&stream).write_all(&buf[..n]).is_err() {
                    let _ = conn.shutdown(Shutdown::Read);
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_grammar_matches_firecracker() {
        assert_eq!(parse_connect(b"CONNECT 1024\n"), Some(1024));
        assert_eq!(parse_connect(b"connect 52\n"), Some(52));
        assert_eq!(parse_connect(b"Connect   7  extra\n"), Some(7));
        assert_eq!(parse_connect(b"CONNECT 4294967295\n"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296\n"), None);
        assert_eq!(parse_connect(b"CONNECT\n"), None);
        assert_eq!(parse_connect(b"CONNECT -1\n"), None);
        assert_eq!(parse_connect(b"OPEN 1024\n"), None);
        assert_eq!(parse_connect(b"\xff\xfe 1\n"), None);
        assert_eq!(parse_connect(b"\n"), None);
    }

    #[test]
    fn local_ports_stay_in_firecracker_range() {
        let c = AtomicU32::new(u32::MAX - 1);
        for _ in 0..4 {
            let p = local_port(&c);
            assert!((FIRST_LOCAL_PORT..(1u32 << 31)).contains(&p));
        }
    }
}
