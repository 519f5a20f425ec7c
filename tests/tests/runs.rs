//! Prompt runs on a real CLI VM (the cli image, its unprivileged `user`),
//! through the public API and `polydev run`, with the test CLI
//! (`polydev-testcli`, placed into the VM by `[[vm_files]]` before the
//! first run) as the provider's CLI: a prompt streams the test CLI's typed
//! events and exits 0; a long run is cancelled and its processes are gone
//! from the VM; a run goes on while the controller's driver is down and
//! the next driver reads it to the end, every line once.
//!
//! One VM for the whole test. The API and the driver run in process over
//! the real host agent; the credential is sealed in the vault and its file
//! written into the VM by the test (the connect flow has its own tests).
//! Prints the prompt start latency (request → first output event).

use std::time::{Duration, Instant};

use polydev_controller::driver::DriverConfig;
use polydev_controller::store::Store;
use polydev_controller::upstream::UpstreamConfig;
use polydev_controller::vault::{Keyring, Vault};
use polydev_e2e::http::{sse_until, Client};
use polydev_e2e::Host;
use serde_json::{json, Value};

mod driver_support;

/// What this test asks of the runs API.
trait Runs {
    fn wait_run(
        &self,
        id: &str,
        pred: impl Fn(&Value) -> bool,
        what: &str,
        limit: Duration,
    ) -> Value;
    fn events(&self, id: &str) -> Vec<Value>;
    fn wait_output(&self, id: &str, kind: &str, limit: Duration) -> Vec<Value>;
}

impl Runs for Client {
    fn wait_run(
        &self,
        id: &str,
        pred: impl Fn(&Value) -> bool,
        what: &str,
        limit: Duration,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.call("GET", &format!("/api/v1/runs/{id}"), None).json();
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "run {id}: not {what}: {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn events(&self, id: &str) -> Vec<Value> {
        self.call("GET", &format!("/api/v1/runs/{id}/events"), None)
            .json()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn wait_output(&self, id: &str, kind: &str, limit: Duration) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let evs = self.events(id);
            if evs
                .iter()
                .any(|e| e["source"] == "output" && e["type"] == kind)
            {
                return evs;
            }
            assert!(
                Instant::now() < deadline,
                "run {id}: no {kind} event: {evs:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn prompts_run_stream_cancel_and_outlive_the_controller() {
    polydev_e2e::require_images(&["cli"]);
    let testcli = polydev_e2e::static_test_bin("polydev-testcli");
    let host = Host::start();
    let data = host.data().to_path_buf();
    std::fs::create_dir_all(data.join("providers")).unwrap();
    for p in ["testcli", "claude-code", "codex", "gemini-cli"] {
        std::fs::copy(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../providers/{p}.toml")),
            data.join(format!("providers/{p}.toml")),
        )
        .unwrap();
    }
    // No upstream and no direct egress: whatever a CLI asks for is refused
    // (and logged) at the host, so nothing leaves the machine.
    let cfg_text = format!(
        "poll_ms = 200\nidle_poll_ms = 300\ndirect_egress_without_upstream = false\n\n[[vm_files]]\nsource = \"{}\"\npath = \"/usr/local/bin/polydev-testcli\"\nmode = \"0755\"\nkinds = [\"cli\"]\n",
        testcli.display()
    );
    let cfg = DriverConfig::parse(&cfg_text, "driver.toml").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(Store::open_in_dir(&data)).unwrap();
    let start_driver = |rt: &tokio::runtime::Runtime| {
        let d = driver_support::driver_at_host(&store, &data, UpstreamConfig::none(), cfg.clone());
        let (tx, rx) = tokio::sync::watch::channel(false);
        (tx, rt.spawn(d.clone().run(rx)), d)
    };
    let (driver_stop, driver_task, driver) = start_driver(&rt);
    let served = driver_support::ServedApi::start(&rt, &store, driver, "runner");
    let (addr, token, user) = (served.addr.clone(), served.token.clone(), &served.user);
    let api = Client::bearer(&addr, &token);

    // The CLI VM, through the API; the test CLI's credential in the vault
    // and in the VM (signed in, as far as `prompt` is concerned).
    let r = api.call("POST", "/api/v1/vms", Some(json!({"kind": "cli"})));
    assert_eq!(r.status, 201, "{:?}", r.json());
    let vm = r.json()["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(400);
    loop {
        let v = api.call("GET", &format!("/api/v1/vms/{vm}"), None).json();
        if v["state"] == "running" {
            break;
        }
        assert!(
            v["done"] != true && Instant::now() < deadline,
            "CLI VM: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let host_vm = rt
        .block_on(store.vm(&vm))
        .unwrap()
        .host_vm_id
        .expect("placed");
    rt.block_on(Vault::new(Keyring::generate().unwrap()).store(&store, &user.id, "testcli", b"{}"))
        .unwrap();
    let creds = r#"{"issuer":"https://auth.polydev.test","client_id":"polydev-testcli","access_token":"a","refresh_token":"r","id_token":"i","token_type":"Bearer","expires_at":4102444800}"#;
    host.sh(
        &host_vm,
        &format!(
            "runuser -u user -- sh -c 'umask 077; mkdir -p ~/.testcli ~/work && printf %s \"$1\" > ~/.testcli/auth.json' sh {}",
            shell_quote(creds)
        ),
    );

    // 1. `polydev run`: the test CLI's answer, printed as text; exit 0.
    let started = Instant::now();
    let out = std::process::Command::new(polydev_e2e::polydev_bin())
        .args([
            "run",
            "--provider",
            "testcli",
            "--cwd",
            "work",
            "what is six times seven?",
        ])
        .env("POLYDEV_URL", format!("http://{addr}"))
        .env("POLYDEV_TOKEN", &token)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run polydev run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("Thinking about it. Here is the answer: 42."),
        "{stdout}"
    );
    println!("polydev run took {:?} end to end", started.elapsed());
    let runs = api.call("GET", "/api/v1/runs", None).json();
    let first = runs[0].clone();
    assert_eq!(first["state"], "succeeded", "{runs}");
    assert_eq!(first["exit_code"], 0);
    assert_eq!(first["cwd"], "/home/user/work");
    let id1 = first["id"].as_str().unwrap().to_string();
    let evs = api.events(&id1);
    let typed: Vec<(String, String)> = evs
        .iter()
        .map(|e| {
            (
                e["source"].as_str().unwrap().into(),
                e["type"].as_str().unwrap().into(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("state", "queued"),
        ("state", "running"),
        ("output", "start"),
        ("output", "delta"),
        ("output", "delta"),
        ("output", "delta"),
        ("output", "result"),
        ("state", "succeeded"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(typed, want, "{evs:?}");
    assert_eq!(evs[2]["data"]["prompt"], "what is six times seven?");
    // The raw line is kept as printed; the event's data is that line parsed.
    let raw: Value = serde_json::from_str(evs[2]["raw"].as_str().unwrap()).unwrap();
    assert_eq!(raw, evs[2]["data"]);
    // The same over SSE, replayed after the end, then `end`.
    let sse = sse_until(
        &addr,
        &format!("/api/v1/runs/{id1}/events"),
        &[("authorization", &api.auth)],
        "end",
    );
    assert_eq!(sse.len(), evs.len() + 1, "{sse:?}");
    assert_eq!(sse[2].event, "output");
    assert_eq!(sse[2].data["type"], "start");

    // Prompt start latency: from the request to the first output event,
    // through the API (the VM is warm and provisioned by now).
    let t0 = Instant::now();
    let r = api.call(
        "POST",
        "/api/v1/runs",
        Some(json!({"provider": "testcli", "prompt": "latency?"})),
    );
    assert_eq!(r.status, 201, "{:?}", r.json());
    let id2 = r.json()["id"].as_str().unwrap().to_string();
    api.wait_output(&id2, "start", Duration::from_secs(60));
    let seen = t0.elapsed();
    let done = api.wait_run(&id2, |v| v["done"] == true, "done", Duration::from_secs(60));
    assert_eq!(done["state"], "succeeded", "{done}");
    let evs2 = api.events(&id2);
    let first_out = evs2.iter().find(|e| e["source"] == "output").unwrap()["at"]
        .as_i64()
        .unwrap();
    println!(
        "prompt start latency: {} ms stored (run created → first output event stored), {} ms seen by a client polling every 100 ms",
        first_out - done["created_at"].as_i64().unwrap(),
        seen.as_millis()
    );

    // 2. Cancel a long run: cancelled, and nothing of it runs in the VM.
    let r = api.call(
        "POST",
        "/api/v1/runs",
        Some(json!({"provider": "testcli", "prompt": "/slow 600"})),
    );
    assert_eq!(r.status, 201, "{:?}", r.json());
    let id3 = r.json()["id"].as_str().unwrap().to_string();
    api.wait_output(&id3, "delta", Duration::from_secs(60));
    let slow = |host: &Host| {
        host.sh(
            &host_vm,
            "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '^polydev-testcli prompt /slow 600' || true",
        )
        .stdout
        .trim()
        .to_string()
    };
    assert_eq!(slow(&host), "1", "the long run's CLI runs in the VM");
    let r = api.call("DELETE", &format!("/api/v1/runs/{id3}"), None);
    assert_eq!(r.status, 202, "{:?}", r.json());
    let v = api.wait_run(&id3, |v| v["done"] == true, "done", Duration::from_secs(60));
    assert_eq!(v["state"], "cancelled", "{v}");
    assert_eq!(slow(&host), "0", "the run's processes are gone");

    // 3. The controller's driver goes away mid-run; the run finishes in
    // the VM meanwhile; the next driver reads it to the end, every line once.
    let r = api.call(
        "POST",
        "/api/v1/runs",
        Some(json!({"provider": "testcli", "prompt": "/slow 6"})),
    );
    assert_eq!(r.status, 201, "{:?}", r.json());
    let id4 = r.json()["id"].as_str().unwrap().to_string();
    api.wait_output(&id4, "delta", Duration::from_secs(60));
    driver_stop.send(true).unwrap();
    rt.block_on(driver_task).unwrap().unwrap();
    let read_so_far = rt.block_on(store.run(&id4)).unwrap().output_offset;
    let deadline = Instant::now() + Duration::from_secs(120);
    while host
        .cli(&[
            "vm",
            "exec",
            &host_vm,
            "--",
            "test",
            "-f",
            &format!("/run/polydev-runs/{id4}/exit"),
        ])
        .code
        != 0
    {
        assert!(Instant::now() < deadline, "the run did not end in the VM");
        std::thread::sleep(Duration::from_millis(500));
    }
    let (driver_stop, driver_task, _) = start_driver(&rt);
    let v = api.wait_run(&id4, |v| v["done"] == true, "done", Duration::from_secs(60));
    assert_eq!(v["state"], "succeeded", "{v}");
    let evs4 = api.events(&id4);
    let outputs: Vec<&str> = evs4
        .iter()
        .filter(|e| e["source"] == "output")
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        outputs,
        ["start", "delta", "delta", "delta", "delta", "delta", "delta", "result"],
        "read from offset {read_so_far} on, every line once: {evs4:?}"
    );
    let ticks: Vec<&str> = evs4
        .iter()
        .filter_map(|e| e["data"]["text"].as_str())
        .collect();
    assert_eq!(
        ticks[..6],
        ["tick 0. ", "tick 1. ", "tick 2. ", "tick 3. ", "tick 4. ", "tick 5. "]
    );

    // 5. The real CLIs, up to where they need the network: each one's
    // `[prompt]` runs as the user with a made-up credential in its own
    // file, prints its first typed events, and asks for its provider's
    // host, which the VM's egress refuses.
    let egress_log = data.join("vms").join(&host_vm).join("egress.log");
    // Made up at run time (nothing token-like is committed); an hour left.
    let made_up = || {
        let mut b = [0u8; 16];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
            .expect("random bytes");
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    };
    let expires_ms = polydev_controller::util::now_ms() + 3_600_000;
    let real: [(&str, &str, Value, &str, &str); 3] = [
        (
            "claude-code",
            ".claude/.credentials.json",
            json!({"claudeAiOauth": {"accessToken": made_up(), "refreshToken": made_up(), "expiresAt": expires_ms, "scopes": ["user:inference"]}}),
            "api.anthropic.com:443",
            "system",
        ),
        (
            "codex",
            ".codex/auth.json",
            json!({"auth_mode": "apikey", "OPENAI_API_KEY": made_up()}),
            "api.openai.com:443",
            "thread.started",
        ),
        (
            "gemini-cli",
            ".gemini/oauth_creds.json",
            json!({"access_token": made_up(), "refresh_token": made_up(), "token_type": "Bearer", "expiry_date": expires_ms}),
            "oauth2.googleapis.com:443",
            "",
        ),
    ];
    for (provider, file, content, target, first) in real {
        rt.block_on(
            Vault::new(Keyring::generate().unwrap()).store(&store, &user.id, provider, b"{}"),
        )
        .unwrap();
        let w = host.sh(
            &host_vm,
            &format!(
                "runuser -u user -- sh -c 'umask 077; mkdir -p \"$(dirname ~/{file})\" && printf %s \"$1\" > ~/{file}' sh {}",
                shell_quote(&content.to_string())
            ),
        );
        assert_eq!(w.code, 0, "{provider}: {}", w.stderr);
        let r = api.call(
            "POST",
            "/api/v1/runs",
            Some(json!({"provider": provider, "prompt": "say hi"})),
        );
        assert_eq!(r.status, 201, "{provider}: {:?}", r.json());
        let id = r.json()["id"].as_str().unwrap().to_string();
        if !first.is_empty() {
            let evs = api.wait_output(&id, first, Duration::from_secs(300));
            println!("{provider}: first events {:?}", &evs[..evs.len().min(4)]);
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        while !std::fs::read_to_string(&egress_log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(&format!("\"target\":\"{target}\"")) && l.contains("\"denied\""))
        {
            assert!(
                Instant::now() < deadline,
                "{provider} never asked for {target}: {:?}",
                api.events(&id)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        // Gemini CLI gives up by itself; the others retry: cancelled.
        let v = if provider == "gemini-cli" {
            api.wait_run(&id, |v| v["done"] == true, "done", Duration::from_secs(300))
        } else {
            let r = api.call("DELETE", &format!("/api/v1/runs/{id}"), None);
            assert!(
                r.status == 200 || r.status == 202,
                "{provider}: {:?}",
                r.json()
            );
            api.wait_run(&id, |v| v["done"] == true, "done", Duration::from_secs(120))
        };
        let raw: String = api
            .events(&id)
            .iter()
            .filter_map(|e| e["raw"].as_str().map(str::to_string))
            .collect::<Vec<_>>()
            .join("\n");
        let tail: String = raw
            .chars()
            .rev()
            .take(400)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        println!(
            "{provider}: {} (exit {}), output ends: {tail}",
            v["state"], v["exit_code"]
        );
        if provider == "gemini-cli" {
            assert_eq!(v["state"], "failed", "{v}");
            // It got as far as its credential (the sign-in method and the
            // trust chosen by the provider's prompt environment), and
            // failed on the network.
            for refusal in [
                "Please set an Auth method",
                "not running in a trusted directory",
            ] {
                assert!(!raw.contains(refusal), "{raw}");
            }
        } else {
            assert_eq!(v["state"], "cancelled", "{v}");
        }
    }

    driver_stop.send(true).unwrap();
    rt.block_on(driver_task).unwrap().unwrap();
    served.shutdown(&rt);
}

/// `s` as one single-quoted shell word.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}
