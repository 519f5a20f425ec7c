//! The per-VM limits of the egress proxy, end to end through its Unix
//! socket to a TCP server on loopback: the connection limit, the idle
//! timeout and the bandwidth cap.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use polydev_api::agent::{encode_line, EgressReply, EgressRequest};
use polydev_api::vm::EgressPolicy;
use polydev_host::egress::{self, EgressLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};

/// One VM's egress proxy, allowed to reach one loopback port directly.
struct Proxy {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    log: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    fn start(port: u16, limits: EgressLimits) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("egress.sock");
        let log = dir.path().join("egress.log");
        let policy = EgressPolicy {
            allow: vec![format!("127.0.0.1:{port}")],
            direct: true,
            ..Default::default()
        };
        let task = egress::start(
            "vm-limits",
            &sock,
            Some(&policy),
            limits,
            log.clone(),
            polydev_host::logfile::DEFAULT_LOG_MAX_BYTES,
        )
        .expect("start egress proxy");
        Proxy {
            _dir: dir,
            sock,
            log,
            task,
        }
    }

    /// Opens a connection to `127.0.0.1:port` and returns the reply and the
    /// stream after it.
    async fn open(&self, port: u16) -> (EgressReply, UnixStream) {
        let mut s = UnixStream::connect(&self.sock).await.expect("connect");
        let req = EgressRequest {
            host: "127.0.0.1".into(),
            port,
        };
        s.write_all(&encode_line(&req).expect("encode"))
            .await
            .expect("send request");
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).await.expect("read reply") == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        (serde_json::from_slice(&line).expect("reply json"), s)
    }

    /// Waits until the log holds `n` finished connections; returns them.
    async fn wait_log(&self, n: usize) -> Vec<serde_json::Value> {
        wait_log(&self.log, n).await
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn wait_log(log: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{n} log lines expected, have:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A TCP server that keeps every connection open and counts the bytes it
/// reads on each; the totals come back as connections close.
async fn sink() -> (u16, tokio::sync::mpsc::UnboundedReceiver<u64>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0u64;
                while let Ok(n) = c.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = tx.send(total);
            });
        }
    });
    (port, rx)
}

fn limits() -> EgressLimits {
    EgressLimits {
        max_connections: 2,
        idle_timeout: Duration::from_secs(300),
        bytes_per_sec: 0,
        connect_timeout: Duration::from_secs(10),
    }
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_until_one_closes() {
    let (port, _totals) = sink().await;
    let proxy = Proxy::start(port, limits());
    let (a, first) = proxy.open(port).await;
    let (b, _second) = proxy.open(port).await;
    assert!(a.ok && b.ok, "{a:?} {b:?}");

    let (third, _) = proxy.open(port).await;
    assert!(!third.ok && third.denied, "{third:?}");
    let why = third.reason.unwrap_or_default();
    assert!(
        why.contains("already has 2 egress connections open")
            && why.contains("--egress-max-connections"),
        "{why}"
    );

    // Closing one frees its slot: the refusal and the close are logged.
    drop(first);
    let lines = proxy.wait_log(2).await;
    assert!(lines.iter().any(|l| l["outcome"] == "denied"), "{lines:?}");
    let (fourth, _fourth) = proxy.open(port).await;
    assert!(fourth.ok, "{fourth:?}");
}

#[tokio::test]
async fn a_connection_quiet_for_the_idle_timeout_is_closed() {
    let (port, mut totals) = sink().await;
    let proxy = Proxy::start(
        port,
        EgressLimits {
            idle_timeout: Duration::from_secs(1),
            ..limits()
        },
    );
    let (reply, mut s) = proxy.open(port).await;
    assert!(reply.ok, "{reply:?}");
    s.write_all(b"one write, then silence")
        .await
        .expect("write");
    // The proxy closes the guest's side: EOF, not a hang.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut rest))
        .await
        .expect("the idle connection was never closed")
        .expect("read to the end");
    assert!(rest.is_empty());
    // The remote side was closed too, after the bytes arrived.
    assert_eq!(totals.recv().await, Some(23));
    let lines = proxy.wait_log(1).await;
    assert_eq!(lines[0]["reason"], "idle for 1 s", "{lines:?}");
    assert_eq!(lines[0]["bytes_up"], 23, "{lines:?}");
}

#[tokio::test]
async fn the_bandwidth_cap_paces_a_transfer() {
    const RATE: u64 = 100_000;
    const SENT: usize = 300_000;
    let (port, mut totals) = sink().await;
    let proxy = Proxy::start(
        port,
        EgressLimits {
            bytes_per_sec: RATE,
            ..limits()
        },
    );
    let (reply, mut s) = proxy.open(port).await;
    assert!(reply.ok, "{reply:?}");
    let started = Instant::now();
    s.write_all(&vec![7u8; SENT]).await.expect("write");
    s.shutdown().await.expect("shutdown");
    assert_eq!(totals.recv().await, Some(SENT as u64));
    // A lower bound only (load can slow a transfer, never speed it up): a
    // full bucket bursts one second's worth, the rest waits for tokens.
    let floor = Duration::from_secs_f64((SENT as u64 - RATE) as f64 / RATE as f64);
    let took = started.elapsed();
    assert!(
        took >= floor.mul_f64(0.95),
        "{SENT} bytes at {RATE} B/s took {took:?}, under the {floor:?} the cap allows"
    );
    drop(s);
    let lines = proxy.wait_log(1).await;
    assert_eq!(lines[0]["bytes_up"], SENT as u64, "{lines:?}");
}
