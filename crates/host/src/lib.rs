//! The host agent: creates, tracks and destroys microVMs on one machine.
//!
//! Data flows one way: [`server`] (HTTP over a Unix socket) → [`manager`]
//! (VM lifecycle and on-disk records) → [`hypervisor`] drivers (QEMU,
//! Firecracker) → processes and sockets. [`agent_client`] talks to the guest
//! agent over the hybrid vsock socket that both hypervisors expose.

pub mod agent_client;
pub mod cgroup;
pub mod client;
pub mod config;
pub mod console;
pub mod egress;
pub mod guest_log;
pub mod hypervisor;
pub mod logfile;
pub mod manager;
pub mod metrics;
pub mod private;
pub mod process;
pub mod server;
pub mod vmdir;
pub mod vsock;

pub use config::HostConfig;
pub use manager::Manager;

/// Milliseconds since the Unix epoch, for records and logs.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A fresh random id with the given prefix (`vm-` + 12 hex digits).
pub fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 6];
    if getrandom::fill(&mut b).is_err() {
        // The clock is a poor but workable fallback; ids are also checked for
        // collisions when their directory is created.
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b.copy_from_slice(&n.to_le_bytes()[..6]);
    }
    format!("{prefix}{}", hex::encode(b))
}
