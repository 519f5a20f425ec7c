//! `polydev bench egress`: what the egress path costs. Boots one VM (the
//! `cli` image by default, for its curl) in an in-process host agent whose
//! egress goes to a CONNECT upstream on loopback, with an origin HTTP
//! server on loopback, and compares:
//!
//! - throughput of one large download through guest shim → vsock → host
//!   egress proxy → upstream → origin, against the same download straight
//!   from the host (and through the upstream from the host, to separate
//!   the VM's share from the upstream's);
//! - latency of a small request (fresh connection each, median and p99),
//!   through the VM against direct;
//! - connection setup rate through the shim (each request is a new client
//!   connection, vsock stream, host egress connection and upstream tunnel),
//!   one at a time and 16 at a time.
//!
//! Numbers only; nothing passes or fails. Everything stays on loopback.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use polydev_api::agent::{encode_line, EgressReply, EgressRequest, ExecRequest, Response};
use polydev_api::vm::{EgressPolicy, Secret, Upstream, VmSpec};
use polydev_host::Manager;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};

use crate::hostd;

/// Options of `polydev bench egress`.
#[derive(Args, Clone, Debug)]
pub struct EgressBenchArgs {
    /// Size of the large download, MiB.
    #[arg(long, default_value_t = 64)]
    pub size_mib: u64,
    /// Small requests per latency measurement.
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
    /// Image to boot; it needs curl (the `cli` image has it).
    #[arg(long, default_value = "cli")]
    pub image: String,
    /// The VM's egress bandwidth limit, bytes per second (0: unlimited, so
    /// the path itself is measured).
    #[arg(long, default_value_t = 0)]
    pub bytes_per_sec: u64,
    /// Accelerator: auto, kvm or tcg.
    #[arg(long, default_value = "auto")]
    pub accel: String,
}

/// The origin's body: a repeating pattern, sent from one buffer.
const CHUNK: usize = 1 << 20;

/// The origin server: `/big/<bytes>` or anything else (`ok\n`), one request
/// per connection.
async fn origin(l: TcpListener) {
    let chunk: Arc<Vec<u8>> = Arc::new((0..CHUNK).map(|i| b'a' + (i % 26) as u8).collect());
    while let Ok((mut c, _)) = l.accept().await {
        let chunk = chunk.clone();
        tokio::spawn(async move {
            let Ok(head) = read_head(&mut c).await else {
                return;
            };
            let path = head.split(' ').nth(1).unwrap_or("/").to_string();
            let size: u64 = path
                .strip_prefix("/big/")
                .and_then(|n| n.parse().ok())
                .unwrap_or(3);
            let head =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n");
            if c.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            if size == 3 && !path.starts_with("/big/") {
                let _ = c.write_all(b"ok\n").await;
            } else {
                let mut left = size;
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    if c.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            }
            let _ = c.shutdown().await;
        });
    }
}

/// Read an HTTP head up to the blank line; returns it as text.
async fn read_head(c: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if c.read(&mut b).await? == 0 || head.len() > 64 * 1024 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// The user's upstream: HTTP CONNECT with `Proxy-Authorization` required.
async fn upstream(l: TcpListener, expected: String) {
    while let Ok((mut c, _)) = l.accept().await {
        let expected = expected.clone();
        tokio::spawn(async move {
            let Ok(head) = read_head(&mut c).await else {
                return;
            };
            let authorized = head.lines().any(|l| {
                l.split_once(':').is_some_and(|(k, v)| {
                    k.eq_ignore_ascii_case("proxy-authorization") && v.trim() == expected
                })
            });
            if !authorized {
                let _ = c
                    .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                    .await;
                return;
            }
            let target = head
                .strip_prefix("CONNECT ")
                .and_then(|t| t.split(' ').next())
                .unwrap_or_default()
                .to_string();
            let Ok(mut out) = TcpStream::connect(&target).await else {
                let _ = c.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                return;
            };
            if c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            let _ = c.set_nodelay(true);
            let _ = out.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut c, &mut out).await;
        });
    }
}

/// How a host-side request reaches the origin.
#[derive(Clone, Copy)]
enum Via<'a> {
    /// Straight to the origin.
    Direct,
    /// Through the upstream (`CONNECT` with this authorization).
    Upstream(SocketAddr, &'a str),
    /// Into the VM's host egress proxy socket, as the guest shim would
    /// (`<vmdir>/vsock.sock_1026`): the host's share without the guest's.
    EgressSocket(&'a Path),
}

/// Read one `\n`-terminated line byte by byte (nothing after it).
async fn read_line<S: AsyncReadExt + Unpin>(s: &mut S) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if s.read(&mut b).await? == 0 || line.len() > 64 * 1024 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if b[0] == b'\n' {
            return Ok(line);
        }
        line.push(b[0]);
    }
}

/// Send `GET path` and read the response to its end; returns its length.
async fn get_on<S: AsyncReadExt + AsyncWriteExt + Unpin>(
    s: &mut S,
    origin: SocketAddr,
    path: &str,
) -> anyhow::Result<u64> {
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(total)
}

/// One GET on a fresh connection; returns the response length.
async fn get(origin: SocketAddr, via: Via<'_>, path: &str) -> anyhow::Result<u64> {
    match via {
        Via::Direct => {
            let mut s = TcpStream::connect(origin).await?;
            s.set_nodelay(true)?;
            get_on(&mut s, origin, path).await
        }
        Via::Upstream(up, auth) => {
            let mut s = TcpStream::connect(up).await?;
            s.set_nodelay(true)?;
            s.write_all(
                format!(
                    "CONNECT {origin} HTTP/1.1\r\nHost: {origin}\r\nProxy-Authorization: {auth}\r\n\r\n"
                )
                .as_bytes(),
            )
            .await?;
            let answer = read_head(&mut s).await?;
            if !answer.starts_with("HTTP/1.1 200") {
                bail!("upstream refused: {answer}");
            }
            get_on(&mut s, origin, path).await
        }
        Via::EgressSocket(sock) => {
            let mut s = UnixStream::connect(sock).await?;
            let req = EgressRequest {
                host: origin.ip().to_string(),
                port: origin.port(),
            };
            s.write_all(&encode_line(&req)?).await?;
            let reply: EgressReply = serde_json::from_slice(&read_line(&mut s).await?)?;
            if !reply.ok {
                bail!("host egress proxy refused: {:?}", reply.reason);
            }
            get_on(&mut s, origin, path).await
        }
    }
}

/// Run a shell script in the VM; returns its standard output and error.
async fn vm_sh(mgr: &Manager, id: &str, script: &str) -> anyhow::Result<(String, String)> {
    let mut frames = mgr
        .exec(
            id,
            ExecRequest {
                argv: vec!["sh".into(), "-c".into(), script.into()],
                timeout_ms: Some(600_000),
                ..Default::default()
            },
        )
        .await?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(f) = frames.next().await? {
        match f {
            Response::Stdout { data } => out.extend_from_slice(&data),
            Response::Stderr { data } => err.extend_from_slice(&data),
            Response::Exit(st) if st.code != Some(0) => bail!(
                "`{script}` in the VM failed ({st:?}): {}",
                String::from_utf8_lossy(&err)
            ),
            _ => {}
        }
    }
    Ok((
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    ))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    crate::bench::percentile(sorted, p).unwrap_or(f64::NAN)
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

fn median(v: &[f64]) -> f64 {
    percentile(&sorted(v.to_vec()), 50.0)
}

/// `Basic base64(user:pass)`.
fn basic(user: &str, pass: &str) -> String {
    use base64::Engine as _;
    let raw = format!("{user}:{pass}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

pub async fn run(a: EgressBenchArgs) -> anyhow::Result<i32> {
    if a.size_mib == 0 || a.requests == 0 {
        bail!("--size-mib and --requests must be at least 1");
    }
    let size = a.size_mib * 1024 * 1024;
    let tmp = tempfile::Builder::new()
        .prefix("pdbench")
        .tempdir_in("/tmp")?;
    let host = hostd::host_args_with(&["--accel", &a.accel, "--boot-timeout-s", "300"])
        .context("--accel must be auto, kvm or tcg")?;
    let mut cfg = hostd::config(tmp.path().to_path_buf(), &host).await?;
    cfg.egress.bytes_per_sec = a.bytes_per_sec;

    let ol = TcpListener::bind("127.0.0.1:0").await?;
    let origin_addr = ol.local_addr()?;
    tokio::spawn(origin(ol));
    // A credential made now, for this run only.
    let password = polydev_host::new_id("bench-");
    let auth = basic("bench", &password);
    let ul = TcpListener::bind("127.0.0.1:0").await?;
    let up_addr = ul.local_addr()?;
    tokio::spawn(upstream(ul, auth.clone()));

    println!(
        "polydev bench egress: accelerator {} hypervisor {}, image {}, {} MiB download, {} small requests, VM egress limit {}",
        cfg.accel,
        cfg.hypervisor,
        a.image,
        a.size_mib,
        a.requests,
        if a.bytes_per_sec == 0 {
            "none".to_string()
        } else {
            format!("{} B/s", a.bytes_per_sec)
        }
    );
    let mgr = Manager::start(cfg).await?;
    let spec = VmSpec {
        image: Some(a.image.clone()),
        memory_mib: Some(1024),
        egress: Some(EgressPolicy {
            upstream: Some(Upstream {
                url: format!("http://{up_addr}"),
                username: Some("bench".into()),
                password: Some(Secret::new(password.clone())),
            }),
            allow: vec![origin_addr.to_string()],
            direct: false,
        }),
        ..Default::default()
    };
    let t = Instant::now();
    let vm = mgr.create(&spec).await?;
    println!(
        "{:<48} {:>9.1} s",
        "VM boot to agent-ready",
        t.elapsed().as_secs_f64()
    );
    let sock = tmp.path().join("vms").join(&vm.id).join("vsock.sock_1026");
    let ends = Ends {
        origin: origin_addr,
        up: up_addr,
        auth: &auth,
        sock: &sock,
    };
    let result = measure(&mgr, &vm.id, &a, &ends, size).await;
    let counters = polydev_host::metrics::render(&mgr).await;
    let _ = mgr.destroy(&vm.id).await;
    result?;
    println!("host agent counters after the run:");
    for l in counters
        .lines()
        .filter(|l| l.starts_with("polydev_egress_") && !l.ends_with(" 0"))
    {
        println!("  {l}");
    }
    Ok(0)
}

/// Where the bench's host-side requests go.
struct Ends<'a> {
    origin: SocketAddr,
    up: SocketAddr,
    auth: &'a str,
    /// The VM's host egress proxy socket.
    sock: &'a Path,
}

async fn measure(
    mgr: &Manager,
    id: &str,
    a: &EgressBenchArgs,
    e: &Ends<'_>,
    size: u64,
) -> anyhow::Result<()> {
    let (origin, up, auth) = (e.origin, e.up, e.auth);
    let host_proxy = Via::EgressSocket(e.sock);
    let big = format!("/big/{size}");
    let mib = |bytes: u64, secs: f64| bytes as f64 / (1024.0 * 1024.0) / secs;
    // curl uses the shim explicitly: NO_PROXY names 127.0.0.1.
    let curl = "curl -s --noproxy '' -x http://127.0.0.1:3128";
    let (check, _) = vm_sh(mgr, id, "command -v curl || echo missing").await?;
    if check.trim() == "missing" {
        bail!(
            "image {} has no curl; use --image cli (`polydev image build cli`)",
            a.image
        );
    }

    // Throughput: three runs each, median.
    let mut direct = Vec::new();
    let mut via_up = Vec::new();
    let mut via_host = Vec::new();
    let mut via_vm = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let n = get(origin, Via::Direct, &big).await?;
        direct.push(mib(n, t.elapsed().as_secs_f64()));
        let t = Instant::now();
        let n = get(origin, Via::Upstream(up, auth), &big).await?;
        via_up.push(mib(n, t.elapsed().as_secs_f64()));
        let t = Instant::now();
        let n = get(origin, host_proxy, &big).await?;
        via_host.push(mib(n, t.elapsed().as_secs_f64()));
        let (out, _) = vm_sh(
            mgr,
            id,
            &format!(
                "{curl} -o /dev/null -w '%{{time_total}} %{{size_download}}' http://{origin}{big}"
            ),
        )
        .await?;
        let mut it = out.split_whitespace();
        let secs: f64 = it.next().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
        let got: u64 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if got != size {
            bail!("the VM downloaded {got} of {size} bytes");
        }
        via_vm.push(mib(got, secs));
    }
    let (d, u, v) = (median(&direct), median(&via_up), median(&via_vm));
    println!("throughput, one {} MiB download (median of 3):", a.size_mib);
    println!("  {:<46} {d:>9.1} MiB/s", "host → origin (direct)");
    println!("  {:<46} {u:>9.1} MiB/s", "host → upstream → origin");
    println!(
        "  {:<46} {:>9.1} MiB/s",
        "host egress proxy socket → upstream → origin",
        median(&via_host)
    );
    println!(
        "  {:<46} {v:>9.1} MiB/s",
        "VM shim → vsock → host → upstream → origin"
    );
    println!("  {:<46} {:>9.3}", "ratio VM path / direct", v / d);

    // Latency: a small request on a fresh connection each time.
    let mut lat_direct = Vec::new();
    for _ in 0..a.requests {
        let t = Instant::now();
        get(origin, Via::Direct, "/small").await?;
        lat_direct.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut lat_up = Vec::new();
    for _ in 0..a.requests {
        let t = Instant::now();
        get(origin, Via::Upstream(up, auth), "/small").await?;
        lat_up.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut lat_host = Vec::new();
    for _ in 0..a.requests {
        let t = Instant::now();
        get(origin, host_proxy, "/small").await?;
        lat_host.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // One curl for all requests (no process start per request); `-w` goes
    // to stderr, the bodies to /dev/null. Each URL is a new connection: the
    // shim closes after every plain-HTTP response.
    let (_, err) = vm_sh(
        mgr,
        id,
        &format!(
            "{curl} -w '%{{stderr}}%{{time_total}}\\n' 'http://{origin}/small?[1-{}]' >/dev/null",
            a.requests
        ),
    )
    .await?;
    let lat_vm: Vec<f64> = err
        .lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .map(|s| s * 1000.0)
        .collect();
    if lat_vm.len() != a.requests {
        bail!(
            "expected {} timings from curl in the VM, got {}: {err}",
            a.requests,
            lat_vm.len()
        );
    }
    println!(
        "latency, small request on a fresh connection (n={}):",
        a.requests
    );
    for (name, v) in [
        ("host → origin (direct)", &lat_direct),
        ("host → upstream → origin", &lat_up),
        ("host egress proxy socket → upstream → origin", &lat_host),
        ("VM curl → shim → host → upstream → origin", &lat_vm),
    ] {
        let s = sorted(v.clone());
        println!(
            "  {name:<46} median {:>7.2} ms  p99 {:>7.2} ms",
            percentile(&s, 50.0),
            percentile(&s, 99.0)
        );
    }
    let added = |p: f64| {
        percentile(&sorted(lat_vm.clone()), p) - percentile(&sorted(lat_direct.clone()), p)
    };
    println!(
        "  {:<46} median {:>7.2} ms  p99 {:>7.2} ms",
        "added by the VM path",
        added(50.0),
        added(99.0)
    );

    // Connection setup rate through the shim: sequential and 16 parallel.
    let n = a.requests.max(100);
    println!("connection setup rate (small request per connection, n={n}):");
    for parallel in [1usize, 16] {
        let flags = if parallel > 1 {
            format!("-Z --parallel-max {parallel} --parallel-immediate")
        } else {
            String::new()
        };
        let (out, _) = vm_sh(
            mgr,
            id,
            &format!(
                "s=$(date +%s%N); {curl} {flags} -o /dev/null 'http://{origin}/small?[1-{n}]' >/dev/null; e=$(date +%s%N); echo $((e - s))"
            ),
        )
        .await?;
        let ns: f64 = out.trim().parse().unwrap_or(f64::NAN);
        let vm_rate = n as f64 / (ns / 1e9);
        // The same from the host, directly, for scale.
        let t = Instant::now();
        let mut left = n;
        while left > 0 {
            let batch = left.min(parallel);
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..batch {
                set.spawn(async move { get(origin, Via::Direct, "/small").await.map(|_| ()) });
            }
            while let Some(r) = set.join_next().await {
                r??;
            }
            left -= batch;
        }
        let direct_rate = n as f64 / t.elapsed().as_secs_f64();
        println!(
            "  {:<46} {vm_rate:>9.1} conn/s through the VM   {direct_rate:>9.1} conn/s direct",
            format!("{parallel} at a time")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::basic;

    #[test]
    fn basic_is_standard_base64_with_padding() {
        // RFC 7617's example, and the padded lengths (1 and 2 spare bytes).
        assert_eq!(
            basic("Aladdin", "open sesame"),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert_eq!(basic("alice", "s3cret"), "Basic YWxpY2U6czNjcmV0");
        assert_eq!(basic("a", "b"), "Basic YTpi");
        assert_eq!(basic("ab", "c"), "Basic YWI6Yw==");
    }
}
