//! The API behind a reverse proxy, on SQLite and on a real PostgreSQL: the
//! client address comes from the forwarding header only when a trusted
//! proxy sent it (right-most untrusted hop; IPv6 clients by their /64),
//! failed password logins back off per account whatever address they come
//! from, `/readyz` keeps database errors to the log, and the session
//! cookie is `Secure` when a trusted proxy says the client used https. Time is moved by
//! editing stored timestamps.

mod common;

use common::api::{assert_problem, Api};
use polydev_controller::auth::{AuthConfig, LoginBackoff, Role};
use polydev_controller::http::{HttpConfig, ProxyConfig, Rate};
use polydev_controller::util::now_ms;
use reqwest::Method;
use serde_json::json;
use std::time::Duration;

both_backends!(
    client_addresses_come_from_trusted_proxies_only,
    failed_logins_back_off_per_account,
    readyz_keeps_database_errors_to_the_log,
    cookies_are_secure_when_a_trusted_proxy_says_https,
);

/// One anonymous request per address allowed (a bucket of one that
/// practically never refills).
fn one_per_address(trusted: &[&str]) -> HttpConfig {
    let mut c = HttpConfig::unlimited();
    c.rate.anonymous = Rate::new(0.0001, 1);
    c.proxies = ProxyConfig {
        trusted: trusted.iter().map(|t| t.parse().unwrap()).collect(),
        ..ProxyConfig::default()
    };
    c
}

async fn healthz(api: &Api, xff: Option<&str>) -> u16 {
    let h: Vec<(&str, &str)> = xff.map(|v| ("x-forwarded-for", v)).into_iter().collect();
    api.call(Method::GET, "/healthz", None, &h, None)
        .await
        .0
        .as_u16()
}

async fn client_addresses_come_from_trusted_proxies_only(db: common::TestDb) {
    // The test's own loopback connection plays the trusted proxy.
    let api = Api::start(
        &db,
        one_per_address(&["127.0.0.0/8"]),
        AuthConfig::default(),
    )
    .await;
    let cases: &[(Option<&str>, u16, &str)] = &[
        (Some("203.0.113.1"), 200, "a client's first request"),
        (
            Some("203.0.113.1"),
            429,
            "its second: its own bucket is empty",
        ),
        (
            Some("203.0.113.2"),
            200,
            "another client has its own bucket",
        ),
        (
            Some("203.0.113.1, 198.51.100.50"),
            200,
            "the right-most untrusted hop is the client",
        ),
        (
            Some("9.9.9.9, 198.51.100.50"),
            429,
            "what the client wrote on the left does not get it a new bucket",
        ),
        (
            Some("198.51.100.60, 127.0.0.9"),
            200,
            "trusted hops are skipped",
        ),
        (Some("198.51.100.60"), 429, "the same client"),
        (Some("2001:db8:1:2::1"), 200, "an IPv6 client"),
        (
            Some("2001:db8:1:2:ffff:ffff:ffff:ffff"),
            429,
            "another address in the same /64 is the same client",
        ),
        (Some("2001:db8:1:3::1"), 200, "the next /64 is another"),
        (None, 200, "no header: the proxy itself"),
        (None, 429, "the proxy itself again"),
    ];
    for (xff, want, what) in cases {
        assert_eq!(healthz(&api, *xff).await, *want, "{what} ({xff:?})");
    }
    // Without trusted proxies the header is ignored: every request is the
    // TCP peer's.
    let plain = Api::start(&db, one_per_address(&[]), AuthConfig::default()).await;
    assert_eq!(healthz(&plain, Some("203.0.113.1")).await, 200);
    assert_eq!(
        healthz(&plain, Some("203.0.113.2")).await,
        429,
        "an untrusted peer cannot pick its bucket"
    );
}

const PW: &str = "correct horse battery staple";

async fn login(api: &Api, name: &str, password: &str, from: &str) -> (u16, Option<u64>, String) {
    let (st, h, v) = api
        .call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            &[("x-forwarded-for", from)],
            Some(json!({"name": name, "password": password})),
        )
        .await;
    if st == 429 {
        assert_problem((st, &h, &v), 429, "login-backoff", "a login backing off");
    }
    let retry = h
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (
        st.as_u16(),
        retry,
        v["detail"].as_str().unwrap_or("").to_string(),
    )
}

async fn backoff_row(api: &Api, name: &str) -> (i64, i64) {
    sqlx::query_as("SELECT failures, until_at FROM login_backoff WHERE name = $1")
        .bind(name)
        .fetch_one(api.store.pool())
        .await
        .unwrap()
}

/// Move a name's backoff to its end, as if its delay had passed.
async fn backoff_ends(api: &Api, name: &str) {
    sqlx::query("UPDATE login_backoff SET until_at = $1 WHERE name = $2")
        .bind(now_ms() - 1)
        .bind(name)
        .execute(api.store.pool())
        .await
        .unwrap();
}

/// Two free failures, then 30 s, 60 s, capped at 120 s (long, so a slow
/// password check under load cannot outlast one; the test moves time by
/// editing `until_at`). Every attempt comes from a new address (through
/// the trusted proxy), so only the per-account count can stop them.
async fn failed_logins_back_off_per_account(db: common::TestDb) {
    let auth_cfg = AuthConfig {
        login_backoff: LoginBackoff {
            free_failures: 2,
            base: Duration::from_secs(30),
            max: Duration::from_secs(120),
            forget_after: Duration::from_secs(3600),
        },
        ..AuthConfig::default()
    };
    let mut cfg = HttpConfig::unlimited();
    cfg.rate.anonymous = Rate::new(0.0001, 1);
    cfg.proxies.trusted = vec!["127.0.0.0/8".parse().unwrap()];
    let api = Api::start(&db, cfg, auth_cfg).await;
    api.auth
        .create_user("alice", Role::User, Some(PW))
        .await
        .unwrap();
    api.auth
        .create_user("bob", Role::User, Some(PW))
        .await
        .unwrap();
    let mut n = 0u32;
    let mut from = || {
        n += 1;
        format!("203.0.113.{n}")
    };
    for i in 1..=3 {
        let (st, _, _) = login(&api, "alice", "wrong wrong wrong wrong", &from()).await;
        assert_eq!(st, 401, "failure {i}");
    }
    // The third failure closed the account for 30 s: even the right
    // password is not checked, and the answer says when to come back.
    let (st, retry, detail) = login(&api, "alice", PW, &from()).await;
    assert_eq!(st, 429, "{detail}");
    let retry = retry.expect("Retry-After");
    assert!((25..=30).contains(&retry), "{retry}");
    assert!(detail.contains(&format!("wait {retry} s")), "{detail}");
    // Another account is not affected.
    let (st, _, _) = login(&api, "bob", "wrong wrong wrong wrong", &from()).await;
    assert_eq!(st, 401);
    let (st, _, _) = login(&api, "bob", PW, &from()).await;
    assert_eq!(st, 200);
    // Once the delay has passed the right password works, and clears the
    // count: two free failures again.
    backoff_ends(&api, "alice").await;
    let (st, _, detail) = login(&api, "alice", PW, &from()).await;
    assert_eq!(st, 200, "{detail}");
    for i in 1..=3 {
        let (st, _, _) = login(&api, "alice", "wrong wrong wrong wrong", &from()).await;
        assert_eq!(st, 401, "failure {i} after the reset");
    }
    let (st, _, _) = login(&api, "alice", "wrong wrong wrong wrong", &from()).await;
    assert_eq!(st, 429);
    // The delay doubles, and is bounded: after many failures it is the
    // cap, never more (no permanent lock).
    backoff_ends(&api, "alice").await;
    let (st, _, _) = login(&api, "alice", "wrong wrong wrong wrong", &from()).await;
    assert_eq!(st, 401);
    let (failures, until) = backoff_row(&api, "alice").await;
    assert_eq!(failures, 4);
    let left = until - now_ms();
    assert!(
        left > 50_000 && left <= 60_000,
        "60 s after the 4th: {left} ms"
    );
    sqlx::query("UPDATE login_backoff SET failures = 1000000, until_at = 0 WHERE name = 'alice'")
        .execute(api.store.pool())
        .await
        .unwrap();
    let (st, _, _) = login(&api, "alice", "wrong wrong wrong wrong", &from()).await;
    assert_eq!(st, 401);
    let (st, retry, _) = login(&api, "alice", PW, &from()).await;
    assert_eq!(st, 429);
    assert!(retry.is_some_and(|r| (100..=120).contains(&r)), "{retry:?}");
    // Failures long past are forgotten.
    sqlx::query("UPDATE login_backoff SET until_at = 0, updated_at = $1 WHERE name = 'alice'")
        .bind(now_ms() - 2 * 3600 * 1000)
        .execute(api.store.pool())
        .await
        .unwrap();
    let (st, _, _) = login(&api, "alice", "wrong wrong wrong wrong", &from()).await;
    assert_eq!(st, 401);
    assert_eq!(backoff_row(&api, "alice").await.0, 1);
    // A name nobody has backs off the same way (the answers do not tell
    // which names exist).
    for _ in 0..3 {
        assert_eq!(login(&api, "nobody", PW, &from()).await.0, 401);
    }
    assert_eq!(login(&api, "nobody", PW, &from()).await.0, 429);
}

/// A database that does not answer: 503 with a generic problem; the
/// driver's words (here "pool closed") stay in the log.
async fn readyz_keeps_database_errors_to_the_log(db: common::TestDb) {
    let api = Api::start(&db, HttpConfig::unlimited(), AuthConfig::default()).await;
    let (st, _, v) = api.call(Method::GET, "/readyz", None, &[], None).await;
    assert_eq!(st, 200, "{v}");
    api.store.close().await;
    let (st, h, v) = api.call(Method::GET, "/readyz", None, &[], None).await;
    assert_problem(
        (st, &h, &v),
        503,
        "database-unavailable",
        "readyz without a database",
    );
    let detail = v["detail"].as_str().unwrap();
    for leak in ["pool", "closed", "database error", "sqlx", "connection"] {
        assert!(!detail.to_lowercase().contains(leak), "{leak}: {detail}");
    }
    assert!(detail.contains("log"), "{detail}");
}

async fn cookies_are_secure_when_a_trusted_proxy_says_https(db: common::TestDb) {
    let password = "a passphrase long enough";
    // The test's loopback connection plays the proxy: trusted, then not.
    for (trusted, proto, secure) in [
        (true, Some("https"), true),
        (true, Some("http"), false),
        (true, None, false),
        (false, Some("https"), false),
    ] {
        let cfg = if trusted {
            one_per_address(&["127.0.0.0/8"])
        } else {
            one_per_address(&[])
        };
        let mut cfg = cfg;
        cfg.rate = polydev_controller::http::RateLimits::unlimited();
        let api = Api::start(&db, cfg, AuthConfig::default()).await;
        let name = format!("u{}", polydev_controller::util::now_ms());
        api.auth
            .create_user(&name, Role::User, Some(password))
            .await
            .unwrap();
        let h: Vec<(&str, &str)> = proto
            .map(|p| ("x-forwarded-proto", p))
            .into_iter()
            .collect();
        let (st, headers, v) = api
            .call(
                Method::POST,
                "/api/v1/auth/login",
                None,
                &h,
                Some(json!({"name": name, "password": password})),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        let cookie = headers["set-cookie"].to_str().unwrap();
        assert_eq!(
            cookie.contains("; Secure"),
            secure,
            "trusted proxy: {trusted}, proto: {proto:?}: {cookie}"
        );
        let _ = api.stop.send(true);
    }
}
