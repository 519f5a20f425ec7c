//! The controller's state as Prometheus text (exposition format 0.0.4):
//! sessions and VMs by state, VM creations, failures by reason, login
//! durations, and per upstream provider its ports by status
//! plus how often a user could not get a port of their own — the alert
//! metric of issue "per-user egress": alert when
//! `polydev_upstream_exhausted_total` grows or `…{status="free"}` is 0.

use std::fmt::Write as _;

use crate::store::{Records, Store, StoreError, UpstreamError};
use crate::upstream::UpstreamConfig;

/// Why the metrics could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The store did not answer.
    #[error("cannot read the controller's state for /metrics: {0}")]
    Store(#[from] StoreError),
    /// Upstream occupancy could not be read.
    #[error("cannot read upstream occupancy for /metrics: {0}")]
    Upstream(#[from] UpstreamError),
}

/// Escape a label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Render every metric.
pub async fn render(store: &Store, upstreams: &UpstreamConfig) -> Result<String, MetricsError> {
    let mut out = String::new();
    for (records, name, help) in [
        (
            Records::Sessions,
            "polydev_sessions",
            "Connect-provider sessions by state.",
        ),
        (Records::Vms, "polydev_vms", "VM records by state."),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (state, n) in store.count_by_state(records).await? {
            let _ = writeln!(out, "{name}{{state=\"{}\"}} {n}", label(&state));
        }
    }
    lifecycle_metrics(store, &mut out).await?;
    let stats = store.upstream_stats(upstreams).await?;
    let _ = writeln!(
        out,
        "# HELP polydev_upstream_ports Upstream proxy ports per provider by status (free = assignable now).\n# TYPE polydev_upstream_ports gauge"
    );
    for s in &stats {
        let p = label(&s.provider);
        for (status, n) in [
            ("size", s.size),
            ("assigned", s.assigned),
            ("quarantined", s.quarantined),
            ("free", s.free),
        ] {
            let _ = writeln!(
                out,
                "polydev_upstream_ports{{provider=\"{p}\",status=\"{status}\"}} {n}"
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP polydev_upstream_exhausted_total Assignments refused because no port was free (never shared instead).\n# TYPE polydev_upstream_exhausted_total counter"
    );
    for s in &stats {
        let _ = writeln!(
            out,
            "polydev_upstream_exhausted_total{{provider=\"{}\"}} {}",
            label(&s.provider),
            s.exhausted_total
        );
    }
    Ok(out)
}

/// Upper bounds (seconds) of the login duration histogram: a person
/// signing in takes tens of seconds to minutes.
const LOGIN_BUCKETS: [i64; 8] = [15, 30, 60, 120, 300, 600, 900, 1800];

/// VM creations, failures by reason (VMs and sessions), and how long
/// completed logins took (request to credential delivered). Derived from
/// the records, so they survive restarts and agree across replicas.
async fn lifecycle_metrics(store: &Store, out: &mut String) -> Result<(), StoreError> {
    let created = store.vm_count().await?;
    let _ = writeln!(
        out,
        "# HELP polydev_vm_created_total VMs ever requested.\n# TYPE polydev_vm_created_total counter\npolydev_vm_created_total {created}"
    );
    for (records, name, what) in [
        (Records::Vms, "polydev_vm_failures_total", "VMs"),
        (
            Records::Sessions,
            "polydev_session_failures_total",
            "Connect sessions",
        ),
    ] {
        let rows = store.failures_by_reason(records).await?;
        let _ = writeln!(
            out,
            "# HELP {name} {what} that failed, by reason.\n# TYPE {name} counter"
        );
        for (reason, n) in rows {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\"}} {n}",
                label(reason.as_deref().unwrap_or("unknown"))
            );
        }
    }
    let took = store.completed_login_millis().await?;
    let name = "polydev_login_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Completed connect sessions: from request to credential delivered.\n# TYPE {name} histogram"
    );
    for b in LOGIN_BUCKETS {
        let n = took.iter().filter(|ms| **ms <= b * 1000).count();
        let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {n}");
    }
    let sum: f64 = took.iter().map(|ms| *ms as f64 / 1000.0).sum();
    let _ = writeln!(
        out,
        "{name}_bucket{{le=\"+Inf\"}} {n}\n{name}_sum {sum}\n{name}_count {n}",
        n = took.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
