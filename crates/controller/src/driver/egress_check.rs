//! Whether a sign-in cannot load because the browser VM's egress refused
//! or failed the connections to the auth URL's host (the user's upstream is
//! down, or policy refuses the host). Read from the host's record of the
//! VM's egress connections, so the session fails at once with a reason that
//! names egress and the upstream, instead of waiting out its timeout.

use serde::Deserialize;

/// Only the end of the record is looked at (a login's connections are
/// recent; the log of a busy VM can be long).
const TAIL_BYTES: usize = 256 * 1024;

#[derive(Deserialize)]
struct Line {
    target: String,
    #[serde(default)]
    upstream: Option<String>,
    outcome: String,
    #[serde(default)]
    reason: Option<String>,
}

/// The host part of `host:port` (IPv6 literals lose their brackets).
fn host_of(target: &str) -> &str {
    let host = target.rsplit_once(':').map(|(h, _)| h).unwrap_or(target);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The host of an `https://host[:port]/…` URL.
pub fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let host = if authority.starts_with('[') {
        authority
            .split(']')
            .next()
            .map(|h| h.trim_start_matches('['))?
    } else {
        authority.split(':').next()?
    };
    (!host.is_empty()).then_some(host)
}

/// Why connections to `host` failed, when every connection to it that the
/// record holds failed (none went through). `None` while any went through
/// or none was tried.
pub fn refused(log: &str, host: &str) -> Option<String> {
    let start = log.len().saturating_sub(TAIL_BYTES);
    let start = (start..log.len())
        .find(|i| log.is_char_boundary(*i))
        .unwrap_or(log.len());
    let mut failures: Vec<Line> = Vec::new();
    for l in log[start..].lines() {
        let Ok(line) = serde_json::from_str::<Line>(l) else {
            continue;
        };
        if !host_of(&line.target).eq_ignore_ascii_case(host) {
            continue;
        }
        if line.outcome == "closed" {
            return None;
        }
        failures.push(line);
    }
    let last = failures.last()?;
    let how = if last.outcome == "denied" {
        "refused"
    } else {
        "failed"
    };
    let via = match &last.upstream {
        Some(u) => format!("through the user's upstream proxy {u}"),
        None => "directly from the host".to_string(),
    };
    Some(format!(
        "the browser VM's egress {how} {} connection(s) to {} {via}: {}; the sign-in page cannot load (check the upstream proxy, or the egress policy)",
        failures.len(),
        last.target,
        last.reason.as_deref().unwrap_or("no reason recorded"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_hosts() {
        assert_eq!(
            url_host("https://auth.polydev.test/auth?x=1"),
            Some("auth.polydev.test")
        );
        assert_eq!(url_host("https://a.b:8443/x"), Some("a.b"));
        assert_eq!(url_host("https://[2001:db8::1]:443/x"), Some("2001:db8::1"));
        assert_eq!(url_host("https://u@h.example?q"), Some("h.example"));
        assert_eq!(url_host("nonsense"), None);
    }

    #[test]
    fn failures_only_when_nothing_went_through() {
        let fail = r#"{"ts_ms":1,"vm":"v","target":"auth.polydev.test:443","upstream":"127.0.0.1:10001","outcome":"failed","reason":"upstream 127.0.0.1:10001: connection refused","bytes_up":0,"bytes_down":0,"duration_ms":1}"#;
        let other = r#"{"ts_ms":1,"vm":"v","target":"fonts.example:443","upstream":"127.0.0.1:10001","outcome":"closed","bytes_up":1,"bytes_down":1,"duration_ms":1}"#;
        let ok = r#"{"ts_ms":2,"vm":"v","target":"auth.polydev.test:443","upstream":"127.0.0.1:10001","outcome":"closed","bytes_up":10,"bytes_down":10,"duration_ms":9}"#;
        assert_eq!(refused("", "auth.polydev.test"), None);
        assert_eq!(refused(other, "auth.polydev.test"), None);
        let why =
            refused(&format!("{other}\n{fail}\n{fail}\n"), "auth.polydev.test").expect("refused");
        assert!(
            why.contains("failed 2 connection(s) to auth.polydev.test:443"),
            "{why}"
        );
        assert!(why.contains("upstream proxy 127.0.0.1:10001"), "{why}");
        assert!(why.contains("connection refused"), "{why}");
        assert_eq!(
            refused(&format!("{fail}\n{ok}\n"), "AUTH.polydev.test"),
            None
        );
        let denied = r#"{"ts_ms":1,"vm":"v","target":"auth.example:443","upstream":null,"outcome":"denied","reason":"no egress","bytes_up":0,"bytes_down":0,"duration_ms":0}"#;
        let why = refused(denied, "auth.example").expect("denied");
        assert!(
            why.contains("refused 1 connection(s)") && why.contains("directly"),
            "{why}"
        );
    }
}
