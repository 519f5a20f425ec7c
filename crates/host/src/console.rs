//! Receives a QEMU VM's serial console and writes it to `console.log`.
//!
//! QEMU does not write the file itself: a file chardev would grow as fast
//! as the guest prints, without bound. Instead QEMU connects its serial
//! port's chardev to `<vmdir>/console.sock`, served here, and the host
//! appends what arrives to a [`CappedLog`] (rotated at `--log-max-bytes`).
//! QEMU reconnects every second (`reconnect-ms`), so a restarted host agent
//! picks the console up again; while nobody listens QEMU discards it. A
//! slow reader slows the guest's UART, never the host.

use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::logfile::{append, open_shared, SharedLog};
use crate::metrics::LogName;

/// Listen on `socket` (mode 0600) and append each connection's bytes to
/// `log`, until the returned task is aborted. The receiver says whether a
/// console is connected now: after killing the hypervisor, wait for it to
/// turn `false` so the console's last bytes are written before the task is
/// aborted and the log archived.
pub fn start(
    socket: &Path,
    log: PathBuf,
    max: u64,
) -> std::io::Result<(JoinHandle<()>, watch::Receiver<bool>)> {
    let log = open_shared(log, LogName::Console, max)?;
    let listener = crate::private::bind_tokio(socket)?;
    let (tx, rx) = watch::channel(false);
    Ok((tokio::spawn(serve(listener, log, tx)), rx))
}

async fn serve(listener: UnixListener, log: SharedLog, connected: watch::Sender<bool>) {
    // One chardev connects; a second connection (a reconnect racing the old
    // one's end) is served after the first ends.
    while let Ok((mut conn, _)) = listener.accept().await {
        connected.send_replace(true);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if append(&log, &buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        connected.send_replace(false);
    }
}
