//! Receives a VM's log stream: guest-initiated vsock connections to
//! [`LOG_PORT`] (`<vmdir>/vsock.sock_1025`) carrying [`LogRecord`] JSON
//! lines, appended as text to `agent.log`, where they outlive the VM.
//!
//! Whoever is root in the VM writes this stream, so it is bounded: at most
//! [`MAX_LOG_CONNECTIONS`] connections are served at once (further ones are
//! closed as they arrive), and a line longer than [`MAX_LOG_LINE`] closes
//! its connection (the agent reconnects and resends from its queue). Both
//! are counted in [`crate::metrics::GUEST_LOG`]. `agent.log` itself is a
//! [`CappedLog`]: it rotates at the host's `--log-max-bytes`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use polydev_api::agent::{LogRecord, LOG_PORT, MAX_LOG_CONNECTIONS, MAX_LOG_LINE};
use tokio::io::BufReader;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tracing::warn;

use crate::logfile::{append, open_shared, SharedLog};
use crate::metrics::{LogName, GUEST_LOG};
use crate::vsock::{read_line_capped, Capped};

/// Listen on `socket` (replacing a stale one; mode 0600) and append what
/// VM `vm` sends to `log` (capped at `max` bytes per file), until the
/// returned task is aborted; aborting it also ends every connection it
/// serves.
pub fn start(vm: &str, socket: &Path, log: PathBuf, max: u64) -> std::io::Result<JoinHandle<()>> {
    let log = open_shared(log, LogName::Agent, max)?;
    let listener = crate::private::bind_tokio(socket)?;
    Ok(tokio::spawn(serve(vm.to_string(), listener, log)))
}

async fn serve(vm: String, listener: UnixListener, log: SharedLog) {
    let slots = Arc::new(Semaphore::new(MAX_LOG_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            // Reap finished connections so the set stays small.
            Some(_) = conns.join_next() => continue,
        };
        let Ok((conn, _)) = accepted else {
            break;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            GUEST_LOG.connection_refused();
            warn!(%vm, max = MAX_LOG_CONNECTIONS, "closed a log stream connection over the limit");
            drop(conn);
            continue;
        };
        let log = log.clone();
        let vm = vm.clone();
        conns.spawn(async move {
            receive(&vm, conn, &log).await;
            drop(permit);
        });
    }
}

/// Append one connection's records to `log` until it ends, fails or sends
/// a line that is too long.
async fn receive(vm: &str, conn: UnixStream, log: &SharedLog) {
    let mut reader = BufReader::new(conn);
    let mut line = Vec::new();
    loop {
        let last = match read_line_capped(&mut reader, &mut line, MAX_LOG_LINE).await {
            Ok(Capped::Complete) => false,
            Ok(Capped::Eof) if !line.is_empty() => true,
            Ok(Capped::Eof) | Err(_) => return,
            Ok(Capped::TooLong) => {
                GUEST_LOG.line_dropped();
                warn!(%vm, port = LOG_PORT, max = MAX_LOG_LINE, "closed a log stream connection that sent an over-long line");
                let note = format!(
                    "[dropped] a log line longer than {MAX_LOG_LINE} bytes; the host closed that log connection\n"
                );
                let _ = append(log, note.as_bytes());
                return;
            }
        };
        if append(log, render(&line).as_bytes()).is_err() || last {
            return;
        }
    }
}

/// One `agent.log` line for a received line.
fn render(line: &[u8]) -> String {
    match serde_json::from_slice::<LogRecord>(line) {
        Ok(r) => format!("{} [{}/{}] {}\n", r.ts_ms, r.source, r.stream, r.line),
        Err(_) => format!("[unparsed] {}\n", String::from_utf8_lossy(line)),
    }
}
