//! Custody: exactly one live holder per credential.
//!
//! Once a credential is delivered, the user's CLI VM holds it and the
//! vault's copy is only as good as the holder's last refresh: providers
//! that rotate refresh tokens revoke the old one on use. So for every
//! running CLI VM that holds credentials the driver keeps one long poll
//! (`watch_files` in the guest agent) over each provider's credential
//! files. A change is judged ([`judge`]): well-formed with every required
//! field → sealed as the next version (write-back, with the refresh time
//! and the expiry when the files say); blanked token fields or a removed
//! file → the credential is marked `needs_login` with the reason;
//! anything else (half-written, refused) is ignored. A CLI VM that holds
//! nothing (a new or recreated one) gets the latest version delivered,
//! once the old holder is gone — its disk, and so its copy, goes with it.
//! Nothing here ever runs a provider's logout: on a copy it would revoke
//! the one live credential.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use polydev_api::agent::{
    WatchPath, WatchSpec, WatchedFile, MAX_WATCH_FILE, WATCH_MISSING, WATCH_REFUSED,
};
use serde_json::Value;

use super::session::{decode_credential, deliver_file, encode, owner_user};
use super::vm::host_ref;
use super::{lock, login, spawn_step, Inner};
use crate::providers::{CaptureError, Provider};
use crate::store::{CustodyTarget, Refreshed, Session, StoreError, VmKind, STATUS_OK};

/// How long one watch waits in the guest before answering unchanged.
pub const WATCH_MS: u64 = 25_000;

/// What the keys of a holder's files last were, per custody record
/// (`custody/<user>/<provider>`): (holder VM, version, key per capture
/// file). One entry per held credential, dropped with it.
pub(super) type Known = HashMap<String, (String, i64, Vec<String>)>;

/// What a change in the holder's files means.
#[derive(Debug, PartialEq, Eq)]
pub enum Judged {
    /// A valid credential: its files by path (relative to home) and the
    /// access token's expiry (ms) when readable.
    Valid(BTreeMap<String, Vec<u8>>, Option<i64>),
    /// The credential is dead; why (never a secret).
    Dead(String),
    /// Not a credential to keep, but no verdict either (a file half
    /// written, refused by the agent); why.
    Ignore(String),
}

/// Judge the holder's files (paths relative to home) against the
/// provider's `[[capture]]` declaration.
pub fn judge(p: &Provider, files: &[(String, WatchedFile)]) -> Judged {
    let mut map = BTreeMap::new();
    for (rel, f) in files {
        match f.key.as_str() {
            WATCH_MISSING => {}
            WATCH_REFUSED => {
                return Judged::Ignore(format!(
                    "{rel}: {}",
                    f.problem.as_deref().unwrap_or("refused")
                ))
            }
            _ => {
                if let Some(d) = &f.data {
                    map.insert(rel.clone(), d.clone());
                }
            }
        }
    }
    match p.validate_capture(&map) {
        Ok(()) => {}
        Err(CaptureError::Missing(path)) => {
            return Judged::Dead(format!(
                "the CLI removed {path} (signed out); connect {} again",
                p.name
            ))
        }
        Err(CaptureError::MissingKey { path, key }) => {
            return Judged::Dead(format!(
                "the CLI blanked `{key}` in {path} (its refresh was refused); connect {} again",
                p.name
            ))
        }
        Err(e) => return Judged::Ignore(e.to_string()),
    }
    let expiry = map.values().find_map(|d| {
        serde_json::from_slice::<Value>(d)
            .ok()
            .and_then(|v| expiry_of(&v, 0))
    });
    Judged::Valid(map, expiry)
}

/// A field that names when the access token expires, as Unix ms: numbers
/// under 10^11 are seconds (`expires_at` of the test CLI, Codex-style),
/// larger ones milliseconds (`expiresAt` of Claude Code, `expiry_date`
/// of Gemini CLI). Searched a few levels deep.
pub fn expiry_of(v: &Value, depth: usize) -> Option<i64> {
    const NAMES: &[&str] = &[
        "expires_at",
        "expiresAt",
        "expiry_date",
        "expiry",
        "expires",
    ];
    let obj = v.as_object()?;
    for n in NAMES {
        if let Some(x) = obj.get(*n).and_then(Value::as_i64).filter(|x| *x > 0) {
            return Some(if x < 100_000_000_000 {
                x.saturating_mul(1000)
            } else {
                x
            });
        }
    }
    if depth >= 3 {
        return None;
    }
    obj.values().find_map(|c| expiry_of(c, depth + 1))
}

/// A dead-credential message in a CLI's own output (a refresh refused:
/// `invalid_grant`, the token already used or revoked): the reason to
/// record, else `None`. JSON lines are the model's answer as the CLI
/// streams it, not the CLI's own messages, so they are not looked at: a
/// prompt about OAuth must not mark the credential dead.
pub fn refusal_in(output: &str) -> Option<String> {
    let line = output.lines().map(str::trim).find(|l| {
        if l.starts_with('{') || l.starts_with('[') {
            return false;
        }
        let l = l.to_ascii_lowercase();
        l.contains("invalid_grant")
            || (l.contains("refresh")
                && (l.contains("already used") || l.contains("reused") || l.contains("revoked")))
    })?;
    let short: String = login::redact(line).chars().take(300).collect();
    Some(format!(
        "the provider refused the refresh token ({short}); connect the provider again"
    ))
}

/// Record that the CLI reported its credential refused.
pub(super) async fn note_refusal(
    inner: &Inner,
    user_id: &str,
    provider: &str,
    reason: &str,
) -> Result<(), StoreError> {
    if let Some(rec) = inner.store.credential(user_id, provider).await? {
        if inner
            .store
            .mark_needs_login(user_id, provider, rec.version, reason)
            .await?
        {
            tracing::warn!(user = %user_id, %provider, %reason, "custody: the credential is dead");
        }
    }
    Ok(())
}

/// The same credential: the same files, JSON ones compared as values (a
/// CLI that rewrites its file with other spacing or key order refreshed
/// nothing).
pub fn same_files(
    old: &BTreeMap<String, zeroize::Zeroizing<Vec<u8>>>,
    new: &BTreeMap<String, Vec<u8>>,
) -> bool {
    old.len() == new.len()
        && old.iter().all(|(path, a)| {
            new.get(path).is_some_and(|b| {
                a[..] == b[..]
                    || matches!(
                        (serde_json::from_slice::<Value>(a), serde_json::from_slice::<Value>(b)),
                        (Ok(x), Ok(y)) if x == y
                    )
            })
        })
}

pub(super) fn record_id(t: &CustodyTarget) -> String {
    format!("custody/{}/{}", t.user_id, t.provider)
}

/// Start a custody step for every credential of a user with a running CLI
/// VM: a watch where that VM holds it, a delivery where nobody does.
pub(super) fn schedule(inner: &Arc<Inner>, targets: Vec<CustodyTarget>, sessions: &[Session]) {
    if !inner.cfg.deliver_to_cli_vm {
        return;
    }
    let ids: std::collections::HashSet<String> = targets.iter().map(record_id).collect();
    lock(&inner.custody_known).retain(|id, _| ids.contains(id));
    for t in targets {
        let id = record_id(&t);
        match &t.holder_vm_id {
            Some(h) if *h == t.cli_vm_id => {
                spawn_step(
                    inner,
                    id,
                    t.version,
                    move |i| async move { watch(&i, t).await },
                )
            }
            // A sign-in under way delivers its own version.
            None if t.status == STATUS_OK
                && !sessions
                    .iter()
                    .any(|s| s.user_id == t.user_id && s.provider == t.provider) =>
            {
                spawn_step(inner, id, t.version, move |i| async move {
                    deliver(&i, t).await
                })
            }
            // Held by another VM that is not gone yet (being destroyed):
            // the new one waits until that copy is gone with its disk.
            _ => {}
        }
    }
}

/// Deliver the latest version into the user's CLI VM, which holds nothing.
async fn deliver(inner: &Inner, t: CustodyTarget) -> Result<bool, StoreError> {
    let Some(p) = inner.providers.get(&t.provider) else {
        return Ok(false);
    };
    // The vault first: a record that cannot be opened costs the VM nothing.
    let pt = match inner.keys.vault() {
        Ok(v) => match v.load(&inner.store, &t.user_id, &t.provider).await {
            Ok(Some(pt)) => pt,
            Ok(None) => return Ok(false),
            Err(e) => {
                tracing::warn!(user = %t.user_id, provider = %t.provider, error = %e, "custody: cannot open the credential to deliver it");
                return Ok(false);
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "custody: the vault keys are unusable");
            return Ok(false);
        }
    };
    let Some(files) = decode_credential(&pt) else {
        return Ok(false);
    };
    let vm = inner.store.vm(&t.cli_vm_id).await?;
    let r = host_ref(&vm);
    let host = &*inner.host;
    // `[[vm_files]]` and `vm_setup` before a delivery, as for a sign-in's.
    let c = &inner.cfg;
    if let Err(e) =
        super::provision::provision(host, r, VmKind::Cli, &c.vm_files, c.vm_setup.as_deref()).await
    {
        tracing::debug!(vm = %vm.id, error = %e, "custody: provisioning the new holder failed; retrying");
        return Ok(false);
    }
    if !matches!(login::ready(host, r, &inner.cfg.cli_ready).await, Ok(true)) {
        return Ok(false);
    }
    let owner = inner.cfg.cli_owner.as_deref().and_then(owner_user);
    for (path, data) in &files {
        let Some(spec) = p.capture.iter().find(|f| &f.path == path) else {
            continue;
        };
        let full = format!("{}/{path}", inner.cfg.cli_home);
        if let Err(e) = deliver_file(host, r, &full, path, data, &spec.deliver_keys, owner).await {
            tracing::warn!(vm = %vm.id, provider = %t.provider, error = ?e, "custody: delivery into the new holder failed; retrying");
            return Ok(false);
        }
    }
    let held = inner
        .store
        .set_credential_holder(&t.user_id, &t.provider, t.version, &vm.id)
        .await?;
    tracing::info!(vm = %vm.id, provider = %t.provider, version = t.version, held, "custody: delivered the latest version to the new holder");
    Ok(true)
}

/// One long poll over the holder's files, and what follows from a change.
async fn watch(inner: &Inner, t: CustodyTarget) -> Result<bool, StoreError> {
    let Some(p) = inner.providers.get(&t.provider) else {
        return Ok(false);
    };
    if p.capture.is_empty() {
        return Ok(false);
    }
    let id = record_id(&t);
    let vm = inner.store.vm(&t.cli_vm_id).await?;
    let known: Vec<String> = match lock(&inner.custody_known).get(&id) {
        Some((v, ver, keys)) if *v == vm.id && *ver == t.version => keys.clone(),
        _ => vec![String::new(); p.capture.len()],
    };
    let first = known.iter().all(String::is_empty);
    let user = inner
        .cfg
        .cli_owner
        .as_deref()
        .and_then(owner_user)
        .unwrap_or("root")
        .to_string();
    let spec = WatchSpec {
        user,
        files: p
            .capture
            .iter()
            .zip(&known)
            .map(|(c, k)| WatchPath {
                path: format!("{}/{}", inner.cfg.cli_home, c.path),
                known: k.clone(),
            })
            .collect(),
        timeout_ms: WATCH_MS,
        max_bytes: MAX_WATCH_FILE,
    };
    let files = match inner.host.watch_files(host_ref(&vm), spec).await {
        Ok(f) if f.len() == p.capture.len() => f,
        Ok(_) => return Ok(false),
        Err(e) => {
            tracing::debug!(vm = %vm.id, error = %e, "custody: watch failed; retrying");
            return Ok(false);
        }
    };
    let keys: Vec<String> = files.iter().map(|f| f.key.clone()).collect();
    if keys == known {
        return Ok(false);
    }
    let remember = |version: i64| {
        lock(&inner.custody_known).insert(id.clone(), (vm.id.clone(), version, keys.clone()));
    };
    let rel: Vec<(String, WatchedFile)> = p
        .capture
        .iter()
        .map(|c| c.path.clone())
        .zip(files)
        .collect();
    match judge(p, &rel) {
        Judged::Ignore(why) => {
            tracing::warn!(vm = %vm.id, provider = %t.provider, %why, "custody: the holder's files are not a credential to keep");
            remember(t.version);
            Ok(false)
        }
        Judged::Dead(reason) => {
            tracing::warn!(vm = %vm.id, provider = %t.provider, %reason, "custody: the credential is dead");
            let marked = inner
                .store
                .mark_needs_login(&t.user_id, &t.provider, t.version, &reason)
                .await?;
            remember(t.version);
            Ok(marked)
        }
        Judged::Valid(files, expires_at) => {
            let vault = match inner.keys.vault() {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "custody: the vault keys are unusable");
                    return Ok(false);
                }
            };
            let Some(rec) = inner.store.credential(&t.user_id, &t.provider).await? else {
                return Ok(true);
            };
            if rec.version != t.version {
                return Ok(true);
            }
            let only = match super::fields::credential_only(p, files) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(vm = %vm.id, error = %e, "custody: the holder's files are not a credential to keep");
                    remember(t.version);
                    return Ok(false);
                }
            };
            let same = vault
                .open(&rec)
                .ok()
                .and_then(|old| decode_credential(&old))
                .is_some_and(|old| same_files(&old, &only));
            if same {
                if first {
                    inner
                        .store
                        .set_credential_expiry(&t.user_id, &t.provider, t.version, expires_at)
                        .await?;
                }
                remember(t.version);
                return Ok(false);
            }
            let pt = encode(&only);
            let sealed = match vault.seal(&t.user_id, &t.provider, t.version + 1, &pt) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "custody: sealing the written-back credential failed");
                    return Ok(false);
                }
            };
            let refreshed = Refreshed {
                at: crate::util::now_ms(),
                expires_at,
            };
            match inner
                .store
                .write_back_credential(&sealed, &vm.id, refreshed)
                .await
            {
                Ok(()) => {
                    tracing::info!(vm = %vm.id, provider = %t.provider, version = t.version + 1, "custody: wrote the holder's refreshed credential back");
                    remember(t.version + 1);
                    Ok(true)
                }
                Err(StoreError::Conflict { .. }) => Ok(true),
                Err(e) => Err(e),
            }
        }
    }
}
