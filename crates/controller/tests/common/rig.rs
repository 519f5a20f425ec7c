//! What the driver's run and idle tests share: a host whose "VMs" are
//! this machine (every exec a local process, power state kept in memory),
//! a stand-in provider CLI, and the API with a driver over them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use super::api::{call, eventually};
use polydev_api::agent::{ExecRequest, ExitStatus, ForwardTarget, ServiceStatus};
use polydev_api::vm::{LogKind, VmInfo, VmSpec};
use polydev_controller::auth::{Auth, AuthConfig, Role, Scope};
use polydev_controller::driver::host::HostFuture;
use polydev_controller::driver::{
    Driver, DriverConfig, Duplex, ExecOutput, HostApi, HostError, KeySource,
};
use polydev_controller::http::{self, AppState, HttpConfig};
use polydev_controller::providers::Providers;
use polydev_controller::state::VmState;
use polydev_controller::store::{Also, RunState, Store, Vm, VmKind};
use polydev_controller::vault::{Keyring, Vault};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::watch;

pub fn user_scopes() -> Vec<Scope> {
    Scope::ALL.into_iter().filter(|s| !s.admin_only()).collect()
}

pub async fn user(auth: &Auth, name: &str) -> (String, String) {
    let u = auth.create_user(name, Role::User, None).await.unwrap();
    let (_, t) = auth
        .create_token(&u.id, "all", &user_scopes(), None)
        .await
        .unwrap();
    (u.id, t)
}

pub async fn host_row(s: &Store) {
    sqlx::query("INSERT INTO hosts (id, name, address, vcpus, memory_mib, state, created_at) VALUES ('local', 'local', 'in-process', 4, 8192, 'up', 0) ON CONFLICT (id) DO NOTHING")
        .execute(s.pool())
        .await
        .unwrap();
}

/// A CLI VM record of `user` walked to `to`.
pub async fn cli_vm(s: &Store, user: &str, to: &[VmState]) -> Vm {
    let mut vm = s.create_vm(user, VmKind::Cli).await.unwrap();
    for &st in to {
        let also = if st == VmState::Creating {
            Also {
                placement: Some(("local".into(), vm.id.clone())),
                ..Also::default()
            }
        } else {
            Also::default()
        };
        vm = s.transition_vm(&vm, st, None, also).await.unwrap();
    }
    vm
}

pub async fn connect(s: &Store, user: &str, provider: &str) {
    Vault::new(Keyring::generate().unwrap())
        .store(s, user, provider, b"{}")
        .await
        .unwrap();
}

pub fn run_body(prompt: &str) -> Value {
    json!({ "provider": "fakecli", "prompt": prompt })
}

/// The stand-in CLI: `wait FILE` prints, waits for FILE, prints, exits 0;
/// `fail` prints to stderr and exits 3; anything else prints a start
/// event, the prompt as given, the working directory and a result.
pub const FAKE_CLI: &str = r#"#!/bin/sh
case "$1" in
wait\ *)
  echo '{"type":"start"}'
  while [ ! -f "${1#wait }" ]; do sleep 0.05; done
  echo '{"type":"delta","text":"after the gate"}'
  echo '{"type":"result"}' ;;
fail)
  echo 'something went wrong' >&2
  exit 3 ;;
*)
  echo '{"type":"start","n":1}'
  printf '%s\n' "$1"
  pwd
  printf '{"type":"result"}' ;;
esac
"#;

/// A provider directory with `fakecli` (the test CLI's definition with the
/// stand-in as its prompt command).
pub fn providers(dir: &Path) -> Providers {
    let cli = dir.join("fakecli.sh");
    std::fs::write(&cli, FAKE_CLI).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).unwrap();
    let testcli = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../providers/testcli.toml"),
    )
    .unwrap();
    let text = testcli
        .replace("id = \"testcli\"", "id = \"fakecli\"")
        .replace(
            "command = [\"polydev-testcli\", \"prompt\", \"{prompt}\"]",
            &format!("command = [\"{}\", \"{{prompt}}\"]", cli.display()),
        );
    assert!(
        text.contains("fakecli.sh"),
        "the prompt command was replaced"
    );
    let pdir = dir.join("providers");
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::write(pdir.join("fakecli.toml"), text).unwrap();
    Providers::load_dir(&pdir).unwrap()
}

/// A host whose VMs are this machine: every exec is a local process.
/// Its one VM's power is kept in memory: hibernate turns it off (with its
/// memory "saved"), start turns it on; while off, execs fail as at a real
/// host.
#[derive(Default)]
pub struct LocalExec {
    /// Whether `inspect` answers; when not, VM steps leave records as
    /// they are (the run tests drive VM states themselves).
    pub reports_power: AtomicBool,
    /// Whether the VM is off.
    pub off: AtomicBool,
    /// Hibernations asked for.
    pub hibernations: AtomicUsize,
    /// Starts asked for.
    pub starts: AtomicUsize,
}

impl LocalExec {
    fn info(&self, id: &str) -> VmInfo {
        let off = self.off.load(Ordering::SeqCst);
        VmInfo {
            id: id.to_string(),
            name: None,
            state: if off {
                polydev_api::vm::VmState::Off
            } else {
                polydev_api::vm::VmState::Running
            },
            failure: None,
            vcpus: 1,
            memory_mib: 256,
            image: "cli".into(),
            hypervisor: polydev_api::vm::HypervisorKind::Qemu,
            accel: polydev_api::vm::Accel::Tcg,
            pid: None,
            created_ms: 0,
            boot_ms: Some(1),
            restored_from: None,
            hibernated: off,
        }
    }
}

impl HostApi for LocalExec {
    fn host_id(&self) -> &str {
        "local"
    }
    fn create<'a>(&'a self, _: &'a VmSpec) -> HostFuture<'a, VmInfo> {
        Box::pin(async { Err(HostError::Refused("this test host creates no VMs".into())) })
    }
    fn inspect<'a>(&'a self, vm: &'a str) -> HostFuture<'a, VmInfo> {
        Box::pin(async move {
            if self.reports_power.load(Ordering::SeqCst) {
                return Ok(self.info(vm));
            }
            // Unknown to recovery and the VM steps: the record is kept as is.
            Err(HostError::Unreachable(
                "this test host has no VM records".into(),
            ))
        })
    }
    fn exec<'a>(&'a self, vm: &'a str, req: ExecRequest) -> HostFuture<'a, ExecOutput> {
        Box::pin(async move {
            if self.off.load(Ordering::SeqCst) {
                return Err(HostError::Conflict(format!("VM {vm} is off")));
            }
            let mut cmd = tokio::process::Command::new(&req.argv[0]);
            cmd.args(&req.argv[1..])
                .envs(&req.env)
                .current_dir(req.cwd.as_deref().unwrap_or("/"))
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            let mut child = cmd.spawn().map_err(|e| HostError::Failed(e.to_string()))?;
            if let Some(mut sin) = child.stdin.take() {
                use tokio::io::AsyncWriteExt;
                if let Some(data) = &req.stdin {
                    sin.write_all(data).await.ok();
                }
            }
            let out = child
                .wait_with_output()
                .await
                .map_err(|e| HostError::Failed(e.to_string()))?;
            Ok(ExecOutput {
                stdout: out.stdout,
                stderr: out.stderr,
                status: Some(ExitStatus {
                    code: out.status.code(),
                    signal: None,
                    timed_out: false,
                }),
            })
        })
    }
    fn destroy<'a>(&'a self, _: &'a str) -> HostFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
    fn stop<'a>(&'a self, _: &'a str) -> HostFuture<'a, VmInfo> {
        Box::pin(async { Err(HostError::Refused("not here".into())) })
    }
    fn hibernate<'a>(&'a self, vm: &'a str) -> HostFuture<'a, VmInfo> {
        Box::pin(async move {
            self.hibernations.fetch_add(1, Ordering::SeqCst);
            self.off.store(true, Ordering::SeqCst);
            Ok(self.info(vm))
        })
    }
    fn start<'a>(&'a self, vm: &'a str) -> HostFuture<'a, VmInfo> {
        Box::pin(async move {
            self.starts.fetch_add(1, Ordering::SeqCst);
            self.off.store(false, Ordering::SeqCst);
            Ok(self.info(vm))
        })
    }
    fn services<'a>(&'a self, _: &'a str) -> HostFuture<'a, Vec<ServiceStatus>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn forward<'a>(&'a self, _: &'a str, _: ForwardTarget) -> HostFuture<'a, Box<dyn Duplex>> {
        Box::pin(async { Err(HostError::Refused("not here".into())) })
    }
    fn logs<'a>(&'a self, _: &'a str, _: LogKind) -> HostFuture<'a, String> {
        Box::pin(async { Ok(String::new()) })
    }
    fn watch_files<'a>(
        &'a self,
        _: &'a str,
        _: polydev_api::agent::WatchSpec,
    ) -> HostFuture<'a, Vec<polydev_api::agent::WatchedFile>> {
        Box::pin(async { Err(HostError::Refused("not here".into())) })
    }
}

/// The API with a driver over [`LocalExec`], and what a test needs.
pub struct Rig {
    pub base: String,
    pub client: reqwest::Client,
    pub auth: Auth,
    pub store: Store,
    pub host: Arc<LocalExec>,
    pub dir: tempfile::TempDir,
    pub providers: Providers,
    pub http_stop: watch::Sender<bool>,
    pub driver_stop: Option<watch::Sender<bool>>,
    /// The drivers' `cli_idle_hibernate_secs`.
    pub idle_secs: u64,
}

impl Rig {
    /// The API over `db`, with production's idle hibernation limit.
    pub async fn start(db: &super::TestDb, cfg: HttpConfig) -> Rig {
        Self::start_idle(db, cfg, DriverConfig::default().cli_idle_hibernate_secs).await
    }

    /// The API over `db`; CLI VMs idle for `idle_secs` hibernate.
    pub async fn start_idle(db: &super::TestDb, cfg: HttpConfig, idle_secs: u64) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("home")).unwrap();
        let providers = providers(dir.path());
        let host = Arc::new(LocalExec::default());
        let driver = Self::driver(&db.store, &host, dir.path(), &providers, idle_secs);
        let auth = Auth::new(db.store.clone(), AuthConfig::default()).unwrap();
        let (http_stop, rx) = watch::channel(false);
        let state = AppState::new(auth.clone(), Some(driver), cfg, rx).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(http::serve(listener, state));
        Rig {
            base,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            auth,
            store: db.store.clone(),
            host,
            dir,
            providers,
            http_stop,
            driver_stop: None,
            idle_secs,
        }
    }

    pub fn driver(
        store: &Store,
        host: &Arc<LocalExec>,
        dir: &Path,
        providers: &Providers,
        idle_secs: u64,
    ) -> Driver {
        Driver::with_config(
            store.clone(),
            host.clone(),
            providers.clone(),
            KeySource::fixed(Keyring::generate().unwrap()),
            polydev_controller::upstream::UpstreamConfig::none(),
            DriverConfig {
                cli_owner: None,
                cli_home: dir.join("home").display().to_string(),
                runs_dir: dir.join("runs").display().to_string(),
                poll_ms: 50,
                idle_poll_ms: 50,
                cli_idle_hibernate_secs: idle_secs,
                ..DriverConfig::default()
            },
        )
    }

    /// Start (or restart) a driver over the same store and host.
    pub fn run_driver(&mut self) {
        let (tx, rx) = watch::channel(false);
        let d = Self::driver(
            &self.store,
            &self.host,
            self.dir.path(),
            &self.providers,
            self.idle_secs,
        );
        tokio::spawn(d.run(rx));
        self.driver_stop = Some(tx);
    }

    pub fn stop_driver(&mut self) {
        if let Some(tx) = self.driver_stop.take() {
            tx.send(true).unwrap();
        }
    }

    pub async fn call(
        &self,
        m: Method,
        path: &str,
        t: &str,
        body: Option<Value>,
    ) -> (reqwest::StatusCode, reqwest::header::HeaderMap, Value) {
        call(&self.client, &self.base, m, path, Some(t), &[], body).await
    }

    pub fn runs_dir(&self) -> PathBuf {
        self.dir.path().join("runs")
    }

    pub async fn wait_state(&self, id: &str, want: RunState) -> polydev_controller::store::Run {
        eventually(30, &format!("run {id} is {}", want.as_str()), || async {
            let r = self.store.run(id).await.unwrap();
            let active = matches!(r.state, RunState::Queued | RunState::Running);
            assert!(
                r.state == want || active,
                "run {id} ended {} ({:?}), not {}",
                r.state.as_str(),
                r.reason,
                want.as_str()
            );
            r.state == want
        })
        .await;
        self.store.run(id).await.unwrap()
    }

    pub async fn events(&self, id: &str) -> Vec<polydev_controller::store::RunEvent> {
        self.store.run_events_after(id, 0, 10_000).await.unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop_driver();
        let _ = self.http_stop.send(true);
    }
}
