//! The controller's state as Prometheus text (exposition format 0.0.4):
//! sessions and VMs by state, and per upstream provider its ports by status
//! plus how often a user could not get a port of their own — the alert
//! metric of issue "per-user egress": alert when
//! `polydev_upstream_exhausted_total` grows or `…{status="free"}` is 0.

use std::fmt::Write as _;

use crate::store::{Store, StoreError, UpstreamError};
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

async fn by_state(store: &Store, table: &str) -> Result<Vec<(String, i64)>, StoreError> {
    let sql = format!("SELECT state, COUNT(*) FROM {table} GROUP BY state ORDER BY state");
    sqlx::query_as::<_, (String, i64)>(&sql)
        .fetch_all(store.pool())
        .await
        .map_err(StoreError::from)
}

/// Render every metric.
pub async fn render(store: &Store, upstreams: &UpstreamConfig) -> Result<String, MetricsError> {
    let mut out = String::new();
    for (table, name, help) in [
        (
            "sessions",
            "polydev_sessions",
            "Connect-provider sessions by state.",
        ),
        ("vms", "polydev_vms", "VM records by state."),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (state, n) in by_state(store, table).await? {
            let _ = writeln!(out, "{name}{{state=\"{}\"}} {n}", label(&state));
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
