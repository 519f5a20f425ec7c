//! VM descriptions exchanged between the CLI/controller and the host agent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::agent::ServiceSpec;

/// What to create. Every field has a default so `{}` is a valid request for
/// the minimal image.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Optional human name (`[a-z0-9-]`, ≤ 63 characters, unique on the host).
    #[serde(default)]
    pub name: Option<String>,
    /// Whole virtual CPUs (default from host configuration).
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Guest memory in MiB (default: the image's default from the recipe,
    /// else the host's; at least the image's minimum).
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Root filesystem image to boot; `None` boots the minimal image (the
    /// initramfs alone, with busybox for commands).
    #[serde(default)]
    pub image: Option<String>,
    /// Kernel to boot instead of the host's default (a path on the host).
    #[serde(default)]
    pub kernel: Option<String>,
    /// Initramfs to boot instead of the host's default (a path on the host).
    #[serde(default)]
    pub initramfs: Option<String>,
    /// Hypervisor to use instead of the host's default.
    #[serde(default)]
    pub hypervisor: Option<HypervisorKind>,
    /// Environment pushed to the guest agent.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Services the guest agent supervises.
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// Size of a persistent writable disk in MiB (0 or absent: none).
    #[serde(default)]
    pub data_disk_mib: Option<u32>,
    /// How the VM reaches the outside world (absent: it cannot).
    #[serde(default)]
    pub egress: Option<EgressPolicy>,
}

/// Where a VM's egress connections (its guest proxy on 127.0.0.1:3128) may
/// go. Everything not allowed here is refused by the host.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicy {
    /// Chain every connection through this HTTP CONNECT proxy (the user's
    /// own upstream).
    #[serde(default)]
    pub upstream: Option<Upstream>,
    /// Explicit exceptions to the deny list: `ADDR[/PREFIX]:PORT` or
    /// `ADDR[/PREFIX]:*`, IPv6 in brackets (`[::1]:8080`).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Without an upstream, dial targets directly from the host.
    #[serde(default)]
    pub direct: bool,
}

/// An upstream proxy (HTTP CONNECT or SOCKS5) and its credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// `http://host:port`, or `socks5://host:port` for SOCKS5 (names are
    /// sent to the proxy unresolved either way).
    pub url: String,
    /// Proxy user name.
    #[serde(default)]
    pub username: Option<String>,
    /// Proxy password; redacted in `Debug` output.
    #[serde(default)]
    pub password: Option<Secret>,
}

/// A credential: serialized as a plain string (it must reach the host
/// agent), but never shown by `Debug`, so it cannot leak into a log line.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wrap a credential.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The credential itself; call only where it is sent upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Hypervisor drivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HypervisorKind {
    /// QEMU `-M microvm`.
    Qemu,
    /// Firecracker.
    Firecracker,
}

impl std::fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HypervisorKind::Qemu => "qemu",
            HypervisorKind::Firecracker => "firecracker",
        })
    }
}

/// CPU virtualization in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Lifecycle state of a VM on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Resources are being prepared and the hypervisor started.
    Starting,
    /// The guest agent answered; the VM is usable.
    Running,
    /// vCPUs are stopped; memory is kept.
    Paused,
    /// Being torn down or powered off.
    Stopping,
    /// Powered off by a stop request; its state directory and disks are
    /// kept and a start boots it again.
    Off,
    /// Torn down after a request; only logs remain.
    Stopped,
    /// Died or could not start; see the failure reason. Only logs remain.
    Failed,
}

impl VmState {
    /// Whether the VM can no longer change state.
    pub fn is_final(self) -> bool {
        matches!(self, VmState::Stopped | VmState::Failed)
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Off => "off",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
        })
    }
}

/// What a host reports about one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Host-unique id (`vm-` + 12 hex digits).
    pub id: String,
    /// Optional human name.
    pub name: Option<String>,
    /// Current state.
    pub state: VmState,
    /// Why the VM failed, when `state` is `failed`.
    pub failure: Option<String>,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Image booted (`minimal` for the initramfs-only image).
    pub image: String,
    /// Hypervisor driving it.
    pub hypervisor: HypervisorKind,
    /// CPU virtualization in use.
    pub accel: Accel,
    /// Hypervisor process id while it runs.
    pub pid: Option<u32>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Milliseconds from start to guest-agent-ready (when known).
    pub boot_ms: Option<u64>,
    /// Snapshot this VM was restored from, if any; `hibernation` when its
    /// last start resumed it from its own saved memory.
    pub restored_from: Option<String>,
    /// Off with its memory saved (`polydev vm hibernate`): the next start
    /// resumes it where it was instead of booting.
    #[serde(default)]
    pub hibernated: bool,
}

/// A saved snapshot of a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Host-unique id (`snap-` + 12 hex digits).
    pub id: String,
    /// VM it was taken from.
    pub source_vm: String,
    /// Hypervisor that can restore it.
    pub hypervisor: HypervisorKind,
    /// Memory in MiB of the saved VM.
    pub memory_mib: u32,
    /// Virtual CPUs of the saved VM.
    pub vcpus: u32,
    /// Size on disk in bytes.
    pub size_bytes: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug_output() {
        let p = EgressPolicy {
            upstream: Some(Upstream {
                url: "http://127.0.0.1:1".into(),
                username: Some("u".into()),
                password: Some(Secret::new("hunter2")),
            }),
            ..Default::default()
        };
        assert!(!format!("{p:?}").contains("hunter2"));
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains("\"password\":\"hunter2\""), "{json}");
    }
}

/// Which of a VM's preserved logs to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogKind {
    /// The serial console (kernel and early agent output).
    Console,
    /// The guest agent's log stream, including service output.
    Agent,
    /// The host's record of the VM's egress connections (JSON lines:
    /// target, upstream, outcome, reason, bytes).
    Egress,
}
