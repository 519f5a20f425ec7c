//! The controller's Prometheus text on SQLite and a real PostgreSQL: the
//! upstream alert metric shows a full range and counts each refusal.

mod common;

use polydev_controller::metrics::render;
use polydev_controller::store::VmKind;
use polydev_controller::upstream::UpstreamConfig;

both_backends!(a_full_upstream_range_shows_as_zero_free_and_counts_refusals);

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
