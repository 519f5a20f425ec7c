//! The bridge and a guest endpoint, joined by a fake QEMU chardev socket.

mod common;

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use polydev_mux::frame::{encode_into, FrameType, HEADER_LEN};
use polydev_mux::{run_bridge_with, BridgeExit, BridgeOptions, EndpointConfig, MuxError};

#[test]
fn host_connect_to_guest_listener_echoes() {
    let rig = Rig::new(Mode::Direct);
    spawn_echo(&rig.guest, 1024);
    let mut s = rig.host_connect(1024).expect("connect");
    s.write_all(b"hello through the mux\n").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = String::new();
    s.read_to_string(&mut back).unwrap();
    assert_eq!(back, "hello through the mux\n");
}

#[test]
fn bytes_after_the_connect_line_belong_to_the_stream() {
    let rig = Rig::new(Mode::Direct);
    spawn_echo(&rig.guest, 1024);
    let mut s = UnixStream::connect(&rig.uds).unwrap();
    // Request and first payload in one write, as eager clients do.
    s.write_all(b"connect 1024\nearly bytes").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let (ok, rest) = all.split_once('\n').unwrap();
    assert!(ok.starts_with("OK "), "{ok}");
    assert_eq!(rest, "early bytes");
}

#[test]
fn twenty_concurrent_streams_with_checksums() {
    let rig = Rig::new(Mode::Direct);
    spawn_echo(&rig.guest, 1024);
    const SIZE: usize = 3 << 20;
    let mut joins = Vec::new();
    for i in 0..20u64 {
        let uds = rig.uds.clone();
        joins.push(thread::spawn(move || {
            let s = host_connect(&uds, 1024).expect("connect");
            let data = pattern(i, SIZE);
            let want = fnv(&data, FNV_INIT);
            let mut w = s.try_clone().unwrap();
            let writer = thread::spawn(move || {
                for chunk in data.chunks(50_000) {
                    w.write_all(chunk).unwrap();
                }
                w.shutdown(Shutdown::Write).unwrap();
            });
            let mut r = s;
            let mut h = FNV_INIT;
            let mut n = 0;
            let mut buf = vec![0u8; 70_000];
            loop {
                let k = r.read(&mut buf).unwrap();
                if k == 0 {
                    break;
                }
                h = fnv(&buf[..k], h);
                n += k;
            }
            writer.join().unwrap();
            assert_eq!(n, SIZE, "stream {i} length");
            assert_eq!(h, want, "stream {i} checksum");
        }));
    }
    for j in joins {
        j.join().unwrap();
    }
}

#[test]
fn stalled_reader_does_not_block_other_streams() {
    let rig = Rig::new(Mode::Direct);
    let stalled = rig.guest.listen(2000).unwrap();
    spawn_echo(&rig.guest, 1024);

    // Stream A: the host pushes 4 MiB; the guest accepts but does not read.
    let a = rig.host_connect(2000).unwrap();
    let a_stream = stalled.accept().unwrap();
    let mut a_w = a.try_clone().unwrap();
    let a_data = pattern(77, 4 << 20);
    let a_want = fnv(&a_data, FNV_INIT);
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let a_writer = thread::spawn(move || {
        tid_tx.send(thread_id()).unwrap();
        a_w.write_all(&a_data).unwrap();
        a_w.shutdown(Shutdown::Write).unwrap();
    });
    // The writer blocks once the window and the socket buffers are full.
    wait_blocked(tid_rx.recv().unwrap());
    assert!(
        !a_writer.is_finished(),
        "4 MiB cannot fit in the window and buffers"
    );

    // Stream B moves 8 MiB in both directions meanwhile.
    let started = Instant::now();
    let b = rig.host_connect(1024).unwrap();
    let mut b_w = b.try_clone().unwrap();
    let b_data = pattern(5, 8 << 20);
    let b_want = fnv(&b_data, FNV_INIT);
    let b_writer = thread::spawn(move || {
        b_w.write_all(&b_data).unwrap();
        b_w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    (&b).read_to_end(&mut got).unwrap();
    b_writer.join().unwrap();
    assert_eq!(fnv(&got, FNV_INIT), b_want);
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(
        !a_writer.is_finished(),
        "stream A must still be held back by its window"
    );

    // Now drain A: everything arrives intact.
    let mut a_got = Vec::new();
    (&a_stream).read_to_end(&mut a_got).unwrap();
    a_writer.join().unwrap();
    assert_eq!(a_got.len(), 4 << 20);
    assert_eq!(fnv(&a_got, FNV_INIT), a_want);
}

#[test]
fn half_close_in_both_directions() {
    let rig = Rig::new(Mode::Direct);
    let l = rig.guest.listen(1024).unwrap();

    // Host half-closes first; the guest answers after EOF.
    let mut h = rig.host_connect(1024).unwrap();
    let g = l.accept().unwrap();
    h.write_all(b"question").unwrap();
    h.shutdown(Shutdown::Write).unwrap();
    let mut q = String::new();
    (&g).read_to_string(&mut q).unwrap();
    assert_eq!(q, "question");
    (&g).write_all(b"answer after EOF").unwrap();
    drop(g);
    let mut a = String::new();
    h.read_to_string(&mut a).unwrap();
    assert_eq!(a, "answer after EOF");

    // Guest half-closes first; the host keeps writing.
    let mut h = rig.host_connect(1024).unwrap();
    let g = l.accept().unwrap();
    (&g).write_all(b"banner").unwrap();
    g.shutdown_write().unwrap();
    let mut banner = String::new();
    h.read_to_string(&mut banner).unwrap();
    assert_eq!(banner, "banner");
    h.write_all(b"still flowing").unwrap();
    h.shutdown(Shutdown::Write).unwrap();
    let mut rest = String::new();
    (&g).read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "still flowing");
    assert!((&g).write_all(b"x").is_err(), "write after shutdown_write");
}

#[test]
fn guest_connect_reaches_host_port_listener() {
    let rig = Rig::new(Mode::Direct);
    let mut name = rig.uds.as_os_str().to_owned();
    name.push("_1025");
    let host_l = UnixListener::bind(&name).unwrap();
    let server = thread::spawn(move || {
        let (mut c, _) = host_l.accept().unwrap();
        let mut req = String::new();
        (&c).read_to_string(&mut req).unwrap();
        c.write_all(format!("got {}", req.len()).as_bytes())
            .unwrap();
    });
    let s = rig.guest.connect(1025).expect("guest connect");
    assert_eq!(s.id() % 2, 1, "guest ids are odd");
    (&s).write_all(b"log line\n").unwrap();
    s.shutdown_write().unwrap();
    let mut reply = String::new();
    (&s).read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "got 9");
    server.join().unwrap();
}

#[test]
fn refused_ports_and_malformed_requests_close_the_connection() {
    let rig = Rig::new(Mode::Direct);
    spawn_echo(&rig.guest, 1024);

    // Nothing listens on guest port 9999: closed without a reply.
    let e = rig.host_connect(9999).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);

    // Malformed request lines.
    for bad in [
        &b"HELLO 1024\n"[..],
        b"CONNECT\n",
        b"CONNECT x\n",
        b"CONNECT 1024 and then a very long tail\n",
    ] {
        let mut s = UnixStream::connect(&rig.uds).unwrap();
        s.write_all(bad).unwrap();
        let out = read_until_closed(&s);
        assert!(
            out.is_empty(),
            "{:?} got {:?}",
            String::from_utf8_lossy(bad),
            out
        );
    }

    // Guest → host port without a `<uds>_<port>` listener.
    match rig.guest.connect(4000) {
        Err(MuxError::Refused { port: 4000 }) => {}
        other => panic!("expected refusal, got {other:?}"),
    }
    // The session survives all that.
    let mut s = rig.host_connect(1024).unwrap();
    s.write_all(b"ok").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = String::new();
    s.read_to_string(&mut back).unwrap();
    assert_eq!(back, "ok");
}

/// Starts a host → guest transfer that the guest reads slowly; returns the
/// guest's stream and the host socket.
fn start_transfer(rig: &Rig, l: &polydev_mux::MuxListener) -> (polydev_mux::MuxStream, UnixStream) {
    let h = rig.host_connect(1024).unwrap();
    let g = l.accept().unwrap();
    let mut hw = h.try_clone().unwrap();
    thread::spawn(move || {
        let data = pattern(1, 64 << 20);
        let _ = hw.write_all(&data);
    });
    let mut buf = vec![0u8; 100_000];
    let mut got = 0;
    while got < 1 << 20 {
        got += (&g).read(&mut buf).unwrap();
    }
    (g, h)
}

fn expect_reset(g: &polydev_mux::MuxStream) {
    let mut buf = vec![0u8; 100_000];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match (&mut &*g).read(&mut buf) {
            Ok(0) => panic!("clean EOF instead of a reset"),
            Ok(_) => assert!(Instant::now() < deadline, "stream never reset"),
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
                break;
            }
        }
    }
    assert!((&mut &*g).write(b"x").is_err());
}

fn echo_roundtrip(rig: &Rig, port: u32, data: &[u8]) {
    let mut s = rig.host_connect(port).expect("connect after resync");
    let mut w = s.try_clone().unwrap();
    let d = data.to_vec();
    let t = thread::spawn(move || {
        w.write_all(&d).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    t.join().unwrap();
    assert!(back == data, "echo mismatch after resync");
}

#[test]
fn broken_link_resets_streams_and_reconnects() {
    let rig = Rig::new(Mode::Direct);
    let l = rig.guest.listen(1024).unwrap();
    let (g, h) = start_transfer(&rig, &l);
    let sessions = rig.guest.stats().sessions;

    rig.qemu.disconnect();
    expect_reset(&g);
    // The host client sees its connection end early.
    let got = read_until_closed(&h);
    assert!(got.is_empty(), "the guest never wrote to this stream");

    // The bridge reconnects and a new session starts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.guest.stats().sessions == sessions || !rig.guest.is_connected() {
        assert!(Instant::now() < deadline, "no new session");
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(rig.qemu.accepts(), 2);
    drop(l);
    spawn_echo(&rig.guest, 1024);
    echo_roundtrip(&rig, 1024, &pattern(9, 2 << 20));
}

#[test]
fn resync_when_guest_never_sees_the_disconnect() {
    // As after a snapshot restore into a new QEMU: the guest's port never
    // reported a hang-up, the old bridge connection is gone, and the guest's
    // decoder may be in the middle of a frame.
    let rig = Rig::new(Mode::Persistent);
    let l = rig.guest.listen(1024).unwrap();
    let (g, _h) = start_transfer(&rig, &l);
    let resets = rig.guest.stats().session_resets;

    rig.qemu.disconnect();
    // A frame cut short, as a snapshot taken mid-frame leaves it, plus junk.
    let mut cut = Vec::new();
    encode_into(&mut cut, FrameType::Data as u8, 2, &pattern(3, 60_000));
    cut.truncate(HEADER_LEN + 1000);
    rig.qemu.inject_to_guest(&cut);

    expect_reset(&g);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.guest.stats().session_resets == resets || !rig.guest.is_connected() {
        assert!(Instant::now() < deadline, "no resync");
        thread::sleep(Duration::from_millis(10));
    }
    drop(l);
    spawn_echo(&rig.guest, 1024);
    echo_roundtrip(&rig, 1024, &pattern(10, 1 << 20));
    assert!(rig.guest.stats().garbage_bytes > 0);
}

#[test]
fn garbage_inside_a_session_forces_a_clean_resync() {
    let rig = Rig::new(Mode::Persistent);
    let l = rig.guest.listen(1024).unwrap();
    let (g, _h) = start_transfer(&rig, &l);
    // Bytes that are no frame, in the middle of the host's stream.
    rig.qemu
        .inject_to_guest(b"\x01\x02 definitely not a frame \xff");
    expect_reset(&g);
    assert!(rig.guest.wait_connected(Duration::from_secs(10)));
    drop(l);
    spawn_echo(&rig.guest, 1024);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // The host learns of the reset through NEED_HELLO; until its new
        // session is up, a connect may still be refused.
        match rig.host_connect(1024) {
            Ok(_) => break,
            Err(_) => {
                assert!(Instant::now() < deadline, "no recovery");
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
    echo_roundtrip(&rig, 1024, &pattern(11, 1 << 20));
}

#[test]
fn ping_round_trips() {
    let rig = Rig::new(Mode::Direct);
    let rtt = rig.guest.ping(Duration::from_secs(5)).expect("pong");
    assert!(rtt < Duration::from_secs(5));
}

#[test]
fn bridge_exits_when_the_vm_is_gone_and_cleans_up() {
    let opts = BridgeOptions {
        gone_after: Duration::from_millis(300),
        ..BridgeOptions::default()
    };
    let mut rig = Rig::with(Mode::Direct, EndpointConfig::default(), opts);
    rig.qemu.kill();
    let exit = rig.bridge.take().unwrap().join().unwrap();
    assert_eq!(exit.unwrap(), BridgeExit::ChardevGone);
    assert!(!rig.uds.exists(), "bridge left its socket behind");
}

#[test]
fn bridge_stops_on_request_and_cleans_up() {
    let mut rig = Rig::new(Mode::Direct);
    assert_eq!(rig.stop_bridge().unwrap(), BridgeExit::Stopped);
    assert!(!rig.uds.exists());
}

#[test]
fn bridge_watches_a_pid() {
    let dir = TempDir::new();
    let chardev = dir.path().join("mux.sock");
    let uds = dir.path().join("v.sock");
    let (_qemu, source) = FakeQemu::start(chardev.clone(), Mode::Direct);
    let _guest = polydev_mux::MuxEndpoint::guest_with(source, EndpointConfig::default()).unwrap();
    let mut child = std::process::Command::new("sleep")
        .arg("0.5")
        .spawn()
        .unwrap();
    let opts = BridgeOptions {
        watch_pid: Some(child.id() as i32),
        ..BridgeOptions::default()
    };
    let t = thread::spawn(move || run_bridge_with(&chardev, &uds, opts));
    assert!(
        _guest.wait_connected(Duration::from_secs(10)),
        "the bridge never connected"
    );
    // Kill the link so the source has to look at the pid.
    _qemu.disconnect();
    child.wait().unwrap();
    _qemu.disconnect();
    assert_eq!(t.join().unwrap().unwrap(), BridgeExit::WatchedProcessExited);
}

#[test]
fn second_bridge_on_a_live_socket_is_refused_and_stale_socket_replaced() {
    let rig = Rig::new(Mode::Direct);
    let stop = Arc::new(AtomicBool::new(true));
    let opts = BridgeOptions {
        stop: Some(stop),
        ..BridgeOptions::default()
    };
    match run_bridge_with(&rig.qemu.path, &rig.uds, opts.clone()) {
        Err(MuxError::UdsInUse { .. }) => {}
        other => panic!("expected UdsInUse, got {other:?}"),
    }
    // A stale socket (its server is gone) is replaced.
    let stale = rig.dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    assert_eq!(
        run_bridge_with(&rig.qemu.path, &stale, opts.clone()).unwrap(),
        BridgeExit::Stopped
    );
    assert!(!stale.exists());
    // A regular file is never deleted.
    let file = rig.dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        run_bridge_with(&rig.qemu.path, &file, opts),
        Err(MuxError::UdsNotSocket { .. })
    ));
    assert!(file.exists());
}

/// Host client → bridge → chardev socket → guest, one stream; MB/s.
/// `cargo test --release -p polydev-mux --test bridge -- --ignored --nocapture`
#[test]
#[ignore = "benchmark; run in release"]
fn bridge_throughput_512_mib() {
    let rig = Rig::new(Mode::Direct);
    let l = rig.guest.listen(1024).unwrap();
    let total = 512usize << 20;
    let sink = thread::spawn(move || {
        let g = l.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0usize;
        loop {
            match (&g).read(&mut buf).unwrap() {
                0 => return n,
                k => n += k,
            }
        }
    });
    let mut h = rig.host_connect(1024).unwrap();
    let chunk = pattern(3, 1 << 20);
    let start = Instant::now();
    for _ in 0..total / chunk.len() {
        h.write_all(&chunk).unwrap();
    }
    h.shutdown(Shutdown::Write).unwrap();
    assert_eq!(sink.join().unwrap(), total);
    let mbps = total as f64 / start.elapsed().as_secs_f64() / 1e6;
    eprintln!("bridge host → guest throughput (512 MiB): {mbps:.0} MB/s");
}
