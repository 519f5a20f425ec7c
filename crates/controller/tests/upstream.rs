//! Upstream port assignment on SQLite and a real PostgreSQL: unique under
//! concurrency, stable across a restart, quarantine after release, pins that
//! never share, exhaustion as an error plus an alert event.

mod common;

use polydev_controller::store::{Store, UpstreamError};
use polydev_controller::upstream::UpstreamConfig;

both_backends!(
    hundred_concurrent_users_get_distinct_ports_that_survive_a_restart,
    released_ports_wait_out_their_quarantine,
    pins_never_share_a_port
);

fn config(ports: &str, quarantine_secs: u64) -> UpstreamConfig {
    UpstreamConfig::parse(
        &format!(
            "[[provider]]\nname = \"resi\"\nhost = \"127.0.0.1\"\nports = \"{ports}\"\nusername = \"acct\"\nquarantine_secs = {quarantine_secs}\n"
        ),
        "test.toml",
    )
    .unwrap()
}

async fn users(s: &Store, prefix: &str, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(
            s.create_user(&format!("{prefix}{i}"), "user")
                .await
                .unwrap()
                .id,
        );
    }
    out
}

async fn hundred_concurrent_users_get_distinct_ports_that_survive_a_restart(db: common::TestDb) {
    let s = db.store.clone();
    let cfg = config("10000-10099", 3600);
    let ids = users(&s, "u", 101).await;
    let mut tasks = Vec::new();
    for id in ids.iter().take(100) {
        let (s, id, cfg) = (s.clone(), id.clone(), cfg.clone());
        tasks.push(tokio::spawn(async move {
            s.assign_upstream_port(&id, &cfg).await
        }));
    }
    let mut ports = Vec::new();
    for t in tasks {
        ports.push(t.await.unwrap().unwrap().port);
    }
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 100, "two users share a port");
    assert_eq!(ports, (10000..=10099).collect::<Vec<u16>>());

    // The 101st user gets a clear error, never someone else's port.
    let e = s.assign_upstream_port(&ids[100], &cfg).await.unwrap_err();
    assert!(matches!(e, UpstreamError::Exhausted { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("resi 10000-10099: 100 assigned") && msg.contains("never shared"),
        "{msg}"
    );
    let st = &s.upstream_stats(&cfg).await.unwrap()[0];
    assert_eq!(
        (
            st.size,
            st.assigned,
            st.quarantined,
            st.free,
            st.exhausted_total
        ),
        (100, 100, 0, 0, 1)
    );

    // A restarted controller (a new handle on the same database) sees the
    // same assignment for everyone, and a repeated request changes nothing.
    let before = s.list_upstream_assignments().await.unwrap();
    let s2 = db.reopen().await;
    assert_eq!(s2.list_upstream_assignments().await.unwrap(), before);
    for a in before.iter().take(10) {
        assert_eq!(s2.assign_upstream_port(&a.user_id, &cfg).await.unwrap(), *a);
    }
    // The database itself refuses a second holder of a port.
    let dup = sqlx::query(
        "INSERT INTO upstream_assignments (user_id, provider, port, pinned, assigned_at) VALUES ($1, 'resi', 10000, 0, 0)",
    )
    .bind(&ids[100])
    .execute(s2.pool())
    .await;
    assert!(dup.is_err());
}

async fn released_ports_wait_out_their_quarantine(db: common::TestDb) {
    let s = &db.store;
    let cfg = config("20000-20002", 3600);
    let ids = users(s, "q", 4).await;
    let a0 = s.assign_upstream_port(&ids[0], &cfg).await.unwrap();
    assert_eq!(a0.port, 20000);
    let released = s.release_upstream_port(&ids[0], &cfg).await.unwrap();
    assert_eq!(released.port, 20000);
    assert!(s.upstream_assignment(&ids[0]).await.unwrap().is_none());
    let st = &s.upstream_stats(&cfg).await.unwrap()[0];
    assert_eq!((st.assigned, st.quarantined, st.free), (0, 1, 2));

    // Someone else never gets the quarantined port.
    assert_eq!(
        s.assign_upstream_port(&ids[1], &cfg).await.unwrap().port,
        20001
    );
    // Rotation: a new port; the old one goes into quarantine too.
    let r = s.rotate_upstream_port(&ids[1], &cfg).await.unwrap();
    assert_eq!(r.port, 20002);
    let q: Vec<u16> = s
        .upstream_quarantine()
        .await
        .unwrap()
        .iter()
        .map(|q| q.port)
        .collect();
    assert_eq!(q, vec![20000, 20001]);
    // Everything else is assigned or quarantined: exhaustion, not sharing.
    let e = s.assign_upstream_port(&ids[2], &cfg).await.unwrap_err();
    assert!(matches!(e, UpstreamError::Exhausted { .. }), "{e}");
    // Its previous user may have it back (same outbound IP as before).
    assert_eq!(
        s.assign_upstream_port(&ids[0], &cfg).await.unwrap().port,
        20000
    );

    // Once the quarantine is over, the port is anyone's.
    sqlx::query("UPDATE upstream_quarantine SET until_at = 1")
        .execute(s.pool())
        .await
        .unwrap();
    assert_eq!(
        s.assign_upstream_port(&ids[2], &cfg).await.unwrap().port,
        20001
    );
    let st = &s.upstream_stats(&cfg).await.unwrap()[0];
    assert_eq!(
        (st.assigned, st.quarantined, st.free, st.exhausted_total),
        (3, 0, 0, 1)
    );

    // Every change is in the user's timeline.
    let kinds: Vec<String> = s
        .events_for("user", &ids[1])
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(
        kinds.contains(&"upstream_assigned".to_string()),
        "{kinds:?}"
    );
    assert!(kinds.contains(&"upstream_rotated".to_string()), "{kinds:?}");
}

async fn pins_never_share_a_port(db: common::TestDb) {
    let s = &db.store;
    let cfg = config("30000-30009", 3600);
    let ids = users(s, "p", 3).await;
    let a = s.assign_upstream_port(&ids[0], &cfg).await.unwrap();
    assert_eq!(a.port, 30000);
    let e = s
        .pin_upstream_port(&ids[1], None, 30000, &cfg)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, UpstreamError::PortTaken { user_id, .. } if *user_id == ids[0]),
        "{e}"
    );
    let e = s
        .pin_upstream_port(&ids[1], None, 40000, &cfg)
        .await
        .unwrap_err();
    assert!(matches!(e, UpstreamError::OutOfRange { .. }), "{e}");
    let e = s
        .pin_upstream_port(&ids[1], Some("nope"), 30001, &cfg)
        .await
        .unwrap_err();
    assert!(matches!(e, UpstreamError::UnknownProvider(_)), "{e}");

    // Pinning moves the user; the old port goes into quarantine and
    // nobody else can be pinned to it either.
    let p = s
        .pin_upstream_port(&ids[0], None, 30005, &cfg)
        .await
        .unwrap();
    assert!(p.pinned && p.port == 30005);
    let e = s
        .pin_upstream_port(&ids[1], None, 30000, &cfg)
        .await
        .unwrap_err();
    assert!(matches!(e, UpstreamError::PortQuarantined { .. }), "{e}");
    assert!(e.to_string().contains("choose another port"), "{e}");
    // Stable and pinned after a restart.
    let s2 = db.reopen().await;
    let again = s2.assign_upstream_port(&ids[0], &cfg).await.unwrap();
    assert_eq!((again.port, again.pinned), (30005, true));
    // Pinning a user to the port they hold only marks it.
    let same = s2
        .pin_upstream_port(&ids[0], None, 30005, &cfg)
        .await
        .unwrap();
    assert_eq!(same.port, 30005);
    let e = s2.release_upstream_port(&ids[2], &cfg).await.unwrap_err();
    assert!(matches!(e, UpstreamError::NotAssigned(_)), "{e}");
}
