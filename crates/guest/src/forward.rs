//! The `forward` request: splice the agent stream to a guest-local TCP port
//! or Unix socket.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use polydev_api::agent::{AgentErrorKind, ForwardTarget, Response};

use crate::net::Stream;
use crate::server::{send, send_error};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve one `forward` request. `early` holds bytes the client sent after
/// its request line (it may not wait for `forward_ready`).
pub fn handle(conn: Stream, target: ForwardTarget, early: Vec<u8>) {
    let connected: Result<Stream, (AgentErrorKind, String)> = match &target {
        ForwardTarget::Tcp { port } => {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, *port));
            TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
                .map(|s| {
                    // Interactive streams (VNC, PTY) want small writes out now.
                    let _ = s.set_nodelay(true);
                    Stream::from(s)
                })
                .map_err(|e| {
                    (
                        AgentErrorKind::NotFound,
                        format!("cannot connect to 127.0.0.1:{port} in the guest: {e}; is the service listening?"),
                    )
                })
        }
        ForwardTarget::Pty(_) => Err((
            AgentErrorKind::Internal,
            "a terminal is not a socket to connect to (served by the pty module)".into(),
        )),
        ForwardTarget::Unix { path } => {
            if !path.starts_with('/') {
                Err((
                    AgentErrorKind::BadRequest,
                    format!("Unix socket path {path:?} must be absolute"),
                ))
            } else {
                UnixStream::connect(path).map(Stream::from).map_err(|e| {
                    (
                        AgentErrorKind::NotFound,
                        format!("cannot connect to Unix socket {path} in the guest: {e}; is the service listening?"),
                    )
                })
            }
        }
    };
    let target_conn = match connected {
        Ok(s) => s,
        Err((kind, msg)) => {
            send_error(&conn, kind, msg);
            return;
        }
    };
    if send(&conn, &Response::ForwardReady).is_err() {
        return;
    }
    splice(conn, target_conn, early);
}

/// Copy both ways until both directions are closed. An EOF on one side is
/// passed on as a half-close of the other; an error tears both down.
pub fn splice(a: Stream, b: Stream, early: Vec<u8>) {
    let a = Arc::new(a);
    let b = Arc::new(b);
    let (a2, b2) = (a.clone(), b.clone());
    let back = std::thread::Builder::new()
        .name("fwd-back".into())
        .spawn(move || copy(&b2, &a2, Vec::new()));
    copy(&a, &b, early);
    match back {
        Ok(h) => {
            let _ = h.join();
        }
        Err(_) => {
            a.shutdown(Shutdown::Both);
            b.shutdown(Shutdown::Both);
        }
    }
}

fn copy(from: &Stream, to: &Stream, early: Vec<u8>) {
    let mut to_w: &Stream = to;
    if !early.is_empty() && to_w.write_all(&early).is_err() {
        from.shutdown(Shutdown::Both);
        to.shutdown(Shutdown::Both);
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut from_r: &Stream = from;
    loop {
        match from_r.read(&mut buf) {
            Ok(0) => {
                to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if to_w.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    from.shutdown(Shutdown::Both);
    to.shutdown(Shutdown::Both);
}
