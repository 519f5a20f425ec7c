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
    let line = match read_line_unbuffered(&mut s, 64).await {
        Ok(Line::Complete(line)) => line,
        Ok(Line::TooLong(line)) => {
            return Err(VsockError::Handshake(
                String::from_utf8_lossy(&line).into_owned(),
            ))
        }
        Ok(Line::Eof(_)) | Err(_) => return Err(VsockError::Refused(port)),
    };
    let text = String::from_utf8_lossy(&line);
    if text.starts_with("OK ") {
        Ok(s)
    } else {
        Err(VsockError::Handshake(text.into_owned()))
    }
}

/// What [`read_line_unbuffered`] read.
pub(crate) enum Line {
    /// A whole line, without its newline.
    Complete(Vec<u8>),
    /// The stream ended before a newline; what came before it.
    Eof(Vec<u8>),
    /// More than the allowed bytes without a newline; what was read.
    TooLong(Vec<u8>),
}

/// Read one `\n`-terminated line byte by byte: anything after the newline
/// already belongs to the stream's payload and must stay in the socket.
pub(crate) async fn read_line_unbuffered(s: &mut UnixStream, max: usize) -> std::io::Result<Line> {
    let mut line = Vec::with_capacity(16);
    loop {
        let mut b = [0u8; 1];
        if s.read(&mut b).await? == 0 {
            return Ok(Line::Eof(line));
        }
        if b[0] == b'\n' {
            return Ok(Line::Complete(line));
        }
        line.push(b[0]);
        if line.len() > max {
            return Ok(Line::TooLong(line));
        }
    }
}
