//! The host's own interface addresses, kept fresh.
//!
//! A VM must not reach the host's services through one of its public
//! addresses either, so the deny list includes them. Interfaces come and go
//! while VMs run (DHCP renewals, a VPN, a new bridge), so the set is re-read
//! when the snapshot is older than [`HostAddresses::MAX_AGE`] instead of
//! once at start.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::warn;

/// Where a snapshot of the host's addresses comes from: [`host_addresses`]
/// in production, a fake in tests.
pub type AddressSource = Box<dyn Fn() -> std::io::Result<Vec<IpAddr>> + Send + Sync>;

/// The host's addresses as last read, re-read at most every `max_age`.
pub struct HostAddresses {
    source: AddressSource,
    max_age: Duration,
    snapshot: Mutex<Option<(Instant, Arc<[IpAddr]>)>>,
}

impl HostAddresses {
    /// How stale the system snapshot may get: a just-added address stays
    /// reachable for at most this long. One `getifaddrs` a second per VM
    /// costs nothing measurable, while reading it for every connection
    /// would let a busy guest make the host dump its interfaces at will.
    pub const MAX_AGE: Duration = Duration::from_secs(1);

    /// The host's real interface addresses, via `getifaddrs`.
    pub fn system() -> Self {
        HostAddresses::new(Box::new(host_addresses), Self::MAX_AGE)
    }

    /// Addresses from `source`, re-read when older than `max_age`.
    pub fn new(source: AddressSource, max_age: Duration) -> Self {
        HostAddresses {
            source,
            max_age,
            snapshot: Mutex::new(None),
        }
    }

    /// The addresses as of `now`: the snapshot, or a fresh one when it is
    /// older than `max_age`. If reading fails the previous snapshot stays
    /// (an empty list would silently open the host's addresses).
    pub fn get(&self, now: Instant) -> Arc<[IpAddr]> {
        // A panic elsewhere while holding the lock leaves a valid snapshot.
        let mut snap = self
            .snapshot
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((at, addrs)) = snap.as_ref() {
            if now.saturating_duration_since(*at) < self.max_age {
                return addrs.clone();
            }
        }
        let addrs: Arc<[IpAddr]> = match (self.source)() {
            Ok(addrs) => addrs.into(),
            Err(e) => {
                warn!(error = %e, "cannot read the host's interface addresses; egress keeps the last known set");
                snap.as_ref()
                    .map(|(_, a)| a.clone())
                    .unwrap_or_else(|| Arc::from(Vec::new()))
            }
        };
        *snap = Some((now, addrs.clone()));
        addrs
    }
}

/// The host's own interface addresses (a VM must not reach the host's
/// services through a public address either).
pub fn host_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(std::io::Error::last_os_error());
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
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A changed set is seen once the snapshot is older than `max_age`, not
    /// before; a failed read keeps the last set.
    #[test]
    fn a_changed_set_of_host_addresses_is_seen_after_max_age() {
        let current: Arc<Mutex<std::io::Result<Vec<IpAddr>>>> =
            Arc::new(Mutex::new(Ok(vec!["203.0.113.7".parse().unwrap()])));
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (c, r) = (current.clone(), reads.clone());
        let own = HostAddresses::new(
            Box::new(move || {
                r.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match &*c.lock().unwrap() {
                    Ok(a) => Ok(a.clone()),
                    Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                }
            }),
            Duration::from_secs(1),
        );
        let old: IpAddr = "203.0.113.7".parse().unwrap();
        let new: IpAddr = "198.51.100.9".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(&*own.get(t0), &[old]);
        *current.lock().unwrap() = Ok(vec![new]);
        let read = reads.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(&*own.get(t0 + Duration::from_millis(500)), &[old]);
        assert_eq!(
            reads.load(std::sync::atomic::Ordering::Relaxed),
            read,
            "cached"
        );
        let later = t0 + Duration::from_millis(1500);
        assert_eq!(&*own.get(later), &[new], "the change is seen");
        assert!(super::super::deny_reason(new, &own.get(later)).is_some());
        assert_eq!(super::super::deny_reason(old, &own.get(later)), None);
        *current.lock().unwrap() = Err(std::io::Error::other("netlink down"));
        assert_eq!(
            &*own.get(later + Duration::from_secs(5)),
            &[new],
            "a failed read keeps the last set"
        );
    }

    #[test]
    fn the_system_set_includes_loopback() {
        let own = HostAddresses::system().get(Instant::now());
        assert!(own.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{own:?}");
    }
}
