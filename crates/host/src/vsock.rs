//! Host side of "hybrid vsock": a Unix socket per VM where a host-initiated
//! stream starts with `CONNECT <port>\n` and is answered `OK <n>\n`.
//! Firecracker speaks this natively; under QEMU the vsock backend process
//! does, so the rest of the host has one code path for both hypervisors.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
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

/// What [`read_line_capped`] left in its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Capped {
    /// A whole line, without its newline.
    Complete,
    /// The stream ended; the buffer holds what came after the last newline
    /// (possibly nothing).
    Eof,
    /// The line is longer than the cap; the buffer holds part of it and the
    /// rest is unread. The stream is out of step and should be closed.
    TooLong,
}

/// Read one `\n`-terminated line of at most `max` bytes into `buf`
/// (cleared first). Neither `buf`'s length nor its capacity ever exceeds
/// `max`, so a peer that never sends a newline costs at most `max` bytes.
pub(crate) async fn read_line_capped<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Capped> {
    buf.clear();
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok(Capped::Eof);
        }
        let (take, used, done) = match avail.iter().position(|b| *b == b'\n') {
            Some(pos) => (pos, pos + 1, true),
            None => (avail.len(), avail.len(), false),
        };
        let want = buf.len() + take;
        if want > max {
            return Ok(Capped::TooLong);
        }
        if want > buf.capacity() {
            // Vec's own growth doubles, which would overshoot the cap.
            let target = buf.capacity().saturating_mul(2).clamp(want, max);
            buf.reserve_exact(target - buf.len());
        }
        buf.extend_from_slice(&avail[..take]);
        r.consume(used);
        if done {
            return Ok(Capped::Complete);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    #[tokio::test]
    async fn capped_lines_split_and_end() {
        let mut r = BufReader::with_capacity(3, &b"ab\ncdef\n\ngh"[..]);
        let mut buf = Vec::new();
        let mut got = Vec::new();
        loop {
            let c = read_line_capped(&mut r, &mut buf, 4).await.unwrap();
            got.push((c, String::from_utf8_lossy(&buf).into_owned()));
            if c == Capped::Eof {
                break;
            }
        }
        let want = [
            (Capped::Complete, "ab"),
            (Capped::Complete, "cdef"),
            (Capped::Complete, ""),
            (Capped::Eof, "gh"),
        ];
        let want: Vec<_> = want.iter().map(|(c, s)| (*c, s.to_string())).collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_line_over_the_cap_stops_reading_at_the_cap() {
        let data = vec![b'x'; 1 << 20];
        let mut r = BufReader::with_capacity(1000, &data[..]);
        let mut buf = Vec::new();
        let max = 10_000;
        let c = read_line_capped(&mut r, &mut buf, max).await.unwrap();
        assert_eq!(c, Capped::TooLong);
        assert!(
            buf.len() <= max && buf.capacity() <= max,
            "{}",
            buf.capacity()
        );
        // The reader was not drained: the rest of the megabyte is unread.
        assert!(r.into_inner().len() > data.len() - 2 * max);
        // A line of exactly the cap is fine.
        let mut exact = vec![b'y'; max];
        exact.push(b'\n');
        let mut r = BufReader::with_capacity(999, &exact[..]);
        let c = read_line_capped(&mut r, &mut buf, max).await.unwrap();
        assert_eq!((c, buf.len()), (Capped::Complete, max));
        assert!(buf.capacity() <= max);
    }
}
