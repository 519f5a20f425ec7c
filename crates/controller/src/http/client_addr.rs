//! The client's address behind a reverse proxy, and the key rate limits
//! use for it.
//!
//! A forwarding header is anyone's to write, so it is read only when the
//! TCP peer is one of the configured trusted proxies, and then from the
//! right: each trusted proxy appends the address it received the request
//! from, so the right-most address that is *not* a trusted proxy is the
//! first one no proxy of ours vouches for — the client. Whatever a client
//! writes further left is ignored. Only the one header the proxies are
//! configured to set ([`ForwardedHeader`]) is read: a proxy that appends
//! `X-Forwarded-For` passes a client's own `Forwarded` header through
//! untouched, so reading both would let the client choose.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use axum::http::HeaderMap;

/// A network in CIDR notation (`10.0.0.0/8`, `::1/128`; a bare address is
/// a single host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

/// A trusted-proxy entry that is not a network.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a network: write an address or ADDRESS/PREFIX, e.g. 10.0.0.0/8 or fd00::/8")]
pub struct CidrError(String);

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        let bad = || CidrError(s.chars().take(80).collect());
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let net = canonical(IpAddr::from_str(addr).map_err(|_| bad())?);
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        // An IPv4-mapped network (::ffff:10.0.0.0/104) is its IPv4 network.
        let prefix = match (addr.parse::<IpAddr>(), net) {
            (Ok(IpAddr::V6(_)), IpAddr::V4(_)) if prefix >= 96 => prefix - 96,
            _ => prefix,
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { net, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

impl Cidr {
    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Which header the trusted proxies append the client address to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (nginx, HAProxy, most
    /// load balancers).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for="[2001:db8::1]:4711"`.
    Forwarded,
}

impl FromStr for ForwardedHeader {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Ok(ForwardedHeader::XForwardedFor),
            "forwarded" => Ok(ForwardedHeader::Forwarded),
            _ => Err(format!(
                "{s:?} is not a forwarding header: use x-forwarded-for or forwarded"
            )),
        }
    }
}

/// Who may say where a request came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// The reverse proxies in front of the API (none: the TCP peer is
    /// always the client).
    pub trusted: Vec<Cidr>,
    /// The header they set.
    pub header: ForwardedHeader,
}

impl ProxyConfig {
    fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }

    /// The client's address of a request that arrived from `peer`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = canonical(peer);
        if !self.trusts(client) {
            return client;
        }
        for hop in hops(headers, self.header).iter().rev() {
            match hop {
                Some(ip) => {
                    client = canonical(*ip);
                    if !self.trusts(client) {
                        return client;
                    }
                }
                // A hop we cannot read: the trusted proxy that wrote it is
                // as far as anything can be vouched for.
                None => return client,
            }
        }
        client
    }

    /// Whether the client reached the nearest trusted proxy over TLS: only
    /// a trusted proxy's word counts (the nearest one's: the last
    /// `X-Forwarded-Proto` value, or the `proto` of the last `Forwarded`
    /// element, whichever header this configuration reads).
    pub fn forwarded_https(&self, peer: IpAddr, headers: &HeaderMap) -> bool {
        if !self.trusts(canonical(peer)) {
            return false;
        }
        let last = |name: &str| {
            headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .rfind(|e| !e.is_empty())
                .map(str::to_string)
        };
        match self.header {
            ForwardedHeader::XForwardedFor => {
                last("x-forwarded-proto").is_some_and(|p| p.eq_ignore_ascii_case("https"))
            }
            ForwardedHeader::Forwarded => last("forwarded").is_some_and(|element| {
                element
                    .split(';')
                    .filter_map(|pair| pair.split_once('='))
                    .any(|(k, v)| {
                        k.trim().eq_ignore_ascii_case("proto")
                            && v.trim().trim_matches('"').eq_ignore_ascii_case("https")
                    })
            }),
        }
    }
}

/// The addresses in the forwarding header, left (client end) to right
/// (nearest proxy); `None` for an entry that is not an address
/// (`unknown`, an obfuscated name, garbage). Several header lines are one
/// list, in order.
fn hops(headers: &HeaderMap, which: ForwardedHeader) -> Vec<Option<IpAddr>> {
    let name = match which {
        ForwardedHeader::XForwardedFor => "x-forwarded-for",
        ForwardedHeader::Forwarded => "forwarded",
    };
    let mut out = Vec::new();
    for line in headers.get_all(name) {
        let Ok(line) = line.to_str() else {
            out.push(None);
            continue;
        };
        for element in line.split(',') {
            let element = element.trim();
            if element.is_empty() {
                continue;
            }
            out.push(match which {
                ForwardedHeader::XForwardedFor => parse_node(element),
                ForwardedHeader::Forwarded => element
                    .split(';')
                    .filter_map(|pair| pair.split_once('='))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("for"))
                    .and_then(|(_, v)| parse_node(v.trim().trim_matches('"'))),
            });
        }
    }
    out
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:80`.
fn parse_node(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|r| r.parse::<Ipv6Addr>().ok())
        .map(IpAddr::V6)
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`, what a dual-stack socket
/// reports for an IPv4 client) as the IPv4 address they are.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The rate-limit key of a client address: an IPv4 address as itself, an
/// IPv6 address by its /64 — one subscriber usually holds a whole /64
/// and could otherwise draw a fresh bucket with every address in it.
pub fn rate_key(ip: IpAddr) -> String {
    match canonical(ip) {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => {
            let net = Ipv6Addr::from(u128::from(a) & (u128::MAX << 64));
            format!("{net}/64")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(name: &str, values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn cfg(trusted: &[&str], header: ForwardedHeader) -> ProxyConfig {
        ProxyConfig {
            trusted: trusted.iter().map(|c| c.parse().unwrap()).collect(),
            header,
        }
    }

    #[test]
    fn networks_parse_and_match() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("10.200.1.1")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(c.contains(ip("::ffff:10.1.2.3")), "mapped is IPv4");
        let host: Cidr = "192.0.2.7".parse().unwrap();
        assert!(host.contains(ip("192.0.2.7")) && !host.contains(ip("192.0.2.8")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.9")));
        let mapped: Cidr = "::ffff:10.0.0.0/104".parse().unwrap();
        assert!(mapped.contains(ip("10.9.9.9")));
        for bad in ["10.0.0.0/33", "fd00::/129", "nope", "10.0.0.0/x", ""] {
            let e = bad.parse::<Cidr>().unwrap_err().to_string();
            assert!(e.contains("ADDRESS/PREFIX"), "{bad}: {e}");
        }
    }

    #[test]
    fn forwarding_headers_count_only_from_a_trusted_peer() {
        use ForwardedHeader::*;
        let xff = |v: &[&str]| headers("x-forwarded-for", v);
        let proxies = cfg(&["10.0.0.0/8", "fd00::/8"], XForwardedFor);
        let none = cfg(&[], XForwardedFor);
        let cases: Vec<(&str, &ProxyConfig, &str, HeaderMap, &str)> = vec![
            (
                "no proxies configured: the peer",
                &none,
                "203.0.113.5",
                xff(&["198.51.100.1"]),
                "203.0.113.5",
            ),
            (
                "untrusted peer: header ignored",
                &proxies,
                "203.0.113.5",
                xff(&["198.51.100.1"]),
                "203.0.113.5",
            ),
            (
                "trusted peer, one hop",
                &proxies,
                "10.0.0.2",
                xff(&["198.51.100.1"]),
                "198.51.100.1",
            ),
            (
                "a client's own entries on the left are ignored",
                &proxies,
                "10.0.0.2",
                xff(&["1.1.1.1, 2.2.2.2, 198.51.100.1"]),
                "198.51.100.1",
            ),
            (
                "trusted hops are skipped from the right",
                &proxies,
                "10.0.0.2",
                xff(&["198.51.100.1, 10.0.0.9, 10.0.0.3"]),
                "198.51.100.1",
            ),
            (
                "several header lines are one list",
                &proxies,
                "10.0.0.2",
                xff(&["6.6.6.6", "198.51.100.1, 10.0.0.3"]),
                "198.51.100.1",
            ),
            (
                "no header: the proxy itself",
                &proxies,
                "10.0.0.2",
                HeaderMap::new(),
                "10.0.0.2",
            ),
            (
                "every hop trusted: the left-most",
                &proxies,
                "10.0.0.2",
                xff(&["10.0.0.7, 10.0.0.3"]),
                "10.0.0.7",
            ),
            (
                "garbage stops at the proxy that wrote it",
                &proxies,
                "10.0.0.2",
                xff(&["198.51.100.1, bogus, 10.0.0.3"]),
                "10.0.0.3",
            ),
            (
                "ports and brackets",
                &proxies,
                "10.0.0.2",
                xff(&["[2001:db8::7]:443"]),
                "2001:db8::7",
            ),
            (
                "an address with a port",
                &proxies,
                "10.0.0.2",
                xff(&["198.51.100.1:5555"]),
                "198.51.100.1",
            ),
            (
                "a mapped peer is IPv4",
                &proxies,
                "::ffff:10.0.0.2",
                xff(&["198.51.100.1"]),
                "198.51.100.1",
            ),
            (
                "the other header is not read",
                &proxies,
                "10.0.0.2",
                headers("forwarded", &["for=198.51.100.1"]),
                "10.0.0.2",
            ),
        ];
        for (what, c, peer, h, want) in cases {
            assert_eq!(c.client_ip(ip(peer), &h), ip(want), "{what}");
        }
        let fwd = cfg(&["10.0.0.0/8"], Forwarded);
        let h = headers(
            "forwarded",
            &["for=1.1.1.1, For=\"[2001:db8:cafe::17]:4711\";proto=https, for=10.0.0.4;by=10.0.0.2"],
        );
        assert_eq!(fwd.client_ip(ip("10.0.0.2"), &h), ip("2001:db8:cafe::17"));
        let h = headers("forwarded", &["for=198.51.100.1, for=unknown"]);
        assert_eq!(fwd.client_ip(ip("10.0.0.2"), &h), ip("10.0.0.2"));
        let h = headers("x-forwarded-for", &["198.51.100.1"]);
        assert_eq!(fwd.client_ip(ip("10.0.0.2"), &h), ip("10.0.0.2"));
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_slash_64() {
        assert_eq!(rate_key(ip("2001:db8:1:2::1")), "2001:db8:1:2::/64");
        assert_eq!(
            rate_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            rate_key(ip("2001:db8:1:2::1"))
        );
        assert_ne!(
            rate_key(ip("2001:db8:1:3::1")),
            rate_key(ip("2001:db8:1:2::1"))
        );
        assert_eq!(rate_key(ip("198.51.100.7")), "198.51.100.7");
        assert_eq!(rate_key(ip("::ffff:198.51.100.7")), "198.51.100.7");
        assert_ne!(rate_key(ip("198.51.100.7")), rate_key(ip("198.51.100.8")));
    }

    #[test]
    fn only_a_trusted_proxy_says_the_client_used_tls() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", "http, https".parse().unwrap());
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let stranger: IpAddr = "203.0.113.9".parse().unwrap();
        let cfg = ProxyConfig {
            trusted: vec!["10.0.0.0/8".parse().unwrap()],
            header: ForwardedHeader::XForwardedFor,
        };
        assert!(cfg.forwarded_https(proxy, &h));
        assert!(!cfg.forwarded_https(stranger, &h));
        h.insert("x-forwarded-proto", "https, http".parse().unwrap());
        assert!(
            !cfg.forwarded_https(proxy, &h),
            "the nearest proxy's word counts"
        );
        let rfc = ProxyConfig {
            header: ForwardedHeader::Forwarded,
            ..cfg
        };
        let mut h = HeaderMap::new();
        h.insert(
            "forwarded",
            "for=1.2.3.4;proto=http, for=5.6.7.8;proto=\"HTTPS\""
                .parse()
                .unwrap(),
        );
        assert!(rfc.forwarded_https(proxy, &h));
        assert!(!rfc.forwarded_https(proxy, &HeaderMap::new()));
    }
}
