//! SIGKILL the controller while sessions sit in every non-final state, start
//! it again, and check that each one continues to completion (or fails with
//! a clear reason), none stays stuck, and every session's events form a
//! complete chain of transitions.
//!
//! Real parts throughout: the real `polydev` binary as host agent and as
//! controller (`polydev controller-run`: store + driver), real VMs (the
//! minimal image), a provider definition from a temp dir whose login command
//! is a test script. Each state is *held* by a gate file the test writes
//! into a VM when it wants the session to move on — no sleeps stand in for
//! readiness:
//!
//! * `requested`: the controller admits at most 5 sessions at once;
//! * `starting_vm`: the browser VM's readiness probe waits for `/tmp/gate-vm`;
//! * `starting_login`: the login prints its auth URL after `/tmp/gate-login`;
//! * `awaiting_user`: it writes a partial credential after `/tmp/gate-user`;
//! * `capturing`: it completes the credential and exits after `/tmp/gate-capture`;
//! * `delivering`: the CLI VM's readiness probe waits for `/tmp/gate-deliver`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use polydev_controller::driver::decode_credential;
use polydev_controller::state::{Lifecycle, SessionState, VmState};
use polydev_controller::store::{Session, Store, Vm, VmKind};
use polydev_controller::vault::{Keyring, Vault};
use polydev_e2e::{polydev_bin, Host};

mod driver_support;

/// The login: each step waits for its gate file.
const LOGIN: &str = r#"
w() { while [ ! -e "/tmp/gate-$1" ]; do sleep 0.2; done; }
w login
echo "Sign in at https://auth.test.invalid/authorize?client=polydev&state=$$"
w user
mkdir -p "$HOME/.testp"
echo '{"partial": true}' > "$HOME/.testp/creds.json"
w capture
echo '{"token": "tok-e2e-4711", "refresh": "r"}' > "$HOME/.testp/creds.json"
"#;

fn driver_toml(data: &Path) -> String {
    format!(
        r#"
browser_image = "minimal"
cli_image = "minimal"
browser_memory_mib = 0
cli_memory_mib = 0
login_user = "root"
login_home = "/root"
cli_home = "/root"
cli_owner = ""
browser_ready = ["sh", "-c", "[ -e /tmp/gate-vm ]"]
cli_ready = ["sh", "-c", "[ -e /tmp/gate-deliver ]"]
deliver_to_cli_vm = true
max_active_sessions = 5
poll_ms = 200
idle_poll_ms = 300
providers_dir = "{}"
"#,
        data.join("providers").display()
    )
}

/// `$POLYDEV_E2E_DATABASE` (e.g. a PostgreSQL URL) instead of the SQLite
/// file in the data directory.
fn database() -> Option<String> {
    std::env::var("POLYDEV_E2E_DATABASE").ok()
}

/// The controller process (`polydev controller-run`), output appended to
/// `<data>/controller.log`.
fn start_controller(data: &Path) -> Child {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(data.join("controller.log"))
        .expect("controller log");
    Command::new(polydev_bin())
        .arg("--data-dir")
        .arg(data)
        .arg("controller-run")
        .args(
            database()
                .map(|u| vec!["--database".to_string(), u])
                .unwrap_or_default(),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn polydev controller-run")
}

struct Ctx {
    host: Host,
    rt: tokio::runtime::Runtime,
    store: Store,
}

impl Ctx {
    fn session(&self, id: &str) -> Session {
        self.rt.block_on(self.store.session(id)).expect("session")
    }

    fn vm(&self, id: &str) -> Vm {
        self.rt.block_on(self.store.vm(id)).expect("vm")
    }

    fn log(&self) -> String {
        format!(
            "controller log:\n{}\nhost agent log:\n{}",
            std::fs::read_to_string(self.host.data().join("controller.log")).unwrap_or_default(),
            self.host.agent_log()
        )
    }

    /// Poll until `f` holds; fail with both logs after `timeout`.
    fn wait(&self, what: &str, timeout: Duration, mut f: impl FnMut(&Ctx) -> bool) {
        let deadline = Instant::now() + timeout;
        while !f(self) {
            if Instant::now() > deadline {
                let states: Vec<String> = self
                    .rt
                    .block_on(self.store.non_final_sessions())
                    .unwrap_or_default()
                    .iter()
                    .map(|s| format!("{} {} {:?}", s.id, s.life.state, s.life.failure))
                    .collect();
                panic!(
                    "timed out waiting for {what}; sessions: {states:?}\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The session's browser VM, once running.
    fn running_browser_vm(&self, s: &str) -> Option<String> {
        let ses = self.session(s);
        let vm = self.vm(ses.browser_vm_id.as_deref()?);
        (vm.life.state == VmState::Running)
            .then(|| vm.host_vm_id.clone())
            .flatten()
    }

    /// Open a gate inside a VM (by its host id).
    fn gate(&self, host_vm: &str, gate: &str) {
        self.host.sh(host_vm, &format!("touch /tmp/gate-{gate}"));
    }

    fn state(&self, s: &str) -> SessionState {
        self.session(s).life.state
    }
}

#[test]
fn sigkill_in_every_session_state_then_each_session_finishes() {
    let host = Host::start();
    let data = host.data().to_path_buf();
    std::fs::create_dir_all(data.join("providers")).unwrap();
    std::fs::write(
        data.join("providers/testp.toml"),
        driver_support::test_provider("testp", LOGIN, "output", ".testp/creds.json"),
    )
    .unwrap();
    std::fs::write(data.join("driver.toml"), driver_toml(&data)).unwrap();
    let mut controller = start_controller(&data);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = match database() {
        Some(url) => rt.block_on(Store::open(&url)),
        None => rt.block_on(Store::open_in_dir(&data)),
    }
    .expect("open store");
    let ctx = Ctx { host, rt, store };

    let user = ctx
        .rt
        .block_on(ctx.store.create_user("kim", "user"))
        .unwrap();
    // The user's CLI VM boots alongside the browser VMs (delivery target).
    let cli = ctx
        .rt
        .block_on(ctx.store.create_vm(&user.id, VmKind::Cli))
        .unwrap();
    let mut ses = Vec::new();
    for _ in 0..5 {
        ses.push(
            ctx.rt
                .block_on(ctx.store.create_session(&user.id, "testp"))
                .unwrap()
                .id,
        );
    }
    let boot = Duration::from_secs(240);
    ctx.wait("5 browser VMs and the CLI VM running", boot, |c| {
        ses.iter().all(|s| c.running_browser_vm(s).is_some())
            && c.vm(&cli.id).life.state == VmState::Running
    });
    assert!(ses.iter().all(|s| ctx.state(s) == SessionState::StartingVm));
    let vm_of: BTreeMap<String, String> = ses
        .iter()
        .map(|s| (s.clone(), ctx.running_browser_vm(s).unwrap()))
        .collect();

    // Walk sessions 2..5 one state further at a time, leaving one behind
    // in each state.
    let steps: [(&str, usize, SessionState); 4] = [
        ("vm", 1, SessionState::StartingLogin),
        ("login", 2, SessionState::AwaitingUser),
        ("user", 3, SessionState::Capturing),
        ("capture", 4, SessionState::Delivering),
    ];
    // Each step execs into five TCG VMs while a sixth boots: on a loaded
    // 2-core host that has taken over a minute.
    let t = Duration::from_secs(180);
    for (gate, from, want) in steps {
        for s in &ses[from..] {
            ctx.gate(&vm_of[s], gate);
        }
        ctx.wait(&format!("sessions {from}.. in {want}"), t, |c| {
            ses[from..].iter().all(|s| c.state(s) == want)
        });
    }
    // The sixth waits for capacity.
    let sixth = ctx
        .rt
        .block_on(ctx.store.create_session(&user.id, "testp"))
        .unwrap()
        .id;
    ses.push(sixth.clone());
    let before: Vec<SessionState> = ses.iter().map(|s| ctx.state(s)).collect();
    use SessionState::*;
    assert_eq!(
        before,
        [
            StartingVm,
            StartingLogin,
            AwaitingUser,
            Capturing,
            Delivering,
            Requested
        ],
        "{}",
        ctx.log()
    );
    // The auth URL the login printed is in the session's timeline.
    let events = ctx
        .rt
        .block_on(ctx.store.events_for("session", &ses[2]))
        .unwrap();
    let url = events
        .iter()
        .find(|e| e.to_state.as_deref() == Some("awaiting_user"))
        .and_then(|e| e.detail.get("auth_url"))
        .and_then(|u| u.as_str())
        .map(str::to_string)
        .expect("auth_url in the awaiting_user event");
    assert!(
        url.starts_with("https://auth.test.invalid/authorize?client=polydev&state="),
        "{url}"
    );

    // And a VM in the middle of being created (the create request is in
    // flight at the host agent for the whole boot).
    let lou = ctx
        .rt
        .block_on(ctx.store.create_user("lou", "user"))
        .unwrap();
    let late = ctx
        .rt
        .block_on(ctx.store.create_vm(&lou.id, VmKind::Cli))
        .unwrap();
    ctx.wait("the late VM creating", t, |c| {
        c.vm(&late.id).life.state == VmState::Creating
    });

    // SIGKILL: no chance to flush or clean up anything.
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(controller.id() as i32, libc::SIGKILL);
    }
    let st = controller.wait().unwrap();
    assert_eq!(st.code(), None, "killed by a signal");
    for (s, b) in ses.iter().zip(&before) {
        assert_eq!(
            ctx.state(s),
            *b,
            "nothing moves while the controller is down"
        );
    }
    let mut controller = start_controller(&data);

    // Open every gate in every VM (new ones too, e.g. the sixth session's),
    // and wait until no session is left.
    let mut gated = std::collections::BTreeSet::new();
    ctx.wait("every session final", Duration::from_secs(300), |c| {
        let vms = c.rt.block_on(c.store.non_final_vms()).unwrap_or_default();
        for vm in vms {
            if let (VmState::Running, Some(h)) = (vm.life.state, &vm.host_vm_id) {
                // A VM that ended meanwhile (its session finished) fails
                // the exec; that is fine.
                if !gated.contains(h) {
                    let r = c.host.cli(&[
                        "vm", "exec", h, "--", "sh", "-c",
                        "touch /tmp/gate-vm /tmp/gate-login /tmp/gate-user /tmp/gate-capture /tmp/gate-deliver",
                    ]);
                    if r.code == 0 {
                        gated.insert(h.clone());
                    }
                }
            }
        }
        ses.iter().all(|s| c.state(s).is_final())
    });

    for s in &ses {
        let fin = ctx.session(s);
        assert_eq!(
            fin.life.state,
            SessionState::Completed,
            "session {s} ended {:?}\n{}",
            fin.life.failure,
            ctx.log()
        );
        // Events: created, then an unbroken chain of transitions from
        // requested through every state to completed, versions 2, 3, ….
        let ev = ctx.rt.block_on(ctx.store.events_for("session", s)).unwrap();
        assert_eq!(ev[0].kind, "created");
        let mut cur = "requested".to_string();
        let mut path = vec![cur.clone()];
        for (i, e) in ev[1..].iter().enumerate() {
            assert_eq!(e.kind, "state");
            assert_eq!(e.from_state.as_deref(), Some(cur.as_str()), "{s}: {ev:?}");
            assert_eq!(e.detail["version"], i as i64 + 2, "{s}: {ev:?}");
            cur = e.to_state.clone().unwrap();
            path.push(cur.clone());
        }
        assert_eq!(
            path,
            [
                "requested",
                "starting_vm",
                "starting_login",
                "awaiting_user",
                "capturing",
                "delivering",
                "completed"
            ],
            "{s}"
        );
    }

    // The credential is in the vault (sealed under the key file's key) and
    // in the CLI VM; the browser VMs are destroyed once their sessions end.
    let ring = Keyring::load(&data.join("vault-keys.toml")).unwrap();
    let rec = ctx
        .rt
        .block_on(ctx.store.credential(&user.id, "testp"))
        .unwrap()
        .expect("credential stored");
    let pt = Vault::new(ring).open(&rec).unwrap();
    let files = decode_credential(&pt).expect("credential format");
    assert!(String::from_utf8_lossy(&files[".testp/creds.json"]).contains("tok-e2e-4711"));
    assert_eq!(rec.version, 1, "a resumed capture adds no version");
    // The VM whose create was cut off runs, once, and nothing is left
    // half-started at the host.
    ctx.wait("the late VM running", Duration::from_secs(240), |c| {
        c.vm(&late.id).life.state == VmState::Running
    });
    let ls = ctx.host.ok(&["vm", "ls", "--json"]).stdout;
    let live: Vec<polydev_api::vm::VmInfo> = serde_json::from_str(ls.trim()).unwrap();
    let named: Vec<_> = live
        .iter()
        .filter(|v| v.name.as_deref() == Some(late.id.as_str()))
        .collect();
    assert_eq!(named.len(), 1, "{live:?}");
    assert_eq!(named[0].state, polydev_api::vm::VmState::Running);
    assert!(
        live.iter()
            .all(|v| v.state != polydev_api::vm::VmState::Starting),
        "{live:?}"
    );
    let late_events = ctx
        .rt
        .block_on(ctx.store.events_for("vm", &late.id))
        .unwrap();
    let path: Vec<String> = late_events
        .iter()
        .filter_map(|e| e.to_state.clone())
        .collect();
    assert_eq!(path.last().map(String::as_str), Some("running"), "{path:?}");
    eprintln!("VM created across the kill: {path:?}");

    let cli_vm = ctx.vm(&cli.id);
    let got = ctx.host.sh(
        cli_vm.host_vm_id.as_deref().unwrap(),
        "cat /root/.testp/creds.json",
    );
    assert!(got.stdout.contains("tok-e2e-4711"));
    ctx.wait("browser VMs destroyed", Duration::from_secs(60), |c| {
        ses.iter().all(|s| {
            let b = c.session(s).browser_vm_id.unwrap();
            c.vm(&b).life.state == VmState::Destroyed
        })
    });
    assert_eq!(
        ctx.rt.block_on(ctx.store.non_final_sessions()).unwrap(),
        vec![],
        "no session stuck"
    );

    let _ = controller.kill();
    let _ = controller.wait();
    let cli_host = cli_vm.host_vm_id.unwrap();
    ctx.host.ok(&["vm", "rm", &cli_host]);
}
