//! Errors of the multiplexer, its endpoints and the host bridge.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong outside of stream reads and writes (which
/// return [`std::io::Error`] like any socket; a `MuxError` converts into one
/// with a fitting [`io::ErrorKind`]).
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    /// The virtio-serial port device could not be opened.
    #[error(
        "cannot open virtio-serial port {path}: {source} (QEMU needs \
         `-device virtio-serial-device -device virtserialport,name=polydev.mux`, \
         the guest needs the virtio_console module, and only one process may hold the port open)"
    )]
    OpenPort {
        /// Device path that was tried.
        path: PathBuf,
        /// Why opening failed.
        source: io::Error,
    },

    /// No virtio-serial port carries the requested name.
    #[error(
        "no virtio-serial port named {name:?} under /sys/class/virtio-ports \
         (is the virtio_console module loaded, and does QEMU have `-device virtserialport,name={name}`?)"
    )]
    PortNotFound {
        /// The port name looked for.
        name: String,
    },

    /// There is no session with the peer right now (the bridge or the guest
    /// is not connected, or they are still resynchronising).
    #[error(
        "no mux session with the peer (the host bridge is not connected to the VM's \
         virtio-serial port, or the guest endpoint is not running); retry later"
    )]
    NotConnected,

    /// Nothing listens on the destination port.
    #[error("port {port} refused the connection: nothing is listening on it")]
    Refused {
        /// Destination port.
        port: u32,
    },

    /// The peer did not answer an OPEN in time.
    #[error("opening a stream to port {port} got no answer within {after:?}")]
    ConnectTimeout {
        /// Destination port.
        port: u32,
        /// How long we waited.
        after: Duration,
    },

    /// The session the stream belonged to ended (link lost, peer restarted,
    /// snapshot restored).
    #[error("the mux session was reset (the link to the peer broke or was restarted)")]
    Reset,

    /// The endpoint was shut down, or its link source gave up for good.
    #[error("the mux endpoint has shut down")]
    Closed,

    /// `listen` on a port that already has a listener.
    #[error("port {port} already has a listener on this endpoint")]
    PortInUse {
        /// The port.
        port: u32,
    },

    /// A PING got no PONG.
    #[error("the peer did not answer a ping within {0:?}")]
    PingTimeout(Duration),

    /// Another bridge serves the hybrid vsock socket path.
    #[error(
        "{path} is served by a running process (it accepts connections); \
         stop the other bridge or pick another path"
    )]
    UdsInUse {
        /// The socket path.
        path: PathBuf,
    },

    /// Something that is not a socket is in the way.
    #[error("{path} exists and is not a Unix socket; refusing to replace it")]
    UdsNotSocket {
        /// The path.
        path: PathBuf,
    },

    /// Binding the hybrid vsock socket failed.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },

    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

impl MuxError {
    pub(crate) fn io(context: &'static str, source: io::Error) -> Self {
        Self::Io { context, source }
    }

    /// The [`io::ErrorKind`] a socket API would report for this condition.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Self::OpenPort { source, .. } | Self::Bind { source, .. } | Self::Io { source, .. } => {
                source.kind()
            }
            Self::PortNotFound { .. } => io::ErrorKind::NotFound,
            Self::NotConnected => io::ErrorKind::NotConnected,
            Self::Refused { .. } => io::ErrorKind::ConnectionRefused,
            Self::ConnectTimeout { .. } | Self::PingTimeout(_) => io::ErrorKind::TimedOut,
            Self::Reset => io::ErrorKind::ConnectionReset,
            Self::Closed => io::ErrorKind::ConnectionAborted,
            Self::PortInUse { .. } | Self::UdsInUse { .. } => io::ErrorKind::AddrInUse,
            Self::UdsNotSocket { .. } => io::ErrorKind::AlreadyExists,
        }
    }
}

impl From<MuxError> for io::Error {
    fn from(e: MuxError) -> Self {
        io::Error::new(e.kind(), e)
    }
}
