//! Operator-supplied files placed into every new VM before it is used:
//! `[[vm_files]]` in `driver.toml` (a host file, its path in the VM, its
//! mode, which kinds of VM), then the `vm_setup` command. For a site CA, a
//! browser policy, or the tests' own CLI and CA. Runs once per boot: a
//! marker under `/run` (tmpfs) records that it ran, so a VM that boots
//! again (power on, restore) is provisioned again.

use polydev_api::agent::ExecRequest;
use serde::Deserialize;

use super::host::{HostApi, HostError};
use crate::store::VmKind;

/// Marker written once a VM is provisioned (tmpfs: gone on reboot).
const MARKER: &str = "/run/polydev-provisioned";

/// Write stdin to `$1` with mode `$2`, as root, into a root-owned place
/// (the driver checks `path` is not under a home directory). The temporary
/// file is unique (`mktemp`) so that two placements never rename each
/// other's.
const PLACE: &str = r#"umask 022; mkdir -p "${1%/*}" && t=$(mktemp "$1.polydev-tmp.XXXXXX") || exit 1
cat >"$t" && chmod "$2" "$t" && mv "$t" "$1" || { rm -f "$t"; exit 1; }"#;

/// One file to place (`[[vm_files]]`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmFile {
    /// File on the host (read at each placement).
    pub source: std::path::PathBuf,
    /// Absolute path in the VM; never under `/home` or `/root` (root must
    /// not write where a user can plant links).
    pub path: String,
    /// Permission bits as an octal string, e.g. `"0644"` or `"0755"`.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Which VMs get it (`browser`, `cli`; default both).
    #[serde(default = "both")]
    pub kinds: Vec<String>,
}

fn default_mode() -> String {
    "0644".into()
}

fn both() -> Vec<String> {
    vec!["browser".into(), "cli".into()]
}

impl VmFile {
    /// What is wrong with this entry, if anything.
    pub fn problem(&self) -> Option<String> {
        let p = &self.path;
        if !p.starts_with('/') || p.ends_with('/') || p.split('/').any(|c| c == "..") {
            return Some(format!(
                "vm_files.path {p:?} must be an absolute file path without `..`"
            ));
        }
        if ["/home", "/root", "/tmp", "/var/tmp", "/run/user"]
            .iter()
            .any(|d| p == d || p.starts_with(&format!("{d}/")))
        {
            return Some(format!(
                "vm_files.path {p:?} is in a place a VM user can write; use a system path such as /usr/local or /etc"
            ));
        }
        if self.mode.len() != 4
            || !self.mode.starts_with('0')
            || !self.mode.chars().all(|c| ('0'..='7').contains(&c))
        {
            return Some(format!(
                "vm_files.mode {:?} must be four octal digits such as \"0644\"",
                self.mode
            ));
        }
        if self.kinds.is_empty() || self.kinds.iter().any(|k| k != "browser" && k != "cli") {
            return Some(format!(
                "vm_files.kinds {:?} must list \"browser\" and/or \"cli\"",
                self.kinds
            ));
        }
        None
    }

    fn for_kind(&self, kind: VmKind) -> bool {
        let k = match kind {
            VmKind::Browser => "browser",
            VmKind::Cli => "cli",
        };
        self.kinds.iter().any(|x| x == k)
    }
}

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The VM did not answer; try again.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A source file on the host could not be read.
    #[error("vm_files source {path}: {source}; fix driver.toml or the file")]
    Source {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A step ran in the VM and failed.
    #[error("{0}")]
    Failed(String),
}

/// Place the files for a VM of `kind` and run `setup`, unless this boot of
/// the VM already had them. No files and no setup: nothing is done.
pub async fn provision(
    host: &dyn HostApi,
    vm: &str,
    kind: VmKind,
    files: &[VmFile],
    setup: Option<&[String]>,
) -> Result<(), ProvisionError> {
    let mine: Vec<&VmFile> = files.iter().filter(|f| f.for_kind(kind)).collect();
    if mine.is_empty() && setup.is_none() {
        return Ok(());
    }
    let done = host
        .exec(
            vm,
            ExecRequest {
                argv: vec!["test".into(), "-e".into(), MARKER.into()],
                timeout_ms: Some(30_000),
                ..Default::default()
            },
        )
        .await?;
    if done.success() {
        return Ok(());
    }
    for f in mine {
        let data = std::fs::read(&f.source).map_err(|source| ProvisionError::Source {
            path: f.source.display().to_string(),
            source,
        })?;
        if data.len() > PIECE {
            place_in_pieces(host, vm, f, &data).await?;
            continue;
        }
        run(
            host,
            vm,
            ExecRequest {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    PLACE.into(),
                    "sh".into(),
                    f.path.clone(),
                    f.mode.clone(),
                ],
                stdin: Some(data),
                timeout_ms: Some(120_000),
                ..Default::default()
            },
            &format!("placing {}", f.path),
        )
        .await?;
    }
    if let Some(argv) = setup {
        run(
            host,
            vm,
            ExecRequest {
                argv: argv.to_vec(),
                timeout_ms: Some(300_000),
                ..Default::default()
            },
            "the vm_setup command",
        )
        .await?;
    }
    run(
        host,
        vm,
        ExecRequest {
            argv: vec!["touch".into(), MARKER.into()],
            timeout_ms: Some(30_000),
            ..Default::default()
        },
        "marking the VM provisioned",
    )
    .await
}

/// Most bytes of a file sent in one exec: a host agent takes request
/// bodies up to 8 MiB (`polydev_host::server::MAX_BODY`) and standard input
/// travels as base64 (4/3 larger) in JSON, so a larger file (the 7 MiB
/// static test CLI) goes in pieces.
const PIECE: usize = 4 * 1024 * 1024;

/// The first piece: into a fresh temporary file beside the target, whose
/// name is printed for the pieces after it.
const PLACE_FIRST: &str = r#"umask 022; mkdir -p "${1%/*}" && t=$(mktemp "$1.polydev-tmp.XXXXXX") || exit 1
cat >"$t" || { rm -f "$t"; exit 1; }
printf '%s' "$t""#;

/// A further piece, appended to that temporary file (which must be one of
/// ours for this target).
const PLACE_MORE: &str = r#"case "$2" in "$1".polydev-tmp.*) ;; *) exit 2 ;; esac
cat >>"$2" || { rm -f "$2"; exit 1; }"#;

/// The last step: mode, then the atomic rename into place.
const PLACE_DONE: &str = r#"case "$3" in "$1".polydev-tmp.*) ;; *) exit 2 ;; esac
chmod "$2" "$3" && mv "$3" "$1" || { rm -f "$3"; exit 1; }"#;

/// Place `data` at `f.path` in pieces of [`PIECE`] bytes; the target
/// appears only whole (rename at the end).
async fn place_in_pieces(
    host: &dyn HostApi,
    vm: &str,
    f: &VmFile,
    data: &[u8],
) -> Result<(), ProvisionError> {
    let what = format!("placing {}", f.path);
    let sh = |script: &str, args: &[&str], stdin: Option<Vec<u8>>| ExecRequest {
        argv: ["sh", "-c", script, "sh"]
            .into_iter()
            .chain(args.iter().copied())
            .map(String::from)
            .collect(),
        stdin,
        timeout_ms: Some(120_000),
        ..Default::default()
    };
    let mut pieces = data.chunks(PIECE);
    let first = pieces.next().unwrap_or_default().to_vec();
    let out = host
        .exec(vm, sh(PLACE_FIRST, &[&f.path], Some(first)))
        .await?;
    if !out.success() {
        return Err(ProvisionError::Failed(format!(
            "{what} failed in the VM: {}",
            super::login::redact(String::from_utf8_lossy(&out.stderr).trim())
        )));
    }
    let tmp = String::from_utf8_lossy(&out.stdout).trim().to_string();
    for piece in pieces {
        run(
            host,
            vm,
            sh(PLACE_MORE, &[&f.path, &tmp], Some(piece.to_vec())),
            &what,
        )
        .await?;
    }
    run(
        host,
        vm,
        sh(PLACE_DONE, &[&f.path, &f.mode, &tmp], None),
        &what,
    )
    .await
}

async fn run(
    host: &dyn HostApi,
    vm: &str,
    req: ExecRequest,
    what: &str,
) -> Result<(), ProvisionError> {
    let out = host.exec(vm, req).await?;
    if out.success() {
        Ok(())
    } else {
        Err(ProvisionError::Failed(format!(
            "{what} failed in the VM: {}",
            super::login::redact(String::from_utf8_lossy(&out.stderr).trim())
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, mode: &str) -> VmFile {
        VmFile {
            source: "/x".into(),
            path: path.into(),
            mode: mode.into(),
            kinds: both(),
        }
    }

    #[test]
    fn entries_are_checked() {
        assert_eq!(file("/usr/local/bin/x", "0755").problem(), None);
        for bad in [
            "relative",
            "/home/user/x",
            "/root/.x",
            "/tmp/x",
            "/a/../b",
            "/etc/",
        ] {
            assert!(file(bad, "0644").problem().is_some(), "{bad}");
        }
        for bad in ["644", "0999", "07555", "rwx"] {
            assert!(file("/etc/x", bad).problem().is_some(), "{bad}");
        }
        let mut f = file("/etc/x", "0644");
        f.kinds = vec!["desktop".into()];
        assert!(f.problem().is_some());
    }
}
