//! The real CLIs, as far as a closed network allows: for Claude Code,
//! Codex and Gemini CLI a session starts the pinned CLI's real login in the
//! desktop of the real browser image (production defaults), the auth URL is
//! recognised and handed to the desktop's Chromium, and the URL is right:
//! the provider's host, a client id, state, a PKCE S256 challenge (where
//! the CLI sends one), and a
//! `redirect_uri` that is the CLI's own loopback callback, listening in the
//! VM at that moment (or the provider's paste-code page).
//!
//! The page itself cannot load here: each person's upstream (a loopback
//! test proxy) refuses every target, or, for the last person, is down
//! (nothing listens on its port), so nothing leaves the machine. That is
//! also the egress failure path: each session then fails at once with
//! `egress_failed`, naming the auth URL's host and that person's upstream,
//! instead of waiting out its timeout; its browser VM is destroyed and its
//! logs kept.

mod egress_support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use egress_support::{
    basic, consecutive_listeners, start_http_upstream_only_on, unique, write_upstreams, ProxyLog,
};
use polydev_e2e::http::{call, make_token, new_user, redeem_link, start_up};
use serde_json::{json, Value};

/// Per provider: the hosts its auth URL may have, and whether it carries a
/// PKCE challenge. Gemini CLI 0.61's web login sends none (Google's
/// installed-app flow: a client secret in the CLI, and `state`); the test
/// asserts what the pinned CLI does, so a CLI that drops PKCE is noticed.
/// Gemini CLI also asks twice in its terminal before it opens the page,
/// which its definition answers (`[[login.respond]]`), and opens the URL
/// with xdg-open without printing it (the login's own xdg-open sees it).
const PROVIDERS: &[(&str, &[&str], bool)] = &[
    (
        "claude-code",
        &["claude.ai", "claude.com", "console.anthropic.com"],
        true,
    ),
    ("codex", &["auth.openai.com"], true),
    ("gemini-cli", &["accounts.google.com"], false),
];

fn query(url: &str, name: &str) -> Option<String> {
    let q = url.split_once('?')?.1;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

#[test]
fn each_real_cli_opens_its_real_auth_url_then_fails_on_egress() {
    polydev_e2e::require_images(&["browser", "cli"]);
    let dir = tempfile::Builder::new()
        .prefix("pdrc")
        .tempdir_in("/tmp")
        .expect("temp dir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    let _reaper = polydev_e2e::Reaper(data.clone());
    // One person per CLI (a person connects one provider at a time), each
    // pinned to their own upstream port. The upstreams refuse everything
    // (no route, no resolving); the last person's is down: nothing listens
    // on its port.
    let password = unique("up");
    let mut listeners = consecutive_listeners(PROVIDERS.len() as u16);
    let down = listeners
        .pop()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.port())
        .expect("a port for the upstream that is down");
    let upstreams: Vec<(u16, ProxyLog)> = listeners
        .into_iter()
        .map(|l| {
            start_http_upstream_only_on(
                l,
                Ipv4Addr::new(127, 0, 0, 4),
                Some(basic("acct", &password)),
                Vec::new(),
            )
        })
        .collect();
    let mut ports: Vec<u16> = upstreams.iter().map(|(p, _)| *p).collect();
    ports.push(down);
    write_upstreams(
        &data,
        &format!("{}-{}", ports[0], ports[ports.len() - 1]),
        "acct",
        &password,
    );

    // Production defaults: built-in providers, images, user, memory.
    let (up, addr, link) = start_up(&data, "up-real-clis.log");
    let link = link.unwrap_or_else(|| panic!("no login link: {}", up.text()));
    let admin = redeem_link(&addr, &link);
    let scopes = ["sessions:read", "sessions:write", "vms:read"];
    let auths: Vec<String> = (0..PROVIDERS.len())
        .map(|i| {
            let cookie = if i == 0 {
                admin.clone()
            } else {
                new_user(&addr, &admin, &format!("person{i}"))
            };
            format!("Bearer {}", make_token(&addr, &cookie, "clis", &scopes))
        })
        .collect();

    for (auth, port) in auths.iter().zip(&ports) {
        let me = call(&addr, "GET", "/api/v1/me", &[("authorization", auth)], None).json();
        let id = me["id"].as_str().expect("user id");
        let r = call(
            &addr,
            "PUT",
            &format!("/api/v1/admin/upstreams/{id}"),
            &[("cookie", &admin)],
            Some(&json!({"provider": "resi", "port": port})),
        );
        assert_eq!(r.status, 200, "pin {id} to {port}: {:?}", r.json());
    }

    let mut ids = Vec::new();
    for (i, (provider, _, _)) in PROVIDERS.iter().enumerate() {
        let r = call(
            &addr,
            "POST",
            "/api/v1/sessions",
            &[("authorization", auths[i].as_str())],
            Some(&json!({"provider": provider})),
        );
        assert_eq!(r.status, 201, "{provider}: {:?}", r.json());
        ids.push(r.json()["id"].as_str().expect("id").to_string());
    }
    let started = Instant::now();
    let until = started + Duration::from_secs(900);
    let mut finished: Vec<Option<Value>> = vec![None; ids.len()];
    while finished.iter().any(Option::is_none) {
        for (i, id) in ids.iter().enumerate() {
            if finished[i].is_some() {
                continue;
            }
            let h = [("authorization", auths[i].as_str())];
            let s = call(&addr, "GET", &format!("/api/v1/sessions/{id}"), &h, None).json();
            if s["done"].as_bool().unwrap_or(false) {
                eprintln!(
                    "{}: {} after {:.0?}",
                    PROVIDERS[i].0,
                    s["state"],
                    started.elapsed()
                );
                finished[i] = Some(s);
            }
        }
        assert!(
            Instant::now() < until,
            "sessions still running: {finished:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    for (i, id) in ids.iter().enumerate() {
        let (provider, hosts, pkce) = PROVIDERS[i];
        let s = finished[i].take().expect("finished");
        let h = [("authorization", auths[i].as_str())];
        let events = call(
            &addr,
            "GET",
            &format!("/api/v1/sessions/{id}/events"),
            &h,
            None,
        )
        .json();
        let awaiting = events
            .as_array()
            .and_then(|e| e.iter().find(|e| e["to_state"] == "awaiting_user"))
            .unwrap_or_else(|| panic!("{provider} never reached awaiting_user: {s} {events}"));
        let url = awaiting["detail"]["auth_url"].as_str().expect("auth_url");
        eprintln!("{provider}: {url}");
        let host = url
            .strip_prefix("https://")
            .and_then(|r| r.split('/').next())
            .unwrap_or_default();
        assert!(hosts.contains(&host), "{provider}: host {host} in {url}");
        let client = query(url, "client_id").unwrap_or_default();
        assert!(!client.is_empty(), "{provider}: client_id in {url}");
        assert!(
            query(url, "state").is_some_and(|s| !s.is_empty()),
            "{provider}: state in {url}"
        );
        if pkce {
            assert!(
                query(url, "code_challenge").is_some_and(|s| s.len() >= 43),
                "{provider}: PKCE challenge in {url}"
            );
            assert_eq!(
                query(url, "code_challenge_method").as_deref(),
                Some("S256"),
                "{provider}: {url}"
            );
        } else {
            assert!(
                query(url, "code_challenge").is_none(),
                "{provider}: the pinned CLI sends no PKCE challenge; if it does now, assert it: {url}"
            );
        }
        let cb = &awaiting["detail"]["callback"];
        let redirect = cb["redirect_uri"].as_str().unwrap_or_default();
        if cb["loopback_port"].is_number() {
            assert_eq!(
                cb["listening"], true,
                "{provider}: the loopback callback {redirect} must be listening in the VM: {cb}"
            );
        } else {
            // Claude Code may send the browser to its paste-code page.
            assert!(
                provider == "claude-code" && redirect.starts_with("https://"),
                "{provider}: redirect_uri {redirect} is neither a loopback callback nor a paste-code page"
            );
        }
        // The page cannot load: every connection to the auth host went to
        // the user's upstream and was refused there, or found it down.
        assert_eq!(s["state"], "failed", "{provider}: {s}");
        assert_eq!(s["failure"]["reason"], "egress_failed", "{provider}: {s}");
        let detail = s["failure"]["detail"].as_str().unwrap_or_default();
        // (The host the browser tried: a CLI may print one URL and open
        // another of the same provider.)
        assert!(
            hosts.iter().any(|h| detail.contains(&format!("{h}:443")))
                && detail.contains(&format!("127.0.0.1:{}", ports[i])),
            "{provider}: the reason names the host and the person's upstream: {detail}"
        );
        if ports[i] == down {
            assert!(
                detail.contains("refused"),
                "{provider}: the reason says the upstream refused the connection: {detail}"
            );
        }
    }
    let seen: Vec<_> = upstreams
        .iter()
        .flat_map(|(_, log)| log.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .collect();
    for (_, hosts, _) in &PROVIDERS[..upstreams.len()] {
        assert!(
            seen.iter()
                .any(|p| hosts.iter().any(|h| p.target == format!("{h}:443"))),
            "the upstream saw a CONNECT to one of {hosts:?}: {seen:?}"
        );
    }
    // The browser VMs are gone; nothing of them runs.
    let until = Instant::now() + Duration::from_secs(300);
    loop {
        let live: Vec<Value> = auths
            .iter()
            .flat_map(|a| {
                let vms = call(&addr, "GET", "/api/v1/vms", &[("authorization", a)], None).json();
                vms.as_array()
                    .map(|v| {
                        v.iter()
                            .filter(|v| v["kind"] == "browser" && v["done"] != true)
                            .cloned()
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default()
            })
            .collect();
        if live.is_empty() {
            break;
        }
        assert!(Instant::now() < until, "browser VMs left: {live:?}");
        std::thread::sleep(Duration::from_secs(1));
    }
    drop(up);
}
