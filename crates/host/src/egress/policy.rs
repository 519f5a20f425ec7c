//! What a VM may reach: what a guest's target denotes, the allow list and
//! the deny list (the host's own addresses come from `host_addrs`). No I/O
//! of its own: names are resolved through a [`Resolver`] the proxy passes
//! in, so every decision can be tested without DNS.
//!
//! Whoever is root in a VM chooses the target string, so it is read the way
//! the most permissive resolver would read it: any `inet_aton` form
//! (`127.1`, `0x7f000001`, `2130706433`, `0177.0.0.1`) is the IPv4 address
//! it denotes, `localhost` and `*.localhost` are loopback, an IPv6 address
//! may come in brackets. Upstream mode checks those and sends an upstream
//! only the canonical form of an address (`127.1` never reaches a proxy
//! that might read it its own way) or a name that is not numeric.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::EgressError;

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

/// How an IPv6 range carries an IPv4 address, for the refusal's text.
#[derive(Clone, Copy)]
enum Embeds {
    /// Nothing.
    No,
    /// In the low 32 bits (IPv4-compatible, IPv4-mapped, NAT64).
    Low32,
    /// In bits 16..48 (6to4).
    SixToFour,
}

/// IPv6 ranges no VM may reach unless allowed: (network, prefix, why, how
/// it embeds an IPv4 address). The first match names the reason, so the
/// single addresses come before the ranges that contain them.
///
/// The ranges that embed an IPv4 address are refused whole, whatever that
/// address is: each is a way to reach an IPv4 address the v4 list refuses
/// (a NAT64 gateway, a 6to4 relay or a dual-stack socket translates it),
/// and sign-in traffic never needs them.
const DENY_V6: &[(Ipv6Addr, u8, &str, Embeds)] = &[
    (
        Ipv6Addr::UNSPECIFIED,
        128,
        "unspecified address ::",
        Embeds::No,
    ),
    (Ipv6Addr::LOCALHOST, 128, "loopback ::1", Embeds::No),
    // Before fc00::/7, which contains it: "metadata" says more.
    (
        Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254),
        128,
        "cloud metadata endpoint fd00:ec2::254",
        Embeds::No,
    ),
    // RFC 4291 §2.5.5.1, deprecated: `::a.b.c.d`; some stacks still route
    // it to a.b.c.d.
    (
        Ipv6Addr::UNSPECIFIED,
        96,
        "IPv4-compatible range ::/96",
        Embeds::Low32,
    ),
    // RFC 4291 §2.5.5.2: a dual-stack socket dials `::ffff:a.b.c.d` as
    // a.b.c.d. The v4 list is applied to it first (so `::ffff:127.0.0.1`
    // is refused as loopback); a public one is refused here, because a
    // mapped address is never the honest way to name an IPv4 host.
    (
        Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0),
        96,
        "IPv4-mapped range ::ffff:0:0/96",
        Embeds::Low32,
    ),
    // RFC 6052: a NAT64 gateway (the host's or the upstream's network may
    // have one) turns 64:ff9b::a.b.c.d into a.b.c.d, internal ones included.
    (
        Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0),
        96,
        "NAT64 well-known prefix 64:ff9b::/96",
        Embeds::Low32,
    ),
    // RFC 8215: the local-use NAT64 prefix, same risk as the well-known one.
    (
        Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0),
        48,
        "local-use NAT64 prefix 64:ff9b:1::/48",
        Embeds::No,
    ),
    // RFC 3056: 2002:AABB:CCDD::/48 is the site behind IPv4 AA.BB.CC.DD,
    // reached through a 6to4 relay.
    (
        Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0),
        16,
        "6to4 range 2002::/16",
        Embeds::SixToFour,
    ),
    // RFC 4380: Teredo tunnels to an IPv4 server and client named inside
    // the address.
    (
        Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0),
        32,
        "Teredo range 2001::/32",
        Embeds::No,
    ),
    (
        Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0),
        7,
        "unique-local range fc00::/7",
        Embeds::No,
    ),
    (
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
        "link-local fe80::/10",
        Embeds::No,
    ),
    (
        Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0),
        8,
        "multicast ff00::/8",
        Embeds::No,
    ),
];

/// Why `ip` is denied by default, if it is. `own` are the host's addresses.
pub fn deny_reason(ip: IpAddr, own: &[IpAddr]) -> Option<String> {
    let v4_view = canonical(ip);
    // Ranges first: "loopback" says more than "an address of this host".
    // An IPv4-mapped address meets the v4 list first, for the same reason.
    if v4_view.is_ipv4() {
        if let Some((_, _, why)) = DENY_V4
            .iter()
            .find(|(n, p, _)| in_net(v4_view, IpAddr::V4(*n), *p))
        {
            return Some(format!("{v4_view} is in the {why}"));
        }
    }
    if let IpAddr::V6(v6) = ip {
        if let Some((_, _, why, embeds)) = DENY_V6
            .iter()
            .find(|(n, p, _, _)| in_net(ip, IpAddr::V6(*n), *p))
        {
            let b = u128::from(v6);
            let inner = match embeds {
                Embeds::No => None,
                Embeds::Low32 => Some(Ipv4Addr::from(b as u32)),
                Embeds::SixToFour => Some(Ipv4Addr::from((b >> 80) as u32)),
            };
            return Some(match inner {
                Some(v4) => format!("{ip} is in the {why} (it embeds IPv4 {v4})"),
                None => format!("{ip} is in the {why}"),
            });
        }
    }
    own.iter()
        .any(|o| canonical(*o) == v4_view)
        .then(|| format!("{v4_view} is an address of this host"))
}

/// What a guest's target host denotes, before any DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An address literal in any form a resolver accepts: the address.
    Addr(IpAddr),
    /// A name that is this machine's loopback whatever DNS says
    /// (`localhost`, `*.localhost`, RFC 6761 §6.3, and the loopback names
    /// of stock `/etc/hosts` files), so an upstream would reach its own.
    Loopback,
    /// Any other name, to resolve (direct) or pass on (upstream).
    Name,
}

/// A target string that is no name and no address.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    /// Not a DNS name, and not an address either.
    #[error("bad egress target {0:?}: expected a DNS name (letters, digits, '-', '_', dot-separated labels), an IPv4 address or an IPv6 address (brackets optional)")]
    Malformed(String),
    /// Its last label is a number, so resolvers take it for an IPv4
    /// address, but it is not a valid one (out of range, too many parts,
    /// `8`/`9` in an octal part).
    #[error("bad egress target {0:?}: it ends in a number, so resolvers read it as an IPv4 address, but it is not a valid one")]
    BadNumber(String),
    /// An IPv6 zone id (`fe80::1%eth0`) names an interface of the host.
    #[error("bad egress target {0:?}: an IPv6 zone id names one of the host's interfaces, which a VM cannot use")]
    ZoneId(String),
}

/// Names that are loopback on every stock system, besides `*.localhost`:
/// Debian's and Red Hat's `/etc/hosts` map these to 127.0.0.1 or ::1.
const LOOPBACK_NAMES: &[&str] = &[
    "localhost",
    "localhost.localdomain",
    "localhost6",
    "localhost6.localdomain6",
    "ip6-localhost",
    "ip6-loopback",
];

impl Target {
    /// Read `host` the way the most permissive resolver would.
    pub fn parse(host: &str) -> Result<Target, TargetError> {
        let malformed = || TargetError::Malformed(host.to_string());
        if let Some(inner) = host.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or_else(malformed)?;
            return parse_v6(host, inner);
        }
        if host.contains(':') {
            return parse_v6(host, host);
        }
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            return Err(malformed());
        }
        // One trailing dot is the root: `127.0.0.1.` and `localhost.` mean
        // what they mean without it.
        let bare = host.strip_suffix('.').unwrap_or(host);
        if bare.split('.').any(str::is_empty) {
            return Err(malformed());
        }
        // WHATWG URL's rule: a host whose last label is a number is an IPv4
        // address or nothing. A resolver that falls back to DNS for an
        // invalid one would only fail, so refusing loses nothing.
        let last = bare.rsplit('.').next().unwrap_or(bare);
        if is_number(last) {
            return inet_aton(bare)
                .map(|v4| Target::Addr(IpAddr::V4(v4)))
                .ok_or_else(|| TargetError::BadNumber(host.to_string()));
        }
        let lower = bare.to_ascii_lowercase();
        if lower.ends_with(".localhost") || LOOPBACK_NAMES.contains(&lower.as_str()) {
            return Ok(Target::Loopback);
        }
        Ok(Target::Name)
    }
}

/// An IPv6 literal (`host` is the whole target, for errors).
fn parse_v6(host: &str, s: &str) -> Result<Target, TargetError> {
    if let Some((addr, _zone)) = s.split_once('%') {
        return Err(if addr.parse::<Ipv6Addr>().is_ok() {
            TargetError::ZoneId(host.to_string())
        } else {
            TargetError::Malformed(host.to_string())
        });
    }
    s.parse::<Ipv6Addr>()
        .map(|v6| Target::Addr(IpAddr::V6(v6)))
        .map_err(|_| TargetError::Malformed(host.to_string()))
}

/// Whether a label reads as a number to `inet_aton`: decimal or octal
/// digits, or `0x` and hex digits (none counts: `0x` is 0).
fn is_number(label: &str) -> bool {
    match label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"))
    {
        Some(hex) => hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()),
    }
}

/// One `inet_aton` part: `0x…` hex, `0…` octal, else decimal.
fn inet_number(part: &str) -> Option<u32> {
    let (digits, radix) =
        if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            if hex.is_empty() {
                return Some(0);
            }
            (hex, 16)
        } else if part.len() > 1 && part.starts_with('0') {
            (&part[1..], 8)
        } else {
            (part, 10)
        };
    // from_str_radix alone would accept a leading '+'.
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u32::from_str_radix(digits, radix).ok()
}

/// `inet_aton(3)`: 1 to 4 dot-separated numbers; all but the last are one
/// byte each, the last fills the remaining bytes (`127.1` is 127.0.0.1,
/// `10.1` is 10.0.0.1, `2130706433` is 127.0.0.1). Out of range: `None`.
pub fn inet_aton(s: &str) -> Option<Ipv4Addr> {
    let parts = s.split('.').collect::<Vec<_>>();
    if parts.len() > 4 {
        return None;
    }
    let mut nums = Vec::with_capacity(parts.len());
    for p in parts {
        nums.push(inet_number(p)?);
    }
    let (last, init) = nums.split_last()?;
    if init.iter().any(|n| *n > 255) {
        return None;
    }
    let rest_bits = 8 * (4 - init.len() as u32);
    if u64::from(*last) >= 1u64 << rest_bits {
        return None;
    }
    let high = init
        .iter()
        .enumerate()
        .fold(0u32, |acc, (i, n)| acc | (n << (24 - 8 * i as u32)));
    Some(Ipv4Addr::from(high | last))
}

/// Resolves names for direct egress: the host's resolver in the proxy, a
/// table in tests.
pub trait Resolver {
    /// Every address of `host`.
    fn lookup(
        &self,
        host: &str,
        port: u16,
    ) -> impl Future<Output = std::io::Result<Vec<SocketAddr>>> + Send;
}

/// Where an allowed connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Ask the upstream for this host: the canonical form of an address,
    /// or a name as the guest sent it.
    Upstream(String),
    /// Dial these addresses in turn; all of them passed.
    Direct(Vec<SocketAddr>),
}

/// Why a target is refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    /// The target is no name and no address.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// An address it denotes or resolves to is on the deny list.
    #[error("{host} {how} {addr}: {why}; an operator can open it with --egress-allow")]
    Denied {
        /// The target as the guest sent it.
        host: String,
        /// "is" for a literal or loopback name, "resolves to" for DNS.
        how: &'static str,
        /// The denied address.
        addr: SocketAddr,
        /// Which range or why.
        why: String,
    },
    /// The host's resolver failed (direct egress only).
    #[error("cannot resolve {host}: {why}")]
    Resolve {
        /// The name.
        host: String,
        /// The resolver's error.
        why: String,
    },
}

/// What the proxy knows when it decides.
pub struct Rules<'a> {
    /// Whether the VM goes through an upstream (else direct).
    pub upstream: bool,
    /// The VM's allow list, checked before the deny list.
    pub allow: &'a [AllowRule],
    /// The host's own addresses.
    pub own: &'a [IpAddr],
}

/// Decide where `host:port` may go. Upstream mode resolves nothing: the
/// upstream resolves names where the request leaves, and handing every
/// guest-chosen name to the host's resolver would be a way out around it
/// (DNS carries data). Addresses, in every form, and loopback names are
/// checked in both modes; direct mode resolves other names through
/// `resolver` and every address must pass.
pub async fn decide<R: Resolver>(
    host: &str,
    port: u16,
    rules: &Rules<'_>,
    resolver: &R,
) -> Result<Route, Refused> {
    let target = Target::parse(host)?;
    let allowed = |a: &SocketAddr| rules.allow.iter().any(|r| r.matches(*a));
    let (addrs, how) = match target {
        Target::Addr(ip) => (vec![SocketAddr::new(ip, port)], "is"),
        Target::Loopback => {
            // Fixed, never looked up. Only the loopback addresses an
            // operator opened are used; none opened: refused as 127.0.0.1.
            let lo = [
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
            ];
            let open = lo.iter().copied().filter(allowed).collect::<Vec<_>>();
            (if open.is_empty() { lo.to_vec() } else { open }, "is")
        }
        Target::Name if rules.upstream => (Vec::new(), "resolves to"),
        Target::Name => {
            let addrs = resolver
                .lookup(host, port)
                .await
                .map_err(|e| Refused::Resolve {
                    host: host.to_string(),
                    why: e.to_string(),
                })?;
            if addrs.is_empty() {
                return Err(Refused::Resolve {
                    host: host.to_string(),
                    why: "no addresses".into(),
                });
            }
            (addrs, "resolves to")
        }
    };
    for a in &addrs {
        if allowed(a) {
            continue;
        }
        if let Some(why) = deny_reason(a.ip(), rules.own) {
            return Err(Refused::Denied {
                host: host.to_string(),
                how,
                addr: *a,
                why,
            });
        }
    }
    if !rules.upstream {
        return Ok(Route::Direct(addrs));
    }
    Ok(Route::Upstream(match addrs.first() {
        // The canonical form of what was checked, never the guest's
        // spelling of it.
        Some(a) => a.ip().to_string(),
        None => host.to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Every IPv6 range that embeds an IPv4 address is refused whole, with
    /// the embedded address named; mapped addresses meet the v4 list first.
    #[test]
    fn ipv6_ranges_that_embed_ipv4_are_denied() {
        for (ip, says) in [
            (
                "::127.0.0.1",
                "IPv4-compatible range ::/96 (it embeds IPv4 127.0.0.1)",
            ),
            (
                "::8.8.8.8",
                "IPv4-compatible range ::/96 (it embeds IPv4 8.8.8.8)",
            ),
            ("::ffff:127.0.0.1", "127.0.0.1 is in the loopback"),
            (
                "::ffff:8.8.8.8",
                "IPv4-mapped range ::ffff:0:0/96 (it embeds IPv4 8.8.8.8)",
            ),
            (
                "64:ff9b::7f00:1",
                "NAT64 well-known prefix 64:ff9b::/96 (it embeds IPv4 127.0.0.1)",
            ),
            ("64:ff9b::a9fe:a9fe", "(it embeds IPv4 169.254.169.254)"),
            ("64:ff9b:1::1", "local-use NAT64 prefix"),
            (
                "2002:7f00:1::",
                "6to4 range 2002::/16 (it embeds IPv4 127.0.0.1)",
            ),
            ("2002:808:808::1", "(it embeds IPv4 8.8.8.8)"),
            ("2001:0:4136:e378::1", "Teredo"),
            ("::1", "loopback ::1"),
            ("::", "unspecified"),
            ("fd00:ec2::254", "metadata"),
        ] {
            let why = deny_reason(ip.parse().unwrap(), &[]).unwrap_or_default();
            assert!(why.contains(says), "{ip}: {why}");
        }
        // Their neighbours stay open.
        for ip in ["64:ff9c::1", "2003::1", "2001:4860::8888", "::1:0:0:1"] {
            assert_eq!(deny_reason(ip.parse().unwrap(), &[]), None, "{ip}");
        }
    }

    /// The edges of the ranges sign-in traffic never needs: the first and
    /// last address of each is denied, the addresses just outside are not.
    #[test]
    fn deny_list_range_edges() {
        for (ip, says) in [
            ("198.18.0.0", "benchmarking range 198.18.0.0/15"),
            ("198.19.255.255", "benchmarking range 198.18.0.0/15"),
            ("240.0.0.0", "reserved 240.0.0.0/4"),
            ("255.255.255.255", "reserved 240.0.0.0/4"),
            ("239.255.255.255", "multicast 224.0.0.0/4"),
            ("::", "is in the unspecified address ::"),
            ("ff00::", "multicast ff00::/8"),
            ("ff02::1", "multicast ff00::/8"),
            (
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "multicast ff00::/8",
            ),
        ] {
            let why = deny_reason(ip.parse().unwrap(), &[]).unwrap_or_default();
            assert!(why.contains(says), "{ip}: {why:?}");
        }
        for ip in ["198.17.255.255", "198.20.0.0", "223.255.255.255", "feff::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            // feff::1 sits between link-local (fe80::/10 ends at febf) and
            // multicast; it is neither.
            if ip == "feff::1".parse::<IpAddr>().unwrap() {
                assert!(!deny_reason(ip, &[])
                    .unwrap_or_default()
                    .contains("multicast"));
                continue;
            }
            assert_eq!(deny_reason(ip, &[]), None, "{ip}");
        }
    }

    /// A resolver that knows one name and counts its lookups, so a test
    /// proves which decisions asked DNS (none does real DNS).
    struct Table(std::sync::atomic::AtomicUsize);

    impl Resolver for Table {
        async fn lookup(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match host {
                "example.com" | "my_host-1.example." => {
                    Ok(vec![SocketAddr::new("192.0.2.10".parse().unwrap(), port)])
                }
                "bench.example" => Ok(vec![SocketAddr::new("198.19.0.1".parse().unwrap(), port)]),
                "reserved.example" => Ok(vec![SocketAddr::new("240.0.0.1".parse().unwrap(), port)]),
                "unspecified.example" => Ok(vec![SocketAddr::new("::".parse().unwrap(), port)]),
                "multicast.example" => Ok(vec![SocketAddr::new("ff02::1".parse().unwrap(), port)]),
                "inside.example" => Ok(vec![
                    SocketAddr::new("192.0.2.11".parse().unwrap(), port),
                    SocketAddr::new("10.0.0.5".parse().unwrap(), port),
                ]),
                _ => Err(std::io::Error::other("no such name")),
            }
        }
    }

    /// What a decision should be.
    #[derive(Debug)]
    enum Want {
        /// Allowed; upstream mode sends this host, direct mode dials this
        /// address (port 443).
        Open(&'static str),
        /// Denied by the deny list; the reason says this.
        Denied(&'static str),
        /// Refused as no name and no address.
        Bad,
    }
    use Want::{Bad, Denied, Open};

    async fn run(
        host: &str,
        upstream: bool,
        allow: &[AllowRule],
    ) -> (Result<Route, Refused>, usize) {
        let own = ["203.0.113.7".parse().unwrap()];
        let rules = Rules {
            upstream,
            allow,
            own: &own,
        };
        let dns = Table(std::sync::atomic::AtomicUsize::new(0));
        let r = decide(host, 443, &rules, &dns).await;
        (r, dns.0.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Every spelling of a denied address is denied with and without an
    /// upstream; an allowed one reaches an upstream only in canonical form.
    #[tokio::test]
    async fn every_form_of_a_target_decides_the_same_with_and_without_an_upstream() {
        let table: &[(&str, Want)] = &[
            // inet_aton forms of 127.0.0.1.
            ("127.1", Denied("127.0.0.1 is in the loopback")),
            ("0x7f000001", Denied("127.0.0.1 is in the loopback")),
            ("0X7F000001", Denied("127.0.0.1 is in the loopback")),
            ("2130706433", Denied("127.0.0.1 is in the loopback")),
            ("0177.0.0.1", Denied("127.0.0.1 is in the loopback")),
            ("0x7f.1", Denied("127.0.0.1 is in the loopback")),
            ("127.0.0.1", Denied("127.0.0.1 is in the loopback")),
            ("127.0.0.1.", Denied("127.0.0.1 is in the loopback")),
            // Loopback names, never looked up.
            ("localhost", Denied("127.0.0.1 is in the loopback")),
            ("LOCALHOST.", Denied("127.0.0.1 is in the loopback")),
            ("a.localhost", Denied("127.0.0.1 is in the loopback")),
            ("A.LocalHost.", Denied("127.0.0.1 is in the loopback")),
            (
                "localhost.localdomain",
                Denied("127.0.0.1 is in the loopback"),
            ),
            ("ip6-localhost", Denied("127.0.0.1 is in the loopback")),
            // IPv6, brackets or not, and the ranges that embed IPv4.
            ("[::1]", Denied("loopback ::1")),
            ("::1", Denied("loopback ::1")),
            ("[::ffff:127.0.0.1]", Denied("127.0.0.1 is in the loopback")),
            ("[::ffff:198.51.100.7]", Denied("IPv4-mapped")),
            ("[::127.0.0.1]", Denied("IPv4-compatible")),
            (
                "[64:ff9b::7f00:1]",
                Denied("NAT64 well-known prefix 64:ff9b::/96 (it embeds IPv4 127.0.0.1)"),
            ),
            (
                "[2002:7f00:1::]",
                Denied("6to4 range 2002::/16 (it embeds IPv4 127.0.0.1)"),
            ),
            ("[fe80::1]", Denied("link-local")),
            // Short and octal forms of other denied ranges.
            (
                "10.1",
                Denied("10.0.0.1 is in the private range 10.0.0.0/8"),
            ),
            ("169.254.169.254", Denied("metadata")),
            (
                "0251.0376.0251.0376",
                Denied("169.254.169.254 is in the cloud metadata"),
            ),
            (
                "0xa9fea9fe",
                Denied("169.254.169.254 is in the cloud metadata"),
            ),
            ("0", Denied("0.0.0.0 is in the \"this network\"")),
            ("203.0.113.7", Denied("address of this host")),
            (
                "0xcb.0.0x71.7",
                Denied("203.0.113.7 is an address of this host"),
            ),
            // Allowed: upstream mode gets the canonical form.
            ("example.com", Open("example.com")),
            ("198.51.100.7", Open("198.51.100.7")),
            ("0xc6.51.100.7", Open("198.51.100.7")),
            ("3325256711", Open("198.51.100.7")),
            ("0306.0063.0144.0007", Open("198.51.100.7")),
            ("[2606:4700::1111]", Open("2606:4700::1111")),
            ("2606:4700:0000::1111", Open("2606:4700::1111")),
            ("my_host-1.example.", Open("my_host-1.example.")),
            // Neither a name nor an address.
            ("[::1%eth0]", Bad),
            ("fe80::1%2", Bad),
            ("256.0.0.1", Bad),
            ("1.2.3.4.5", Bad),
            ("08.0.0.1", Bad),
            ("4294967296", Bad),
            ("1.16777216", Bad),
            ("example.123", Bad),
            ("example.0x1", Bad),
            ("a..b", Bad),
            ("localhost..", Bad),
            ("[::1", Bad),
            ("foo:bar", Bad),
            ("[example.com]", Bad),
            ("a b", Bad),
            ("", Bad),
        ];
        for (host, want) in table {
            for upstream in [true, false] {
                let mode = if upstream { "upstream" } else { "direct" };
                let (got, lookups) = run(host, upstream, &[]).await;
                match (want, &got) {
                    (Open(sent), Ok(Route::Upstream(h))) if upstream => {
                        assert_eq!(h, sent, "{host} ({mode})")
                    }
                    (Open(_), Ok(Route::Direct(addrs))) if !upstream => {
                        let want_ip = if let Ok(Target::Name) = Target::parse(host) {
                            "192.0.2.10".to_string()
                        } else if let Ok(Target::Addr(ip)) = Target::parse(host) {
                            ip.to_string()
                        } else {
                            panic!("{host}: no address to expect")
                        };
                        assert_eq!(addrs.len(), 1, "{host} ({mode}): {addrs:?}");
                        assert_eq!(addrs[0].ip().to_string(), want_ip, "{host} ({mode})");
                        assert_eq!(addrs[0].port(), 443);
                    }
                    (Denied(says), Err(e @ Refused::Denied { .. })) => {
                        let text = e.to_string();
                        assert!(text.contains(says), "{host} ({mode}): {text}");
                        assert!(text.contains("--egress-allow"), "{text}");
                    }
                    (Bad, Err(Refused::Target(_))) => {}
                    _ => panic!("{host} ({mode}): want {want:?}, got {got:?}"),
                }
                // Only a name in direct mode asks DNS.
                let name = *host == "example.com" || *host == "my_host-1.example.";
                assert_eq!(
                    lookups,
                    usize::from(name && !upstream),
                    "{host} ({mode}) lookups"
                );
            }
        }
    }

    /// Direct mode refuses a name if any of its addresses is denied, and
    /// says the name resolved there; a resolver failure is not a denial.
    #[tokio::test]
    async fn direct_names_must_resolve_to_allowed_addresses_only() {
        let (got, _) = run("inside.example", false, &[]).await;
        let text = got.unwrap_err().to_string();
        assert!(
            text.contains(
                "inside.example resolves to 10.0.0.5:443: 10.0.0.5 is in the private range"
            ),
            "{text}"
        );
        let (got, _) = run("nowhere.example", false, &[]).await;
        assert!(matches!(got, Err(Refused::Resolve { .. })), "{got:?}");
    }

    /// A name is refused in direct mode when it resolves into any denied
    /// range, the edge ranges included, and the reason names the address.
    #[tokio::test]
    async fn direct_names_resolving_into_edge_ranges_are_refused() {
        for (name, says) in [
            (
                "bench.example",
                "resolves to 198.19.0.1:443: 198.19.0.1 is in the benchmarking range",
            ),
            (
                "reserved.example",
                "resolves to 240.0.0.1:443: 240.0.0.1 is in the reserved",
            ),
            ("unspecified.example", ":: is in the unspecified address ::"),
            ("multicast.example", "ff02::1 is in the multicast ff00::/8"),
        ] {
            let (got, lookups) = run(name, false, &[]).await;
            let text = got.expect_err("a denied resolution").to_string();
            assert!(text.contains(says), "{name}: {text}");
            assert_eq!(lookups, 1, "{name}");
            // With an upstream the name goes there unresolved: its DNS is
            // the upstream's, and the host never dials the address.
            let (got, lookups) = run(name, true, &[]).await;
            assert!(got.is_ok(), "{name} via an upstream: {got:?}");
            assert_eq!(lookups, 0, "{name}");
        }
    }

    /// The allow list opens a denied address in every spelling, loopback
    /// names included, and the upstream still gets the canonical form.
    #[tokio::test]
    async fn allowed_loopback_is_reached_by_any_spelling_in_canonical_form() {
        let allow = [AllowRule::parse("127.0.0.1:443").unwrap()];
        for host in [
            "127.1",
            "0x7f000001",
            "localhost",
            "a.localhost.",
            "[::ffff:127.0.0.1]",
        ] {
            let (got, _) = run(host, true, &allow).await;
            let want = if host.contains("ffff") {
                "::ffff:127.0.0.1"
            } else {
                "127.0.0.1"
            };
            assert_eq!(got, Ok(Route::Upstream(want.into())), "{host}");
        }
        let (got, _) = run("localhost", false, &allow).await;
        assert_eq!(
            got,
            Ok(Route::Direct(vec![sa("127.0.0.1:443")])),
            "only the opened one"
        );
        // Another port stays closed.
        let other = [AllowRule::parse("127.0.0.1:80").unwrap()];
        assert!(matches!(
            run("localhost", true, &other).await.0,
            Err(Refused::Denied { .. })
        ));
    }

    #[test]
    fn inet_aton_reads_every_form() {
        for (s, want) in [
            ("0", Some("0.0.0.0")),
            ("0x", Some("0.0.0.0")),
            ("1.2.3.4", Some("1.2.3.4")),
            ("1.2.3", Some("1.2.0.3")),
            ("1.65535", Some("1.0.255.255")),
            ("1.2.65535", Some("1.2.255.255")),
            ("1.2.65536", None),
            ("4294967295", Some("255.255.255.255")),
            ("4294967296", None),
            ("0377.0xff.255.0", Some("255.255.255.0")),
            ("0400.0.0.0", None),
            ("09", None),
            ("+1", None),
            ("1.+2", None),
            ("", None),
            ("1.", None),
        ] {
            assert_eq!(inet_aton(s), want.map(|w| w.parse().unwrap()), "{s:?}");
        }
    }
}
