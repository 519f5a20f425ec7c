//! Drives the real `polydev-guest --listen unix:…` binary over the agent
//! protocol. Each test starts its own agent in its own temporary directory,
//! so tests run in parallel; all traffic stays on Unix sockets and
//! 127.0.0.1.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use polydev_api::agent::{
    encode_line, AgentErrorKind, ExecRequest, FileSpec, ForwardTarget, GuestConfig, LogRecord,
    ReadyProbe, Request, Response, RestartPolicy, ServiceSpec, ServiceStatus,
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

struct Agent {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pg-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

impl Agent {
    fn start(dir: PathBuf, extra: &[String]) -> Agent {
        let sock = dir.join("agent.sock");
        let console = std::fs::File::create(dir.join("console.log")).expect("console log");
        let child = Command::new(env!("CARGO_BIN_EXE_polydev-guest"))
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(console)
            .spawn()
            .expect("start polydev-guest");
        let agent = Agent { child, dir, sock };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = UnixStream::connect(&agent.sock) {
                drop(s);
                if matches!(agent.call(&Request::Health), Response::Health(h) if h.ok) {
                    return agent;
                }
            }
            assert!(Instant::now() < deadline, "agent did not come up");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn connect(&self, req: &Request) -> UnixStream {
        let mut s = UnixStream::connect(&self.sock).expect("connect to agent");
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        s.write_all(&encode_line(req).expect("encode"))
            .expect("send request");
        s
    }

    /// All frames of the answer, up to and including the final one.
    fn frames(&self, req: &Request) -> Vec<Response> {
        read_frames(self.connect(req))
    }

    fn call(&self, req: &Request) -> Response {
        self.frames(req).pop().expect("at least one frame")
    }

    fn services(&self) -> Vec<ServiceStatus> {
        match self.call(&Request::Services) {
            Response::Services { services } => services,
            other => panic!("unexpected {other:?}"),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn read_frames(s: UnixStream) -> Vec<Response> {
    let mut r = BufReader::new(s);
    let mut out = Vec::new();
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line).expect("read frame");
        assert!(n > 0, "stream ended before a final frame: {out:?}");
        let frame: Response = serde_json::from_str(&line).expect("valid frame");
        let last = frame.is_final();
        out.push(frame);
        if last {
            return out;
        }
    }
}

fn exec(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn outputs(frames: &[Response]) -> (Vec<u8>, Vec<u8>) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    for f in frames {
        match f {
            Response::Stdout { data } => out.extend(data),
            Response::Stderr { data } => err.extend(data),
            _ => {}
        }
    }
    (out, err)
}

fn error_kind(r: &Response) -> Option<AgentErrorKind> {
    match r {
        Response::Error(e) => Some(e.kind),
        _ => None,
    }
}

#[test]
fn health_and_info() {
    let a = Agent::start(temp_dir(), &[]);
    match a.call(&Request::Info) {
        Response::Info(i) => {
            assert_eq!(i.protocol, polydev_api::agent::PROTOCOL_VERSION);
            assert!(!i.kernel.is_empty());
            assert!(i.cpus >= 1);
            assert!(i.mem_total_kib > 0);
            assert!(!i.rootfs);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn exec_streams_output_and_exit_code() {
    let a = Agent::start(temp_dir(), &[]);
    let frames = a.frames(&Request::Exec(exec(&[
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ])));
    assert!(matches!(frames.first(), Some(Response::Started { pid }) if *pid > 0));
    let (out, err) = outputs(&frames);
    assert_eq!(out, b"out\n");
    assert_eq!(err, b"err\n");
    match frames.last() {
        Some(Response::Exit(e)) => {
            assert_eq!(e.code, Some(3));
            assert_eq!(e.signal, None);
            assert!(!e.timed_out);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn exec_stdin_round_trips_binary() {
    let a = Agent::start(temp_dir(), &[]);
    let input: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let mut req = exec(&["cat"]);
    req.stdin = Some(input.clone());
    let frames = a.frames(&Request::Exec(req));
    let (out, _) = outputs(&frames);
    assert_eq!(out.len(), input.len());
    assert!(out == input, "stdout differs from stdin");
    assert!(matches!(frames.last(), Some(Response::Exit(e)) if e.code == Some(0)));
}

#[test]
fn exec_env_and_cwd() {
    let a = Agent::start(temp_dir(), &[]);
    let mut req = exec(&["sh", "-c", "echo \"$GREETING\"; pwd"]);
    req.env = BTreeMap::from([("GREETING".to_string(), "hi there".to_string())]);
    req.cwd = Some("/tmp".into());
    let (out, _) = outputs(&a.frames(&Request::Exec(req)));
    assert_eq!(String::from_utf8_lossy(&out), "hi there\n/tmp\n");
}

#[test]
fn exec_timeout_kills_and_reports() {
    let a = Agent::start(temp_dir(), &[]);
    let mut req = exec(&["sh", "-c", "sleep 30; echo never"]);
    req.timeout_ms = Some(300);
    let start = Instant::now();
    let frames = a.frames(&Request::Exec(req));
    assert!(start.elapsed() < Duration::from_secs(10));
    match frames.last() {
        Some(Response::Exit(e)) => {
            assert!(e.timed_out);
            assert_eq!(e.signal, Some(libc_sigkill()));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(outputs(&frames).0.is_empty());
}

fn libc_sigkill() -> i32 {
    9
}

#[test]
fn exec_of_missing_program_is_not_found() {
    let a = Agent::start(temp_dir(), &[]);
    let r = a.call(&Request::Exec(exec(&["no-such-program-polydev"])));
    assert_eq!(error_kind(&r), Some(AgentErrorKind::NotFound), "{r:?}");
    let r = a.call(&Request::Exec(exec(&[])));
    assert_eq!(error_kind(&r), Some(AgentErrorKind::BadRequest), "{r:?}");
}

#[test]
fn exec_client_disconnect_kills_the_process() {
    let a = Agent::start(temp_dir(), &[]);
    let s = a.connect(&Request::Exec(exec(&["sleep", "30"])));
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).expect("started frame");
    let pid = match serde_json::from_str::<Response>(&line) {
        Ok(Response::Started { pid }) => pid,
        other => panic!("unexpected {other:?}"),
    };
    assert!(PathBuf::from(format!("/proc/{pid}")).exists());
    drop(r);
    let deadline = Instant::now() + Duration::from_secs(10);
    while PathBuf::from(format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "process {pid} survived its client"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn files_round_trip() {
    let dir = temp_dir();
    let a = Agent::start(dir.clone(), &[]);
    let path = dir.join("sub/dir/f.bin").display().to_string();
    let data: Vec<u8> = (0..=255u8).collect();
    let r = a.call(&Request::WriteFile(FileSpec {
        path: path.clone(),
        data: data.clone(),
        mode: 0o640,
        create_dirs: true,
    }));
    assert_eq!(r, Response::Done);
    let r = a.call(&Request::ReadFile {
        path: path.clone(),
        max_bytes: 1024,
    });
    assert_eq!(r, Response::File { data });
    let r = a.call(&Request::ReadFile {
        path: path.clone(),
        max_bytes: 10,
    });
    assert_eq!(error_kind(&r), Some(AgentErrorKind::Refused), "{r:?}");
    let r = a.call(&Request::ReadFile {
        path: dir.join("missing").display().to_string(),
        max_bytes: 10,
    });
    assert_eq!(error_kind(&r), Some(AgentErrorKind::NotFound), "{r:?}");
}

#[test]
fn forward_to_tcp_echoes() {
    let a = Agent::start(temp_dir(), &[]);
    let echo = TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let port = echo.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = echo.accept() {
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        }
    });
    let mut s = a.connect(&Request::Forward {
        target: ForwardTarget::Tcp { port },
    });
    // Bytes sent before forward_ready must not be lost.
    s.write_all(b"early ").expect("write early");
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        s.read_exact(&mut b).expect("read ready line");
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    assert_eq!(
        serde_json::from_slice::<Response>(&line).ok(),
        Some(Response::ForwardReady)
    );
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let mut writer = s.try_clone().expect("clone");
    let sent = payload.clone();
    let w = std::thread::spawn(move || {
        writer.write_all(&sent).expect("write payload");
        writer.shutdown(Shutdown::Write).expect("half-close");
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).expect("read echo to EOF");
    w.join().expect("writer");
    let mut expected = b"early ".to_vec();
    expected.extend(&payload);
    assert_eq!(back.len(), expected.len());
    assert!(back == expected, "echo differs");
}

#[test]
fn forward_to_closed_port_is_an_error() {
    let a = Agent::start(temp_dir(), &[]);
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let r = a.call(&Request::Forward {
        target: ForwardTarget::Tcp { port },
    });
    assert!(matches!(r, Response::Error(_)), "{r:?}");
}

#[test]
fn crashing_service_restarts_with_backoff_and_logs_reach_ring_and_socket() {
    let dir = temp_dir();
    let log_path = dir.join("log.sock");
    let log_listener = UnixListener::bind(&log_path).expect("bind log socket");
    let shipped: Arc<Mutex<Vec<LogRecord>>> = Arc::default();
    let sink = shipped.clone();
    std::thread::spawn(move || {
        if let Ok((s, _)) = log_listener.accept() {
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { break };
                if let Ok(rec) = serde_json::from_str::<LogRecord>(&line) {
                    sink.lock().expect("lock").push(rec);
                }
            }
        }
    });
    let a = Agent::start(
        dir,
        &[
            "--log-socket".into(),
            format!("unix:{}", log_path.display()),
        ],
    );
    let r = a.call(&Request::Configure(GuestConfig {
        services: vec![ServiceSpec {
            name: "crash".into(),
            argv: vec!["sh".into(), "-c".into(), "echo boom; exit 1".into()],
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            restart: RestartPolicy::Always,
            ready: None,
        }],
        ..Default::default()
    }));
    assert_eq!(r, Response::Done);

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut max_backoff = 0;
    let mut starts_seen = Vec::new();
    loop {
        let st = a.services();
        let svc = st
            .iter()
            .find(|s| s.name == "crash")
            .expect("service listed");
        if starts_seen.last() != Some(&svc.starts) {
            starts_seen.push(svc.starts);
        }
        if let Some(b) = svc.backoff_ms {
            max_backoff = max_backoff.max(b);
        }
        if let Some(e) = &svc.last_exit {
            assert_eq!(e.code, Some(1));
        }
        // A remaining backoff above 200 ms exists only once the delay has
        // doubled at least twice (100, 200, 400 ms).
        if svc.starts >= 4 && max_backoff > 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no growing backoff: starts {starts_seen:?}, max backoff {max_backoff}"
        );
        std::thread::sleep(Duration::from_millis(15));
    }
    assert!(starts_seen.windows(2).all(|w| w[0] < w[1]));

    let boom =
        |r: &LogRecord| r.source == "service:crash" && r.stream == "stdout" && r.line == "boom";
    match a.call(&Request::Logs { limit: 10_000 }) {
        Response::Logs { records } => {
            assert!(
                records.iter().filter(|r| boom(r)).count() >= 2,
                "{records:?}"
            );
            assert!(records.windows(2).all(|w| w[0].seq < w[1].seq));
        }
        other => panic!("unexpected {other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !shipped.lock().expect("lock").iter().any(boom) {
        assert!(
            Instant::now() < deadline,
            "no boom record on the log socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn service_declaration_is_validated() {
    let a = Agent::start(temp_dir(), &[]);
    let r = a.call(&Request::Configure(GuestConfig {
        services: vec![ServiceSpec {
            name: "Bad/Name".into(),
            argv: vec!["true".into()],
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            restart: RestartPolicy::Never,
            ready: None,
        }],
        ..Default::default()
    }));
    assert_eq!(error_kind(&r), Some(AgentErrorKind::BadRequest), "{r:?}");
    assert!(a.services().is_empty());
}

#[test]
fn malformed_and_unknown_requests_are_bad_requests() {
    let a = Agent::start(temp_dir(), &[]);
    for bad in [
        &b"this is not json\n"[..],
        b"{\"op\":\"format_disk\"}\n",
        b"{\"op\":\"exec\",\"argv\":[\"a\"],\"bogus\":1}\n",
    ] {
        let mut s = UnixStream::connect(&a.sock).expect("connect");
        s.write_all(bad).expect("send");
        let frames = read_frames(s);
        let r = frames.last().expect("frame");
        assert_eq!(error_kind(r), Some(AgentErrorKind::BadRequest), "{r:?}");
        match r {
            Response::Error(e) => assert!(e.message.contains("malformed request"), "{}", e.message),
            _ => unreachable!(),
        }
    }
}

#[test]
fn oversize_request_is_a_bad_request() {
    let a = Agent::start(temp_dir(), &[]);
    let s = UnixStream::connect(&a.sock).expect("connect");
    let mut w = s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..17 {
            if w.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let frames = read_frames(s);
    let _ = writer.join();
    match frames.last() {
        Some(Response::Error(e)) => {
            assert_eq!(e.kind, AgentErrorKind::BadRequest);
            assert!(e.message.contains("exceeds"), "{}", e.message);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn shutdown_answers_done_then_exits() {
    let mut a = Agent::start(temp_dir(), &[]);
    assert_eq!(a.call(&Request::Shutdown { reboot: false }), Response::Done);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(st)) = a.child.try_wait() {
            assert!(st.success());
            break;
        }
        assert!(Instant::now() < deadline, "agent did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn log_stream_reconnects_after_the_host_drops_it() {
    let dir = temp_dir();
    let log_path = dir.join("log.sock");
    let log_listener = UnixListener::bind(&log_path).expect("bind log socket");
    let a = Agent::start(
        dir,
        &[
            "--log-socket".into(),
            format!("unix:{}", log_path.display()),
        ],
    );
    // First connection: take one record, then hang up like a restarting host.
    let (first, _) = log_listener.accept().expect("first log connection");
    let mut line = String::new();
    BufReader::new(&first)
        .read_line(&mut line)
        .expect("first record");
    assert!(serde_json::from_str::<LogRecord>(&line).is_ok(), "{line}");
    drop(first);
    // The agent notices while idle and reconnects without new records.
    let (second, _) = log_listener.accept().expect("second log connection");
    second
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let r = a.call(&Request::Configure(GuestConfig {
        services: vec![ServiceSpec {
            name: "once".into(),
            argv: vec!["echo".into(), "after-reconnect".into()],
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            restart: RestartPolicy::Never,
            ready: None,
        }],
        ..Default::default()
    }));
    assert_eq!(r, Response::Done);
    let mut seen = false;
    for line in BufReader::new(second).lines() {
        let Ok(line) = line else { break };
        if let Ok(rec) = serde_json::from_str::<LogRecord>(&line) {
            if rec.source == "service:once" && rec.line == "after-reconnect" {
                seen = true;
                break;
            }
        }
    }
    assert!(
        seen,
        "service output did not arrive on the new log connection"
    );
}

/// A service is reported ready only once its probe passes: an exec probe
/// that waits for a file, and a TCP probe on a port that opens later.
#[test]
fn services_are_ready_only_when_their_probe_passes() {
    let dir = temp_dir();
    let flag = dir.join("flag");
    let a = Agent::start(dir.clone(), &[]);
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let svc = |name: &str, ready: ReadyProbe| ServiceSpec {
        name: name.into(),
        argv: vec!["sleep".into(), "1000".into()],
        env: BTreeMap::new(),
        cwd: None,
        user: None,
        restart: RestartPolicy::Always,
        ready: Some(ready),
    };
    let r = a.call(&Request::Configure(GuestConfig {
        services: vec![
            svc(
                "file",
                ReadyProbe::Exec {
                    argv: vec!["test".into(), "-e".into(), flag.display().to_string()],
                },
            ),
            svc("port", ReadyProbe::Tcp { port }),
        ],
        ..Default::default()
    }));
    assert_eq!(r, Response::Done);
    let ready = |name: &str| {
        a.services()
            .into_iter()
            .find(|s| s.name == name)
            .map(|s| {
                assert!(s.has_probe);
                (s.ready, s.ready_after_ms, s.pid.is_some())
            })
            .expect("service listed")
    };
    // Both run, several probe rounds pass, neither is ready.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(ready("file").2 && ready("port").2) {
        assert!(Instant::now() < deadline, "services did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(PROBE_ROUNDS);
    assert!(!ready("file").0);
    assert!(!ready("port").0);

    std::fs::write(&flag, b"").expect("flag");
    let _open = TcpListener::bind(("127.0.0.1", port)).expect("rebind the port");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (f, p) = (ready("file"), ready("port"));
        if f.0 && p.0 {
            assert!(f.1.is_some_and(|ms| ms >= PROBE_ROUNDS.as_millis() as u64));
            break;
        }
        assert!(Instant::now() < deadline, "not ready: {f:?} {p:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Long enough for a few probe rounds (250 ms apart): the negative half of
/// the readiness test, not a stand-in for readiness.
const PROBE_ROUNDS: Duration = Duration::from_millis(800);
