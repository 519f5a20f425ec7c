//! `/api/v1/vms`, `/api/v1/credentials`, `/api/v1/tickets`: the caller's
//! VMs, their stored credentials (metadata), and stream tickets.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use crate::auth::Scope;
use crate::driver::DisconnectError;
use crate::http::error::{check_id, check_name};
use crate::http::model::*;
use crate::http::{ApiError, ApiJson, ApiPath, AppState, Caller};
use crate::state::{Lifecycle, VmState};
use crate::store::{Also, StoreError, Vm, VmKind};

/// The caller's VM `id`; another user's is not found.
pub(super) async fn own_vm(st: &AppState, user_id: &str, id: &str) -> Result<Vm, ApiError> {
    check_id("vm", "VM", id)?;
    match st.store.vm(id).await {
        Ok(v) if v.user_id == user_id => Ok(v),
        Ok(_) | Err(StoreError::NotFound { .. }) => Err(ApiError::not_found("VM", id)),
        Err(e) => Err(e.into()),
    }
}

/// The caller's VMs, oldest first (finished ones included).
#[utoipa::path(get, path = "/api/v1/vms", operation_id = "list_vms", tag = "vms",
    responses((status = 200, body = [VmView])))]
pub async fn list(
    State(st): State<AppState>,
    Caller(p): Caller,
) -> Result<Json<Vec<VmView>>, ApiError> {
    p.require(Scope::VmsRead)?;
    let all = st.store.vms_of(&p.user_id).await?;
    Ok(Json(all.iter().map(VmView::from).collect()))
}

/// One of the caller's VMs.
#[utoipa::path(get, path = "/api/v1/vms/{id}", operation_id = "get_vm", tag = "vms",
    params(("id" = String, Path, description = "`vm-…`", pattern = "^vm-[0-9a-f]{1,64}$")),
    responses((status = 200, body = VmView)))]
pub async fn get(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<VmView>, ApiError> {
    p.require(Scope::VmsRead)?;
    Ok(Json(VmView::from(&own_vm(&st, &p.user_id, &id).await?)))
}

/// Ask for the caller's CLI VM (one per user; a second is a conflict).
#[utoipa::path(post, path = "/api/v1/vms", operation_id = "create_vm", tag = "vms",
    request_body = VmCreate,
    responses((status = 201, body = VmView)))]
pub async fn create(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiJson(req): ApiJson<VmCreate>,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    p.require(Scope::VmsWrite)?;
    if req.kind == VmKindView::Browser {
        return Err(ApiError::invalid(
            "browser VMs are started by connect sessions: POST /api/v1/sessions",
        ));
    }
    if let Some(v) = st.store.live_cli_vm(&p.user_id).await? {
        return Err(ApiError::conflict(format!(
            "you already have a CLI VM, {} ({}): use it, or delete it first",
            v.id,
            v.life.state.as_str()
        )));
    }
    // The check above names the VM; the database's unique index is what
    // settles two creates that both passed it.
    let v = match st.store.create_vm(&p.user_id, VmKind::Cli).await {
        Ok(v) => v,
        Err(StoreError::Duplicate { .. }) => {
            return Err(ApiError::conflict(
                "you already have a CLI VM (created a moment ago): use it (GET /api/v1/vms), or delete it first",
            ))
        }
        Err(e) => return Err(e.into()),
    };
    st.notify();
    Ok((StatusCode::CREATED, Json(VmView::from(&v))))
}

/// Destroy one of the caller's CLI VMs (its disk goes with it). Answers
/// at once; the VM passes through `stopping` to `destroyed`.
#[utoipa::path(delete, path = "/api/v1/vms/{id}", tag = "vms",
    params(("id" = String, Path, description = "`vm-…`", pattern = "^vm-[0-9a-f]{1,64}$")),
    responses((status = 202, body = VmView)))]
pub async fn destroy(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    p.require(Scope::VmsWrite)?;
    for _ in 0..5 {
        let v = own_vm(&st, &p.user_id, &id).await?;
        if v.kind == VmKind::Browser {
            return Err(ApiError::conflict(
                "a browser VM ends with its connect session: cancel the session instead",
            ));
        }
        let s = v.life.state;
        if s.is_final() || s == VmState::Stopping {
            return Ok((StatusCode::ACCEPTED, Json(VmView::from(&v))));
        }
        if !s.valid_transition(VmState::Stopping) {
            return Err(ApiError::conflict(format!(
                "VM {id} is {} and cannot be destroyed right now: try again in a minute",
                s.as_str()
            )));
        }
        match st.store.request_vm_stop(&v).await {
            Ok(v) => {
                st.notify();
                return Ok((StatusCode::ACCEPTED, Json(VmView::from(&v))));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict(format!(
        "VM {id} kept changing while it was being destroyed: try again"
    )))
}

/// Stop (power off) one of the caller's CLI VMs, keeping its disk
/// (`/home`): it passes through `hibernating` to `hibernated`, and
/// `POST /api/v1/vms/{id}/start` boots it again. Only a running VM stops.
#[utoipa::path(post, path = "/api/v1/vms/{id}/stop", operation_id = "stop_vm", tag = "vms",
    request_body = NoOptions,
    params(("id" = String, Path, description = "`vm-…`", pattern = "^vm-[0-9a-f]{1,64}$")),
    responses((status = 202, body = VmView)))]
pub async fn stop(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(NoOptions {}): ApiJson<NoOptions>,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    p.require(Scope::VmsWrite)?;
    power(&st, &p.user_id, &id, Power::Stop).await
}

/// Start one of the caller's stopped CLI VMs again from its disk: it
/// passes through `resuming` to `running`. Only a `hibernated` VM starts.
#[utoipa::path(post, path = "/api/v1/vms/{id}/start", operation_id = "start_vm", tag = "vms",
    request_body = NoOptions,
    params(("id" = String, Path, description = "`vm-…`", pattern = "^vm-[0-9a-f]{1,64}$")),
    responses((status = 202, body = VmView)))]
pub async fn start(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(NoOptions {}): ApiJson<NoOptions>,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    p.require(Scope::VmsWrite)?;
    power(&st, &p.user_id, &id, Power::Start).await
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Power {
    Stop,
    Start,
}

/// Ask the driver to stop or start a CLI VM: the record moves to
/// `hibernating` / `resuming` and the driver does the rest at the host.
async fn power(
    st: &AppState,
    user_id: &str,
    id: &str,
    op: Power,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    let (from, to, verb, hint) = match op {
        Power::Stop => (
            VmState::Running,
            VmState::Hibernating,
            "stopped",
            "only a running VM can be stopped",
        ),
        Power::Start => (
            VmState::Hibernated,
            VmState::Resuming,
            "started",
            "only a stopped (hibernated) VM can be started",
        ),
    };
    // The driver may move the VM between our read and our write: read
    // again and decide again (each loss means it moved on).
    for _ in 0..5 {
        let v = own_vm(st, user_id, id).await?;
        if v.kind == VmKind::Browser {
            return Err(ApiError::conflict(format!(
                "VM {id} is a browser VM: only CLI VMs are {verb} on request (a browser VM ends with its connect session)"
            )));
        }
        if v.life.state != from {
            let settling = matches!(
                v.life.state,
                VmState::Pending | VmState::Creating | VmState::Hibernating | VmState::Resuming
            );
            return Err(ApiError::conflict(format!(
                "VM {id} is {}: {hint}{}",
                v.life.state.as_str(),
                if settling {
                    format!("; wait until it settles (GET /api/v1/vms/{id}) and try again")
                } else {
                    String::new()
                }
            )));
        }
        match st.store.transition_vm(&v, to, None, Also::default()).await {
            Ok(v) => {
                st.notify();
                return Ok((StatusCode::ACCEPTED, Json(VmView::from(&v))));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict(format!(
        "VM {id} kept changing while it was being {verb}: try again"
    )))
}

/// The caller's stored credentials (which providers, versions; never content).
#[utoipa::path(get, path = "/api/v1/credentials", tag = "credentials",
    responses((status = 200, body = [CredentialView])))]
pub async fn credentials(
    State(st): State<AppState>,
    Caller(p): Caller,
) -> Result<Json<Vec<CredentialView>>, ApiError> {
    p.require(Scope::CredentialsRead)?;
    let all = st.store.credentials_of(&p.user_id).await?;
    Ok(Json(all.into_iter().map(CredentialView::from).collect()))
}

/// Disconnect a provider: remove its delivered files from the caller's
/// running CLI VM (whole files deleted; fields merged into a file the CLI
/// VM owns taken out of it), then delete the sealed credential. When the
/// removal fails the credential is kept (502/503, try again); with no
/// running CLI VM only the sealed credential is deleted
/// (`removed_from_vm: null`).
#[utoipa::path(delete, path = "/api/v1/credentials/{provider}", tag = "credentials",
    params(("provider" = String, Path, description = "Provider id", max_length = 64, pattern = "^[a-z0-9][a-z0-9_-]*$")),
    responses((status = 200, body = CredentialDeleted)))]
pub async fn delete_credential(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiPath(provider): ApiPath<String>,
) -> Result<Json<CredentialDeleted>, ApiError> {
    p.require(Scope::CredentialsWrite)?;
    check_name("provider id", &provider)?;
    if st.store.credential(&p.user_id, &provider).await?.is_none() {
        return Err(ApiError::not_found("credential for provider", &provider));
    }
    let removed_from_vm = match &st.driver {
        Some(d) => match d.remove_delivered(&p.user_id, &provider).await {
            Ok(vm) => vm,
            Err(DisconnectError::Store(e)) => return Err(e.into()),
            Err(e @ (DisconnectError::Unreachable { .. } | DisconnectError::NotResumed { .. })) => {
                return Err(ApiError::new(
                    503,
                    "cli-vm-unreachable",
                    "The CLI VM did not answer",
                    e.to_string(),
                ))
            }
            Err(e @ DisconnectError::Refused { .. }) => {
                return Err(ApiError::new(
                    502,
                    "cli-vm-removal-failed",
                    "The files could not be removed from the CLI VM",
                    e.to_string(),
                ))
            }
        },
        // Nothing here reaches VMs.
        None => None,
    };
    if st.store.delete_credential(&p.user_id, &provider).await? {
        Ok(Json(CredentialDeleted {
            provider,
            removed_from_vm,
        }))
    } else {
        Err(ApiError::not_found("credential for provider", &provider))
    }
}

/// A single-use ticket to open a stream: the desktop of one of the caller's
/// live connect sessions, or the terminal of one of their running CLI VMs.
/// Present it within a minute, once.
#[utoipa::path(post, path = "/api/v1/tickets", tag = "streams",
    request_body = TicketRequest,
    responses((status = 201, body = TicketView)))]
pub async fn ticket(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiJson(req): ApiJson<TicketRequest>,
) -> Result<(StatusCode, Json<TicketView>), ApiError> {
    p.require(Scope::StreamsConnect)?;
    // A well-formed id of the other kind names nothing of the caller's
    // (404); anything else malformed is refused below (400).
    let (own, other) = match req.kind {
        StreamKind::Desktop => (("ses", "session"), ("vm", "VM")),
        StreamKind::Terminal => (("vm", "VM"), ("ses", "session")),
    };
    let id = &req.resource_id;
    if check_id(own.0, own.1, id).is_err() && check_id(other.0, other.1, id).is_ok() {
        return Err(ApiError::not_found(own.1, id));
    }
    match req.kind {
        StreamKind::Desktop => {
            let s = super::sessions::own_session(&st, &p.user_id, &req.resource_id).await?;
            super::streams::desktop_vm(&s)?;
        }
        StreamKind::Terminal => {
            let vm = own_vm(&st, &p.user_id, &req.resource_id).await?;
            super::streams::terminal_vm(&vm)?;
            // A ticket is a use; a hibernated VM is resumed while the
            // client connects (the terminal waits for it).
            st.store.touch_vm(&vm.id, crate::util::now_ms()).await?;
            if vm.life.state == VmState::Hibernated {
                match power(&st, &p.user_id, &vm.id, Power::Start).await {
                    Ok(_) => {}
                    // Someone else resumed it meanwhile.
                    Err(e) if e.0.status == 409 => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    let t = st
        .auth
        .issue_ticket(&p, req.kind.as_str(), &req.resource_id)
        .await?;
    st.metrics.ticket(req.kind.as_str());
    Ok((
        StatusCode::CREATED,
        Json(TicketView {
            ticket: t.value.clone(),
            expires_at: t.expires_at,
            kind: req.kind,
            resource_id: req.resource_id,
        }),
    ))
}
