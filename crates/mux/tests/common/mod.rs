//! Test rig: a guest endpoint, a bridge, and a fake QEMU chardev between them.
#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use polydev_mux::{
    run_bridge_with, BridgeExit, BridgeOptions, EndpointConfig, Link, MuxEndpoint, MuxError,
    StopSignal,
};

/// A temporary directory removed on drop. Paths stay short because Unix
/// socket paths are limited to 108 bytes.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "pmux-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How the fake QEMU connects the bridge to the guest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Each bridge connection becomes a new guest link; a disconnect is seen
    /// by the guest as EOF (like POLLHUP on the virtio port).
    Direct,
    /// One guest link for ever; bridge connections come and go behind it and
    /// the guest never sees a disconnect (like a VM restored into a new QEMU
    /// whose port state says "connected"). Guest bytes written while no
    /// bridge is connected are dropped.
    Persistent,
}

/// Stands in for QEMU's `-chardev socket,server=on,wait=off`.
pub struct FakeQemu {
    pub path: PathBuf,
    mode: Mode,
    /// The current bridge connection (server side).
    current: Arc<Mutex<Option<UnixStream>>>,
    /// Persistent mode: our end of the guest's link.
    guest_side: Option<UnixStream>,
    stop: Arc<AtomicBool>,
    accepts: Arc<AtomicU64>,
}

impl FakeQemu {
    /// Starts listening; returns the fake and the guest's link source.
    pub fn start(
        path: PathBuf,
        mode: Mode,
    ) -> (
        Self,
        impl FnMut(&StopSignal) -> Result<Option<Link>, MuxError> + Send + 'static,
    ) {
        let listener = UnixListener::bind(&path).expect("bind fake chardev");
        listener.set_nonblocking(true).expect("nonblocking");
        let current: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let accepts = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel::<Link>();

        let guest_side = if mode == Mode::Persistent {
            let (g, q) = UnixStream::pair().expect("socketpair");
            tx.send(Link::unix(g).expect("link")).expect("send link");
            // Guest → bridge: forward to the current bridge connection, or
            // drop the bytes when there is none.
            let q_rd = q.try_clone().expect("clone");
            let cur = current.clone();
            thread::spawn(move || {
                let mut q_rd = q_rd;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match q_rd.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let mut g = cur.lock().unwrap();
                    if let Some(c) = g.as_mut() {
                        if c.write_all(&buf[..n]).is_err() {
                            *g = None;
                        }
                    }
                }
            });
            Some(q)
        } else {
            None
        };

        {
            let current = current.clone();
            let stop = stop.clone();
            let accepts = accepts.clone();
            let q = guest_side.as_ref().map(|q| q.try_clone().expect("clone"));
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let conn = match listener.accept() {
                        Ok((c, _)) => c,
                        Err(_) => {
                            thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    };
                    conn.set_nonblocking(false).expect("blocking");
                    accepts.fetch_add(1, Ordering::SeqCst);
                    match &q {
                        None => {
                            *current.lock().unwrap() = Some(conn.try_clone().expect("clone"));
                            if tx.send(Link::unix(conn).expect("link")).is_err() {
                                return;
                            }
                        }
                        Some(q) => {
                            *current.lock().unwrap() = Some(conn.try_clone().expect("clone"));
                            // Bridge → guest for this connection.
                            let mut q = q.try_clone().expect("clone");
                            let mut conn = conn;
                            thread::spawn(move || {
                                let mut buf = vec![0u8; 64 * 1024];
                                loop {
                                    let n = match conn.read(&mut buf) {
                                        Ok(0) | Err(_) => return,
                                        Ok(n) => n,
                                    };
                                    if q.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                            });
                        }
                    }
                }
            });
        }

        let source = move |stop: &StopSignal| loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(link) => return Ok(Some(link)),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if stop.is_stopped() {
                        return Ok(None);
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    if stop.sleep(Duration::from_secs(3600)) {
                        return Ok(None);
                    }
                }
            }
        };
        (
            Self {
                path,
                mode,
                current,
                guest_side,
                stop,
                accepts,
            },
            source,
        )
    }

    /// Drops the current bridge connection (the bridge will reconnect).
    pub fn disconnect(&self) {
        if let Some(c) = self.current.lock().unwrap().take() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Persistent mode: raw bytes to the guest, as if sent by a host.
    pub fn inject_to_guest(&self, bytes: &[u8]) {
        let mut q = self
            .guest_side
            .as_ref()
            .expect("persistent mode")
            .try_clone()
            .unwrap();
        q.write_all(bytes).unwrap();
    }

    /// How many bridge connections were accepted so far.
    pub fn accepts(&self) -> u64 {
        self.accepts.load(Ordering::SeqCst)
    }

    /// The VM "dies": no more connections, socket file removed.
    pub fn kill(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::fs::remove_file(&self.path);
        self.disconnect();
    }
}

impl Drop for FakeQemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A guest endpoint, a fake QEMU and a running bridge.
pub struct Rig {
    pub dir: TempDir,
    pub uds: PathBuf,
    pub qemu: FakeQemu,
    pub guest: MuxEndpoint,
    pub stop: Arc<AtomicBool>,
    pub bridge: Option<JoinHandle<Result<BridgeExit, MuxError>>>,
}

impl Rig {
    pub fn new(mode: Mode) -> Self {
        Self::with(mode, EndpointConfig::default(), BridgeOptions::default())
    }

    pub fn with(mode: Mode, guest_cfg: EndpointConfig, mut opts: BridgeOptions) -> Self {
        let dir = TempDir::new();
        let chardev = dir.path().join("mux.sock");
        let uds = dir.path().join("v.sock");
        let (qemu, source) = FakeQemu::start(chardev.clone(), mode);
        let guest = MuxEndpoint::guest_with(source, guest_cfg).expect("guest endpoint");
        let stop = Arc::new(AtomicBool::new(false));
        opts.stop = Some(stop.clone());
        let (c, u) = (chardev.clone(), uds.clone());
        let bridge = thread::spawn(move || run_bridge_with(&c, &u, opts));
        let rig = Self {
            dir,
            uds,
            qemu,
            guest,
            stop,
            bridge: Some(bridge),
        };
        rig.wait_ready();
        rig
    }

    /// Waits for the bridge socket and a session.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.uds.exists() {
            assert!(Instant::now() < deadline, "bridge socket never appeared");
            thread::sleep(Duration::from_millis(5));
        }
        assert!(
            self.guest.wait_connected(Duration::from_secs(10)),
            "no session"
        );
    }

    /// Host side: `CONNECT port` through the hybrid vsock socket. Returns the
    /// stream after the `OK` line, or the error / EOF the bridge gave.
    pub fn host_connect(&self, port: u32) -> io::Result<UnixStream> {
        host_connect(&self.uds, port)
    }

    pub fn stop_bridge(&mut self) -> Result<BridgeExit, MuxError> {
        self.stop.store(true, Ordering::SeqCst);
        self.bridge
            .take()
            .expect("bridge running")
            .join()
            .expect("bridge thread")
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(b) = self.bridge.take() {
            let _ = b.join();
        }
        self.guest.shutdown();
    }
}

pub fn host_connect(uds: &Path, port: u32) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Read the reply a byte at a time so stream bytes stay in the socket.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "closed without OK",
                ))
            }
            _ => {
                line.push(b[0]);
                if b[0] == b'\n' {
                    break;
                }
            }
        }
    }
    let text = String::from_utf8(line).map_err(|_| io::ErrorKind::InvalidData)?;
    let n: u32 = text
        .strip_prefix("OK ")
        .and_then(|r| r.trim_end().parse().ok())
        .ok_or(io::ErrorKind::InvalidData)?;
    assert!(n >= 1 << 30, "local port {n} outside Firecracker's range");
    Ok(s)
}

/// Echo server on a guest listener: one thread per stream, copies until
/// EOF, then half-closes.
pub fn spawn_echo(guest: &MuxEndpoint, port: u32) {
    let l = guest.listen(port).expect("listen");
    thread::spawn(move || {
        while let Ok(s) = l.accept() {
            thread::spawn(move || {
                let mut r = s.try_clone().expect("clone");
                let mut w = s;
                let _ = io::copy(&mut r, &mut w);
                let _ = w.shutdown_write();
            });
        }
    });
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a, enough to compare streams.
pub fn fnv(data: &[u8], mut h: u64) -> u64 {
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01B3);
    }
    h
}

pub const FNV_INIT: u64 = 0xCBF2_9CE4_8422_2325;

/// Reads a line from a stream without over-reading (for small protocols in tests).
pub fn read_line<R: Read>(r: R) -> String {
    let mut s = String::new();
    let _ = BufReader::new(r).read_line(&mut s);
    s
}

/// The calling thread's id, for [`wait_blocked`].
pub fn thread_id() -> u32 {
    let link = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
    link.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .expect("thread id")
}

/// Waits until thread `tid` of this process sleeps in the kernel (state
/// `S`): the readiness signal for "it is blocked in its read or write".
pub fn wait_blocked(tid: u32) {
    let stat = format!("/proc/self/task/{tid}/stat");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = std::fs::read_to_string(&stat).expect("thread stat");
        // The state follows the parenthesised command name.
        let state = s
            .rsplit(')')
            .next()
            .and_then(|r| r.trim_start().chars().next());
        if state == Some('S') {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "thread {tid} never blocked ({s})"
        );
        thread::yield_now();
    }
}

/// Reads `s` to its end and asserts that it ended (EOF or a reset) rather
/// than hanging; returns what arrived.
pub fn read_until_closed(s: &UnixStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut out = Vec::new();
    match (&*s).read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) => assert_eq!(
            e.kind(),
            io::ErrorKind::ConnectionReset,
            "the connection should have ended, got {e}"
        ),
    }
    out
}
