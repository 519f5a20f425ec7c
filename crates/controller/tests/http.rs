//! The HTTP API over a real socket, on SQLite and on a real PostgreSQL:
//! the authorization matrix of every route, malformed input (nothing is
//! written), request ids, rate limits, the session event stream, and
//! graceful shutdown. Time is moved by editing stored timestamps.

mod common;

use std::time::Duration;

use polydev_controller::auth::{Auth, AuthConfig, Role, Scope};
use polydev_controller::http::{self, AppState, HttpConfig, Rate, RateLimits};
use polydev_controller::state::{SessionState, VmState};
use polydev_controller::store::{Also, Store, VmKind};
use polydev_controller::vault::{Keyring, Vault};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

both_backends!(
    authorization_matrix,
    malformed_input_is_refused_and_nothing_is_written,
    request_ids_are_echoed_and_in_problems,
    rate_limits_are_announced_and_enforced,
    session_events_stream_until_the_session_ends,
    logins_links_cookies_and_tokens_over_http,
    desktop_streams_need_their_ticket,
    terminal_streams_need_their_ticket,
    shutdown_finishes_requests_in_flight,
);

/// A running API on a loopback port.
struct Api {
    base: String,
    client: reqwest::Client,
    auth: Auth,
    store: Store,
    stop: watch::Sender<bool>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Api {
    async fn start(db: &common::TestDb, cfg: HttpConfig) -> Api {
        let auth = Auth::new(db.store.clone(), AuthConfig::default()).unwrap();
        let (stop, rx) = watch::channel(false);
        let state = AppState::new(auth.clone(), None, cfg, rx).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let served = tokio::spawn(http::serve(listener, state));
        Api {
            base,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            auth,
            store: db.store.clone(),
            stop,
            served,
        }
    }

    /// An API without rate limits or per-user quotas (for tests that are
    /// not about them; alice's one live session must not stop her second).
    async fn unlimited(db: &common::TestDb) -> Api {
        Api::start(db, HttpConfig::unlimited()).await
    }

    /// A WebSocket handshake (complete, as a browser sends it) to `path`.
    async fn upgrade(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .send()
            .await
            .unwrap()
    }

    /// Ask for a `kind` stream ticket for `resource` with bearer `token`.
    async fn ticket(
        &self,
        token: &str,
        kind: &str,
        resource: &str,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        self.call(
            Method::POST,
            "/api/v1/tickets",
            Some(&Cred::Bearer(token.to_string())),
            Some(json!({"kind": kind, "resource_id": resource})),
        )
        .await
    }

    /// The Prometheus text of `/metrics`, read with `token` (it needs the
    /// admin-only `metrics:read` scope).
    async fn metrics(&self, token: &str) -> String {
        self.client
            .get(format!("{}/metrics", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Send a request; `auth` is a full `Authorization` or `Cookie` header.
    async fn call(
        &self,
        method: Method,
        path: &str,
        auth: Option<&Cred>,
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut rb = self.client.request(method, format!("{}{path}", self.base));
        if let Some(c) = auth {
            rb = match c {
                Cred::Bearer(t) => rb.header("authorization", format!("Bearer {t}")),
                Cred::Cookie(v) => rb.header("cookie", format!("polydev_session={v}")),
            };
        }
        if let Some(b) = body {
            rb = rb
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&b).unwrap());
        }
        let r = rb.send().await.unwrap();
        let status = r.status();
        let headers = r.headers().clone();
        let bytes = r.bytes().await.unwrap();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, headers, v)
    }
}

#[derive(Clone, Debug)]
enum Cred {
    Bearer(String),
    Cookie(String),
}

fn all_user_scopes() -> Vec<Scope> {
    Scope::ALL.into_iter().filter(|s| !s.admin_only()).collect()
}

/// A problem response: the status, the media type, a detail and the
/// request id.
fn assert_problem(st: StatusCode, h: &reqwest::header::HeaderMap, v: &Value, want: u16, ctx: &str) {
    assert_eq!(st.as_u16(), want, "{ctx}: {v}");
    assert_eq!(
        h.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json"),
        "{ctx}"
    );
    assert_eq!(v["status"], want, "{ctx}: {v}");
    assert!(
        v["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{ctx}: {v}"
    );
    assert!(
        v["request_id"]
            .as_str()
            .is_some_and(|d| d.starts_with("req-")),
        "{ctx}: {v}"
    );
}

/// The world of the matrix: alice owns one of everything; bob owns
/// nothing of hers; tokens of every sort.
struct World {
    alice: String,
    alice_token: String,
    /// One token per missing scope: the token has every scope but that one.
    alice_without: Vec<(Scope, String)>,
    expired: String,
    revoked: String,
    bob_token: String,
    admin_token: String,
    session: String,
    cli_vm: String,
    run: String,
    alice_token_id: String,
}

async fn world(api: &Api) -> World {
    let a = &api.auth;
    let alice = a.create_user("alice", Role::User, None).await.unwrap();
    let bob = a.create_user("bob", Role::User, None).await.unwrap();
    let admin = a.create_user("root", Role::Admin, None).await.unwrap();
    let (info, alice_token) = a
        .create_token(&alice.id, "all", &all_user_scopes(), None)
        .await
        .unwrap();
    let mut alice_without = Vec::new();
    for s in all_user_scopes() {
        let rest: Vec<Scope> = all_user_scopes().into_iter().filter(|x| *x != s).collect();
        let (_, t) = a
            .create_token(&alice.id, &format!("no {s}"), &rest, None)
            .await
            .unwrap();
        alice_without.push((s, t));
    }
    let (exp_info, expired) = a
        .create_token(
            &alice.id,
            "expired",
            &all_user_scopes(),
            Some(polydev_controller::util::now_ms() + 3_600_000),
        )
        .await
        .unwrap();
    sqlx::query("UPDATE api_tokens SET expires_at = $1 WHERE id = $2")
        .bind(polydev_controller::util::now_ms() - 1000)
        .bind(&exp_info.id)
        .execute(api.store.pool())
        .await
        .unwrap();
    let (rev_info, revoked) = a
        .create_token(&alice.id, "revoked", &all_user_scopes(), None)
        .await
        .unwrap();
    a.revoke_token(&alice.id, &rev_info.id).await.unwrap();
    let (_, bob_token) = a
        .create_token(&bob.id, "all", &all_user_scopes(), None)
        .await
        .unwrap();
    let (_, admin_token) = a
        .create_token(&admin.id, "all", &Scope::ALL, None)
        .await
        .unwrap();

    // A live session with a desktop, a running CLI VM, a credential.
    let s = api.store.create_session(&alice.id, "codex").await.unwrap();
    let bvm = api
        .store
        .create_vm(&alice.id, VmKind::Browser)
        .await
        .unwrap();
    api.store
        .transition_session(
            &s,
            SessionState::StartingVm,
            None,
            Also {
                browser_vm_id: Some(bvm.id.clone()),
                ..Also::default()
            },
        )
        .await
        .unwrap();
    sqlx::query("INSERT INTO hosts (id, name, address, vcpus, memory_mib, state, created_at) VALUES ('local', 'local', 'in-process', 4, 8192, 'up', 0)")
        .execute(api.store.pool())
        .await
        .unwrap();
    let vm = api.store.create_vm(&alice.id, VmKind::Cli).await.unwrap();
    let vm = api
        .store
        .transition_vm(
            &vm,
            VmState::Creating,
            None,
            Also {
                placement: Some(("local".into(), "vm-000000000001".into())),
                ..Also::default()
            },
        )
        .await
        .unwrap();
    api.store
        .transition_vm(&vm, VmState::Running, None, Also::default())
        .await
        .unwrap();
    let vault = Vault::new(Keyring::generate().unwrap());
    vault
        .store(&api.store, &alice.id, "codex", b"{\"k\":\"v\"}")
        .await
        .unwrap();
    let run = api
        .store
        .create_run_limited(
            polydev_controller::store::NewRun {
                user_id: alice.id.clone(),
                vm_id: vm.id.clone(),
                provider: "codex".into(),
                prompt: "hi".into(),
                cwd: "/home/user".into(),
                timeout_secs: 60,
            },
            10,
        )
        .await
        .unwrap();
    World {
        alice: alice.id,
        run: run.id,
        alice_token,
        alice_without,
        expired,
        revoked,
        bob_token,
        admin_token,
        session: s.id,
        cli_vm: vm.id,
        alice_token_id: info.id,
    }
}

/// One row of the matrix.
struct Route {
    method: Method,
    /// With `{ses}`, `{vm}`, `{tok}`, `{usr}` for alice's records.
    path: &'static str,
    body: Option<Value>,
    /// The scope it needs (`None`: any authenticated caller).
    scope: Option<Scope>,
    /// Names one of alice's records (bob must get 404).
    owned: bool,
    /// What alice (or the admin, for admin routes) gets with every scope.
    ok: u16,
}

fn routes(w: &World) -> Vec<Route> {
    use Method as M;
    let r = |method: Method,
             path: &'static str,
             body: Option<Value>,
             scope: Option<Scope>,
             owned: bool,
             ok: u16| Route {
        method,
        path,
        body,
        scope,
        owned,
        ok,
    };
    let _ = w;
    vec![
        r(M::GET, "/api/v1/me", None, None, false, 200),
        r(M::GET, "/api/v1/providers", None, None, false, 200),
        r(M::GET, "/api/v1/tokens", None, None, false, 200),
        r(
            M::POST,
            "/api/v1/tokens",
            Some(json!({"name": "new", "scopes": ["vms:read"]})),
            Some(Scope::VmsRead),
            false,
            201,
        ),
        r(
            M::GET,
            "/api/v1/sessions",
            None,
            Some(Scope::SessionsRead),
            false,
            200,
        ),
        r(
            M::POST,
            "/api/v1/sessions",
            Some(json!({"provider": "codex"})),
            Some(Scope::SessionsWrite),
            false,
            201,
        ),
        r(
            M::GET,
            "/api/v1/sessions/{ses}",
            None,
            Some(Scope::SessionsRead),
            true,
            200,
        ),
        r(
            M::GET,
            "/api/v1/sessions/{ses}/events",
            None,
            Some(Scope::SessionsRead),
            true,
            200,
        ),
        r(
            M::GET,
            "/api/v1/vms",
            None,
            Some(Scope::VmsRead),
            false,
            200,
        ),
        // alice has her one CLI VM already (a first one: see the SSE test).
        r(
            M::POST,
            "/api/v1/vms",
            Some(json!({"kind": "cli"})),
            Some(Scope::VmsWrite),
            false,
            409,
        ),
        r(
            M::GET,
            "/api/v1/vms/{vm}",
            None,
            Some(Scope::VmsRead),
            true,
            200,
        ),
        r(
            M::GET,
            "/api/v1/runs",
            None,
            Some(Scope::VmsRead),
            false,
            200,
        ),
        r(
            M::POST,
            "/api/v1/runs",
            Some(json!({"provider": "codex", "prompt": "hi"})),
            Some(Scope::VmsWrite),
            false,
            201,
        ),
        r(
            M::GET,
            "/api/v1/runs/{run}",
            None,
            Some(Scope::VmsRead),
            true,
            200,
        ),
        r(
            M::GET,
            "/api/v1/runs/{run}/events",
            None,
            Some(Scope::VmsRead),
            true,
            200,
        ),
        r(
            M::GET,
            "/api/v1/credentials",
            None,
            Some(Scope::CredentialsRead),
            false,
            200,
        ),
        // The VM runs: only a stopped one starts (after the checks, 409).
        r(
            M::POST,
            "/api/v1/vms/{vm}/start",
            Some(json!({})),
            Some(Scope::VmsWrite),
            true,
            409,
        ),
        r(
            M::POST,
            "/api/v1/tickets",
            Some(json!({"kind": "desktop", "resource_id": "{ses}"})),
            Some(Scope::StreamsConnect),
            true,
            201,
        ),
        r(
            M::GET,
            "/metrics",
            None,
            Some(Scope::MetricsRead),
            false,
            200,
        ),
        r(
            M::GET,
            "/api/v1/admin/users",
            None,
            Some(Scope::Admin),
            false,
            200,
        ),
        r(
            M::POST,
            "/api/v1/admin/users",
            Some(json!({"name": "carol"})),
            Some(Scope::Admin),
            false,
            201,
        ),
        r(
            M::POST,
            "/api/v1/admin/users/{usr}/login-link",
            None,
            Some(Scope::Admin),
            false,
            201,
        ),
        r(
            M::GET,
            "/api/v1/admin/upstreams",
            None,
            Some(Scope::Admin),
            false,
            200,
        ),
        // No upstream providers are configured here: the answer after the
        // authorization check is "not configured" (422) / "not assigned" (404).
        r(
            M::PUT,
            "/api/v1/admin/upstreams/{usr}",
            Some(json!({"provider": "p", "port": 10000})),
            Some(Scope::Admin),
            false,
            422,
        ),
        r(
            M::POST,
            "/api/v1/admin/upstreams/{usr}/rotate",
            None,
            Some(Scope::Admin),
            false,
            409,
        ),
        r(
            M::DELETE,
            "/api/v1/admin/upstreams/{usr}",
            None,
            Some(Scope::Admin),
            false,
            404,
        ),
        r(
            M::GET,
            "/api/v1/admin/vms",
            None,
            Some(Scope::Admin),
            false,
            200,
        ),
        r(
            M::GET,
            "/api/v1/admin/sessions/summary",
            None,
            Some(Scope::Admin),
            false,
            200,
        ),
        // No host agent in these tests: after the authorization check, a
        // VM has no logs to give (409).
        r(
            M::GET,
            "/api/v1/admin/vms/{vm}/logs/console",
            None,
            Some(Scope::Admin),
            false,
            409,
        ),
        // The session is not awaiting the person here: after the
        // authorization check, input to its login is a conflict.
        r(
            M::POST,
            "/api/v1/sessions/{ses}/input",
            Some(json!({"text": "code#state"})),
            Some(Scope::SessionsWrite),
            false,
            409,
        ),
        // Destructive routes last: their positive run ends the record.
        r(
            M::POST,
            "/api/v1/sessions/{ses}/cancel",
            None,
            Some(Scope::SessionsWrite),
            true,
            200,
        ),
        r(
            M::DELETE,
            "/api/v1/runs/{run}",
            None,
            Some(Scope::VmsWrite),
            true,
            202,
        ),
        r(
            M::DELETE,
            "/api/v1/credentials/codex",
            None,
            Some(Scope::CredentialsWrite),
            true,
            200,
        ),
        r(
            M::POST,
            "/api/v1/vms/{vm}/stop",
            Some(json!({})),
            Some(Scope::VmsWrite),
            true,
            202,
        ),
        r(
            M::DELETE,
            "/api/v1/vms/{vm}",
            None,
            Some(Scope::VmsWrite),
            true,
            202,
        ),
        r(M::DELETE, "/api/v1/tokens/{tok}", None, None, true, 204),
    ]
}

fn fill(s: &str, w: &World) -> String {
    s.replace("{ses}", &w.session)
        .replace("{run}", &w.run)
        .replace("{vm}", &w.cli_vm)
        .replace("{tok}", &w.alice_token_id)
        .replace("{usr}", &w.alice)
}

fn fill_body(b: &Option<Value>, w: &World) -> Option<Value> {
    b.as_ref()
        .map(|v| serde_json::from_str(&fill(&v.to_string(), w)).unwrap())
}

/// Every route: no credentials, an expired, a revoked or a forged token →
/// 401; a token without the route's scope → 403; another user's record →
/// 404 (exactly like a missing one); never any of the record's data. Then
/// each route works for its owner (the matrix would pass on a server that
/// refused everything otherwise).
async fn authorization_matrix(db: common::TestDb) {
    let api = Api::unlimited(&db).await;
    let w = world(&api).await;
    let table = routes(&w);
    // Every documented operation is in the table (or public).
    let doc = polydev_controller::http::openapi::json();
    let public = [
        "/healthz",
        "/readyz",
        "/api/v1/openapi.json",
        "/api/v1/auth/login",
        "/api/v1/auth/logout",
        "/api/v1/auth/link",
    ];
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let covered = public.contains(&path.as_str())
                || path == "/api/v1/me/password"
                // Authorized by a ticket, not a bearer:
                // desktop_streams_need_their_ticket, terminal_streams_need_their_ticket.
                || path == "/api/v1/sessions/{id}/desktop"
                || path == "/api/v1/vms/{id}/terminal"
                || table.iter().any(|r| {
                    r.method == m
                        && r.path
                            .replace("{ses}", "{id}")
                            .replace("{run}", "{id}")
                            .replace("{vm}", "{id}")
                            .replace("{tok}", "{id}")
                            .replace("/upstreams/{usr}", "/upstreams/{user_id}")
                            .replace("{usr}", "{id}")
                            .replace("/credentials/codex", "/credentials/{provider}")
                            .replace("/logs/console", "/logs/{log}")
                            == *path
                });
            assert!(
                covered,
                "{method} {path} is not in the authorization matrix"
            );
        }
    }
    let forged = format!("pdt_{}_{}", "0123456789abcdef", "A".repeat(43));
    for r in &table {
        let path = fill(r.path, &w);
        let body = fill_body(&r.body, &w);
        let ctx = format!("{} {}", r.method, r.path);
        for (who, cred) in [
            ("nobody", None),
            ("expired", Some(Cred::Bearer(w.expired.clone()))),
            ("revoked", Some(Cred::Bearer(w.revoked.clone()))),
            ("forged", Some(Cred::Bearer(forged.clone()))),
            ("stale cookie", Some(Cred::Cookie("x".repeat(43)))),
        ] {
            let (st, h, v) = api
                .call(r.method.clone(), &path, cred.as_ref(), body.clone())
                .await;
            assert_problem(st, &h, &v, 401, &format!("{ctx} as {who}"));
        }
        if let Some(scope) = r.scope {
            let cred = if scope.admin_only() {
                // alice's full token: every scope her role has, not the
                // admin-only ones.
                Cred::Bearer(w.alice_token.clone())
            } else {
                let t = &w.alice_without.iter().find(|(s, _)| *s == scope).unwrap().1;
                Cred::Bearer(t.clone())
            };
            let (st, h, v) = api
                .call(r.method.clone(), &path, Some(&cred), body.clone())
                .await;
            assert_problem(st, &h, &v, 403, &format!("{ctx} without {scope}"));
        }
        if r.owned {
            let (st, h, v) = api
                .call(
                    r.method.clone(),
                    &path,
                    Some(&Cred::Bearer(w.bob_token.clone())),
                    body.clone(),
                )
                .await;
            assert_problem(st, &h, &v, 404, &format!("{ctx} as bob"));
            for leak in ["codex", "browser_vm_id", "state", "version"] {
                assert!(
                    !v["detail"].as_str().unwrap_or("").contains(leak)
                        || leak == "codex" && r.path.contains("codex"),
                    "{ctx} as bob leaks {leak}: {v}"
                );
                assert!(v.get(leak).is_none(), "{ctx} as bob leaks {leak}: {v}");
            }
        }
    }
    // Nothing of alice's was touched by the refused calls.
    let s = api.store.session(&w.session).await.unwrap();
    assert_eq!(s.life.state, SessionState::StartingVm);
    assert!(api
        .store
        .credential(&w.alice, "codex")
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        api.store.vm(&w.cli_vm).await.unwrap().life.state,
        VmState::Running
    );
    // The owner (the admin, for admin routes) gets what the route is for.
    for r in &table {
        let cred = if r.scope.is_some_and(Scope::admin_only) {
            &w.admin_token
        } else {
            &w.alice_token
        };
        let (st, _, v) = api
            .call(
                r.method.clone(),
                &fill(r.path, &w),
                Some(&Cred::Bearer(cred.clone())),
                fill_body(&r.body, &w),
            )
            .await;
        assert_eq!(st.as_u16(), r.ok, "{} {} as owner: {v}", r.method, r.path);
    }
    assert_eq!(
        api.store.session(&w.session).await.unwrap().life.state,
        SessionState::Cancelled
    );
    assert!(api
        .store
        .credential(&w.alice, "codex")
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        api.store.vm(&w.cli_vm).await.unwrap().life.state,
        VmState::Stopping
    );
    // The token revoked last is now refused.
    let (st, h, v) = api
        .call(
            Method::GET,
            "/api/v1/me",
            Some(&Cred::Bearer(w.alice_token.clone())),
            None,
        )
        .await;
    assert_problem(st, &h, &v, 401, "revoked through the API");
}

async fn counts(store: &Store) -> Vec<i64> {
    let mut out = Vec::new();
    for t in [
        "users",
        "api_tokens",
        "sessions",
        "vms",
        "credentials",
        "events",
        "stream_tickets",
    ] {
        let (n,): (i64,) = sqlx::query_as(&format!("SELECT COUNT(*) FROM {t}"))
            .fetch_one(store.pool())
            .await
            .unwrap();
        out.push(n);
    }
    out
}

/// Broken JSON, oversized bodies, unknown fields, invalid enum values,
/// wrong media types and traversal in names: a clear 4xx problem each,
/// and not one row written.
async fn malformed_input_is_refused_and_nothing_is_written(db: common::TestDb) {
    let api = Api::unlimited(&db).await;
    let w = world(&api).await;
    let before = counts(&api.store).await;
    let tok = w.alice_token.clone();
    let admin = w.admin_token.clone();
    let raw = |method: Method, path: &str, ctype: Option<&str>, body: Vec<u8>, t: &str| {
        let mut rb = api
            .client
            .request(method, format!("{}{path}", api.base))
            .header("authorization", format!("Bearer {t}"))
            .body(body);
        if let Some(c) = ctype {
            rb = rb.header("content-type", c);
        }
        rb
    };
    let json_ct = Some("application/json");
    let big = format!("{{\"provider\":\"{}\"}}", "a".repeat(100 * 1024)).into_bytes();
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "broken JSON",
            raw(
                Method::POST,
                "/api/v1/sessions",
                json_ct,
                b"{\"provider\":".to_vec(),
                &tok,
            ),
            400,
            "not valid JSON",
        ),
        (
            "not an object",
            raw(
                Method::POST,
                "/api/v1/sessions",
                json_ct,
                b"[1,2]".to_vec(),
                &tok,
            ),
            422,
            "does not match",
        ),
        (
            "oversized body",
            raw(Method::POST, "/api/v1/sessions", json_ct, big, &tok),
            413,
            "larger than",
        ),
        (
            "unknown field",
            raw(
                Method::POST,
                "/api/v1/sessions",
                json_ct,
                br#"{"provider":"codex","vcpus":64}"#.to_vec(),
                &tok,
            ),
            422,
            "unknown field",
        ),
        (
            "missing field",
            raw(
                Method::POST,
                "/api/v1/sessions",
                json_ct,
                b"{}".to_vec(),
                &tok,
            ),
            422,
            "provider",
        ),
        (
            "wrong media type",
            raw(
                Method::POST,
                "/api/v1/sessions",
                Some("text/plain"),
                br#"{"provider":"codex"}"#.to_vec(),
                &tok,
            ),
            415,
            "application/json",
        ),
        (
            "no media type",
            raw(
                Method::POST,
                "/api/v1/sessions",
                None,
                br#"{"provider":"codex"}"#.to_vec(),
                &tok,
            ),
            415,
            "application/json",
        ),
        (
            "unknown provider",
            raw(
                Method::POST,
                "/api/v1/sessions",
                json_ct,
                br#"{"provider":"cursor"}"#.to_vec(),
                &tok,
            ),
            422,
            "claude-code",
        ),
        (
            "traversal in provider",
            raw(
                Method::POST,
                "/api/v1/sessions",
                json_ct,
                br#"{"provider":"../../etc/passwd"}"#.to_vec(),
                &tok,
            ),
            400,
            "a-z",
        ),
        (
            "invalid VM kind",
            raw(
                Method::POST,
                "/api/v1/vms",
                json_ct,
                br#"{"kind":"gpu"}"#.to_vec(),
                &tok,
            ),
            422,
            "unknown variant",
        ),
        (
            "browser VM by hand",
            raw(
                Method::POST,
                "/api/v1/vms",
                json_ct,
                br#"{"kind":"browser"}"#.to_vec(),
                &tok,
            ),
            422,
            "sessions",
        ),
        (
            "second CLI VM",
            raw(
                Method::POST,
                "/api/v1/vms",
                json_ct,
                br#"{"kind":"cli"}"#.to_vec(),
                &tok,
            ),
            409,
            "already have",
        ),
        (
            "invalid scope",
            raw(
                Method::POST,
                "/api/v1/tokens",
                json_ct,
                br#"{"name":"x","scopes":["root"]}"#.to_vec(),
                &tok,
            ),
            422,
            "unknown variant",
        ),
        (
            "no scopes",
            raw(
                Method::POST,
                "/api/v1/tokens",
                json_ct,
                br#"{"name":"x","scopes":[]}"#.to_vec(),
                &tok,
            ),
            422,
            "scope",
        ),
        (
            "control chars in token name",
            raw(
                Method::POST,
                "/api/v1/tokens",
                json_ct,
                br#"{"name":"a\u0000b","scopes":["vms:read"]}"#.to_vec(),
                &tok,
            ),
            422,
            "printable",
        ),
        (
            "expiry in the past",
            raw(
                Method::POST,
                "/api/v1/tokens",
                json_ct,
                br#"{"name":"x","scopes":["vms:read"],"expires_at":1}"#.to_vec(),
                &tok,
            ),
            422,
            "past",
        ),
        (
            "wrong type",
            raw(
                Method::POST,
                "/api/v1/tokens",
                json_ct,
                br#"{"name":7,"scopes":["vms:read"]}"#.to_vec(),
                &tok,
            ),
            422,
            "invalid type",
        ),
        (
            "invalid stream kind",
            raw(
                Method::POST,
                "/api/v1/tickets",
                json_ct,
                br#"{"kind":"ssh","resource_id":"vm-01"}"#.to_vec(),
                &tok,
            ),
            422,
            "unknown variant",
        ),
        (
            "traversal in ticket resource",
            raw(
                Method::POST,
                "/api/v1/tickets",
                json_ct,
                br#"{"kind":"desktop","resource_id":"../ses-01"}"#.to_vec(),
                &tok,
            ),
            400,
            "session id",
        ),
        (
            "traversal in a session id",
            raw(
                Method::GET,
                "/api/v1/sessions/..%2F..%2Fetc%2Fpasswd",
                None,
                vec![],
                &tok,
            ),
            400,
            "session id",
        ),
        (
            "dots as a VM id",
            raw(Method::DELETE, "/api/v1/vms/vm-..", None, vec![], &tok),
            400,
            "VM id",
        ),
        (
            "traversal in a provider name",
            raw(
                Method::DELETE,
                "/api/v1/credentials/..%2Fcodex",
                None,
                vec![],
                &tok,
            ),
            400,
            "a-z",
        ),
        (
            "encoded NUL in an id",
            raw(Method::GET, "/api/v1/vms/vm-01%00", None, vec![], &tok),
            400,
            "VM id",
        ),
        (
            "bad user name",
            raw(
                Method::POST,
                "/api/v1/admin/users",
                json_ct,
                br#"{"name":"../root"}"#.to_vec(),
                &admin,
            ),
            422,
            "not allowed",
        ),
        (
            "invalid role",
            raw(
                Method::POST,
                "/api/v1/admin/users",
                json_ct,
                br#"{"name":"eve","role":"superuser"}"#.to_vec(),
                &admin,
            ),
            422,
            "unknown variant",
        ),
        (
            "short password",
            raw(
                Method::POST,
                "/api/v1/admin/users",
                json_ct,
                br#"{"name":"eve","password":"short"}"#.to_vec(),
                &admin,
            ),
            422,
            "too short",
        ),
        (
            "port out of range",
            raw(
                Method::PUT,
                &format!("/api/v1/admin/upstreams/{}", w.alice),
                json_ct,
                br#"{"provider":"p","port":70000}"#.to_vec(),
                &admin,
            ),
            422,
            "invalid value",
        ),
        (
            "bad Last-Event-ID",
            raw(
                Method::GET,
                &format!("/api/v1/sessions/{}/events", w.session),
                None,
                vec![],
                &tok,
            )
            .header("accept", "text/event-stream")
            .header("last-event-id", "x"),
            400,
            "Last-Event-ID",
        ),
        (
            "unknown route",
            raw(Method::GET, "/api/v1/sessionz", None, vec![], &tok),
            404,
            "openapi.json",
        ),
        (
            "wrong method",
            raw(Method::PATCH, "/api/v1/sessions", None, vec![], &tok),
            405,
            "not allowed",
        ),
    ];
    for (what, rb, want, says) in cases {
        let r = rb.send().await.unwrap();
        let st = r.status();
        let h = r.headers().clone();
        let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null);
        assert_problem(st, &h, &v, want, what);
        let detail = v["detail"].as_str().unwrap();
        assert!(
            detail.contains(says),
            "{what}: {detail:?} should mention {says:?}"
        );
        assert_eq!(counts(&api.store).await, before, "{what} wrote something");
    }
}

async fn request_ids_are_echoed_and_in_problems(db: common::TestDb) {
    let api = Api::start(&db, HttpConfig::default()).await;
    let send = |id: Option<&str>| {
        let mut rb = api.client.get(format!("{}/api/v1/me", api.base));
        if let Some(id) = id {
            rb = rb.header("x-request-id", id);
        }
        rb.send()
    };
    let r = send(Some("trace-42.a_b")).await.unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-42.a_b");
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["request_id"], "trace-42.a_b");
    // Unusable ids are replaced, not reflected.
    for bad in ["has space", &"x".repeat(65), "semi;colon"] {
        let r = send(Some(bad)).await.unwrap();
        let got = r.headers()["x-request-id"].to_str().unwrap().to_string();
        assert!(got.starts_with("req-") && got != bad, "{bad:?} → {got}");
        let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(v["request_id"], got);
    }
    // Generated ids differ per request; success answers carry one too.
    let a = send(None).await.unwrap().headers()["x-request-id"].clone();
    let b = send(None).await.unwrap().headers()["x-request-id"].clone();
    assert_ne!(a, b);
    let ok = api
        .client
        .get(format!("{}/healthz", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert!(ok.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("req-"));
}

async fn rate_limits_are_announced_and_enforced(db: common::TestDb) {
    let cfg = HttpConfig {
        rate: RateLimits {
            per_credential: Rate::new(0.001, 3),
            per_user: Rate::new(0.001, 5),
            anonymous: Rate::new(0.001, 2),
        },
        ..HttpConfig::default()
    };
    let api = Api::start(&db, cfg).await;
    let u = api
        .auth
        .create_user("alice", Role::User, None)
        .await
        .unwrap();
    let (_, t1) = api
        .auth
        .create_token(&u.id, "one", &[Scope::SessionsRead], None)
        .await
        .unwrap();
    let (_, t2) = api
        .auth
        .create_token(&u.id, "two", &[Scope::SessionsRead], None)
        .await
        .unwrap();
    let (c1, c2) = (Cred::Bearer(t1.clone()), Cred::Bearer(t2.clone()));
    let get = |c: &'static str| {
        let c = if c == "one" { &c1 } else { &c2 };
        api.call(Method::GET, "/api/v1/sessions", Some(c), None)
    };
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let (st, h, _) = get("one").await;
        assert_eq!(st, 200);
        assert_eq!(h["ratelimit-limit"], "3");
        remaining.push(h["ratelimit-remaining"].to_str().unwrap().to_string());
    }
    assert_eq!(remaining, ["2", "1", "0"]);
    let (st, h, v) = get("one").await;
    assert_problem(st, &h, &v, 429, "fourth request of token one");
    assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    // The other token has its own bucket, but the user's (5) is shared:
    // 4 of the user's 5 were taken (the refused one counted too).
    let (st, h, _) = get("two").await;
    assert_eq!(st, 200);
    assert_eq!(
        h["ratelimit-remaining"], "0",
        "the user's bucket is the tighter one now"
    );
    let (st, h, v) = get("two").await;
    assert_problem(st, &h, &v, 429, "user bucket exhausted");
    // Without valid credentials the client address is limited.
    for _ in 0..2 {
        let (st, _, _) = api.call(Method::GET, "/api/v1/me", None, None).await;
        assert_eq!(st, 401);
    }
    let (st, h, v) = api.call(Method::GET, "/api/v1/me", None, None).await;
    assert_problem(st, &h, &v, 429, "anonymous");
}

/// Read SSE events until `until` is seen: (event, id, data) triples.
async fn read_sse(r: &mut reqwest::Response, until: &str) -> Vec<(String, String, Value)> {
    let mut buf = String::new();
    let mut out = Vec::new();
    loop {
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut ev, mut id, mut data) = (String::new(), String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    ev = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            if ev.is_empty() {
                continue; // keep-alive comment
            }
            let done = ev == until;
            out.push((ev, id, serde_json::from_str(&data).unwrap_or(Value::Null)));
            if done {
                return out;
            }
        }
        let chunk = tokio::time::timeout(Duration::from_secs(30), r.chunk())
            .await
            .expect("an SSE event within 30 s")
            .unwrap()
            .expect("the stream ended before the expected event");
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
}

async fn session_events_stream_until_the_session_ends(db: common::TestDb) {
    let api = Api::start(
        &db,
        HttpConfig {
            sse_poll: Duration::from_millis(50),
            ..HttpConfig::default()
        },
    )
    .await;
    let u = api
        .auth
        .create_user("alice", Role::User, None)
        .await
        .unwrap();
    let (_, t) = api
        .auth
        .create_token(&u.id, "all", &all_user_scopes(), None)
        .await
        .unwrap();
    let cred = Cred::Bearer(t.clone());
    let (st, h, s) = api
        .call(
            Method::POST,
            "/api/v1/sessions",
            Some(&cred),
            Some(json!({"provider": "codex"})),
        )
        .await;
    assert_eq!(st, 201);
    let id = s["id"].as_str().unwrap().to_string();
    assert_eq!(h["location"], format!("/api/v1/sessions/{id}"));
    let open = |last: Option<String>| {
        let mut rb = api
            .client
            .get(format!("{}/api/v1/sessions/{id}/events", api.base))
            .header("authorization", format!("Bearer {t}"))
            .header("accept", "text/event-stream");
        if let Some(l) = last {
            rb = rb.header("last-event-id", l);
        }
        rb.send()
    };
    let mut r = open(None).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let first = read_sse(&mut r, "created").await;
    assert_eq!(first.last().unwrap().2["detail"]["provider"], "codex");
    let created_id = first.last().unwrap().1.clone();
    // A change made by someone else (the driver, here the store) arrives live.
    let sess = api.store.session(&id).await.unwrap();
    let vm = api.store.create_vm(&u.id, VmKind::Browser).await.unwrap();
    api.store
        .transition_session(
            &sess,
            SessionState::StartingVm,
            None,
            Also {
                browser_vm_id: Some(vm.id),
                ..Also::default()
            },
        )
        .await
        .unwrap();
    let next = read_sse(&mut r, "state").await;
    assert_eq!(next.last().unwrap().2["to_state"], "starting_vm");
    // Cancelling ends the session and the stream.
    let (st, _, v) = api
        .call(
            Method::POST,
            &format!("/api/v1/sessions/{id}/cancel"),
            Some(&cred),
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["state"], "cancelled");
    let rest = read_sse(&mut r, "end").await;
    let states: Vec<&Value> = rest
        .iter()
        .filter(|e| e.0 == "state")
        .map(|e| &e.2["to_state"])
        .collect();
    assert_eq!(states, [&json!("cancelled")]);
    assert!(
        r.chunk().await.unwrap().is_none(),
        "the stream closes after `end`"
    );
    // Resuming after the first event replays the rest, then ends.
    let mut r = open(Some(created_id)).await.unwrap();
    let replay = read_sse(&mut r, "end").await;
    let kinds: Vec<&str> = replay.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(kinds, ["state", "state", "end"]);
    // The same history as JSON.
    let (st, _, all) = api
        .call(
            Method::GET,
            &format!("/api/v1/sessions/{id}/events"),
            Some(&cred),
            None,
        )
        .await;
    assert_eq!(st, 200);
    let kinds: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["created", "state", "state"]);
    // A first CLI VM is created (and wakes the driver), a second refused.
    let (st, _, v) = api
        .call(
            Method::POST,
            "/api/v1/vms",
            Some(&cred),
            Some(json!({"kind": "cli"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(
        (v["kind"].as_str(), v["state"].as_str()),
        (Some("cli"), Some("pending"))
    );
    let (st, _, list) = api
        .call(Method::GET, "/api/v1/vms", Some(&cred), None)
        .await;
    assert_eq!(st, 200);
    assert!(list.as_array().unwrap().iter().any(|x| x["id"] == v["id"]));
    // A finished session cannot be cancelled again.
    let (st, h, v) = api
        .call(
            Method::POST,
            &format!("/api/v1/sessions/{id}/cancel"),
            Some(&cred),
            None,
        )
        .await;
    assert_problem(st, &h, &v, 409, "cancel twice");
}

async fn logins_links_cookies_and_tokens_over_http(db: common::TestDb) {
    let api = Api::unlimited(&db).await;
    let link = api.auth.bootstrap_admin().await.unwrap().unwrap();
    let r = api
        .client
        .get(format!(
            "{}/api/v1/auth/link?token={}",
            api.base, link.token
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Lax"),
        "{set}"
    );
    let cookie = set
        .split(';')
        .next()
        .unwrap()
        .strip_prefix("polydev_session=")
        .unwrap()
        .to_string();
    let me: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(me["name"], "admin");
    assert_eq!(me["via"], "login_link");
    // The link works once.
    let again = api
        .client
        .get(format!(
            "{}/api/v1/auth/link?token={}",
            api.base, link.token
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 401);
    let c = Cred::Cookie(cookie.clone());
    // The admin has no password yet: set one without the current one.
    let pw = "a long enough passphrase here";
    let (st, _, v) = api
        .call(
            Method::PUT,
            "/api/v1/me/password",
            Some(&c),
            Some(json!({"new_password": pw})),
        )
        .await;
    assert_eq!(st, 204, "{v}");
    // That ended every login session, this one included.
    let (st, _, _) = api.call(Method::GET, "/api/v1/me", Some(&c), None).await;
    assert_eq!(st, 401);
    let (st, h, v) = api
        .call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({"name": "admin", "password": "wrong password, long"})),
        )
        .await;
    assert_problem(st, &h, &v, 401, "wrong password");
    let (st, h, _) = api
        .call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({"name": "admin", "password": pw})),
        )
        .await;
    assert_eq!(st, 200);
    let cookie = h["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .strip_prefix("polydev_session=")
        .unwrap()
        .to_string();
    let c = Cred::Cookie(cookie.clone());
    // Changing it now needs the current password.
    let (st, h, v) = api
        .call(
            Method::PUT,
            "/api/v1/me/password",
            Some(&c),
            Some(json!({"new_password": "another long passphrase"})),
        )
        .await;
    assert_problem(st, &h, &v, 422, "no current password");
    // A token from the cookie; the token cannot change the password.
    let (st, _, t) = api
        .call(
            Method::POST,
            "/api/v1/tokens",
            Some(&c),
            Some(json!({"name": "ci", "scopes": ["sessions:read", "vms:read"]})),
        )
        .await;
    assert_eq!(st, 201);
    let token = t["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("pdt_"));
    let tc = Cred::Bearer(token);
    let (st, h, v) = api
        .call(
            Method::PUT,
            "/api/v1/me/password",
            Some(&tc),
            Some(json!({"current_password": pw, "new_password": "another long passphrase"})),
        )
        .await;
    assert_problem(st, &h, &v, 403, "password by token");
    // A narrow token cannot mint a broader one.
    let (st, h, v) = api
        .call(
            Method::POST,
            "/api/v1/tokens",
            Some(&tc),
            Some(json!({"name": "wider", "scopes": ["vms:write"]})),
        )
        .await;
    assert_problem(st, &h, &v, 403, "token escalation");
    let (st, _, list) = api
        .call(Method::GET, "/api/v1/tokens", Some(&tc), None)
        .await;
    assert_eq!(st, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(
        list[0].get("token").is_none(),
        "a listed token never shows its secret"
    );
    // Logout ends the cookie's session and clears it.
    let r = api
        .client
        .post(format!("{}/api/v1/auth/logout", api.base))
        .header("cookie", format!("polydev_session={cookie}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    let (st, _, _) = api.call(Method::GET, "/api/v1/me", Some(&c), None).await;
    assert_eq!(st, 401);
}

/// A request whose body is still arriving when shutdown starts is
/// answered; new connections are refused meanwhile; the server then ends.
async fn shutdown_finishes_requests_in_flight(db: common::TestDb) {
    let api = Api::start(&db, HttpConfig::default()).await;
    let u = api
        .auth
        .create_user("alice", Role::User, None)
        .await
        .unwrap();
    let (info, t) = api
        .auth
        .create_token(&u.id, "t", &[Scope::SessionsWrite], None)
        .await
        .unwrap();
    let addr = api.base.strip_prefix("http://").unwrap().to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let body = br#"{"provider":"codex"}"#;
    let head = format!(
        "POST /api/v1/sessions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {t}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&body[..5]).await.unwrap();
    // The request is in flight once its token was checked (that records
    // the token's use): from then on the handler waits for the body.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (used,): (Option<i64>,) =
            sqlx::query_as("SELECT last_used_at FROM api_tokens WHERE id = $1")
                .bind(&info.id)
                .fetch_one(api.store.pool())
                .await
                .unwrap();
        if used.is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request never reached the API"
        );
        tokio::task::yield_now().await;
    }
    api.stop.send(true).unwrap();
    // New connections are refused once the listener is gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(&addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still accepting after shutdown"
        );
        tokio::task::yield_now().await;
    }
    assert!(
        !api.served.is_finished(),
        "the server ended with a request in flight"
    );
    conn.write_all(&body[5..]).await.unwrap();
    let mut resp = Vec::new();
    conn.read_to_end(&mut resp).await.unwrap();
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 201"), "{text}");
    assert!(text.contains("\"state\":\"requested\""), "{text}");
    tokio::time::timeout(Duration::from_secs(30), api.served)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(api.store.sessions_of(&u.id).await.unwrap().len(), 1);
}

/// The desktop WebSocket takes only a ticket for exactly that session, once;
/// a plain GET is told to upgrade without spending the ticket. (The stream
/// itself needs a VM: `tests/tests/api_up.rs`.)
async fn desktop_streams_need_their_ticket(db: common::TestDb) {
    let api = Api::unlimited(&db).await;
    let w = world(&api).await;
    let desktop = format!("/api/v1/sessions/{}/desktop", w.session);
    let (st, _, v) = api.ticket(&w.alice_token, "desktop", &w.session).await;
    assert_eq!(st, 201, "{v}");
    let t = v["ticket"].as_str().unwrap().to_string();
    // Without an upgrade: 426, and the ticket is still good afterwards.
    let (st, h, v) = api
        .call(Method::GET, &format!("{desktop}?ticket={t}"), None, None)
        .await;
    assert_problem(st, &h, &v, 426, "plain GET");
    // Missing, forged, or for another resource: refused.
    let r = api.upgrade(&desktop).await;
    assert_eq!(r.status(), 400);
    let r = api
        .upgrade(&format!("{desktop}?ticket=pdk_{}", "A".repeat(43)))
        .await;
    assert_eq!(r.status(), 401);
    let other = format!("/api/v1/sessions/ses-0123456789abcdef/desktop?ticket={t}");
    assert_eq!(api.upgrade(&other).await.status(), 401);
    // A bearer token is not a ticket.
    let r = api
        .client
        .get(format!("{}{desktop}", api.base))
        .header("authorization", format!("Bearer {}", w.alice_token))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "no ticket in the query");
    // The owner's ticket passes authorization, once (the browser VM here
    // is only a record, never placed: "still starting", 409).
    let r = api.upgrade(&format!("{desktop}?ticket={t}")).await;
    assert_eq!(r.status(), 409, "{:?}", r.text().await);
    let r = api.upgrade(&format!("{desktop}?ticket={t}")).await;
    assert_eq!(r.status(), 401, "a ticket works once");
    // bob cannot get a ticket for alice's session.
    let (st, h, v) = api.ticket(&w.bob_token, "desktop", &w.session).await;
    assert_problem(st, &h, &v, 404, "bob's ticket for alice's desktop");
    let m = api.metrics(&w.admin_token).await;
    assert!(
        m.contains("polydev_stream_connects_total{kind=\"desktop\",outcome=\"unauthenticated\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("polydev_stream_connects_total{kind=\"desktop\",outcome=\"refused\"} 1"),
        "{m}"
    );
}

/// The terminal WebSocket takes only a `terminal` ticket for exactly that
/// CLI VM, once; a browser VM or another user's VM gets no ticket; a bad
/// size or a plain GET is refused without spending the ticket. (The shell
/// itself needs a VM: `tests/tests/api_up.rs`.)
async fn terminal_streams_need_their_ticket(db: common::TestDb) {
    let api = Api::unlimited(&db).await;
    let w = world(&api).await;
    let (st, _, v) = api.ticket(&w.alice_token, "terminal", &w.cli_vm).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["kind"], "terminal");
    let t = v["ticket"].as_str().unwrap().to_string();
    let terminal = format!("/api/v1/vms/{}/terminal", w.cli_vm);

    // Refused before the ticket is looked at: no upgrade, a bad size.
    let (st, h, v) = api
        .call(Method::GET, &format!("{terminal}?ticket={t}"), None, None)
        .await;
    assert_problem(st, &h, &v, 426, "plain GET");
    let r = api
        .client
        .get(format!("{}{terminal}?ticket={t}", api.base))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "a handshake without its key");
    for size in ["cols=0", "rows=1001", "cols=-1", "cols=wide"] {
        let r = api.upgrade(&format!("{terminal}?ticket={t}&{size}")).await;
        assert!(
            matches!(r.status().as_u16(), 400 | 422),
            "{size}: {}",
            r.status()
        );
    }
    // Forged, for another VM, or a desktop ticket: not authenticated.
    let r = api
        .upgrade(&format!("{terminal}?ticket=pdk_{}", "A".repeat(43)))
        .await;
    assert_eq!(r.status(), 401);
    let other = format!("/api/v1/vms/vm-0123456789abcdef/terminal?ticket={t}");
    assert_eq!(api.upgrade(&other).await.status(), 401);
    let (st, _, v) = api.ticket(&w.alice_token, "desktop", &w.session).await;
    assert_eq!(st, 201, "{v}");
    let desktop_ticket = v["ticket"].as_str().unwrap();
    let r = api
        .upgrade(&format!("{terminal}?ticket={desktop_ticket}"))
        .await;
    assert_eq!(r.status(), 401, "a desktop ticket does not open a terminal");
    // The owner's ticket passes authorization, once (this controller
    // drives no VMs: 503 names that).
    let r = api
        .upgrade(&format!("{terminal}?ticket={t}&cols=120&rows=40"))
        .await;
    assert_eq!(r.status(), 503, "{:?}", r.text().await);
    let r = api.upgrade(&format!("{terminal}?ticket={t}")).await;
    assert_eq!(r.status(), 401, "a ticket works once");

    // No ticket for bob on alice's VM, none for a browser VM, none for a
    // VM id that is not one.
    let (st, h, v) = api.ticket(&w.bob_token, "terminal", &w.cli_vm).await;
    assert_problem(st, &h, &v, 404, "bob's ticket for alice's terminal");
    let (_, _, vms) = api
        .call(
            Method::GET,
            "/api/v1/vms",
            Some(&Cred::Bearer(w.alice_token.clone())),
            None,
        )
        .await;
    let browser = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["kind"] == "browser")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (st, h, v) = api.ticket(&w.alice_token, "terminal", &browser).await;
    assert_problem(st, &h, &v, 409, "a browser VM has no terminal");
    let (st, h, v) = api.ticket(&w.alice_token, "terminal", &w.session).await;
    assert_problem(st, &h, &v, 404, "a session is not a VM");
    let m = api.metrics(&w.admin_token).await;
    for line in [
        "polydev_stream_connects_total{kind=\"terminal\",outcome=\"unauthenticated\"} 4",
        "polydev_stream_connects_total{kind=\"terminal\",outcome=\"refused\"} 1",
        "polydev_stream_tickets_total{kind=\"terminal\"} 1",
    ] {
        assert!(m.contains(line), "{line} in {m}");
    }
}
