//! What the driver asks of a host agent ([`HostApi`]), with two real
//! implementations: the in-process host agent of `polydev up`
//! ([`LocalHost`], the same type restart recovery uses) and a host agent
//! reached over its HTTP API on a Unix socket ([`RemoteHost`],
//! `polydev_host::client`).

use std::future::Future;
use std::pin::Pin;

use polydev_api::agent::{
    ExecRequest, ExitStatus, Request, Response, ServiceStatus, WatchSpec, WatchedFile,
};
use polydev_api::vm::{VmInfo, VmSpec, VmState as HostState};
use polydev_host::client::{ClientError, HostClient};
use polydev_host::manager::ManagerError;

use crate::recovery::{HostVm, LocalHost};

/// Most output one exec may return to the driver (login output and
/// credential files are far smaller).
pub const MAX_EXEC_OUTPUT: usize = 8 * 1024 * 1024;

/// Why a host call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HostError {
    /// No such VM on the host (never existed, or ended).
    #[error("not found at the host: {0}")]
    NotFound(String),
    /// The request conflicts with the VM's state (e.g. its name is taken).
    #[error("conflict at the host: {0}")]
    Conflict(String),
    /// The host refused the request as invalid.
    #[error("refused by the host: {0}")]
    Refused(String),
    /// The host could not be reached.
    #[error("host unreachable: {0}")]
    Unreachable(String),
    /// The operation failed at the host or in the guest.
    #[error("{0}")]
    Failed(String),
}

/// A byte stream to a port inside a VM (see [`HostApi::forward`]).
pub trait Duplex: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Duplex for T {}

/// The boxed future every [`HostApi`] method returns (object-safe trait).
pub type HostFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, HostError>> + Send + 'a>>;

/// Collected output of a finished exec.
#[derive(Clone, Debug, Default)]
pub struct ExecOutput {
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
    /// How it ended (`None`: the agent reported an error instead).
    pub status: Option<ExitStatus>,
}

impl ExecOutput {
    /// Exited with status 0.
    pub fn success(&self) -> bool {
        self.status
            .is_some_and(|s| s.code == Some(0) && s.signal.is_none())
    }
}

/// What the driver needs from a host agent. `vm` arguments accept the
/// host's VM id or the VM's name (the driver names every VM after its
/// controller id, so a create interrupted by a crash is found again).
pub trait HostApi: Send + Sync {
    /// The id of this host in the store's `hosts` table.
    fn host_id(&self) -> &str;
    /// Create and boot a VM; returns once its guest agent answers.
    fn create<'a>(&'a self, spec: &'a VmSpec) -> HostFuture<'a, VmInfo>;
    /// What the host knows about a VM.
    fn inspect<'a>(&'a self, vm: &'a str) -> HostFuture<'a, VmInfo>;
    /// Run a program in the VM and collect its output (bounded by
    /// [`MAX_EXEC_OUTPUT`]).
    fn exec<'a>(&'a self, vm: &'a str, req: ExecRequest) -> HostFuture<'a, ExecOutput>;
    /// Destroy a VM; one that is already gone is not an error.
    fn destroy<'a>(&'a self, vm: &'a str) -> HostFuture<'a, ()>;
    /// Power a running VM off and keep it, disks included (the host's
    /// `off` state); returns once it is off.
    fn stop<'a>(&'a self, vm: &'a str) -> HostFuture<'a, VmInfo>;
    /// Hibernate a running VM: its memory saved, then off with its disks
    /// (`hibernated` in the answer; a host that cannot save memory powers
    /// it off instead, as this default does); returns once it is off.
    fn hibernate<'a>(&'a self, vm: &'a str) -> HostFuture<'a, VmInfo> {
        self.stop(vm)
    }
    /// Start a VM that is off again, with its disks (resumed from its
    /// saved memory if it was hibernated); returns once its guest agent
    /// answers.
    fn start<'a>(&'a self, vm: &'a str) -> HostFuture<'a, VmInfo>;
    /// The guest agent's supervised services (with their readiness).
    fn services<'a>(&'a self, vm: &'a str) -> HostFuture<'a, Vec<ServiceStatus>>;
    /// A connection to `target` in the VM through the guest agent: a TCP
    /// port on its loopback (the desktop's VNC server, …; a refused port is
    /// an error) or a terminal (framed: `polydev_api::pty`).
    fn forward<'a>(
        &'a self,
        vm: &'a str,
        target: polydev_api::agent::ForwardTarget,
    ) -> HostFuture<'a, Box<dyn Duplex>>;
    /// The end of one of the VM's logs kept by its host (live or archived):
    /// the host's default tail (1 MiB, whole lines), never the whole file.
    fn logs<'a>(&'a self, vm: &'a str, kind: polydev_api::vm::LogKind) -> HostFuture<'a, String>;
    /// Wait (a long poll, bounded by the spec's timeout) until one of a
    /// user's files in the VM differs from the keys the caller knows;
    /// every file as it is now (the guest agent's `watch_files`).
    fn watch_files<'a>(&'a self, vm: &'a str, spec: WatchSpec) -> HostFuture<'a, Vec<WatchedFile>>;
    /// A file's content from inside the VM; `None` when it does not exist.
    /// (One implementation for every host: `cat` through exec, so nothing
    /// beyond exec is needed from the host protocol.)
    fn read_file<'a>(&'a self, vm: &'a str, path: &'a str) -> HostFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move {
            let out = self
                .exec(
                    vm,
                    ExecRequest {
                        argv: vec![
                            "sh".into(),
                            "-c".into(),
                            "[ -f \"$1\" ] || exit 3; exec cat \"$1\"".into(),
                            "sh".into(),
                            path.into(),
                        ],
                        timeout_ms: Some(30_000),
                        ..Default::default()
                    },
                )
                .await?;
            match out.status.and_then(|s| s.code) {
                Some(0) => Ok(Some(out.stdout)),
                Some(3) => Ok(None),
                _ => Err(HostError::Failed(format!(
                    "reading {path} in the VM failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))),
            }
        })
    }
}

/// Map a host's answer about a VM to what recovery and the driver decide on.
pub fn host_vm(r: &Result<VmInfo, HostError>) -> HostVm {
    match r {
        Ok(info) => match info.state {
            HostState::Starting => HostVm::Starting,
            HostState::Running => HostVm::Running,
            HostState::Paused => HostVm::Paused,
            HostState::Stopping => HostVm::Stopping,
            HostState::Stopped => HostVm::Gone(Some("stopped".into())),
            HostState::Failed => HostVm::Gone(info.failure.clone().or(Some("failed".into()))),
            // Powered off with its disks kept: not running, but startable.
            HostState::Off => HostVm::Off(info.failure.clone()),
        },
        // Never had it, or its logs were pruned: either way not running.
        Err(HostError::NotFound(_)) => HostVm::Gone(None),
        Err(e) => {
            tracing::warn!(error = %e, "host lookup failed");
            HostVm::Unknown
        }
    }
}

/// Add one exec frame to `out`; `Some` once the exec is over. Output
/// beyond [`MAX_EXEC_OUTPUT`] is refused before it is kept, so the
/// collected output never exceeds the cap however large one frame is, and
/// the caller stops reading (dropping the stream ends the exec).
fn absorb<E: std::fmt::Display>(
    out: &mut ExecOutput,
    frame: Result<Option<Response>, E>,
) -> Option<Result<(), HostError>> {
    let data = match frame {
        Ok(Some(Response::Stdout { data })) => (data, false),
        Ok(Some(Response::Stderr { data })) => (data, true),
        Ok(Some(Response::Exit(st))) => {
            out.status = Some(st);
            return Some(Ok(()));
        }
        Ok(Some(Response::Error(e))) => {
            return Some(Err(HostError::Failed(format!(
                "guest agent: {}",
                e.message
            ))))
        }
        Ok(Some(_)) => return None,
        Ok(None) => return Some(Ok(())),
        Err(e) => return Some(Err(HostError::Failed(format!("exec stream: {e}")))),
    };
    let (data, stderr) = data;
    if out.stdout.len() + out.stderr.len() + data.len() > MAX_EXEC_OUTPUT {
        return Some(Err(HostError::Failed(format!(
            "exec output exceeded {MAX_EXEC_OUTPUT} bytes; the command was stopped \
             (write large output to a file in the VM instead)"
        ))));
    }
    if stderr {
        out.stderr.extend_from_slice(&data);
    } else {
        out.stdout.extend_from_slice(&data);
    }
    None
}

/// Drain an exec's frame stream (anything with `async fn next`) into an
/// [`ExecOutput`].
macro_rules! collect {
    ($frames:expr) => {{
        let mut out = ExecOutput::default();
        loop {
            if let Some(done) = absorb(&mut out, $frames.next().await) {
                break done.map(|()| out);
            }
        }
    }};
}

fn services_of(r: Response) -> Result<Vec<ServiceStatus>, HostError> {
    match r {
        Response::Services { services } => Ok(services),
        Response::Error(e) => Err(HostError::Failed(format!("guest agent: {}", e.message))),
        other => Err(HostError::Failed(format!(
            "unexpected answer to a services request: {other:?}"
        ))),
    }
}

fn watched_of(r: Response) -> Result<Vec<WatchedFile>, HostError> {
    match r {
        Response::Watched { files } => Ok(files),
        Response::Error(e) => Err(HostError::Failed(format!("guest agent: {}", e.message))),
        other => Err(HostError::Failed(format!(
            "unexpected answer to a watch_files request: {other:?}"
        ))),
    }
}

fn from_manager(e: ManagerError) -> HostError {
    match e {
        ManagerError::NotFound { .. } => HostError::NotFound(e.to_string()),
        ManagerError::Conflict(_) => HostError::Conflict(e.to_string()),
        ManagerError::Invalid(_) | ManagerError::PathTooLong(_) => {
            HostError::Refused(e.to_string())
        }
        _ => HostError::Failed(e.to_string()),
    }
}

impl HostApi for LocalHost {
    fn host_id(&self) -> &str {
        &self.host_id
    }

    fn create<'a>(&'a self, spec: &'a VmSpec) -> HostFuture<'a, VmInfo> {
        Box::pin(async move { self.manager.create(spec).await.map_err(from_manager) })
    }

    fn inspect<'a>(&'a self, vm: &'a str) -> HostFuture<'a, VmInfo> {
        Box::pin(async move { self.manager.get(vm).await.map_err(from_manager) })
    }

    fn exec<'a>(&'a self, vm: &'a str, req: ExecRequest) -> HostFuture<'a, ExecOutput> {
        Box::pin(async move {
            let mut frames = self.manager.exec(vm, req).await.map_err(from_manager)?;
            collect!(frames)
        })
    }

    fn services<'a>(&'a self, vm: &'a str) -> HostFuture<'a, Vec<ServiceStatus>> {
        Box::pin(async move {
            services_of(
                self.manager
                    .agent_call(vm, Request::Services)
                    .await
                    .map_err(from_manager)?,
            )
        })
    }

    fn watch_files<'a>(&'a self, vm: &'a str, spec: WatchSpec) -> HostFuture<'a, Vec<WatchedFile>> {
        Box::pin(async move {
            watched_of(
                self.manager
                    .agent_call(vm, Request::WatchFiles(spec))
                    .await
                    .map_err(from_manager)?,
            )
        })
    }

    fn forward<'a>(
        &'a self,
        vm: &'a str,
        target: polydev_api::agent::ForwardTarget,
    ) -> HostFuture<'a, Box<dyn Duplex>> {
        Box::pin(async move {
            let s = self
                .manager
                .forward(vm, target)
                .await
                .map_err(from_manager)?;
            Ok(Box::new(s) as Box<dyn Duplex>)
        })
    }

    fn logs<'a>(&'a self, vm: &'a str, kind: polydev_api::vm::LogKind) -> HostFuture<'a, String> {
        Box::pin(async move {
            self.manager
                .logs(vm, kind, polydev_host::manager::LogTail::default())
                .await
                .map_err(from_manager)
        })
    }

    fn destroy<'a>(&'a self, vm: &'a str) -> HostFuture<'a, ()> {
        Box::pin(async move {
            match self.manager.destroy(vm).await {
                Ok(_) | Err(ManagerError::NotFound { .. }) => Ok(()),
                Err(e) => Err(from_manager(e)),
            }
        })
    }

    fn stop<'a>(&'a self, vm: &'a str) -> HostFuture<'a, VmInfo> {
        Box::pin(async move { self.manager.power_off(vm).await.map_err(from_manager) })
    }

    fn hibernate<'a>(&'a self, vm: &'a str) -> HostFuture<'a, VmInfo> {
        Box::pin(async move { self.manager.hibernate(vm).await.map_err(from_manager) })
    }

    fn start<'a>(&'a self, vm: &'a str) -> HostFuture<'a, VmInfo> {
        Box::pin(async move { self.manager.power_on(vm).await.map_err(from_manager) })
    }
}

/// A host agent reached over its HTTP API (`polydev host`'s Unix socket).
pub struct RemoteHost {
    host_id: String,
    client: HostClient,
}

impl RemoteHost {
    /// A host registered as `host_id`, served on `socket`.
    pub fn new(host_id: impl Into<String>, socket: &std::path::Path) -> Self {
        RemoteHost {
            host_id: host_id.into(),
            client: HostClient::new(socket),
        }
    }
}

fn from_client(e: ClientError) -> HostError {
    match &e {
        ClientError::Problem(p) if p.status == 404 => HostError::NotFound(p.detail.clone()),
        ClientError::Problem(p) if p.status == 409 => HostError::Conflict(p.detail.clone()),
        ClientError::Problem(p) if (400..500).contains(&p.status) => {
            HostError::Refused(p.detail.clone())
        }
        ClientError::Connect { .. } => HostError::Unreachable(e.to_string()),
        _ => HostError::Failed(e.to_string()),
    }
}

impl HostApi for RemoteHost {
    fn host_id(&self) -> &str {
        &self.host_id
    }

    fn create<'a>(&'a self, spec: &'a VmSpec) -> HostFuture<'a, VmInfo> {
        Box::pin(async move {
            self.client
                .call(hyper::Method::POST, "/v1/vms", Some(spec))
                .await
                .map_err(from_client)
        })
    }

    fn inspect<'a>(&'a self, vm: &'a str) -> HostFuture<'a, VmInfo> {
        Box::pin(async move {
            self.client
                .call::<(), _>(hyper::Method::GET, &format!("/v1/vms/{vm}"), None)
                .await
                .map_err(from_client)
        })
    }

    fn exec<'a>(&'a self, vm: &'a str, req: ExecRequest) -> HostFuture<'a, ExecOutput> {
        Box::pin(async move {
            let mut frames = self.client.exec(vm, &req).await.map_err(from_client)?;
            collect!(frames)
        })
    }

    fn services<'a>(&'a self, vm: &'a str) -> HostFuture<'a, Vec<ServiceStatus>> {
        Box::pin(async move {
            services_of(
                self.client
                    .call::<(), _>(hyper::Method::GET, &format!("/v1/vms/{vm}/services"), None)
                    .await
                    .map_err(from_client)?,
            )
        })
    }

    fn watch_files<'a>(&'a self, vm: &'a str, spec: WatchSpec) -> HostFuture<'a, Vec<WatchedFile>> {
        Box::pin(async move {
            watched_of(
                self.client
                    .call(
                        hyper::Method::POST,
                        &format!("/v1/vms/{vm}/watch-files"),
                        Some(&spec),
                    )
                    .await
                    .map_err(from_client)?,
            )
        })
    }

    fn forward<'a>(
        &'a self,
        vm: &'a str,
        target: polydev_api::agent::ForwardTarget,
    ) -> HostFuture<'a, Box<dyn Duplex>> {
        Box::pin(async move {
            let s = self
                .client
                .forward(vm, &target)
                .await
                .map_err(from_client)?;
            Ok(Box::new(s) as Box<dyn Duplex>)
        })
    }

    fn logs<'a>(&'a self, vm: &'a str, kind: polydev_api::vm::LogKind) -> HostFuture<'a, String> {
        Box::pin(async move {
            let kind = match kind {
                polydev_api::vm::LogKind::Console => "console",
                polydev_api::vm::LogKind::Agent => "agent",
                polydev_api::vm::LogKind::Egress => "egress",
            };
            self.client
                .text(&format!("/v1/vms/{vm}/logs?kind={kind}"))
                .await
                .map_err(from_client)
        })
    }

    fn destroy<'a>(&'a self, vm: &'a str) -> HostFuture<'a, ()> {
        Box::pin(async move {
            match self
                .client
                .call_empty(hyper::Method::DELETE, &format!("/v1/vms/{vm}"))
                .await
                .map_err(from_client)
            {
                Ok(()) | Err(HostError::NotFound(_)) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    fn stop<'a>(&'a self, vm: &'a str) -> HostFuture<'a, VmInfo> {
        Box::pin(async move {
            self.client
                .call::<(), _>(hyper::Method::POST, &format!("/v1/vms/{vm}/stop"), None)
                .await
                .map_err(from_client)
        })
    }

    fn hibernate<'a>(&'a self, vm: &'a str) -> HostFuture<'a, VmInfo> {
        Box::pin(async move {
            self.client
                .call::<(), _>(
                    hyper::Method::POST,
                    &format!("/v1/vms/{vm}/hibernate"),
                    None,
                )
                .await
                .map_err(from_client)
        })
    }

    fn start<'a>(&'a self, vm: &'a str) -> HostFuture<'a, VmInfo> {
        Box::pin(async move {
            self.client
                .call::<(), _>(hyper::Method::POST, &format!("/v1/vms/{vm}/start"), None)
                .await
                .map_err(from_client)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stdout(n: usize) -> Result<Option<Response>, String> {
        Ok(Some(Response::Stdout {
            data: vec![b'o'; n],
        }))
    }

    #[test]
    fn output_stops_at_the_cap_even_within_one_frame() {
        let mut out = ExecOutput::default();
        assert!(absorb(&mut out, stdout(MAX_EXEC_OUTPUT - 10)).is_none());
        let stderr = Ok(Some(Response::Stderr {
            data: vec![b'e'; 10],
        }));
        assert!(absorb::<String>(&mut out, stderr).is_none());
        // Exactly at the cap so far; one more byte, or one huge frame, ends
        // the exec without being kept.
        for n in [1, 12 * 1024 * 1024] {
            match absorb(&mut out, stdout(n)) {
                Some(Err(HostError::Failed(m))) => assert!(m.contains("exceeded"), "{m}"),
                other => panic!("{other:?}"),
            }
            assert_eq!(out.stdout.len() + out.stderr.len(), MAX_EXEC_OUTPUT);
        }
    }

    #[test]
    fn an_exit_frame_ends_the_exec_with_its_status() {
        let mut out = ExecOutput::default();
        assert!(absorb(&mut out, stdout(3)).is_none());
        let exit = ExitStatus {
            code: Some(0),
            signal: None,
            timed_out: false,
        };
        assert!(matches!(
            absorb::<String>(&mut out, Ok(Some(Response::Exit(exit)))),
            Some(Ok(()))
        ));
        assert!(out.success() && out.stdout == b"ooo");
    }
}
