//! The handlers, one module per area; [`super::openapi`] lists them.

pub mod admin;
pub mod auth;
pub mod ops;
pub mod runs;
pub mod sessions;
pub mod streams;
pub mod vms;

/// A 201 with `body` and a `Location` of the created resource.
pub(crate) fn created(body: impl serde::Serialize, location: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut r = (axum::http::StatusCode::CREATED, axum::Json(body)).into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(location) {
        r.headers_mut().insert(axum::http::header::LOCATION, v);
    }
    r
}
