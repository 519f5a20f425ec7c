//! The operator's upstream proxy providers (issue 4 §3).
//!
//! In production an upstream is a residential-proxy provider: one host, a
//! port range in which every port is a stable outbound IP, and one
//! `user:password` credential for the whole account. Each user gets a port
//! of their own (see `store::upstream`), so users never share an outbound
//! IP. This module is the configuration side: which providers exist, their
//! ranges and quarantine periods, and where their password comes from — an
//! environment variable or a mode-0600 file named in the config, never the
//! config file or the database in clear.
//!
//! ```toml
//! [[provider]]
//! name = "resi"
//! protocol = "http"                                  # or "socks5"
//! host = "proxy.example.net"
//! ports = "10000-20000"
//! username = "customer-123"
//! password_env = "POLYDEV_UPSTREAM_RESI_PASSWORD"   # or password_file = "/etc/polydev/resi.pass"
//! quarantine_secs = 86400
//! ```

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use polydev_api::vm::{EgressPolicy, Secret, Upstream};
use serde::Deserialize;
use zeroize::Zeroizing;

/// Default quarantine of a released port: a day, so the next user of an
/// outbound IP is not mistaken for the previous one by the sites they visit.
pub const DEFAULT_QUARANTINE_SECS: u64 = 24 * 3600;

/// Errors loading the upstream configuration. None of them quotes a password.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamConfigError {
    /// The file could not be read.
    #[error("upstream config {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, or not the schema.
    #[error("upstream config {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (line and column; the config holds no secret).
        message: String,
    },
    /// A value is not acceptable.
    #[error("upstream config {path}: provider {provider:?}: `{field}` {problem}")]
    Invalid {
        /// The file.
        path: String,
        /// Provider name (may be empty when the name itself is the problem).
        provider: String,
        /// The field.
        field: &'static str,
        /// What is wrong and what to do.
        problem: String,
    },
    /// The password source could not be used.
    #[error("upstream provider {provider:?}: {problem}")]
    Password {
        /// Provider name.
        provider: String,
        /// What is wrong and what to do (never the password).
        problem: String,
    },
}

/// One configured upstream provider.
#[derive(Clone, Debug)]
pub struct UpstreamProvider {
    /// Stable name (`[a-z0-9-]`), stored with every assignment.
    pub name: String,
    /// `http` (HTTP CONNECT) or `socks5`.
    pub protocol: String,
    /// Proxy host name or address.
    pub host: String,
    /// First port of the range.
    pub first_port: u16,
    /// Last port of the range (inclusive).
    pub last_port: u16,
    /// Proxy user name.
    pub username: Option<String>,
    /// Proxy password (`Debug` shows `***`).
    pub password: Option<Secret>,
    /// How long a released port stays unassignable to anyone else.
    pub quarantine_ms: i64,
}

impl UpstreamProvider {
    /// Number of ports in the range.
    pub fn size(&self) -> u32 {
        u32::from(self.last_port) - u32::from(self.first_port) + 1
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first_port..=self.last_port).contains(&port)
    }

    /// The egress policy of a VM whose user holds `port` at this provider:
    /// chain every connection through it with the account's credentials
    /// (handed to the host agent; never into the VM, never logged).
    pub fn policy(&self, port: u16) -> EgressPolicy {
        EgressPolicy {
            upstream: Some(Upstream {
                url: format!("{}://{}:{port}", self.protocol, self.host),
                username: self.username.clone(),
                password: self.password.clone(),
            }),
            allow: Vec::new(),
            direct: false,
        }
    }
}

/// Every configured provider, in the order assignment tries them.
#[derive(Clone, Debug, Default)]
pub struct UpstreamConfig {
    /// Providers in config order.
    pub providers: Vec<UpstreamProvider>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    provider: Vec<RawProvider>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: String,
    #[serde(default)]
    protocol: Option<String>,
    host: String,
    ports: String,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password_env: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    quarantine_secs: Option<u64>,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 32
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn parse_range(s: &str) -> Option<(u16, u16)> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let (a, b): (u16, u16) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a >= 1 && a <= b).then_some((a, b))
}

/// Read a password file: it must be mode 0600 or stricter (like the vault's
/// key file) and hold one line.
fn read_password_file(provider: &str, path: &Path) -> Result<Secret, UpstreamConfigError> {
    let err = |problem: String| UpstreamConfigError::Password {
        provider: provider.to_string(),
        problem,
    };
    let meta = std::fs::metadata(path)
        .map_err(|e| err(format!("password file {}: {e}", path.display())))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!(
            "password file {} has mode {mode:o}; it must not be accessible to group or others: run `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| err(format!("password file {}: {e}", path.display())))?,
    );
    let pw = text.trim_end_matches(['\r', '\n']);
    if pw.is_empty() || pw.contains('\n') {
        return Err(err(format!(
            "password file {} must hold the password on one line",
            path.display()
        )));
    }
    Ok(Secret::new(pw))
}

impl UpstreamConfig {
    /// No providers: VMs get no upstream (all egress refused).
    pub fn none() -> Self {
        Self::default()
    }

    /// Parse a config file's text; `origin` names it in errors. Passwords
    /// are read from their environment variable or file now, so a missing
    /// one fails at start rather than at a user's first VM.
    pub fn parse(text: &str, origin: &str) -> Result<Self, UpstreamConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| UpstreamConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        let mut seen = BTreeSet::new();
        let mut providers = Vec::new();
        for p in raw.provider {
            let bad = |field: &'static str, problem: String| UpstreamConfigError::Invalid {
                path: origin.to_string(),
                provider: p.name.clone(),
                field,
                problem,
            };
            if !valid_name(&p.name) {
                return Err(bad("name", "must be 1-32 characters of [a-z0-9-]".into()));
            }
            if !seen.insert(p.name.clone()) {
                return Err(bad("name", "is defined twice".into()));
            }
            if p.host.is_empty()
                || p.host
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b"/@?#".contains(&b))
            {
                return Err(bad(
                    "host",
                    format!("{:?} must be a bare host name or address", p.host),
                ));
            }
            let protocol = p.protocol.clone().unwrap_or_else(|| "http".into());
            if !matches!(protocol.as_str(), "http" | "socks5") {
                return Err(bad(
                    "protocol",
                    format!("{protocol:?} must be \"http\" (CONNECT) or \"socks5\""),
                ));
            }
            let Some((first_port, last_port)) = parse_range(&p.ports) else {
                return Err(bad(
                    "ports",
                    format!(
                        "{:?} must be FIRST-LAST (1-65535, FIRST <= LAST) or one port",
                        p.ports
                    ),
                ));
            };
            let password = match (&p.password_env, &p.password_file) {
                (Some(_), Some(_)) => {
                    return Err(bad(
                        "password_env",
                        "and `password_file` are exclusive: name one".into(),
                    ))
                }
                (Some(var), None) => match std::env::var(var) {
                    Ok(v) if !v.is_empty() => Some(Secret::new(v)),
                    _ => {
                        return Err(UpstreamConfigError::Password {
                            provider: p.name.clone(),
                            problem: format!("environment variable {var} is not set (or empty); export the provider's password in it"),
                        })
                    }
                },
                (None, Some(path)) => Some(read_password_file(&p.name, path)?),
                (None, None) => None,
            };
            if password.is_some() && p.username.is_none() {
                return Err(bad(
                    "username",
                    "is required when a password is configured".into(),
                ));
            }
            let quarantine_secs = p.quarantine_secs.unwrap_or(DEFAULT_QUARANTINE_SECS);
            providers.push(UpstreamProvider {
                name: p.name,
                protocol,
                host: p.host,
                first_port,
                last_port,
                username: p.username,
                password,
                quarantine_ms: i64::try_from(quarantine_secs.saturating_mul(1000))
                    .unwrap_or(i64::MAX),
            });
        }
        Ok(UpstreamConfig { providers })
    }

    /// Load a config file.
    pub fn load(path: &Path) -> Result<Self, UpstreamConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| UpstreamConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Load `path` if it exists; no file means no providers.
    pub fn load_optional(path: &Path) -> Result<Self, UpstreamConfigError> {
        if path.exists() {
            Self::load(path)
        } else {
            Ok(Self::none())
        }
    }

    /// A provider by name.
    pub fn provider(&self, name: &str) -> Option<&UpstreamProvider> {
        self.providers.iter().find(|p| p.name == name)
    }

    /// Whether any provider is configured.
    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
[[provider]]
name = "resi"
host = "127.0.0.1"
ports = "10000-10004"
username = "u"
password_env = "POLYDEV_TEST_UPSTREAM_PW_UNSET_X"
"#;

    #[test]
    fn parses_and_builds_policy() {
        let text = OK.replace("password_env = \"POLYDEV_TEST_UPSTREAM_PW_UNSET_X\"\n", "");
        let c = UpstreamConfig::parse(&text, "u.toml").unwrap();
        let p = &c.providers[0];
        assert_eq!((p.first_port, p.last_port, p.size()), (10000, 10004, 5));
        assert_eq!(p.quarantine_ms, 86_400_000);
        let pol = p.policy(10003);
        assert_eq!(pol.upstream.unwrap().url, "http://127.0.0.1:10003");
        let socks = UpstreamConfig::parse(
            &text.replace("ports", "protocol = \"socks5\"\nports"),
            "u.toml",
        )
        .unwrap();
        let url = socks.providers[0].policy(10000).upstream.unwrap().url;
        assert_eq!(url, "socks5://127.0.0.1:10000");
    }

    #[test]
    fn errors_name_the_field_and_never_the_password() {
        let e = UpstreamConfig::parse(OK, "u.toml").unwrap_err().to_string();
        assert!(e.contains("POLYDEV_TEST_UPSTREAM_PW_UNSET_X"), "{e}");
        for (from, to, want) in [
            ("ports = \"10000-10004\"", "ports = \"5-1\"", "ports"),
            ("name = \"resi\"", "name = \"Resi!\"", "name"),
            ("host = \"127.0.0.1\"", "host = \"u:p@h\"", "host"),
            (
                "username = \"u\"",
                "username = \"u\"\nbogus = 1",
                "unknown field",
            ),
        ] {
            let e = UpstreamConfig::parse(&OK.replace(from, to), "u.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.contains("u.toml"), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "hunter2\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = OK.replace(
            "password_env = \"POLYDEV_TEST_UPSTREAM_PW_UNSET_X\"",
            &format!("password_file = \"{}\"", f.display()),
        );
        let e = UpstreamConfig::parse(&text, "u.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("chmod 600") && !e.contains("hunter2"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = UpstreamConfig::parse(&text, "u.toml").unwrap();
        let p = &c.providers[0];
        assert_eq!(p.password.as_ref().unwrap().expose(), "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
