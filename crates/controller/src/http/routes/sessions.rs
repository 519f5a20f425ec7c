//! `/api/v1/providers` and `/api/v1/sessions`: what can be connected, and
//! the connect sessions (create, list, read, cancel, events as JSON or SSE).

use std::convert::Infallible;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio_stream::wrappers::ReceiverStream;

use crate::auth::Scope;
use crate::http::error::{check_id, check_name};
use crate::http::model::*;
use crate::http::{ApiError, ApiJson, ApiPath, AppState, Caller, StreamClass};
use crate::state::{Lifecycle, SessionState};
use crate::store::{Also, Session, StoreError};

/// The providers that can be connected.
#[utoipa::path(get, path = "/api/v1/providers", tag = "sessions",
    responses((status = 200, body = [ProviderView])))]
pub async fn providers(State(st): State<AppState>, _caller: Caller) -> Json<Vec<ProviderView>> {
    Json(
        st.providers
            .iter()
            .map(|p| ProviderView {
                id: p.id.clone(),
                name: p.name.clone(),
                npm_package: p.npm_package.clone(),
            })
            .collect(),
    )
}

/// The caller's session `id`; another user's is not found.
pub(super) async fn own_session(
    st: &AppState,
    user_id: &str,
    id: &str,
) -> Result<Session, ApiError> {
    check_id("ses", "session", id)?;
    match st.store.session(id).await {
        Ok(s) if s.user_id == user_id => Ok(s),
        Ok(_) | Err(StoreError::NotFound { .. }) => Err(ApiError::not_found("session", id)),
        Err(e) => Err(e.into()),
    }
}

/// Start connecting a provider: a browser VM boots with its login.
#[utoipa::path(post, path = "/api/v1/sessions", operation_id = "create_session", tag = "sessions",
    request_body = SessionCreate,
    responses((status = 201, body = SessionView, headers(("location" = String, description = "The session's URL")))))]
pub async fn create(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiJson(req): ApiJson<SessionCreate>,
) -> Result<Response, ApiError> {
    p.require(Scope::SessionsWrite)?;
    check_name("provider id", &req.provider)?;
    if st.providers.get(&req.provider).is_none() {
        let known: Vec<&str> = st.providers.iter().map(|p| p.id.as_str()).collect();
        return Err(ApiError::invalid(format!(
            "unknown provider {:?}: use one of {}",
            req.provider,
            known.join(", ")
        )));
    }
    let s = match st
        .store
        .create_session_limited(&p.user_id, &req.provider, st.cfg.max_sessions_per_user)
        .await
    {
        Ok(s) => s,
        Err(StoreError::SessionLimit { limit, active, .. }) => {
            let first = active.first().map(String::as_str).unwrap_or("");
            return Err(ApiError::new(
                409,
                "session-limit",
                "Too many connect sessions",
                format!(
                    "you have {} connect session(s) in progress ({}) and one user may have {limit} at once: wait for it to finish (GET /api/v1/sessions/{first}) or cancel it (POST /api/v1/sessions/{first}/cancel), then connect again",
                    active.len(),
                    active.join(", ")
                ),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    st.notify();
    Ok(super::created(
        SessionView::from(&s),
        &format!("/api/v1/sessions/{}", s.id),
    ))
}

/// The caller's sessions, oldest first.
#[utoipa::path(get, path = "/api/v1/sessions", operation_id = "list_sessions", tag = "sessions",
    responses((status = 200, body = [SessionView])))]
pub async fn list(
    State(st): State<AppState>,
    Caller(p): Caller,
) -> Result<Json<Vec<SessionView>>, ApiError> {
    p.require(Scope::SessionsRead)?;
    let all = st.store.sessions_of(&p.user_id).await?;
    Ok(Json(all.iter().map(SessionView::from).collect()))
}

/// One of the caller's sessions.
#[utoipa::path(get, path = "/api/v1/sessions/{id}", operation_id = "get_session", tag = "sessions",
    params(("id" = String, Path, description = "`ses-…`", pattern = "^ses-[0-9a-f]{1,64}$")),
    responses((status = 200, body = SessionView)))]
pub async fn get(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<SessionView>, ApiError> {
    p.require(Scope::SessionsRead)?;
    Ok(Json(SessionView::from(
        &own_session(&st, &p.user_id, &id).await?,
    )))
}

/// Cancel a session that has not stored a credential yet; its browser VM
/// is then destroyed. A finished session is a conflict.
#[utoipa::path(post, path = "/api/v1/sessions/{id}/cancel", tag = "sessions",
    params(("id" = String, Path, description = "`ses-…`", pattern = "^ses-[0-9a-f]{1,64}$")),
    responses((status = 200, body = SessionView)))]
pub async fn cancel(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<SessionView>, ApiError> {
    p.require(Scope::SessionsWrite)?;
    // The driver may move the session between our read and our write: read
    // again and decide again (a few times; each loss means it moved on).
    for _ in 0..5 {
        let s = own_session(&st, &p.user_id, &id).await?;
        if !s.life.state.valid_transition(SessionState::Cancelled) {
            return Err(ApiError::conflict(format!(
                "session {id} is {} and can no longer be cancelled{}",
                s.life.state.as_str(),
                if s.life.state.is_final() {
                    ""
                } else {
                    ": its credential is already in the vault"
                }
            )));
        }
        match st
            .store
            .transition_session(&s, SessionState::Cancelled, None, Also::default())
            .await
        {
            Ok(s) => {
                st.notify();
                return Ok(Json(SessionView::from(&s)));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict(format!(
        "session {id} kept changing while it was being cancelled: try again"
    )))
}

/// Type text into the session's running login, as the person would at
/// the CLI's prompt (Claude Code asks for the `code#state` its page shows).
/// Only while the session awaits the person; recorded in the timeline as
/// an `input` event without the text.
#[utoipa::path(post, path = "/api/v1/sessions/{id}/input", tag = "sessions",
    request_body = SessionInput,
    params(("id" = String, Path, description = "`ses-…`", pattern = "^ses-[0-9a-f]{1,64}$")),
    responses((status = 204, description = "Typed into the login")))]
pub async fn input(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<SessionInput>,
) -> Result<StatusCode, ApiError> {
    p.require(Scope::SessionsWrite)?;
    let n = req.text.chars().count();
    if n == 0 || n > 4096 || req.text.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "`text` must be 1-4096 characters without control characters (set `enter` to press Enter)",
        ));
    }
    let s = own_session(&st, &p.user_id, &id).await?;
    if s.life.state != SessionState::AwaitingUser {
        return Err(ApiError::conflict(format!(
            "session {id} is {}: input goes to a login that awaits the person",
            s.life.state.as_str()
        )));
    }
    let vm_id = s.browser_vm_id.as_deref().unwrap_or_default();
    let vm = st.store.vm(vm_id).await?;
    let (Some(host_vm), Some(host)) = (vm.host_vm_id.as_deref(), &st.host) else {
        return Err(ApiError::conflict(format!(
            "the login of session {id} cannot be reached now: retry in a few seconds"
        )));
    };
    let mut text = req.text.into_bytes();
    if req.enter {
        // A terminal's Enter is CR (a TUI in raw mode sees nothing else as
        // Enter); a plain pipe needs a newline.
        let tty = st.providers.get(&s.provider).is_some_and(|p| p.login_tty);
        text.push(if tty { b'\r' } else { b'\n' });
    }
    match crate::driver::login::send_input(&**host, host_vm, &id, text).await {
        Ok(true) => {}
        Ok(false) => {
            return Err(ApiError::conflict(format!(
                "the login of session {id} is no longer running"
            )))
        }
        Err(e) => {
            return Err(ApiError::new(
                502,
                "login-unreachable",
                "Login unreachable",
                format!("the login of session {id} does not answer: {e}; retry"),
            ))
        }
    }
    st.store
        .note_session(
            &s,
            "input",
            serde_json::json!({ "text": "<redacted>", "chars": n, "enter": req.enter }),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

fn sse_event(e: EventView) -> SseEvent {
    let ev = SseEvent::default()
        .id(e.id.to_string())
        .event(e.kind.clone());
    ev.json_data(&e)
        .unwrap_or_else(|_| SseEvent::default().comment("unserialisable event"))
}

/// A session's events, oldest first. With `Accept: text/event-stream` they
/// come as Server-Sent Events (`id` = event id, `event` = kind, `data` =
/// the JSON below), live, until the session is final (then an `end` event)
/// or the server shuts down; `Last-Event-ID` resumes after that event.
#[utoipa::path(get, path = "/api/v1/sessions/{id}/events", tag = "sessions",
    params(("id" = String, Path, description = "`ses-…`", pattern = "^ses-[0-9a-f]{1,64}$"),
        ("last-event-id" = Option<i64>, Header, nullable = false, description = "SSE: resume after this event id")),
    responses((status = 200, content(
        ([EventView] = "application/json"),
        (String = "text/event-stream")))))]
pub async fn events(
    State(st): State<AppState>,
    Caller(p): Caller,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    p.require(Scope::SessionsRead)?;
    own_session(&st, &p.user_id, &id).await?;
    // Checked whichever form is asked for: a malformed header is an error,
    // not silently ignored.
    let after = match headers.get("last-event-id") {
        None => 0,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .ok_or_else(|| {
                ApiError::bad_request("Last-Event-ID must be an event id (an integer)")
            })?,
    };
    if !wants_sse(&headers) {
        let evs = st.store.events_for("session", &id).await?;
        return Ok(Json(evs.into_iter().map(EventView::from).collect::<Vec<_>>()).into_response());
    }
    let slot = st.open_stream(&p.user_id, StreamClass::EventStream)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(32);
    let st2 = st.clone();
    tokio::spawn(async move {
        // Held while the stream is fed; the task ends when the client goes.
        let _slot = slot;
        let mut last = after;
        let mut shutdown = st2.shutdown.clone();
        loop {
            // Read the state first: a final state's events are committed
            // with it, so everything up to the end is in the read after.
            let done = match st2.store.session(&id).await {
                Ok(s) => s.life.state.is_final(),
                Err(e) => {
                    tracing::warn!(session = %id, error = %e, "event stream: cannot read the session");
                    return;
                }
            };
            match st2.store.events_after("session", &id, last).await {
                Ok(evs) => {
                    for e in evs {
                        last = e.id;
                        if tx.send(Ok(sse_event(e.into()))).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(session = %id, error = %e, "event stream: cannot read events");
                    return;
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
