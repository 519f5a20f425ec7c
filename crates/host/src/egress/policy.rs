//! What a VM may reach: the allow list and the deny list (the host's own
//! addresses come from `host_addrs`). Pure decisions, no I/O; the proxy in
//! `egress` applies them.

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
        "the unspecified address ::",
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
}
