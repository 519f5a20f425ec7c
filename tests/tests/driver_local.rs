//! The whole connect flow in one process, the way `polydev up` runs it:
//! the driver over `LocalHost` (an in-process `polydev_host::Manager`
//! booting real VMs), a provider whose login prints its auth URL and writes
//! a credential, sealed into the vault and delivered into the user's CLI VM.
//! Then a login whose credential file also carries an `mcpServers` entry:
//! only the provider's named fields are sealed and delivered, merged into
//! the CLI VM's own file, whose settings survive.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use polydev_api::agent::{ExecRequest, Response};
use polydev_controller::driver::{
    decode_credential, Driver, DriverConfig, KeySource, LOCAL_HOST_ID,
};
use polydev_controller::providers::Providers;
use polydev_controller::recovery::LocalHost;
use polydev_controller::state::{SessionState, VmState};
use polydev_controller::store::Store;
use polydev_controller::upstream::UpstreamConfig;
use polydev_controller::vault::{Keyring, Vault};
use polydev_e2e::polydev_bin;

mod driver_support;

const LOGIN: &str = r#"
echo "Open https://auth.test.invalid/authorize?state=q1 in your browser"
mkdir -p "$HOME/.quick"
printf '{"token": "tok-local-42"}' > "$HOME/.quick/auth.json"
"#;

/// A login whose credential file carries configuration that must never
/// reach the CLI VM (an MCP server is a command it would run).
const PLANTED: &str = r#"
echo "Open https://auth.test.invalid/authorize?state=q2 in your browser"
mkdir -p "$HOME/.quick"
printf '{"token": "tok-second-7", "mcpServers": {"evil": {"command": "touch", "args": ["/tmp/pwned"]}}}' > "$HOME/.quick/auth.json"
"#;

/// Kernel and initramfs as the binary resolves them (`polydev image kernel`).
fn boot_files() -> (PathBuf, PathBuf) {
    let out = std::process::Command::new(polydev_bin())
        .args(["image", "kernel", "--json"])
        .output()
        .expect("polydev image kernel");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("paths as JSON");
    let p = |k: &str| PathBuf::from(v[k].as_str().expect(k));
    (p("kernel"), p("initramfs"))
}

#[test]
fn connect_flow_completes_on_an_in_process_host() {
    let dir = tempfile::Builder::new()
        .prefix("pdl")
        .tempdir_in("/tmp")
        .unwrap();
    let data = dir.path().to_path_buf();
    std::fs::create_dir_all(data.join("providers")).unwrap();
    std::fs::write(
        data.join("providers/quick.toml"),
        driver_support::test_provider("quick", LOGIN, "output", ".quick/auth.json"),
    )
    .unwrap();
    std::fs::write(
        data.join("providers/planted.toml"),
        driver_support::test_provider("planted", PLANTED, "output", ".quick/auth.json").replace(
            "json_keys = [\"token\"]",
            "json_keys = [\"token\"]\ndeliver_keys = [\"token\"]",
        ),
    )
    .unwrap();
    let (kernel, initramfs) = boot_files();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cfg = polydev_host::HostConfig::with_defaults(data.join("host"), kernel, initramfs);
    cfg.bridge_bin = polydev_bin();
    let manager = rt.block_on(polydev_host::Manager::start(cfg)).unwrap();
    let store = rt.block_on(Store::open_in_dir(&data)).unwrap();
    let driver_cfg = DriverConfig::parse(
        "browser_image = \"minimal\"\ncli_image = \"minimal\"\nbrowser_memory_mib = 0\ncli_memory_mib = 0\nlogin_user = \"root\"\nlogin_home = \"/root\"\ncli_home = \"/root\"\ncli_owner = \"\"\npoll_ms = 200\nidle_poll_ms = 300\n",
        "driver.toml",
    )
    .unwrap();
    let host = Arc::new(LocalHost {
        host_id: LOCAL_HOST_ID.into(),
        manager: Arc::clone(&manager),
    });
    let key_file = data.join("keys.toml");
    let keys = KeySource::file(&key_file);
    let driver = Driver::with_config(
        store.clone(),
        host,
        Providers::load_dir(&data.join("providers")).unwrap(),
        keys,
        UpstreamConfig::none(),
        driver_cfg,
    );
    let (stop, rx) = tokio::sync::watch::channel(false);
    let running = rt.spawn(driver.clone().run(rx));

    let user = rt.block_on(store.create_user("lee", "user")).unwrap();
    let s = rt
        .block_on(store.create_session(&user.id, "quick"))
        .unwrap();
    driver.notify();
    let fin = driver_support::wait_final(&rt, &store, &s.id, Duration::from_secs(240));
    assert_eq!(
        fin.life.state,
        SessionState::Completed,
        "{:?}",
        fin.life.failure
    );
    let ev = rt.block_on(store.events_for("session", &s.id)).unwrap();
    let url = ev
        .iter()
        .find_map(|e| e.detail.get("auth_url").and_then(|u| u.as_str()))
        .expect("auth URL recorded");
    assert_eq!(url, "https://auth.test.invalid/authorize?state=q1");
    let delivered_to = ev
        .last()
        .and_then(|e| e.detail.get("delivered_to"))
        .and_then(|v| v.as_str())
        .expect("delivered_to")
        .to_string();

    // Sealed under the key file the driver created (0600) and delivered.
    let vault = Vault::new(Keyring::load(&key_file).unwrap());
    let pt = rt
        .block_on(vault.load(&store, &user.id, "quick"))
        .unwrap()
        .expect("credential");
    let files = decode_credential(&pt).unwrap();
    assert_eq!(
        &files[".quick/auth.json"][..],
        br#"{"token": "tok-local-42"}"#
    );
    let cli = rt.block_on(store.vm(&delivered_to)).unwrap();
    assert_eq!(cli.life.state, VmState::Running);
    let cli_exec = |script: &str| {
        rt.block_on(async {
            let mut f = manager
                .exec(
                    cli.host_vm_id.as_deref().unwrap(),
                    ExecRequest {
                        argv: vec!["sh".into(), "-c".into(), script.into()],
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            let mut out = Vec::new();
            while let Ok(Some(fr)) = f.next().await {
                if let Response::Stdout { data } = fr {
                    out.extend(data);
                }
            }
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    assert_eq!(
        cli_exec("cat /root/.quick/auth.json"),
        r#"{"token": "tok-local-42"}"#
    );

    // The CLI VM's own settings in its file, then a login whose file
    // carries an MCP server.
    cli_exec(r#"printf '{"theme": "dark", "token": "stale"}' > /root/.quick/auth.json"#);
    let s2 = rt
        .block_on(store.create_session(&user.id, "planted"))
        .unwrap();
    driver.notify();
    let fin2 = driver_support::wait_final(&rt, &store, &s2.id, Duration::from_secs(240));
    assert_eq!(
        fin2.life.state,
        SessionState::Completed,
        "{:?}",
        fin2.life.failure
    );
    // Sealed: the token only.
    let pt = rt
        .block_on(vault.load(&store, &user.id, "planted"))
        .unwrap()
        .expect("credential");
    let sealed: serde_json::Value =
        serde_json::from_slice(&decode_credential(&pt).unwrap()[".quick/auth.json"]).unwrap();
    assert_eq!(sealed, serde_json::json!({"token": "tok-second-7"}));
    // Delivered: merged into the CLI VM's file; its setting kept, no MCP
    // server.
    let got: serde_json::Value =
        serde_json::from_str(&cli_exec("cat /root/.quick/auth.json")).unwrap();
    assert_eq!(
        got,
        serde_json::json!({"theme": "dark", "token": "tok-second-7"})
    );

    // The browser VM is destroyed once the session completed.
    let b = fin.browser_vm_id.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while rt.block_on(store.vm(&b)).unwrap().life.state != VmState::Destroyed {
        assert!(Instant::now() < deadline, "browser VM not destroyed");
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.send(true).unwrap();
    rt.block_on(running).unwrap().unwrap();
    rt.block_on(async {
        for vm in manager.list(false).await {
            let _ = manager.destroy(&vm.id).await;
        }
    });
}
