//! Host and guest endpoints joined directly by a socketpair.

mod common;

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use polydev_mux::{
    Connection, EndpointConfig, Link, MuxEndpoint, MuxError, Role, StopSignal, Transport,
};

/// A link source that hands out links sent through a channel.
fn channel_source(
    rx: mpsc::Receiver<Link>,
) -> impl FnMut(&StopSignal) -> Result<Option<Link>, MuxError> + Send + 'static {
    move |stop: &StopSignal| loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(l) => return Ok(Some(l)),
            Err(mpsc::RecvTimeoutError::Timeout) if !stop.is_stopped() => {}
            Err(_) => return Ok(None),
        }
    }
}

struct Pair {
    host: MuxEndpoint,
    guest: MuxEndpoint,
    host_tx: mpsc::Sender<Link>,
    guest_tx: mpsc::Sender<Link>,
    wire: UnixStream,
}

impl Pair {
    fn new(cfg: EndpointConfig) -> Self {
        let (htx, hrx) = mpsc::channel();
        let (gtx, grx) = mpsc::channel();
        let host = MuxEndpoint::host_with(channel_source(hrx), cfg.clone()).unwrap();
        let guest = MuxEndpoint::guest_with(channel_source(grx), cfg).unwrap();
        let mut p = Self {
            host,
            guest,
            host_tx: htx,
            guest_tx: gtx,
            wire: UnixStream::pair().unwrap().0,
        };
        p.relink();
        p
    }

    /// Replaces the link with a fresh socketpair (the old one is cut).
    fn relink(&mut self) {
        let (hs, gs) = (self.host.stats().sessions, self.guest.stats().sessions);
        let _ = self.wire.shutdown(std::net::Shutdown::Both);
        let (a, b) = UnixStream::pair().unwrap();
        self.wire = a.try_clone().unwrap();
        self.host_tx.send(Link::unix(a).unwrap()).unwrap();
        self.guest_tx.send(Link::unix(b).unwrap()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.host.stats().sessions == hs
            || self.guest.stats().sessions == gs
            || !self.host.is_connected()
            || !self.guest.is_connected()
        {
            assert!(Instant::now() < deadline, "no new session");
            thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn both_directions_and_roles() {
    let p = Pair::new(EndpointConfig::default());
    assert_eq!(p.host.role(), Role::Host);
    assert_eq!(p.guest.role(), Role::Guest);

    let gl = p.guest.listen(1024).unwrap();
    let hs = p.host.connect(1024).unwrap();
    let gs = gl.accept().unwrap();
    assert_eq!(hs.id() % 2, 0);
    assert_eq!(gs.id(), hs.id());
    (&hs).write_all(b"to guest").unwrap();
    let mut buf = [0u8; 8];
    (&gs).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"to guest");

    let hl = p.host.listen(1025).unwrap();
    let gs2 = p.guest.connect(1025).unwrap();
    let hs2 = hl.accept().unwrap();
    (&gs2).write_all(b"to host!").unwrap();
    (&hs2).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"to host!");
}

#[test]
fn listener_rules_and_refusals() {
    let p = Pair::new(EndpointConfig::default());
    let l = p.guest.listen(7).unwrap();
    assert!(matches!(
        p.guest.listen(7),
        Err(MuxError::PortInUse { port: 7 })
    ));
    assert!(matches!(
        p.host.connect(8),
        Err(MuxError::Refused { port: 8 })
    ));
    drop(l);
    assert!(matches!(
        p.host.connect(7),
        Err(MuxError::Refused { port: 7 })
    ));
    let e: io::Error = MuxError::Refused { port: 7 }.into();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
}

#[test]
fn backlog_overflow_is_refused() {
    let cfg = EndpointConfig {
        backlog: 2,
        ..EndpointConfig::default()
    };
    let p = Pair::new(cfg);
    let l = p.guest.listen(1).unwrap();
    let _a = p.host.connect(1).unwrap();
    let _b = p.host.connect(1).unwrap();
    assert!(matches!(p.host.connect(1), Err(MuxError::Refused { .. })));
    let _ = l.accept().unwrap();
    assert!(p.host.connect(1).is_ok());
}

#[test]
fn stream_limit_refuses_further_opens() {
    let cfg = EndpointConfig {
        max_streams: 3,
        ..EndpointConfig::default()
    };
    let p = Pair::new(cfg);
    let l = p.guest.listen(1).unwrap();
    let mut keep = Vec::new();
    for _ in 0..3 {
        keep.push(p.host.connect(1).unwrap());
        keep.push(l.accept().unwrap());
    }
    assert!(matches!(p.host.connect(1), Err(MuxError::Refused { .. })));
    keep.clear();
    // Closed streams free their places.
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.host.connect(1).is_err() {
        assert!(Instant::now() < deadline);
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn read_timeout_and_try_clone() {
    let p = Pair::new(EndpointConfig::default());
    let l = p.guest.listen(1).unwrap();
    let h = p.host.connect(1).unwrap();
    let g = l.accept().unwrap();
    g.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let t = Instant::now();
    let e = (&g).read(&mut [0u8; 4]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    assert!(t.elapsed() >= Duration::from_millis(50));

    // Clones share the stream; it stays open until the last one is dropped.
    let h2 = h.try_clone().unwrap();
    drop(h);
    (&h2).write_all(b"abc").unwrap();
    let mut b = [0u8; 3];
    (&g).read_exact(&mut b).unwrap();
    drop(h2);
    g.set_read_timeout(None).unwrap();
    assert_eq!(
        (&g).read(&mut b).unwrap(),
        0,
        "EOF once every handle is gone"
    );
    let e = (&g).write(b"x").unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
}

#[test]
fn window_bounds_what_a_writer_can_push() {
    let cfg = EndpointConfig {
        window: 64 * 1024,
        ..EndpointConfig::default()
    };
    let p = Pair::new(cfg);
    let l = p.guest.listen(1).unwrap();
    let h = p.host.connect(1).unwrap();
    let g = l.accept().unwrap();
    h.set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let chunk = vec![7u8; 16 * 1024];
    let mut sent = 0usize;
    loop {
        match (&h).write(&chunk) {
            Ok(n) => sent += n,
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                break;
            }
        }
        assert!(sent <= 64 * 1024, "wrote past the window");
    }
    assert_eq!(sent, 64 * 1024);
    let mut buf = vec![0u8; 64 * 1024];
    (&g).read_exact(&mut buf).unwrap();
    // Credit came back: writing works again.
    (&h).write_all(&chunk).unwrap();
}

#[test]
fn relink_resets_old_streams_and_listeners_survive() {
    let mut p = Pair::new(EndpointConfig::default());
    let l = p.guest.listen(1).unwrap();
    let h = p.host.connect(1).unwrap();
    let g = l.accept().unwrap();
    p.relink();
    assert_eq!(
        (&g).read(&mut [0u8; 1]).unwrap_err().kind(),
        io::ErrorKind::ConnectionReset
    );
    assert_eq!(
        (&h).write(b"x").unwrap_err().kind(),
        io::ErrorKind::ConnectionReset
    );
    // Same listener, new session, new stream (ids may repeat; no mix-up).
    let h2 = p.host.connect(1).unwrap();
    let g2 = l.accept().unwrap();
    (&h2).write_all(b"new").unwrap();
    let mut b = [0u8; 3];
    (&g2).read_exact(&mut b).unwrap();
    assert_eq!(&b, b"new");
    assert!(p.guest.stats().session_resets >= 1);
    drop((h, g));
}

#[test]
fn shutdown_fails_streams_with_aborted() {
    let p = Pair::new(EndpointConfig::default());
    let l = p.guest.listen(1).unwrap();
    let _h = p.host.connect(1).unwrap();
    let g = l.accept().unwrap();
    let (tid_tx, tid_rx) = mpsc::channel();
    let reader = {
        let g = g.try_clone().unwrap();
        thread::spawn(move || {
            tid_tx.send(thread_id()).unwrap();
            (&g).read(&mut [0u8; 1]).map_err(|e| e.kind())
        })
    };
    // Shut down while the reader is blocked, not before it reads.
    wait_blocked(tid_rx.recv().unwrap());
    p.guest.shutdown();
    assert_eq!(
        reader.join().unwrap(),
        Err(io::ErrorKind::ConnectionAborted)
    );
    assert!(p.guest.is_closed());
    assert!(matches!(p.guest.connect(1), Err(MuxError::Closed)));
    assert!(matches!(l.accept(), Err(MuxError::Closed)));
}

#[test]
fn connect_without_session_fails_after_timeout() {
    let (_tx, rx) = mpsc::channel();
    let cfg = EndpointConfig {
        connect_timeout: Duration::from_millis(100),
        ..EndpointConfig::default()
    };
    let guest = MuxEndpoint::guest_with(channel_source(rx), cfg).unwrap();
    assert!(matches!(guest.connect(1), Err(MuxError::NotConnected)));
    assert!(matches!(
        guest.ping(Duration::from_millis(10)),
        Err(MuxError::NotConnected)
    ));
}

#[test]
fn transport_trait_over_the_mux() {
    let p = Pair::new(EndpointConfig::default());
    let guest: &dyn Transport = &p.guest;
    let acceptor = guest.listen(5).unwrap();
    let server = thread::spawn(move || {
        let mut c = acceptor.accept().unwrap();
        let mut w = c.try_clone_box().unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        w.write_all(s.to_uppercase().as_bytes()).unwrap();
        w.shutdown_write().unwrap();
    });
    let host: &dyn Transport = &p.host;
    let mut c: Box<dyn Connection> = host.connect(5).unwrap();
    c.write_all(b"shout").unwrap();
    c.shutdown_write().unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    assert_eq!(s, "SHOUT");
    server.join().unwrap();
}

#[test]
#[ignore = "needs AF_VSOCK loopback (the vsock_loopback module, absent in containers); \
            polydev.sh runs it where /sys/module/vsock_loopback exists"]
fn vsock_loopback() {
    use polydev_mux::VsockTransport;
    let t = VsockTransport::with_peer_cid(1);
    let acceptor = t
        .listen(52_000 + std::process::id() % 1000)
        .expect("AF_VSOCK loopback listen");
    let port = 52_000 + std::process::id() % 1000;
    let server = thread::spawn(move || {
        let mut c = acceptor.accept().ok()?;
        let mut s = String::new();
        c.read_to_string(&mut s).ok()?;
        Some(s)
    });
    let mut c = t.connect(port).expect("AF_VSOCK loopback connect");
    c.write_all(b"vsock").unwrap();
    c.shutdown_write().unwrap();
    assert_eq!(server.join().unwrap().as_deref(), Some("vsock"));
}

/// Moves `total` bytes host → guest over one stream; returns MB/s.
fn one_way(total: usize) -> f64 {
    let p = Pair::new(EndpointConfig::default());
    let l = p.guest.listen(1).unwrap();
    let h = p.host.connect(1).unwrap();
    let g = l.accept().unwrap();
    let chunk = pattern(1, 1 << 20);
    let want = chunk.clone();
    let start = Instant::now();
    let writer = thread::spawn(move || {
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len());
            (&h).write_all(&chunk[..n]).unwrap();
            left -= n;
        }
        h.shutdown_write().unwrap();
    });
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    let mut filled = 0usize;
    loop {
        let n = (&g).read(&mut buf[filled..]).unwrap();
        if n == 0 {
            break;
        }
        filled += n;
        got += n;
        if filled == buf.len() {
            // memcmp, not a hash: the check must not be the bottleneck.
            assert!(buf == want, "data mismatch");
            filled = 0;
        }
    }
    writer.join().unwrap();
    assert_eq!(got, total);
    let secs = start.elapsed().as_secs_f64();
    total as f64 / secs / 1e6
}

#[test]
fn large_transfer_64_mib() {
    let mbps = one_way(64 << 20);
    eprintln!("mux one-way throughput (64 MiB): {mbps:.0} MB/s");
}

/// `cargo test --release -p polydev-mux --test endpoint -- --ignored --nocapture`
#[test]
#[ignore = "benchmark; run in release"]
fn throughput_512_mib() {
    let mbps = one_way(512 << 20);
    eprintln!("mux one-way throughput (512 MiB): {mbps:.0} MB/s");
}
