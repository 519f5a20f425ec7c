//! The host egress proxy: the far end of every VM's guest proxy.
//!
//! A VM has no network interface; its guest agent carries each outgoing
//! connection as a guest-initiated stream to [`EGRESS_PORT`], which arrives
//! at `<vmdir>/vsock.sock_1026`. Because that socket belongs to one VM, the
//! proxy knows which VM (and so which user) a connection is from without
//! trusting anything the guest says.
//!
//! Per connection: read one [`EgressRequest`] line; read its host as the
//! most permissive resolver would (`policy`: `127.1` is 127.0.0.1,
//! `localhost` is loopback); for direct egress resolve names here (the
//! guest has no DNS; with an upstream a name goes to the upstream
//! unresolved, and only addresses, in canonical form, and loopback names
//! are checked),
//! refuse addresses on the deny list (private,
//! loopback, link-local including 169.254.169.254, multicast, the host's own
//! addresses) unless the VM's allow list names them, then either chain to
//! the VM's upstream proxy (`CONNECT` with `Proxy-Authorization`) or dial
//! directly when the policy says `direct`; answer one [`EgressReply`] line
//! and splice, under the VM's limits (concurrent connections, a shared
//! bytes-per-second token bucket, an idle timeout). Each connection ends in
//! one `tracing` event and one JSON line in `<vmdir>/egress.log` (a
//! [`crate::logfile::CappedLog`], rotated at `--log-max-bytes`), which name
//! the upstream by address only — never its credentials.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use polydev_api::agent::{encode_line, EgressReply, EgressRequest, MAX_EGRESS_LINE};
use polydev_api::vm::{EgressPolicy, Secret};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::info;

use crate::logfile::{append, open_shared, SharedLog};
use crate::metrics::{Direction, LogName, Outcome, Reason, EGRESS};

mod host_addrs;
mod policy;
mod upstream;

pub use host_addrs::{host_addresses, AddressSource, HostAddresses};
use policy::{decide, Refused, Resolver, Route, Rules};
pub use policy::{deny_reason, AllowRule, Target, TargetError};
use upstream::{http_connect, join_host_port, socks5_connect};

#[cfg(doc)]
use polydev_api::agent::EGRESS_PORT;

/// Per-VM limits of the egress proxy (set on `polydev host`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressLimits {
    /// Connections open at once; more are refused.
    pub max_connections: usize,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// Bytes per second, both directions together (0: unlimited).
    pub bytes_per_sec: u64,
    /// How long dialing the target or the upstream may take.
    pub connect_timeout: Duration,
}

impl Default for EgressLimits {
    fn default() -> Self {
        EgressLimits {
            // A browser opens ~6 per origin; a busy page touches a dozen.
            max_connections: 256,
            idle_timeout: Duration::from_secs(300),
            // 25 MiB/s: well above one user's need, well below a host NIC.
            bytes_per_sec: 25 * 1024 * 1024,
            connect_timeout: Duration::from_secs(15),
        }
    }
}

/// A VM's egress policy could not be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EgressError {
    /// The upstream URL is not `http://host:port` or `socks5://host:port`.
    #[error("egress upstream {0:?} must be http://HOST:PORT or socks5://HOST:PORT (other schemes are not supported)")]
    UpstreamUrl(String),
    /// A SOCKS5 user name or password is empty or longer than 255 bytes.
    #[error("a SOCKS5 upstream's user name and password must each be 1 to 255 bytes (RFC 1929)")]
    SocksCredentialLength,
    /// The upstream has a password but no user name, or the reverse.
    #[error("egress upstream credentials need both a user name and a password (the password via POLYDEV_EGRESS_PASSWORD)")]
    HalfCredentials,
    /// A user name contains `:` or control characters.
    #[error("egress upstream user name must not contain ':' or control characters")]
    BadUser,
    /// An allow entry is not `ADDR[/PREFIX]:PORT|*`.
    #[error("egress allow entry {0:?} must be ADDR[/PREFIX]:PORT or ADDR[/PREFIX]:* (IPv6 in brackets, e.g. [::1]:8080)")]
    BadAllow(String),
    /// Both an upstream and `direct`.
    #[error("egress policy names an upstream and direct: choose one")]
    UpstreamAndDirect,
}

/// A policy checked and ready to apply.
#[derive(Clone)]
struct Compiled {
    upstream: Option<UpstreamCfg>,
    allow: Vec<AllowRule>,
    direct: bool,
}

#[derive(Clone)]
struct UpstreamCfg {
    /// `host:port`, what logs name.
    addr: String,
    /// How to ask it for a tunnel, with the credentials it needs.
    proto: UpstreamProto,
}

/// The upstream's protocol and credentials (never logged).
#[derive(Clone)]
enum UpstreamProto {
    /// HTTP `CONNECT`, with this `Proxy-Authorization` value (`Basic …`).
    Http { auth: Option<String> },
    /// SOCKS5 (RFC 1928) `CONNECT`, with RFC 1929 username/password when
    /// given.
    Socks5 { auth: Option<(String, Secret)> },
}

/// Check a policy (at VM creation, so a bad one creates nothing).
pub fn validate(p: &EgressPolicy) -> Result<(), EgressError> {
    compile(p).map(|_| ())
}

fn compile(p: &EgressPolicy) -> Result<Compiled, EgressError> {
    let allow = p
        .allow
        .iter()
        .map(|s| AllowRule::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    let upstream = match &p.upstream {
        None => None,
        Some(u) => {
            if p.direct {
                return Err(EgressError::UpstreamAndDirect);
            }
            let (socks, addr) = parse_upstream_url(&u.url)?;
            let creds = match (&u.username, &u.password) {
                (Some(user), Some(pass)) => {
                    if user.contains(':') || user.chars().any(char::is_control) {
                        return Err(EgressError::BadUser);
                    }
                    Some((user.clone(), pass.clone()))
                }
                (None, None) => None,
                _ => return Err(EgressError::HalfCredentials),
            };
            let proto = if socks {
                // RFC 1929 carries each in one length byte.
                if let Some((user, pass)) = &creds {
                    if user.is_empty()
                        || user.len() > 255
                        || pass.expose().is_empty()
                        || pass.expose().len() > 255
                    {
                        return Err(EgressError::SocksCredentialLength);
                    }
                }
                UpstreamProto::Socks5 { auth: creds }
            } else {
                UpstreamProto::Http {
                    auth: creds.map(|(user, pass)| {
                        let raw = format!("{user}:{}", pass.expose());
                        format!(
                            "Basic {}",
                            base64::engine::general_purpose::STANDARD.encode(raw)
                        )
                    }),
                }
            };
            Some(UpstreamCfg { addr, proto })
        }
    };
    Ok(Compiled {
        upstream,
        allow,
        direct: p.direct,
    })
}

/// `http://host:port[/]`, `socks5://host:port` or `socks5h://host:port` →
/// (whether SOCKS5, `host:port`).
fn parse_upstream_url(url: &str) -> Result<(bool, String), EgressError> {
    let bad = || EgressError::UpstreamUrl(url.to_string());
    let (socks, rest) = if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = url
        .strip_prefix("socks5://")
        .or_else(|| url.strip_prefix("socks5h://"))
    {
        (true, r)
    } else {
        return Err(bad());
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '@', '?', '#', ' ']) {
        return Err(bad());
    }
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(bad)?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok((socks, rest.to_string()))
}

/// A token bucket: `rate` tokens (bytes) per second, at most `burst` saved.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket; `rate` 0 means unlimited.
    pub fn new(rate: u64, now: Instant) -> Self {
        let rate = rate as f64;
        // One second of traffic may burst; a smaller burst would throttle
        // ordinary 64 KiB reads at low rates.
        let burst = rate.max(64.0 * 1024.0);
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Take `n` bytes; returns how long to wait before sending them. Debt is
    /// allowed, so a large read is never starved, only delayed.
    pub fn take(&mut self, n: usize, now: Instant) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// What the proxy shares between all connections of one VM.
struct VmEgress {
    vm: String,
    policy: Compiled,
    limits: EgressLimits,
    /// The host's own addresses, refreshed as they change.
    own: HostAddresses,
    slots: Arc<Semaphore>,
    bucket: StdMutex<TokenBucket>,
    log: SharedLog,
}

/// Serve `<vmdir>/vsock.sock_1026` for one VM. `policy` `None` refuses
/// everything (with a reason the guest shows). The listener is bound before
/// this returns, so the guest can connect as soon as it boots.
pub fn start(
    vm: &str,
    socket: &Path,
    policy: Option<&EgressPolicy>,
    limits: EgressLimits,
    log: PathBuf,
    log_max_bytes: u64,
) -> std::io::Result<JoinHandle<()>> {
    let policy = match policy {
        Some(p) => compile(p).map_err(std::io::Error::other)?,
        None => Compiled {
            upstream: None,
            allow: Vec::new(),
            direct: false,
        },
    };
    let log = open_shared(log, LogName::Egress, log_max_bytes)?;
    let listener = crate::private::bind_tokio(socket)?;
    let shared = Arc::new(VmEgress {
        vm: vm.to_string(),
        policy,
        limits,
        own: HostAddresses::system(),
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        bucket: StdMutex::new(TokenBucket::new(limits.bytes_per_sec, Instant::now())),
        log,
    });
    Ok(tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let shared = shared.clone();
            tokio::spawn(async move { shared.serve(conn).await });
        }
    }))
}

/// One connection's log line.
#[derive(Serialize)]
struct ConnLog<'a> {
    ts_ms: u64,
    vm: &'a str,
    target: String,
    upstream: Option<&'a str>,
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    bytes_up: u64,
    bytes_down: u64,
    duration_ms: u64,
}

/// How a connection was refused before any byte flowed.
struct Refusal {
    denied: bool,
    kind: Reason,
    reason: String,
}

impl Refusal {
    fn denied(kind: Reason, reason: String) -> Self {
        Refusal {
            denied: true,
            kind,
            reason,
        }
    }
    fn failed(kind: Reason, reason: String) -> Self {
        Refusal {
            denied: false,
            kind,
            reason,
        }
    }
}

impl VmEgress {
    async fn serve(self: Arc<Self>, mut guest: UnixStream) {
        let _active = EGRESS.open();
        let started = Instant::now();
        let mut target = String::from("?");
        let upstream = self.policy.upstream.as_ref().map(|u| u.addr.as_str());
        let setup = async {
            let slot = self.slots.clone().try_acquire_owned().map_err(|_| {
                Refusal::denied(Reason::ConnectionLimit, format!(
                    "this VM already has {} egress connections open (the host's --egress-max-connections)",
                    self.limits.max_connections
                ))
            })?;
            let req = read_request(&mut guest).await?;
            target = join_host_port(&req.host, req.port);
            let remote = self.connect(&req).await?;
            Ok::<_, Refusal>((remote, slot))
        }
        .await;
        let (outcome, kind, reason, up, down) = match setup {
            Ok((remote, _slot)) => {
                let ok = EgressReply {
                    ok: true,
                    reason: None,
                    denied: false,
                };
                match send_reply(&mut guest, &ok).await {
                    Ok(()) => {
                        let (up, down, end) = self.splice(guest, remote).await;
                        let (kind, why) = match end {
                            None => (Reason::Eof, None),
                            Some(e) => (e.kind, Some(e.reason)),
                        };
                        (Outcome::Closed, kind, why, up, down)
                    }
                    Err(e) => (
                        Outcome::Failed,
                        Reason::GuestGone,
                        Some(format!("guest went away: {e}")),
                        0,
                        0,
                    ),
                }
            }
            Err(r) => {
                let reply = EgressReply {
                    ok: false,
                    reason: Some(r.reason.clone()),
                    denied: r.denied,
                };
                // The guest may already be gone; the log line says why anyway.
                let _ = send_reply(&mut guest, &reply).await;
                (
                    if r.denied {
                        Outcome::Denied
                    } else {
                        Outcome::Failed
                    },
                    r.kind,
                    Some(r.reason),
                    0,
                    0,
                )
            }
        };
        EGRESS.finished(outcome, kind);
        let outcome = outcome.as_str();
        let line = ConnLog {
            ts_ms: crate::now_ms(),
            vm: &self.vm,
            target: target.clone(),
            upstream,
            outcome,
            reason: reason.clone(),
            bytes_up: up,
            bytes_down: down,
            duration_ms: started.elapsed().as_millis() as u64,
        };
        info!(
            vm = %self.vm,
            target = %target,
            upstream = upstream.unwrap_or("direct"),
            outcome,
            reason = reason.as_deref().unwrap_or(""),
            bytes_up = up,
            bytes_down = down,
            duration_ms = line.duration_ms,
            "egress connection"
        );
        if let Ok(mut text) = serde_json::to_string(&line) {
            text.push('\n');
            let _ = append(&self.log, text.as_bytes());
        }
    }

    /// Resolve, check and dial; for an upstream, ask it for a tunnel.
    async fn connect(&self, req: &EgressRequest) -> Result<TcpStream, Refusal> {
        // Before resolving: a name the guest chose must not even reach the
        // host's resolver (a DNS query is a way out) when nothing may leave.
        if self.policy.upstream.is_none() && !self.policy.direct {
            return Err(Refusal::denied(
                Reason::NoPolicy,
                "this VM has no egress upstream and direct egress is off (vm run --egress-upstream or --egress-direct)"
                    .into(),
            ));
        }
        let own = self.own.get(Instant::now());
        let rules = Rules {
            upstream: self.policy.upstream.is_some(),
            allow: &self.policy.allow,
            own: &own,
        };
        let route = decide(&req.host, req.port, &rules, &SystemResolver)
            .await
            .map_err(|e| match e {
                Refused::Target(_) => Refusal::failed(Reason::BadRequest, e.to_string()),
                Refused::Denied { .. } => Refusal::denied(Reason::DenyList, e.to_string()),
                Refused::Resolve { .. } => Refusal::failed(Reason::Resolve, e.to_string()),
            })?;
        let timeout = self.limits.connect_timeout;
        let addrs = match (&self.policy.upstream, route) {
            (Some(up), Route::Upstream(host)) => {
                return self.tunnel(up, &host, req.port).await;
            }
            (None, Route::Direct(addrs)) => addrs,
            // decide() answers in the mode it is given; no other pair occurs.
            _ => {
                return Err(Refusal::failed(
                    Reason::Connect,
                    "internal error: the egress route does not match the VM's policy".into(),
                ))
            }
        };
        let mut last = None;
        for a in addrs {
            match tokio::time::timeout(timeout, TcpStream::connect(a)).await {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(e)) => last = Some(format!("{a}: {e}")),
                Err(_) => last = Some(format!("{a}: timed out")),
            }
        }
        Err(Refusal::failed(
            Reason::Connect,
            format!(
                "cannot connect to {}: {}",
                join_host_port(&req.host, req.port),
                last.unwrap_or_else(|| "no address".into())
            ),
        ))
    }

    /// Ask the upstream for a tunnel to `host:port`. `host` is a name as the
    /// guest sent it (a residential provider resolves it where the request
    /// leaves) or the canonical form of a checked address.
    async fn tunnel(&self, up: &UpstreamCfg, host: &str, port: u16) -> Result<TcpStream, Refusal> {
        let timeout = self.limits.connect_timeout;
        let mut s = dial(&up.addr, timeout).await.map_err(|e| {
            Refusal::failed(
                Reason::UpstreamConnect,
                format!("upstream proxy {}: {e}", up.addr),
            )
        })?;
        let handshake = async {
            match &up.proto {
                UpstreamProto::Http { auth } => {
                    http_connect(&mut s, host, port, auth.as_deref()).await
                }
                UpstreamProto::Socks5 { auth } => {
                    socks5_connect(&mut s, host, port, auth.as_ref()).await
                }
            }
        };
        tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| {
                Refusal::failed(
                    Reason::UpstreamRefused,
                    format!("upstream proxy {} did not answer", up.addr),
                )
            })?
            .map_err(|e| {
                Refusal::failed(
                    Reason::UpstreamRefused,
                    format!("upstream proxy {}: {e}", up.addr),
                )
            })?;
        Ok(s)
    }

    /// Copy both ways under the VM's bucket and idle timeout; half-closes
    /// pass through. Returns bytes up, bytes down and why it ended early.
    async fn splice(&self, guest: UnixStream, remote: TcpStream) -> (u64, u64, Option<Ended>) {
        let _ = remote.set_nodelay(true);
        let (gr, gw) = guest.into_split();
        let (rr, rw) = remote.into_split();
        let last = StdMutex::new(Instant::now());
        let (up, down) = tokio::join!(
            self.pump(gr, rw, &last, Direction::Up),
            self.pump(rr, gw, &last, Direction::Down)
        );
        let why = up.1.or(down.1);
        (up.0, down.0, why)
    }

    async fn pump<R, W>(
        &self,
        mut from: R,
        mut to: W,
        last: &StdMutex<Instant>,
        dir: Direction,
    ) -> (u64, Option<Ended>)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let idle = self.limits.idle_timeout;
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = match tokio::time::timeout(idle, from.read(&mut buf)).await {
                Ok(Ok(0)) => {
                    let _ = to.shutdown().await;
                    return (total, None);
                }
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return (total, Some(Ended::io(e))),
                Err(_) => {
                    // Idle only if the other direction was quiet too.
                    let quiet = last.lock().map(|l| l.elapsed() >= idle).unwrap_or(true);
                    if quiet {
                        let _ = to.shutdown().await;
                        return (
                            total,
                            Some(Ended {
                                kind: Reason::IdleTimeout,
                                reason: format!("idle for {} s", idle.as_secs()),
                            }),
                        );
                    }
                    continue;
                }
            };
            if let Ok(mut l) = last.lock() {
                *l = Instant::now();
            }
            let wait = self
                .bucket
                .lock()
                .map(|mut b| b.take(n, Instant::now()))
                .unwrap_or_default();
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            if let Err(e) = to.write_all(&buf[..n]).await {
                return (total, Some(Ended::io(e)));
            }
            total += n as u64;
            EGRESS.bytes(dir, n as u64);
        }
    }
}

/// Why a spliced connection ended before both sides closed.
struct Ended {
    kind: Reason,
    reason: String,
}

impl Ended {
    fn io(e: std::io::Error) -> Self {
        Ended {
            kind: Reason::IoError,
            reason: e.to_string(),
        }
    }
}
async fn send_reply(guest: &mut UnixStream, reply: &EgressReply) -> std::io::Result<()> {
    let line = encode_line(reply).map_err(std::io::Error::other)?;
    guest.write_all(&line).await
}

/// Read the request line byte by byte, so nothing after it is consumed.
async fn read_request(guest: &mut UnixStream) -> Result<EgressRequest, Refusal> {
    let mut line = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut b = [0u8; 1];
        loop {
            if guest.read(&mut b).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "guest closed before its request",
                ));
            }
            if b[0] == b'\n' {
                return Ok(());
            }
            if line.len() >= MAX_EGRESS_LINE {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "request line too long",
                ));
            }
            line.push(b[0]);
        }
    })
    .await;
    match read {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(Refusal::failed(
                Reason::BadRequest,
                format!("bad egress request: {e}"),
            ))
        }
        Err(_) => {
            return Err(Refusal::failed(
                Reason::BadRequest,
                "no egress request within 10 s".into(),
            ))
        }
    }
    parse_request(&line).map_err(|e| Refusal::failed(Reason::BadRequest, e.to_string()))
}

/// A guest's egress request line that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Not the JSON of an [`EgressRequest`].
    #[error("bad egress request: {0}")]
    Json(#[from] serde_json::Error),
    /// Port 0, or a host that is empty or longer than a DNS name can be.
    #[error("bad egress target {host:?}:{port}")]
    Target {
        /// The host as sent.
        host: String,
        /// The port as sent.
        port: u16,
    },
}

/// Decode one request line as the guest sent it (without its newline).
/// Public so the fuzz targets exercise the parser the proxy uses; what the
/// host may be is decided later by [`Target::parse`] and the policy.
pub fn parse_request(line: &[u8]) -> Result<EgressRequest, RequestError> {
    let req: EgressRequest = serde_json::from_slice(line)?;
    // What the host may be (name, address in any form) is policy's call:
    // Target::parse.
    if req.port == 0 || req.host.is_empty() || req.host.len() > 253 {
        return Err(RequestError::Target {
            host: req.host,
            port: req.port,
        });
    }
    Ok(req)
}

/// The host's resolver (`getaddrinfo` via tokio), for direct egress.
struct SystemResolver;

impl Resolver for SystemResolver {
    async fn lookup(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }
}

async fn dial(addr: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use polydev_api::vm::{Secret, Upstream};

    #[test]
    fn policies_validate() {
        let up = |url: &str, user: Option<&str>, pass: Option<&str>| EgressPolicy {
            upstream: Some(Upstream {
                url: url.into(),
                username: user.map(str::to_string),
                password: pass.map(Secret::new),
            }),
            ..Default::default()
        };
        assert!(validate(&up("http://127.0.0.1:3128", Some("u"), Some("p"))).is_ok());
        assert!(validate(&up("http://proxy.example:8080/", None, None)).is_ok());
        assert_eq!(
            validate(&up("https://p:1", None, None)),
            Err(EgressError::UpstreamUrl("https://p:1".into()))
        );
        assert!(validate(&up("http://u:p@p:1", None, None)).is_err());
        assert!(validate(&up("http://p", None, None)).is_err());
        assert_eq!(
            validate(&up("http://p:1", Some("u"), None)),
            Err(EgressError::HalfCredentials)
        );
        assert_eq!(
            validate(&up("http://p:1", Some("a:b"), Some("c"))),
            Err(EgressError::BadUser)
        );
        let mut both = up("http://p:1", None, None);
        both.direct = true;
        assert_eq!(validate(&both), Err(EgressError::UpstreamAndDirect));
        assert!(validate(&EgressPolicy {
            allow: vec!["nope".into()],
            ..Default::default()
        })
        .is_err());
    }

    #[test]
    fn compiled_auth_is_basic_and_errors_never_carry_the_password() {
        let p = EgressPolicy {
            upstream: Some(Upstream {
                url: "http://127.0.0.1:9".into(),
                username: Some("alice".into()),
                password: Some(Secret::new("s3cret")),
            }),
            ..Default::default()
        };
        let c = compile(&p).ok().unwrap();
        let up = c.upstream.unwrap();
        match up.proto {
            UpstreamProto::Http { auth } => {
                assert_eq!(auth.as_deref(), Some("Basic YWxpY2U6czNjcmV0"))
            }
            UpstreamProto::Socks5 { .. } => panic!("http:// is an HTTP upstream"),
        }
        assert_eq!(up.addr, "127.0.0.1:9");
    }

    #[test]
    fn socks5_upstreams_parse_and_check_rfc1929_lengths() {
        let up = |url: &str, user: &str, pass: &str| EgressPolicy {
            upstream: Some(Upstream {
                url: url.into(),
                username: Some(user.into()),
                password: Some(Secret::new(pass)),
            }),
            ..Default::default()
        };
        for url in ["socks5://127.0.0.1:1080", "socks5h://proxy.example:1080/"] {
            let c = compile(&up(url, "u", "p")).ok().unwrap().upstream.unwrap();
            assert!(
                matches!(c.proto, UpstreamProto::Socks5 { auth: Some(_) }),
                "{url}"
            );
        }
        assert_eq!(
            validate(&up("socks5://p:1", &"u".repeat(256), "p")),
            Err(EgressError::SocksCredentialLength)
        );
        assert_eq!(
            validate(&up("socks5://p:1", "u", "")),
            Err(EgressError::SocksCredentialLength)
        );
        assert!(validate(&up("socks4://p:1", "u", "p")).is_err());
    }

    #[test]
    fn token_bucket_allows_a_burst_then_paces() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100_000, t0);
        assert_eq!(b.take(100_000, t0), Duration::ZERO, "a full second bursts");
        let w = b.take(50_000, t0);
        assert!((w.as_secs_f64() - 0.5).abs() < 1e-6, "{w:?}");
        // Half a second later the debt is paid; another 50 kB waits 0.5 s.
        let t1 = t0 + Duration::from_millis(500);
        let w = b.take(50_000, t1);
        assert!((w.as_secs_f64() - 0.5).abs() < 1e-6, "{w:?}");
        // Refill never exceeds the burst.
        let t2 = t1 + Duration::from_secs(100);
        assert_eq!(b.take(100_000, t2), Duration::ZERO);
        assert!(b.take(1, t2) > Duration::ZERO);
        let mut unlimited = TokenBucket::new(0, t0);
        assert_eq!(unlimited.take(usize::MAX, t0), Duration::ZERO);
    }

    /// Ask the egress proxy of a VM with `policy` for `host:443`; its reply
    /// and the finished log line.
    async fn ask(policy: Option<&EgressPolicy>, host: &str) -> (EgressReply, String) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("egress.sock");
        let task = start(
            "vm-test",
            &sock,
            policy,
            EgressLimits::default(),
            dir.path().join("egress.log"),
            crate::logfile::DEFAULT_LOG_MAX_BYTES,
        )
        .unwrap();
        let mut guest = UnixStream::connect(&sock).await.unwrap();
        let req = EgressRequest {
            host: host.into(),
            port: 443,
        };
        guest.write_all(&encode_line(&req).unwrap()).await.unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while guest.read(&mut b).await.unwrap() == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        let reply: EgressReply = serde_json::from_slice(&line).unwrap();
        drop(guest);
        // The log line is written when the connection ends.
        let deadline = Instant::now() + Duration::from_secs(10);
        let log = loop {
            let log = std::fs::read_to_string(dir.path().join("egress.log")).unwrap_or_default();
            if log.ends_with('\n') || Instant::now() > deadline {
                break log;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        task.abort();
        (reply, log)
    }

    /// Without a policy nothing is resolved: the refusal names the missing
    /// policy even for a name no resolver knows.
    #[tokio::test]
    async fn without_a_policy_names_are_refused_before_any_lookup() {
        let (reply, log) = ask(None, "no-such-name.invalid").await;
        assert!(!reply.ok && reply.denied, "{reply:?}");
        let reason = reply.reason.unwrap_or_default();
        assert!(reason.contains("no egress upstream"), "{reason}");
        assert!(log.contains("no egress upstream"), "{log}");
        assert!(!log.contains("resolve"), "{log}");
    }

    /// With an upstream, names go to it unresolved (the host's resolver never
    /// sees them) while address literals, in every spelling, and loopback
    /// names are checked here; an allowed literal goes out canonical.
    #[tokio::test]
    async fn with_an_upstream_names_pass_unresolved_and_literals_are_checked() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let upstream = tokio::spawn(async move {
            let mut heads = Vec::new();
            for _ in 0..2 {
                let (mut c, _) = l.accept().await.unwrap();
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).await.unwrap() == 1 {
                    head.push(b[0]);
                }
                c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                heads.push(String::from_utf8_lossy(&head).into_owned());
            }
            heads
        });
        let policy = EgressPolicy {
            upstream: Some(Upstream {
                url: format!("http://127.0.0.1:{port}"),
                username: None,
                password: None,
            }),
            ..Default::default()
        };
        let (reply, _) = ask(Some(&policy), "no-such-name.invalid").await;
        assert!(reply.ok, "{reply:?}");
        // Denied spellings never reach the upstream.
        for host in [
            "169.254.169.254",
            "0251.0376.0251.0376",
            "0x7f000001",
            "localhost.",
            "[::ffff:127.0.0.1]",
        ] {
            let (reply, log) = ask(Some(&policy), host).await;
            assert!(!reply.ok && reply.denied, "{host}: {reply:?}");
            assert!(log.contains(r#""outcome":"denied""#), "{log}");
        }
        let (reply, log) = ask(Some(&policy), "[::1%lo]").await;
        assert!(!reply.ok && !reply.denied, "{reply:?}");
        assert!(log.contains("zone id"), "{log}");
        // An allowed address in another spelling goes out canonical.
        let (reply, _) = ask(Some(&policy), "0xc6.51.0144.7").await;
        assert!(reply.ok, "{reply:?}");
        let heads = upstream.await.unwrap();
        assert!(
            heads[0].starts_with("CONNECT no-such-name.invalid:443 HTTP/1.1\r\n"),
            "{heads:?}"
        );
        assert!(
            heads[1].starts_with("CONNECT 198.51.100.7:443 HTTP/1.1\r\n"),
            "{heads:?}"
        );
    }
}
