//! Receives a QEMU VM's serial console and writes it to `console.log`.
//!
//! QEMU does not write the file itself: a file chardev would grow as fast
//! as the guest prints, without bound. Instead QEMU serves its serial
//! port's chardev on `<vmdir>/console.sock` (created while QEMU is still
//! root, before it switches to the VM's own user, in a directory only root
//! can enter), and the host connects to it and appends what arrives to a
//! [`CappedLog`](crate::logfile) (rotated at `--log-max-bytes`). QEMU waits
//! for that first connection before it runs the guest, so no boot line is
//! lost; a restarted host agent connects again. While nobody is connected
//! QEMU discards the output. A slow reader slows the guest's UART, never
//! the host.
//!
//! Firecracker's console is its stdout, which [`start_fifo`] makes a FIFO
//! the host reads from: Firecracker holds it open for reading and writing
//! and non-blocking, so when the host is not reading (restarting) the
//! pipe's 64 KiB fill and the rest is dropped, never blocking the guest nor
//! killing Firecracker with SIGPIPE.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::logfile::{append, open_shared, SharedLog};
use crate::metrics::LogName;

/// How often to try QEMU's socket while it is not there yet (QEMU is
/// starting and waits for us) or refuses (QEMU is gone).
const RETRY: Duration = Duration::from_millis(20);

/// Connect to QEMU's console socket (retrying until it answers) and append
/// each connection's bytes to `log`, until the returned task is aborted.
/// The receiver says whether a console is connected now: after killing the
/// hypervisor, wait for it to turn `false` so the console's last bytes are
/// written before the task is aborted and the log archived.
pub fn start(
    socket: PathBuf,
    log: PathBuf,
    max: u64,
) -> std::io::Result<(JoinHandle<()>, watch::Receiver<bool>)> {
    let log = open_shared(log, LogName::Console, max)?;
    let (tx, rx) = watch::channel(false);
    Ok((tokio::spawn(serve(socket, log, tx)), rx))
}

async fn serve(socket: PathBuf, log: SharedLog, connected: watch::Sender<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let Ok(mut conn) = UnixStream::connect(&socket).await else {
            tokio::time::sleep(RETRY).await;
            continue;
        };
        connected.send_replace(true);
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
        // QEMU serves one connection at a time and ends ours only when it
        // exits: there is nothing to reconnect to soon.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Create the FIFO at `fifo` (0600) unless it exists, open its reading
/// end now (so that [`open_fifo_writer`] finds a reader) and append what
/// arrives to `log` until the returned task is aborted. The receiver says
/// whether a writer may still be there: it turns `false` once every writer
/// has closed and all they wrote is in the log.
pub fn start_fifo(
    fifo: &Path,
    log: PathBuf,
    max: u64,
) -> std::io::Result<(JoinHandle<()>, watch::Receiver<bool>)> {
    make_fifo(fifo)?;
    let reader = tokio::net::unix::pipe::OpenOptions::new().open_receiver(fifo)?;
    let log = open_shared(log, LogName::Console, max)?;
    let (tx, rx) = watch::channel(true);
    Ok((tokio::spawn(drain(reader, log, tx)), rx))
}

/// The console's writing end for Firecracker's stdout and stderr: read
/// and write (the pipe never lacks a reader, so a write never fails with
/// EPIPE) and non-blocking (a full pipe drops output instead of stalling
/// the guest). Creates the FIFO if nobody has.
pub fn open_fifo_writer(fifo: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    make_fifo(fifo)?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(fifo)
}

fn make_fifo(fifo: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(fifo) {
        Ok(m) if m.file_type().is_fifo() => return Ok(()),
        Ok(_) => std::fs::remove_file(fifo)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: mkfifo(3) with a NUL-terminated path we own.
    if unsafe { libc::mkfifo(c.as_ptr(), crate::private::FILE_MODE) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    crate::private::set_mode(fifo, crate::private::FILE_MODE)
}

async fn drain(
    mut reader: tokio::net::unix::pipe::Receiver,
    log: SharedLog,
    connected: watch::Sender<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) => {
                // No writer now: Firecracker has exited, or not started
                // yet. A later writer (a start after a power-off) is read
                // through this same end.
                connected.send_replace(false);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok(n) => {
                connected.send_replace(true);
                if append(&log, &buf[..n]).is_err() {
                    return;
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn a_flooding_console_fifo_stays_under_the_cap() {
        let d = tempfile::tempdir().unwrap();
        let (fifo, log) = (d.path().join("console.fifo"), d.path().join("console.log"));
        let cap = 16 * 1024;
        let (task, mut connected) = start_fifo(&fifo, log.clone(), cap).unwrap();
        // A writer that prints 1 MiB as fast as it can, as a guest's UART.
        let out = open_fifo_writer(&fifo).unwrap();
        let status = tokio::process::Command::new("sh")
            .args([
                "-c",
                "yes 'console flood console flood' | head -c 1048576 2>/dev/null || true",
            ])
            .stdout(out)
            .status()
            .await
            .unwrap();
        assert!(status.success());
        tokio::time::timeout(Duration::from_secs(10), connected.wait_for(|up| !up))
            .await
            .expect("the reader sees the writer go")
            .unwrap();
        task.abort();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("console flood"), "{text}");
        // More than the cap arrived (at least a pipe's 64 KiB): rotated.
        assert!(crate::logfile::rotated(&log).exists());
        for f in [log.clone(), crate::logfile::rotated(&log)] {
            let len = std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
            assert!(len <= cap, "{} is {len} bytes, over {cap}", f.display());
        }
    }

    #[test]
    fn with_nobody_reading_the_writer_drops_instead_of_blocking_or_failing() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("console.fifo");
        // No reader at all (the host agent is restarting).
        let mut out = open_fifo_writer(&fifo).unwrap();
        let chunk = [b'x'; 4096];
        let (mut written, mut full) = (0usize, 0usize);
        for _ in 0..256 {
            match out.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => full += 1,
                Err(e) => panic!("a write failed with {e} instead of being dropped"),
            }
        }
        // The pipe's buffer took what fits; the rest was refused at once.
        assert!(written > 0 && written < 256 * 4096, "{written}");
        assert!(full > 0);
        let mode = std::fs::metadata(&fifo).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
    }
}
