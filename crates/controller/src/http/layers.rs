//! The layers every request passes (see [`super`] for the order), the
//! fallbacks, and the body limit.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;

use super::error::{ApiError, REQUEST_ID};
use super::limits::{tightest, Verdict};
use super::{AppState, Authn};
use crate::auth::{AuthMethod, Principal};

/// The request id header.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// A client's request id is kept when it is 1-64 of `A-Z a-z 0-9 - _ .`
/// (it goes into logs and headers verbatim).
fn acceptable_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    (!s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
    .then(|| s.to_string())
}

/// Take or make the request id; echo it; make it visible to problem bodies.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(acceptable_id)
        .unwrap_or_else(|| {
            crate::util::new_id("req").unwrap_or_else(|_| "req-unavailable".to_string())
        });
    if let Ok(v) = HeaderValue::from_str(&id) {
        req.headers_mut().insert(REQUEST_ID_HEADER, v.clone());
        let mut resp = REQUEST_ID.scope(id, next.run(req)).await;
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
        return resp;
    }
    next.run(req).await
}

/// The client's address of a request (put there by [`client_addr`]): the
/// TCP peer, or the address a trusted reverse proxy reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// Work out the client's address (see [`super::client_addr`]) for the
/// access log and the per-address rate limit.
pub async fn client_addr(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    if let Some(peer) = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
    {
        let ip = st.cfg.proxies.client_ip(peer, req.headers());
        req.extensions_mut().insert(ClientAddr(ip));
    }
    next.run(req).await
}

/// Log one line per request and count it by route template.
pub async fn observe(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let client = req
        .extensions()
        .get::<ClientAddr>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let resp = next.run(req).await;
    let took = started.elapsed();
    let status = resp.status().as_u16();
    st.metrics.request(&method, &route, status, took);
    let rid = REQUEST_ID.try_with(Clone::clone).unwrap_or_default();
    tracing::info!(
        request_id = %rid,
        %client,
        %method,
        %route,
        status,
        ms = took.as_secs_f64() * 1000.0,
        "http"
    );
    resp
}

/// The rate-limit bucket keys of a caller: `(bucket, key, rate)`.
fn buckets(
    st: &AppState,
    who: &Result<Principal, Arc<crate::auth::AuthError>>,
    client: Option<IpAddr>,
) -> Vec<(&'static str, String, super::Rate)> {
    let r = &st.cfg.rate;
    match who {
        Ok(p) => {
            let cred = match &p.via {
                AuthMethod::ApiToken { token_id } => format!("tok:{token_id}"),
                AuthMethod::Jwt { issuer, subject } => format!("jwt:{issuer}:{subject}"),
                _ => format!("cookie:{}", p.user_id),
            };
            vec![
                ("credential", cred, r.per_credential),
                ("user", format!("usr:{}", p.user_id), r.per_user),
            ]
        }
        Err(_) => vec![(
            "anonymous",
            format!(
                "ip:{}",
                client.map(super::client_addr::rate_key).unwrap_or_default()
            ),
            r.anonymous,
        )],
    }
}

fn set_rate_headers(resp: &mut Response, v: &Verdict) {
    let h = resp.headers_mut();
    for (name, value) in [
        ("ratelimit-limit", v.limit.to_string()),
        ("ratelimit-remaining", v.remaining.to_string()),
        ("ratelimit-reset", v.reset_secs.to_string()),
    ] {
        if let Ok(val) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), val);
        }
    }
}

/// Find out who is calling (without rejecting: public routes need no
/// caller, [`super::Caller`] rejects), then apply the rate limits.
pub async fn authenticate(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let who = st.auth.authenticate(req.headers()).await.map_err(Arc::new);
    let client = req.extensions().get::<ClientAddr>().map(|c| c.0);
    let now = Instant::now();
    let mut verdicts = Vec::new();
    for (bucket, key, rate) in buckets(&st, &who, client) {
        let v = st.limiter.check(&key, rate, now);
        if !v.allowed {
            st.metrics.rate_limited(bucket);
        }
        verdicts.push(v);
    }
    let verdict = tightest(&verdicts);
    if let Some(v) = verdict.filter(|v| !v.allowed) {
        let mut resp = ApiError::new(
            429,
            "rate-limited",
            "Too many requests",
            format!(
                "this credential sent more requests than its limit of {} at once; retry after {} s",
                v.limit, v.reset_secs
            ),
        )
        .into_response();
        set_rate_headers(&mut resp, &v);
        if let Ok(val) = HeaderValue::from_str(&v.reset_secs.to_string()) {
            resp.headers_mut().insert("retry-after", val);
        }
        return resp;
    }
    req.extensions_mut().insert(Authn(who));
    let mut resp = next.run(req).await;
    if let Some(v) = verdict {
        set_rate_headers(&mut resp, &v);
    }
    resp
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        404,
        "no-such-route",
        "Not found",
        format!(
            "there is no {} {}: the routes are listed in /api/v1/openapi.json",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        405,
        "method-not-allowed",
        "Method not allowed",
        format!(
            "{} is not allowed on {}: see /api/v1/openapi.json for its methods",
            req.method(),
            req.uri().path()
        ),
    )
}

/// The routes with every layer.
pub fn wrap(routes: Router<AppState>, st: AppState) -> Router {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(st.cfg.body_limit))
        .layer(middleware::from_fn_with_state(st.clone(), authenticate))
        .layer(middleware::from_fn_with_state(st.clone(), observe))
        .layer(middleware::from_fn_with_state(st.clone(), client_addr))
        .layer(middleware::from_fn(request_id))
        .layer(middleware::from_fn(super::web::security_headers))
        .with_state(st)
}
