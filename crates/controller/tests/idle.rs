//! Idle hibernation of CLI VMs over the real HTTP API and driver, on
//! SQLite and on a real PostgreSQL: a CLI VM nobody uses is hibernated
//! (the reason in its event), a run on it resumes it and keeps it awake
//! while it goes on, a terminal ticket resumes it, a recorded use keeps it
//! awake, and a disconnect resumes it to take the files out.
//!
//! The host keeps its VM's power in memory and runs execs as local
//! processes ([`common::rig::LocalExec`]); what hibernation does to a real
//! VM (memory saved, resumed with its files, clock and fresh entropy) is
//! the e2e test `tests/tests/hibernate.rs`.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::api::eventually;
use common::rig::{cli_vm, connect, host_row, run_body, user, Rig};
use polydev_controller::http::HttpConfig;
use polydev_controller::state::{Lifecycle, VmState};
use polydev_controller::store::{RunState, Store};
use reqwest::Method;
use serde_json::json;

both_backends!(an_idle_cli_vm_hibernates_and_each_use_resumes_it);

async fn wait_vm(s: &Store, id: &str, want: VmState) {
    eventually(30, &format!("VM {id} is {}", want.as_str()), || async {
        s.vm(id).await.unwrap().life.state == want
    })
    .await;
}

async fn an_idle_cli_vm_hibernates_and_each_use_resumes_it(db: common::TestDb) {
    let mut rig = Rig::start_idle(&db, HttpConfig::unlimited(), 1).await;
    rig.host.reports_power.store(true, Ordering::SeqCst);
    host_row(&rig.store).await;
    let (alice, t) = user(&rig.auth, "alice").await;
    connect(&rig.store, &alice, "fakecli").await;
    let vm = cli_vm(&rig.store, &alice, &[VmState::Creating, VmState::Running]).await;
    rig.run_driver();
    let s = rig.store.clone();
    let host = rig.host.clone();

    // Unused for a second: hibernated, and its event says why.
    wait_vm(&s, &vm.id, VmState::Hibernated).await;
    assert_eq!(host.hibernations.load(Ordering::SeqCst), 1);
    let events = s.events_for("vm", &vm.id).await.unwrap();
    let into = events
        .iter()
        .find(|e| e.to_state.as_deref() == Some("hibernating"))
        .expect("a hibernating event");
    assert_eq!(into.detail["reason"], "idle", "{:?}", into.detail);
    assert!(into.detail["idle_ms"].as_i64().unwrap() >= 1000);
    let done = events
        .iter()
        .find(|e| e.to_state.as_deref() == Some("hibernated"))
        .expect("a hibernated event");
    assert_eq!(done.detail["memory_saved"], true, "{:?}", done.detail);

    // A run resumes it, and runs in it.
    let (st, _, v) = rig
        .call(Method::POST, "/api/v1/runs", &t, Some(run_body("hello")))
        .await;
    assert_eq!(st, 201, "{v}");
    let run = v["id"].as_str().unwrap().to_string();
    let r = rig.wait_state(&run, RunState::Succeeded).await;
    assert_eq!(r.exit_code, Some(0));
    assert_eq!(host.starts.load(Ordering::SeqCst), 1);

    // Idle again after the run, then a long run keeps it awake past the
    // limit: it hibernates only once the run has ended.
    wait_vm(&s, &vm.id, VmState::Hibernated).await;
    assert_eq!(host.hibernations.load(Ordering::SeqCst), 2);
    let gate = rig.dir.path().join("gate");
    let (st, _, v) = rig
        .call(
            Method::POST,
            "/api/v1/runs",
            &t,
            Some(run_body(&format!("wait {}", gate.display()))),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let run = v["id"].as_str().unwrap().to_string();
    eventually(30, "the long run printed its first line", || async {
        s.run_events_after(&run, 0, 100)
            .await
            .unwrap()
            .iter()
            .any(|e| e.kind == "start")
    })
    .await;
    // Time passing is what is tested here: three idle limits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(s.vm(&vm.id).await.unwrap().life.state, VmState::Running);
    assert_eq!(host.hibernations.load(Ordering::SeqCst), 2);
    std::fs::write(&gate, b"").unwrap();
    rig.wait_state(&run, RunState::Succeeded).await;
    wait_vm(&s, &vm.id, VmState::Hibernated).await;
    assert_eq!(host.hibernations.load(Ordering::SeqCst), 3);

    // A terminal ticket resumes it; recorded uses keep it awake, and once
    // they stop it hibernates again.
    let (st, _, v) = rig
        .call(
            Method::POST,
            "/api/v1/tickets",
            &t,
            Some(json!({"kind": "terminal", "resource_id": vm.id})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    wait_vm(&s, &vm.id, VmState::Running).await;
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        s.touch_vm(&vm.id, polydev_controller::util::now_ms())
            .await
            .unwrap();
        assert_eq!(s.vm(&vm.id).await.unwrap().life.state, VmState::Running);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_vm(&s, &vm.id, VmState::Hibernated).await;
    assert_eq!(host.hibernations.load(Ordering::SeqCst), 4);

    // A disconnect resumes the hibernated holder to take the files out.
    let starts = host.starts.load(Ordering::SeqCst);
    let (st, _, v) = rig
        .call(Method::DELETE, "/api/v1/credentials/fakecli", &t, None)
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["removed_from_vm"], json!(vm.id));
    assert_eq!(host.starts.load(Ordering::SeqCst), starts + 1);
    rig.stop_driver();
}
