//! What a hostile guest can make the host hold or wait for: fake guest
//! agents on a hybrid vsock socket that flood or never answer, driven
//! through the public [`AgentClient`], and a flooded guest log stream
//! driven through [`polydev_host::guest_log`]. No VM is booted.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use polydev_api::agent::{
    self, ExecRequest, ForwardTarget, LogRecord, Request, Response, MAX_LOG_CONNECTIONS,
    MAX_LOG_LINE, MAX_READ_FILE, MAX_RESPONSE_LINE,
};
use polydev_host::agent_client::{AgentCallError, AgentClient, Deadlines};
use polydev_host::client::{ClientError, HostClient};
use polydev_host::metrics::GUEST_LOG;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Far longer than any of these tests needs; only a hang reaches it.
const HANG: Duration = Duration::from_secs(60);

/// Deadlines short enough for a test to wait them out.
const SHORT: Deadlines = Deadlines {
    call: Duration::from_millis(300),
    exec_grace: Duration::from_millis(200),
    exec_default: Duration::from_millis(400),
};

/// A fake guest agent behind `<dir>/vsock.sock`: it accepts one stream,
/// answers the hybrid vsock handshake for the agent port, and hands the
/// stream to `behave`, which returns what the test wants to know.
fn fake_agent<T, F, Fut>(dir: &Path, behave: F) -> JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce(BufReader<UnixStream>) -> Fut + Send + 'static,
    Fut: Future<Output = T> + Send,
{
    let listener = UnixListener::bind(dir.join("vsock.sock")).expect("bind the fake vsock socket");
    tokio::spawn(async move {
        let (conn, _) = listener.accept().await.expect("accept");
        let mut s = BufReader::new(conn);
        let mut line = String::new();
        s.read_line(&mut line).await.expect("handshake");
        assert_eq!(line, format!("CONNECT {}\n", agent::AGENT_PORT));
        s.write_all(format!("OK {}\n", agent::AGENT_PORT).as_bytes())
            .await
            .expect("answer the handshake");
        behave(s).await
    })
}

/// Read the one request line the host sends.
async fn read_request(s: &mut BufReader<UnixStream>) -> Request {
    let mut line = Vec::new();
    s.read_until(b'\n', &mut line).await.expect("request");
    serde_json::from_slice(&line).expect("a request line")
}

/// Write `total` bytes without a newline, 64 KiB at a time, and count what
/// was written before the peer closed.
async fn flood(s: &mut (impl AsyncWriteExt + Unpin), total: u64, sent: &AtomicU64) {
    let chunk = vec![b'a'; 64 * 1024];
    while sent.load(Ordering::Relaxed) < total {
        if s.write_all(&chunk).await.is_err() {
            return;
        }
        sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
}

/// Wait until the peer closes `s` (EOF or error).
async fn closed(s: &mut (impl AsyncReadExt + Unpin)) {
    let mut b = [0u8; 4096];
    while let Ok(n) = s.read(&mut b).await {
        if n == 0 {
            break;
        }
    }
}

fn exec(timeout_ms: Option<u64>) -> Request {
    Request::Exec(ExecRequest {
        argv: vec!["true".into()],
        timeout_ms,
        ..Default::default()
    })
}

const FLOOD: u64 = 64 * 1024 * 1024;

#[tokio::test]
async fn a_frame_without_a_newline_fails_at_the_cap_and_closes_the_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let agent = fake_agent(dir.path(), move |mut s| async move {
        read_request(&mut s).await;
        flood(&mut s, FLOOD, &counter).await;
        // Hold the stream open: only the host can end this.
        closed(&mut s).await;
    });
    let client = AgentClient::new(&dir.path().join("vsock.sock"));
    let mut frames = client.stream(&exec(None)).await.expect("stream");
    let err = timeout(HANG, frames.next())
        .await
        .expect("the flood must end at the cap, not at the deadline")
        .expect_err("a frame longer than the cap");
    let want = format!("longer than {MAX_RESPONSE_LINE} bytes");
    assert!(
        matches!(&err, AgentCallError::Protocol(m) if m.contains(&want)),
        "{err}"
    );
    // The host closed the stream: the fake's writes fail long before its
    // 64 MiB are out, and only the cap plus socket buffers got through.
    timeout(HANG, agent)
        .await
        .expect("the host must close the stream")
        .expect("fake agent");
    let through = sent.load(Ordering::Relaxed);
    assert!(
        through < MAX_RESPONSE_LINE as u64 + 4 * 1024 * 1024,
        "{through} bytes were read"
    );
    assert!(matches!(
        frames.next().await,
        Err(AgentCallError::Protocol(_))
    ));
}

#[tokio::test]
async fn the_largest_legitimate_frame_still_fits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = fake_agent(dir.path(), |mut s| async move {
        read_request(&mut s).await;
        let data = vec![0xa5; MAX_READ_FILE as usize];
        let line = agent::encode_line(&Response::File { data }).expect("encode");
        s.write_all(&line).await.expect("write the file frame");
        closed(&mut s).await;
    });
    let client = AgentClient::new(&dir.path().join("vsock.sock"));
    let req = Request::ReadFile {
        path: "/big".into(),
        max_bytes: MAX_READ_FILE,
    };
    match client.call(&req, HANG).await.expect("read_file") {
        Response::File { data } => assert_eq!(data.len() as u64, MAX_READ_FILE),
        other => panic!("{other:?}"),
    }
    timeout(HANG, agent)
        .await
        .expect("closed")
        .expect("fake agent");
}

#[tokio::test]
async fn an_exec_that_is_never_answered_fails_at_its_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = fake_agent(dir.path(), |mut s| async move {
        read_request(&mut s).await;
        closed(&mut s).await;
    });
    let client = AgentClient::new(&dir.path().join("vsock.sock")).with_deadlines(SHORT);
    let started = Instant::now();
    let mut frames = client.stream(&exec(Some(100))).await.expect("stream");
    let err = timeout(HANG, frames.next())
        .await
        .expect("the exec must fail at its deadline")
        .expect_err("no answer");
    let budget = Duration::from_millis(100) + SHORT.exec_grace;
    assert!(
        matches!(err, AgentCallError::Timeout(d) if d == budget),
        "{err}"
    );
    assert!(started.elapsed() >= budget);
    // And the guest sees its stream closed.
    timeout(HANG, agent)
        .await
        .expect("the host must close the stream")
        .expect("fake agent");
}

#[tokio::test]
async fn the_exec_deadline_covers_the_whole_stream_not_each_frame() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = fake_agent(dir.path(), |mut s| async move {
        read_request(&mut s).await;
        let line = agent::encode_line(&Response::Stdout {
            data: b"tick\n".to_vec(),
        })
        .expect("encode");
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            if s.write_all(&line).await.is_err() {
                return;
            }
        }
    });
    let client = AgentClient::new(&dir.path().join("vsock.sock")).with_deadlines(SHORT);
    let mut frames = client.stream(&exec(None)).await.expect("stream");
    let mut ticks = 0;
    let err = timeout(HANG, async {
        loop {
            match frames.next().await {
                Ok(Some(Response::Stdout { .. })) => ticks += 1,
                Ok(other) => panic!("{other:?}"),
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("a trickle of frames must not outlive the deadline");
    assert!(
        matches!(err, AgentCallError::Timeout(d) if d == SHORT.exec_default),
        "{err}"
    );
    assert!(ticks > 0);
    timeout(HANG, agent)
        .await
        .expect("closed")
        .expect("fake agent");
}

#[tokio::test]
async fn calls_that_are_never_answered_fail_at_the_call_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = fake_agent(dir.path(), |mut s| async move {
        read_request(&mut s).await;
        closed(&mut s).await;
    });
    let client = AgentClient::new(&dir.path().join("vsock.sock")).with_deadlines(SHORT);
    let mut frames = client.stream(&Request::Services).await.expect("stream");
    let err = timeout(HANG, frames.next())
        .await
        .expect("the call must fail at its deadline")
        .expect_err("no answer");
    assert!(
        matches!(err, AgentCallError::Timeout(d) if d == SHORT.call),
        "{err}"
    );
    timeout(HANG, agent)
        .await
        .expect("closed")
        .expect("fake agent");
}

#[tokio::test]
async fn a_guest_that_never_reads_the_request_fails_at_the_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Accepts, but never reads: a large request fills the socket buffers.
    let _agent = fake_agent(dir.path(), |s| async move {
        let _held = s;
        std::future::pending::<()>().await;
    });
    let client = AgentClient::new(&dir.path().join("vsock.sock")).with_deadlines(SHORT);
    let req = Request::Exec(ExecRequest {
        argv: vec!["cat".into()],
        stdin: Some(vec![0; 8 * 1024 * 1024]),
        timeout_ms: Some(100),
        ..Default::default()
    });
    let err = timeout(HANG, client.stream(&req))
        .await
        .expect("sending the request must fail at the deadline")
        .err()
        .expect("no answer");
    assert!(matches!(err, AgentCallError::Timeout(_)), "{err}");
}

#[tokio::test]
async fn a_forward_that_is_never_answered_fails_at_the_call_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = fake_agent(dir.path(), |mut s| async move {
        read_request(&mut s).await;
        closed(&mut s).await;
    });
    let client = AgentClient::new(&dir.path().join("vsock.sock")).with_deadlines(SHORT);
    let err = timeout(HANG, client.forward(ForwardTarget::Tcp { port: 5900 }))
        .await
        .expect("the forward must fail at its deadline")
        .expect_err("no answer");
    assert!(
        matches!(err, AgentCallError::Timeout(d) if d == SHORT.call),
        "{err}"
    );
    timeout(HANG, agent)
        .await
        .expect("closed")
        .expect("fake agent");
}

/// A VM's log receiver on `<dir>/vsock.sock_1025`, writing `<dir>/agent.log`.
fn log_receiver(dir: &Path) -> (PathBuf, PathBuf, JoinHandle<()>) {
    let socket = dir.join(format!("vsock.sock_{}", agent::LOG_PORT));
    let log = dir.join("agent.log");
    let task = polydev_host::guest_log::start(
        "vm-test",
        &socket,
        log.clone(),
        polydev_host::logfile::DEFAULT_LOG_MAX_BYTES,
    )
    .expect("start");
    (socket, log, task)
}

fn record(line: &str) -> Vec<u8> {
    agent::encode_line(&LogRecord {
        seq: 1,
        ts_ms: 7,
        source: "agent".into(),
        stream: "info".into(),
        line: line.into(),
    })
    .expect("encode")
}

/// Wait until `log` contains `needle` (the receiver writes asynchronously).
async fn wait_for_log(log: &Path, needle: &str) -> String {
    timeout(HANG, async {
        loop {
            if let Ok(text) = tokio::fs::read_to_string(log).await {
                if text.contains(needle) {
                    return text;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{needle:?} never reached {}", log.display()))
}

#[tokio::test]
async fn an_endless_log_line_closes_only_its_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (socket, log, task) = log_receiver(dir.path());
    let dropped = GUEST_LOG.lines_dropped();

    let mut good = UnixStream::connect(&socket).await.expect("connect");
    good.write_all(&record("before the flood"))
        .await
        .expect("write");
    wait_for_log(&log, "7 [agent/info] before the flood").await;

    let mut endless = UnixStream::connect(&socket).await.expect("connect");
    let sent = AtomicU64::new(0);
    timeout(HANG, flood(&mut endless, FLOOD, &sent))
        .await
        .expect("the host must close the flooding connection");
    let through = sent.load(Ordering::Relaxed);
    assert!(
        through < (MAX_LOG_LINE + 4 * 1024 * 1024) as u64,
        "{through} bytes were read"
    );
    wait_for_log(&log, "[dropped] a log line longer than").await;
    assert!(GUEST_LOG.lines_dropped() > dropped);

    // The other connection and the receiver carry on.
    good.write_all(&record("after the flood"))
        .await
        .expect("write");
    wait_for_log(&log, "7 [agent/info] after the flood").await;
    let mut late = UnixStream::connect(&socket).await.expect("connect");
    late.write_all(&record("a new connection"))
        .await
        .expect("write");
    let text = wait_for_log(&log, "a new connection").await;
    assert!(!text.contains("aaaa"), "the long line must not be logged");
    assert!(!task.is_finished());
}

#[tokio::test]
async fn a_guest_flooding_its_log_stream_leaves_agent_log_under_its_cap() {
    use polydev_host::metrics::{LogName, LOG_CAPS};
    const CAP: u64 = 8192;
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join(format!("vsock.sock_{}", agent::LOG_PORT));
    let log = dir.path().join("agent.log");
    let task = polydev_host::guest_log::start("vm-test", &socket, log.clone(), CAP).expect("start");
    let dropped = LOG_CAPS.lines_dropped(LogName::Agent);
    let mut c = UnixStream::connect(&socket).await.expect("connect");
    let n = 5000;
    for i in 0..n {
        c.write_all(&record(&format!("line {i}")))
            .await
            .expect("write");
    }
    c.write_all(&record("the last line")).await.expect("write");
    let text = wait_for_log(&log, "the last line").await;
    let old = log.with_file_name("agent.log.1");
    for p in [&log, &old] {
        let size = std::fs::metadata(p).expect("log file").len();
        assert!(size <= CAP, "{} is {size} bytes", p.display());
    }
    let kept = |t: &str| t.lines().filter(|l| !l.starts_with("[polydev: ")).count() as u64;
    let old_text = std::fs::read_to_string(&old).expect("agent.log.1");
    let lost = LOG_CAPS.lines_dropped(LogName::Agent) - dropped;
    assert_eq!(lost + kept(&text) + kept(&old_text), n + 1);
    assert!(
        text.starts_with(&format!("[polydev: {lost} lines")),
        "{text}"
    );
    assert!(!task.is_finished());
}

#[tokio::test]
async fn log_connections_over_the_limit_are_closed_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (socket, log, task) = log_receiver(dir.path());
    let refused = GUEST_LOG.connections_refused();

    let mut held = Vec::new();
    for _ in 0..MAX_LOG_CONNECTIONS {
        held.push(UnixStream::connect(&socket).await.expect("connect"));
    }
    let mut extra = UnixStream::connect(&socket).await.expect("connect");
    timeout(HANG, closed(&mut extra))
        .await
        .expect("the connection over the limit must be closed");
    assert!(GUEST_LOG.connections_refused() > refused);

    // The held ones are served.
    let last = held.last_mut().expect("held");
    last.write_all(&record("from a held connection"))
        .await
        .expect("write");
    wait_for_log(&log, "from a held connection").await;

    // A freed slot is taken by a later connection (the receiver notices the
    // end of the old one asynchronously, so try until one is served).
    drop(held.remove(0));
    timeout(HANG, async {
        for n in 0.. {
            let mut c = UnixStream::connect(&socket).await.expect("connect");
            let _ = c.write_all(&record(&format!("retry {n}"))).await;
            let _ = c.shutdown().await;
            closed(&mut c).await;
            let text = tokio::fs::read_to_string(&log).await.unwrap_or_default();
            if text.contains("retry ") {
                return;
            }
        }
    })
    .await
    .expect("a freed slot must be usable again");
    assert!(!task.is_finished());
}

#[tokio::test]
async fn the_host_client_caps_exec_frames_from_the_host_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("host.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    // A host agent whose exec answer is one endless line.
    let server = tokio::spawn(async move {
        let (conn, _) = listener.accept().await.expect("accept");
        let mut s = BufReader::new(conn);
        let mut line = String::new();
        while s.read_line(&mut line).await.expect("request") > 0 && line != "\r\n" {
            line.clear();
        }
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n";
        if s.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = [
            format!("{:x}\r\n", 64 * 1024).into_bytes(),
            vec![b'a'; 64 * 1024],
            b"\r\n".to_vec(),
        ]
        .concat();
        while counter.load(Ordering::Relaxed) < FLOOD {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
            counter.fetch_add(64 * 1024, Ordering::Relaxed);
        }
        closed(&mut s).await;
    });
    let client = HostClient::new(&socket);
    let req = ExecRequest {
        argv: vec!["true".into()],
        ..Default::default()
    };
    let mut frames = client.exec("vm-test", &req).await.expect("exec");
    let err = timeout(HANG, frames.next())
        .await
        .expect("the flood must end at the cap")
        .expect_err("a frame longer than the cap");
    let want = format!("longer than {MAX_RESPONSE_LINE} bytes");
    assert!(
        matches!(&err, ClientError::Decode(m) if m.contains(&want)),
        "{err}"
    );
    drop(frames);
    timeout(HANG, server)
        .await
        .expect("the client must close the connection")
        .expect("fake host agent");
    let through = sent.load(Ordering::Relaxed);
    assert!(
        through < MAX_RESPONSE_LINE as u64 + 4 * 1024 * 1024,
        "{through} bytes were read"
    );
}
