//! `/api/v1/runs`: prompts run by a provider's CLI in the caller's CLI VM
//! (create, list, read, cancel, events as JSON or SSE). The API only
//! records the run; the driver ([`crate::driver::runs`]) starts it in the
//! VM, reads its output into events and finishes it.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::ReceiverStream;
use utoipa::ToSchema;

use crate::auth::Scope;
use crate::http::error::{check_id, check_name};
use crate::http::{ApiError, ApiJson, ApiPath, ApiQuery, AppState, Caller, StreamClass};
use crate::state::{Lifecycle, VmState};
use crate::store::{NewRun, Run, RunEvent, RunState, RunStep, StoreError};

/// Longest prompt accepted, in characters (one argv element: the kernel's
/// limit for one is 128 KiB, and the request body's 64 KiB keeps any
/// prompt below it).
pub const MAX_PROMPT_CHARS: usize = 32 * 1024;
/// Longest working directory accepted, in characters.
pub const MAX_CWD_CHARS: usize = 1024;
/// A run's time limit when the request names none.
pub const DEFAULT_TIMEOUT_SECS: u32 = 3600;
/// The longest time limit a run may ask for.
pub const MAX_TIMEOUT_SECS: u32 = 86_400;

/// Run a prompt.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCreate {
    /// Provider id (connected: see `GET /api/v1/credentials`).
    #[schema(min_length = 1, max_length = 64, pattern = "^[a-z0-9][a-z0-9_-]*$")]
    pub provider: String,
    /// The prompt (1-32768 characters, no NUL), passed to the provider's command
    /// as one argument.
    #[schema(min_length = 1, max_length = 32768, pattern = "^[^\\x00]+$")]
    pub prompt: String,
    /// Working directory in the CLI VM: absolute, or relative to the home
    /// directory (default: the home directory).
    #[schema(
        min_length = 1,
        max_length = 1024,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$"
    )]
    pub cwd: Option<String>,
    /// Options.
    pub options: Option<RunOptions>,
}

/// Options of a run.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct RunOptions {
    /// Time limit in seconds (1-86400, default 3600): a run still going
    /// then is stopped and fails.
    #[schema(minimum = 1, maximum = 86400)]
    pub timeout_secs: Option<u32>,
}

/// A prompt run.
#[derive(Serialize, ToSchema)]
pub struct RunView {
    /// `run-…`.
    pub id: String,
    /// Provider id.
    pub provider: String,
    /// The CLI VM it runs in.
    pub vm_id: String,
    /// The prompt.
    pub prompt: String,
    /// Working directory in the VM.
    pub cwd: String,
    /// `queued`, `running`, `succeeded`, `failed`, `cancelled`, `lost`.
    pub state: String,
    /// Whether the state is final.
    pub done: bool,
    /// Why it failed, was lost or cancelled.
    pub reason: Option<String>,
    /// The command's exit code, once it exited.
    pub exit_code: Option<i64>,
    /// A cancel was asked for; the run stops shortly.
    pub cancel_requested: bool,
    /// Time limit (s).
    pub timeout_secs: i64,
    /// Created (ms).
    pub created_at: i64,
    /// Started in the VM (ms).
    pub started_at: Option<i64>,
    /// Finished (ms).
    pub finished_at: Option<i64>,
}

impl From<&Run> for RunView {
    fn from(r: &Run) -> Self {
        RunView {
            id: r.id.clone(),
            provider: r.provider.clone(),
            vm_id: r.vm_id.clone(),
            prompt: r.prompt.clone(),
            cwd: r.cwd.clone(),
            state: r.state.as_str().into(),
            done: r.state.is_final(),
            reason: r.reason.clone(),
            exit_code: r.exit_code,
            cancel_requested: r.cancel_requested,
            timeout_secs: r.timeout_secs,
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
        }
    }
}

/// One event of a run: an output line or a state change.
#[derive(Serialize, ToSchema)]
pub struct RunEventView {
    /// The run's event number (1, 2, …; the SSE `id`).
    pub seq: i64,
    /// Stored (ms).
    pub at: i64,
    /// `output` (a line the command printed) or `state`.
    pub source: String,
    /// Output: the JSON object's `type` (`object` without one), or `raw`
    /// for a line that is not a JSON object; state: the new state.
    #[serde(rename = "type")]
    pub kind: String,
    /// Output: the parsed JSON object (`null` for raw lines); state:
    /// `{state, reason?, exit_code?}`.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    /// The line as printed (empty for state events).
    pub raw: String,
}

impl From<RunEvent> for RunEventView {
    fn from(e: RunEvent) -> Self {
        RunEventView {
            seq: e.seq,
            at: e.at,
            source: e.source,
            kind: e.kind,
            data: e.data,
            raw: e.raw,
        }
    }
}

/// Query of `GET /api/v1/runs`: one page, newest first.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RunsQuery {
    /// Runs per page (1-100, default 50).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// The last run id of the previous page: only older runs.
    #[param(pattern = "^run-[0-9a-f]{1,64}$")]
    pub before: Option<String>,
}

/// The caller's run `id`; another user's is not found.
async fn own_run(st: &AppState, user_id: &str, id: &str) -> Result<Run, ApiError> {
    check_id("run", "run", id)?;
    match st.store.run(id).await {
        Ok(r) if r.user_id == user_id => Ok(r),
        Ok(_) | Err(StoreError::NotFound { .. }) => Err(ApiError::not_found("run", id)),
        Err(e) => Err(e.into()),
    }
}

fn cli_home(st: &AppState) -> String {
    st.driver
        .as_ref()
        .map(|d| d.cli_home().to_string())
        .unwrap_or_else(|| crate::driver::DriverConfig::default().cli_home)
}

/// The working directory a request asks for, checked.
fn working_dir(st: &AppState, cwd: Option<&str>) -> Result<String, ApiError> {
    let home = cli_home(st);
    let Some(cwd) = cwd else {
        return Ok(home);
    };
    if cwd.is_empty() || cwd.chars().count() > MAX_CWD_CHARS || cwd.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "`cwd` must be 1-{MAX_CWD_CHARS} characters without control characters: an absolute path in the CLI VM, or one relative to the home directory {home}"
        )));
    }
    Ok(if cwd.starts_with('/') {
        cwd.to_string()
    } else {
        format!("{}/{cwd}", home.trim_end_matches('/'))
    })
}

/// Run a prompt with a connected provider's CLI in the caller's running
/// CLI VM, as its user. The run starts shortly (`queued`, then
/// `running`); follow it at `/api/v1/runs/{id}/events`.
#[utoipa::path(post, path = "/api/v1/runs", operation_id = "create_run", tag = "runs",
    request_body = RunCreate,
    responses((status = 201, body = RunView, headers(("location" = String, description = "The run's URL")))))]
pub async fn create(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiJson(req): ApiJson<RunCreate>,
) -> Result<Response, ApiError> {
    p.require(Scope::VmsWrite)?;
    check_name("provider id", &req.provider)?;
    if st.providers.get(&req.provider).is_none() {
        let known: Vec<&str> = st.providers.iter().map(|p| p.id.as_str()).collect();
        return Err(ApiError::new(
            404,
            "unknown-provider",
            "Unknown provider",
            format!(
                "there is no provider {:?}: use one of {}",
                req.provider,
                known.join(", ")
            ),
        ));
    }
    if req.prompt.is_empty()
        || req.prompt.chars().count() > MAX_PROMPT_CHARS
        || req.prompt.contains('\0')
    {
        return Err(ApiError::invalid(format!(
            "`prompt` must be 1-{MAX_PROMPT_CHARS} characters without NUL"
        )));
    }
    let cwd = working_dir(&st, req.cwd.as_deref())?;
    let opts = req.options.unwrap_or_default();
    let timeout = opts.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS);
    if !(1..=MAX_TIMEOUT_SECS).contains(&timeout) {
        return Err(ApiError::invalid(format!(
            "`options.timeout_secs` must be 1-{MAX_TIMEOUT_SECS}"
        )));
    }
    if st
        .store
        .credential(&p.user_id, &req.provider)
        .await?
        .is_none()
    {
        return Err(ApiError::new(
            409,
            "provider-not-connected",
            "Provider not connected",
            format!(
                "{} is not connected: connect it first (POST /api/v1/sessions {{\"provider\":\"{}\"}}), then run the prompt again",
                req.provider, req.provider
            ),
        ));
    }
    let Some(vm) = st.store.live_cli_vm(&p.user_id).await? else {
        return Err(ApiError::new(
            409,
            "no-cli-vm",
            "No CLI VM",
            "you have no CLI VM to run the prompt in: connecting a provider creates one (or POST /api/v1/vms {\"kind\":\"cli\"}); run the prompt once it is running",
        ));
    };
    // A hibernated VM is resumed for the run (the driver does that before
    // it starts the run); one being created or ended cannot take it.
    let usable = matches!(
        vm.life.state,
        VmState::Running | VmState::Hibernating | VmState::Hibernated | VmState::Resuming
    );
    if !usable {
        return Err(ApiError::new(
            409,
            "cli-vm-not-running",
            "CLI VM not running",
            format!(
                "your CLI VM {} is {}: wait until it is running (GET /api/v1/vms/{}) and run the prompt again",
                vm.id,
                vm.life.state.as_str(),
                vm.id
            ),
        ));
    }
    let new = NewRun {
        user_id: p.user_id.clone(),
        vm_id: vm.id.clone(),
        provider: req.provider.clone(),
        prompt: req.prompt,
        cwd,
        timeout_secs: i64::from(timeout),
    };
    let run = match st
        .store
        .create_run_limited(new, st.cfg.max_runs_per_user)
        .await
    {
        Ok(r) => r,
        Err(StoreError::RunLimit { limit, active }) => {
            let first = active.first().map(String::as_str).unwrap_or("");
            return Err(ApiError::new(
                429,
                "run-limit",
                "Too many prompt runs",
                format!(
                    "you have {} prompt run(s) queued or running ({}) and one user may have {limit} at once: wait for one to finish (GET /api/v1/runs/{first}) or cancel it (DELETE /api/v1/runs/{first}), then run again",
                    active.len(),
                    active.join(", ")
                ),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    st.notify();
    Ok(super::created(
        RunView::from(&run),
        &format!("/api/v1/runs/{}", run.id),
    ))
}

/// The caller's runs, newest first, one page at a time (`before` = the
/// last id of the previous page).
#[utoipa::path(get, path = "/api/v1/runs", operation_id = "list_runs", tag = "runs",
    params(RunsQuery),
    responses((status = 200, body = [RunView])))]
pub async fn list(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiQuery(q): ApiQuery<RunsQuery>,
) -> Result<Json<Vec<RunView>>, ApiError> {
    p.require(Scope::VmsRead)?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid("`limit` must be 1-100"));
    }
    if let Some(b) = &q.before {
        check_id("run", "run", b)?;
    }
    let runs = match st
        .store
        .runs_of(&p.user_id, i64::from(limit), q.before.as_deref())
        .await
    {
        Ok(r) => r,
        Err(StoreError::NotFound { id, .. }) => {
            return Err(ApiError::invalid(format!(
                "`before`: there is no run {id} of yours to page from"
            )))
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Json(runs.iter().map(RunView::from).collect()))
}

/// One of the caller's runs.
#[utoipa::path(get, path = "/api/v1/runs/{id}", operation_id = "get_run", tag = "runs",
    params(("id" = String, Path, description = "`run-…`", pattern = "^run-[0-9a-f]{1,64}$")),
    responses((status = 200, body = RunView)))]
pub async fn get(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<RunView>, ApiError> {
    p.require(Scope::VmsRead)?;
    Ok(Json(RunView::from(&own_run(&st, &p.user_id, &id).await?)))
}

/// Cancel a run: a queued one is cancelled at once; a running one's
/// processes are stopped in the VM (TERM, then KILL) and it ends
/// `cancelled` shortly (202; follow its events). A finished run is a
/// conflict.
#[utoipa::path(delete, path = "/api/v1/runs/{id}", operation_id = "cancel_run", tag = "runs",
    params(("id" = String, Path, description = "`run-…`", pattern = "^run-[0-9a-f]{1,64}$")),
    responses((status = 202, body = RunView)))]
pub async fn cancel(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<(StatusCode, Json<RunView>), ApiError> {
    p.require(Scope::VmsWrite)?;
    // The driver may change the run between our read and our write: read
    // again and decide again (each loss means it moved on).
    for _ in 0..5 {
        let run = own_run(&st, &p.user_id, &id).await?;
        let step = match run.state {
            s if s.is_final() => {
                return Err(ApiError::conflict(format!(
                    "run {id} is {} and can no longer be cancelled",
                    s.as_str()
                )))
            }
            RunState::Queued => RunStep {
                state: Some((RunState::Cancelled, None, None)),
                cancel_requested: true,
                ..RunStep::default()
            },
            _ if run.cancel_requested => {
                return Ok((StatusCode::ACCEPTED, Json(RunView::from(&run))));
            }
            _ => RunStep {
                cancel_requested: true,
                ..RunStep::default()
            },
        };
        match st.store.advance_run(&run, step).await {
            Ok(r) => {
                st.notify();
                return Ok((StatusCode::ACCEPTED, Json(RunView::from(&r))));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict(format!(
        "run {id} kept changing while it was being cancelled: try again"
    )))
}

fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

/// Events read from the store at once.
const EVENT_PAGE: i64 = 500;

/// A run's events, oldest first: its output lines as typed events and its
/// state changes. With `Accept: text/event-stream` they come as
/// Server-Sent Events (`id` = `seq`, `event` = `output` or `state`, `data`
/// = the JSON below), the stored ones first, then live, until the run is
/// final (then an `end` event) or the server shuts down; `Last-Event-ID`
/// resumes after that event.
#[utoipa::path(get, path = "/api/v1/runs/{id}/events", operation_id = "run_events", tag = "runs",
    params(("id" = String, Path, description = "`run-…`", pattern = "^run-[0-9a-f]{1,64}$"),
        ("last-event-id" = Option<i64>, Header, nullable = false, description = "SSE: resume after this event's `seq`")),
    responses((status = 200, content(
        ([RunEventView] = "application/json"),
        (String = "text/event-stream")))))]
pub async fn events(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    p.require(Scope::VmsRead)?;
    own_run(&st, &p.user_id, &id).await?;
    let after = match headers.get("last-event-id") {
        None => 0,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .ok_or_else(|| {
                ApiError::bad_request("Last-Event-ID must be an event's seq (an integer)")
            })?,
    };
    if !wants_sse(&headers) {
        let mut all = Vec::new();
        let mut last = after;
        loop {
            let page = st.store.run_events_after(&id, last, EVENT_PAGE).await?;
            let full = page.len() as i64 == EVENT_PAGE;
            for e in page {
                last = e.seq;
                all.push(RunEventView::from(e));
            }
            if !full {
                break;
            }
        }
        return Ok(Json(all).into_response());
    }
    let slot = st.open_stream(&p.user_id, StreamClass::EventStream)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let st2 = st.clone();
    tokio::spawn(async move {
        // Held while the stream is fed; the task ends when the client goes.
        let _slot = slot;
        let mut last = after;
        let mut shutdown = st2.shutdown.clone();
        loop {
            // The state first: a final state's events are committed with
            // it, so everything up to the end is in the reads after.
            let done = match st2.store.run(&id).await {
                Ok(r) => r.state.is_final(),
                Err(e) => {
                    tracing::warn!(run = %id, error = %e, "run event stream: cannot read the run");
                    return;
                }
            };
            loop {
                let page = match st2.store.run_events_after(&id, last, EVENT_PAGE).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(run = %id, error = %e, "run event stream: cannot read events");
                        return;
                    }
                };
                let full = page.len() as i64 == EVENT_PAGE;
                for e in page {
                    last = e.seq;
                    let name = e.source.clone();
                    let ev = SseEvent::default()
                        .id(e.seq.to_string())
                        .event(name)
                        .json_data(RunEventView::from(e))
                        .unwrap_or_else(|_| SseEvent::default().comment("unserialisable event"));
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                if !full {
                    break;
                }
            }
            if done {
                let _ = tx
                    .send(Ok(SseEvent::default().event("end").data("{}")))
                    .await;
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(st2.cfg.sse_poll) => {}
                _ = shutdown.wait_for(|s| *s) => return,
                _ = tx.closed() => return,
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response())
}
