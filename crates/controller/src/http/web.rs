//! The dashboard at `/`: the embedded web app ([`polydev_web`]) and the
//! security headers every answer carries.
//!
//! The app uses only the public `/api/v1`, so these routes are not part of
//! the OpenAPI document: `/` (the page), `/assets/…` (Vite's hashed files,
//! cacheable forever; gzip-compressed for clients that take it) and the
//! few other top-level files of the build. The
//! page's Content-Security-Policy allows scripts only from this origin (no
//! inline script, no eval), connections only to this origin (the API and
//! its WebSockets), and no framing; every other answer gets a policy that
//! allows nothing at all.

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::error::ApiError;
use super::AppState;

/// The page's policy. Styles may be inline: xterm.js and noVNC set them
/// from script (no markup of ours carries any).
pub const PAGE_CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Everything else (JSON, problems, metrics): nothing may run or frame it.
pub const API_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// The web app's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/assets/{*path}", get(asset))
        .route("/{file}", get(top_level))
}

async fn index(headers: HeaderMap) -> Response {
    match polydev_web::asset("index.html") {
        Some(a) => file(a, &headers),
        None => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            polydev_web::NOT_BUILT,
        )
            .into_response(),
    }
}

async fn asset(req: Request) -> Response {
    serve(req.uri().path().trim_start_matches('/'), req.headers())
}

async fn top_level(req: Request) -> Response {
    serve(req.uri().path().trim_start_matches('/'), req.headers())
}

fn serve(path: &str, headers: &HeaderMap) -> Response {
    match polydev_web::asset(path) {
        Some(a) => file(a, headers),
        None => ApiError::new(
            404,
            "no-such-route",
            "Not found",
            format!("there is no /{path}: the dashboard is at /, the API under /api/v1 (see /api/v1/openapi.json)"),
        )
        .into_response(),
    }
}

/// Whether the client takes gzip (`Accept-Encoding`, not refused by `q=0`).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let coding = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
        })
}

fn file(a: polydev_web::Asset, headers: &HeaderMap) -> Response {
    let cache = if a.immutable {
        "public, max-age=31536000, immutable"
    } else {
        // The page names the current hashed assets: always ask again.
        "no-cache"
    };
    let gzip = a.gzip.filter(|_| accepts_gzip(headers));
    let mut resp = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, a.content_type),
            (header::CACHE_CONTROL, cache),
        ],
        gzip.unwrap_or(a.bytes),
    )
        .into_response();
    if gzip.is_some() {
        resp.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    // Caches must keep the two encodings apart.
    resp.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    resp
}

/// Every answer: a Content-Security-Policy (the page's on HTML, none
/// allowed on anything else), no MIME sniffing, no referrer (tokens live in
/// URLs' fragments, never sent, but a ticket is in a WebSocket query), no
/// framing for browsers that predate `frame-ancestors`.
pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let html = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(if html { PAGE_CSP } else { API_CSP }),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn gzip_only_when_the_client_takes_it() {
        assert!(accepts_gzip(&with("gzip, deflate, br, zstd")));
        assert!(accepts_gzip(&with("br;q=1.0, GZIP;q=0.5")));
        assert!(accepts_gzip(&with("*")));
        assert!(!accepts_gzip(&with("gzip;q=0")));
        assert!(!accepts_gzip(&with("br, identity")));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }
}
