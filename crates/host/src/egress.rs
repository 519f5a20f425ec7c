//! The host egress proxy: the far end of every VM's guest proxy.
//!
//! A VM has no network interface; its guest agent carries each outgoing
//! connection as a guest-initiated stream to [`EGRESS_PORT`], which arrives
//! at `<vmdir>/vsock.sock_1026`. Because that socket belongs to one VM, the
//! proxy knows which VM (and so which user) a connection is from without
//! trusting anything the guest says.
//!
//! Per connection: read one [`EgressRequest`] line; for direct egress
//! resolve the name here (the guest has no DNS; with an upstream the name
//! goes to the upstream unresolved and only address literals are checked),
//! refuse addresses on the deny list (private,
//! loopback, link-local including 169.254.169.254, multicast, the host's own
//! addresses) unless the VM's allow list names them, then either chain to
//! the VM's upstream proxy (`CONNECT` with `Proxy-Authorization`) or dial
//! directly when the policy says `direct`; answer one [`EgressReply`] line
//! and splice, under the VM's limits (concurrent connections, a shared
//! bytes-per-second token bucket, an idle timeout). Each connection ends in
//! one `tracing` event and one JSON line in `<vmdir>/egress.log`, which name
//! the upstream by address only — never its credentials.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use polydev_api::agent::{encode_line, EgressReply, EgressRequest, MAX_EGRESS_LINE};
use polydev_api::vm::{EgressPolicy, Secret};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::info;

use crate::metrics::{Direction, Outcome, Reason, EGRESS};

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

/// One allow-list entry: a network and a port (or every port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowRule {
    net: IpAddr,
    prefix: u8,
    port: Option<u16>,
}

impl AllowRule {
    /// Parse `ADDR[/PREFIX]:PORT` or `ADDR[/PREFIX]:*`; IPv6 in brackets.
    pub fn parse(s: &str) -> Result<AllowRule, EgressError> {
        let bad = || EgressError::BadAllow(s.to_string());
        let (net, port) = if let Some(rest) = s.strip_prefix('[') {
            let (inner, tail) = rest.split_once(']').ok_or_else(bad)?;
            // `[fd00::/8]:*` and `[fd00::]/8:*` both read naturally.
            match tail.strip_prefix(':') {
                Some(port) => (inner.to_string(), port),
                None => {
                    let (pfx, port) = tail.split_once(':').ok_or_else(bad)?;
                    if !pfx.starts_with('/') {
                        return Err(bad());
                    }
                    (format!("{inner}{pfx}"), port)
                }
            }
        } else {
            let (n, p) = s.rsplit_once(':').ok_or_else(bad)?;
            // `::1:80` is ambiguous; IPv6 must come in brackets.
            if n.contains(':') {
                return Err(bad());
            }
            (n.to_string(), p)
        };
        let port = match port {
            "*" => None,
            p => Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?),
        };
        let (addr, prefix) = match net.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (net.as_str(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(AllowRule {
            net: addr,
            prefix,
            port,
        })
    }

    /// Whether `addr` is inside this rule.
    pub fn matches(&self, addr: SocketAddr) -> bool {
        self.port.is_none_or(|p| p == addr.port())
            && in_net(canonical(addr.ip()), self.net, self.prefix)
    }
}

/// IPv4-mapped IPv6 addresses are their IPv4 address for every check, so
/// `::ffff:127.0.0.1` is loopback.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

fn in_net(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Ranges no VM may reach unless allowed: (network, prefix, why).
const DENY_V4: &[(Ipv4Addr, u8, &str)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8, "\"this network\" (0.0.0.0/8)"),
    (Ipv4Addr::new(10, 0, 0, 0), 8, "private range 10.0.0.0/8"),
    (
        Ipv4Addr::new(100, 64, 0, 0),
        10,
        "carrier-grade NAT range 100.64.0.0/10",
    ),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback 127.0.0.0/8"),
    (
        Ipv4Addr::new(169, 254, 169, 254),
        32,
        "cloud metadata endpoint 169.254.169.254",
    ),
    (
        Ipv4Addr::new(169, 254, 0, 0),
        16,
        "link-local 169.254.0.0/16",
    ),
    (
        Ipv4Addr::new(172, 16, 0, 0),
        12,
        "private range 172.16.0.0/12",
    ),
    (
        Ipv4Addr::new(192, 0, 0, 0),
        24,
        "IETF protocol assignments 192.0.0.0/24",
    ),
    (
        Ipv4Addr::new(192, 168, 0, 0),
        16,
        "private range 192.168.0.0/16",
    ),
    (
        Ipv4Addr::new(198, 18, 0, 0),
        15,
        "benchmarking range 198.18.0.0/15",
    ),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast 224.0.0.0/4"),
    (Ipv4Addr::new(240, 0, 0, 0), 4, "reserved 240.0.0.0/4"),
];

const DENY_V6: &[(Ipv6Addr, u8, &str)] = &[
    (Ipv6Addr::UNSPECIFIED, 128, "the unspecified address ::"),
    (Ipv6Addr::LOCALHOST, 128, "loopback ::1"),
    (
        Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0),
        7,
        "unique-local range fc00::/7",
    ),
    (
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
        "link-local fe80::/10",
    ),
    (
        Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0),
        8,
        "multicast ff00::/8",
    ),
    (
        Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254),
        128,
        "cloud metadata endpoint fd00:ec2::254",
    ),
];

/// Why `ip` is denied by default, if it is. `own` are the host's addresses.
pub fn deny_reason(ip: IpAddr, own: &[IpAddr]) -> Option<String> {
    let ip = canonical(ip);
    // Ranges first: "loopback" says more than "an address of this host".
    let hit = match ip {
        IpAddr::V4(_) => DENY_V4
            .iter()
            .find(|(n, p, _)| in_net(ip, IpAddr::V4(*n), *p))
            .map(|(_, _, why)| *why),
        IpAddr::V6(_) => DENY_V6
            .iter()
            .find(|(n, p, _)| in_net(ip, IpAddr::V6(*n), *p))
            .map(|(_, _, why)| *why),
    };
    if let Some(why) = hit {
        return Some(format!("{ip} is in the {why}"));
    }
    own.iter()
        .any(|o| canonical(*o) == ip)
        .then(|| format!("{ip} is an address of this host"))
}

/// The host's own interface addresses (a VM must not reach the host's
/// services through a public address either).
pub fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur is a valid node of the list until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr whose family tells its
            // real type.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: family AF_INET means a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            } else if family == libc::AF_INET6 {
                // SAFETY: family AF_INET6 means a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: ifap came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(ifap) };
    out
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
    own: Vec<IpAddr>,
    slots: Arc<Semaphore>,
    bucket: StdMutex<TokenBucket>,
    log: PathBuf,
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
) -> std::io::Result<JoinHandle<()>> {
    let policy = match policy {
        Some(p) => compile(p).map_err(std::io::Error::other)?,
        None => Compiled {
            upstream: None,
            allow: Vec::new(),
            direct: false,
        },
    };
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    let shared = Arc::new(VmEgress {
        vm: vm.to_string(),
        policy,
        limits,
        own: host_addresses(),
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
            if let Ok(mut f) = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .await
            {
                let _ = f.write_all(text.as_bytes()).await;
            }
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
        let addrs = if self.policy.upstream.is_some() {
            // The upstream resolves names where the request leaves.
            // Resolving them here too would hand every guest-chosen name to
            // the host's resolver: a way out around the user's upstream (DNS
            // carries data). Address literals are checked.
            match req.host.parse::<IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, req.port)],
                Err(_) => Vec::new(),
            }
        } else {
            resolve(&req.host, req.port).await?
        };
        for a in &addrs {
            if self.policy.allow.iter().any(|r| r.matches(*a)) {
                continue;
            }
            if let Some(why) = deny_reason(a.ip(), &self.own) {
                return Err(Refusal::denied(
                    Reason::DenyList,
                    format!(
                        "{} resolves to {a}: {why}; an operator can open it with --egress-allow",
                        req.host
                    ),
                ));
            }
        }
        let timeout = self.limits.connect_timeout;
        if let Some(up) = &self.policy.upstream {
            let mut s = dial(&up.addr, timeout).await.map_err(|e| {
                Refusal::failed(
                    Reason::UpstreamConnect,
                    format!("upstream proxy {}: {e}", up.addr),
                )
            })?;
            // The upstream gets the name, not our resolution: a residential
            // provider resolves it where the request leaves.
            let handshake = async {
                match &up.proto {
                    UpstreamProto::Http { auth } => {
                        http_connect(&mut s, &req.host, req.port, auth.as_deref()).await
                    }
                    UpstreamProto::Socks5 { auth } => {
                        socks5_connect(&mut s, &req.host, req.port, auth.as_ref()).await
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
            return Ok(s);
        }
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

/// Ask an HTTP proxy for a tunnel: `CONNECT host:port` with
/// `Proxy-Authorization` when configured; any 2xx opens it.
async fn http_connect(
    s: &mut TcpStream,
    host: &str,
    port: u16,
    auth: Option<&str>,
) -> std::io::Result<()> {
    let target = join_host_port(host, port);
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = auth {
        head.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await?;
    let (code, line) = read_status(s).await?;
    if !(200..300).contains(&code) {
        return Err(std::io::Error::other(format!(
            "refused CONNECT {target}: {line}"
        )));
    }
    Ok(())
}

/// SOCKS5 `CONNECT` (RFC 1928) with username/password authentication (RFC
/// 1929) when configured — and then only that method is offered, so a
/// proxy cannot silently skip authentication. Names go as names (ATYP 3),
/// resolved by the proxy like the HTTP upstream's.
async fn socks5_connect(
    s: &mut TcpStream,
    host: &str,
    port: u16,
    auth: Option<&(String, Secret)>,
) -> std::io::Result<()> {
    let proto = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let method = if auth.is_some() { 0x02 } else { 0x00 };
    s.write_all(&[0x05, 0x01, method]).await?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).await?;
    if choice[0] != 0x05 {
        return Err(proto(format!(
            "not a SOCKS5 proxy (version byte {})",
            choice[0]
        )));
    }
    if choice[1] != method {
        return Err(std::io::Error::other(if auth.is_some() {
            "SOCKS5 proxy does not accept username/password authentication"
        } else {
            "SOCKS5 proxy requires authentication, and this VM's upstream has no credentials"
        }));
    }
    if let Some((user, pass)) = auth {
        // Lengths were checked to fit one byte when the policy was compiled.
        let (u, p) = (user.as_bytes(), pass.expose().as_bytes());
        let mut msg = Vec::with_capacity(3 + u.len() + p.len());
        msg.push(0x01);
        msg.push(u.len() as u8);
        msg.extend_from_slice(u);
        msg.push(p.len() as u8);
        msg.extend_from_slice(p);
        s.write_all(&msg).await?;
        let mut status = [0u8; 2];
        s.read_exact(&mut status).await?;
        if status[1] != 0x00 {
            return Err(std::io::Error::other(
                "SOCKS5 proxy rejected the upstream credentials",
            ));
        }
    }
    let mut req = vec![0x05, 0x01, 0x00];
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => {
            req.push(0x01);
            req.extend_from_slice(&v4.octets());
        }
        Ok(IpAddr::V6(v6)) => {
            req.push(0x04);
            req.extend_from_slice(&v6.octets());
        }
        Err(_) => {
            // read_request caps names at 253 bytes.
            let name = host.as_bytes();
            let len = u8::try_from(name.len())
                .map_err(|_| proto(format!("name {host} is too long for SOCKS5")))?;
            req.push(0x03);
            req.push(len);
            req.extend_from_slice(name);
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await?;
    if head[0] != 0x05 {
        return Err(proto(format!("bad SOCKS5 reply version {}", head[0])));
    }
    if head[1] != 0x00 {
        return Err(std::io::Error::other(format!(
            "SOCKS5 CONNECT {} refused: {}",
            join_host_port(host, port),
            socks5_reply_text(head[1])
        )));
    }
    // Skip the bound address; the tunnel's bytes follow it.
    let skip = match head[3] {
        0x01 => 4,
        0x04 => 16,
        0x03 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await?;
            usize::from(len[0])
        }
        t => return Err(proto(format!("bad SOCKS5 address type {t}"))),
    };
    let mut rest = vec![0u8; skip + 2];
    s.read_exact(&mut rest).await?;
    Ok(())
}

/// RFC 1928 §6 reply codes.
fn socks5_reply_text(code: u8) -> String {
    match code {
        0x01 => "general SOCKS server failure".into(),
        0x02 => "connection not allowed by ruleset".into(),
        0x03 => "network unreachable".into(),
        0x04 => "host unreachable".into(),
        0x05 => "connection refused".into(),
        0x06 => "TTL expired".into(),
        0x07 => "command not supported".into(),
        0x08 => "address type not supported".into(),
        c => format!("reply code {c}"),
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
    let req: EgressRequest = serde_json::from_slice(&line)
        .map_err(|e| Refusal::failed(Reason::BadRequest, format!("bad egress request: {e}")))?;
    if req.port == 0
        || req.host.is_empty()
        || req.host.len() > 253
        || !req
            .host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
    {
        return Err(Refusal::failed(
            Reason::BadRequest,
            format!("bad egress target {:?}:{}", req.host, req.port),
        ));
    }
    Ok(req)
}

async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, Refusal> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| Refusal::failed(Reason::Resolve, format!("cannot resolve {host}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(Refusal::failed(
            Reason::Resolve,
            format!("{host} has no addresses"),
        ));
    }
    Ok(addrs)
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

/// Read an HTTP response head up to the blank line (byte by byte, so the
/// tunnel's first bytes stay unread); returns the status code and line.
async fn read_status(s: &mut TcpStream) -> std::io::Result<(u16, String)> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before answering CONNECT",
            ));
        }
        head.push(b[0]);
        if head.len() > 16 * 1024 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "response head too long",
            ));
        }
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or_default().to_string();
    let code = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad status line {line:?}"),
            )
        })?;
    Ok((code, line))
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use polydev_api::vm::{Secret, Upstream};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn allow_rules_parse_and_match() {
        let r = AllowRule::parse("127.0.0.1:8080").unwrap();
        assert!(r.matches(sa("127.0.0.1:8080")));
        assert!(!r.matches(sa("127.0.0.1:8081")));
        assert!(!r.matches(sa("127.0.0.2:8080")));
        let r = AllowRule::parse("127.0.0.0/8:*").unwrap();
        assert!(r.matches(sa("127.9.9.9:1")));
        assert!(r.matches(sa("[::ffff:127.0.0.1]:5")), "v4-mapped counts");
        assert!(!r.matches(sa("128.0.0.1:1")));
        let r = AllowRule::parse("[::1]:443").unwrap();
        assert!(r.matches(sa("[::1]:443")));
        let r = AllowRule::parse("[fd00::]/8:*").unwrap();
        assert!(r.matches(sa("[fdff::1]:1")));
        let r = AllowRule::parse("0.0.0.0/0:53").unwrap();
        assert!(r.matches(sa("8.8.8.8:53")));
        for bad in [
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1/33:*",
            "host:80",
            "[::1:80",
            "::1:80",
            "1.2.3.4:x",
        ] {
            assert!(AllowRule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn deny_list_covers_private_loopback_link_local_metadata_and_own() {
        let own = [IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7))];
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "::1",
            "fe80::1",
            "fc00::1",
            "::ffff:10.0.0.1",
            "203.0.113.7",
        ] {
            assert!(
                deny_reason(ip.parse().unwrap(), &own).is_some(),
                "{ip} must be denied"
            );
        }
        for ip in ["1.1.1.1", "172.32.0.1", "2606:4700::1111", "203.0.113.8"] {
            assert_eq!(deny_reason(ip.parse().unwrap(), &own), None, "{ip}");
        }
        let why = deny_reason("169.254.169.254".parse().unwrap(), &[]).unwrap();
        assert!(why.contains("metadata"), "{why}");
        let why = deny_reason("203.0.113.7".parse().unwrap(), &own).unwrap();
        assert!(why.contains("address of this host"), "{why}");
    }

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

    /// A scripted SOCKS5 server: checks the client's bytes exactly and
    /// answers with `rep`.
    async fn socks5_server(rep: u8) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut greet = [0u8; 3];
            c.read_exact(&mut greet).await.unwrap();
            seen.extend_from_slice(&greet);
            c.write_all(&[5, 2]).await.unwrap();
            let mut auth = [0u8; 1 + 1 + 5 + 1 + 6];
            c.read_exact(&mut auth).await.unwrap();
            seen.extend_from_slice(&auth);
            c.write_all(&[1, 0]).await.unwrap();
            let mut req = [0u8; 4 + 1 + 11 + 2];
            c.read_exact(&mut req).await.unwrap();
            seen.extend_from_slice(&req);
            // A domain-name bound address, to exercise that branch.
            c.write_all(&[5, rep, 0, 3, 2, b'o', b'k', 0, 80])
                .await
                .unwrap();
            if rep == 0 {
                c.write_all(b"tunnel").await.unwrap();
            }
            seen
        });
        (addr, task)
    }

    #[tokio::test]
    async fn socks5_handshake_is_rfc1928_with_rfc1929_auth() {
        let creds = ("alice".to_string(), Secret::new("s3cret"));
        let (addr, server) = socks5_server(0).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        socks5_connect(&mut s, "example.com", 443, Some(&creds))
            .await
            .unwrap();
        let mut rest = [0u8; 6];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"tunnel", "the reply is consumed exactly");
        let mut want = vec![5, 1, 2, 1, 5];
        want.extend_from_slice(b"alice");
        want.push(6);
        want.extend_from_slice(b"s3cret");
        want.extend_from_slice(&[5, 1, 0, 3, 11]);
        want.extend_from_slice(b"example.com");
        want.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(server.await.unwrap(), want);

        let (addr, _server) = socks5_server(5).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let e = socks5_connect(&mut s, "example.com", 443, Some(&creds))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("connection refused"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
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
    /// sees them) while address literals are still checked here.
    #[tokio::test]
    async fn with_an_upstream_names_pass_unresolved_and_literals_are_checked() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let upstream = tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).await.unwrap() == 1 {
                head.push(b[0]);
            }
            c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8_lossy(&head).into_owned()
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
        let head = upstream.await.unwrap();
        assert!(
            head.starts_with("CONNECT no-such-name.invalid:443 HTTP/1.1\r\n"),
            "{head}"
        );
        let (reply, log) = ask(Some(&policy), "169.254.169.254").await;
        assert!(!reply.ok && reply.denied, "{reply:?}");
        assert!(log.contains("169.254.169.254"), "{log}");
    }

    #[test]
    fn ipv6_targets_are_bracketed() {
        assert_eq!(join_host_port("::1", 80), "[::1]:80");
        assert_eq!(join_host_port("a.b", 80), "a.b:80");
    }
}
