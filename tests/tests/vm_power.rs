//! Stop, start and disconnect on a real CLI VM, through the public API
//! with the production defaults on the CLI side (the cli image, its
//! unprivileged `user`, delivery as that user): the VM is created through
//! the API, a file the user writes in /home survives Stop (the host's VM
//! is then off with its memory saved, not running) and Start (which resumes
//! it); and
//! Disconnect takes the delivered credential out of the running VM — the
//! whole file removed, the fields merged into the user's own file taken
//! out while the user's other key stays — and names the VM it did that in.
//! A connect into the stopped VM starts it and delivers; a removal the VM
//! refuses keeps the credential; a stop or start recorded by a controller
//! that then died is finished by the next one; a stopped VM is deleted
//! (gone at the host) and the credential it held is then held by nobody.
//!
//! The API and the driver run in process over the real host agent; the
//! browser VM is the minimal image with a script login (only where its
//! files go matters here).

use std::time::{Duration, Instant};

use polydev_api::vm::VmState as HostState;
use polydev_controller::driver::DriverConfig;
use polydev_controller::state::{SessionState, VmState};
use polydev_controller::store::{Also, Store};
use polydev_controller::upstream::UpstreamConfig;
use polydev_e2e::http::Client;
use polydev_e2e::Host;
use serde_json::{json, Value};

mod driver_support;

/// Writes the two capture files: a credential (delivered whole) and an
/// account file whose `account` field is merged into the user's own.
const LOGIN: &str = r#"
echo "Open https://auth.test.invalid/authorize?state=s1 in your browser"
mkdir -p "$HOME/.t"
printf '{"token": "tok-pw-1"}' > "$HOME/.t/creds.json"
printf '{"account": "a1", "junk": 1}' > "$HOME/.t.json"
"#;

fn provider() -> String {
    driver_support::test_provider("pw", LOGIN, "output", ".t/creds.json").replace(
        "[refresh]",
        "[[capture]]\npath = \".t.json\"\nrequired = false\njson_keys = [\"account\"]\ndeliver_keys = [\"account\"]\n\n[refresh]",
    )
}

#[test]
fn a_cli_vm_stops_and_starts_with_its_home_and_disconnect_removes_the_files() {
    polydev_e2e::require_images(&["cli"]);
    let host = Host::start();
    let data = host.data().to_path_buf();
    std::fs::create_dir_all(data.join("providers")).unwrap();
    std::fs::write(data.join("providers/pw.toml"), provider()).unwrap();
    let cfg = DriverConfig::parse(
        "browser_image = \"minimal\"\nbrowser_memory_mib = 0\nlogin_user = \"root\"\nlogin_home = \"/root\"\npoll_ms = 200\nidle_poll_ms = 300\n",
        "driver.toml",
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(Store::open_in_dir(&data)).unwrap();
    let driver = driver_support::driver_at_host(&store, &data, UpstreamConfig::none(), cfg);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let running = rt.spawn(driver.clone().run(stop_rx));
    let served = driver_support::ServedApi::start(&rt, &store, driver.clone(), "pw");
    let (addr, token, user) = (served.addr.clone(), served.token.clone(), &served.user);
    let api = Client::bearer(&addr, &token);

    // The CLI VM, through the API.
    let r = api.call("POST", "/api/v1/vms", Some(json!({"kind": "cli"})));
    assert_eq!(r.status, 201, "{:?}", r.json());
    let id = r.json()["id"].as_str().unwrap().to_string();
    api.wait_vm(&id, "running", Duration::from_secs(400));
    let host_vm = || {
        rt.block_on(store.vm(&id))
            .unwrap()
            .host_vm_id
            .expect("placed")
    };
    let as_user =
        |script: &str| host.sh(&host_vm(), &format!("runuser -u user -- sh -c '{script}'"));
    // The user's own file, and their own key in the file a credential is
    // merged into.
    as_user(r#"echo kept-across-stop > ~/mine.txt && printf "{\"theme\": \"dark\"}" > ~/.t.json"#);

    // A connect delivers into it: both files, the VM named as holder.
    let r = api.call("POST", "/api/v1/sessions", Some(json!({"provider": "pw"})));
    assert_eq!(r.status, 201, "{:?}", r.json());
    let ses = r.json()["id"].as_str().unwrap().to_string();
    let done = driver_support::wait_final(&rt, &store, &ses, Duration::from_secs(600));
    assert_eq!(done.life.state, SessionState::Completed, "{:?}", done.life);
    let creds = api.call("GET", "/api/v1/credentials", None).json();
    assert_eq!(
        creds[0]["holder_vm_id"].as_str(),
        Some(id.as_str()),
        "{creds}"
    );
    let had = as_user("cat ~/.t/creds.json; echo; cat ~/.t.json");
    assert!(
        had.stdout.contains("tok-pw-1")
            && had.stdout.contains("\"account\": \"a1\"")
            && had.stdout.contains("\"theme\": \"dark\""),
        "{}",
        had.stdout
    );

    // Stop: hibernated, and the host's VM is off (not running).
    let r = api.call("POST", &format!("/api/v1/vms/{id}/stop"), Some(json!({})));
    assert_eq!(
        (r.status, r.json()["state"].clone()),
        (202, json!("hibernating"))
    );
    api.wait_vm(&id, "hibernated", Duration::from_secs(180));
    assert_eq!(host.inspect(&host_vm()).state, HostState::Off);
    // Its memory was saved: Start resumes the same boot.
    let info = host.inspect(&host_vm());
    assert!(info.hibernated, "{info:?}");

    // Start: running again, the user's file still there.
    let r = api.call("POST", &format!("/api/v1/vms/{id}/start"), Some(json!({})));
    assert_eq!(
        (r.status, r.json()["state"].clone()),
        (202, json!("resuming"))
    );
    api.wait_vm(&id, "running", Duration::from_secs(400));
    let info = host.inspect(&host_vm());
    assert_eq!(info.state, HostState::Running);
    assert_eq!(
        info.restored_from.as_deref(),
        Some("hibernation"),
        "{info:?}"
    );
    assert_eq!(as_user("cat ~/mine.txt").stdout.trim(), "kept-across-stop");

    // Disconnect: the credential file gone, only its field taken out of
    // the user's file, the user's key kept.
    let r = api.call("DELETE", "/api/v1/credentials/pw", None);
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json(), json!({"provider": "pw", "removed_from_vm": id}));
    let gone = as_user("test -e ~/.t/creds.json && echo still-there || echo gone");
    assert_eq!(gone.stdout.trim(), "gone");
    let left = as_user("cat ~/.t.json").stdout;
    let t: Value =
        serde_json::from_str(&left).unwrap_or_else(|e| panic!("~/.t.json is JSON ({e}): {left}"));
    assert_eq!(t, json!({"theme": "dark"}), "{left}");
    assert_eq!(as_user("cat ~/mine.txt").stdout.trim(), "kept-across-stop");
    assert!(rt
        .block_on(store.credential(&user.id, "pw"))
        .unwrap()
        .is_none());

    // Stopped again, a connect starts the VM and delivers into it.
    let r = api.call("POST", &format!("/api/v1/vms/{id}/stop"), Some(json!({})));
    assert_eq!(r.status, 202, "{:?}", r.json());
    api.wait_vm(&id, "hibernated", Duration::from_secs(180));
    let r = api.call("POST", "/api/v1/sessions", Some(json!({"provider": "pw"})));
    assert_eq!(r.status, 201, "{:?}", r.json());
    let ses = r.json()["id"].as_str().unwrap().to_string();
    let done = driver_support::wait_final(&rt, &store, &ses, Duration::from_secs(600));
    assert_eq!(done.life.state, SessionState::Completed, "{:?}", done.life);
    api.wait_vm(&id, "running", Duration::from_secs(10));
    let creds = api.call("GET", "/api/v1/credentials", None).json();
    assert_eq!(
        creds[0]["holder_vm_id"].as_str(),
        Some(id.as_str()),
        "{creds}"
    );
    assert!(as_user("cat ~/.t/creds.json").stdout.contains("tok-pw-1"));

    // A removal the VM refuses (the user's file is not JSON): 502, and
    // nothing is lost — the credential and the delivered file stay.
    as_user("echo not-json > ~/.t.json");
    let r = api.call("DELETE", "/api/v1/credentials/pw", None);
    assert_eq!(r.status, 502, "{:?}", r.json());
    let detail = r.json()["detail"].as_str().unwrap_or("").to_string();
    assert!(
        detail.contains("the credential is kept") && detail.contains(".t.json"),
        "{detail}"
    );
    assert!(rt
        .block_on(store.credential(&user.id, "pw"))
        .unwrap()
        .is_some());
    assert!(as_user("cat ~/.t/creds.json").stdout.contains("tok-pw-1"));

    // A controller that recorded a stop and died before its driver acted:
    // the next one powers the VM off; likewise a start.
    stop.send(true).unwrap();
    rt.block_on(running).unwrap().unwrap();
    let vm = rt.block_on(store.vm(&id)).unwrap();
    rt.block_on(store.transition_vm(&vm, VmState::Hibernating, None, Also::default()))
        .unwrap();
    let restarted = |rt: &tokio::runtime::Runtime| {
        let d = driver_support::driver_at_host(
            &store,
            &data,
            UpstreamConfig::none(),
            DriverConfig::parse("poll_ms = 200\nidle_poll_ms = 300\n", "driver.toml").unwrap(),
        );
        let (tx, rx) = tokio::sync::watch::channel(false);
        (tx, rt.spawn(d.run(rx)))
    };
    let (tx, again) = restarted(&rt);
    api.wait_vm(&id, "hibernated", Duration::from_secs(180));
    assert_eq!(host.inspect(&host_vm()).state, HostState::Off);
    tx.send(true).unwrap();
    rt.block_on(again).unwrap().unwrap();
    let vm = rt.block_on(store.vm(&id)).unwrap();
    rt.block_on(store.transition_vm(&vm, VmState::Resuming, None, Also::default()))
        .unwrap();
    let (tx, again) = restarted(&rt);
    api.wait_vm(&id, "running", Duration::from_secs(400));
    assert_eq!(as_user("cat ~/mine.txt").stdout.trim(), "kept-across-stop");

    // A stopped VM is deleted like any other: gone at the host, and the
    // credential it held is held by nobody.
    let r = api.call("POST", &format!("/api/v1/vms/{id}/stop"), Some(json!({})));
    assert_eq!(r.status, 202, "{:?}", r.json());
    api.wait_vm(&id, "hibernated", Duration::from_secs(180));
    let hv = host_vm();
    let r = api.call("DELETE", &format!("/api/v1/vms/{id}"), None);
    assert_eq!(r.status, 202, "{:?}", r.json());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = api.call("GET", &format!("/api/v1/vms/{id}"), None).json();
        if v["state"] == "destroyed" {
            break;
        }
        assert!(v["state"] != "failed" && Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Gone, or only its archived record (final) is left.
    let at_host = host.cli(&["vm", "inspect", &hv]);
    if at_host.code == 0 {
        let info: polydev_api::vm::VmInfo = serde_json::from_str(&at_host.stdout).unwrap();
        assert!(
            info.state.is_final(),
            "the host still keeps the deleted VM: {info:?}"
        );
    }
    let creds = api.call("GET", "/api/v1/credentials", None).json();
    assert_eq!(creds[0]["holder_vm_id"], Value::Null, "{creds}");

    tx.send(true).unwrap();
    rt.block_on(again).unwrap().unwrap();
    served.shutdown(&rt);
}
