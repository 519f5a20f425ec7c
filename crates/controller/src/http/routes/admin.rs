//! `/api/v1/admin/*`: accounts and upstream ports. Every route needs an
//! admin acting with the `admin` scope.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use crate::auth::{Principal, Role, Scope};
use crate::http::error::check_id;
use crate::http::model::*;
use crate::http::{ApiError, ApiJson, ApiPath, AppState, Caller};
use crate::store::Assignment;

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
            path: format!("/api/v1/auth/link?token={}", l.token),
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
