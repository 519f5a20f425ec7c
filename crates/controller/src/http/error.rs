//! Every rejection is an RFC 7807 problem: [`ApiError`] and the extractors
//! that turn axum's own rejections (bad JSON, oversized bodies, bad paths
//! and queries) into one.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use polydev_api::problem::Problem;
use serde::de::DeserializeOwned;

use crate::auth::AuthError;
use crate::store::{StoreError, UpstreamError};

tokio::task_local! {
    /// The id of the request being served (set by the request-id layer), so
    /// a problem built anywhere below can carry it.
    pub(crate) static REQUEST_ID: String;
}

/// The media type of problem bodies.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An error answer of the API.
#[derive(Debug)]
pub struct ApiError(pub Box<Problem>);

impl ApiError {
    /// A problem with `status`, a type slug, a title and what to do.
    pub fn new(status: u16, slug: &str, title: &str, detail: impl Into<String>) -> Self {
        ApiError(Box::new(Problem::new(status, slug, title, detail)))
    }

    /// 400: the request is malformed.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(400, "bad-request", "Bad request", detail)
    }

    /// 404 for `what` (another user's record answers the same).
    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(
            404,
            "not-found",
            "Not found",
            format!("there is no {what} {id:?} of yours: list yours with GET on the collection"),
        )
    }

    /// 409: the record's state does not allow this now.
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(409, "conflict", "Conflict", detail)
    }

    /// 422: well-formed, but a value is not acceptable.
    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(422, "invalid", "Invalid request", detail)
    }

    /// 500, with the cause logged (never sent: it may name internals).
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error answering a request");
        Self::new(
            500,
            "internal",
            "Internal error",
            "the controller failed to answer; retry, and if it persists give the operator this request id",
        )
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthenticated => {
                ApiError::new(401, "unauthenticated", "Not authenticated", e.to_string())
            }
            AuthError::Forbidden { .. } => {
                ApiError::new(403, "forbidden", "Forbidden", e.to_string())
            }
            AuthError::NotFound => ApiError::new(
                404,
                "not-found",
                "Not found",
                "there is no such record of yours: list yours with GET on the collection",
            ),
            AuthError::Conflict(_) => ApiError::conflict(e.to_string()),
            AuthError::Invalid(_) => ApiError::invalid(e.to_string()),
            AuthError::Backoff { .. } => ApiError::new(
                429,
                "login-backoff",
                "Too many failed logins",
                e.to_string(),
            ),
            AuthError::Jwks(_) => ApiError::new(
                503,
                "jwks-unavailable",
                "Identity provider unavailable",
                e.to_string(),
            ),
            AuthError::Store(s) => s.into(),
            AuthError::Internal(_) => ApiError::internal(&e),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::NotFound { kind, id } => ApiError::not_found(kind, id),
            StoreError::InvalidTransition { machine, from, to, .. } => ApiError::conflict(format!(
                "the {machine} is {from} and cannot go to {to} from there: read it again to see its state"
            )),
            StoreError::Conflict { .. } => ApiError::conflict(e.to_string()),
            StoreError::Duplicate { .. } => ApiError::conflict(e.to_string()),
            _ => ApiError::internal(&e),
        }
    }
}

impl From<UpstreamError> for ApiError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Store(s) => s.into(),
            UpstreamError::NoProviders | UpstreamError::Exhausted { .. } => {
                ApiError::conflict(e.to_string())
            }
            UpstreamError::UnknownProvider(_) | UpstreamError::OutOfRange { .. } => {
                ApiError::invalid(e.to_string())
            }
            UpstreamError::PortTaken { .. }
            | UpstreamError::PortQuarantined { .. }
            | UpstreamError::Contended(_) => ApiError::conflict(e.to_string()),
            UpstreamError::NotAssigned(_) => {
                ApiError::new(404, "not-found", "Not found", e.to_string())
            }
        }
    }
}

/// Build the problem response (adds the current request id).
pub(crate) fn problem_response(mut p: Problem) -> Response {
    if p.request_id.is_none() {
        p.request_id = REQUEST_ID.try_with(Clone::clone).ok();
    }
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(&p).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    r
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        problem_response(*self.0)
    }
}

/// `Json<T>` whose rejections are problems: syntax errors 400, a missing
/// `Content-Type: application/json` 415, too large 413, unknown fields or
/// wrong values 422 (request types deny unknown fields).
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(r) => Err(json_rejection(r)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let status = r.status().as_u16();
    let detail = r.body_text();
    match r {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            "send the body as JSON with `Content-Type: application/json`",
        ),
        JsonRejection::JsonSyntaxError(_) => {
            ApiError::bad_request(format!("the body is not valid JSON: {detail}"))
        }
        JsonRejection::JsonDataError(_) => ApiError::invalid(format!(
            "the JSON does not match what this endpoint takes (see /api/v1/openapi.json): {detail}"
        )),
        _ if status == 413 => ApiError::new(
            413,
            "too-large",
            "Request body too large",
            "the body is larger than this API accepts; send less",
        ),
        _ => ApiError::bad_request(format!("cannot read the body: {detail}")),
    }
}

/// `Path<T>` whose rejections are problems (400).
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|r: PathRejection| {
                ApiError::bad_request(format!("bad path: {}", r.body_text()))
            })
    }
}

/// `Query<T>` whose rejections are problems (400).
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|r: QueryRejection| {
                ApiError::bad_request(format!("bad query string: {}", r.body_text()))
            })
    }
}

/// Check a record id from a path: `<prefix>-` and 1-64 lowercase hex digits
/// (so `..`, `/`, `%2e` and friends never reach a query).
pub fn check_id(prefix: &str, what: &str, id: &str) -> Result<(), ApiError> {
    let ok = id
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|hex| {
            !hex.is_empty()
                && hex.len() <= 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{id:?} is not a {what} id: {what} ids look like {prefix}-<hex digits>"
        )))
    }
}

/// Check a name from a path or body (provider ids, …): 1-64 of
/// `a-z 0-9 - _`, starting with a letter or digit.
pub fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{name:?} is not a valid {what}: use 1-64 characters of a-z, 0-9, '-' and '_'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_refuse_traversal_and_other_prefixes() {
        assert!(check_id("ses", "session", "ses-0123abcd").is_ok());
        for bad in [
            "ses-",
            "../ses-01",
            "ses-01/..",
            "vm-01",
            "ses-0A",
            "ses-%2e%2e",
            "ses-01\0",
        ] {
            let e = check_id("ses", "session", bad).unwrap_err();
            assert_eq!(e.0.status, 400, "{bad}");
        }
        assert!(check_name("provider", "claude-code").is_ok());
        for bad in ["", "..", "../etc", "Claude", "-x", &"a".repeat(65)] {
            assert!(check_name("provider", bad).is_err(), "{bad}");
        }
    }
}
