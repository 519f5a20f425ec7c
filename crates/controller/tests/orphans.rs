//! The driver reclaims browser VMs nobody needs any more — one no session
//! claimed within the grace period (its session's creation died with a
//! controller), or one whose session is over — and leaves alone CLI VMs,
//! young browser VMs and browser VMs a live session still uses. Real store
//! (SQLite and PostgreSQL), real in-process host agent.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use polydev_controller::driver::{Driver, DriverConfig, KeySource};
use polydev_controller::providers::Providers;
use polydev_controller::recovery::LocalHost;
use polydev_controller::state::{SessionState, VmState};
use polydev_controller::store::{Also, Store, Vm, VmKind};
use polydev_controller::upstream::UpstreamConfig;
use polydev_controller::vault::Keyring;

both_backends!(orphaned_and_finished_browser_vms_are_reclaimed);

/// A VM of `kind` walked to `hibernated`, a state the driver only leaves
/// to reclaim it (so nothing else moves it during the test), created
/// `age_ms` ago.
async fn hibernated(s: &Store, user: &str, kind: VmKind, age_ms: i64) -> Vm {
    let mut vm = s.create_vm(user, kind).await.unwrap();
    for st in [
        VmState::Creating,
        VmState::Running,
        VmState::Hibernating,
        VmState::Hibernated,
    ] {
        let also = if st == VmState::Creating {
            Also {
                placement: Some(("h1".into(), "vm-0123456789ab".into())),
                ..Also::default()
            }
        } else {
            Also::default()
        };
        vm = s.transition_vm(&vm, st, None, also).await.unwrap();
    }
    let created = polydev_controller::util::now_ms() - age_ms;
    s.write_one(
        sqlx::query("UPDATE vms SET created_at = $1 WHERE id = $2")
            .bind(created)
            .bind(&vm.id),
    )
    .await
    .unwrap();
    s.vm(&vm.id).await.unwrap()
}

/// A session that claims `vm` as its browser VM and ends in `to`.
async fn claim(s: &Store, user: &str, vm: &Vm, to: SessionState) {
    let ses = s.create_session(user, "codex").await.unwrap();
    let ses = s
        .transition_session(
            &ses,
            SessionState::StartingVm,
            None,
            Also {
                browser_vm_id: Some(vm.id.clone()),
                ..Also::default()
            },
        )
        .await
        .unwrap();
    if to != SessionState::StartingVm {
        s.transition_session(&ses, to, None, Also::default())
            .await
            .unwrap();
    }
}

async fn wait_state(s: &Store, id: &str, want: VmState) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let vm = s.vm(id).await.unwrap();
        if vm.life.state == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} is {} after 60 s, expected {want}",
            vm.life.state
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn states(s: &Store, id: &str) -> Vec<String> {
    s.events_for("vm", id)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| e.to_state)
        .collect()
}

async fn orphaned_and_finished_browser_vms_are_reclaimed(db: common::TestDb) {
    const HOUR: i64 = 3_600_000;
    let s = &db.store;
    let u = s.create_user("alice", "user").await.unwrap();
    sqlx::query("INSERT INTO hosts (id, name, address, vcpus, memory_mib, state, created_at) VALUES ('h1', 'local', 'in-process', 4, 8192, 'up', 0)")
        .execute(s.pool())
        .await
        .unwrap();

    let orphan = hibernated(s, &u.id, VmKind::Browser, 2 * HOUR).await;
    let finished = hibernated(s, &u.id, VmKind::Browser, 0).await;
    claim(s, &u.id, &finished, SessionState::Cancelled).await;
    let young = hibernated(s, &u.id, VmKind::Browser, 0).await;
    let in_use = hibernated(s, &u.id, VmKind::Browser, 2 * HOUR).await;
    claim(s, &u.id, &in_use, SessionState::StartingVm).await;
    let cli = hibernated(s, &u.id, VmKind::Cli, 2 * HOUR).await;

    let host_dir = tempfile::tempdir().unwrap();
    let cfg = polydev_host::HostConfig::with_defaults(
        host_dir.path().to_path_buf(),
        host_dir.path().join("vmlinux"),
        host_dir.path().join("initramfs"),
    );
    let manager = polydev_host::Manager::start(cfg).await.unwrap();
    let host = Arc::new(LocalHost {
        host_id: "h1".into(),
        manager,
    });
    let driver = Driver::with_config(
        s.clone(),
        host,
        Providers::builtin().unwrap(),
        KeySource::fixed(Keyring::generate().unwrap()),
        UpstreamConfig::none(),
        DriverConfig {
            orphan_grace_ms: HOUR,
            poll_ms: 20,
            idle_poll_ms: 20,
            ..DriverConfig::default()
        },
    );
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(driver.run(shutdown));

    wait_state(s, &orphan.id, VmState::Destroyed).await;
    wait_state(s, &finished.id, VmState::Destroyed).await;
    for vm in [&orphan, &finished] {
        let seen = states(s, &vm.id).await;
        assert!(
            seen.ends_with(&["stopping".to_string(), "destroyed".to_string()]),
            "{}: {seen:?}",
            vm.id
        );
    }
    // The driver stepped every record in the passes that reclaimed those
    // two; the rest are untouched.
    for (vm, why) in [
        (&young, "a browser VM inside its grace period"),
        (&in_use, "a browser VM a live session uses"),
        (&cli, "a CLI VM"),
    ] {
        let now = s.vm(&vm.id).await.unwrap();
        assert_eq!(now.life.state, VmState::Hibernated, "{why} was moved");
        assert!(
            !states(s, &vm.id).await.iter().any(|st| st == "stopping"),
            "{why} was stopped"
        );
    }

    stop.send(true).unwrap();
    run.await.unwrap().unwrap();
}
