//! Idle hibernation of a real CLI VM, through the public API with the
//! production CLI side (the cli image, its unprivileged `user`, its
//! memory): while a terminal is attached the VM stays up past the idle
//! limit; once it is left alone it is hibernated (its memory saved, its
//! QEMU gone); the next terminal resumes it. After the resume it is the
//! same boot (same `boot_id`, the kept terminal's screen comes back), its
//! clock is right, it got fresh entropy, and every file of the home
//! directory is intact (one checksum of the whole tree before and after).
//!
//! Prints, from this one run: the hibernate time, and the resume time
//! against a cold start of the same VM (stopped and booted by its host).

use std::time::{Duration, Instant};

use polydev_api::vm::VmState as HostState;
use polydev_controller::driver::DriverConfig;
use polydev_controller::store::Store;
use polydev_controller::upstream::UpstreamConfig;
use polydev_e2e::http::{read_until, websocket, Client};
use polydev_e2e::Host;
use serde_json::{json, Value};

mod driver_support;

/// The idle limit of this test.
const IDLE_SECS: u64 = 6;

/// What this test asks of the API beyond a plain call.
trait Terminals {
    fn state(&self, id: &str) -> Value;
    fn terminal(&self, vm: &str) -> tungstenite::WebSocket<std::net::TcpStream>;
}

impl Terminals for Client {
    fn state(&self, id: &str) -> Value {
        self.call("GET", &format!("/api/v1/vms/{id}"), None).json()
    }

    /// A terminal WebSocket to `vm`'s kept terminal `main`.
    fn terminal(&self, vm: &str) -> tungstenite::WebSocket<std::net::TcpStream> {
        let r = self.call(
            "POST",
            "/api/v1/tickets",
            Some(json!({"kind": "terminal", "resource_id": vm})),
        );
        assert_eq!(r.status, 201, "{:?}", r.json());
        let t = r.json()["ticket"].as_str().expect("ticket").to_string();
        websocket(
            &self.addr,
            &format!("/api/v1/vms/{vm}/terminal?ticket={t}&cols=120&rows=40"),
        )
        .unwrap_or_else(|st| panic!("terminal upgrade refused: {st}"))
    }
}

/// The time of VM `id`'s event into `state` (ms).
fn entered(rt: &tokio::runtime::Runtime, store: &Store, id: &str, state: &str) -> Vec<i64> {
    rt.block_on(store.events_for("vm", id))
        .expect("the VM's events")
        .iter()
        .filter(|e| e.to_state.as_deref() == Some(state))
        .map(|e| e.at)
        .collect()
}

#[test]
fn an_idle_cli_vm_hibernates_and_its_terminal_resumes_it_intact() {
    polydev_e2e::require_images(&["cli"]);
    let host = Host::start();
    let data = host.data().to_path_buf();
    std::fs::create_dir_all(data.join("providers")).unwrap();
    // Production defaults but for the idle limit (and a quicker poll).
    let cfg = DriverConfig::parse(
        &format!("poll_ms = 200\nidle_poll_ms = 300\ncli_idle_hibernate_secs = {IDLE_SECS}\n"),
        "driver.toml",
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(Store::open_in_dir(&data)).unwrap();
    let driver = driver_support::driver_at_host(&store, &data, UpstreamConfig::none(), cfg);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let running = rt.spawn(driver.clone().run(stop_rx));
    let served = driver_support::ServedApi::start(&rt, &store, driver.clone(), "hib");
    let api = Client::bearer(&served.addr, &served.token);

    let r = api.call("POST", "/api/v1/vms", Some(json!({"kind": "cli"})));
    assert_eq!(r.status, 201, "{:?}", r.json());
    let id = r.json()["id"].as_str().unwrap().to_string();
    api.wait_vm(&id, "running", Duration::from_secs(400));
    // Attached at once: the VM is in use from here.
    let mut term = api.terminal(&id);
    let hv = rt
        .block_on(store.vm(&id))
        .unwrap()
        .host_vm_id
        .expect("placed");
    let as_user = |script: &str| {
        let r = host.sh(&hv, &format!("runuser -u user -- sh -c '{script}'"));
        assert_eq!(r.code, 0, "{script}: {}", r.stderr);
        r.stdout
    };
    const SUM: &str = "cd ~ && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum";
    as_user("mkdir -p ~/proj/src && head -c 3000000 /dev/urandom > ~/proj/blob && echo hello > ~/proj/src/main.rs && sync");
    let sum_before = as_user(SUM);
    let boot_before = as_user("cat /proc/sys/kernel/random/boot_id");
    term.send(tungstenite::Message::Binary(
        b"echo screen-$((6*7))-kept\n".to_vec().into(),
    ))
    .unwrap();
    read_until(&mut term, "screen-42-kept");
    // In use past twice the limit: still running, never hibernated.
    let used_until = Instant::now() + Duration::from_secs(2 * IDLE_SECS);
    while Instant::now() < used_until {
        assert_eq!(api.state(&id)["state"], "running");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(entered(&rt, &store, &id, "hibernating").is_empty());

    // Left alone: hibernated, the memory saved, QEMU gone.
    drop(term);
    let v = api.wait_vm(&id, "hibernated", Duration::from_secs(180));
    let into = entered(&rt, &store, &id, "hibernating")[0];
    let done = entered(&rt, &store, &id, "hibernated")[0];
    let info = host.inspect(&hv);
    assert_eq!(info.state, HostState::Off, "{info:?}");
    assert!(info.hibernated, "the memory was saved: {info:?}");
    assert!(info.pid.is_none(), "{info:?}");
    eprintln!("hibernated: {v}");
    // The clock check below needs time to have passed while it slept.
    std::thread::sleep(Duration::from_secs(5));

    // The next terminal resumes it: the same shell, its screen restored.
    let asked = Instant::now();
    let mut term = api.terminal(&id);
    let screen = read_until(&mut term, "screen-42-kept");
    let resumed_in = asked.elapsed();
    assert!(screen.contains("screen-42-kept"), "{screen}");
    assert_eq!(api.state(&id)["state"], "running");
    let info = host.inspect(&hv);
    assert_eq!(
        info.restored_from.as_deref(),
        Some("hibernation"),
        "{info:?}"
    );
    assert!(!info.hibernated, "{info:?}");
    let resume_ms = info.boot_ms.expect("the resume's time");
    // Same boot, files intact.
    assert_eq!(as_user("cat /proc/sys/kernel/random/boot_id"), boot_before);
    assert_eq!(as_user(SUM), sum_before, "the home directory changed");
    // The clock is right: within 2 s of the host's.
    let guest_ms: i64 = as_user("date +%s%3N").trim().parse().unwrap();
    let host_ms = polydev_controller::util::now_ms();
    assert!(
        (guest_ms - host_ms).abs() < 2000,
        "guest clock {guest_ms} vs host {host_ms}"
    );
    // Fresh entropy: credited at boot and again at the resume.
    let agent_log = std::fs::read_to_string(data.join("vms").join(&hv).join("agent.log"))
        .expect("the agent's log");
    let credited = agent_log.matches("bytes of entropy credited").count();
    assert_eq!(credited, 2, "{agent_log}");
    drop(term);

    // The same VM cold: stopped and booted by its host (the driver is
    // stopped first, so it does not take the VM's stop for a crash).
    stop.send(true).unwrap();
    rt.block_on(running).unwrap().unwrap();
    host.ok(&["vm", "stop", &hv]);
    let cold = host.ok(&["vm", "start", &hv]);
    assert!(cold.stdout.contains("running"), "{}", cold.stdout);
    let info = host.inspect(&hv);
    assert_eq!(info.restored_from, None, "{info:?}");
    let cold_ms = info.boot_ms.expect("the cold start's time");
    assert_ne!(as_user("cat /proc/sys/kernel/random/boot_id"), boot_before);
    assert_eq!(as_user(SUM), sum_before, "the home directory changed");

    let hibernate_ms = done - into;
    eprintln!(
        "MEASURE hibernate (state saved, QEMU gone): {hibernate_ms} ms; resume at the host: {resume_ms} ms, terminal ticket -> screen restored: {} ms; cold start of the same VM: {cold_ms} ms; resume/cold = {:.3}",
        resumed_in.as_millis(),
        resume_ms as f64 / cold_ms as f64
    );
    served.shutdown(&rt);
}
