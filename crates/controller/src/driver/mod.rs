//! The driver: the loop that advances VM and session records through the
//! host agent.
//!
//! Each pass loads every non-final record and takes one idempotent step per
//! record (in its own task; a record is never stepped twice at once in one
//! process). A step looks at the world (the host, the VM), decides, and
//! moves the record through [`Store::transition_vm`] /
//! [`Store::transition_session`] — a compare-and-swap plus its event in one
//! transaction — so a controller killed at any instant resumes correctly:
//! on start [`crate::recovery::recover`] settles what happened while it was
//! down, and the loop continues from whatever state each record is in.
//! Work that must outlive the controller runs outside it: VMs belong to the
//! host agent (named after their controller id, so an interrupted create is
//! found again), and the provider's login runs detached inside the VM with
//! its output and exit status in files (see [`login`]).
//!
//! The loop wakes on [`Driver::notify`] (the API calls it after a write)
//! or every [`DriverConfig::poll_ms`], and runs
//! [`crate::recovery::fail_overdue`] on every pass.

pub mod custody;
mod disconnect;
mod egress_check;
pub mod fields;
pub mod host;
mod idle;
pub mod login;
pub mod provision;
pub mod runs;
mod session;
mod vm;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{watch, Notify};

pub use disconnect::DisconnectError;
pub use host::{Duplex, ExecOutput, HostApi, HostError, RemoteHost};
pub use idle::WakeError;
pub use session::{decode_credential, encode as encode_credential};

use crate::providers::{ProviderError, Providers};
use crate::store::{Store, StoreError};
use crate::upstream::{UpstreamConfig, UpstreamConfigError};
use crate::vault::{Keyring, Vault, VaultError};

/// Errors that stop the driver (a failing record never does: it is failed
/// with a reason and the loop goes on).
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The store failed at start.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The driver config file is unusable.
    #[error("driver config {path}: {message}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Provider definitions did not load.
    #[error(transparent)]
    Providers(#[from] ProviderError),
    /// The upstream config did not load.
    #[error(transparent)]
    Upstreams(#[from] UpstreamConfigError),
    /// The vault keyring did not load.
    #[error(transparent)]
    Vault(#[from] VaultError),
}

/// How the driver builds VMs and runs logins. Loaded from
/// `<data>/driver.toml` when present ([`DriverConfig::load_optional`]);
/// the defaults are the production setup (browser and CLI images, the
/// image's unprivileged `user`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriverConfig {
    /// Image of browser VMs (`None`: the minimal initramfs image).
    pub browser_image: Option<String>,
    /// Memory of a browser VM in MiB (`None`: the image's default, else the
    /// host's).
    pub browser_memory_mib: Option<u32>,
    /// vCPUs of a browser VM (`None`: the host's default).
    pub browser_vcpus: Option<u32>,
    /// Command run in a running browser VM that must exit 0 before the login
    /// starts, on top of every service readiness probe of the image passing
    /// (`None`: those alone).
    pub browser_ready: Option<Vec<String>>,
    /// User the login runs as (`None`: the guest agent's user, root).
    pub login_user: Option<String>,
    /// That user's home directory (capture paths are relative to it).
    pub login_home: String,
    /// Extra environment for every login (the provider's own comes on top).
    pub login_env: std::collections::BTreeMap<String, String>,
    /// The browser command (split on spaces) that URLs handed to `$BROWSER`
    /// are passed on to (`""`: none).
    pub login_browser: Option<String>,
    /// Deliver captured credentials into the user's CLI VM (created when the
    /// user has none). Off: the credential stays in the vault only.
    pub deliver_to_cli_vm: bool,
    /// Image of CLI VMs.
    pub cli_image: Option<String>,
    /// Memory of a CLI VM in MiB (`None`: the image's default, else the
    /// host's).
    pub cli_memory_mib: Option<u32>,
    /// Home directory in CLI VMs.
    pub cli_home: String,
    /// Owner (`user[:group]`) of delivered files in CLI VMs (`None`: root).
    pub cli_owner: Option<String>,
    /// Command run in a running CLI VM that exits 0 once it can take a
    /// delivery (`None`: when the agent answers).
    pub cli_ready: Option<Vec<String>>,
    /// Sessions past `requested` at once; more wait in `requested`.
    pub max_active_sessions: usize,
    /// Pass interval when nothing notifies, in milliseconds.
    pub poll_ms: u64,
    /// How long a record whose step changed nothing (a login still
    /// waiting, a VM still booting) rests before it is looked at again.
    pub idle_poll_ms: u64,
    /// A browser VM record no session points at is stopped after this long
    /// (it was created by a controller that died before recording it).
    pub orphan_grace_ms: i64,
    /// Provider definitions (`None`: the built-in ones).
    pub providers_dir: Option<PathBuf>,
    /// Upstream providers (`None`: `<data>/upstreams.toml` if it exists).
    pub upstreams_file: Option<PathBuf>,
    /// With no upstream provider configured, VMs reach the internet
    /// directly from the host (the deny list still applies); off, they
    /// have no egress at all until an upstream is configured.
    pub direct_egress_without_upstream: bool,
    /// Files placed into new VMs before use (see [`provision`]).
    pub vm_files: Vec<provision::VmFile>,
    /// Command run as root in a new VM after its files are placed (e.g.
    /// `["update-ca-certificates"]`); `[]`: none.
    pub vm_setup: Option<Vec<String>>,
    /// Where prompt runs keep their output and exit status inside the CLI
    /// VM (memory in the CLI image, so a VM restart loses its runs).
    pub runs_dir: String,
    /// Output one prompt run may print; a run beyond it is stopped and
    /// fails.
    pub run_output_max_bytes: u64,
    /// A running CLI VM nobody has used for this long (no terminal
    /// attached, no run, no delivery) is hibernated: its memory saved to
    /// disk and its hypervisor ended. The next terminal, run or delivery
    /// resumes it. 0: never.
    pub cli_idle_hibernate_secs: u64,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            browser_image: Some("browser".into()),
            browser_memory_mib: Some(1024),
            browser_vcpus: None,
            // The browser image's services carry readiness probes (VNC
            // answers, terminal and Chromium on screen): nothing to add.
            browser_ready: None,
            login_user: Some("user".into()),
            login_home: "/home/user".into(),
            // The desktop's display, so the CLI's browser opens on it.
            login_env: [("DISPLAY".to_string(), ":0".to_string())].into(),
            // Its own window for the sign-in page (the running Chromium
            // takes it over), maximised and raised by the `$BROWSER` wrapper.
            login_browser: Some("chromium --new-window".into()),
            deliver_to_cli_vm: true,
            cli_image: Some("cli".into()),
            cli_memory_mib: Some(1024),
            cli_home: "/home/user".into(),
            cli_owner: Some("user:user".into()),
            cli_ready: None,
            max_active_sessions: 10,
            poll_ms: 500,
            idle_poll_ms: 1000,
            orphan_grace_ms: 60_000,
            providers_dir: None,
            upstreams_file: None,
            direct_egress_without_upstream: true,
            vm_files: Vec::new(),
            vm_setup: None,
            runs_dir: "/run/polydev-runs".into(),
            run_output_max_bytes: 16 * 1024 * 1024,
            cli_idle_hibernate_secs: 900,
        }
    }
}

impl DriverConfig {
    /// Parse a config file's text.
    ///
    /// TOML has no null, so the "none" of each optional setting is spelled
    /// out: image `"minimal"` (the initramfs image), `login_user = "root"`
    /// (the agent's user), `cli_owner = ""`, `login_browser = ""`, an empty
    /// probe `[]`, memory 0 (the image's default from the recipe, else the
    /// host's).
    pub fn parse(text: &str, origin: &str) -> Result<Self, DriverError> {
        let mut c: DriverConfig = toml::from_str(text).map_err(|e| DriverError::Config {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        for image in [&mut c.browser_image, &mut c.cli_image] {
            if image.as_deref() == Some("minimal") {
                *image = None;
            }
        }
        if c.login_user.as_deref() == Some("root") {
            c.login_user = None;
        }
        if c.cli_owner.as_deref() == Some("") {
            c.cli_owner = None;
        }
        if c.login_browser.as_deref() == Some("") {
            c.login_browser = None;
        }
        for probe in [&mut c.browser_ready, &mut c.cli_ready, &mut c.vm_setup] {
            if probe.as_ref().is_some_and(Vec::is_empty) {
                *probe = None;
            }
        }
        for mem in [&mut c.browser_memory_mib, &mut c.cli_memory_mib] {
            if *mem == Some(0) {
                *mem = None;
            }
        }
        if c.max_active_sessions == 0 || c.poll_ms == 0 {
            return Err(DriverError::Config {
                path: origin.to_string(),
                message: "`max_active_sessions` and `poll_ms` must be at least 1".into(),
            });
        }
        if let Some(problem) = c.vm_files.iter().find_map(provision::VmFile::problem) {
            return Err(DriverError::Config {
                path: origin.to_string(),
                message: problem,
            });
        }
        for (field, home) in [
            ("login_home", &c.login_home),
            ("cli_home", &c.cli_home),
            ("runs_dir", &c.runs_dir),
        ] {
            if !home.starts_with('/') {
                return Err(DriverError::Config {
                    path: origin.to_string(),
                    message: format!("`{field}` must be an absolute path"),
                });
            }
        }
        Ok(c)
    }

    /// `path` if it exists, else the defaults.
    pub fn load_optional(path: &Path) -> Result<Self, DriverError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(DriverError::Config {
                path: path.display().to_string(),
                message: e.to_string(),
            }),
        }
    }
}

/// Where the vault's master keys come from. Read again for every seal and
/// open, so `polydev vault rotate` on a running system takes effect at once
/// (a record re-wrapped under a new key opens; new records use it).
#[derive(Clone, Debug)]
pub struct KeySource {
    file: Option<PathBuf>,
    fixed: Option<Arc<Vault>>,
}

impl KeySource {
    /// [`crate::vault::KEYS_ENV`] when set, else the key file at `path`
    /// (created on first use).
    pub fn file(path: &Path) -> Self {
        KeySource {
            file: Some(path.to_path_buf()),
            fixed: None,
        }
    }

    /// A fixed keyring (tests, embedded use).
    pub fn fixed(ring: Keyring) -> Self {
        KeySource {
            file: None,
            fixed: Some(Arc::new(Vault::new(ring))),
        }
    }

    /// The vault as of now.
    pub fn vault(&self) -> Result<Arc<Vault>, VaultError> {
        match (&self.fixed, &self.file) {
            (Some(v), _) => Ok(v.clone()),
            (None, Some(p)) => Ok(Arc::new(Vault::new(Keyring::from_env_or_file(p)?))),
            (None, None) => Ok(Arc::new(Vault::new(Keyring::generate()?))),
        }
    }
}

/// The id under which a single-host controller records its host agent.
pub const LOCAL_HOST_ID: &str = "local";

/// Well-known files under a data directory.
pub mod paths {
    use std::path::{Path, PathBuf};

    /// The driver's config.
    pub fn driver_config(data: &Path) -> PathBuf {
        data.join("driver.toml")
    }
    /// The upstream providers.
    pub fn upstreams(data: &Path) -> PathBuf {
        data.join("upstreams.toml")
    }
    /// The vault's key file.
    pub fn vault_keys(data: &Path) -> PathBuf {
        data.join("vault-keys.toml")
    }
}

pub(crate) struct Inner {
    pub(crate) store: Store,
    pub(crate) host: Arc<dyn HostApi>,
    pub(crate) providers: Providers,
    pub(crate) keys: KeySource,
    pub(crate) upstreams: UpstreamConfig,
    pub(crate) cfg: DriverConfig,
    wake: Notify,
    busy: Mutex<HashSet<String>>,
    /// Records resting after a step that changed nothing: id → (version, until).
    quiet: Mutex<std::collections::HashMap<String, (i64, std::time::Instant)>>,
    /// Sessions whose login printed an auth URL before handing one to the
    /// browser: session id → when the printed one was first seen.
    pub(crate) printed_url_seen: Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// The keys of each holder's credential files last seen (see
    /// [`custody`]).
    custody_known: Mutex<custody::Known>,
}

/// The driver; cheap to clone (the API keeps one to [`Driver::notify`]).
#[derive(Clone)]
pub struct Driver {
    inner: Arc<Inner>,
}

/// Marks a record as being stepped; removed on drop.
struct Busy {
    inner: Arc<Inner>,
    id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.inner
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl Inner {
    fn claim(self: &Arc<Self>, id: &str) -> Option<Busy> {
        let mut b = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        b.insert(id.to_string()).then(|| Busy {
            inner: self.clone(),
            id: id.to_string(),
        })
    }
}

impl Driver {
    /// A driver over `store` and `host` with the default [`DriverConfig`].
    pub fn new(
        store: Store,
        host: Arc<dyn HostApi>,
        providers: Providers,
        keys: KeySource,
        upstreams: UpstreamConfig,
    ) -> Self {
        Self::with_config(
            store,
            host,
            providers,
            keys,
            upstreams,
            DriverConfig::default(),
        )
    }

    /// A driver with an explicit configuration.
    pub fn with_config(
        store: Store,
        host: Arc<dyn HostApi>,
        providers: Providers,
        keys: KeySource,
        upstreams: UpstreamConfig,
        cfg: DriverConfig,
    ) -> Self {
        Driver {
            inner: Arc::new(Inner {
                store,
                host,
                providers,
                keys,
                upstreams,
                cfg,
                wake: Notify::new(),
                busy: Mutex::new(HashSet::new()),
                quiet: Mutex::new(std::collections::HashMap::new()),
                printed_url_seen: Mutex::new(std::collections::HashMap::new()),
                custody_known: Mutex::new(std::collections::HashMap::new()),
            }),
        }
    }

    /// Everything from a data directory: `driver.toml` (optional), its
    /// providers directory (else the built-in providers), `upstreams.toml`
    /// (optional) and the vault key file (or [`crate::vault::KEYS_ENV`]).
    pub fn from_data_dir(
        store: Store,
        host: Arc<dyn HostApi>,
        data: &Path,
    ) -> Result<Self, DriverError> {
        let cfg = DriverConfig::load_optional(&paths::driver_config(data))?;
        let providers = match &cfg.providers_dir {
            Some(d) => Providers::load_dir(d)?,
            None => Providers::builtin()?,
        };
        let up_path = cfg
            .upstreams_file
            .clone()
            .unwrap_or_else(|| paths::upstreams(data));
        let upstreams = UpstreamConfig::load_optional(&up_path)?;
        let keys = KeySource::file(&paths::vault_keys(data));
        // Fail at start, not at the first capture, if the keys are unusable.
        keys.vault()?;
        Ok(Self::with_config(
            store, host, providers, keys, upstreams, cfg,
        ))
    }

    /// The upstream providers in force (for `upstream_stats` in `/metrics`).
    pub fn upstreams(&self) -> &UpstreamConfig {
        &self.inner.upstreams
    }

    /// The host agent this driver uses (the API opens desktop streams
    /// through it).
    pub fn host(&self) -> Arc<dyn HostApi> {
        Arc::clone(&self.inner.host)
    }

    /// Who terminals in CLI VMs run as: the user part of `cli_owner`
    /// (`None`: the guest agent's user, root).
    pub fn terminal_user(&self) -> Option<String> {
        let owner = self.inner.cfg.cli_owner.as_deref()?;
        let user = owner.split(':').next().unwrap_or(owner);
        (!user.is_empty()).then(|| user.to_string())
    }

    /// Before a disconnect deletes the sealed credential: take the
    /// provider's delivered files out of the user's running CLI VM.
    /// `Ok(Some(vm))`: removed from that VM; `Ok(None)`: the user has no
    /// running CLI VM. On error the credential must be kept.
    pub async fn remove_delivered(
        &self,
        user_id: &str,
        provider: &str,
    ) -> Result<Option<String>, DisconnectError> {
        disconnect::remove_delivered(&self.inner, user_id, provider).await
    }

    /// Have CLI VM `id` running within `limit` for a use (a terminal, a
    /// delivery): resumed if it hibernated, waited for while it settles.
    pub async fn awake(&self, id: &str, limit: Duration) -> Result<crate::store::Vm, WakeError> {
        idle::awake(&self.inner, id, limit).await
    }

    /// Record a use of VM `id` now (it is not idle).
    pub async fn touch(&self, id: &str) -> Result<(), StoreError> {
        self.inner.store.touch_vm(id, crate::util::now_ms()).await
    }

    /// How often a lasting use (an attached terminal) is recorded again.
    pub fn touch_every(&self) -> Duration {
        idle::touch_every(&self.inner)
    }

    /// The home directory of CLI VMs (where runs start by default).
    pub fn cli_home(&self) -> &str {
        &self.inner.cfg.cli_home
    }

    /// The provider definitions in force.
    pub fn providers(&self) -> &Providers {
        &self.inner.providers
    }

    /// A record changed: look now rather than at the next poll.
    pub fn notify(&self) {
        self.inner.wake.notify_one();
    }

    /// Recover what a previous controller left, then drive records until
    /// `shutdown` becomes true. In-flight steps are simply dropped at
    /// shutdown: each is idempotent and the next start resumes it.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), DriverError> {
        let inner = self.inner;
        vm::register_host(&inner).await?;
        vm::adopt_created(&inner).await?;
        let report = crate::recovery::recover(&inner.store, &*inner.host).await?;
        if inner.upstreams.is_empty() {
            if inner.cfg.direct_egress_without_upstream {
                tracing::warn!(
                    "NO UPSTREAM PROXY IS CONFIGURED: every VM's traffic leaves DIRECTLY from this host's address (deny list in force), so all users share one outbound IP; list upstream providers in <data>/upstreams.toml"
                );
            } else {
                tracing::warn!(
                    "no upstream proxy is configured and direct egress is off: VMs have no egress, so sign-in pages cannot load; list upstream providers in <data>/upstreams.toml"
                );
            }
        }
        tracing::info!(?report, "driver: recovery done, driving records");
        let poll = Duration::from_millis(inner.cfg.poll_ms);
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            if let Err(e) = pass(&inner).await {
                // A store hiccup (e.g. a restarting PostgreSQL) is retried
                // next pass; records keep their deadlines meanwhile.
                tracing::warn!(error = %e, "driver pass failed; retrying");
            }
            tokio::select! {
                _ = inner.wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}

/// One pass: fail overdue records, then start a step for every record that
/// is not being stepped already and is not resting after a quiet step.
async fn pass(inner: &Arc<Inner>) -> Result<(), StoreError> {
    crate::recovery::fail_overdue(&inner.store, crate::util::now_ms()).await?;
    let vms = inner.store.non_final_vms().await?;
    let sessions = inner.store.non_final_sessions().await?;
    let runs = inner.store.active_runs().await?;
    let custody = inner.store.custody_targets().await?;
    {
        // Forget records that ended.
        let held: Vec<String> = custody.iter().map(custody::record_id).collect();
        let live: HashSet<&str> = vms
            .iter()
            .map(|v| v.id.as_str())
            .chain(sessions.iter().map(|s| s.id.as_str()))
            .chain(runs.iter().map(|r| r.id.as_str()))
            .chain(held.iter().map(String::as_str))
            .collect();
        lock(&inner.quiet).retain(|id, _| live.contains(id.as_str()));
    }
    for v in vms {
        let (id, version) = (v.id.clone(), v.life.version);
        spawn_step(
            inner,
            id,
            version,
            move |i| async move { vm::step(&i, v).await },
        );
    }
    custody::schedule(inner, custody, &sessions);
    for s in sessions {
        let (id, version) = (s.id.clone(), s.life.version);
        spawn_step(inner, id, version, move |i| async move {
            session::step(&i, s).await
        });
    }
    for r in runs {
        let (id, version) = (r.id.clone(), r.version);
        spawn_step(inner, id, version, move |i| async move {
            runs::step(&i, r).await
        });
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Run one step of record `id` (at `version`) in its own task, unless it is
/// being stepped or resting. A step that changed nothing rests the record
/// for `idle_poll_ms` (unless the record changes meanwhile), so waiting
/// states do not keep a VM busy answering execs; one that changed something
/// wakes the loop, since that may let other records move.
fn spawn_step<F, Fut>(inner: &Arc<Inner>, id: String, version: i64, step: F)
where
    F: FnOnce(Arc<Inner>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<bool, StoreError>> + Send,
{
    if let Some((v, until)) = lock(&inner.quiet).get(&id) {
        if *v == version && std::time::Instant::now() < *until {
            return;
        }
    }
    let Some(busy) = inner.claim(&id) else {
        return;
    };
    let inner = inner.clone();
    tokio::spawn(async move {
        let _busy = busy;
        match step(inner.clone()).await {
            Ok(true) => {
                lock(&inner.quiet).remove(&id);
                inner.wake.notify_one();
            }
            Ok(false) => {
                let until =
                    std::time::Instant::now() + Duration::from_millis(inner.cfg.idle_poll_ms);
                lock(&inner.quiet).insert(id, (version, until));
            }
            Err(e) => {
                tracing::warn!(record = %id, error = %e, "driver step failed; retrying next pass")
            }
        }
    });
}
