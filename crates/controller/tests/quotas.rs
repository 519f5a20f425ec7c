//! Per-user quotas over the real HTTP API, on SQLite and on a real
//! PostgreSQL: connect sessions in progress per user, one CLI VM per user
//! enforced by the database under concurrent creates, open event streams
//! and WebSockets per user, and the background purge of expired logins,
//! tickets and links.

mod common;

use std::time::Duration;

use common::api::{assert_problem, call, eventually, Api};
use polydev_controller::auth::{AuthConfig, Role, Scope};
use polydev_controller::http::{HttpConfig, StreamClass};
use polydev_controller::state::VmState;
use polydev_controller::store::{Store, StoreError, VmKind};
use polydev_controller::util::now_ms;
use reqwest::Method;
use serde_json::{json, Value};

both_backends!(
    a_user_at_the_session_limit_is_refused_while_others_connect,
    twenty_concurrent_cli_vm_creates_give_exactly_one_vm,
    event_streams_are_capped_per_user,
    websockets_are_capped_per_user,
    expired_logins_tickets_and_links_are_purged_in_the_background,
    migration_4_settles_duplicate_cli_vms,
);

fn user_scopes() -> Vec<Scope> {
    Scope::ALL.into_iter().filter(|s| !s.admin_only()).collect()
}

/// A user with a token of every user scope: (id, token).
async fn user(api: &Api, name: &str) -> (String, String) {
    let u = api.auth.create_user(name, Role::User, None).await.unwrap();
    let (_, t) = api
        .auth
        .create_token(&u.id, "all", &user_scopes(), None)
        .await
        .unwrap();
    (u.id, t)
}

fn quotas(f: impl FnOnce(&mut HttpConfig)) -> HttpConfig {
    let mut c = HttpConfig::unlimited();
    f(&mut c);
    c
}

async fn connect(
    api: &Api,
    token: &str,
) -> (reqwest::StatusCode, reqwest::header::HeaderMap, Value) {
    api.call(
        Method::POST,
        "/api/v1/sessions",
        Some(token),
        &[],
        Some(json!({"provider": "codex"})),
    )
    .await
}

/// alice at her limit of one session in progress is refused with a problem
/// that names her session and what to do; bob still connects (alice holds
/// one slot of the global admission, not all of it); a finished session
/// no longer counts; concurrent creates never overshoot the limit.
async fn a_user_at_the_session_limit_is_refused_while_others_connect(db: common::TestDb) {
    let api = Api::start(
        &db,
        quotas(|c| c.max_sessions_per_user = 1),
        AuthConfig::default(),
    )
    .await;
    let (_, alice) = user(&api, "alice").await;
    let (_, bob) = user(&api, "bob").await;
    let (st, _, first) = connect(&api, &alice).await;
    assert_eq!(st, 201, "{first}");
    let first_id = first["id"].as_str().unwrap().to_string();
    let (st, h, v) = connect(&api, &alice).await;
    assert_problem((st, &h, &v), 409, "session-limit", "alice's second session");
    let detail = v["detail"].as_str().unwrap();
    assert!(
        detail.contains(&first_id) && detail.contains("cancel") && detail.contains("wait"),
        "{detail}"
    );
    let (st, _, v) = connect(&api, &bob).await;
    assert_eq!(st, 201, "bob is not held up by alice: {v}");
    // Cancelled: final, so alice may connect again.
    let (st, _, v) = api
        .call(
            Method::POST,
            &format!("/api/v1/sessions/{first_id}/cancel"),
            Some(&alice),
            &[],
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, _, v) = connect(&api, &alice).await;
    assert_eq!(st, 201, "{v}");

    // With a limit of 2, ten concurrent creates of one user give two.
    let api2 = Api::start(
        &db,
        quotas(|c| c.max_sessions_per_user = 2),
        AuthConfig::default(),
    )
    .await;
    let (carol_id, carol) = user(&api2, "carol").await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (client, base, t) = (api2.client.clone(), api2.base.clone(), carol.clone());
        tasks.push(tokio::spawn(async move {
            call(
                &client,
                &base,
                Method::POST,
                "/api/v1/sessions",
                Some(&t),
                &[],
                Some(json!({"provider": "codex"})),
            )
            .await
            .0
            .as_u16()
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap());
    }
    got.sort_unstable();
    assert_eq!(got, [201, 201, 409, 409, 409, 409, 409, 409, 409, 409]);
    assert_eq!(api2.store.sessions_of(&carol_id).await.unwrap().len(), 2);
}

async fn count(store: &Store, sql: &str, user: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sql)
        .bind(user)
        .fetch_one(store.pool())
        .await
        .unwrap();
    n
}

/// 20 concurrent creates of a user's CLI VM: exactly one 201, 19 409s with
/// a problem that says what to do, one VM row and one `created` event —
/// the losers leave nothing behind.
async fn twenty_concurrent_cli_vm_creates_give_exactly_one_vm(db: common::TestDb) {
    let api = Api::start(&db, HttpConfig::unlimited(), AuthConfig::default()).await;
    let (alice_id, alice) = user(&api, "alice").await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (client, base, t) = (api.client.clone(), api.base.clone(), alice.clone());
        tasks.push(tokio::spawn(async move {
            call(
                &client,
                &base,
                Method::POST,
                "/api/v1/vms",
                Some(&t),
                &[],
                Some(json!({"kind": "cli"})),
            )
            .await
        }));
    }
    let (mut created, mut conflicts) = (0, 0);
    for t in tasks {
        let (st, h, v) = t.await.unwrap();
        match st.as_u16() {
            201 => created += 1,
            409 => {
                assert_problem((st, &h, &v), 409, "conflict", "a losing create");
                let d = v["detail"].as_str().unwrap();
                assert!(d.contains("already have a CLI VM"), "{d}");
                conflicts += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert_eq!((created, conflicts), (1, 19));
    assert_eq!(
        count(
            &api.store,
            "SELECT COUNT(*) FROM vms WHERE user_id = $1",
            &alice_id
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &api.store,
            "SELECT COUNT(*) FROM events WHERE subject_kind = 'vm' AND user_id = $1",
            &alice_id
        )
        .await,
        1
    );
    // The store refuses a second one directly too (the driver's path).
    match api.store.create_vm(&alice_id, VmKind::Cli).await {
        Err(StoreError::Duplicate { .. }) => {}
        other => panic!("a second live CLI VM was accepted: {other:?}"),
    }
    // Browser VMs are not limited by it.
    api.store
        .create_vm(&alice_id, VmKind::Browser)
        .await
        .unwrap();
    api.store
        .create_vm(&alice_id, VmKind::Browser)
        .await
        .unwrap();
    // Once it is on its way out, a new one may be made (through the store:
    // the API also waits for `stopping` to end).
    let vm = api.store.live_cli_vm(&alice_id).await.unwrap().unwrap();
    let vm = api.store.request_vm_stop(&vm).await.unwrap();
    assert_eq!(vm.life.state, VmState::Stopping);
    api.store.create_vm(&alice_id, VmKind::Cli).await.unwrap();
}

/// Start an event stream of session `id`; the response, still open.
async fn open_sse(api: &Api, token: &str, id: &str) -> reqwest::Response {
    api.client
        .get(format!("{}/api/v1/sessions/{id}/events", api.base))
        .bearer_auth(token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap()
}

/// alice may hold two event streams; a third is a 429 problem, bob's is
/// not affected, JSON reads are not streams, and closing one gives its
/// slot back.
async fn event_streams_are_capped_per_user(db: common::TestDb) {
    let api = Api::start(
        &db,
        quotas(|c| {
            c.max_event_streams_per_user = 2;
            c.sse_poll = Duration::from_millis(50);
        }),
        AuthConfig::default(),
    )
    .await;
    let (alice_id, alice) = user(&api, "alice").await;
    let (bob_id, bob) = user(&api, "bob").await;
    let s = api.store.create_session(&alice_id, "codex").await.unwrap();
    let sb = api.store.create_session(&bob_id, "codex").await.unwrap();
    let one = open_sse(&api, &alice, &s.id).await;
    assert_eq!(one.status(), 200);
    let two = open_sse(&api, &alice, &s.id).await;
    assert_eq!(two.status(), 200);
    let three = open_sse(&api, &alice, &s.id).await;
    let st = three.status();
    // Checked before the body is read: an accepted stream never ends.
    assert_eq!(st, 429, "alice's third stream");
    let h = three.headers().clone();
    let v: Value = serde_json::from_slice(&three.bytes().await.unwrap()).unwrap();
    assert_problem(
        (st, &h, &v),
        429,
        "too-many-streams",
        "alice's third stream",
    );
    assert!(v["detail"].as_str().unwrap().contains("close one"), "{v}");
    let b = open_sse(&api, &bob, &sb.id).await;
    assert_eq!(b.status(), 200, "bob has his own streams");
    let (st, _, v) = api
        .call(
            Method::GET,
            &format!("/api/v1/sessions/{}/events", s.id),
            Some(&alice),
            &[],
            None,
        )
        .await;
    assert_eq!(st, 200, "the JSON form is not a stream: {v}");
    assert_eq!(
        api.state.streams.open(&alice_id, StreamClass::EventStream),
        2
    );
    drop(one);
    eventually(10, "the closed stream's slot is given back", || async {
        api.state.streams.open(&alice_id, StreamClass::EventStream) == 1
    })
    .await;
    let again = open_sse(&api, &alice, &s.id).await;
    assert_eq!(again.status(), 200);
    drop((two, again, b));
}

/// A WebSocket ticket of a user whose WebSocket slots are taken opens
/// nothing (429); once one is given back, the same route gets past the
/// cap. (The slot held by a live WebSocket is the same accounting the
/// event stream test follows over real connections; a live desktop needs
/// a VM.)
async fn websockets_are_capped_per_user(db: common::TestDb) {
    let api = Api::start(
        &db,
        quotas(|c| c.max_websockets_per_user = 1),
        AuthConfig::default(),
    )
    .await;
    let (alice_id, alice) = user(&api, "alice").await;
    let s = api.store.create_session(&alice_id, "codex").await.unwrap();
    let b = api
        .store
        .create_vm(&alice_id, VmKind::Browser)
        .await
        .unwrap();
    api.store
        .transition_session(
            &s,
            polydev_controller::state::SessionState::StartingVm,
            None,
            polydev_controller::store::Also {
                browser_vm_id: Some(b.id.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let held = api
        .state
        .open_stream(&alice_id, StreamClass::WebSocket)
        .unwrap();
    let upgrade = |ticket: String| {
        let url = format!(
            "{}/api/v1/sessions/{}/desktop?ticket={ticket}",
            api.base, s.id
        );
        let client = api.client.clone();
        async move {
            let r = client
                .get(url)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
                .send()
                .await
                .unwrap();
            let (st, h) = (r.status(), r.headers().clone());
            let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null);
            (st, h, v)
        }
    };
    let ticket = || {
        let (alice, id) = (alice.clone(), s.id.clone());
        let (client, base) = (api.client.clone(), api.base.clone());
        async move {
            let (st, _, v) = call(
                &client,
                &base,
                Method::POST,
                "/api/v1/tickets",
                Some(&alice),
                &[],
                Some(json!({"kind": "desktop", "resource_id": id})),
            )
            .await;
            assert_eq!(st, 201, "{v}");
            v["ticket"].as_str().unwrap().to_string()
        }
    };
    let (st, h, v) = upgrade(ticket().await).await;
    assert_problem((st, &h, &v), 429, "too-many-streams", "a second WebSocket");
    assert!(v["detail"].as_str().unwrap().contains("WebSockets"), "{v}");
    drop(held);
    // Past the cap: this browser VM was never placed, so "still starting".
    let (st, _, v) = upgrade(ticket().await).await;
    assert_eq!(st, 409, "{v}");
    assert_eq!(api.state.streams.open(&alice_id, StreamClass::WebSocket), 0);
}

/// Expired login sessions, stream tickets and login links, used tickets
/// and links, and forgotten login backoff records disappear on the purge
/// interval without any request; live ones stay.
async fn expired_logins_tickets_and_links_are_purged_in_the_background(db: common::TestDb) {
    let store = db.store.clone();
    let auth = polydev_controller::auth::Auth::new(store.clone(), AuthConfig::default()).unwrap();
    let u = auth.create_user("alice", Role::User, None).await.unwrap();
    // Old ones: a link, a login session from another link, a ticket.
    auth.create_login_link(&u.id).await.unwrap();
    let l = auth.create_login_link(&u.id).await.unwrap();
    let (p, _s) = auth.redeem_login_link(&l.token).await.unwrap();
    auth.issue_ticket(&p, "desktop", "ses-0123").await.unwrap();
    let past = now_ms() - 1000;
    for table in ["login_sessions", "stream_tickets", "login_links"] {
        sqlx::query(&format!("UPDATE {table} SET expires_at = $1"))
            .bind(past)
            .execute(store.pool())
            .await
            .unwrap();
    }
    sqlx::query(
        "INSERT INTO login_backoff (name, failures, until_at, updated_at) VALUES ('mallory', 9, $1, $2), ('eve', 9, $3, $3)",
    )
    .bind(past)
    .bind(now_ms() - 2 * 3600 * 1000)
    .bind(now_ms())
    .execute(store.pool())
    .await
    .unwrap();
    // Live ones: an unused link, a login session, a ticket.
    auth.create_login_link(&u.id).await.unwrap();
    let l2 = auth.create_login_link(&u.id).await.unwrap();
    let (p2, _s2) = auth.redeem_login_link(&l2.token).await.unwrap();
    auth.issue_ticket(&p2, "desktop", "ses-0456").await.unwrap();
    let counts = || async {
        let mut out = Vec::new();
        for t in [
            "login_sessions",
            "stream_tickets",
            "login_links",
            "login_backoff",
        ] {
            let (n,): (i64,) = sqlx::query_as(&format!("SELECT COUNT(*) FROM {t}"))
                .fetch_one(store.pool())
                .await
                .unwrap();
            out.push(n);
        }
        out
    };
    assert_eq!(counts().await, [2, 2, 4, 2]);
    let _api = Api::start(
        &db,
        quotas(|c| c.purge_interval = Duration::from_millis(100)),
        AuthConfig::default(),
    )
    .await;
    // No request is made: only the server's own task can remove them.
    eventually(15, "the expired rows are purged", || async {
        counts().await == [1, 1, 1, 1]
    })
    .await;
    // The live ones are the ones left, and still work.
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM login_backoff WHERE name = 'eve'")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(n, 1, "a backoff still in force is kept");
    let (n,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM login_links WHERE used_at IS NULL AND expires_at > $1",
    )
    .bind(now_ms())
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(n, 1);
}

/// A database that got two live CLI VMs for one user through the old race
/// is settled by migration 4: the older one goes to `stopping` (with its
/// event; the driver then destroys it), the newer one stays, other users'
/// VMs are untouched, and from then on the index holds.
async fn migration_4_settles_duplicate_cli_vms(db: common::TestDb) {
    let s = &db.store;
    let alice = s.create_user("alice", "user").await.unwrap();
    let bob = s.create_user("bob", "user").await.unwrap();
    // Back to version 3, where nothing stopped a second CLI VM.
    for sql in [
        "DROP INDEX vms_one_cli_per_user",
        "DROP TABLE login_backoff",
        "DELETE FROM schema_migrations WHERE version = 4",
    ] {
        sqlx::query(sql).execute(s.pool()).await.unwrap();
    }
    let old = s.create_vm(&alice.id, VmKind::Cli).await.unwrap();
    let new = s.create_vm(&alice.id, VmKind::Cli).await.unwrap();
    sqlx::query("UPDATE vms SET created_at = created_at - 1000 WHERE id = $1")
        .bind(&old.id)
        .execute(s.pool())
        .await
        .unwrap();
    let bobs = s.create_vm(&bob.id, VmKind::Cli).await.unwrap();
    let browser = s.create_vm(&alice.id, VmKind::Browser).await.unwrap();
    let s2 = db.reopen().await;
    let old2 = s2.vm(&old.id).await.unwrap();
    assert_eq!(old2.life.state, VmState::Stopping);
    assert_eq!(old2.life.version, old.life.version + 1);
    let ev = s2.events_for("vm", &old.id).await.unwrap();
    let last = ev.last().unwrap();
    assert_eq!(
        (
            last.kind.as_str(),
            last.from_state.as_deref(),
            last.to_state.as_deref()
        ),
        ("state", Some("pending"), Some("stopping"))
    );
    for (v, what) in [
        (&new, "the newer one"),
        (&bobs, "bob's"),
        (&browser, "a browser VM"),
    ] {
        assert_eq!(s2.vm(&v.id).await.unwrap(), *v, "{what} is untouched");
    }
    match s2.create_vm(&alice.id, VmKind::Cli).await {
        Err(StoreError::Duplicate { .. }) => {}
        other => panic!("the index is not in force: {other:?}"),
    }
}
