//! In-process counters of the HTTP API (requests by route and status,
//! latency histograms, rate-limit refusals, stream tickets), rendered next to
//! the store-derived metrics of [`crate::metrics`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Debug, Default)]
struct Inner {
    requests: BTreeMap<(String, String, u16), u64>,
    latency: BTreeMap<(String, String), Histogram>,
    rate_limited: BTreeMap<&'static str, u64>,
    tickets: BTreeMap<String, u64>,
    streams: BTreeMap<(String, String), u64>,
}

/// The counters; share one per server.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    inner: Mutex<Inner>,
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl HttpMetrics {
    /// Count one answered request. `route` is the matched route template
    /// (never the raw path: ids would make the label set unbounded).
    pub fn request(&self, method: &str, route: &str, status: u16, took: Duration) {
        let mut i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *i.requests
            .entry((method.to_string(), route.to_string(), status))
            .or_default() += 1;
        let h = i
            .latency
            .entry((method.to_string(), route.to_string()))
            .or_default();
        let s = took.as_secs_f64();
        for (n, b) in h.counts.iter_mut().zip(BUCKETS) {
            if s <= b {
                *n += 1;
            }
        }
        h.count += 1;
        h.sum += s;
    }

    /// Count a 429 by which bucket refused (`credential`, `user`, `anonymous`).
    pub fn rate_limited(&self, bucket: &'static str) {
        let mut i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *i.rate_limited.entry(bucket).or_default() += 1;
    }

    /// Count an issued stream ticket of `kind`.
    pub fn ticket(&self, kind: &str) {
        let mut i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *i.tickets.entry(kind.to_string()).or_default() += 1;
    }

    /// Count a stream (WebSocket) connect of `kind` by `outcome` (`ok`,
    /// `unauthenticated`, `refused`).
    pub fn stream_connect(&self, kind: &str, outcome: &str) {
        let mut i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *i.streams
            .entry((kind.to_string(), outcome.to_string()))
            .or_default() += 1;
    }

    /// Append the Prometheus text of these counters to `out`.
    pub fn render(&self, out: &mut String) {
        let i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(
            out,
            "# HELP polydev_http_requests_total HTTP API requests by method, route and status.\n# TYPE polydev_http_requests_total counter"
        );
        for ((m, r, s), n) in &i.requests {
            let _ = writeln!(
                out,
                "polydev_http_requests_total{{method=\"{}\",route=\"{}\",status=\"{s}\"}} {n}",
                label(m),
                label(r)
            );
        }
        let _ = writeln!(
            out,
            "# HELP polydev_http_request_duration_seconds Time to answer HTTP API requests.\n# TYPE polydev_http_request_duration_seconds histogram"
        );
        for ((m, r), h) in &i.latency {
            let l = format!("method=\"{}\",route=\"{}\"", label(m), label(r));
            for (b, n) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(
                    out,
                    "polydev_http_request_duration_seconds_bucket{{{l},le=\"{b}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "polydev_http_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} {}\npolydev_http_request_duration_seconds_sum{{{l}}} {}\npolydev_http_request_duration_seconds_count{{{l}}} {}",
                h.count, h.sum, h.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP polydev_http_rate_limited_total Requests refused with 429, by the bucket that refused.\n# TYPE polydev_http_rate_limited_total counter"
        );
        for (b, n) in &i.rate_limited {
            let _ = writeln!(out, "polydev_http_rate_limited_total{{bucket=\"{b}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP polydev_stream_tickets_total Stream tickets issued, by kind.\n# TYPE polydev_stream_tickets_total counter"
        );
        for (k, n) in &i.tickets {
            let _ = writeln!(
                out,
                "polydev_stream_tickets_total{{kind=\"{}\"}} {n}",
                label(k)
            );
        }
        let _ = writeln!(
            out,
            "# HELP polydev_stream_connects_total Desktop stream (WebSocket) connects, by kind and outcome.\n# TYPE polydev_stream_connects_total counter"
        );
        for ((k, o), n) in &i.streams {
            let _ = writeln!(
                out,
                "polydev_stream_connects_total{{kind=\"{}\",outcome=\"{}\"}} {n}",
                label(k),
                label(o)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_route_template_with_cumulative_buckets() {
        let m = HttpMetrics::default();
        m.request(
            "GET",
            "/api/v1/sessions/{id}",
            200,
            Duration::from_millis(3),
        );
        m.request(
            "GET",
            "/api/v1/sessions/{id}",
            200,
            Duration::from_millis(30),
        );
        m.request(
            "GET",
            "/api/v1/sessions/{id}",
            404,
            Duration::from_millis(1),
        );
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains(
            "polydev_http_requests_total{method=\"GET\",route=\"/api/v1/sessions/{id}\",status=\"200\"} 2"
        ));
        assert!(out.contains("status=\"404\"} 1"));
        assert!(out.contains("route=\"/api/v1/sessions/{id}\",le=\"0.005\"} 2"));
        assert!(out.contains("route=\"/api/v1/sessions/{id}\",le=\"+Inf\"} 3"));
        assert!(out.contains("polydev_http_request_duration_seconds_count{method=\"GET\",route=\"/api/v1/sessions/{id}\"} 3"));
    }
}
