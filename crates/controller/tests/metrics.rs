//! The controller's Prometheus text on SQLite and a real PostgreSQL: the
//! upstream alert metric shows a full range and counts each refusal.

mod common;

use polydev_controller::metrics::render;
use polydev_controller::store::VmKind;
use polydev_controller::upstream::UpstreamConfig;

both_backends!(
    a_full_upstream_range_shows_as_zero_free_and_counts_refusals,
    creations_failures_by_reason_and_login_durations
);

/// Failures are counted by their closed reason, and a completed login's
/// duration lands in the right histogram bucket (timestamps are set in the
/// rows, never waited for).
async fn creations_failures_by_reason_and_login_durations(db: common::TestDb) {
    use polydev_controller::state::{Failure, FailureReason, SessionState, VmState};
    use polydev_controller::store::Also;
    let s = db.store.clone();
    let u = s.create_user("m", "user").await.unwrap();
    for _ in 0..2 {
        let vm = s.create_vm(&u.id, VmKind::Browser).await.unwrap();
        s.transition_vm(
            &vm,
            VmState::Failed,
            Some(Failure::new(FailureReason::NoCapacity, "full")),
            Also::default(),
        )
        .await
        .unwrap();
    }
    s.create_vm(&u.id, VmKind::Cli).await.unwrap();
    let failed = s.create_session(&u.id, "codex").await.unwrap();
    s.transition_session(
        &failed,
        SessionState::Failed,
        Some(Failure::new(FailureReason::Timeout, "slow")),
        Also::default(),
    )
    .await
    .unwrap();
    // A session that completed 90 s after it was requested.
    let done = s.create_session(&u.id, "codex").await.unwrap();
    sqlx::query(
        "UPDATE sessions SET state = 'completed', state_since = created_at + 90000 WHERE id = $1",
    )
    .bind(&done.id)
    .execute(s.pool())
    .await
    .unwrap();
    let text = render(&s, &UpstreamConfig::none()).await.unwrap();
    for line in [
        "polydev_vm_created_total 3\n",
        "polydev_vm_failures_total{reason=\"no_capacity\"} 2\n",
        "polydev_session_failures_total{reason=\"timeout\"} 1\n",
        "polydev_login_duration_seconds_bucket{le=\"60\"} 0\n",
        "polydev_login_duration_seconds_bucket{le=\"120\"} 1\n",
        "polydev_login_duration_seconds_bucket{le=\"+Inf\"} 1\n",
        "polydev_login_duration_seconds_sum 90\n",
        "polydev_login_duration_seconds_count 1\n",
    ] {
        assert!(text.contains(line), "{line:?} missing in\n{text}");
    }
}

async fn a_full_upstream_range_shows_as_zero_free_and_counts_refusals(db: common::TestDb) {
    let s = db.store.clone();
    let cfg = UpstreamConfig::parse(
        "[[provider]]\nname = \"resi\"\nhost = \"127.0.0.1\"\nports = \"20000-20001\"\nusername = \"acct\"\nquarantine_secs = 3600\n",
        "test.toml",
    )
    .unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(s.create_user(&format!("m{i}"), "user").await.unwrap().id);
    }
    s.create_vm(&ids[0], VmKind::Cli).await.unwrap();
    let text = render(&s, &cfg).await.unwrap();
    assert!(
        text.contains("polydev_upstream_ports{provider=\"resi\",status=\"free\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("polydev_upstream_exhausted_total{provider=\"resi\"} 0\n"),
        "{text}"
    );
    assert!(
        text.contains("polydev_vms{state=\"pending\"} 1\n"),
        "{text}"
    );

    for id in &ids[..2] {
        s.assign_upstream_port(id, &cfg).await.unwrap();
    }
    assert!(s.assign_upstream_port(&ids[2], &cfg).await.is_err());
    assert!(s.assign_upstream_port(&ids[2], &cfg).await.is_err());
    let text = render(&s, &cfg).await.unwrap();
    for line in [
        "polydev_upstream_ports{provider=\"resi\",status=\"size\"} 2\n",
        "polydev_upstream_ports{provider=\"resi\",status=\"assigned\"} 2\n",
        "polydev_upstream_ports{provider=\"resi\",status=\"free\"} 0\n",
        "polydev_upstream_exhausted_total{provider=\"resi\"} 2\n",
        "# TYPE polydev_upstream_exhausted_total counter\n",
    ] {
        assert!(text.contains(line), "{line:?} missing in\n{text}");
    }
}
