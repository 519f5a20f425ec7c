//! Streams to the host and inside the guest, one type for all of them so the
//! rest of the agent does not care: AF_VSOCK (Firecracker, vhost-user-vsock),
//! the `polydev-mux` multiplexer over a virtio-serial port (QEMU VMs, whose
//! vhost-user-vsock device cannot be snapshotted), Unix and TCP sockets.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use polydev_mux::{MuxEndpoint, MuxListener, MuxStream};

/// The guest's mux endpoint, when the VM talks to the host over the
/// virtio-serial mux instead of AF_VSOCK.
static MUX: OnceLock<MuxEndpoint> = OnceLock::new();

/// Start the mux endpoint on the virtio-serial port `device`; afterwards
/// [`Addr::Mux`] addresses work.
pub fn start_mux(device: &std::path::Path) -> Result<(), NetError> {
    let ep = MuxEndpoint::guest(device).map_err(|e| NetError::Mux {
        device: device.display().to_string(),
        source: e,
    })?;
    let _ = MUX.set(ep);
    Ok(())
}

fn mux() -> io::Result<&'static MuxEndpoint> {
    MUX.get().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotConnected,
            "the mux endpoint is not running (no polydev.mux virtio-serial port)",
        )
    })
}

/// Errors of socket setup.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The address given on the command line is not understood.
    #[error(
        "bad socket address `{0}`: use `unix:/absolute/path`, `vsock:PORT` (listen) or `vsock:CID:PORT`"
    )]
    BadAddress(String),
    /// Creating, binding or listening failed.
    #[error("cannot listen on {addr}: {source}; for vsock check that the vsock modules are loaded and the VM has a vsock device, for Unix remove a stale socket file")]
    Listen {
        /// The address.
        addr: Addr,
        /// The OS error.
        source: io::Error,
    },
    /// The mux endpoint could not start.
    #[error("cannot start the mux on {device}: {source}; check that virtio_console is in /etc/polydev/modules")]
    Mux {
        /// The port device.
        device: String,
        /// Why.
        source: polydev_mux::MuxError,
    },
    /// Connecting failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address.
        addr: Addr,
        /// The OS error.
        source: io::Error,
    },
}

/// A stream socket address: a Unix socket path or a vsock (cid, port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// Unix stream socket at this path.
    Unix(PathBuf),
    /// Vsock address; `cid` is `VMADDR_CID_ANY` when listening.
    Vsock {
        /// Context id.
        cid: u32,
        /// Port.
        port: u32,
    },
    /// A port on the host through the mux (see [`start_mux`]).
    Mux {
        /// Port.
        port: u32,
    },
}

impl FromStr for Addr {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetError::BadAddress(s.to_string());
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(Addr::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("vsock:") {
            return match rest.split_once(':') {
                Some((cid, port)) => Ok(Addr::Vsock {
                    cid: cid.parse().map_err(|_| bad())?,
                    port: port.parse().map_err(|_| bad())?,
                }),
                None => Ok(Addr::Vsock {
                    cid: libc::VMADDR_CID_ANY,
                    port: rest.parse().map_err(|_| bad())?,
                }),
            };
        }
        Err(bad())
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Vsock { cid, port } if *cid == libc::VMADDR_CID_ANY => write!(f, "vsock:{port}"),
            Addr::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Addr::Mux { port } => write!(f, "mux:{port}"),
        }
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    sa.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    sa.svm_cid = cid;
    sa.svm_port = port;
    sa
}

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned fd is owned by us alone.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just created and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[derive(Debug)]
enum Conn {
    Fd(OwnedFd),
    Mux(MuxStream),
}

/// A connected stream (vsock, mux, Unix or TCP).
#[derive(Debug)]
pub struct Stream {
    conn: Conn,
}

impl Stream {
    /// Connect to `addr`.
    pub fn connect(addr: &Addr) -> Result<Stream, NetError> {
        let err = |source| NetError::Connect {
            addr: addr.clone(),
            source,
        };
        match addr {
            Addr::Unix(p) => Ok(Stream::from(UnixStream::connect(p).map_err(err)?)),
            Addr::Mux { port } => {
                let m = mux().map_err(err)?;
                let s = m.connect(*port).map_err(|e| err(io::Error::other(e)))?;
                Ok(Stream { conn: Conn::Mux(s) })
            }
            Addr::Vsock { cid, port } => {
                let fd = vsock_socket().map_err(err)?;
                let sa = vsock_addr(*cid, *port);
                // SAFETY: sa is a valid sockaddr_vm of the size we pass.
                let r = unsafe {
                    libc::connect(
                        fd.as_raw_fd(),
                        (&sa as *const libc::sockaddr_vm).cast(),
                        std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                    )
                };
                cvt(r).map_err(err)?;
                Ok(Stream { conn: Conn::Fd(fd) })
            }
        }
    }

    /// A second handle to the same stream, for a thread reading while
    /// another writes.
    pub fn try_clone(&self) -> io::Result<Stream> {
        let conn = match &self.conn {
            Conn::Fd(fd) => Conn::Fd(fd.try_clone()?),
            Conn::Mux(m) => Conn::Mux(m.try_clone()?),
        };
        Ok(Stream { conn })
    }

    /// Shut down one or both directions. On a socket this also wakes
    /// threads blocked on it through other handles; a mux stream can only
    /// half-close (its read side ends when the peer closes).
    pub fn shutdown(&self, how: std::net::Shutdown) {
        match &self.conn {
            Conn::Fd(fd) => {
                let how = match how {
                    std::net::Shutdown::Read => libc::SHUT_RD,
                    std::net::Shutdown::Write => libc::SHUT_WR,
                    std::net::Shutdown::Both => libc::SHUT_RDWR,
                };
                // SAFETY: plain syscall on a fd we own. Failure (already
                // closed by the peer) needs no handling.
                unsafe { libc::shutdown(fd.as_raw_fd(), how) };
            }
            Conn::Mux(m) => {
                if how != std::net::Shutdown::Read {
                    let _ = m.shutdown_write();
                }
            }
        }
    }

    /// Set (or clear, with `None`) a timeout on blocking reads; a read that
    /// times out fails with `WouldBlock`.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        let fd = match &self.conn {
            Conn::Mux(m) => return m.set_read_timeout(t),
            Conn::Fd(fd) => fd.as_raw_fd(),
        };
        let tv = match t {
            Some(t) => libc::timeval {
                tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_usec: libc::suseconds_t::from(t.subsec_micros() as i32),
            },
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
        };
        // SAFETY: tv is a valid timeval of the size we pass.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        cvt(r).map(|_| ())
    }
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Self {
        Stream {
            conn: Conn::Fd(s.into()),
        }
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Stream {
            conn: Conn::Fd(s.into()),
        }
    }
}

fn fd_read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for buf.len() bytes of writes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn fd_send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // MSG_NOSIGNAL: a vanished peer must be an error, never SIGPIPE.
        // SAFETY: buf is valid for buf.len() bytes of reads.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.conn {
            Conn::Fd(fd) => fd_read(fd.as_raw_fd(), buf),
            Conn::Mux(m) => {
                let mut m: &MuxStream = m;
                m.read(buf)
            }
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.conn {
            Conn::Fd(fd) => fd_send(fd.as_raw_fd(), buf),
            Conn::Mux(m) => {
                let mut m: &MuxStream = m;
                m.write(buf)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening stream socket (or mux port).
#[derive(Debug)]
pub enum Listener {
    /// A listening socket.
    Fd(OwnedFd),
    /// A mux port.
    Mux(MuxListener),
}

impl Listener {
    /// Bind and listen on `addr`.
    pub fn bind(addr: &Addr) -> Result<Listener, NetError> {
        let err = |source| NetError::Listen {
            addr: addr.clone(),
            source,
        };
        match addr {
            Addr::Unix(p) => Ok(Listener::Fd(UnixListener::bind(p).map_err(err)?.into())),
            Addr::Mux { port } => {
                let m = mux().map_err(err)?;
                let l = m.listen(*port).map_err(|e| err(io::Error::other(e)))?;
                Ok(Listener::Mux(l))
            }
            Addr::Vsock { cid, port } => {
                let fd = vsock_socket().map_err(err)?;
                let sa = vsock_addr(*cid, *port);
                // SAFETY: sa is a valid sockaddr_vm of the size we pass.
                let r = unsafe {
                    libc::bind(
                        fd.as_raw_fd(),
                        (&sa as *const libc::sockaddr_vm).cast(),
                        std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                    )
                };
                cvt(r).map_err(err)?;
                // SAFETY: plain syscall on our fd.
                cvt(unsafe { libc::listen(fd.as_raw_fd(), 128) }).map_err(err)?;
                Ok(Listener::Fd(fd))
            }
        }
    }

    /// Wait for the next connection.
    pub fn accept(&self) -> io::Result<Stream> {
        let lfd = match self {
            Listener::Mux(l) => {
                let s = l.accept().map_err(io::Error::other)?;
                return Ok(Stream { conn: Conn::Mux(s) });
            }
            Listener::Fd(fd) => fd.as_raw_fd(),
        };
        loop {
            // SAFETY: null address pointers are allowed by accept4.
            let fd = unsafe {
                libc::accept4(
                    lfd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: accept4 returned a fresh fd that only we own.
                return Ok(Stream {
                    conn: Conn::Fd(unsafe { OwnedFd::from_raw_fd(fd) }),
                });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "unix:/tmp/a.sock".parse::<Addr>().ok(),
            Some(Addr::Unix("/tmp/a.sock".into()))
        );
        assert_eq!(
            "vsock:1024".parse::<Addr>().ok(),
            Some(Addr::Vsock {
                cid: libc::VMADDR_CID_ANY,
                port: 1024
            })
        );
        assert_eq!(
            "vsock:2:1025".parse::<Addr>().ok(),
            Some(Addr::Vsock { cid: 2, port: 1025 })
        );
        assert!("tcp:1".parse::<Addr>().is_err());
        assert!("unix:".parse::<Addr>().is_err());
        assert!("vsock:x".parse::<Addr>().is_err());
        assert_eq!(
            Addr::Vsock { cid: 2, port: 1025 }.to_string(),
            "vsock:2:1025"
        );
    }
}
