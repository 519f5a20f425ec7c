//! Session steps: requested → starting_vm (browser VM record, wait until it
//! runs and is ready) → starting_login (the provider's login, detached in
//! the VM) → awaiting_user (auth URL recognised in its output; recorded in
//! the event) → capturing (the provider's files present; sealed into the
//! vault once valid) → delivering (into the user's CLI VM) → completed.
//! The browser VM is stopped by the VM steps once the session is final.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use serde_json::json;
use zeroize::Zeroizing;

use super::host::HostApi;
use super::login::{self, LoginPlace, LoginStatus};
use super::vm::{changed, host_ref};
use super::Inner;
use crate::providers::Provider;
use crate::state::{Failure, FailureReason, Lifecycle, SessionState, VmState};
use crate::store::{Also, Session, StoreError, Vm, VmKind};

const ACTIVE: &str = "'starting_vm', 'starting_login', 'awaiting_user', 'capturing', 'delivering'";

async fn go(
    inner: &Inner,
    s: &Session,
    to: SessionState,
    detail: Option<serde_json::Value>,
) -> Result<bool, StoreError> {
    changed(
        inner
            .store
            .transition_session(
                s,
                to,
                None,
                Also {
                    detail,
                    ..Also::default()
                },
            )
            .await,
    )
}

async fn fail(
    inner: &Inner,
    s: &Session,
    reason: FailureReason,
    detail: impl Into<String>,
) -> Result<bool, StoreError> {
    let detail = detail.into();
    tracing::warn!(session = %s.id, %reason, %detail, "session failed");
    changed(
        inner
            .store
            .transition_session(
                s,
                SessionState::Failed,
                Some(Failure::new(reason, detail)),
                Also::default(),
            )
            .await,
    )
}

/// One step for one session; `Ok(true)` when something changed.
pub(super) async fn step(inner: &Arc<Inner>, s: Session) -> Result<bool, StoreError> {
    use SessionState::*;
    let Some(p) = inner.providers.get(&s.provider) else {
        return fail(
            inner,
            &s,
            FailureReason::Internal,
            format!(
                "provider {:?} is not configured on this controller",
                s.provider
            ),
        )
        .await;
    };
    match s.life.state {
        Requested => requested(inner, &s).await,
        StartingVm => starting_vm(inner, &s).await,
        StartingLogin | AwaitingUser | Capturing => in_vm(inner, &s, p).await,
        Delivering => delivering(inner, &s, p).await,
        Completed | Cancelled | Failed => Ok(false),
    }
}

/// Admit the session when fewer than `max_active_sessions` are past
/// `requested`: record its browser VM and move on.
async fn requested(inner: &Inner, s: &Session) -> Result<bool, StoreError> {
    // One admission at a time, so concurrent steps cannot overshoot the limit.
    static ADMIT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _g = ADMIT.lock().await;
    let (active,): (i64,) = sqlx::query_as(&format!(
        "SELECT COUNT(*) FROM sessions WHERE state IN ({ACTIVE})"
    ))
    .fetch_one(inner.store.pool())
    .await?;
    if usize::try_from(active).unwrap_or(usize::MAX) >= inner.cfg.max_active_sessions {
        return Ok(false);
    }
    // A crash between these two writes leaves a VM record nobody claims;
    // the VM steps stop it after the orphan grace period.
    let vm = inner.store.create_vm(&s.user_id, VmKind::Browser).await?;
    changed(
        inner
            .store
            .transition_session(
                s,
                SessionState::StartingVm,
                None,
                Also {
                    browser_vm_id: Some(vm.id),
                    ..Also::default()
                },
            )
            .await,
    )
}

fn vm_gone_detail(vm: &Vm) -> String {
    match &vm.life.failure {
        Some(f) => format!(
            "the browser VM {} {}: {} ({})",
            vm.id, vm.life.state, f.reason, f.detail
        ),
        None => format!("the browser VM {} is {}", vm.id, vm.life.state),
    }
}

async fn browser_vm(inner: &Inner, s: &Session) -> Result<Option<Vm>, StoreError> {
    match &s.browser_vm_id {
        Some(id) => Ok(Some(inner.store.vm(id).await?)),
        None => Ok(None),
    }
}

async fn starting_vm(inner: &Inner, s: &Session) -> Result<bool, StoreError> {
    let Some(vm) = browser_vm(inner, s).await? else {
        return go(inner, s, SessionState::Requested, None).await;
    };
    match vm.life.state {
        VmState::Running => {
            if let Some(done) = provisioned(inner, s, host_ref(&vm), VmKind::Browser).await {
                return done;
            }
            match login::ready(&*inner.host, host_ref(&vm), &inner.cfg.browser_ready).await {
                Ok(true) => go(inner, s, SessionState::StartingLogin, None).await,
                Ok(false) => Ok(false),
                Err(e) => {
                    tracing::debug!(session = %s.id, error = %e, "readiness probe failed");
                    Ok(false)
                }
            }
        }
        // Retry with a new VM (bounded by starting_vm's entry limit).
        st if st.is_final() => {
            let detail = json!({ "vm_failure": vm_gone_detail(&vm) });
            go(inner, s, SessionState::Requested, Some(detail)).await
        }
        _ => Ok(false),
    }
}

/// Provision the VM (`[[vm_files]]`, `vm_setup`) if it was not yet:
/// `None` to go on; `Some(step result)` to end this step (not answering:
/// try again; failed: the session fails with the reason).
async fn provisioned(
    inner: &Inner,
    s: &Session,
    vm: &str,
    kind: VmKind,
) -> Option<Result<bool, StoreError>> {
    let c = &inner.cfg;
    match super::provision::provision(&*inner.host, vm, kind, &c.vm_files, c.vm_setup.as_deref())
        .await
    {
        Ok(()) => None,
        Err(super::provision::ProvisionError::Host(e)) => {
            tracing::debug!(session = %s.id, error = %e, "provisioning: VM not answering; retrying");
            Some(Ok(false))
        }
        Err(e) => Some(fail(inner, s, FailureReason::Internal, e.to_string()).await),
    }
}

fn place(inner: &Inner) -> LoginPlace {
    LoginPlace {
        home: inner.cfg.login_home.clone(),
        user: inner.cfg.login_user.clone(),
        env: inner.cfg.login_env.clone(),
        browser: inner.cfg.login_browser.clone(),
    }
}

/// Why a login that ended failed, with the end of its own output
/// (redacted) so the person sees the CLI's words, not just a status.
async fn exit_failure(
    host: &dyn HostApi,
    vm: &str,
    session_id: &str,
    code: Option<i32>,
) -> (FailureReason, String) {
    let tail = login::output_tail(host, vm, session_id)
        .await
        .unwrap_or_default();
    let said = if tail.is_empty() {
        "; it printed nothing".to_string()
    } else {
        login::to_console(
            host,
            vm,
            &format!(
                "\npolydev: the login of session {session_id} ended ({}); its last output (secrets redacted):\n{tail}\npolydev: end of the login's output\n",
                code.map_or("no exit status".to_string(), |c| format!("exit status {c}"))
            ),
        )
        .await;
        format!("; its last output:\n{tail}")
    };
    match code {
        Some(0) => (
            FailureReason::CredentialInvalid,
            format!("the login finished but did not leave a valid credential{said}"),
        ),
        Some(c) => (
            FailureReason::LoginFailed,
            format!("the login command exited with status {c}{said}"),
        ),
        None => (
            FailureReason::LoginFailed,
            format!("the login command ended without an exit status{said}"),
        ),
    }
}

/// The states that live in the browser VM: they need it running.
async fn in_vm(inner: &Inner, s: &Session, p: &Provider) -> Result<bool, StoreError> {
    let Some(vm) = browser_vm(inner, s).await? else {
        return fail(inner, s, FailureReason::Internal, "no browser VM recorded").await;
    };
    if vm.life.state.is_final() {
        return fail(
            inner,
            s,
            FailureReason::VmDied,
            format!("{}; start the connection again", vm_gone_detail(&vm)),
        )
        .await;
    }
    if vm.life.state != VmState::Running {
        return Ok(false);
    }
    let host: &dyn HostApi = &*inner.host;
    let r = host_ref(&vm);
    let home = inner.cfg.login_home.as_str();
    let attempt = async {
        let status = login::status(host, r, &s.id).await?;
        Ok::<_, super::HostError>(match s.life.state {
            SessionState::StartingLogin => {
                if status == LoginStatus::Absent {
                    login::start(host, r, &s.id, p, &place(inner)).await?;
                    return Ok(Next::Wait);
                }
                let said = login::read(host, r, &s.id).await?;
                let found = p.find_auth_url(&said.for_sources(p));
                if found.is_none() && status == LoginStatus::Running {
                    login::respond(host, r, &s.id, p, &said.printed).await?;
                }
                if found.is_some() && !url_settled(inner, s, p, &said.opened, status) {
                    return Ok(Next::Wait);
                }
                match (found, status) {
                    (Some(url), _) => {
                        let callback = login::callback(host, r, &url).await;
                        Next::Go(
                            SessionState::AwaitingUser,
                            Some(json!({ "auth_url": url, "callback": callback })),
                        )
                    }
                    (None, LoginStatus::Exited(Some(0))) => Next::Fail(
                        FailureReason::AuthUrlNotFound,
                        "the login exited without printing an auth URL the provider definition recognises".into(),
                    ),
                    (None, LoginStatus::Exited(c)) => {
                        let (reason, detail) = exit_failure(host, r, &s.id, c).await;
                        Next::Fail(reason, detail)
                    }
                    (None, _) => Next::Wait,
                }
            }
            SessionState::AwaitingUser => {
                let waited_ms = crate::util::now_ms().saturating_sub(s.life.state_since);
                let limit_ms =
                    i64::try_from(p.login_timeout_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
                if waited_ms > limit_ms {
                    return Ok(Next::Fail(
                        FailureReason::Timeout,
                        format!(
                            "nobody finished signing in within {} s (the provider's login timeout); start the connection again",
                            p.login_timeout_secs
                        ),
                    ));
                }
                if let Some(why) = egress_refused(inner, s, p, r).await {
                    return Ok(Next::Fail(FailureReason::EgressFailed, why));
                }
                let files = login::captured(host, r, p, home).await?;
                let complete = p
                    .capture
                    .iter()
                    .filter(|f| f.required)
                    .all(|f| files.contains_key(&f.path));
                match status {
                    _ if complete => Next::Go(SessionState::Capturing, None),
                    LoginStatus::Exited(c) => {
                        let (reason, detail) = exit_failure(host, r, &s.id, c).await;
                        Next::Fail(reason, detail)
                    }
                    _ => Next::Wait,
                }
            }
            _ => {
                let files = login::captured(host, r, p, home).await?;
                match (p.validate_capture(&files), status) {
                    (Ok(()), _) => Next::Seal(files),
                    // The CLI may still be writing: wait while it runs
                    // (bounded by capturing's deadline).
                    (Err(_), LoginStatus::Running) => Next::Wait,
                    (Err(e), LoginStatus::Exited(Some(0)) | LoginStatus::Absent) => {
                        Next::Fail(FailureReason::CredentialInvalid, e.to_string())
                    }
                    (Err(_), LoginStatus::Exited(c)) => {
                        let (reason, detail) = exit_failure(host, r, &s.id, c).await;
                        Next::Fail(reason, detail)
                    }
                }
            }
        })
    };
    match attempt.await {
        Ok(Next::Wait) => Ok(false),
        Ok(Next::Go(to, detail)) => go(inner, s, to, detail).await,
        Ok(Next::Fail(reason, detail)) => fail(inner, s, reason, detail).await,
        Ok(Next::Seal(files)) => match super::fields::credential_only(p, files) {
            Ok(files) => seal_and_go(inner, s, &files).await,
            Err(e) => fail(inner, s, FailureReason::CredentialInvalid, e.to_string()).await,
        },
        Err(e) => {
            tracing::debug!(session = %s.id, error = %e, "VM not answering; retrying");
            Ok(false)
        }
    }
}

/// Seal the credential and move on to delivery.
async fn seal_and_go(
    inner: &Inner,
    s: &Session,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<bool, StoreError> {
    match seal(inner, s, files).await {
        Ok(version) => {
            go(
                inner,
                s,
                SessionState::Delivering,
                Some(json!({ "credential_version": version })),
            )
            .await
        }
        Err(e) => fail(inner, s, FailureReason::VaultError, e.to_string()).await,
    }
}

/// How long a printed auth URL waits for the one the CLI hands to the
/// browser (minutes apart under TCG on a loaded host): CLIs print a shortened or paste-code URL and open the full one
/// (Claude Code 2.1 prints `…/authorize?z-<challenge>`), so the URL the
/// person's browser shows wins when it comes soon after.
const PRINTED_URL_GRACE: std::time::Duration = std::time::Duration::from_secs(90);

/// Whether the auth URL found now may be taken: one handed to the browser
/// always; a printed one once the login has exited, when the provider does
/// not hand URLs to the browser, or after [`PRINTED_URL_GRACE`].
fn url_settled(
    inner: &Inner,
    s: &Session,
    p: &Provider,
    opened: &str,
    status: LoginStatus,
) -> bool {
    use crate::providers::UrlSource;
    let mut seen = inner
        .printed_url_seen
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if !p.auth_url_sources.contains(&UrlSource::XdgOpen)
        || !matches!(status, LoginStatus::Running)
        || p.find_auth_url(opened).is_some()
    {
        seen.remove(&s.id);
        return true;
    }
    let first = *seen
        .entry(s.id.clone())
        .or_insert_with(std::time::Instant::now);
    first.elapsed() >= PRINTED_URL_GRACE
}

/// Why the browser VM's egress refused an auth URL's host, if it did and
/// nothing to that host went through (see `egress_check`). The hosts are
/// the recorded auth URL's and those of every auth URL the login printed or
/// handed to the browser since (a CLI may print one URL and open another).
async fn egress_refused(inner: &Inner, s: &Session, p: &Provider, vm: &str) -> Option<String> {
    let events = inner.store.events_for("session", &s.id).await.ok()?;
    let mut urls: Vec<String> = events
        .iter()
        .rev()
        .find_map(|e| e.detail.get("auth_url")?.as_str().map(str::to_string))
        .into_iter()
        .collect();
    if let Ok(said) = login::read(&*inner.host, vm, &s.id).await {
        let text = said.for_sources(p);
        urls.extend(p.auth_url.find_iter(&text).map(|m| m.as_str().to_string()));
    }
    let mut hosts: Vec<String> = urls
        .iter()
        .filter_map(|u| super::egress_check::url_host(u).map(str::to_string))
        .collect();
    hosts.sort();
    hosts.dedup();
    if hosts.is_empty() {
        return None;
    }
    let log = inner
        .host
        .logs(vm, polydev_api::vm::LogKind::Egress)
        .await
        .ok()?;
    hosts
        .iter()
        .find_map(|h| super::egress_check::refused(&log, h))
}

enum Next {
    Wait,
    Go(SessionState, Option<serde_json::Value>),
    Fail(FailureReason, String),
    Seal(BTreeMap<String, Vec<u8>>),
}

/// The vault plaintext of a credential: the captured files, by path.
pub fn encode(files: &BTreeMap<String, Vec<u8>>) -> Zeroizing<Vec<u8>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let map: serde_json::Map<String, serde_json::Value> = files
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(b64.encode(v))))
        .collect();
    Zeroizing::new(serde_json::to_vec(&json!({ "files": map })).unwrap_or_default())
}

/// Inverse of [`encode`].
pub fn decode_credential(pt: &[u8]) -> Option<BTreeMap<String, Zeroizing<Vec<u8>>>> {
    let v: serde_json::Value = serde_json::from_slice(pt).ok()?;
    let b64 = base64::engine::general_purpose::STANDARD;
    v.get("files")?
        .as_object()?
        .iter()
        .map(|(k, v)| Some((k.clone(), Zeroizing::new(b64.decode(v.as_str()?).ok()?))))
        .collect()
}

/// Seal the files into the vault, unless the stored record already holds
/// exactly them (a resumed capture must not add a version). Returns the
/// record's version.
async fn seal(
    inner: &Inner,
    s: &Session,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<i64, crate::vault::VaultError> {
    let vault = inner.keys.vault()?;
    let pt = encode(files);
    if let Some(rec) = inner.store.credential(&s.user_id, &s.provider).await? {
        if vault
            .open(&rec)
            .map(|old| old[..] == pt[..])
            .unwrap_or(false)
        {
            return Ok(rec.version);
        }
    }
    let version = vault
        .store(&inner.store, &s.user_id, &s.provider, &pt)
        .await?;
    // `polydev vault rotate` may have retired the key this seal used between
    // our reading the key file and the write landing; then the record is
    // sealed again under the keys in force now (a new version).
    let current = inner.keys.vault()?;
    if let Some(rec) = inner.store.credential(&s.user_id, &s.provider).await? {
        if !current.keyring().ids().contains(&rec.key_id) {
            return current
                .store(&inner.store, &s.user_id, &s.provider, &pt)
                .await;
        }
    }
    Ok(version)
}

async fn delivering(inner: &Inner, s: &Session, p: &Provider) -> Result<bool, StoreError> {
    let vault = match inner.keys.vault() {
        Ok(v) => v,
        Err(e) => return fail(inner, s, FailureReason::VaultError, e.to_string()).await,
    };
    let pt = match vault.load(&inner.store, &s.user_id, &s.provider).await {
        Ok(Some(pt)) => pt,
        Ok(None) => {
            return fail(
                inner,
                s,
                FailureReason::VaultError,
                "the credential is not in the vault",
            )
            .await
        }
        Err(e) => return fail(inner, s, FailureReason::VaultError, e.to_string()).await,
    };
    if !inner.cfg.deliver_to_cli_vm {
        return go(
            inner,
            s,
            SessionState::Completed,
            Some(json!({ "delivered_to": null })),
        )
        .await;
    }
    let cli = inner
        .store
        .non_final_vms()
        .await?
        .into_iter()
        .rfind(|v| v.user_id == s.user_id && v.kind == VmKind::Cli);
    let Some(cli) = cli else {
        return match inner.store.create_vm(&s.user_id, VmKind::Cli).await {
            Ok(vm) => {
                tracing::info!(session = %s.id, vm = %vm.id, "creating the user's CLI VM for delivery");
                Ok(true)
            }
            // The user's own create (or another session's) won the race for
            // the one CLI VM: deliver into that one, next pass.
            Err(StoreError::Duplicate { .. }) => Ok(true),
            Err(e) => Err(e),
        };
    };
    match cli.life.state {
        // A delivery is a use: idle hibernation counts from here.
        VmState::Running => inner.store.touch_vm(&cli.id, crate::util::now_ms()).await?,
        // Stopped by its user: start it again for the delivery (a stop
        // under way finishes first; the next pass finds it hibernated).
        VmState::Hibernated => {
            tracing::info!(session = %s.id, vm = %cli.id, "starting the user's stopped CLI VM for delivery");
            return changed(
                inner
                    .store
                    .transition_vm(
                        &cli,
                        VmState::Resuming,
                        None,
                        Also {
                            detail: Some(json!({ "for_session": s.id })),
                            ..Also::default()
                        },
                    )
                    .await,
            );
        }
        VmState::Stopping => {
            // Being destroyed: the vault keeps the credential.
            return go(
                inner,
                s,
                SessionState::Completed,
                Some(json!({ "delivered_to": null, "cli_vm": cli.id, "cli_vm_state": cli.life.state.as_str() })),
            )
            .await;
        }
        _ => return Ok(false),
    }
    let host: &dyn HostApi = &*inner.host;
    let r = host_ref(&cli);
    if let Some(done) = provisioned(inner, s, r, VmKind::Cli).await {
        return done;
    }
    match login::ready(host, r, &inner.cfg.cli_ready).await {
        Ok(true) => {}
        _ => return Ok(false),
    }
    let Some(files) = decode_credential(&pt) else {
        return fail(
            inner,
            s,
            FailureReason::VaultError,
            "the stored credential is not in the expected format",
        )
        .await;
    };
    let home = &inner.cfg.cli_home;
    let owner = inner.cfg.cli_owner.as_deref().and_then(owner_user);
    for (path, data) in &files {
        let Some(spec) = p.capture.iter().find(|f| &f.path == path) else {
            continue;
        };
        let full = format!("{home}/{path}");
        let written = deliver_file(host, r, &full, path, data, &spec.deliver_keys, owner).await;
        match written {
            Ok(()) => {}
            Err(login::WriteError::Host(e)) => {
                tracing::warn!(session = %s.id, error = %e, "delivery write failed; retrying");
                return Ok(false);
            }
            Err(login::WriteError::Refused(m)) => {
                return fail(
                    inner,
                    s,
                    FailureReason::DeliveryFailed,
                    format!("{m}; the CLI VM {} kept its own files", cli.id),
                )
                .await;
            }
        }
    }
    if let Some(check) = &p.check {
        match run_check(inner, r, check, owner).await {
            Ok(None) => {}
            Ok(Some(detail)) => {
                return fail(inner, s, FailureReason::CredentialRejected, detail).await;
            }
            Err(e) => {
                tracing::warn!(session = %s.id, error = %e, "credential check did not run; retrying");
                return Ok(false);
            }
        }
    }
    changed(
        inner
            .store
            .transition_session(
                s,
                SessionState::Completed,
                None,
                Also {
                    detail: Some(json!({ "delivered_to": cli.id })),
                    credential_holder: Some(cli.id.clone()),
                    ..Also::default()
                },
            )
            .await,
    )
}

/// Write one captured file into the CLI VM at `full`, as `owner`: whole
/// when its provider names no fields, else only the credential's fields
/// (`deliver_keys`), merged into the file the CLI VM already has.
pub(super) async fn deliver_file(
    host: &dyn HostApi,
    vm: &str,
    full: &str,
    path: &str,
    data: &[u8],
    deliver_keys: &[String],
    owner: Option<&str>,
) -> Result<(), login::WriteError> {
    let content = if deliver_keys.is_empty() {
        data.to_vec()
    } else {
        let existing = login::read_as(host, vm, full, owner).await?;
        super::fields::merge(path, existing.as_deref(), data, deliver_keys)
            .map_err(|e| login::WriteError::Refused(e.to_string()))?
    };
    login::write_file(host, vm, full, content, owner).await
}

/// The user part of a `user[:group]` owner (`None` for an empty one).
pub(super) fn owner_user(owner: &str) -> Option<&str> {
    let user = owner.split(':').next().unwrap_or(owner);
    (!user.is_empty()).then_some(user)
}

/// Use the delivered credential once, as the provider's `[check]` says,
/// in the CLI VM as its user: `Ok(None)` when it exits 0, `Ok(Some(why))`
/// when the provider rejected it (with the command's redacted output).
async fn run_check(
    inner: &Inner,
    vm: &str,
    check: &crate::providers::Check,
    user: Option<&str>,
) -> Result<Option<String>, super::HostError> {
    let argv = login::as_user(user, check.command.clone());
    let out = inner
        .host
        .exec(
            vm,
            polydev_api::agent::ExecRequest {
                argv,
                env: [("HOME".to_string(), inner.cfg.cli_home.clone())].into(),
                cwd: Some(inner.cfg.cli_home.clone()),
                timeout_ms: Some(check.timeout_secs.saturating_mul(1000)),
                ..Default::default()
            },
        )
        .await?;
    if out.success() {
        return Ok(None);
    }
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let tail: String = text
        .trim()
        .chars()
        .rev()
        .take(login::TAIL_BYTES)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Ok(Some(format!(
        "the provider's check `{}` exited with status {}: {}",
        check.command.join(" "),
        match out.status {
            Some(st) if st.timed_out => "none (it timed out)".to_string(),
            Some(st) => st
                .code
                .map(|c| c.to_string())
                .unwrap_or_else(|| format!("none (signal {:?})", st.signal)),
            None => "none".into(),
        },
        login::redact(&tail)
    )))
}
