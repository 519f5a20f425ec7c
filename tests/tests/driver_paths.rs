//! The driver's failure and cancel paths, in process (`Driver` over
//! `RemoteHost`, i.e. the host agent's HTTP API on its socket) against a
//! real `polydev host` and real VMs, with provider definitions from a temp
//! dir whose login commands are test scripts:
//!
//! * a login that exits non-zero fails the session `login_failed`;
//! * a login that exits 0 without an auth URL fails `auth_url_not_found`;
//! * a cancelled session's browser VM is destroyed;
//! * a login nobody finishes fails `timeout` after the provider's login
//!   timeout; a browser VM that dies mid-login fails its session `vm_died`;
//!   both VMs are gone and their logs kept;
//! * a user's VM leaves through that user's upstream port (the egress policy
//!   the host got names it; the password comes from a 0600 file), and when
//!   the range is exhausted the next user's VMs fail `no_capacity` — never a
//!   shared port — until the session's retry budget is spent.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use polydev_controller::driver::{Driver, DriverConfig, KeySource, RemoteHost, LOCAL_HOST_ID};
use polydev_controller::providers::Providers;
use polydev_controller::state::{FailureReason, Lifecycle, SessionState, VmState};
use polydev_controller::store::{Also, Store};
use polydev_controller::upstream::UpstreamConfig;
use polydev_controller::vault::Keyring;
use polydev_e2e::Host;

mod driver_support;

fn provider(id: &str, script: &str) -> String {
    provider_from(id, script, "output")
}

fn provider_from(id: &str, script: &str, source: &str) -> String {
    driver_support::test_provider(id, script, source, ".t/creds.json")
}

fn write_providers(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (id, script) in [
        ("fails", "echo 'no network'; exit 3"),
        ("nourl", "echo 'all done'; exit 0"),
        (
            "holds",
            "echo 'https://auth.test.invalid/authorize?state=h'; while :; do sleep 1; done",
        ),
        (
            "stalls",
            "echo 'https://auth.test.invalid/authorize?state=s'; while :; do sleep 1; done",
        ),
        (
            "dies",
            "echo 'https://auth.test.invalid/authorize?state=d'; while :; do sleep 1; done",
        ),
    ] {
        // Only `stalls` is meant to run out of time (the shortest login
        // timeout a provider may have); the others wait for the test.
        let timeout = if id == "stalls" { 30 } else { 900 };
        let text =
            provider(id, script).replace("timeout_secs = 60", &format!("timeout_secs = {timeout}"));
        std::fs::write(dir.join(format!("{id}.toml")), text).unwrap();
    }
    // A CLI that asks before it shows its URL: the provider's answer is
    // typed once (a second would be echoed back).
    std::fs::write(
        dir.join("asks.toml"),
        provider(
            "asks",
            "printf 'Do you want to continue? [y/n] '; read a; [ \"$a\" = y ] || exit 5; \
             echo 'https://auth.test.invalid/authorize?state=asked'; \
             while read b; do echo \"typed again: $b\"; done; while :; do sleep 1; done",
        )
        .replace("timeout_secs = 60", "timeout_secs = 900")
            + "\n[[login.respond]]\nwhen = 'continue\\? \\[y/n\\]'\nsend = \"y\\n\"\n",
    )
    .unwrap();
    // A CLI that only hands its URL to xdg-open ($BROWSER), printing nothing.
    std::fs::write(
        dir.join("opens.toml"),
        provider_from(
            "opens",
            "\"$BROWSER\" 'https://auth.test.invalid/authorize?state=xdg'; while :; do sleep 1; done",
            "xdg-open",
        )
        .replace("timeout_secs = 60", "timeout_secs = 900"),
    )
    .unwrap();
}

#[test]
fn failures_cancel_and_upstream_exhaustion() {
    let host = Host::start();
    let data = host.data().to_path_buf();
    write_providers(&data.join("providers"));
    let pw = data.join("up.pass");
    std::fs::write(&pw, "up-pass-7\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    // One port only: the second user exhausts it.
    let upstreams = UpstreamConfig::parse(
        &format!(
            "[[provider]]\nname = \"resi\"\nhost = \"127.0.0.1\"\nports = \"18080\"\nusername = \"acct\"\npassword_file = \"{}\"\n",
            pw.display()
        ),
        "upstreams.toml",
    )
    .unwrap();
    let cfg = DriverConfig::parse(
        "browser_image = \"minimal\"\ncli_image = \"minimal\"\nbrowser_memory_mib = 0\nlogin_user = \"root\"\nlogin_home = \"/root\"\ndeliver_to_cli_vm = false\npoll_ms = 200\nidle_poll_ms = 300\n",
        "driver.toml",
    )
    .unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(Store::open_in_dir(&data)).unwrap();
    let driver = driver_support::driver_at_host(&store, &data, upstreams.clone(), cfg);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let running = rt.spawn(driver.clone().run(stop_rx));

    let (ann, bob) = rt.block_on(async {
        (
            store.create_user("ann", "user").await.unwrap().id,
            store.create_user("bob", "user").await.unwrap().id,
        )
    });
    // Ann holds the only port before anything runs (deterministic: Bob is
    // the one who finds the range exhausted).
    rt.block_on(store.assign_upstream_port(&ann, &upstreams))
        .unwrap();
    let ses = |user: &str, p: &str| rt.block_on(store.create_session(user, p)).unwrap().id;
    let fails = ses(&ann, "fails");
    let nourl = ses(&ann, "nourl");
    let holds = ses(&ann, "holds");
    let starved = ses(&bob, "holds");
    let opens = ses(&ann, "opens");
    let asks = ses(&ann, "asks");
    let stalls = ses(&ann, "stalls");
    let dies = ses(&ann, "dies");
    driver.notify();

    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(240);
        while !f() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\nhost agent:\n{}",
                host.agent_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let session = |id: &str| rt.block_on(store.session(id)).unwrap();
    let reason = |id: &str| session(id).life.failure.map(|f| (f.reason, f.detail));
    wait(
        "the failing logins to end and the holding one to wait",
        &|| {
            session(&fails).life.state.is_final()
                && session(&nourl).life.state.is_final()
                && session(&holds).life.state == SessionState::AwaitingUser
                && session(&opens).life.state == SessionState::AwaitingUser
                && session(&asks).life.state == SessionState::AwaitingUser
                && session(&dies).life.state == SessionState::AwaitingUser
                && session(&starved).life.state.is_final()
        },
    );
    // The browser VM of `dies` dies mid-login (its hypervisor killed).
    let dying_vm = rt
        .block_on(store.vm(session(&dies).browser_vm_id.as_deref().unwrap()))
        .unwrap()
        .host_vm_id
        .unwrap();
    let qemu: Vec<(u32, String)> = polydev_e2e::processes_mentioning(&format!("vms/{dying_vm}"))
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("qemu"))
        .collect();
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    // SAFETY: kill(2) on a process of this test's host agent.
    unsafe { libc::kill(qemu[0].0 as i32, libc::SIGKILL) };
    wait(
        "the dead VM's session to fail and the stalled login to time out",
        &|| session(&dies).life.state.is_final() && session(&stalls).life.state.is_final(),
    );
    let (r, d) = reason(&dies).unwrap();
    assert_eq!(r, FailureReason::VmDied, "{d}");
    let (r, d) = reason(&stalls).unwrap();
    assert_eq!(r, FailureReason::Timeout, "{d}");
    assert!(d.contains("within 30 s"), "{d}");
    let (r, d) = reason(&fails).unwrap();
    assert_eq!(r, FailureReason::LoginFailed, "{d}");
    assert!(d.contains("status 3"), "{d}");
    // The CLI's own last words are in the detail.
    assert!(d.contains("no network"), "{d}");
    assert_eq!(reason(&nourl).unwrap().0, FailureReason::AuthUrlNotFound);
    // …and in the VM's console log, kept after the VM is gone.
    let fails_vm = rt
        .block_on(store.vm(session(&fails).browser_vm_id.as_deref().unwrap()))
        .unwrap()
        .host_vm_id
        .unwrap();
    wait("the failed login's VM destroyed", &|| {
        data.join("logs")
            .join(&fails_vm)
            .join("console.log")
            .is_file()
    });
    let console =
        std::fs::read_to_string(data.join("logs").join(&fails_vm).join("console.log")).unwrap();
    assert!(
        console.contains(&format!(
            "the login of session {fails} ended (exit status 3)"
        )) && console.contains("no network"),
        "{console}"
    );

    // The question was answered, once: the URL came, nothing typed twice.
    let ev = rt.block_on(store.events_for("session", &asks)).unwrap();
    assert!(
        ev.iter()
            .any(|e| e.detail.get("auth_url").and_then(|u| u.as_str())
                == Some("https://auth.test.invalid/authorize?state=asked")),
        "{ev:?}"
    );
    let asks_vm = rt
        .block_on(store.vm(session(&asks).browser_vm_id.as_deref().unwrap()))
        .unwrap()
        .host_vm_id
        .unwrap();
    let out = host.sh(&asks_vm, "cat /run/polydev-login/*/output");
    assert!(
        out.stdout.contains("state=asked") && !out.stdout.contains("typed again"),
        "{}",
        out.stdout
    );

    // The URL given to $BROWSER (xdg-open's fallback) is recognised.
    let ev = rt.block_on(store.events_for("session", &opens)).unwrap();
    let url = ev.iter().find_map(|e| {
        e.detail
            .get("auth_url")
            .and_then(|u| u.as_str())
            .map(str::to_string)
    });
    assert_eq!(
        url.as_deref(),
        Some("https://auth.test.invalid/authorize?state=xdg")
    );

    // Bob never shares Ann's port: his browser VMs fail for capacity, and
    // the session gives up after its retry budget.
    let (r, d) = reason(&starved).unwrap();
    assert_eq!(r, FailureReason::RetriesExhausted, "{d}");
    let ev = rt.block_on(store.events_for("session", &starved)).unwrap();
    let why: Vec<String> = ev
        .iter()
        .filter_map(|e| {
            e.detail
                .get("vm_failure")
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .collect();
    assert!(
        !why.is_empty() && why.iter().all(|w| w.contains("no_capacity")),
        "{why:?}"
    );
    assert!(rt
        .block_on(store.upstream_assignment(&bob))
        .unwrap()
        .is_none());
    let stats = rt.block_on(store.upstream_stats(&upstreams)).unwrap();
    assert!(stats[0].exhausted_total >= 1, "{stats:?}");

    // Ann's VM got her port as its egress upstream (the host keeps the
    // policy in the live VM's 0600 record).
    let a = rt
        .block_on(store.upstream_assignment(&ann))
        .unwrap()
        .unwrap();
    assert_eq!(a.port, 18080);
    let vm = rt
        .block_on(store.vm(session(&holds).browser_vm_id.as_deref().unwrap()))
        .unwrap();
    let host_vm = vm.host_vm_id.clone().unwrap();
    let record = std::fs::read_to_string(data.join("vms").join(&host_vm).join("vm.json")).unwrap();
    assert!(record.contains("http://127.0.0.1:18080"), "{record}");
    assert!(record.contains("acct"));
    // …and nothing of it is inside the VM.
    let env = host.sh(
        &host_vm,
        "cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'; true",
    );
    assert!(!env.stdout.contains("up-pass-7"));

    // The failed sessions' VMs are gone; cancelling the waiting one (what
    // the API does) destroys its VM too.
    for id in [&holds, &opens, &asks] {
        let s = session(id);
        rt.block_on(store.transition_session(&s, SessionState::Cancelled, None, Also::default()))
            .unwrap();
    }
    driver.notify();
    wait("every browser VM destroyed", &|| {
        [&fails, &nourl, &holds, &opens, &asks, &stalls]
            .iter()
            .all(|id| {
                let b = session(id).browser_vm_id.unwrap();
                let st = rt.block_on(store.vm(&b)).unwrap().life.state;
                st == VmState::Destroyed
            })
    });
    // The killed one is recorded as what it is: failed, having died.
    let dead = rt
        .block_on(store.vm(session(&dies).browser_vm_id.as_deref().unwrap()))
        .unwrap();
    assert_eq!(dead.life.state, VmState::Failed, "{:?}", dead.life);
    assert_eq!(
        dead.life.failure.map(|f| f.reason),
        Some(FailureReason::VmDied)
    );
    // The host tears a dead VM down on its own time (kill, drain its
    // console, archive its logs, remove its directory).
    wait("no VM left at the host", &|| host.vm_dirs() == 0);
    // The ended browser VMs' logs are kept, the dead one's included.
    for id in [&stalls, &dies] {
        let vm = rt
            .block_on(store.vm(session(id).browser_vm_id.as_deref().unwrap()))
            .unwrap();
        let kept = data
            .join("logs")
            .join(vm.host_vm_id.unwrap())
            .join("console.log");
        assert!(kept.is_file(), "{}", kept.display());
    }

    stop.send(true).unwrap();
    rt.block_on(running).unwrap().unwrap();
}

/// A controller that died after asking the host for a VM but before
/// recording the answer: the next one finds the VM by its name (the
/// record's id) and adopts it instead of creating a second.
#[test]
fn an_interrupted_create_is_adopted_not_duplicated() {
    let host = Host::start();
    let data = host.data().to_path_buf();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(Store::open_in_dir(&data)).unwrap();
    let user = rt.block_on(store.create_user("cy", "user")).unwrap();
    let vm = rt
        .block_on(store.create_vm(&user.id, polydev_controller::store::VmKind::Cli))
        .unwrap();
    // What the previous controller did: record the placement (by name)…
    rt.block_on(register_host_row(&store));
    let vm = rt
        .block_on(store.transition_vm(
            &vm,
            VmState::Creating,
            None,
            Also {
                placement: Some((LOCAL_HOST_ID.into(), vm.id.clone())),
                ..Also::default()
            },
        ))
        .unwrap();
    // …and the host created it under that name.
    let at_host = host.run_vm(&["--name", &vm.id]);

    let cfg = DriverConfig::parse(
        "browser_image = \"minimal\"\ncli_image = \"minimal\"\npoll_ms = 200\nidle_poll_ms = 300\n",
        "driver.toml",
    )
    .unwrap();
    let driver = Driver::with_config(
        store.clone(),
        Arc::new(RemoteHost::new(LOCAL_HOST_ID, &data.join("host.sock"))),
        Providers::builtin().unwrap(),
        KeySource::fixed(Keyring::generate().unwrap()),
        UpstreamConfig::none(),
        cfg,
    );
    let (stop, rx) = tokio::sync::watch::channel(false);
    let running = rt.spawn(driver.run(rx));
    let deadline = Instant::now() + Duration::from_secs(60);
    let now = loop {
        let now = rt.block_on(store.vm(&vm.id)).unwrap();
        if now.life.state != VmState::Creating {
            break now;
        }
        assert!(Instant::now() < deadline, "still creating");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(now.life.state, VmState::Running);
    assert_eq!(now.host_vm_id.as_deref(), Some(at_host.id.as_str()));
    assert_eq!(host.vm_dirs(), 1, "no second VM");
    stop.send(true).unwrap();
    rt.block_on(running).unwrap().unwrap();
}

/// The `hosts` row placements reference (what `Driver::run` writes first).
async fn register_host_row(store: &Store) {
    // A throwaway driver run would register it too, but would also start
    // driving; the row is all this test needs.
    let (stop, rx) = tokio::sync::watch::channel(true);
    let d = Driver::with_config(
        store.clone(),
        Arc::new(RemoteHost::new(
            LOCAL_HOST_ID,
            Path::new("/nonexistent.sock"),
        )),
        Providers::builtin().unwrap(),
        KeySource::fixed(Keyring::generate().unwrap()),
        UpstreamConfig::none(),
        DriverConfig::default(),
    );
    d.run(rx).await.unwrap();
    drop(stop);
}
