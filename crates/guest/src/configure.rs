//! The `configure` request: per-VM configuration pushed after boot and after
//! every snapshot restore.

use std::io::{self, Write};
use std::os::fd::AsRawFd;

use polydev_api::agent::{AgentErrorKind, GuestConfig};

use crate::files;
use crate::logger;
use crate::process;
use crate::supervisor::{self, SharedEnv, Supervisor};
use crate::util::lock;

/// `_IOW('R', 0x03, int[2])` from `<linux/random.h>`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

/// Errors of `configure`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigureError {
    /// The request is invalid; nothing was applied.
    #[error("invalid configuration, nothing was applied: {0}")]
    Invalid(String),
    /// Some steps failed; the others were applied.
    #[error("configuration partly applied: {0}")]
    Failed(String),
}

impl ConfigureError {
    /// The protocol's error kind.
    pub fn kind(&self) -> AgentErrorKind {
        match self {
            ConfigureError::Invalid(_) => AgentErrorKind::BadRequest,
            ConfigureError::Failed(_) => AgentErrorKind::Internal,
        }
    }
}

/// Check the whole configuration before applying any of it.
pub fn validate(cfg: &GuestConfig) -> Result<(), ConfigureError> {
    let invalid = |m: String| ConfigureError::Invalid(m);
    for f in &cfg.files {
        files::check_path(&f.path).map_err(|e| invalid(e.to_string()))?;
    }
    if let Some(h) = &cfg.hostname {
        if h.is_empty() || h.len() > 64 || h.contains('\0') {
            return Err(invalid(format!(
                "hostname {h:?} must be 1 to 64 bytes without NUL"
            )));
        }
    }
    process::validate(&["env".to_string()], &cfg.env).map_err(|e| invalid(e.to_string()))?;
    supervisor::validate(&cfg.services).map_err(|e| invalid(e.to_string()))?;
    if let Some(ns) = cfg.clock_unix_ns {
        timespec_from_ns(u128::from(ns))
            .ok_or_else(|| invalid(format!("clock_unix_ns {ns} is out of range")))?;
    }
    Ok(())
}

/// Apply `cfg` in the documented order: files first, then hostname, env,
/// entropy, clock, services. Every step is attempted; failures are
/// collected so one bad step does not hide the others.
pub fn apply(cfg: GuestConfig, env: &SharedEnv, sup: &Supervisor) -> Result<(), ConfigureError> {
    validate(&cfg)?;
    let mut failures: Vec<String> = Vec::new();
    for f in &cfg.files {
        if let Err(e) = files::write(f) {
            failures.push(e.to_string());
        }
    }
    if let Some(h) = &cfg.hostname {
        if let Err(e) = set_hostname(h) {
            failures.push(format!("cannot set hostname {h:?}: {e}"));
        }
    }
    if !cfg.env.is_empty() {
        lock(env).extend(cfg.env.clone());
    }
    if let Some(data) = &cfg.entropy {
        // Logged so that a host can tell each boot or resume got its own.
        match add_entropy(data) {
            Ok(()) => logger::info(format!(
                "configure: {} bytes of entropy credited",
                data.len()
            )),
            Err(e) => failures.push(e),
        }
    }
    if let Some(ns) = cfg.clock_unix_ns {
        if let Err(e) = set_clock(u128::from(ns)) {
            failures.push(format!(
                "cannot set the clock: {e}; the agent needs CAP_SYS_TIME"
            ));
        }
    }
    if let Err(e) = sup.declare(cfg.services) {
        failures.push(e.to_string());
    }
    if failures.is_empty() {
        Ok(())
    } else {
        let msg = failures.join("; ");
        logger::error(format!("configure: {msg}"));
        Err(ConfigureError::Failed(msg))
    }
}

fn set_hostname(h: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe h's bytes.
    let r = unsafe { libc::sethostname(h.as_ptr().cast(), h.len()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The `struct rand_pool_info` payload for RNDADDENTROPY: entropy_count
/// (bits), buf_size (bytes), then the bytes, padded to 32-bit words.
pub fn rand_pool_info(data: &[u8]) -> Option<Vec<u8>> {
    let bits = i32::try_from(data.len().checked_mul(8)?).ok()?;
    let len = i32::try_from(data.len()).ok()?;
    let mut buf = Vec::with_capacity(8 + data.len() + 4);
    buf.extend_from_slice(&bits.to_ne_bytes());
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(data);
    while buf.len() % 4 != 0 {
        buf.push(0);
    }
    Some(buf)
}

/// Mix `data` into the pool (any writer can) and credit it (needs
/// CAP_SYS_ADMIN), so that VMs restored from one snapshot diverge and
/// `getrandom` does not block.
fn add_entropy(data: &[u8]) -> Result<(), String> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("cannot open /dev/urandom: {e}"))?;
    f.write_all(data)
        .map_err(|e| format!("cannot write entropy to /dev/urandom: {e}"))?;
    let info =
        rand_pool_info(data).ok_or("entropy is too large to credit; send less than 256 MiB")?;
    // SAFETY: info holds a complete rand_pool_info of the declared size.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if r < 0 {
        return Err(format!(
            "cannot credit entropy (RNDADDENTROPY): {}; the agent needs CAP_SYS_ADMIN",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Split nanoseconds since the epoch into a timespec, if representable.
pub fn timespec_from_ns(ns: u128) -> Option<libc::timespec> {
    let secs = i64::try_from(ns / 1_000_000_000).ok()?;
    Some(libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    })
}

fn set_clock(ns: u128) -> io::Result<()> {
    let ts = timespec_from_ns(ns).ok_or(io::ErrorKind::InvalidInput)?;
    // SAFETY: ts is a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use polydev_api::agent::FileSpec;

    #[test]
    fn pool_info_layout() {
        let b = rand_pool_info(&[1, 2, 3, 4, 5]).unwrap_or_default();
        assert_eq!(&b[0..4], &40i32.to_ne_bytes());
        assert_eq!(&b[4..8], &5i32.to_ne_bytes());
        assert_eq!(&b[8..13], &[1, 2, 3, 4, 5]);
        assert_eq!(b.len() % 4, 0);
    }

    #[test]
    fn clock_split() {
        let ts = timespec_from_ns(1_700_000_000_123_456_789);
        assert_eq!(
            ts.map(|t| (t.tv_sec, t.tv_nsec)),
            Some((1_700_000_000, 123_456_789))
        );
        assert!(timespec_from_ns(u128::MAX).is_none());
    }

    #[test]
    fn validation_catches_bad_parts() {
        let mut cfg = GuestConfig::default();
        assert!(validate(&cfg).is_ok());
        cfg.files.push(FileSpec {
            path: "relative".into(),
            data: vec![],
            mode: 0o644,
            create_dirs: false,
        });
        assert!(matches!(validate(&cfg), Err(ConfigureError::Invalid(_))));
        let cfg = GuestConfig {
            hostname: Some(String::new()),
            ..Default::default()
        };
        assert!(validate(&cfg).is_err());
        let mut cfg = GuestConfig::default();
        cfg.env.insert("A=B".into(), "x".into());
        assert!(validate(&cfg).is_err());
    }
}
