//! Restart recovery on a real store (SQLite and PostgreSQL) against a real
//! in-process host agent (`polydev_host::Manager`) that no longer runs the
//! VMs the previous controller placed — the state after a host reboot or a
//! controller that was killed while VMs died.

mod common;

use std::sync::Arc;

use polydev_controller::recovery::{recover, LocalHost};
use polydev_controller::state::{FailureReason, Lifecycle, SessionState, VmState};
use polydev_controller::store::{Also, Session, Store, Vm, VmKind};

both_backends!(every_non_final_state_is_settled);

/// Paths from the initial state to each non-final state.
fn session_path(to: SessionState) -> Vec<SessionState> {
    use SessionState::*;
    let full = [
        StartingVm,
        StartingLogin,
        AwaitingUser,
        Capturing,
        Delivering,
    ];
    match to {
        Requested => vec![],
        _ => full[..=full.iter().position(|s| *s == to).unwrap()].to_vec(),
    }
}

fn vm_path(to: VmState) -> Vec<VmState> {
    use VmState::*;
    match to {
        Pending => vec![],
        Creating => vec![Creating],
        Running => vec![Creating, Running],
        Hibernating => vec![Creating, Running, Hibernating],
        Hibernated => vec![Creating, Running, Hibernating, Hibernated],
        Resuming => vec![Creating, Running, Hibernating, Hibernated, Resuming],
        Stopping => vec![Creating, Running, Stopping],
        _ => unreachable!(),
    }
}

async fn walk_vm(s: &Store, user: &str, to: VmState) -> Vm {
    let mut vm = s.create_vm(user, VmKind::Browser).await.unwrap();
    for st in vm_path(to) {
        let also = if st == VmState::Creating {
            // An id the host agent has never seen: the VM is gone.
            Also {
                placement: Some(("h1".into(), "vm-0123456789ab".into())),
                ..Also::default()
            }
        } else {
            Also::default()
        };
        vm = s.transition_vm(&vm, st, None, also).await.unwrap();
    }
    vm
}

async fn walk_session(s: &Store, user: &str, to: SessionState) -> (Session, Option<Vm>) {
    let mut ses = s.create_session(user, "codex").await.unwrap();
    let mut vm = None;
    for st in session_path(to) {
        let mut also = Also::default();
        if st == SessionState::StartingVm {
            let v = walk_vm(s, user, VmState::Running).await;
            also.browser_vm_id = Some(v.id.clone());
            vm = Some(v);
        }
        ses = s.transition_session(&ses, st, None, also).await.unwrap();
    }
    (ses, vm)
}

/// The events of a record replay to exactly its current state.
async fn assert_events_complete(s: &Store, kind: &str, id: &str, state: &str, version: i64) {
    let ev = s.events_for(kind, id).await.unwrap();
    assert_eq!(ev[0].kind, "created");
    let changes: Vec<_> = ev.iter().filter(|e| e.kind == "state").collect();
    assert_eq!(changes.len() as i64, version - 1, "{kind} {id}");
    let mut cur = ev[0].detail["state"].as_str().unwrap().to_string();
    for e in changes {
        assert_eq!(e.from_state.as_deref(), Some(cur.as_str()));
        cur = e.to_state.clone().unwrap();
    }
    assert_eq!(cur, state, "{kind} {id}");
}

async fn every_non_final_state_is_settled(db: common::TestDb) {
    let s = &db.store;
    let u = s.create_user("alice", "user").await.unwrap();
    sqlx::query("INSERT INTO hosts (id, name, address, vcpus, memory_mib, state, created_at) VALUES ('h1', 'local', 'in-process', 4, 8192, 'up', 0)")
        .execute(s.pool())
        .await
        .unwrap();
    let mut vms = Vec::new();
    for &st in VmState::ALL.iter().filter(|s| !s.is_final()) {
        vms.push(walk_vm(s, &u.id, st).await);
    }
    let mut sessions = Vec::new();
    for &st in SessionState::ALL.iter().filter(|s| !s.is_final()) {
        sessions.push(walk_session(s, &u.id, st).await.0);
    }

    // A new controller opens the same database (the old handle is never
    // closed or flushed; a real SIGKILL test needs the server binary).
    let s = db.reopen().await;
    let host_dir = tempfile::tempdir().unwrap();
    let cfg = polydev_host::HostConfig::with_defaults(
        host_dir.path().to_path_buf(),
        host_dir.path().join("vmlinux"),
        host_dir.path().join("initramfs"),
    );
    let manager = polydev_host::Manager::start(cfg).await.unwrap();
    let host = LocalHost {
        host_id: "h1".into(),
        manager: Arc::clone(&manager),
    };

    let report = recover(&s, &host).await.unwrap();
    assert!(!report.failed.is_empty());

    for old in &vms {
        let vm = s.vm(&old.id).await.unwrap();
        let (state, reason) = (vm.life.state, vm.life.failure.as_ref().map(|f| f.reason));
        use VmState::*;
        let want = match old.life.state {
            Pending => (Pending, None),
            Creating => (Pending, None),
            Running => (Failed, Some(FailureReason::VmDied)),
            Hibernating | Resuming => (Failed, Some(FailureReason::VmDied)),
            Hibernated => (Hibernated, None),
            Stopping => (Destroyed, None),
            _ => unreachable!(),
        };
        assert_eq!((state, reason), want, "vm was {}", old.life.state);
        assert_events_complete(&s, "vm", &vm.id, state.as_str(), vm.life.version).await;
    }
    for old in &sessions {
        let ses = s.session(&old.id).await.unwrap();
        let (state, reason) = (ses.life.state, ses.life.failure.as_ref().map(|f| f.reason));
        use SessionState::*;
        let want = match old.life.state {
            Requested => (Requested, None),
            // The browser VM died: retry from the top.
            StartingVm => (Requested, None),
            StartingLogin | AwaitingUser | Capturing => (Failed, Some(FailureReason::VmDied)),
            Delivering => (Delivering, None),
            _ => unreachable!(),
        };
        assert_eq!((state, reason), want, "session was {}", old.life.state);
        if let Some(f) = &ses.life.failure {
            assert!(
                f.detail.contains("start the connection again"),
                "{}",
                f.detail
            );
        }
        assert_events_complete(&s, "session", &ses.id, state.as_str(), ses.life.version).await;
    }

    // A second restart finds nothing more to change.
    let again = recover(&s, &host).await.unwrap();
    assert_eq!((again.moved, again.failed.len()), (0, 0), "{again:?}");
}
