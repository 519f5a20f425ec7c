//! The real pair on loopback: `polydev-testcli` against
//! `tests/oidc/signin.js` (panva/oidc-provider) over TLS with a run-time CA,
//! reached through an HTTP CONNECT proxy that maps `auth.polydev.test:443`.
//! The test plays the browser over HTTP (the desktop e2e uses Chromium).

mod support;

use std::collections::HashMap;
use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use reqwest::Url;
use serde_json::Value;
use support::{
    random_hex, Browser, ConnectProxy, Page, Pki, RunningCli, SigninServer, ISSUER, ISSUER_HOST,
};

const WAIT: Duration = Duration::from_secs(60);
/// Upstream connections of the proxy come from here, so the server's
/// logged peer shows a request came through the proxy.
const PROXY_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// The binary under test: this build's, or `POLYDEV_TESTCLI_BIN` (e.g. the
/// static release build that VMs get) when set.
fn testcli_bin() -> PathBuf {
    std::env::var_os("POLYDEV_TESTCLI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_polydev-testcli")))
}

/// One server, one proxy, one HOME: everything a scenario needs.
struct World {
    dir: tempfile::TempDir,
    pki: Pki,
    server: SigninServer,
    proxy: ConnectProxy,
    password: String,
    fifo: PathBuf,
    browser_script: PathBuf,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = Pki::generate(dir.path(), ISSUER_HOST);
        let password = random_hex(12);
        let server = SigninServer::start(
            dir.path(),
            &pki,
            &[("alice", &password), ("bob", &random_hex(12))],
        );
        let proxy = ConnectProxy::start(
            HashMap::from([(
                format!("{ISSUER_HOST}:443"),
                SocketAddr::from((Ipv4Addr::LOCALHOST, server.port)),
            )]),
            PROXY_SOURCE,
        );
        // $BROWSER writes the URL into a FIFO: the test's read blocks until
        // the CLI really launched it, with no polling.
        let fifo = dir.path().join("browser.fifo");
        let c = std::ffi::CString::new(fifo.to_str().expect("UTF-8 path")).expect("no NUL");
        // SAFETY: mkfifo(3) with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        let browser_script = dir.path().join("browser.sh");
        std::fs::write(
            &browser_script,
            format!("#!/bin/sh\nprintf '%s\\n' \"$1\" >> '{}'\n", fifo.display()),
        )
        .expect("write browser script");
        std::fs::set_permissions(&browser_script, std::fs::Permissions::from_mode(0o755))
            .expect("chmod browser script");
        std::fs::create_dir(dir.path().join("home")).expect("HOME");
        World {
            dir,
            pki,
            server,
            proxy,
            password,
            fifo,
            browser_script,
        }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn auth_json(&self) -> PathBuf {
        self.home().join(".testcli/auth.json")
    }

    fn cli(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(testcli_bin());
        cmd.args(args)
            .env("HOME", self.home())
            .env("HTTPS_PROXY", self.proxy.url())
            .env("SSL_CERT_FILE", &self.pki.ca_pem)
            .env("BROWSER", &self.browser_script);
        for v in [
            "https_proxy",
            "NO_PROXY",
            "no_proxy",
            "ALL_PROXY",
            "all_proxy",
        ] {
            cmd.env_remove(v);
        }
        cmd
    }

    /// Runs a short command to its end: (exit code, stdout, stderr).
    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.cli(args).output().expect("run polydev-testcli");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn browser(&self) -> Browser {
        Browser::new(&self.proxy, &self.pki.ca_pem)
    }

    /// Starts `login`; returns it and the URL it printed, after checking
    /// that `$BROWSER` got the same URL.
    fn start_login(&self) -> (RunningCli, Url) {
        let (tx, rx) = mpsc::channel();
        let fifo = self.fifo.clone();
        std::thread::spawn(move || {
            let mut s = String::new();
            // Opening a FIFO for reading blocks until the script opens it.
            if let Ok(mut f) = std::fs::File::open(fifo) {
                let _ = f.read_to_string(&mut s);
            }
            let _ = tx.send(s);
        });
        let login = RunningCli::spawn(self.cli(&["login", "--timeout-secs", "120"]));
        let line = login
            .stdout
            .wait_for(WAIT, |l| l.starts_with("Open this URL to sign in: "))
            .unwrap_or_else(|| panic!("login printed no URL: {:?}", login.stdout.all()));
        let printed = line.trim_start_matches("Open this URL to sign in: ");
        let launched = rx.recv_timeout(WAIT).expect("$BROWSER was not started");
        assert_eq!(launched.trim(), printed, "$BROWSER got another URL");
        (login, Url::parse(printed).expect("authorize URL"))
    }
}

fn query(url: &Url) -> HashMap<String, String> {
    url.query_pairs().into_owned().collect()
}

/// The page's CSS rule that fills the whole page with `colour`.
fn page_background(colour: &str) -> String {
    format!("html, body {{ background: {colour};")
}

/// Opens the authorize URL and lands on the sign-in page.
fn open_sign_in(browser: &mut Browser, url: &Url, colours: &HashMap<String, String>) -> Page {
    let first = browser.get(url);
    assert_eq!(first.status, 303, "{}", first.body);
    let page = browser.follow(first);
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.url.path().starts_with("/interaction/"), "{}", page.url);
    assert!(page
        .body
        .contains(&page_background(&colours["login_background"])));
    assert!(page.body.contains(&colours["username_input"]));
    assert!(page.body.contains(&colours["password_input"]));
    assert!(page.body.contains(&colours["submit_button"]));
    assert!(page.body.contains("id=\"username\""));
    assert!(page.body.contains("autofocus"));
    assert!(!page.body.contains("id=\"error\""));
    assert!(!page.body.contains("<script"), "pages need no JavaScript");
    page
}

/// Signs in as alice with her password and lands on the consent page.
fn sign_in(browser: &mut Browser, page: &Page, password: &str) -> Page {
    let answer = browser.post(
        &page.form_action("submit"),
        &[("username", "alice"), ("password", password)],
    );
    assert_eq!(answer.status, 303, "{}", answer.body);
    let consent = browser.follow(answer);
    assert_eq!(consent.status, 200, "{}", consent.body);
    consent
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).expect("read auth.json")).expect("auth.json is JSON")
}

fn index_of(events: &[Value], name: &str) -> usize {
    events
        .iter()
        .position(|e| e["event"] == name)
        .unwrap_or_else(|| panic!("no {name} event in {events:?}"))
}

#[test]
fn sign_in_refresh_and_reuse_revokes_the_family() {
    let w = World::new();
    let colours = support::colours();
    let (login, url) = w.start_login();

    let q = query(&url);
    assert_eq!(url.host_str(), Some(ISSUER_HOST));
    assert_eq!(q["client_id"], "polydev-testcli");
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["prompt"], "consent");
    assert_eq!(q["scope"], "openid profile offline_access");
    assert!(q["redirect_uri"].starts_with("http://127.0.0.1:"));
    assert!(q["redirect_uri"].ends_with("/callback"));

    let mut browser = w.browser();
    let page = open_sign_in(&mut browser, &url, &colours);

    // A wrong password shows the page again, with the banner.
    let wrong = browser.post(
        &page.form_action("submit"),
        &[("username", "alice"), ("password", "not-her-password")],
    );
    assert_eq!(wrong.status, 200);
    assert!(wrong.body.contains("Wrong username or password"));
    assert!(wrong.body.contains("id=\"error\""));
    // Same page as the first time (empty fields, focus on the user name),
    // so a pixel-driven test repeats the same steps.
    assert!(wrong.body.contains("autofocus") && !wrong.body.contains("value="));
    assert!(wrong.body.contains(&colours["error_banner"]));
    assert!(wrong
        .body
        .contains(&page_background(&colours["login_background"])));

    // The flow goes on with the right one.
    let consent = sign_in(&mut browser, &wrong, &w.password);
    assert!(consent
        .body
        .contains(&page_background(&colours["consent_background"])));
    assert!(consent.body.contains("id=\"allow\"") && consent.body.contains("id=\"deny\""));
    assert!(consent.body.contains(&colours["allow_button"]));
    assert!(consent.body.contains(&colours["deny_button"]));
    assert!(consent.body.contains("Polydev Test CLI"));
    assert!(consent.body.contains("offline_access"));

    let allowed = browser.post(&consent.form_action("allow"), &[]);
    let done = browser.follow(allowed);
    assert_eq!(done.url.host_str(), Some("127.0.0.1"));
    assert_eq!(done.url.path(), "/callback");
    assert_eq!(done.status, 200, "{}", done.body);
    assert!(done.body.contains("Signed in, you can close this window"));

    let stdout = login.stdout.clone();
    let (code, stderr) = login.wait(WAIT);
    assert_eq!(code, 0, "login failed: {stderr}");
    assert!(stdout.all().iter().any(|l| l == "signed in"));

    // signin.js made its signing keys private.
    assert_eq!(mode(&w.dir.path().join("jwks.json")), 0o600);

    // auth.json: 0600 in a 0700 directory, with the three tokens.
    let auth = w.auth_json();
    assert_eq!(mode(&auth), 0o600);
    assert_eq!(mode(auth.parent().expect("dir")), 0o700);
    let creds = read_json(&auth);
    assert_eq!(creds["issuer"], ISSUER);
    assert_eq!(creds["client_id"], "polydev-testcli");
    assert_eq!(creds["token_type"], "Bearer");
    for t in ["access_token", "refresh_token", "id_token"] {
        assert!(creds[t].as_str().is_some_and(|s| s.len() > 10), "{t}");
    }
    assert!(creds["expires_at"]
        .as_u64()
        .is_some_and(|e| e > 1_700_000_000));

    // The server saw the wrong password, then the right one, both through
    // the proxy; and the code exchange.
    // The log is read by another thread: wait for the last line needed,
    // the earlier ones are then there too.
    w.server.wait_event("login_ok", |_| true);
    let events = w.server.events();
    let failed = index_of(&events, "login_failed");
    let ok = index_of(&events, "login_ok");
    assert!(failed < ok, "{events:?}");
    for i in [failed, ok] {
        assert_eq!(events[i]["user"], "alice");
        assert_eq!(events[i]["peer"], PROXY_SOURCE.to_string());
    }
    w.server.wait_event("consent_ok", |e| e["user"] == "alice");
    w.server.wait_event("token", |e| {
        e["grant_type"] == "authorization_code" && e["user"] == "alice"
    });
    assert!(!w.proxy.targets().is_empty());
    assert!(
        w.proxy
            .targets()
            .iter()
            .all(|t| t == "auth.polydev.test:443"),
        "{:?}",
        w.proxy.targets()
    );

    let (code, out, err) = w.run(&["whoami"]);
    assert_eq!(
        (code, out.trim()),
        (0, "signed in as alice (sub alice)"),
        "{err}"
    );
    w.server
        .wait_event("userinfo", |e| e["status"] == 200 && e["user"] == "alice");

    let (code, out, err) = w.run(&["prompt", "hello"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines[0]["type"], "start");
    assert_eq!(lines[0]["prompt"], "hello");
    assert_eq!(lines[lines.len() - 1]["type"], "result");

    // refresh rotates.
    let (code, out, err) = w.run(&["refresh"]);
    assert_eq!((code, out.trim()), (0, "refreshed"), "{err}");
    let rotated = read_json(&auth);
    assert_ne!(rotated["refresh_token"], creds["refresh_token"]);
    assert_ne!(rotated["access_token"], creds["access_token"]);
    assert_eq!(mode(&auth), 0o600);
    let (code, _, err) = w.run(&["whoami"]);
    assert_eq!(code, 0, "{err}");

    // The used refresh token again: refused, and the family is revoked.
    let token_endpoint = Url::parse(&format!("{ISSUER}/token")).expect("URL");
    let reuse = browser.post(
        &token_endpoint,
        &[
            ("grant_type", "refresh_token"),
            (
                "refresh_token",
                creds["refresh_token"].as_str().expect("str"),
            ),
            ("client_id", "polydev-testcli"),
        ],
    );
    assert_eq!(reuse.status, 400, "{}", reuse.body);
    let body: Value = serde_json::from_str(&reuse.body).expect("JSON error");
    assert_eq!(body["error"], "invalid_grant");
    w.server
        .wait_event("refresh_reuse", |e| e["user"] == "alice");

    let before = std::fs::read(&auth).expect("auth.json");
    let (code, _, err) = w.run(&["refresh"]);
    assert_eq!(
        code, 3,
        "the newest refresh token must be revoked too: {err}"
    );
    assert!(err.contains("invalid_grant"), "{err}");
    assert_eq!(
        std::fs::read(&auth).expect("auth.json"),
        before,
        "refused refresh changed auth.json"
    );
    let (code, _, err) = w.run(&["whoami"]);
    assert_eq!(code, 3, "the grant's access token must be revoked: {err}");
    assert!(err.contains("credential rejected"), "{err}");
    w.server.wait_event("userinfo", |e| e["status"] == 401);

    // Revocation answers 200 even for a dead token (RFC 7009 §2.2), logged.
    let revoked = browser.post(
        &Url::parse(&format!("{ISSUER}/token/revocation")).expect("URL"),
        &[
            ("token", rotated["refresh_token"].as_str().expect("str")),
            ("client_id", "polydev-testcli"),
        ],
    );
    assert_eq!(revoked.status, 200, "{}", revoked.body);
    w.server.wait_event("revocation", |e| e["status"] == 200);

    // Nothing secret reached the log.
    let log = w.server.stdout.all().join("\n");
    for secret in [
        w.password.as_str(),
        creds["access_token"].as_str().expect("str"),
        creds["refresh_token"].as_str().expect("str"),
        rotated["refresh_token"].as_str().expect("str"),
    ] {
        assert!(!log.contains(secret), "a secret is in the server log");
    }

    let World { server, .. } = w;
    assert!(server.stop().success(), "SIGTERM must end signin.js with 0");
}

#[test]
fn deny_ends_the_login_with_access_denied() {
    let w = World::new();
    let colours = support::colours();
    let (login, url) = w.start_login();
    let mut browser = w.browser();
    let page = open_sign_in(&mut browser, &url, &colours);
    let consent = sign_in(&mut browser, &page, &w.password);

    let denied = browser.post(&consent.form_action("deny"), &[]);
    let done = browser.follow(denied);
    assert_eq!(done.url.path(), "/callback");
    assert_eq!(query(&done.url)["error"], "access_denied");
    assert_eq!(done.status, 400);
    assert!(done.body.contains("access_denied"));

    let (code, stderr) = login.wait(WAIT);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("login failed: access_denied"), "{stderr}");
    assert!(!w.auth_json().exists());
    w.server
        .wait_event("consent_denied", |e| e["user"] == "alice");
}

#[test]
fn pkce_plain_or_missing_and_foreign_redirects_are_refused() {
    let w = World::new();
    let mut browser = w.browser();
    let redirect = "http://127.0.0.1:9/callback";
    let authorize = |extra: &[(&str, &str)], redirect_uri: &str| {
        let mut url = Url::parse(&format!("{ISSUER}/auth")).expect("URL");
        url.query_pairs_mut()
            .append_pair("client_id", "polydev-testcli")
            .append_pair("response_type", "code")
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("scope", "openid")
            .append_pair("state", "st")
            .extend_pairs(extra);
        url
    };
    let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

    for (what, extra) in [
        (
            "plain",
            vec![
                ("code_challenge", challenge),
                ("code_challenge_method", "plain"),
            ],
        ),
        ("missing", vec![]),
    ] {
        let answer = browser.get(&authorize(&extra, redirect));
        let location = answer
            .location
            .unwrap_or_else(|| panic!("{what}: no redirect: {}", answer.body));
        assert!(
            location.as_str().starts_with(redirect),
            "{what}: {location}"
        );
        let q = query(&location);
        assert_eq!(q["error"], "invalid_request", "{what}: {q:?}");
        assert_eq!(q["state"], "st");
    }
    for why in ["code_challenge_method", "requires PKCE"] {
        w.server.wait_event("authorization_refused", |e| {
            e["error"] == "invalid_request"
                && e["error_description"]
                    .as_str()
                    .is_some_and(|d| d.contains(why))
        });
    }

    // S256 on any loopback port is accepted (RFC 8252 §7.3).
    let ok = browser.get(&authorize(
        &[
            ("code_challenge", challenge),
            ("code_challenge_method", "S256"),
        ],
        "http://127.0.0.1:41234/callback",
    ));
    let location = ok.location.expect("redirect to the sign-in page");
    assert!(location.path().starts_with("/interaction/"), "{location}");

    // A redirect URI that is not the registered one is never redirected to.
    let foreign = browser.get(&authorize(
        &[
            ("code_challenge", challenge),
            ("code_challenge_method", "S256"),
        ],
        "http://evil.test/callback",
    ));
    assert_eq!(foreign.status, 400);
    assert!(foreign.location.is_none());
}

#[test]
fn missing_credentials_exit_4_and_unreadable_roots_exit_2() {
    let home = tempfile::tempdir().expect("temp dir");
    let run = |args: &[&str], cert: &str| {
        let out = Command::new(testcli_bin())
            .args(args)
            .env("HOME", home.path())
            .env("SSL_CERT_FILE", cert)
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .output()
            .expect("run polydev-testcli");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for cmd in [&["whoami"][..], &["refresh"], &["prompt", "x"]] {
        let (code, err) = run(cmd, "/nonexistent/ca.pem");
        assert_eq!(code, 4, "{cmd:?}: {err}");
        assert!(err.contains("polydev-testcli login"), "{err}");
    }
    std::fs::create_dir(home.path().join(".testcli")).expect("mkdir");
    std::fs::write(home.path().join(".testcli/auth.json"), "not json").expect("write");
    let (code, err) = run(&["whoami"], "/nonexistent/ca.pem");
    assert_eq!(code, 4, "{err}");

    let (code, err) = run(&["login", "--timeout-secs", "1"], "/nonexistent/ca.pem");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("SSL_CERT_FILE"), "{err}");

    // Valid credentials and roots, but the proxy is not there: exit 2.
    let pki = Pki::generate(home.path(), ISSUER_HOST);
    std::fs::write(
        home.path().join(".testcli/auth.json"),
        serde_json::json!({
            "issuer": ISSUER, "client_id": "polydev-testcli", "access_token": "a",
            "refresh_token": "r", "id_token": "i", "token_type": "Bearer", "expires_at": 0
        })
        .to_string(),
    )
    .expect("write auth.json");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_proxy = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let out = Command::new(testcli_bin())
        .arg("whoami")
        .env("HOME", home.path())
        .env("SSL_CERT_FILE", &pki.ca_pem)
        .env("HTTPS_PROXY", &dead_proxy)
        .env_remove("https_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .expect("run polydev-testcli");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("HTTPS_PROXY"), "{err}");
}
