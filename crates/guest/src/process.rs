//! Building child processes: environment, working directory, user, and a
//! session of their own.
//!
//! Users are looked up by parsing `/etc/passwd` and `/etc/group` directly:
//! the binary is static, and glibc's NSS does not work in static binaries.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

/// Errors of process setup.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The user is not in `/etc/passwd`.
    #[error("user `{0}` is not in /etc/passwd; create it in the image or pass a numeric uid")]
    UnknownUser(String),
    /// `/etc/passwd` could not be read.
    #[error("cannot read /etc/passwd to look up user `{user}`: {source}")]
    Passwd {
        /// The user looked up.
        user: String,
        /// The OS error.
        source: io::Error,
    },
    /// argv was empty.
    #[error("argv is empty; give at least the program name")]
    EmptyArgv,
    /// A string contained a NUL byte, which cannot reach `execve`.
    #[error("{0} contains a NUL byte, which a program cannot receive")]
    Nul(&'static str),
    /// An environment variable name is invalid.
    #[error("environment variable name `{0}` is invalid: it must be non-empty and contain no `=` or NUL")]
    EnvName(String),
}

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name (the uid as text when not in passwd).
    pub name: String,
    /// User id.
    pub uid: libc::uid_t,
    /// Primary group id.
    pub gid: libc::gid_t,
    /// Supplementary groups (including the primary one).
    pub groups: Vec<libc::gid_t>,
    /// Home directory.
    pub home: String,
    /// Login shell (`/bin/sh` when passwd names none).
    pub shell: String,
}

/// Find `user` (a name or a numeric uid) in passwd/group text. A numeric
/// uid missing from passwd runs with gid = uid and home `/`, like container
/// runtimes do, so an image without a passwd entry still works.
pub fn resolve_user(user: &str, passwd: &str, group: &str) -> Result<Credentials, ProcessError> {
    let numeric: Option<libc::uid_t> = user.parse().ok();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            continue;
        }
        let (Ok(uid), Ok(gid)) = (f[2].parse::<libc::uid_t>(), f[3].parse::<libc::gid_t>()) else {
            continue;
        };
        if f[0] == user || numeric == Some(uid) {
            let name = f[0].to_string();
            let mut groups = vec![gid];
            for g in group.lines() {
                let gf: Vec<&str> = g.split(':').collect();
                if gf.len() < 4 {
                    continue;
                }
                let Ok(id) = gf[2].parse::<libc::gid_t>() else {
                    continue;
                };
                if gf[3].split(',').any(|m| m == name) && !groups.contains(&id) {
                    groups.push(id);
                }
            }
            return Ok(Credentials {
                name,
                uid,
                gid,
                groups,
                home: f[5].to_string(),
                shell: Some(f[6])
                    .filter(|s| !s.is_empty())
                    .unwrap_or("/bin/sh")
                    .to_string(),
            });
        }
    }
    match numeric {
        Some(uid) => Ok(Credentials {
            name: user.to_string(),
            uid,
            gid: uid,
            groups: vec![uid],
            home: "/".into(),
            shell: "/bin/sh".into(),
        }),
        None => Err(ProcessError::UnknownUser(user.to_string())),
    }
}

/// Look `user` up in this system's `/etc/passwd` and `/etc/group`.
pub fn lookup_user(user: &str) -> Result<Credentials, ProcessError> {
    let passwd = std::fs::read_to_string("/etc/passwd").or_else(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Ok(String::new())
        } else {
            Err(ProcessError::Passwd {
                user: user.to_string(),
                source: e,
            })
        }
    })?;
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    resolve_user(user, &passwd, &group)
}

/// Check argv and env before they reach `Command`, which would otherwise
/// fail late with a less helpful message.
pub fn validate(argv: &[String], env: &BTreeMap<String, String>) -> Result<(), ProcessError> {
    if argv.is_empty() || argv[0].is_empty() {
        return Err(ProcessError::EmptyArgv);
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(ProcessError::Nul("an argument"));
    }
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(ProcessError::EnvName(k.clone()));
        }
        if v.contains('\0') {
            return Err(ProcessError::Nul("an environment value"));
        }
    }
    Ok(())
}

/// What to start.
pub struct Spec<'a> {
    /// Program and arguments.
    pub argv: &'a [String],
    /// The complete environment.
    pub env: &'a BTreeMap<String, String>,
    /// Working directory.
    pub cwd: &'a str,
    /// Run as this user instead of the agent's.
    pub creds: Option<&'a Credentials>,
    /// Standard input.
    pub stdin: Stdio,
    /// Make standard input (a terminal's slave side) the controlling
    /// terminal of the new session.
    pub tty: bool,
}

/// A `Command` for `spec` with piped stdout/stderr, in a new session (so a
/// whole process tree can be signalled through its group, and it has no
/// controlling terminal).
pub fn command(spec: Spec<'_>) -> Command {
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env)
        .current_dir(spec.cwd)
        .stdin(spec.stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let ids = spec.creds.map(|c| (c.uid, c.gid, c.groups.clone()));
    let tty = spec.tty;
    // SAFETY: the closure runs between fork and exec; it only makes
    // async-signal-safe syscalls and reads memory prepared before the fork.
    // Groups, gid and uid are set here rather than with CommandExt::uid/gid
    // because std would clear the supplementary groups after we set them.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some((uid, gid, groups)) = &ids {
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(*gid) < 0
                    || libc::setuid(*uid) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        broken line\n\
        bad:x:notanumber:0::/:/bin/sh\n\
        user:x:1000:1000:User,,,:/home/user:/bin/bash\n";
    const GROUP: &str = "root:x:0:\naudio:x:29:user\nvideo:x:44:other,user\nuser:x:1000:\n";

    #[test]
    fn resolves_by_name_and_uid() {
        let c = resolve_user("user", PASSWD, GROUP).ok();
        let c = c.as_ref();
        assert_eq!(c.map(|c| (c.uid, c.gid)), Some((1000, 1000)));
        assert_eq!(c.map(|c| c.groups.clone()), Some(vec![1000, 29, 44]));
        assert_eq!(c.map(|c| c.home.as_str()), Some("/home/user"));
        let r = resolve_user("0", PASSWD, GROUP).ok();
        assert_eq!(r.map(|c| c.name), Some("root".to_string()));
    }

    #[test]
    fn unknown_names_fail_and_unknown_uids_pass() {
        assert!(matches!(
            resolve_user("nobody", PASSWD, GROUP),
            Err(ProcessError::UnknownUser(_))
        ));
        let c = resolve_user("4242", PASSWD, "").ok();
        assert_eq!(c.map(|c| (c.uid, c.gid)), Some((4242, 4242)));
    }

    #[test]
    fn validates_argv_and_env() {
        let env = BTreeMap::new();
        assert!(validate(&[], &env).is_err());
        assert!(validate(&["".into()], &env).is_err());
        assert!(validate(&["a\0b".into()], &env).is_err());
        assert!(validate(&["ls".into()], &env).is_ok());
        let mut bad = BTreeMap::new();
        bad.insert("A=B".to_string(), "x".to_string());
        assert!(validate(&["ls".into()], &bad).is_err());
    }
}
