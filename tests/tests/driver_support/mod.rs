//! The test provider definition shared by the controller's end-to-end
//! tests: a login script instead of a real CLI (no internet), its auth URL
//! under `https://auth.test.invalid/`, and one captured JSON file; and the
//! wait for a session to end.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use polydev_controller::driver::{Driver, DriverConfig, KeySource, RemoteHost, LOCAL_HOST_ID};
use polydev_controller::providers::Providers;
use polydev_controller::state::Lifecycle;
use polydev_controller::store::{Session, Store};
use polydev_controller::upstream::UpstreamConfig;
use polydev_controller::vault::Keyring;

/// A driver over the host agent of data directory `data` (its
/// `host.sock`), with the providers of `data/providers` and a fresh key.
pub fn driver_at_host(
    store: &Store,
    data: &std::path::Path,
    upstreams: UpstreamConfig,
    cfg: DriverConfig,
) -> Driver {
    driver_with_keys(
        store,
        data,
        upstreams,
        cfg,
        KeySource::fixed(Keyring::generate().expect("a vault key")),
    )
}

/// [`driver_at_host`] with the vault keys of `keys` (a test that seals or
/// opens records itself shares a key file with the driver).
pub fn driver_with_keys(
    store: &Store,
    data: &std::path::Path,
    upstreams: UpstreamConfig,
    cfg: DriverConfig,
    keys: KeySource,
) -> Driver {
    Driver::with_config(
        store.clone(),
        std::sync::Arc::new(RemoteHost::new(LOCAL_HOST_ID, &data.join("host.sock"))),
        Providers::load_dir(&data.join("providers")).expect("the test's providers load"),
        keys,
        upstreams,
        cfg,
    )
}

/// Poll the store until session `id` is final (at most `limit`).
pub fn wait_final(
    rt: &tokio::runtime::Runtime,
    store: &Store,
    id: &str,
    limit: Duration,
) -> Session {
    let deadline = Instant::now() + limit;
    loop {
        let now = rt.block_on(store.session(id)).expect("read the session");
        if now.life.state.is_final() {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "session {id} stuck in {}",
            now.life.state
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Provider `id` whose login runs `script` with `sh -c`, whose auth URL is
/// recognised in `source` (`output` or `xdg-open`), and which captures
/// `capture` (relative to the login's home) holding a JSON `token`.
pub fn test_provider(id: &str, script: &str, source: &str, capture: &str) -> String {
    format!(
        r#"
id = "{id}"
name = "{id}"
npm_package = "none"

[login]
command = ["sh", "-c", '''{script}''']
timeout_secs = 60

[login.auth_url]
sources = ["{source}"]
pattern = '''https://auth\.test\.invalid/authorize\?[^\s"']+'''
examples = ["https://auth.test.invalid/authorize?state=1"]

[login.callback]
host = "127.0.0.1"
port = "random"
path = "/callback"

[[capture]]
path = "{capture}"
required = true
json_keys = ["token"]

[refresh]
rotates_refresh_token = false

[prompt]
command = ["echo", "{{prompt}}"]
output = "text"
"#
    )
}

/// The controller's HTTP API over a driver, served on a loopback port,
/// and a user with a bearer token of every non-admin scope.
pub struct ServedApi {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The user's bearer token.
    pub token: String,
    /// The user.
    pub user: polydev_controller::store::User,
    stop: tokio::sync::watch::Sender<bool>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl ServedApi {
    /// Serve the API of `store` and `driver` in `rt`, for a new user `name`.
    pub fn start(rt: &tokio::runtime::Runtime, store: &Store, driver: Driver, name: &str) -> Self {
        use polydev_controller::auth::{Auth, AuthConfig, Scope};
        use polydev_controller::http::{self, AppState, HttpConfig};
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let auth = Auth::new(store.clone(), AuthConfig::default()).expect("auth");
        let state = AppState::new(auth.clone(), Some(driver), HttpConfig::unlimited(), stop_rx)
            .expect("app state");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("a loopback port");
        let addr = listener.local_addr().expect("its address").to_string();
        let served = rt.spawn(http::serve(listener, state));
        let user = rt
            .block_on(store.create_user(name, "user"))
            .expect("a user");
        let scopes: Vec<Scope> = Scope::ALL.into_iter().filter(|s| !s.admin_only()).collect();
        let (_, token) = rt
            .block_on(auth.create_token(&user.id, "t", &scopes, None))
            .expect("a token");
        ServedApi {
            addr,
            token,
            user,
            stop,
            served,
        }
    }

    /// Stop serving and wait until the server is done.
    pub fn shutdown(self, rt: &tokio::runtime::Runtime) {
        self.stop
            .send(true)
            .expect("the server listens for its stop");
        rt.block_on(self.served)
            .expect("the server task")
            .expect("the server ends cleanly");
    }
}
