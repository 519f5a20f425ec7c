//! The WebSocket streams: `/api/v1/sessions/{id}/desktop` (a login's
//! desktop) and `/api/v1/vms/{id}/terminal` (a CLI VM's shell).
//!
//! Authorized by a single-use ticket in the query (a browser cannot set an
//! `Authorization` header on a WebSocket, and a cookie alone would let any
//! page the user visits open the stream). The desktop WebSocket carries
//! the RFB (VNC) bytes both ways in binary frames — what noVNC speaks —
//! spliced with a connection to port 5900 in the browser VM through the
//! host agent's forward. The terminal relays between WebSocket messages
//! and the guest's terminal frames (`polydev_api::pty`). Each open stream
//! holds one of its user's WebSocket slots
//! ([`crate::http::HttpConfig::max_websockets_per_user`]).

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use polydev_api::agent::{ForwardTarget, PtySpec};
use polydev_api::pty::{PtyDecoder, PtyFrame};

use crate::driver::Duplex;
use crate::http::error::check_id;
use crate::http::limits::StreamSlot;
use crate::http::model::{
    StreamQuery, TerminalControl, TerminalEvent, TerminalQuery, WebSocketHandshake,
};
use crate::http::{ApiError, ApiPath, ApiQuery, AppState, StreamClass};
use crate::state::Lifecycle;
use crate::state::VmState;
use crate::store::{Session, Vm, VmKind};

/// Where the browser image's VNC server listens inside the VM.
pub const VNC_PORT: u16 = 5900;

/// The desktop of a connect session, as a WebSocket (binary frames: the
/// RFB protocol; subprotocol `binary` accepted). Needs a `desktop` ticket
/// for this session; without a WebSocket upgrade the answer is 426.
#[utoipa::path(get, path = "/api/v1/sessions/{id}/desktop", tag = "streams", security(()),
    params(("id" = String, Path, description = "`ses-…`", pattern = "^ses-[0-9a-f]{1,64}$"), StreamQuery, WebSocketHandshake),
    responses((status = 101, description = "Switching to the WebSocket")))]
pub async fn desktop(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<StreamQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    check_id("ses", "session", &id)?;
    // Checked before the ticket is spent: a plain GET must not burn it.
    let ws = ws.map_err(upgrade_required)?;
    let outcome = open_desktop(&st, &id, &q.ticket).await;
    st.metrics
        .stream_connect("desktop", outcome_label(&outcome));
    let (conn, slot) = outcome?;
    let shutdown = st.shutdown.clone();
    Ok(ws
        .protocols(["binary"])
        .on_upgrade(move |socket| async move {
            let _slot = slot;
            splice(socket, conn, shutdown).await
        }))
}

/// A stream URL opened without a WebSocket upgrade: 426; a WebSocket
/// handshake that is incomplete (no key, another version): 400.
fn upgrade_required(r: WebSocketUpgradeRejection) -> ApiError {
    match r {
        WebSocketUpgradeRejection::InvalidWebSocketVersionHeader(_)
        | WebSocketUpgradeRejection::WebSocketKeyHeaderMissing(_) => ApiError::bad_request(format!(
            "the WebSocket handshake is incomplete ({}): send Sec-WebSocket-Version: 13 and a Sec-WebSocket-Key",
            r.body_text()
        )),
        _ => ApiError::new(
            426,
            "upgrade-required",
            "WebSocket required",
            format!("open this URL as a WebSocket ({})", r.body_text()),
        ),
    }
}

/// The 503 of a controller that drives no VMs.
fn no_host(what: &str) -> ApiError {
    ApiError::new(
        503,
        "no-host",
        "No host agent",
        format!("this controller runs without a host agent (--no-driver): open the {what} through one that drives VMs"),
    )
}

/// The connect counter's outcome label.
fn outcome_label<T>(r: &Result<T, ApiError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) if e.0.status == 401 => "unauthenticated",
        Err(_) => "refused",
    }
}

/// The browser VM of session `s` while it has a desktop (a conflict
/// otherwise: the desktop exists while the login runs).
pub(super) fn desktop_vm(s: &Session) -> Result<&str, ApiError> {
    match (&s.browser_vm_id, s.life.state.is_final()) {
        (Some(vm), false) => Ok(vm),
        _ => Err(ApiError::conflict(format!(
            "session {} has no desktop now ({}): a desktop exists while the login runs",
            s.id,
            s.life.state.as_str()
        ))),
    }
}

/// An open stream's connection and the user's WebSocket slot it holds.
type Opened = (Box<dyn Duplex>, StreamSlot);

/// Redeem the ticket and connect to the session's desktop.
async fn open_desktop(st: &AppState, id: &str, ticket: &str) -> Result<Opened, ApiError> {
    let p = st.auth.redeem_ticket(ticket, "desktop", id).await?;
    let s = super::sessions::own_session(st, &p.user_id, id).await?;
    let slot = st.open_stream(&p.user_id, StreamClass::WebSocket)?;
    let vm = st.store.vm(desktop_vm(&s)?).await?;
    let Some(host_vm) = vm.host_vm_id.as_deref() else {
        return Err(ApiError::conflict(format!(
            "the desktop of session {id} is still starting: get a new ticket and retry in a few seconds"
        )));
    };
    let Some(host) = &st.host else {
        return Err(no_host("desktop"));
    };
    let conn = host
        .forward(host_vm, ForwardTarget::Tcp { port: VNC_PORT })
        .await
        .map_err(|e| {
            ApiError::new(
                502,
                "desktop-unreachable",
                "Desktop unreachable",
                format!(
                    "the desktop of session {id} does not answer: {e}; retry with a new ticket"
                ),
            )
        })?;
    Ok((conn, slot))
}

/// Copy bytes both ways until either side ends or the server shuts down.
/// (Both `recv` and `read` are cancel-safe, so one `select!` loop serves
/// both directions.)
async fn splice(
    mut socket: WebSocket,
    conn: Box<dyn Duplex>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let (mut rd, mut wr) = tokio::io::split(conn);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            m = socket.recv() => match m {
                Some(Ok(Message::Binary(b))) => {
                    if wr.write_all(&b).await.is_err() {
                        break;
                    }
                }
                // RFB is binary; text, ping and pong frames carry nothing for it.
                Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
            },
            r = rd.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if socket.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        return;
                    }
                }
            },
            _ = async { shutdown.wait_for(|s| *s).await.is_ok() } => break,
        }
    }
    let _ = wr.shutdown().await;
    let _ = socket.send(Message::Close(None)).await;
}

/// Whether `vm` can have a terminal: a CLI VM that runs, or one that
/// hibernates or is hibernated (the terminal resumes it first).
pub(super) fn terminal_vm(vm: &Vm) -> Result<(), ApiError> {
    if vm.kind != VmKind::Cli {
        return Err(ApiError::conflict(format!(
            "VM {} is a browser VM: terminals are for CLI VMs (a login's desktop has its own terminal)",
            vm.id
        )));
    }
    match vm.life.state {
        VmState::Running | VmState::Hibernating | VmState::Hibernated | VmState::Resuming => Ok(()),
        _ => Err(ApiError::conflict(format!(
            "VM {} is {}: a terminal needs it running; wait for it (GET /api/v1/vms/{}) and ask for a new ticket",
            vm.id,
            vm.life.state.as_str(),
            vm.id
        ))),
    }
}

/// How long a terminal waits for its hibernated VM to resume (a resume
/// that fails boots the VM from its disks, which takes longer).
const RESUME_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// The login shell of a running CLI VM, as a WebSocket (subprotocol
/// `binary` accepted). Needs a `terminal` ticket for this VM. Binary
/// messages are keyboard input; text messages are control, only
/// `{"type": "resize", "cols": N, "rows": N}` (any other text closes the
/// stream with 1003). The server sends the terminal's output as binary
/// messages and, when the shell ends, `{"type": "exit", "code": N,
/// "signal": N}` as text, then closes (1000). The terminal is kept: closing
/// the WebSocket leaves its shell running, and the next connection with the
/// same `session` (default `main`) attaches to it, first receiving its
/// recent output so the screen comes back. `{"type": "close"}` ends it.
#[utoipa::path(get, path = "/api/v1/vms/{id}/terminal", tag = "streams", security(()),
    params(("id" = String, Path, description = "`vm-…`", pattern = "^vm-[0-9a-f]{1,64}$"), TerminalQuery, WebSocketHandshake),
    responses((status = 101, description = "Switching to the WebSocket")))]
pub async fn terminal(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<TerminalQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    check_id("vm", "VM", &id)?;
    let (cols, rows) = (q.cols.unwrap_or(80), q.rows.unwrap_or(24));
    if !PtySpec::size_ok(cols, rows) {
        return Err(ApiError::invalid(format!(
            "cols and rows must be 1-{}",
            PtySpec::MAX_SIZE
        )));
    }
    let session = q.session.unwrap_or_else(|| "main".into());
    if !PtySpec::session_ok(&session) {
        return Err(ApiError::invalid(
            "session names a kept terminal: 1-32 of a-z, 0-9 and '-', not starting with '-'",
        ));
    }
    // Checked before the ticket is spent: a plain GET must not burn it.
    let ws = ws.map_err(upgrade_required)?;
    let outcome = open_terminal(&st, &id, &q.ticket, cols, rows, session).await;
    st.metrics
        .stream_connect("terminal", outcome_label(&outcome));
    let (conn, slot) = outcome?;
    let shutdown = st.shutdown.clone();
    let in_use = st.driver.clone().map(|d| InUse::start(d, id.clone()));
    Ok(ws
        .protocols(["binary"])
        .on_upgrade(move |socket| async move {
            let _slot = slot;
            let _in_use = in_use;
            relay_terminal(socket, conn, shutdown).await
        }))
}

/// A VM in use while this lives (an attached terminal): the use is
/// recorded now, again every [`crate::driver::Driver::touch_every`], and
/// once more when it ends, so idle hibernation counts from the end.
struct InUse {
    task: tokio::task::JoinHandle<()>,
    driver: crate::driver::Driver,
    vm: String,
}

impl InUse {
    fn start(driver: crate::driver::Driver, vm: String) -> Self {
        let (d, id) = (driver.clone(), vm.clone());
        let task = tokio::spawn(async move {
            let every = d.touch_every();
            loop {
                if let Err(e) = d.touch(&id).await {
                    tracing::warn!(vm = %id, error = %e, "cannot record the terminal's use of the VM");
                }
                tokio::time::sleep(every).await;
            }
        });
        InUse { task, driver, vm }
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.task.abort();
        let (d, id) = (self.driver.clone(), std::mem::take(&mut self.vm));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { d.touch(&id).await });
        }
    }
}

/// Redeem the ticket and open a terminal in the VM.
async fn open_terminal(
    st: &AppState,
    id: &str,
    ticket: &str,
    cols: u16,
    rows: u16,
    session: String,
) -> Result<Opened, ApiError> {
    let p = st.auth.redeem_ticket(ticket, "terminal", id).await?;
    let vm = super::vms::own_vm(st, &p.user_id, id).await?;
    terminal_vm(&vm)?;
    let slot = st.open_stream(&p.user_id, StreamClass::WebSocket)?;
    let (Some(host), Some(driver)) = (&st.host, &st.driver) else {
        return Err(no_host("terminal"));
    };
    // A hibernated VM is resumed for its terminal: the person only sees
    // the connection take a moment longer.
    let vm = driver.awake(id, RESUME_WAIT).await.map_err(|e| match e {
        crate::driver::WakeError::Store(e) => e.into(),
        e => ApiError::conflict(e.to_string()),
    })?;
    let Some(host_vm) = vm.host_vm_id.as_deref() else {
        return Err(ApiError::conflict(format!(
            "VM {id} has no host yet: wait until it is running (GET /api/v1/vms/{id}) and ask for a new ticket"
        )));
    };
    let user = driver.terminal_user();
    let conn = host
        .forward(
            host_vm,
            ForwardTarget::Pty(PtySpec {
                user,
                cols,
                rows,
                session: Some(session),
            }),
        )
        .await
        .map_err(|e| {
            ApiError::new(
                502,
                "terminal-unavailable",
                "Terminal unavailable",
                format!("cannot open a terminal in VM {id}: {e}; retry with a new ticket"),
            )
        })?;
    Ok((conn, slot))
}

/// Close `socket` with `code` and `reason`.
async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let frame = axum::extract::ws::CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}

/// Send the complete frames in `dec` to the client: output as binary
/// messages; the exit status as a text event and a 1000 close. `false`
/// once the WebSocket is over (closed here, or the client is gone).
async fn send_guest_frames(socket: &mut WebSocket, dec: &mut PtyDecoder) -> bool {
    loop {
        match dec.next_frame() {
            Ok(None) => return true,
            Ok(Some(PtyFrame::Data(d))) => {
                if socket.send(Message::Binary(d.into())).await.is_err() {
                    return false;
                }
            }
            Ok(Some(PtyFrame::Exit(x))) => {
                let ev = TerminalEvent::Exit {
                    code: x.code,
                    signal: x.signal,
                };
                if let Ok(text) = serde_json::to_string(&ev) {
                    let _ = socket.send(Message::Text(text.into())).await;
                }
                close(socket, 1000, "the shell exited").await;
                return false;
            }
            Ok(Some(PtyFrame::Resize { .. } | PtyFrame::Close)) | Err(_) => {
                close(socket, 1011, "the terminal stream broke").await;
                return false;
            }
        }
    }
}

/// Relay between the WebSocket and the guest's terminal frames until the
/// shell exits, the client leaves or the server shuts down. Dropping the
/// guest connection leaves the kept terminal for the next viewer.
async fn relay_terminal(
    mut socket: WebSocket,
    conn: Box<dyn Duplex>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let (mut rd, mut wr) = tokio::io::split(conn);
    let mut dec = PtyDecoder::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            m = socket.recv() => match m {
                Some(Ok(Message::Binary(b))) => {
                    if wr.write_all(&PtyFrame::data_frames(&b)).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<TerminalControl>(&t) {
                    Ok(TerminalControl::Resize { cols, rows }) if PtySpec::size_ok(cols, rows) => {
                        if wr.write_all(&PtyFrame::Resize { cols, rows }.encode()).await.is_err() {
                            break;
                        }
                    }
                    Ok(TerminalControl::Close) => {
                        if wr.write_all(&PtyFrame::Close.encode()).await.is_err() {
                            break;
                        }
                    }
                    _ => {
                        close(&mut socket, 1003, "text messages are control: {\"type\":\"resize\",\"cols\":1-1000,\"rows\":1-1000} or {\"type\":\"close\"}; send input as binary").await;
                        return;
                    }
                },
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
            },
            r = rd.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    close(&mut socket, 1011, "the terminal ended without an exit status").await;
                    return;
                }
                Ok(n) => {
                    dec.push(&buf[..n]);
                    if !send_guest_frames(&mut socket, &mut dec).await {
                        return;
                    }
                }
            },
            _ = async { shutdown.wait_for(|s| *s).await.is_ok() } => {
                close(&mut socket, 1001, "the server is shutting down").await;
                return;
            }
        }
    }
    let _ = wr.shutdown().await;
    let _ = socket.send(Message::Close(None)).await;
}
