//! One shape for "vsock-like" transports, so the guest agent runs the same
//! code over real AF_VSOCK (Firecracker, vhost-user-vsock) and over the mux
//! (QEMU with virtio-serial).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::endpoint::{MuxEndpoint, MuxListener, MuxStream};

/// A connected byte stream.
pub trait Connection: Read + Write + Send {
    /// Half-close: the peer reads EOF; reading continues.
    fn shutdown_write(&self) -> io::Result<()>;
    /// Another handle to the same stream, for a second thread.
    fn try_clone_box(&self) -> io::Result<Box<dyn Connection>>;
    /// Read timeout (`None`: block); timed-out reads fail with `WouldBlock`.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

/// Accepts incoming streams on one port.
pub trait Acceptor: Send + Sync {
    /// Waits for the next stream.
    fn accept(&self) -> io::Result<Box<dyn Connection>>;
}

/// Listens on ports of this side and opens streams to ports of the other.
pub trait Transport: Send + Sync {
    /// Listens on `port` for streams the peer opens.
    fn listen(&self, port: u32) -> io::Result<Box<dyn Acceptor>>;
    /// Opens a stream to the peer's `port`.
    fn connect(&self, port: u32) -> io::Result<Box<dyn Connection>>;
}

impl Connection for MuxStream {
    fn shutdown_write(&self) -> io::Result<()> {
        MuxStream::shutdown_write(self)
    }

    fn try_clone_box(&self) -> io::Result<Box<dyn Connection>> {
        Ok(Box::new(self.try_clone()?))
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        MuxStream::set_read_timeout(self, timeout)
    }
}

impl Acceptor for MuxListener {
    fn accept(&self) -> io::Result<Box<dyn Connection>> {
        Ok(Box::new(MuxListener::accept(self)?))
    }
}

impl Transport for MuxEndpoint {
    fn listen(&self, port: u32) -> io::Result<Box<dyn Acceptor>> {
        Ok(Box::new(MuxEndpoint::listen(self, port)?))
    }

    fn connect(&self, port: u32) -> io::Result<Box<dyn Connection>> {
        Ok(Box::new(MuxEndpoint::connect(self, port)?))
    }
}

/// Real AF_VSOCK sockets. In a guest the peer is the host, CID 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VsockTransport {
    peer_cid: u32,
}

impl VsockTransport {
    /// From a guest to its host (CID 2).
    pub fn to_host() -> Self {
        Self {
            peer_cid: libc::VMADDR_CID_HOST,
        }
    }

    /// To any CID (1 is the local loopback, handy in tests).
    pub fn with_peer_cid(peer_cid: u32) -> Self {
        Self { peer_cid }
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

const VSOCK_ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

impl Transport for VsockTransport {
    fn listen(&self, port: u32) -> io::Result<Box<dyn Acceptor>> {
        let fd = vsock_socket()?;
        let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
        // SAFETY: addr is a valid sockaddr_vm of the given length.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const _ as *const libc::sockaddr,
                VSOCK_ADDR_LEN,
            )
        })?;
        // SAFETY: listen on a bound socket we own.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
        Ok(Box::new(VsockListener { fd }))
    }

    fn connect(&self, port: u32) -> io::Result<Box<dyn Connection>> {
        let fd = vsock_socket()?;
        let addr = vsock_addr(self.peer_cid, port);
        loop {
            // SAFETY: addr is a valid sockaddr_vm of the given length.
            let r = unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    &addr as *const _ as *const libc::sockaddr,
                    VSOCK_ADDR_LEN,
                )
            };
            match cvt(r) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(Box::new(VsockStream { fd }))
    }
}

/// A listening AF_VSOCK socket.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
}

impl Acceptor for VsockListener {
    fn accept(&self) -> io::Result<Box<dyn Connection>> {
        loop {
            // SAFETY: accept4 on our listening socket; peer address not wanted.
            let r = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            match cvt(r) {
                // SAFETY: a fresh descriptor from accept4 that we now own.
                Ok(fd) => {
                    return Ok(Box::new(VsockStream {
                        fd: unsafe { OwnedFd::from_raw_fd(fd) },
                    }))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// A connected AF_VSOCK stream.
#[derive(Debug)]
pub struct VsockStream {
    fd: OwnedFd,
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let r = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for reads of buf.len() bytes; MSG_NOSIGNAL
        // turns a closed peer into EPIPE instead of killing the process.
        let r = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Connection for VsockStream {
    fn shutdown_write(&self) -> io::Result<()> {
        // SAFETY: shutdown on a socket we own.
        cvt(unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) }).map(|_| ())
    }

    fn try_clone_box(&self) -> io::Result<Box<dyn Connection>> {
        Ok(Box::new(VsockStream {
            fd: self.fd.try_clone()?,
        }))
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let tv = match timeout {
            Some(d) if d.is_zero() => {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "zero timeout"));
            }
            Some(d) => libc::timeval {
                tv_sec: d.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
                tv_usec: d.subsec_micros() as libc::suseconds_t,
            },
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
        };
        // SAFETY: tv is a valid timeval of the given size.
        cvt(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })
        .map(|_| ())
    }
}
