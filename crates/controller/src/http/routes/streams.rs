//! `/api/v1/sessions/{id}/desktop`: a login's desktop as a WebSocket.
//!
//! Authorized by a single-use ticket in the query (a browser cannot set an
//! `Authorization` header on a WebSocket, and a cookie alone would let any
//! page the user visits open the stream). The WebSocket carries the
//! desktop's RFB (VNC) bytes both ways in binary frames — what noVNC
//! speaks — spliced with a connection to port 5900 in the browser VM
//! through the host agent's forward.

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::driver::Duplex;
use crate::http::error::check_id;
use crate::http::model::StreamQuery;
use crate::http::{ApiError, ApiPath, ApiQuery, AppState};
use crate::state::Lifecycle;

/// Where the browser image's VNC server listens inside the VM.
pub const VNC_PORT: u16 = 5900;

/// The desktop of a connect session, as a WebSocket (binary frames: the
/// RFB protocol; subprotocol `binary` accepted). Needs a `desktop` ticket
/// for this session; without a WebSocket upgrade the answer is 426.
// The handshake headers are documented as what a client must send (the
// values a WebSocket client sends; `Connection` may also list other tokens).
#[utoipa::path(get, path = "/api/v1/sessions/{id}/desktop", tag = "streams", security(()),
    params(("id" = String, Path, description = "`ses-…`", pattern = "^ses-[0-9a-f]{1,64}$"), StreamQuery,
        ("connection" = String, Header, description = "WebSocket handshake", pattern = "^Upgrade$"),
        ("upgrade" = String, Header, description = "WebSocket handshake", pattern = "^websocket$"),
        ("sec-websocket-version" = String, Header, description = "WebSocket handshake", pattern = "^13$"),
        ("sec-websocket-key" = String, Header, description = "WebSocket handshake: 16 random bytes, base64",
            pattern = "^[A-Za-z0-9+/]{22}==$")),
    responses((status = 101, description = "Switching to the WebSocket")))]
pub async fn desktop(
    State(st): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<StreamQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    check_id("ses", "session", &id)?;
    // Checked before the ticket is spent: a plain GET must not burn it.
    let ws = ws.map_err(|r| {
        ApiError::new(
            426,
            "upgrade-required",
            "WebSocket required",
            format!("open this URL as a WebSocket ({})", r.body_text()),
        )
    })?;
    let outcome = open(&st, &id, &q.ticket).await;
    st.metrics.stream_connect(
        "desktop",
        match &outcome {
            Ok(_) => "ok",
            Err(e) if e.0.status == 401 => "unauthenticated",
            Err(_) => "refused",
        },
    );
    let conn = outcome?;
    let shutdown = st.shutdown.clone();
    Ok(ws
        .protocols(["binary"])
        .on_upgrade(move |socket| splice(socket, conn, shutdown)))
}

/// Redeem the ticket and connect to the session's desktop.
async fn open(st: &AppState, id: &str, ticket: &str) -> Result<Box<dyn Duplex>, ApiError> {
    let p = st.auth.redeem_ticket(ticket, "desktop", id).await?;
    let s = super::sessions::own_session(st, &p.user_id, id).await?;
    let vm = match (&s.browser_vm_id, s.life.state.is_final()) {
        (Some(vm), false) => st.store.vm(vm).await?,
        _ => {
            return Err(ApiError::conflict(format!(
                "session {id} has no desktop now ({}): a desktop exists while the login runs",
                s.life.state.as_str()
            )))
        }
    };
    let Some(host_vm) = vm.host_vm_id.as_deref() else {
        return Err(ApiError::conflict(format!(
            "the desktop of session {id} is still starting: get a new ticket and retry in a few seconds"
        )));
    };
    let Some(host) = &st.host else {
        return Err(ApiError::new(
            503,
            "no-host",
            "No host agent",
            "this controller runs without a host agent (--no-driver): open the desktop through one that drives VMs",
        ));
    };
    host.forward(host_vm, VNC_PORT).await.map_err(|e| {
        ApiError::new(
            502,
            "desktop-unreachable",
            "Desktop unreachable",
            format!("the desktop of session {id} does not answer: {e}; retry with a new ticket"),
        )
    })
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
