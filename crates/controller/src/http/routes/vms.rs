//! `/api/v1/vms`, `/api/v1/credentials`, `/api/v1/tickets`: the caller's
//! VMs, their stored credentials (metadata), and stream tickets.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use crate::auth::Scope;
use crate::http::error::{check_id, check_name};
use crate::http::model::*;
use crate::http::{ApiError, ApiJson, ApiPath, AppState, Caller};
use crate::state::{Lifecycle, VmState};
use crate::store::{StoreError, Vm, VmKind};

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

/// Delete the caller's credential for a provider (connect it again to get
/// a new one). Copies already delivered into a VM are not touched.
#[utoipa::path(delete, path = "/api/v1/credentials/{provider}", tag = "credentials",
    params(("provider" = String, Path, description = "Provider id", max_length = 64, pattern = "^[a-z0-9][a-z0-9_-]*$")),
    responses((status = 204, description = "Deleted")))]
pub async fn delete_credential(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiPath(provider): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    p.require(Scope::CredentialsWrite)?;
    check_name("provider id", &provider)?;
    if st.store.delete_credential(&p.user_id, &provider).await? {
        Ok(StatusCode::NO_CONTENT)
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
