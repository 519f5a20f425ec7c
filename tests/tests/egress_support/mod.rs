//! Loopback test peers for the egress tests: an origin server that counts
//! bytes, an HTTP CONNECT upstream and a SOCKS5 upstream that leave from a
//! chosen loopback source address, and a scraper for the host agent's
//! `/v1/metrics`. Everything binds 127.0.0.1 only.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use polydev_e2e::Host;

/// One request as the origin server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Who connected (the upstream's source address, or the host).
    pub peer: SocketAddr,
    /// Request method.
    pub method: String,
    /// Request path.
    pub path: String,
    /// Every byte the client sent on the connection.
    pub received: u64,
    /// Every byte the server sent.
    pub sent: u64,
}

/// Requests seen so far.
pub type SeenLog = Arc<Mutex<Vec<Seen>>>;

/// A snapshot of the log.
pub fn seen_now(seen: &SeenLog) -> Vec<Seen> {
    seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Counts bytes read through it.
struct Counting<R> {
    inner: R,
    n: Arc<Mutex<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        *self.n.lock().unwrap_or_else(|p| p.into_inner()) += k as u64;
        Ok(k)
    }
}

/// Read an HTTP head (up to the blank line) and its header map.
pub fn read_head<R: Read>(r: &mut BufReader<R>) -> Option<(String, Vec<(String, String)>)> {
    let mut first = String::new();
    if r.read_line(&mut first).ok()? == 0 {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).ok()? == 0 {
            return None;
        }
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    Some((first.trim_end().to_string(), headers))
}

/// The body `/big/<n>` answers with.
pub fn big_body(n: usize) -> Vec<u8> {
    (0..n).map(|i| b'a' + (i % 26) as u8).collect()
}

/// Answer one request on `c` (a plain or TLS stream): `hello <METHOD>
/// <path> body=<n>`, or `n` bytes at `/big/<n>`; then close our sending
/// side with `close_write` (the proxy path relays until the origin closes),
/// read whatever else the client sends until it closes too, and record the
/// exchange with exact byte counts both ways.
pub fn serve_one<S: Read + Write>(
    c: S,
    peer: SocketAddr,
    log: &SeenLog,
    close_write: impl FnOnce(&mut S),
) {
    let received = Arc::new(Mutex::new(0u64));
    let mut r = BufReader::new(Counting {
        inner: c,
        n: received.clone(),
    });
    let Some((line, headers)) = read_head(&mut r) else {
        return;
    };
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    if r.read_exact(&mut body).is_err() {
        return;
    }
    let payload = match path.strip_prefix("/big/").and_then(|n| n.parse().ok()) {
        Some(n) => big_body(n),
        // A page whose title a browser shows in its window name.
        None if path.starts_with("/page") => {
            format!("<!doctype html><title>polydev{path}</title><p>hello {method} {path}\n")
                .into_bytes()
        }
        None => format!("hello {method} {path} body={len}\n").into_bytes(),
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        payload.len()
    );
    let w = &mut r.get_mut().inner;
    if w.write_all(head.as_bytes()).is_err() || w.write_all(&payload).is_err() {
        return;
    }
    let _ = w.flush();
    close_write(w);
    let sent = (head.len() + payload.len()) as u64;
    // Drain: the exact count of what the client sent needs its close.
    let mut sink = Vec::new();
    let _ = r.read_to_end(&mut sink);
    let received = *received.lock().unwrap_or_else(|p| p.into_inner());
    log.lock().unwrap_or_else(|p| p.into_inner()).push(Seen {
        peer,
        method,
        path,
        received,
        sent,
    });
}

/// The origin server on 127.0.0.1 (see [`serve_one`]).
pub fn start_server() -> (u16, SeenLog) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind server");
    let port = l.local_addr().expect("addr").port();
    let seen: SeenLog = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let log = log.clone();
            std::thread::spawn(move || {
                let Ok(peer) = c.peer_addr() else {
                    return;
                };
                serve_one(c, peer, &log, |c| {
                    let _ = c.shutdown(Shutdown::Write);
                });
            });
        }
    });
    (port, seen)
}

/// A TCP connection to `to` from the loopback source address `from`.
pub fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sa = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let SocketAddr::V4(to) = to else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor we own; on success it is
    // handed to TcpStream, on failure closed here.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let src = sa(SocketAddrV4::new(from, 0));
        let dst = sa(to);
        if libc::bind(fd, (&src as *const libc::sockaddr_in).cast(), len) < 0
            || libc::connect(fd, (&dst as *const libc::sockaddr_in).cast(), len) < 0
        {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        Ok(TcpStream::from_raw_fd(fd))
    }
}

/// Copy both ways until both sides close; `pending` goes out first.
fn relay(client: TcpStream, pending: Vec<u8>, out: TcpStream) {
    let (Ok(mut out_w), Ok(mut c_w)) = (out.try_clone(), client.try_clone()) else {
        return;
    };
    let mut out_r = out;
    let up = std::thread::spawn(move || {
        let mut c = client;
        let _ = out_w.write_all(&pending);
        let _ = std::io::copy(&mut c, &mut out_w);
        let _ = out_w.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut out_r, &mut c_w);
    let _ = c_w.shutdown(Shutdown::Write);
    let _ = up.join();
}

/// What an upstream proxy saw for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySeen {
    /// `CONNECT` target as sent (`host:port`).
    pub target: String,
    /// Credentials as sent (`Proxy-Authorization` value, or `user:pass`
    /// for SOCKS5).
    pub auth: String,
}

/// Requests an upstream saw.
pub type ProxyLog = Arc<Mutex<Vec<ProxySeen>>>;

/// A user's HTTP upstream: a CONNECT proxy that demands `expected` as
/// `Proxy-Authorization` (407 otherwise; `None`: no check), records every
/// request, and leaves from `source`.
pub fn start_http_upstream(source: Ipv4Addr, expected: Option<String>) -> (u16, ProxyLog) {
    start_http_upstream_routed(source, expected, Vec::new())
}

/// [`start_http_upstream`] that is also the test's stand-in for the
/// internet: a CONNECT to a `routes` target (e.g. a documentation address
/// such as `198.51.100.7:443`, which passes the host's deny list and which
/// a browser does not treat as local) is carried to the mapped loopback
/// address instead, so nothing leaves loopback.
pub fn start_http_upstream_routed(
    source: Ipv4Addr,
    expected: Option<String>,
    routes: Vec<(String, SocketAddr)>,
) -> (u16, ProxyLog) {
    upstream(source, expected, routes, true)
}

/// [`start_http_upstream_routed`] that refuses (502) every target not in
/// `routes` instead of resolving it: a test whose VMs run a whole browser
/// keeps all of its traffic on loopback whatever the browser asks for.
pub fn start_http_upstream_only(
    source: Ipv4Addr,
    expected: Option<String>,
    routes: Vec<(String, SocketAddr)>,
) -> (u16, ProxyLog) {
    upstream(source, expected, routes, false)
}

/// [`start_http_upstream_only`] on a listener the caller bound (several
/// upstreams on consecutive ports, as a provider's port range).
pub fn start_http_upstream_only_on(
    l: TcpListener,
    source: Ipv4Addr,
    expected: Option<String>,
    routes: Vec<(String, SocketAddr)>,
) -> (u16, ProxyLog) {
    upstream_on(l, source, expected, routes, false)
}

/// `n` listeners on consecutive loopback ports (a free range found by
/// trying).
pub fn consecutive_listeners(n: u16) -> Vec<TcpListener> {
    for _ in 0..200 {
        let Ok(first) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(base) = first.local_addr().map(|a| a.port()) else {
            continue;
        };
        if base.checked_add(n).is_none() {
            continue;
        }
        let mut all = vec![first];
        for i in 1..n {
            match TcpListener::bind(("127.0.0.1", base + i)) {
                Ok(l) => all.push(l),
                Err(_) => break,
            }
        }
        if all.len() == usize::from(n) {
            return all;
        }
    }
    panic!("no {n} consecutive free loopback ports");
}

fn upstream(
    source: Ipv4Addr,
    expected: Option<String>,
    routes: Vec<(String, SocketAddr)>,
    resolve: bool,
) -> (u16, ProxyLog) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    upstream_on(l, source, expected, routes, resolve)
}

fn upstream_on(
    l: TcpListener,
    source: Ipv4Addr,
    expected: Option<String>,
    routes: Vec<(String, SocketAddr)>,
    resolve: bool,
) -> (u16, ProxyLog) {
    let port = l.local_addr().expect("addr").port();
    let seen: ProxyLog = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let log = log.clone();
            let expected = expected.clone();
            let routes = routes.clone();
            std::thread::spawn(move || {
                let Ok(mut w) = c.try_clone() else {
                    return;
                };
                let mut r = BufReader::new(c);
                let Some((line, headers)) = read_head(&mut r) else {
                    return;
                };
                let auth = headers
                    .iter()
                    .find(|(k, _)| k == "proxy-authorization")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                let target = line
                    .strip_prefix("CONNECT ")
                    .and_then(|t| t.split(' ').next())
                    .unwrap_or_default()
                    .to_string();
                log.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(ProxySeen {
                        target: target.clone(),
                        auth: auth.clone(),
                    });
                if expected.as_ref().is_some_and(|e| *e != auth) {
                    let _ = w.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n");
                    return;
                }
                let to = routes
                    .iter()
                    .find(|(t, _)| *t == target)
                    .map(|(_, a)| *a)
                    .or_else(|| resolve.then(|| resolve_first(&target)).flatten());
                let Some(out) = to.and_then(|t| connect_from(source, t).ok()) else {
                    let _ = w.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
                    return;
                };
                let _ = w.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
                // The BufReader may hold tunnel bytes already: send them first.
                let pending = r.buffer().to_vec();
                relay(r.into_inner(), pending, out);
            });
        }
    });
    (port, seen)
}

/// The first IPv4 address of `host:port` (the upstream resolves names, as a
/// residential provider would).
fn resolve_first(target: &str) -> Option<SocketAddr> {
    use std::net::ToSocketAddrs;
    target.to_socket_addrs().ok()?.find(SocketAddr::is_ipv4)
}

/// A SOCKS5 upstream (RFC 1928) that demands username/password (RFC
/// 1929) equal to `user`/`pass`, records every CONNECT, resolves names
/// itself and leaves from `source`.
pub fn start_socks5_upstream(source: Ipv4Addr, user: &str, pass: &str) -> (u16, ProxyLog) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind socks upstream");
    let port = l.local_addr().expect("addr").port();
    let seen: ProxyLog = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let expected = format!("{user}:{pass}");
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let log = log.clone();
            let expected = expected.clone();
            std::thread::spawn(move || {
                let _ = socks5_session(c, source, &expected, &log);
            });
        }
    });
    (port, seen)
}

fn socks5_session(
    mut c: TcpStream,
    source: Ipv4Addr,
    expected: &str,
    log: &ProxyLog,
) -> std::io::Result<()> {
    let mut b2 = [0u8; 2];
    c.read_exact(&mut b2)?;
    let mut methods = vec![0u8; usize::from(b2[1])];
    c.read_exact(&mut methods)?;
    if b2[0] != 5 || !methods.contains(&2) {
        return c.write_all(&[5, 0xff]);
    }
    c.write_all(&[5, 2])?;
    // RFC 1929: VER ULEN UNAME PLEN PASSWD.
    c.read_exact(&mut b2)?;
    let mut u = vec![0u8; usize::from(b2[1])];
    c.read_exact(&mut u)?;
    let mut plen = [0u8; 1];
    c.read_exact(&mut plen)?;
    let mut p = vec![0u8; usize::from(plen[0])];
    c.read_exact(&mut p)?;
    let auth = format!(
        "{}:{}",
        String::from_utf8_lossy(&u),
        String::from_utf8_lossy(&p)
    );
    let ok = auth == expected;
    c.write_all(&[1, if ok { 0 } else { 1 }])?;
    if !ok {
        log.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ProxySeen {
                target: String::new(),
                auth,
            });
        return Ok(());
    }
    let mut head = [0u8; 4];
    c.read_exact(&mut head)?;
    let host = match head[3] {
        1 => {
            let mut a = [0u8; 4];
            c.read_exact(&mut a)?;
            Ipv4Addr::from(a).to_string()
        }
        3 => {
            let mut n = [0u8; 1];
            c.read_exact(&mut n)?;
            let mut name = vec![0u8; usize::from(n[0])];
            c.read_exact(&mut name)?;
            String::from_utf8_lossy(&name).into_owned()
        }
        _ => return c.write_all(&[5, 8, 0, 1, 0, 0, 0, 0, 0, 0]),
    };
    let mut port = [0u8; 2];
    c.read_exact(&mut port)?;
    let target = format!("{host}:{}", u16::from_be_bytes(port));
    log.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(ProxySeen {
            target: target.clone(),
            auth,
        });
    if head[1] != 1 {
        return c.write_all(&[5, 7, 0, 1, 0, 0, 0, 0, 0, 0]);
    }
    let Some(out) = resolve_first(&target).and_then(|t| connect_from(source, t).ok()) else {
        return c.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]);
    };
    let bound = match out.local_addr()? {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
    };
    let mut reply = vec![5, 0, 0, 1];
    reply.extend_from_slice(&bound.ip().octets());
    reply.extend_from_slice(&bound.port().to_be_bytes());
    c.write_all(&reply)?;
    relay(c, Vec::new(), out);
    Ok(())
}

/// `Basic base64(user:pass)`, computed here: the test should not trust the
/// code under test to compute what it checks.
pub fn basic(user: &str, pass: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let raw = format!("{user}:{pass}").into_bytes();
    let mut out = String::new();
    for ch in raw.chunks(3) {
        let b = [ch[0], *ch.get(1).unwrap_or(&0), *ch.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= ch.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("Basic {out}")
}

/// A credential unique to this run, generated now (never a literal).
pub fn unique(tag: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("pw-{tag}-{}-{n}", std::process::id())
}

/// `vm exec <vm> -- sh -c <script>` with a generous timeout.
pub fn exec(host: &Host, vm: &str, script: &str) -> polydev_e2e::Run {
    host.cli(&[
        "vm",
        "exec",
        vm,
        // update-ca-certificates in a browser VM has taken over 120 s
        // under TCG while other tests' VMs ran.
        "--timeout",
        "400",
        "--",
        "sh",
        "-c",
        script,
    ])
}

/// `GET /v1/metrics` on the host agent's socket, as name{labels} → value.
pub fn scrape(data: &Path) -> BTreeMap<String, f64> {
    let text = scrape_text(data);
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The raw exposition text (asserts a 200 with the Prometheus type).
pub fn scrape_text(data: &Path) -> String {
    let mut s = UnixStream::connect(data.join("host.sock")).expect("connect host.sock");
    s.write_all(b"GET /v1/metrics HTTP/1.1\r\nHost: host\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).expect("read");
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    // axum may answer chunked; de-chunk if so.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((len, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        return out;
    }
    body.to_string()
}

/// One sample's value, 0 when the series is absent.
pub fn sample(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

/// Configure one upstream provider for a controller on `data`
/// (`<data>/upstreams.toml`): HTTP proxies on 127.0.0.1 at `ports` (e.g.
/// `"10000"` or `"10000-10002"`), user `user`, the password in a 0600 file
/// beside the data directory.
pub fn write_upstreams(data: &Path, ports: &str, user: &str, password: &str) {
    let pw_file = data.with_extension("upstream-password");
    std::fs::write(&pw_file, password).expect("write upstream password");
    std::fs::set_permissions(
        &pw_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod upstream password");
    std::fs::write(
        data.join("upstreams.toml"),
        format!(
            "[[provider]]\nname = \"resi\"\nhost = \"127.0.0.1\"\nports = \"{ports}\"\nusername = \"{user}\"\npassword_file = \"{}\"\n",
            pw_file.display()
        ),
    )
    .expect("write upstreams.toml");
}
