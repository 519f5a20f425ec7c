//! The host agent's counters, served as Prometheus text (exposition format
//! 0.0.4) at `GET /v1/metrics` on `host.sock`.
//!
//! Egress counters live in one process-wide [`EGRESS`] that the egress proxy
//! ([`crate::egress`]) updates as connections open, move bytes and end; VM
//! counts are read from the [`Manager`] at scrape time, so they cannot
//! drift from the records. Labels are small fixed sets (an outcome and a
//! reason *kind*, never the free-text reason or a target), so a scrape stays
//! small however many VMs and hosts come and go; per-connection detail is in
//! each VM's `egress.log`. Guest log stream counters live in [`GUEST_LOG`],
//! updated by [`crate::guest_log`]; what the log size caps dropped in
//! [`LOG_CAPS`], updated by [`crate::logfile`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use polydev_api::vm::VmState;

use crate::manager::Manager;

/// How an egress connection ended, for the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Spliced and then closed.
    Closed,
    /// Refused by policy or a limit before any byte flowed.
    Denied,
    /// Could not be set up (bad request, DNS, upstream, target).
    Failed,
}

impl Outcome {
    /// The label value, also used in `egress.log`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
        }
    }
}

/// Why a connection ended, as a fixed label value (the full reason text is
/// in the log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// Both sides closed normally.
    Eof,
    /// No bytes either way for the idle timeout.
    IdleTimeout,
    /// A read or write failed mid-stream.
    IoError,
    /// The target resolves to a denied address.
    DenyList,
    /// The VM has neither an upstream nor direct egress.
    NoPolicy,
    /// The VM already had its maximum of connections open.
    ConnectionLimit,
    /// The guest sent no, or a malformed, request line.
    BadRequest,
    /// The target name could not be resolved on the host.
    Resolve,
    /// The upstream proxy could not be reached.
    UpstreamConnect,
    /// The upstream proxy answered with a refusal or spoke nonsense.
    UpstreamRefused,
    /// A direct connection to the target failed.
    Connect,
    /// The guest left before the connection was set up.
    GuestGone,
}

impl Reason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Eof => "eof",
            Reason::IdleTimeout => "idle_timeout",
            Reason::IoError => "io_error",
            Reason::DenyList => "deny_list",
            Reason::NoPolicy => "no_policy",
            Reason::ConnectionLimit => "connection_limit",
            Reason::BadRequest => "bad_request",
            Reason::Resolve => "resolve",
            Reason::UpstreamConnect => "upstream_connect",
            Reason::UpstreamRefused => "upstream_refused",
            Reason::Connect => "connect",
            Reason::GuestGone => "guest_gone",
        }
    }
}

/// Direction of egress bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the VM towards the remote end.
    Up,
    /// From the remote end into the VM.
    Down,
}

/// Egress counters of this host agent (all VMs together).
pub struct EgressMetrics {
    connections: Mutex<BTreeMap<(Outcome, Reason), u64>>,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    active: AtomicI64,
}

/// The process-wide egress counters. One host agent runs per process, and
/// the egress proxy has no other handle to the server, so a static is the
/// honest shape; in-process tests that run several managers share it.
pub static EGRESS: EgressMetrics = EgressMetrics {
    connections: Mutex::new(BTreeMap::new()),
    bytes_up: AtomicU64::new(0),
    bytes_down: AtomicU64::new(0),
    active: AtomicI64::new(0),
};

/// Keeps one connection counted as active until dropped.
pub struct ActiveGuard(());

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        EGRESS.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EgressMetrics {
    /// Count a connection as open until the guard is dropped.
    pub fn open(&self) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(())
    }

    /// Count bytes as they are forwarded (so long transfers show progress).
    pub fn bytes(&self, dir: Direction, n: u64) {
        match dir {
            Direction::Up => self.bytes_up.fetch_add(n, Ordering::Relaxed),
            Direction::Down => self.bytes_down.fetch_add(n, Ordering::Relaxed),
        };
    }

    /// Count one finished connection.
    pub fn finished(&self, outcome: Outcome, reason: Reason) {
        let mut m = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((outcome, reason)).or_insert(0) += 1;
    }

    fn render(&self, out: &mut String) {
        out.push_str(
            "# HELP polydev_egress_connections_total Egress connections from VMs that ended, by outcome and reason.\n\
             # TYPE polydev_egress_connections_total counter\n",
        );
        let conns = self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for ((outcome, reason), n) in conns {
            let _ = writeln!(
                out,
                "polydev_egress_connections_total{{outcome=\"{}\",reason=\"{}\"}} {n}",
                outcome.as_str(),
                reason.as_str()
            );
        }
        let _ = write!(
            out,
            "# HELP polydev_egress_bytes_total Bytes forwarded by the egress proxy; up: from VMs towards the remote end, down: into VMs.\n\
             # TYPE polydev_egress_bytes_total counter\n\
             polydev_egress_bytes_total{{direction=\"up\"}} {}\n\
             polydev_egress_bytes_total{{direction=\"down\"}} {}\n\
             # HELP polydev_egress_active_connections Egress connections open now (being set up or spliced).\n\
             # TYPE polydev_egress_active_connections gauge\n\
             polydev_egress_active_connections {}\n",
            self.bytes_up.load(Ordering::Relaxed),
            self.bytes_down.load(Ordering::Relaxed),
            self.active.load(Ordering::Relaxed).max(0),
        );
    }
}

/// Counters of the guest log streams (all VMs together): what the host
/// refused of them to keep its memory bounded (see [`crate::guest_log`]).
pub struct GuestLogMetrics {
    lines_dropped: AtomicU64,
    connections_refused: AtomicU64,
}

/// The process-wide guest log counters (a static for the same reason as
/// [`EGRESS`]).
pub static GUEST_LOG: GuestLogMetrics = GuestLogMetrics {
    lines_dropped: AtomicU64::new(0),
    connections_refused: AtomicU64::new(0),
};

impl GuestLogMetrics {
    /// Count a line dropped for being too long.
    pub fn line_dropped(&self) {
        self.lines_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a connection closed for being over the per-VM limit.
    pub fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Lines dropped so far.
    pub fn lines_dropped(&self) -> u64 {
        self.lines_dropped.load(Ordering::Relaxed)
    }

    /// Connections refused so far.
    pub fn connections_refused(&self) -> u64 {
        self.connections_refused.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String) {
        let _ = write!(
            out,
            "# HELP polydev_guest_log_lines_dropped_total Guest log lines dropped for exceeding the line limit (each closes its connection).\n\
             # TYPE polydev_guest_log_lines_dropped_total counter\n\
             polydev_guest_log_lines_dropped_total {}\n\
             # HELP polydev_guest_log_connections_refused_total Guest log stream connections closed for exceeding the per-VM limit.\n\
             # TYPE polydev_guest_log_connections_refused_total counter\n\
             polydev_guest_log_connections_refused_total {}\n",
            self.lines_dropped(),
            self.connections_refused(),
        );
    }
}

/// Which of a VM's capped logs ([`crate::logfile::CappedLog`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogName {
    /// `console.log`.
    Console,
    /// `agent.log`.
    Agent,
    /// `egress.log`.
    Egress,
}

impl LogName {
    const ALL: [LogName; 3] = [LogName::Console, LogName::Agent, LogName::Egress];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LogName::Console => "console",
            LogName::Agent => "agent",
            LogName::Egress => "egress",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What the log caps dropped (all VMs together), and what pruning the
/// archive of ended VMs' logs removed.
pub struct LogCapMetrics {
    lines: [AtomicU64; 3],
    bytes: [AtomicU64; 3],
    archives_pruned: AtomicU64,
}

/// The process-wide log cap counters (a static for the same reason as
/// [`EGRESS`]).
pub static LOG_CAPS: LogCapMetrics = LogCapMetrics {
    lines: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
    bytes: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
    archives_pruned: AtomicU64::new(0),
};

impl LogCapMetrics {
    /// Count lines and bytes a rotation dropped from a log.
    pub fn dropped(&self, log: LogName, lines: u64, bytes: u64) {
        self.lines[log.index()].fetch_add(lines, Ordering::Relaxed);
        self.bytes[log.index()].fetch_add(bytes, Ordering::Relaxed);
    }

    /// Lines dropped from `log` so far.
    pub fn lines_dropped(&self, log: LogName) -> u64 {
        self.lines[log.index()].load(Ordering::Relaxed)
    }

    /// Ended VMs' logs removed so far.
    pub fn archives_pruned_count(&self) -> u64 {
        self.archives_pruned.load(Ordering::Relaxed)
    }

    /// Count an ended VM's logs removed to keep the archive under its cap.
    pub fn archive_pruned(&self) {
        self.archives_pruned.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        out.push_str(
            "# HELP polydev_log_lines_dropped_total Log lines dropped by the per-file size cap (polydev host --log-max-bytes), by log.\n\
             # TYPE polydev_log_lines_dropped_total counter\n",
        );
        for l in LogName::ALL {
            let _ = writeln!(
                out,
                "polydev_log_lines_dropped_total{{log=\"{}\"}} {}",
                l.as_str(),
                self.lines[l.index()].load(Ordering::Relaxed)
            );
        }
        out.push_str(
            "# HELP polydev_log_bytes_dropped_total Log bytes dropped by the per-file size cap, by log.\n\
             # TYPE polydev_log_bytes_dropped_total counter\n",
        );
        for l in LogName::ALL {
            let _ = writeln!(
                out,
                "polydev_log_bytes_dropped_total{{log=\"{}\"}} {}",
                l.as_str(),
                self.bytes[l.index()].load(Ordering::Relaxed)
            );
        }
        let _ = write!(
            out,
            "# HELP polydev_log_archives_pruned_total Ended VMs' kept logs removed by retention (count or total size).\n\
             # TYPE polydev_log_archives_pruned_total counter\n\
             polydev_log_archives_pruned_total {}\n",
            self.archives_pruned.load(Ordering::Relaxed)
        );
    }
}

/// Every VM state, so each series exists (at 0) from the first scrape.
const STATES: [VmState; 7] = [
    VmState::Starting,
    VmState::Running,
    VmState::Paused,
    VmState::Stopping,
    VmState::Off,
    VmState::Stopped,
    VmState::Failed,
];

/// The whole exposition: VM counts by state, then the egress and guest log
/// counters.
pub async fn render(mgr: &Manager) -> String {
    let vms = mgr.list(true).await;
    let mut out = String::from(
        "# HELP polydev_vms VMs on this host by state (stopped and failed: those whose logs are still retained).\n\
         # TYPE polydev_vms gauge\n",
    );
    for state in STATES {
        let n = vms.iter().filter(|v| v.state == state).count();
        let _ = writeln!(out, "polydev_vms{{state=\"{state}\"}} {n}");
    }
    EGRESS.render(&mut out);
    GUEST_LOG.render(&mut out);
    LOG_CAPS.render(&mut out);
    out
}

/// `GET /v1/metrics`.
pub async fn handler(State(mgr): State<Arc<Manager>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&mgr).await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_counters_render_as_prometheus_text() {
        let m = EgressMetrics {
            connections: Mutex::new(BTreeMap::new()),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            active: AtomicI64::new(0),
        };
        m.finished(Outcome::Closed, Reason::Eof);
        m.finished(Outcome::Closed, Reason::Eof);
        m.finished(Outcome::Denied, Reason::DenyList);
        m.bytes(Direction::Up, 10);
        m.bytes(Direction::Down, 2048);
        let mut out = String::new();
        m.render(&mut out);
        for line in [
            "polydev_egress_connections_total{outcome=\"closed\",reason=\"eof\"} 2",
            "polydev_egress_connections_total{outcome=\"denied\",reason=\"deny_list\"} 1",
            "polydev_egress_bytes_total{direction=\"up\"} 10",
            "polydev_egress_bytes_total{direction=\"down\"} 2048",
            "polydev_egress_active_connections 0",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} in\n{out}");
        }
        // Every sample line belongs to a declared metric.
        for l in out.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap_or_default();
            assert!(out.contains(&format!("# TYPE {name} ")), "{l}");
        }
    }

    #[test]
    fn guest_log_counters_render_as_prometheus_text() {
        let m = GuestLogMetrics {
            lines_dropped: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
        };
        m.line_dropped();
        m.connection_refused();
        m.connection_refused();
        let mut out = String::new();
        m.render(&mut out);
        for line in [
            "polydev_guest_log_lines_dropped_total 1",
            "polydev_guest_log_connections_refused_total 2",
            "# TYPE polydev_guest_log_lines_dropped_total counter",
            "# TYPE polydev_guest_log_connections_refused_total counter",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} in\n{out}");
        }
    }

    #[test]
    fn log_cap_counters_render_as_prometheus_text() {
        let m = LogCapMetrics {
            lines: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            bytes: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            archives_pruned: AtomicU64::new(0),
        };
        m.dropped(LogName::Egress, 3, 300);
        m.archive_pruned();
        let mut out = String::new();
        m.render(&mut out);
        for line in [
            "polydev_log_lines_dropped_total{log=\"egress\"} 3",
            "polydev_log_lines_dropped_total{log=\"console\"} 0",
            "polydev_log_bytes_dropped_total{log=\"egress\"} 300",
            "polydev_log_archives_pruned_total 1",
            "# TYPE polydev_log_lines_dropped_total counter",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} in\n{out}");
        }
    }

    #[test]
    fn the_active_gauge_follows_its_guards() {
        let before = EGRESS.active.load(Ordering::Relaxed);
        let a = EGRESS.open();
        let b = EGRESS.open();
        assert_eq!(EGRESS.active.load(Ordering::Relaxed), before + 2);
        drop(a);
        drop(b);
        assert_eq!(EGRESS.active.load(Ordering::Relaxed), before);
    }
}
