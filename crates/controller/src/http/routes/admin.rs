//! `/api/v1/admin/*`: accounts, upstream ports, every user's VMs (with the
//! logs of failed ones) and a census of sessions. Every route needs an
//! admin acting with the `admin` scope.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use crate::auth::{Principal, Role, Scope};
use crate::http::error::check_id;
use crate::http::model::*;
use crate::http::{ApiError, ApiJson, ApiPath, AppState, Caller};
use crate::store::{Assignment, Records, Vm};

fn admin(p: &Principal) -> Result<(), ApiError> {
    p.require(Scope::Admin)?;
    Ok(())
}

/// Every account.
#[utoipa::path(get, path = "/api/v1/admin/users", tag = "admin",
    responses((status = 200, body = [UserView])))]
pub async fn users(
    State(st): State<AppState>,
    Caller(p): Caller,
) -> Result<Json<Vec<UserView>>, ApiError> {
    admin(&p)?;
    let all = st.auth.list_users().await?;
    Ok(Json(all.into_iter().map(UserView::from).collect()))
}

/// Create an account.
#[utoipa::path(post, path = "/api/v1/admin/users", tag = "admin",
    request_body = UserCreate,
    responses((status = 201, body = UserView)))]
pub async fn create_user(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiJson(req): ApiJson<UserCreate>,
) -> Result<(StatusCode, Json<UserView>), ApiError> {
    admin(&p)?;
    let u = st
        .auth
        .create_user(
            &req.name,
            req.role.unwrap_or(Role::User),
            req.password.as_deref(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(u.into())))
}

/// A one-time login link for an account (lost password, new account).
#[utoipa::path(post, path = "/api/v1/admin/users/{id}/login-link", tag = "admin",
    params(("id" = String, Path, description = "`usr-…`", pattern = "^usr-[0-9a-f]{1,64}$")),
    responses((status = 201, body = LoginLinkView)))]
pub async fn login_link(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<LoginLinkView>), ApiError> {
    admin(&p)?;
    check_id("usr", "user", &id)?;
    let l = st.auth.create_login_link(&id).await?;
    Ok((
        StatusCode::CREATED,
        Json(LoginLinkView {
            user_name: l.user_name.clone(),
            token: l.token.clone(),
            path: format!("/#/link/{}", l.token),
            expires_at: l.expires_at,
        }),
    ))
}

/// Upstream port occupancy per provider and every assignment.
#[utoipa::path(get, path = "/api/v1/admin/upstreams", tag = "admin",
    responses((status = 200, body = UpstreamsView)))]
pub async fn upstreams(
    State(st): State<AppState>,
    Caller(p): Caller,
) -> Result<Json<UpstreamsView>, ApiError> {
    admin(&p)?;
    let stats = st.store.upstream_stats(&st.upstreams).await?;
    let assignments = st.store.list_upstream_assignments().await?;
    Ok(Json(UpstreamsView {
        providers: stats,
        assignments,
    }))
}

/// Pin a user to a chosen port (the port must be free).
#[utoipa::path(put, path = "/api/v1/admin/upstreams/{user_id}", tag = "admin",
    params(("user_id" = String, Path, description = "`usr-…`", pattern = "^usr-[0-9a-f]{1,64}$")),
    request_body = PinRequest,
    responses((status = 200, body = Assignment)))]
pub async fn pin(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiPath(user_id): ApiPath<String>,
    ApiJson(req): ApiJson<PinRequest>,
) -> Result<Json<Assignment>, ApiError> {
    admin(&p)?;
    check_id("usr", "user", &user_id)?;
    st.auth.user(&user_id).await?;
    let a = st
        .store
        .pin_upstream_port(&user_id, Some(&req.provider), req.port, &st.upstreams)
        .await?;
    Ok(Json(a))
}

/// Release a user's port (it goes into quarantine).
#[utoipa::path(delete, path = "/api/v1/admin/upstreams/{user_id}", tag = "admin",
    params(("user_id" = String, Path, description = "`usr-…`", pattern = "^usr-[0-9a-f]{1,64}$")),
    responses((status = 200, description = "The released assignment", body = Assignment)))]
pub async fn release(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiPath(user_id): ApiPath<String>,
) -> Result<Json<Assignment>, ApiError> {
    admin(&p)?;
    check_id("usr", "user", &user_id)?;
    let a = st
        .store
        .release_upstream_port(&user_id, &st.upstreams)
        .await?;
    Ok(Json(a))
}

/// Give a user a different port (the old one goes into quarantine).
#[utoipa::path(post, path = "/api/v1/admin/upstreams/{user_id}/rotate", tag = "admin",
    params(("user_id" = String, Path, description = "`usr-…`", pattern = "^usr-[0-9a-f]{1,64}$")),
    responses((status = 200, body = Assignment)))]
pub async fn rotate(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiPath(user_id): ApiPath<String>,
) -> Result<Json<Assignment>, ApiError> {
    admin(&p)?;
    check_id("usr", "user", &user_id)?;
    st.auth.user(&user_id).await?;
    let a = st
        .store
        .rotate_upstream_port(&user_id, &st.upstreams)
        .await?;
    Ok(Json(a))
}

/// The most of a VM log [`vm_log`] answers with (its end).
pub const LOG_TAIL_BYTES: usize = 64 * 1024;

/// Every user's VMs, oldest first, with owner, state and age; memory and
/// vCPUs as the host reports them for VMs it still has.
#[utoipa::path(get, path = "/api/v1/admin/vms", tag = "admin",
    responses((status = 200, body = [AdminVmView])))]
pub async fn vms(
    State(st): State<AppState>,
    Caller(p): Caller,
) -> Result<Json<Vec<AdminVmView>>, ApiError> {
    admin(&p)?;
    let all = st.store.all_vms_with_owners().await?;
    let shapes = shapes_at_host(&st, &all).await;
    let out = all
        .into_iter()
        .zip(shapes)
        .map(|((vm, owner_name), shape)| AdminVmView {
            vm: VmView::from(&vm),
            owner_id: vm.user_id.clone(),
            owner_name,
            memory_mib: shape.map(|s| s.0),
            vcpus: shape.map(|s| s.1),
        })
        .collect();
    Ok(Json(out))
}

/// Memory and vCPUs of each VM the host still has, asked all at once
/// under one deadline: a slow host costs the list its shapes, never the
/// list itself.
async fn shapes_at_host(st: &AppState, vms: &[(Vm, Option<String>)]) -> Vec<Option<(u32, u32)>> {
    use crate::state::Lifecycle;
    let mut shapes = vec![None; vms.len()];
    let Some(host) = &st.host else {
        return shapes;
    };
    let mut asks = tokio::task::JoinSet::new();
    for (i, (vm, _)) in vms.iter().enumerate() {
        if let (Some(hid), false) = (vm.host_vm_id.clone(), vm.life.state.is_final()) {
            let host = host.clone();
            asks.spawn(async move {
                let info = host.inspect(&hid).await.ok();
                (i, info.map(|v| (v.memory_mib, v.vcpus)))
            });
        }
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        while let Some(done) = asks.join_next().await {
            if let Ok((i, shape)) = done {
                shapes[i] = shape;
            }
        }
    })
    .await;
    shapes
}

/// The end of one of a VM's logs (at most 64 KiB, the newest lines):
/// `console`, `agent` or `egress`. Kept after the VM is gone, so failed
/// VMs can be looked into.
#[utoipa::path(get, path = "/api/v1/admin/vms/{id}/logs/{log}", tag = "admin",
    params(("id" = String, Path, description = "`vm-…`", pattern = "^vm-[0-9a-f]{1,64}$"),
           ("log" = String, Path, description = "`console`, `agent` or `egress`", pattern = "^(console|agent|egress)$")),
    responses((status = 200, content_type = "text/plain", body = String)))]
pub async fn vm_log(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiPath((id, log)): ApiPath<(String, String)>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    use polydev_api::vm::LogKind;
    admin(&p)?;
    check_id("vm", "VM", &id)?;
    let kind = match log.as_str() {
        "console" => LogKind::Console,
        "agent" => LogKind::Agent,
        "egress" => LogKind::Egress,
        other => {
            return Err(ApiError::invalid(format!(
                "there is no log {other:?}: ask for console, agent or egress"
            )))
        }
    };
    let vm = match st.store.vm(&id).await {
        Ok(v) => v,
        Err(crate::store::StoreError::NotFound { .. }) => {
            return Err(ApiError::not_found("VM", &id))
        }
        Err(e) => return Err(e.into()),
    };
    // Without a host agent (`--no-driver`) no VM ever ran here: nothing
    // is wrong with the server, there is just nothing to read.
    let Some(host) = &st.host else {
        return Err(ApiError::conflict(format!(
            "this controller runs without a host agent (--no-driver), so VM {id} never ran here and has no logs"
        )));
    };
    let Some(hid) = &vm.host_vm_id else {
        return Err(ApiError::conflict(format!(
            "VM {id} never reached a host, so it has no logs; its failure, if any, is in GET /api/v1/admin/vms"
        )));
    };
    let text = host.logs(hid, kind).await.map_err(|e| {
        ApiError::new(
            502,
            "host-unavailable",
            "Host unavailable",
            format!("the host agent did not give VM {id}'s {log} log: {e}; check that it runs (polydev doctor)"),
        )
    })?;
    let tail = tail_of(&text, LOG_TAIL_BYTES);
    Ok((
        StatusCode::OK,
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        tail.to_string(),
    )
        .into_response())
}

/// The last `max` bytes of `text`, from a character boundary.
fn tail_of(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Every user's connect sessions counted by state, and the failed ones
/// by reason.
#[utoipa::path(get, path = "/api/v1/admin/sessions/summary", tag = "admin",
    responses((status = 200, body = SessionSummary)))]
pub async fn session_summary(
    State(st): State<AppState>,
    Caller(p): Caller,
) -> Result<Json<SessionSummary>, ApiError> {
    admin(&p)?;
    let by_state = st.store.count_by_state(Records::Sessions).await?;
    let failures = st.store.failures_by_reason(Records::Sessions).await?;
    Ok(Json(SessionSummary {
        by_state: by_state.into_iter().collect(),
        failures_by_reason: failures
            .into_iter()
            .map(|(r, n)| (r.unwrap_or_else(|| "unknown".into()), n))
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::tail_of;

    #[test]
    fn a_tail_starts_on_a_character_boundary() {
        assert_eq!(tail_of("abcdef", 3), "def");
        assert_eq!(tail_of("ab", 10), "ab");
        // "é" is two bytes: a cut inside it moves forward.
        assert_eq!(tail_of("aéb", 2), "b");
    }
}
