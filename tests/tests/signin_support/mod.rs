//! What the browser-image sign-in tests share: a `polydev up` with the
//! test provider, the run's CA and the test CLI provisioned into VMs, a
//! real authorization server over TLS, and one upstream proxy port per
//! person (each its own proxy, leaving from its own loopback address).

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::egress_support::{
    basic, consecutive_listeners, start_http_upstream_only_on, unique, write_upstreams, ProxyLog,
};
use polydev_e2e::http::{call, make_token, new_user, redeem_link, start_up, ApiProcess};
use polydev_e2e::oauth::{random_hex, Pki, SigninServer, ISSUER_HOST};
use polydev_e2e::rfb::{self, WsStream};
use serde_json::{json, Value};

/// A desktop under TCG on a loaded 2-core host takes minutes.
pub const DESKTOP_DEADLINE: Duration = Duration::from_secs(600);
/// F5: reload. A person reloads a page that loaded before the browser
/// trusted the run's CA (Chromium applies the CA policy ~6-9 s after the
/// file appears and does not retry an error page by itself).
pub const F5: u32 = 0xffc2;

/// The static test CLI that the README's setup builds.
pub fn testcli_bin() -> PathBuf {
    polydev_e2e::static_test_bin("polydev-testcli")
}

pub fn artifacts() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&d).expect("artifact dir");
    d
}

/// Chromium's managed policy that makes it trust the run's CA (base64 DER).
fn ca_policy(ca_pem: &Path) -> String {
    use base64_der::encode;
    let pem = std::fs::read_to_string(ca_pem).expect("read CA");
    json!({ "CACertificates": [encode(&pem)] }).to_string()
}

/// PEM to base64 DER: the lines between the armour, joined.
mod base64_der {
    pub fn encode(pem: &str) -> String {
        pem.lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::trim)
            .collect()
    }
}

/// The API as one user: address and bearer header.
pub struct Api {
    pub addr: String,
    pub auth: String,
}

impl Api {
    pub fn get(&self, path: &str) -> Value {
        let r = call(
            &self.addr,
            "GET",
            path,
            &[("authorization", &self.auth)],
            None,
        );
        assert_eq!(r.status, 200, "GET {path}: {:?}", r.json());
        r.json()
    }

    pub fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = call(
            &self.addr,
            "POST",
            path,
            &[("authorization", &self.auth)],
            Some(&body),
        );
        (r.status, r.json())
    }

    /// Poll the session until `done(state)`; panics when it ends otherwise.
    pub fn wait_session(&self, id: &str, what: &str, deadline: Duration, done: &[&str]) -> Value {
        let until = Instant::now() + deadline;
        loop {
            let s = self.get(&format!("/api/v1/sessions/{id}"));
            let st = s["state"].as_str().unwrap_or_default();
            if done.contains(&st) {
                return s;
            }
            assert!(
                !s["done"].as_bool().unwrap_or(false),
                "session {id} ended while waiting for {what}: {s}"
            );
            assert!(Instant::now() < until, "{what}: session stuck: {s}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Asserts the caller has a sealed credential for `provider`.
    pub fn has_credential(&self, provider: &str) {
        let creds = self.get("/api/v1/credentials");
        assert!(
            creds
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["provider"] == provider)),
            "no {provider} credential: {creds}"
        );
    }

    /// Wait until the VM `id` is destroyed.
    pub fn wait_destroyed(&self, id: &str) {
        let until = Instant::now() + Duration::from_secs(300);
        loop {
            let vm = self.get(&format!("/api/v1/vms/{id}"));
            if vm["state"] == "destroyed" {
                return;
            }
            assert!(Instant::now() < until, "VM {id} not destroyed: {vm}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The session's desktop as a person's screen, keyboard and mouse.
    pub fn desktop(&self, id: &str) -> rfb::Session<WsStream> {
        let (st, t) = self.post(
            "/api/v1/tickets",
            json!({"kind": "desktop", "resource_id": id}),
        );
        assert_eq!(st, 201, "{t}");
        let ticket = t["ticket"].as_str().expect("ticket");
        let url = format!(
            "ws://{}/api/v1/sessions/{id}/desktop?ticket={ticket}",
            self.addr
        );
        let stream = std::net::TcpStream::connect(&self.addr).expect("connect API");
        stream.set_read_timeout(Some(Duration::from_secs(120))).ok();
        let (ws, resp) = tungstenite::client::client(url, stream).expect("desktop WebSocket");
        assert_eq!(resp.status(), 101);
        rfb::Session::handshake(WsStream::new(ws)).expect("RFB handshake over the desktop stream")
    }
}

/// One person: their account at the authorization server, the API as
/// them, and the upstream their VMs leave through.
pub struct Person {
    pub name: String,
    pub password: String,
    pub api: Api,
    pub user_id: String,
}

/// One of the users' upstreams: its port (in the provider's range) and
/// the source address the authorization server sees for it.
pub struct Upstream {
    pub port: u16,
    pub source: Ipv4Addr,
    pub log: ProxyLog,
}

/// `polydev up` with the test provider, the run's CA and test CLI
/// provisioned into VMs, one upstream provider with a port per person
/// (each port its own proxy, leaving from its own address).
pub struct World {
    // Dropped first: the processes go before their directory.
    _reaper: polydev_e2e::Reaper,
    _dir: tempfile::TempDir,
    pub data: PathBuf,
    pub up: ApiProcess,
    pub server: SigninServer,
    pub upstreams: Vec<Upstream>,
    pub upstream_auth: String,
    /// People with accounts here (none when the first-start link is
    /// left for a browser: [`world_unclaimed`]).
    pub people: Vec<Person>,
    /// The first person's login session (the administrator's cookie).
    pub admin_cookie: String,
    /// The accounts at the authorization server: name, password.
    pub accounts: Vec<(String, String)>,
    /// The API's address.
    pub addr: String,
    /// The first-start login link's token, when nobody used it.
    pub first_link: Option<String>,
}

/// The world, its first person the administrator the first start made.
pub fn world(names: &[&str]) -> World {
    build(names, true)
}

/// The world with the first-start link unused (for a browser to open);
/// `names` are accounts at the authorization server only.
pub fn world_unclaimed(names: &[&str]) -> World {
    build(names, false)
}

fn build(names: &[&str], claim: bool) -> World {
    polydev_e2e::require_images(&["browser", "cli"]);
    let testcli = testcli_bin();
    let dir = tempfile::Builder::new()
        .prefix("pdsi")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let data = dir.path().join("data");
    let conf = dir.path().join("conf");
    std::fs::create_dir_all(data.join("providers")).expect("providers dir");
    std::fs::create_dir_all(&conf).expect("conf dir");

    let pki = Pki::generate(&conf, ISSUER_HOST);
    let accounts: Vec<(String, String)> = names
        .iter()
        .map(|n| (n.to_string(), random_hex(8)))
        .collect();
    let pairs: Vec<(&str, &str)> = accounts
        .iter()
        .map(|(n, p)| (n.as_str(), p.as_str()))
        .collect();
    let server = SigninServer::start(&conf, &pki, &pairs);

    // The users' upstreams: one port each, each leaving from its own
    // address; each maps the provider's name to the loopback server and
    // refuses everything else.
    let proxy_user = "acct";
    let proxy_password = unique("up");
    let count = u16::try_from(names.len()).expect("a few people");
    let upstreams: Vec<Upstream> = consecutive_listeners(count)
        .into_iter()
        .zip(3u8..)
        .map(|(l, i)| {
            let source = Ipv4Addr::new(127, 0, 0, i);
            let (port, log) = start_http_upstream_only_on(
                l,
                source,
                Some(basic(proxy_user, &proxy_password)),
                vec![(
                    format!("{ISSUER_HOST}:443"),
                    SocketAddr::from((Ipv4Addr::LOCALHOST, server.port)),
                )],
            );
            Upstream { port, source, log }
        })
        .collect();
    let first = upstreams.first().expect("one upstream").port;
    let last = upstreams.last().expect("one upstream").port;
    write_upstreams(
        &data,
        &format!("{first}-{last}"),
        proxy_user,
        &proxy_password,
    );

    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../providers/testcli.toml"),
        data.join("providers/testcli.toml"),
    )
    .expect("install the test CLI's provider definition");
    let policy = conf.join("ca-policy.json");
    std::fs::write(&policy, ca_policy(&pki.ca_pem)).expect("write policy");
    // Production defaults for everything but the providers, the polling
    // pace and what tests must put into VMs: the test CLI, and the run's CA
    // for it (the system bundle) and for Chromium (its CA policy).
    std::fs::write(
        data.join("driver.toml"),
        format!(
            r#"providers_dir = "{providers}"
poll_ms = 200
idle_poll_ms = 500
vm_setup = ["sh", "-c", "cat /usr/local/share/ca-certificates/polydev-test.crt >> /etc/ssl/certs/ca-certificates.crt"]

[[vm_files]]
source = "{testcli}"
path = "/usr/local/bin/polydev-testcli"
mode = "0755"

[[vm_files]]
source = "{ca}"
path = "/usr/local/share/ca-certificates/polydev-test.crt"

[[vm_files]]
source = "{policy}"
path = "/etc/chromium/policies/managed/polydev-test-ca.json"
kinds = ["browser"]
"#,
            providers = data.join("providers").display(),
            testcli = testcli.display(),
            ca = pki.ca_pem.display(),
            policy = policy.display(),
        ),
    )
    .expect("write driver.toml");

    let (up, addr, link) = start_up(&data, "up-signin.log");
    let link = link.unwrap_or_else(|| panic!("no login link: {}", up.text()));
    if !claim {
        return World {
            _reaper: polydev_e2e::Reaper(data.clone()),
            _dir: dir,
            data,
            up,
            server,
            upstreams,
            upstream_auth: basic(proxy_user, &proxy_password),
            people: Vec::new(),
            admin_cookie: String::new(),
            accounts,
            addr,
            first_link: Some(link),
        };
    }
    let scopes = [
        "sessions:read",
        "sessions:write",
        "vms:read",
        "credentials:read",
        "streams:connect",
    ];
    // The first person is the administrator the first start makes; the
    // others are accounts the administrator creates.
    let admin_cookie = redeem_link(&addr, &link);
    let people = accounts
        .clone()
        .into_iter()
        .enumerate()
        .map(|(i, (name, password))| {
            let cookie = if i == 0 {
                admin_cookie.clone()
            } else {
                new_user(&addr, &admin_cookie, &name)
            };
            let token = make_token(&addr, &cookie, "signin", &scopes);
            let api = Api {
                addr: addr.clone(),
                auth: format!("Bearer {token}"),
            };
            let user_id = api.get("/api/v1/me")["id"]
                .as_str()
                .expect("user id")
                .to_string();
            Person {
                name,
                password,
                api,
                user_id,
            }
        })
        .collect();
    World {
        _reaper: polydev_e2e::Reaper(data.clone()),
        _dir: dir,
        data,
        up,
        server,
        upstreams,
        upstream_auth: basic(proxy_user, &proxy_password),
        people,
        admin_cookie,
        accounts,
        addr,
        first_link: None,
    }
}
