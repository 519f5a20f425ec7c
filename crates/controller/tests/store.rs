//! The store suite, run on SQLite and on a real PostgreSQL server.

mod common;

use polydev_controller::state::{Failure, FailureReason, Lifecycle, SessionState, VmState};
use polydev_controller::store::{latest_version, Also, StoreError, VmKind};

both_backends!(
    migrations_applied_and_idempotent,
    refuses_newer_schema,
    refuses_changed_migration,
    session_happy_path_with_events,
    invalid_transition_writes_nothing,
    failure_reason_required_exactly_for_failed,
    retries_are_bounded,
    stale_version_conflicts,
    concurrent_transitions_one_winner,
    events_are_append_only,
    vm_lifecycle_with_placement,
    records_survive_reopen,
);

async fn migrations_applied_and_idempotent(db: common::TestDb) {
    assert_eq!(db.store.schema_version().await.unwrap(), latest_version());
    // Opening again applies nothing and still works.
    let again = db.reopen().await;
    assert_eq!(again.schema_version().await.unwrap(), latest_version());
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM schema_migrations")
        .fetch_one(again.pool())
        .await
        .unwrap();
    assert_eq!(n, latest_version());
    if db.sqlite_path.is_some() {
        let (mode,): (String,) = sqlx::query_as("PRAGMA journal_mode")
            .fetch_one(db.store.pool())
            .await
            .unwrap();
        assert_eq!(mode.to_lowercase(), "wal");
    }
}

async fn refuses_newer_schema(db: common::TestDb) {
    sqlx::query("INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES ($1, 'future', 'x', 0)")
        .bind(latest_version() + 1)
        .execute(db.store.pool())
        .await
        .unwrap();
    db.store.close().await;
    let err = polydev_controller::store::Store::open(&db.url)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::SchemaTooNew { .. }), "{err}");
    assert!(err.to_string().contains("newer than this binary"), "{err}");
}

async fn refuses_changed_migration(db: common::TestDb) {
    sqlx::query("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
        .execute(db.store.pool())
        .await
        .unwrap();
    let err = polydev_controller::store::Store::open(&db.url)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::MigrationChanged { version: 1, .. }),
        "{err}"
    );
}

async fn session_happy_path_with_events(db: common::TestDb) {
    use SessionState::*;
    let s = &db.store;
    let u = s.create_user("alice", "user").await.unwrap();
    let mut ses = s.create_session(&u.id, "codex").await.unwrap();
    assert_eq!(ses.life.state, Requested);
    assert!(ses.life.deadline_at.is_some());
    let vm = s.create_vm(&u.id, VmKind::Browser).await.unwrap();
    let path = [
        StartingVm,
        StartingLogin,
        AwaitingUser,
        Capturing,
        Delivering,
        Completed,
    ];
    for (i, to) in path.iter().enumerate() {
        let also = if *to == StartingVm {
            Also {
                browser_vm_id: Some(vm.id.clone()),
                ..Also::default()
            }
        } else {
            Also::default()
        };
        ses = s.transition_session(&ses, *to, None, also).await.unwrap();
        assert_eq!(ses.life.state, *to);
        assert_eq!(ses.life.version, 2 + i as i64);
        assert_eq!(ses.life.deadline_at.is_some(), to.timeout().is_some());
    }
    assert_eq!(ses.browser_vm_id.as_deref(), Some(vm.id.as_str()));
    assert_eq!(ses.life.attempts, 1);
    let ev = s.events_for("session", &ses.id).await.unwrap();
    assert_eq!(ev.len(), 1 + path.len());
    assert_eq!(ev[0].kind, "created");
    let mut prev = "requested".to_string();
    for (e, to) in ev[1..].iter().zip(path) {
        assert_eq!(e.kind, "state");
        assert_eq!(e.from_state.as_deref(), Some(prev.as_str()));
        assert_eq!(e.to_state.as_deref(), Some(to.as_str()));
        assert_eq!(e.user_id.as_deref(), Some(u.id.as_str()));
        prev = to.as_str().to_string();
    }
    assert!(s.non_final_sessions().await.unwrap().is_empty());
}

async fn invalid_transition_writes_nothing(db: common::TestDb) {
    let s = &db.store;
    let u = s.create_user("bob", "user").await.unwrap();
    let ses = s.create_session(&u.id, "gemini-cli").await.unwrap();
    // Every invalid target from the initial state is refused.
    for &to in SessionState::ALL {
        if SessionState::Requested.valid_transition(to) {
            continue;
        }
        let failure =
            (to == SessionState::Failed).then(|| Failure::new(FailureReason::Internal, "x"));
        let err = s
            .transition_session(&ses, to, failure, Also::default())
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidTransition { .. }),
            "{to}: {err}"
        );
    }
    assert_eq!(s.session(&ses.id).await.unwrap(), ses);
    assert_eq!(s.events_for("session", &ses.id).await.unwrap().len(), 1);
}

async fn failure_reason_required_exactly_for_failed(db: common::TestDb) {
    let s = &db.store;
    let u = s.create_user("carol", "user").await.unwrap();
    let ses = s.create_session(&u.id, "codex").await.unwrap();
    let e = s
        .transition_session(&ses, SessionState::Failed, None, Also::default())
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::FailureMismatch { .. }), "{e}");
    let f = Failure::new(FailureReason::Internal, "x");
    let e = s
        .transition_session(&ses, SessionState::StartingVm, Some(f), Also::default())
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::FailureMismatch { .. }), "{e}");
    let f = Failure::new(FailureReason::VmCreateFailed, "host said no");
    let failed = s
        .transition_session(&ses, SessionState::Failed, Some(f.clone()), Also::default())
        .await
        .unwrap();
    assert_eq!(failed.life.failure, Some(f));
    assert_eq!(failed.life.deadline_at, None);
    let ev = s.events_for("session", &ses.id).await.unwrap();
    assert_eq!(ev[1].detail["reason"], "vm_create_failed");
    assert_eq!(ev[1].detail["detail"], "host said no");
}

async fn retries_are_bounded(db: common::TestDb) {
    use SessionState::*;
    let s = &db.store;
    let u = s.create_user("dave", "user").await.unwrap();
    let mut ses = s.create_session(&u.id, "codex").await.unwrap();
    let limit = StartingVm.entry_limit().unwrap();
    for attempt in 1..=limit {
        ses = s
            .transition_session(&ses, StartingVm, None, Also::default())
            .await
            .unwrap();
        assert_eq!((ses.life.state, ses.life.attempts), (StartingVm, attempt));
        ses = s
            .transition_session(&ses, Requested, None, Also::default())
            .await
            .unwrap();
    }
    // One entry too many: recorded as failed, not looped.
    ses = s
        .transition_session(&ses, StartingVm, None, Also::default())
        .await
        .unwrap();
    assert_eq!(ses.life.state, Failed);
    assert_eq!(
        ses.life.failure.as_ref().unwrap().reason,
        FailureReason::RetriesExhausted
    );
    let last = s
        .events_for("session", &ses.id)
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(last.to_state.as_deref(), Some("failed"));
    assert_eq!(last.detail["reason"], "retries_exhausted");
}

async fn stale_version_conflicts(db: common::TestDb) {
    let s = &db.store;
    let u = s.create_user("erin", "user").await.unwrap();
    let ses = s.create_session(&u.id, "codex").await.unwrap();
    s.transition_session(&ses, SessionState::StartingVm, None, Also::default())
        .await
        .unwrap();
    // `ses` is now stale: the step it would take is valid from its view but
    // the row moved on.
    let e = s
        .transition_session(&ses, SessionState::Cancelled, None, Also::default())
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { expected: 1, .. }), "{e}");
    let now = s.session(&ses.id).await.unwrap();
    assert_eq!(now.life.state, SessionState::StartingVm);
    assert_eq!(s.events_for("session", &ses.id).await.unwrap().len(), 2);
}

async fn concurrent_transitions_one_winner(db: common::TestDb) {
    let s = db.store.clone();
    let u = s.create_user("frank", "user").await.unwrap();
    let ses = s.create_session(&u.id, "codex").await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (s, ses) = (s.clone(), ses.clone());
        tasks.push(tokio::spawn(async move {
            s.transition_session(&ses, SessionState::StartingVm, None, Also::default())
                .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(s.events_for("session", &ses.id).await.unwrap().len(), 2);
}

async fn events_are_append_only(db: common::TestDb) {
    let s = &db.store;
    let u = s.create_user("gina", "user").await.unwrap();
    assert!(sqlx::query("UPDATE events SET kind = 'x'")
        .execute(s.pool())
        .await
        .is_err());
    assert!(sqlx::query("DELETE FROM events")
        .execute(s.pool())
        .await
        .is_err());
    assert_eq!(s.events_for("user", &u.id).await.unwrap().len(), 1);
}

async fn vm_lifecycle_with_placement(db: common::TestDb) {
    use VmState::*;
    let s = &db.store;
    let u = s.create_user("hank", "user").await.unwrap();
    sqlx::query("INSERT INTO hosts (id, name, address, vcpus, memory_mib, state, created_at) VALUES ('h1', 'local', 'unix:host.sock', 4, 8192, 'up', 0)")
        .execute(s.pool())
        .await
        .unwrap();
    let vm = s.create_vm(&u.id, VmKind::Cli).await.unwrap();
    let vm = s
        .transition_vm(
            &vm,
            Creating,
            None,
            Also {
                placement: Some(("h1".into(), "vm-abc".into())),
                ..Also::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(vm.host_id.as_deref(), Some("h1"));
    assert_eq!(vm.host_vm_id.as_deref(), Some("vm-abc"));
    let vm = s
        .transition_vm(&vm, Running, None, Also::default())
        .await
        .unwrap();
    assert_eq!(vm.life.deadline_at, None);
    assert_eq!(s.non_final_vms().await.unwrap(), vec![vm.clone()]);
    let vm = s
        .transition_vm(&vm, Hibernating, None, Also::default())
        .await
        .unwrap();
    let vm = s
        .transition_vm(&vm, Hibernated, None, Also::default())
        .await
        .unwrap();
    let vm = s
        .transition_vm(&vm, Stopping, None, Also::default())
        .await
        .unwrap();
    let vm = s
        .transition_vm(&vm, Destroyed, None, Also::default())
        .await
        .unwrap();
    assert!(s.non_final_vms().await.unwrap().is_empty());
    let ev = s.events_for("vm", &vm.id).await.unwrap();
    assert_eq!(ev.len(), 7);
    let e = s
        .transition_vm(&vm, Running, None, Also::default())
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::InvalidTransition { .. }), "{e}");
}

async fn records_survive_reopen(db: common::TestDb) {
    let s = &db.store;
    let u = s.create_user("ivy", "user").await.unwrap();
    let a = s.create_session(&u.id, "codex").await.unwrap();
    let a = s
        .transition_session(&a, SessionState::StartingVm, None, Also::default())
        .await
        .unwrap();
    let b = s.create_session(&u.id, "claude-code").await.unwrap();
    let c = s.create_session(&u.id, "gemini-cli").await.unwrap();
    s.transition_session(&c, SessionState::Cancelled, None, Also::default())
        .await
        .unwrap();
    s.close().await;
    let s2 = db.reopen().await;
    let live = s2.non_final_sessions().await.unwrap();
    assert_eq!(live, vec![a, b]);
    assert_eq!(s2.user(&u.id).await.unwrap(), u);
}

both_backends!(
    overdue_records_fail_with_timeout,
    concurrent_first_open_migrates_once
);

async fn overdue_records_fail_with_timeout(db: common::TestDb) {
    use polydev_controller::recovery::fail_overdue;
    let s = &db.store;
    let u = s.create_user("tina", "user").await.unwrap();
    let late = s.create_session(&u.id, "codex").await.unwrap();
    let fresh = s.create_session(&u.id, "codex").await.unwrap();
    let vm = s.create_vm(&u.id, VmKind::Browser).await.unwrap();
    let now = polydev_controller::util::now_ms();
    assert!(fail_overdue(s, now).await.unwrap().is_empty());
    // Deadlines are data: move two into the past as time would.
    for (t, id) in [("sessions", &late.id), ("vms", &vm.id)] {
        sqlx::query(&format!("UPDATE {t} SET deadline_at = $1 WHERE id = $2"))
            .bind(now - 1)
            .bind(id)
            .execute(s.pool())
            .await
            .unwrap();
    }
    let mut failed = fail_overdue(s, now).await.unwrap();
    failed.sort();
    let mut want = vec![late.id.clone(), vm.id.clone()];
    want.sort();
    assert_eq!(failed, want);
    let l = s.session(&late.id).await.unwrap();
    assert_eq!(l.life.state, SessionState::Failed);
    assert_eq!(l.life.failure.unwrap().reason, FailureReason::Timeout);
    assert_eq!(
        s.session(&fresh.id).await.unwrap().life.state,
        SessionState::Requested
    );
    assert_eq!(s.vm(&vm.id).await.unwrap().life.state, VmState::Failed);
    let ev = s.events_for("session", &late.id).await.unwrap();
    assert_eq!(ev.last().unwrap().detail["reason"], "timeout");
}

async fn concurrent_first_open_migrates_once(db: common::TestDb) {
    // Several controllers start on the same database at once: all come up,
    // and the migration is recorded once.
    let fresh = db.fresh_url().await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = fresh.clone();
        tasks.push(tokio::spawn(async move {
            polydev_controller::store::Store::open(&url).await
        }));
    }
    let mut stores = Vec::new();
    for t in tasks {
        stores.push(t.await.unwrap().unwrap());
    }
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM schema_migrations")
        .fetch_one(stores[0].pool())
        .await
        .unwrap();
    assert_eq!(n, latest_version());
}

#[tokio::test]
async fn sqlite_in_awkward_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("my data ?#%");
    std::fs::create_dir_all(&data).unwrap();
    let s = polydev_controller::store::Store::open_in_dir(&data)
        .await
        .unwrap();
    let u = s.create_user("zed", "admin").await.unwrap();
    s.close().await;
    assert!(data.join("controller.db").exists());
    let s = polydev_controller::store::Store::open_in_dir(&data)
        .await
        .unwrap();
    assert_eq!(s.user(&u.id).await.unwrap().name, "zed");
    // A data dir that does not exist is a clear error, not a panic.
    let e = polydev_controller::store::Store::open_in_dir(&dir.path().join("missing"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cannot open database"), "{e}");
    let e = polydev_controller::store::Store::open("mysql://x")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("sqlite://"), "{e}");
}
