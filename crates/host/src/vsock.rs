//! Host side of "hybrid vsock": a Unix socket per VM where a host-initiated
//! stream starts with `CONNECT <port>\n` and is answered `OK <n>\n`.
//! Firecracker speaks this natively; under QEMU the vsock backend process
//! does, so the rest of the host has one code path for both hypervisors.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Why a vsock stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The Unix socket is missing or refused the connection.
    #[error("cannot reach the VM's vsock socket {path}: {source} (is the VM running?)")]
    Socket {
        /// Socket path.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Nothing listens on that port in the guest (the device closed the stream).
    #[error("the guest has no listener on vsock port {0} yet (the guest agent is not up)")]
    Refused(u32),
    /// The handshake answer was not `OK …`.
    #[error("unexpected vsock handshake answer {0:?}")]
    Handshake(String),
    /// The handshake took too long.
    #[error("vsock handshake to port {0} timed out")]
    Timeout(u32),
}

/// Open a stream to `port` in the guest behind the hybrid vsock socket `path`.
pub async fn connect(path: &Path, port: u32, timeout: Duration) -> Result<UnixStream, VsockError> {
    match tokio::time::timeout(timeout, connect_inner(path, port)).await {
        Ok(r) => r,
        Err(_) => Err(VsockError::Timeout(port)),
    }
}

async fn connect_inner(path: &Path, port: u32) -> Result<UnixStream, VsockError> {
    let mut s = UnixStream::connect(path)
        .await
        .map_err(|source| VsockError::Socket {
            path: path.display().to_string(),
            source,
        })?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|_| VsockError::Refused(port))?;
    // Read byte by byte: anything after the newline already belongs to the
    // guest's stream and must stay in the socket.
    let mut line = Vec::with_capacity(16);
    loop {
        let mut b = [0u8; 1];
        match s.read(&mut b).await {
            Ok(0) | Err(_) => return Err(VsockError::Refused(port)),
            Ok(_) => {}
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > 64 {
            return Err(VsockError::Handshake(
                String::from_utf8_lossy(&line).into_owned(),
            ));
        }
    }
    let text = String::from_utf8_lossy(&line);
    if text.starts_with("OK ") {
        Ok(s)
    } else {
        Err(VsockError::Handshake(text.into_owned()))
    }
}
