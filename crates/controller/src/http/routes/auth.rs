//! `/api/v1/auth/*`, `/api/v1/me`, `/api/v1/tokens`: logging in and out,
//! the caller, their password and their API tokens.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::auth::{
    clear_session_cookie, session_cookie, ApiTokenInfo, AuthError, LoginSession, Principal, Scope,
};
use crate::http::error::check_id;
use crate::http::model::*;
use crate::http::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, Caller};

/// Whether this answer's session cookie is `Secure`: always with
/// `--secure-cookies`, else when a trusted reverse proxy says the client
/// reached it over TLS (this server itself speaks plain HTTP). Worked out
/// only for the routes that set the cookie, not for every request.
pub struct SecureCookie(bool);

impl FromRequestParts<AppState> for SecureCookie {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, Self::Rejection> {
        let tls = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .is_some_and(|c| st.cfg.proxies.forwarded_https(c.0.ip(), &parts.headers));
        Ok(SecureCookie(st.cfg.secure_cookies || tls))
    }
}

fn with_cookie(secure: SecureCookie, p: &Principal, s: &LoginSession) -> Response {
    let mut r = Json(Me::from(p)).into_response();
    if let Ok(v) = HeaderValue::from_str(&s.set_cookie(secure.0)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// A failed password check as an answer: a backoff is a 429 with
/// `Retry-After`, the rest their usual problems.
fn login_refused(e: AuthError) -> Response {
    let retry = match &e {
        AuthError::Backoff { retry_after_secs } => Some(*retry_after_secs),
        _ => None,
    };
    let mut r = ApiError::from(e).into_response();
    if let Some(v) = retry.and_then(|s| HeaderValue::from_str(&s.to_string()).ok()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

/// Log in with a password; sets the session cookie. After repeated
/// failures for a name, its logins are refused for a growing while (429
/// with `Retry-After`), whoever sends them.
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", security(()),
    request_body = LoginRequest,
    responses((status = 200, description = "Logged in; the `polydev_session` cookie is set", body = Me)))]
pub async fn login(
    State(st): State<AppState>,
    secure: SecureCookie,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Response {
    match st.auth.login(&req.name, &req.password).await {
        Ok((p, s)) => with_cookie(secure, &p, &s),
        Err(e) => login_refused(e),
    }
}

/// End the cookie's login session (idempotent); clears the cookie.
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", security(()),
    responses((status = 204, description = "Logged out")))]
pub async fn logout(
    State(st): State<AppState>,
    secure: SecureCookie,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Some(c) = session_cookie(&headers) {
        st.auth.logout(c).await?;
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = HeaderValue::from_str(&clear_session_cookie(secure.0)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

/// Log in with a one-time login link token (POST form).
#[utoipa::path(post, path = "/api/v1/auth/link", tag = "auth", security(()),
    request_body = LinkRequest,
    responses((status = 200, description = "Logged in; the cookie is set", body = Me)))]
pub async fn link_post(
    State(st): State<AppState>,
    secure: SecureCookie,
    ApiJson(req): ApiJson<LinkRequest>,
) -> Result<Response, ApiError> {
    let (p, s) = st.auth.redeem_login_link(&req.token).await?;
    Ok(with_cookie(secure, &p, &s))
}

/// Log in by opening a one-time login link in a browser (what first start
/// prints).
#[utoipa::path(get, path = "/api/v1/auth/link", tag = "auth", security(()),
    params(LinkQuery),
    responses((status = 200, description = "Logged in; the cookie is set", body = Me)))]
pub async fn link_get(
    State(st): State<AppState>,
    secure: SecureCookie,
    ApiQuery(q): ApiQuery<LinkQuery>,
) -> Result<Response, ApiError> {
    let (p, s) = st.auth.redeem_login_link(&q.token).await?;
    Ok(with_cookie(secure, &p, &s))
}

/// The caller.
#[utoipa::path(get, path = "/api/v1/me", tag = "auth",
    responses((status = 200, body = Me)))]
pub async fn me(Caller(p): Caller) -> Json<Me> {
    Json(Me::from(&p))
}

/// Set or change the caller's password; every login session of theirs
/// ends (log in again). Needs a login session, not an API token; the
/// current password too, unless a one-time login link started the session.
#[utoipa::path(put, path = "/api/v1/me/password", tag = "auth",
    request_body = PasswordChange,
    responses((status = 204, description = "Changed; log in again")))]
pub async fn password(
    State(st): State<AppState>,
    secure: SecureCookie,
    Caller(p): Caller,
    ApiJson(req): ApiJson<PasswordChange>,
) -> Result<Response, ApiError> {
    use crate::auth::AuthMethod;
    if !matches!(p.via, AuthMethod::Cookie | AuthMethod::LoginLink) {
        return Err(ApiError::new(
            403,
            "forbidden",
            "Forbidden",
            "a password is changed from a login session (the dashboard), not with an API token or JWT",
        ));
    }
    // A session a one-time login link started needs no current password:
    // that link is how an administrator lets someone who lost theirs back
    // in (and how the first administrator sets one).
    if p.via != AuthMethod::LoginLink && st.auth.has_password(&p.user_id).await? {
        let Some(current) = req.current_password.as_deref() else {
            return Err(ApiError::invalid(
                "current_password is required: the account has a password",
            ));
        };
        // A wrong current password is the same 401 as a failed login (and
        // counts toward the account's backoff like one).
        if let Err(e) = st.auth.login(&p.name, current).await {
            return Ok(login_refused(e));
        }
    }
    st.auth.set_password(&p.user_id, &req.new_password).await?;
    let mut r = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = HeaderValue::from_str(&clear_session_cookie(secure.0)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

/// Managing tokens needs a login session or a token that may do everything
/// the new token could; a narrowly scoped token cannot mint broader ones.
fn may_manage_tokens(p: &Principal, wanted: &[Scope]) -> Result<(), ApiError> {
    if let Some(s) = wanted.iter().find(|s| !p.allows(**s)) {
        return Err(crate::auth::AuthError::Forbidden {
            scope: s.as_str().to_string(),
        }
        .into());
    }
    Ok(())
}

/// The caller's API tokens (metadata only), newest first.
#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens",
    responses((status = 200, body = [ApiTokenInfo])))]
pub async fn list_tokens(
    State(st): State<AppState>,
    Caller(p): Caller,
) -> Result<Json<Vec<ApiTokenInfo>>, ApiError> {
    Ok(Json(st.auth.list_tokens(&p.user_id).await?))
}

/// Create an API token; the token is in this answer only.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens",
    request_body = TokenCreate,
    responses((status = 201, body = TokenCreated)))]
pub async fn create_token(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiJson(req): ApiJson<TokenCreate>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    may_manage_tokens(&p, &req.scopes)?;
    let (info, token) = st
        .auth
        .create_token(&p.user_id, &req.name, &req.scopes, req.expires_at)
        .await?;
    Ok((StatusCode::CREATED, Json(TokenCreated { token, info })))
}

/// Revoke one of the caller's tokens (idempotent).
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "`tok-…`", pattern = "^tok-[0-9a-f]{1,64}$")),
    responses((status = 204, description = "Revoked")))]
pub async fn revoke_token(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    check_id("tok", "token", &id)?;
    st.auth.revoke_token(&p.user_id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
