//! Credential custody on a real CLI VM (the cli image, its unprivileged
//! `user`) with the test CLI against the real authorization server
//! (`tests/oidc/signin.js`: rotating refresh tokens, the whole family
//! revoked on reuse), reached by the VM only through the user's upstream:
//!
//! 1. `polydev-testcli refresh` in the CLI VM rotates the refresh token,
//!    and the vault then holds that new version (version 2, its refresh
//!    token the VM's new one, the refresh time and expiry in the API);
//! 2. the CLI VM is recreated: the new one is given the latest version and
//!    `whoami` works with it;
//! 3. the authorization server refuses the old refresh token (reuse
//!    detection), and until the test itself tries it nothing used it;
//! 4. once the family is revoked the CLI's refresh is refused and it
//!    blanks its tokens, as real CLIs do: the API shows `needs_login`;
//! 5. a disconnect deletes the sealed copy and the holder's tokens.
//!
//! The person's sign-in happens on this machine (the test plays the
//! browser with curl through its own proxy; the connect flow through a
//! desktop has its own tests), then the credential is sealed as a capture
//! seals it. From there on everything is the controller's: delivery into
//! the CLI VM, the guest agent's watch, write-back, the new holder.

mod driver_support;
mod egress_support;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use egress_support::{
    basic, consecutive_listeners, exec, start_http_upstream_only, start_http_upstream_only_on,
    write_upstreams,
};
use polydev_controller::driver::{decode_credential, encode_credential, DriverConfig, KeySource};
use polydev_controller::providers::Providers;
use polydev_controller::store::Store;
use polydev_controller::upstream::UpstreamConfig;
use polydev_controller::vault::{Keyring, Vault};
use polydev_e2e::http::Client;
use polydev_e2e::oauth::{random_hex, Lines, Pki, SigninServer, ISSUER, ISSUER_HOST};
use polydev_e2e::Host;
use serde_json::{json, Value};

/// Where the VM's upstream leaves from (what the server sees for the VM).
const VM_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// Where the test's own proxy leaves from (the person's browser, and the
/// test's own use of the old token).
const TEST_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const AUTH: &str = ".testcli/auth.json";

/// What this test asks of the API beyond the shared client.
trait Custody {
    fn credential(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value;
    fn cli_vm(&self) -> String;
}

impl Custody for Client {
    fn credential(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let v = self.wait("/api/v1/credentials", what, Duration::from_secs(300), |v| {
            v.as_array()
                .and_then(|a| a.iter().find(|c| c["provider"] == "testcli"))
                .is_some_and(&pred)
        });
        v.as_array()
            .and_then(|a| a.iter().find(|c| c["provider"] == "testcli"))
            .cloned()
            .expect("the testcli credential")
    }

    /// A new CLI VM, running.
    fn cli_vm(&self) -> String {
        let r = self.call("POST", "/api/v1/vms", Some(json!({"kind": "cli"})));
        assert_eq!(r.status, 201, "{:?}", r.json());
        let id = r.json()["id"].as_str().expect("VM id").to_string();
        self.wait_vm(&id, "running", Duration::from_secs(400));
        id
    }
}

/// curl through the test's proxy, trusting the run's CA, with a cookie
/// jar: (final URL, body).
fn curl(
    dir: &Path,
    proxy: u16,
    ca: &Path,
    url: &str,
    form: Option<&[(&str, &str)]>,
) -> (String, String) {
    let body = dir.join("curl.body");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-L", "--max-redirs", "10", "-o"])
        .arg(&body)
        .args(["-w", "%{url_effective}", "-c"])
        .arg(dir.join("jar"))
        .arg("-b")
        .arg(dir.join("jar"))
        .arg("--cacert")
        .arg(ca)
        .args([
            "--proxy",
            &format!("http://127.0.0.1:{proxy}"),
            "--noproxy",
            "127.0.0.1",
        ]);
    if let Some(form) = form {
        cmd.args(["--data", ""]);
        for (k, v) in form {
            cmd.arg("--data-urlencode").arg(format!("{k}={v}"));
        }
    }
    let out = cmd
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        std::fs::read_to_string(&body).unwrap_or_default(),
    )
}

/// The `action` of the form whose path ends with `/{ending}`.
fn form_action(html: &str, ending: &str) -> String {
    html.split("action=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .find(|a| a.ends_with(&format!("/{ending}")))
        .unwrap_or_else(|| panic!("no {ending} form in: {html}"))
        .to_string()
}

/// `polydev-testcli login` on this machine, with the test as the browser:
/// the CLI's `auth.json`.
fn sign_in(dir: &Path, testcli: &Path, proxy: u16, ca: &Path, user: &str, password: &str) -> Value {
    let home = dir.join("home");
    std::fs::create_dir_all(&home).expect("HOME");
    let mut cli = Command::new(testcli);
    cli.args(["login", "--timeout-secs", "120"])
        .env("HOME", &home)
        .env("HTTPS_PROXY", format!("http://127.0.0.1:{proxy}"))
        .env("SSL_CERT_FILE", ca)
        .env("BROWSER", "true")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for v in [
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cli.env_remove(v);
    }
    let mut child = cli.spawn().expect("start polydev-testcli login");
    let lines = Lines::default();
    lines
        .clone()
        .collect(child.stdout.take().expect("piped stdout"));
    let line = lines
        .wait_for(Duration::from_secs(60), |l| {
            l.starts_with("Open this URL to sign in: ")
        })
        .unwrap_or_else(|| panic!("login printed no URL: {:?}", lines.all()));
    let url = line.trim_start_matches("Open this URL to sign in: ").trim();
    let (_, page) = curl(dir, proxy, ca, url, None);
    let login = format!("{ISSUER}{}", form_action(&page, "login"));
    let (_, consent) = curl(
        dir,
        proxy,
        ca,
        &login,
        Some(&[("username", user), ("password", password)]),
    );
    let confirm = format!("{ISSUER}{}", form_action(&consent, "confirm"));
    let (landed, _) = curl(dir, proxy, ca, &confirm, Some(&[]));
    assert!(
        landed.starts_with("http://127.0.0.1:"),
        "the callback: {landed}"
    );
    let status = child.wait().expect("wait for login");
    assert!(status.success(), "login: {status:?} {:?}", lines.all());
    let text = std::fs::read_to_string(home.join(AUTH)).expect("auth.json");
    serde_json::from_str(&text).expect("auth.json is JSON")
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A test CLI command in the VM as its user: (exit code, output).
fn testcli_in(host: &Host, vm: &str, args: &str) -> (i32, String) {
    let r = exec(
        host,
        vm,
        &format!("runuser -u user -- env HOME=/home/user polydev-testcli {args}"),
    );
    (r.code, format!("{}{}", r.stdout, r.stderr))
}

/// The VM's `auth.json`.
fn auth_in(host: &Host, vm: &str) -> Value {
    let r = host.sh(vm, &format!("cat /home/user/{AUTH}"));
    serde_json::from_str(&r.stdout).expect("the VM's auth.json is JSON")
}

fn events(server: &SigninServer, name: &str) -> Vec<Value> {
    server
        .events()
        .into_iter()
        .filter(|e| e["event"] == name)
        .collect()
}

#[test]
fn one_live_holder_refreshes_written_back_and_recreated_vms_get_the_latest() {
    polydev_e2e::require_images(&["cli"]);
    let started = Instant::now();
    let testcli = polydev_e2e::static_test_bin("polydev-testcli");
    let host = Host::start();
    let data = host.data().to_path_buf();
    let conf = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(data.join("providers")).expect("providers dir");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../providers/testcli.toml"),
        data.join("providers/testcli.toml"),
    )
    .expect("install the test CLI's provider");
    let pki = Pki::generate(conf.path(), ISSUER_HOST);
    let password = random_hex(8);
    let server = SigninServer::start(conf.path(), &pki, &[("carol", &password)]);
    let route = vec![(
        format!("{ISSUER_HOST}:443"),
        SocketAddr::from((Ipv4Addr::LOCALHOST, server.port)),
    )];
    // The user's upstream (the only way out of the VM) and the test's own.
    let up_password = random_hex(8);
    let l = consecutive_listeners(1).pop().expect("a port");
    let (up_port, _up_log) = start_http_upstream_only_on(
        l,
        VM_SOURCE,
        Some(basic("acct", &up_password)),
        route.clone(),
    );
    write_upstreams(&data, &format!("{up_port}-{up_port}"), "acct", &up_password);
    let (test_proxy, _test_log) = start_http_upstream_only(TEST_SOURCE, None, route);

    let cfg = DriverConfig::parse(
        &format!(
            r#"poll_ms = 200
idle_poll_ms = 300
vm_setup = ["sh", "-c", "cat /usr/local/share/ca-certificates/polydev-test.crt >> /etc/ssl/certs/ca-certificates.crt"]

[[vm_files]]
source = "{testcli}"
path = "/usr/local/bin/polydev-testcli"
mode = "0755"

[[vm_files]]
source = "{ca}"
path = "/usr/local/share/ca-certificates/polydev-test.crt"
"#,
            testcli = testcli.display(),
            ca = pki.ca_pem.display(),
        ),
        "driver.toml",
    )
    .expect("driver config");
    let keys_file = data.join("vault-keys.toml");
    let vault = Vault::new(Keyring::load_or_create(&keys_file).expect("vault keys"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let store = rt.block_on(Store::open_in_dir(&data)).expect("store");
    let upstreams =
        UpstreamConfig::load_optional(&data.join("upstreams.toml")).expect("upstreams.toml");
    let driver = driver_support::driver_with_keys(
        &store,
        &data,
        upstreams,
        cfg,
        KeySource::file(&keys_file),
    );
    let (driver_stop, rx) = tokio::sync::watch::channel(false);
    let driver_task = rt.spawn(driver.clone().run(rx));
    let served = driver_support::ServedApi::start(&rt, &store, driver, "carol");
    let api = Client::bearer(&served.addr, &served.token);
    let user = served.user.id.clone();

    // Signed in once; sealed as a capture seals it (the credential's
    // fields only).
    let signed_in = sign_in(
        conf.path(),
        &testcli,
        test_proxy,
        &pki.ca_pem,
        "carol",
        &password,
    );
    let rt1 = signed_in["refresh_token"]
        .as_str()
        .expect("a refresh token")
        .to_string();
    let providers = Providers::load_dir(&data.join("providers")).expect("providers");
    let p = providers.get("testcli").expect("the testcli provider");
    let files = BTreeMap::from([(AUTH.to_string(), signed_in.to_string().into_bytes())]);
    let only = polydev_controller::driver::fields::credential_only(p, files).expect("fields");
    rt.block_on(vault.store(&store, &user, "testcli", &encode_credential(&only)))
        .expect("seal");

    // The CLI VM gets it delivered and holds it.
    let vm1 = api.cli_vm();
    let held = api.credential("delivered into the CLI VM", |c| {
        c["holder_vm_id"] == vm1.as_str()
    });
    assert_eq!(
        (held["version"].as_i64(), held["status"].as_str()),
        (Some(1), Some("ok")),
        "{held}"
    );
    let host_vm1 = rt
        .block_on(store.vm(&vm1))
        .expect("vm")
        .host_vm_id
        .expect("placed");
    let (code, out) = testcli_in(&host, &host_vm1, "whoami");
    assert_eq!(code, 0, "whoami with the delivered copy: {out}");
    assert!(out.contains("signed in as carol"), "{out}");

    // 1. A refresh in the VM rotates the token; the vault follows.
    let refreshed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .expect("clock after 1970");
    let (code, out) = testcli_in(&host, &host_vm1, "refresh");
    assert_eq!(code, 0, "refresh in the VM: {out}");
    let in_vm = auth_in(&host, &host_vm1);
    let rt2 = in_vm["refresh_token"]
        .as_str()
        .expect("refresh token")
        .to_string();
    assert_ne!(rt1, rt2, "the provider rotates refresh tokens");
    let v2 = api.credential("the refresh written back", |c| c["version"] == 2);
    assert_eq!(v2["holder_vm_id"], vm1.as_str(), "{v2}");
    assert_eq!(v2["status"], "ok", "{v2}");
    assert!(
        v2["last_refresh_at"]
            .as_i64()
            .is_some_and(|t| t >= refreshed_at),
        "{v2}"
    );
    assert_eq!(
        v2["expires_at"].as_i64(),
        in_vm["expires_at"].as_i64().map(|s| s * 1000),
        "{v2}"
    );
    let rec = rt
        .block_on(store.credential(&user, "testcli"))
        .expect("store")
        .expect("sealed");
    assert_eq!(rec.version, 2);
    let sealed = decode_credential(&vault.open(&rec).expect("open")).expect("files");
    let sealed: Value = serde_json::from_slice(&sealed[AUTH]).expect("sealed auth.json");
    assert_eq!(
        sealed["refresh_token"],
        rt2.as_str(),
        "the vault holds the VM's new token"
    );
    let grants: Vec<Value> = events(&server, "token")
        .into_iter()
        .filter(|e| e["grant_type"] == "refresh_token")
        .collect();
    assert_eq!(grants.len(), 1, "{grants:?}");
    assert!(
        grants[0]["peer"]
            .as_str()
            .is_some_and(|p| p.ends_with(&VM_SOURCE.to_string())),
        "the refresh came from the VM, through its upstream: {grants:?}"
    );

    // 2. Recreate the CLI VM: the old copy goes with the old VM, the new
    // one gets the latest version.
    let r = api.call("DELETE", &format!("/api/v1/vms/{vm1}"), None);
    assert!(r.status < 300, "{:?}", r.json());
    api.wait(
        &format!("/api/v1/vms/{vm1}"),
        "old CLI VM destroyed",
        Duration::from_secs(300),
        |v| v["state"] == "destroyed",
    );
    let vm2 = api.cli_vm();
    let held = api.credential("delivered into the new CLI VM", |c| {
        c["holder_vm_id"] == vm2.as_str()
    });
    assert_eq!(held["version"], 2, "nothing new was sealed: {held}");
    let host_vm2 = rt
        .block_on(store.vm(&vm2))
        .expect("vm")
        .host_vm_id
        .expect("placed");
    assert_eq!(auth_in(&host, &host_vm2)["refresh_token"], rt2.as_str());
    let (code, out) = testcli_in(&host, &host_vm2, "whoami");
    assert_eq!(code, 0, "whoami in the recreated VM: {out}");

    // 3. Nothing of ours used the old token after the rotation: no refusal
    // so far, one refresh grant. Now the test presents it: refused, and
    // the server revokes the family.
    assert!(
        events(&server, "token_refused").is_empty(),
        "{:?}",
        server.events()
    );
    assert!(
        events(&server, "refresh_reuse").is_empty(),
        "{:?}",
        server.events()
    );
    let (_, reuse) = curl(
        conf.path(),
        test_proxy,
        &pki.ca_pem,
        &format!("{ISSUER}/token"),
        Some(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", &rt1),
            ("client_id", "polydev-testcli"),
        ]),
    );
    let reuse: Value = serde_json::from_str(&reuse).expect("token error JSON");
    assert_eq!(reuse["error"], "invalid_grant", "{reuse}");
    server.wait_event("refresh_reuse", |_| true);

    // 4. The family is revoked: the CLI's refresh is refused, and a CLI
    // then blanks its tokens; the API says to sign in again.
    let (code, out) = testcli_in(&host, &host_vm2, "refresh");
    assert_eq!(code, 3, "refresh after reuse detection: {out}");
    assert!(out.contains("invalid_grant"), "{out}");
    let mut blank = auth_in(&host, &host_vm2);
    blank["access_token"] = json!("");
    blank["refresh_token"] = json!("");
    host.sh(
        &host_vm2,
        &format!(
            "runuser -u user -- sh -c 'umask 077; printf %s \"$1\" > ~/.testcli/auth.json.new && mv ~/.testcli/auth.json.new ~/.testcli/auth.json' sh {}",
            shell_quote(&blank.to_string())
        ),
    );
    let dead = api.credential("needs_login", |c| c["status"] == "needs_login");
    let why = dead["status_reason"].as_str().unwrap_or_default();
    assert!(why.contains("blanked") && why.contains("connect"), "{dead}");
    assert_eq!(
        dead["version"], 2,
        "a dead credential is not sealed: {dead}"
    );

    // 5. Disconnect: the sealed copy goes, and so do the credential's
    // fields in the holder (a file the CLI keeps, without its tokens).
    let r = api.call("DELETE", "/api/v1/credentials/testcli", None);
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["removed_from_vm"], vm2.as_str(), "{:?}", r.json());
    let left = host.sh(
        &host_vm2,
        &format!("cat /home/user/{AUTH} 2>/dev/null || true"),
    );
    assert!(
        !left.stdout.contains("refresh_token") && !left.stdout.contains(&rt2),
        "the holder kept the credential: {}",
        left.stdout
    );
    let creds = api.call("GET", "/api/v1/credentials", None).json();
    assert_eq!(creds, json!([]), "{creds}");

    println!("custody test took {:?}", started.elapsed());
    driver_stop.send(true).ok();
    rt.block_on(driver_task).ok();
    served.shutdown(&rt);
}
