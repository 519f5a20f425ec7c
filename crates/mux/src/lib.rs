//! Vsock semantics over one byte stream.
//!
//! QEMU's `vhost-user-vsock` device cannot be migrated, so QEMU VMs that
//! used it could not be snapshotted. Instead, QEMU VMs get a virtio-serial
//! port (`-device virtserialport,name=polydev.mux`, migratable) and this
//! crate carries many streams over it:
//!
//! - [`MuxEndpoint`] is one side of a session. In the guest,
//!   [`MuxEndpoint::guest`] runs over the port device and offers
//!   [`listen`](MuxEndpoint::listen) / [`connect`](MuxEndpoint::connect)
//!   like AF_VSOCK; [`Transport`] puts it and real AF_VSOCK
//!   ([`VsockTransport`]) behind one trait.
//! - [`run_bridge`] is the host side: it connects to QEMU's chardev socket
//!   and serves Firecracker's hybrid vsock Unix socket (`CONNECT <port>\n`
//!   → `OK <n>\n`; guest-initiated streams go to `<uds>_<port>`), so the
//!   rest of the host treats both hypervisors alike.
//!
//! # Protocol
//!
//! Frames ([`frame`]) carry a magic, type, stream id, length and CRC-32C
//! checksums. A session starts with the host sending HELLO(nonce) —
//! repeated until answered — and the guest answering HELLO_ACK(nonce); both
//! sides ignore everything before that, scanning for valid frames. Any new
//! session resets every stream of the previous one (readers get
//! `ConnectionReset`, like vsock after a snapshot restore). A guest without a
//! session (just started, or after damaged input) asks for one with
//! NEED_HELLO. Session-control frames are preceded by a maximum frame's worth
//! of zero bytes, so a receiver stuck in a frame that was cut off (a snapshot
//! taken mid-frame) completes it, rejects it and finds the HELLO.
//!
//! Streams: OPEN(port, window) → OPEN_OK(window) | OPEN_REFUSED; DATA;
//! WINDOW(credit) as the reader consumes; FIN (half-close); RST (gone). The
//! host opens even ids, the guest odd ones. Each stream has its own credit
//! window, so a stalled reader holds back only its own sender and memory per
//! stream is bounded by the window.

#![warn(missing_docs)]

pub mod bridge;
mod crc;
pub mod endpoint;
pub mod error;
pub mod frame;
pub mod link;
mod sys;
pub mod transport;

pub use bridge::{run_bridge, run_bridge_with, BridgeExit, BridgeOptions};
pub use endpoint::{
    EndpointConfig, EndpointStats, MuxEndpoint, MuxListener, MuxStream, Role, PROTOCOL_VERSION,
};
pub use error::MuxError;
pub use link::{find_virtio_port, Link, LinkSource, StopSignal, VirtioPortSource};
pub use transport::{Acceptor, Connection, Transport, VsockListener, VsockStream, VsockTransport};

/// Name of the virtio-serial port the mux runs over (QEMU:
/// `-device virtserialport,chardev=mux,name=polydev.mux`).
pub const PORT_NAME: &str = "polydev.mux";
