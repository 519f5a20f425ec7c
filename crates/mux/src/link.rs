//! The byte stream a mux session runs over, and where new ones come from.
//!
//! A [`Link`] is one connection of the underlying reliable byte stream: a
//! reader, a writer, and a way to unblock both. A [`LinkSource`] hands out a
//! new link whenever the previous one broke: the guest's virtio-serial port
//! after the host reconnects ([`VirtioPortSource`]), QEMU's chardev socket
//! after a reconnect (the bridge), or anything a test wants.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use crate::error::MuxError;
use crate::sys::poll_one;

/// How often blocked port reads and writes look at their close flag; the
/// only way to interrupt them, since closing a char device does not wake a
/// thread blocked on it.
const PORT_POLL: Duration = Duration::from_millis(200);

/// One connection of the underlying byte stream.
///
/// The reader returning `Ok(0)` or an error, or the writer returning an
/// error, ends the link; the session on it is then over.
pub struct Link {
    pub(crate) reader: Box<dyn Read + Send>,
    pub(crate) writer: Box<dyn Write + Send>,
    pub(crate) closer: Arc<dyn Fn() + Send + Sync>,
}

impl Link {
    /// A link from its parts. `close` must make blocked `read`/`write` calls
    /// on the reader and writer return soon (e.g. `shutdown(2)` a socket).
    pub fn new<R, W, C>(reader: R, writer: W, close: C) -> Self
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
        C: Fn() + Send + Sync + 'static,
    {
        Self {
            reader: Box::new(reader),
            writer: Box::new(writer),
            closer: Arc::new(close),
        }
    }

    /// A link over a connected Unix stream socket (QEMU's chardev socket on
    /// the host; a socketpair in tests).
    pub fn unix(stream: UnixStream) -> io::Result<Self> {
        let reader = stream.try_clone()?;
        let closer = stream.try_clone()?;
        Ok(Self::new(reader, stream, move || {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        }))
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Link")
    }
}

/// A stop request shared between an endpoint and its link source, so that a
/// source waiting for the peer can give up promptly on shutdown.
#[derive(Clone, Default)]
pub struct StopSignal {
    inner: Arc<(Mutex<bool>, Condvar)>,
}

impl std::fmt::Debug for StopSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopSignal")
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

impl StopSignal {
    /// A signal that has not fired.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fires the signal; every current and future [`sleep`](Self::sleep) returns at once.
    pub fn stop(&self) {
        let (m, cv) = &*self.inner;
        *m.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cv.notify_all();
    }

    /// Whether the signal has fired.
    pub fn is_stopped(&self) -> bool {
        *self.inner.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sleeps for `d` or until the signal fires. Returns `true` if it fired.
    pub fn sleep(&self, d: Duration) -> bool {
        let (m, cv) = &*self.inner;
        let guard = m.lock().unwrap_or_else(PoisonError::into_inner);
        let (guard, _) = cv
            .wait_timeout_while(guard, d, |stopped| !*stopped)
            .unwrap_or_else(PoisonError::into_inner);
        *guard
    }
}

/// Where an endpoint gets its links.
pub trait LinkSource: Send + 'static {
    /// Blocks until a link is available. `Ok(None)` means no link will ever
    /// come again (the VM is gone, or `stop` fired): the endpoint then shuts
    /// down. Implementations must watch `stop` while they wait.
    fn next_link(&mut self, stop: &StopSignal) -> Result<Option<Link>, MuxError>;
}

impl<F> LinkSource for F
where
    F: FnMut(&StopSignal) -> Result<Option<Link>, MuxError> + Send + 'static,
{
    fn next_link(&mut self, stop: &StopSignal) -> Result<Option<Link>, MuxError> {
        self(stop)
    }
}

/// The guest side of the virtio-serial port (`/dev/vportNpM`).
///
/// The port stays open for the life of the source (the kernel allows one
/// opener at a time). While the host side is disconnected the kernel reports
/// `POLLHUP` and reads return 0; the source then waits until the host is back
/// and hands out a fresh link over the same descriptor.
#[derive(Debug)]
pub struct VirtioPortSource {
    file: Arc<File>,
    path: PathBuf,
}

impl VirtioPortSource {
    /// Opens the port device non-blocking.
    pub fn open(path: &Path) -> Result<Self, MuxError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| MuxError::OpenPort {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            file: Arc::new(file),
            path: path.to_owned(),
        })
    }

    /// The device path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl LinkSource for VirtioPortSource {
    fn next_link(&mut self, stop: &StopSignal) -> Result<Option<Link>, MuxError> {
        let fd = self.file.as_raw_fd();
        loop {
            if stop.is_stopped() {
                return Ok(None);
            }
            let rev = poll_one(fd, libc::POLLIN | libc::POLLOUT, Duration::ZERO)
                .map_err(|e| MuxError::io("polling the virtio-serial port", e))?;
            if rev & libc::POLLNVAL != 0 {
                return Err(MuxError::io(
                    "polling the virtio-serial port",
                    io::Error::from_raw_os_error(libc::EBADF),
                ));
            }
            if rev & libc::POLLHUP == 0 {
                let closed = Arc::new(AtomicBool::new(false));
                let reader = PortIo {
                    file: self.file.clone(),
                    closed: closed.clone(),
                };
                let writer = PortIo {
                    file: self.file.clone(),
                    closed: closed.clone(),
                };
                return Ok(Some(Link::new(reader, writer, move || {
                    closed.store(true, Ordering::SeqCst)
                })));
            }
            // The host is not connected: the kernel gives no wake-up when it
            // comes back other than POLLHUP clearing, so look again shortly.
            stop.sleep(Duration::from_millis(100));
        }
    }
}

struct PortIo {
    file: Arc<File>,
    closed: Arc<AtomicBool>,
}

impl Read for PortIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(io::ErrorKind::ConnectionAborted.into());
            }
            let rev = poll_one(self.file.as_raw_fd(), libc::POLLIN, PORT_POLL)?;
            if rev & libc::POLLIN != 0 {
                match (&*self.file).read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            if rev & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                // Host side closed and nothing left to read.
                return Ok(0);
            }
        }
    }
}

impl Write for PortIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(io::ErrorKind::ConnectionAborted.into());
            }
            match (&*self.file).write(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let rev = poll_one(self.file.as_raw_fd(), libc::POLLOUT, PORT_POLL)?;
                    // The kernel blocks writers while the host is away and
                    // flags it with POLLHUP; that ends this link.
                    if rev & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "host side of the virtio-serial port closed",
                        ));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Finds the character device of the virtio-serial port called `name`
/// (QEMU's `virtserialport,name=…`), e.g. `/dev/vport0p1`. Works without
/// udev, which a guest agent running as PID 1 does not have.
pub fn find_virtio_port(name: &str) -> Result<PathBuf, MuxError> {
    let not_found = || MuxError::PortNotFound {
        name: name.to_owned(),
    };
    let dir = std::fs::read_dir("/sys/class/virtio-ports").map_err(|_| not_found())?;
    for entry in dir.flatten() {
        let Ok(port_name) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if port_name.trim_end_matches('\n') == name {
            let dev = Path::new("/dev").join(entry.file_name());
            return Ok(dev);
        }
    }
    Err(not_found())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_signal_wakes_sleepers() {
        let s = StopSignal::new();
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.sleep(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));
        s.stop();
        assert!(matches!(t.join(), Ok(true)));
        assert!(s.sleep(Duration::from_secs(30)));
    }

    #[test]
    fn unknown_port_name_is_reported() {
        let e = find_virtio_port("polydev.no-such-port");
        assert!(matches!(e, Err(MuxError::PortNotFound { .. })));
    }
}
