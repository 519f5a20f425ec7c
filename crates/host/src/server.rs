//! The host agent's HTTP API, served on a Unix socket (`<data>/host.sock`,
//! mode 0600: only the host's administrator may drive VMs).
//!
//! JSON in and out; errors are RFC 7807 problems; exec output streams as
//! newline-delimited JSON frames (`polydev_api::agent::Response`).

use std::path::Path;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use polydev_api::agent::{ExecRequest, Request};
use polydev_api::vm::{LogKind, VmSpec};
use polydev_api::Problem;
use serde::Deserialize;

use crate::manager::{Manager, ManagerError};

/// Largest request body accepted (exec stdin included).
pub const MAX_BODY: usize = 8 * 1024 * 1024;

/// An error response.
pub struct ApiError(Problem);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self.0).unwrap_or_default();
        (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response()
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> Self {
        let (status, slug, title) = match &e {
            ManagerError::NotFound { .. } => (404, "not-found", "Not found"),
            ManagerError::Invalid(_) | ManagerError::PathTooLong(_) => {
                (422, "invalid-request", "Invalid request")
            }
            ManagerError::Conflict(_) => (409, "conflict", "Conflict"),
            ManagerError::StartFailed { .. } => (502, "vm-start-failed", "VM failed to start"),
            ManagerError::Hypervisor(_) => (502, "hypervisor", "Hypervisor error"),
            ManagerError::Agent(_) => (502, "guest-agent", "Guest agent error"),
            ManagerError::Io { .. } => (500, "host-io", "Host I/O error"),
            ManagerError::Cgroup(_) => (500, "host-cgroup", "Host cgroup error"),
        };
        ApiError(Problem::new(status, slug, title, e.to_string()))
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError(Problem::new(
            e.status().as_u16(),
            "bad-body",
            "Malformed request body",
            format!(
                "{}: send a JSON object matching the documented schema",
                e.body_text()
            ),
        ))
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// All routes.
pub fn router(mgr: Arc<Manager>) -> Router {
    Router::new()
        .route(
            "/v1/health",
            get(|| async { Json(serde_json::json!({"ok": true})) }),
        )
        .route("/v1/metrics", get(crate::metrics::handler))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{id}", get(get_vm).delete(delete_vm))
        .route("/v1/vms/{id}/exec", post(exec))
        .route("/v1/vms/{id}/logs", get(logs))
        .route("/v1/vms/{id}/agent-logs", get(agent_ring))
        .route("/v1/vms/{id}/services", get(services))
        .route("/v1/vms/{id}/watch-files", post(watch_files))
        .route("/v1/vms/{id}/stop", post(stop))
        .route("/v1/vms/{id}/start", post(start))
        .route("/v1/vms/{id}/hibernate", post(hibernate))
        .route("/v1/vms/{id}/forward", post(forward))
        .route("/v1/vms/{id}/pause", post(pause))
        .route("/v1/vms/{id}/resume", post(resume))
        .route("/v1/vms/{id}/snapshot", post(snapshot))
        .route("/v1/snapshots", get(list_snapshots))
        .route("/v1/snapshots/{id}", axum::routing::delete(delete_snapshot))
        .route("/v1/snapshots/{id}/restore", post(restore))
        .fallback(|| async {
            ApiError(Problem::new(
                404,
                "no-route",
                "Not found",
                "no such API route; see `polydev vm --help`",
            ))
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(mgr)
}

/// Serve the API on `path` until `shutdown` resolves.
pub async fn serve(
    mgr: Arc<Manager>,
    path: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if path.exists() {
        // A live host agent answers; a stale socket from a crash does not.
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "another host agent is serving {}; stop it first",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    // Bound with its final mode (never chmodded after bind): see
    // crate::private::bind.
    let listener = crate::private::bind_tokio(path)?;
    axum::serve(listener, router(mgr))
        .with_graceful_shutdown(shutdown)
        .await
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    all: bool,
}

async fn list_vms(
    State(m): State<Arc<Manager>>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(q) = q.map_err(|e| {
        ApiError(Problem::new(
            400,
            "bad-query",
            "Bad query",
            format!("{}: use all=true or all=false", e.body_text()),
        ))
    })?;
    Ok(Json(m.list(q.all).await))
}

async fn create_vm(
    State(m): State<Arc<Manager>>,
    body: Result<Json<VmSpec>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(spec) = body?;
    let info = to_completion(async move { m.create(&spec).await }).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// Run a state change to its end even if the client goes away: axum drops
/// a handler whose connection closed, and a create or stop dropped halfway
/// would leave a VM stuck between states.
async fn to_completion<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T, ManagerError>> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::spawn(f).await {
        Ok(r) => Ok(r?),
        Err(e) => Err(ApiError(Problem::new(
            500,
            "internal",
            "Internal error",
            format!("the operation did not finish: {e}; see the host agent's log"),
        ))),
    }
}

async fn stop(
    State(m): State<Arc<Manager>>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        to_completion(async move { m.power_off(&id).await }).await?,
    ))
}

async fn hibernate(
    State(m): State<Arc<Manager>>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        to_completion(async move { m.hibernate(&id).await }).await?,
    ))
}

async fn start(
    State(m): State<Arc<Manager>>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        to_completion(async move { m.power_on(&id).await }).await?,
    ))
}

/// The `Upgrade` protocol of a forwarded stream.
pub const FORWARD_PROTOCOL: &str = "polydev-forward";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForwardQuery {
    port: Option<u16>,
    unix: Option<String>,
    /// A terminal (`pty=true`, with `cols`, `rows`, `user` and `session`).
    pty: Option<bool>,
    cols: Option<u16>,
    rows: Option<u16>,
    user: Option<String>,
    /// Keep the terminal under this name (see `PtySpec::session`).
    session: Option<String>,
}

/// A user name or uid as the guest looks it up: what `useradd` accepts.
fn plausible_user(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 32
        && u.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b))
}

/// A raw stream into the VM: an HTTP/1.1 upgrade to
/// [`FORWARD_PROTOCOL`], after which the connection carries the bytes of
/// the guest-local TCP port or Unix socket both ways.
async fn forward(
    State(m): State<Arc<Manager>>,
    UrlPath(id): UrlPath<String>,
    q: Result<Query<ForwardQuery>, axum::extract::rejection::QueryRejection>,
    mut req: axum::extract::Request,
) -> ApiResult<Response> {
    let bad = |detail: String| ApiError(Problem::new(422, "bad-forward", "Bad forward", detail));
    let Query(q) = q.map_err(|e| {
        bad(format!(
            "{}: use port=N, unix=/path or pty=true&cols=N&rows=N[&user=NAME][&session=NAME]",
            e.body_text()
        ))
    })?;
    let pty = q.pty.unwrap_or(false);
    if !pty && (q.cols.is_some() || q.rows.is_some() || q.user.is_some() || q.session.is_some()) {
        return Err(bad("cols, rows, user and session go with pty=true".into()));
    }
    let target = match (q.port, q.unix) {
        (None, None) if pty => {
            let (cols, rows) = (q.cols.unwrap_or(80), q.rows.unwrap_or(24));
            if !polydev_api::agent::PtySpec::size_ok(cols, rows) {
                return Err(bad(format!(
                    "cols and rows must be 1-{}",
                    polydev_api::agent::PtySpec::MAX_SIZE
                )));
            }
            if let Some(u) = q.user.as_deref().filter(|u| !plausible_user(u)) {
                return Err(bad(format!(
                    "user={u:?}: give a user name (a-z, 0-9, '_', '-') or a uid"
                )));
            }
            if let Some(s) = q
                .session
                .as_deref()
                .filter(|s| !polydev_api::agent::PtySpec::session_ok(s))
            {
                return Err(bad(format!(
                    "session={s:?}: name a kept terminal with 1-32 of a-z, 0-9 and '-'"
                )));
            }
            polydev_api::agent::ForwardTarget::Pty(polydev_api::agent::PtySpec {
                user: q.user,
                cols,
                rows,
                session: q.session,
            })
        }
        _ if pty => return Err(bad("pty=true takes no port or unix".into())),
        (Some(0), None) => return Err(bad("port must be 1-65535".into())),
        (Some(port), None) => polydev_api::agent::ForwardTarget::Tcp { port },
        (None, Some(path)) => {
            if !path.starts_with('/') || path.len() > 107 || path.contains('\0') {
                return Err(bad(format!(
                    "unix={path:?}: give the absolute path of a socket inside the VM (at most 107 bytes)"
                )));
            }
            polydev_api::agent::ForwardTarget::Unix { path }
        }
        _ => {
            return Err(bad(
                "give exactly one of port=N, unix=/path or pty=true".into()
            ))
        }
    };
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(FORWARD_PROTOCOL));
    let on_upgrade = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
    let (true, Some(on_upgrade)) = (wants, on_upgrade) else {
        return Err(ApiError(Problem::new(
            426,
            "upgrade-required",
            "Upgrade required",
            format!("send `Connection: upgrade` and `Upgrade: {FORWARD_PROTOCOL}` (`polydev vm forward` does)"),
        )));
    };
    // Connect inside the VM first, so a refused target is a problem
    // response rather than a stream that closes at once.
    let mut inner = m.forward(&id, target).await?;
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(up) => {
                let mut outer = hyper_util::rt::TokioIo::new(up);
                let _ = tokio::io::copy_bidirectional(&mut outer, &mut inner).await;
            }
            Err(e) => tracing::warn!(error = %e, "forward upgrade failed"),
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, FORWARD_PROTOCOL)
        .body(Body::empty())
        .unwrap_or_default())
}

async fn get_vm(
    State(m): State<Arc<Manager>>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(m.get(&id).await?))
}

async fn delete_vm(
    State(m): State<Arc<Manager>>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        to_completion(async move { m.destroy(&id).await }).await?,
    ))
}

async fn exec(
    State(m): State<Arc<Manager>>,
    UrlPath(id): UrlPath<String>,
    body: Result<Json<ExecRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(req) = body?;
    let mut frames = m.exec(&id, req).await?;
    let stream = async_stream(move |tx| async move {
        loop {
            match frames.next().await {
                Ok(Some(f)) => {
                    let mut line = serde_json::to_vec(&f).unwrap_or_default();
                    line.push(b'\n');
                    if tx.send(Ok(Bytes::from(line))).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let f = polydev_api::agent::Response::Error(polydev_api::agent::AgentError {
                        kind: polydev_api::agent::AgentErrorKind::Internal,
                        message: e.to_string(),
                    });
                    let mut line = serde_json::to_vec(&f).unwrap_or_default();
                    line.push(b'\n');
                    let _ = tx.send(Ok(Bytes::from(line))).await;
                    break;
                }
            }
        }
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_default())
}

/// A body stream fed by a task through a bounded channel.
fn async_stream<F, Fut>(
    f: F,
) -> tokio_stream::wrappers::ReceiverStream<Result<Bytes, std::io::Error>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    #[serde(default = "default_kind")]
    kind: LogKind,
    /// At most this many bytes from the end (default 1 MiB, at most 16 MiB).
    #[serde(default)]
    tail_bytes: Option<u64>,
    /// At most this many lines from the end.
    #[serde(default)]
    lines: Option<usize>,
}

fn default_kind() -> LogKind {
    LogKind::Agent
}

async fn logs(
    State(m): State<Arc<Manager>>,
    UrlPath(id): UrlPath<String>,
    q: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(q) = q.map_err(|e| {
        ApiError(Problem::new(
            400,
            "bad-query",
            "Bad query",
            format!(
                "{}: use kind=console, kind=agent or kind=egress, tail_bytes=N (at most {}) and lines=N",
                e.body_text(),
                crate::logfile::MAX_TAIL_BYTES
            ),
        ))
    })?;
    let tail_bytes = q.tail_bytes.unwrap_or(crate::logfile::DEFAULT_TAIL_BYTES);
    if tail_bytes > crate::logfile::MAX_TAIL_BYTES {
        return Err(ApiError(Problem::new(
            400,
            "bad-query",
            "Bad query",
            format!(
                "tail_bytes={tail_bytes} is more than the {} bytes served at once; ask for less (the end of the log is what is served)",
                crate::logfile::MAX_TAIL_BYTES
            ),
        )));
    }
    let tail = crate::manager::LogTail {
        bytes: tail_bytes,
        lines: q.lines,
    };
    let text = m.logs(&id, q.kind, tail).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text))
}

async fn agent_ring(
    State(m): State<Arc<Manager>>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        m.agent_call(&id, Request::Logs { limit: 10_000 }).await?,
    ))
}

async fn services(
    State(m): State<Arc<Manager>>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(m.agent_call(&id, Request::Services).await?))
}

/// A long poll over a user's files in the VM (the guest agent's
/// `watch_files`; its answer within the agent call's deadline).
async fn watch_files(
    State(m): State<Arc<Manager>>,
    UrlPath(id): UrlPath<String>,
    body: Result<Json<polydev_api::agent::WatchSpec>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(spec) = body?;
    Ok(Json(m.agent_call(&id, Request::WatchFiles(spec)).await?))
}

async fn pause(
    State(m): State<Arc<Manager>>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        to_completion(async move { m.pause(&id).await }).await?,
    ))
}

async fn resume(
    State(m): State<Arc<Manager>>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(
        to_completion(async move { m.resume(&id).await }).await?,
    ))
}

async fn snapshot(
    State(m): State<Arc<Manager>>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<impl IntoResponse> {
    let snap = to_completion(async move { m.snapshot(&id).await }).await?;
    Ok((StatusCode::CREATED, Json(snap)))
}

async fn list_snapshots(State(m): State<Arc<Manager>>) -> impl IntoResponse {
    Json(m.snapshots())
}

async fn delete_snapshot(
    State(m): State<Arc<Manager>>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<impl IntoResponse> {
    to_completion(async move { m.delete_snapshot(&id).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RestoreBody {
    #[serde(default)]
    name: Option<String>,
}

async fn restore(
    State(m): State<Arc<Manager>>,
    UrlPath(id): UrlPath<String>,
    body: Result<Json<RestoreBody>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let body = match body {
        Ok(Json(b)) => b,
        Err(JsonRejection::MissingJsonContentType(_)) => RestoreBody::default(),
        Err(e) => return Err(e.into()),
    };
    let info = to_completion(async move { m.restore(&id, body.name).await }).await?;
    Ok((StatusCode::CREATED, Json(info)))
}
