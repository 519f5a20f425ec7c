//! What the dashboard relies on, over the real HTTP API on SQLite and on a
//! real PostgreSQL: the page and its security headers at `/`, the admin
//! views of every user's VMs and sessions, and state-changing requests
//! refused from another origin unless they carry JSON.

mod common;

use common::api::{assert_problem, call, set_cookie, Api};
use polydev_controller::auth::{AuthConfig, Role, Scope};
use polydev_controller::http::HttpConfig;
use polydev_controller::state::{FailureReason, SessionState};
use polydev_controller::store::{Also, VmKind};
use reqwest::Method;
use serde_json::json;

both_backends!(
    the_page_and_every_answer_carry_a_strict_policy,
    admins_see_every_users_vms_and_sessions_counted,
    state_changes_from_another_origin_need_json_and_change_nothing,
    a_login_link_lets_someone_who_lost_their_password_set_a_new_one,
);

async fn the_page_and_every_answer_carry_a_strict_policy(db: common::TestDb) {
    let api = Api::start(&db, HttpConfig::default(), AuthConfig::default()).await;
    let r = api
        .client
        .get(format!("{}/", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    let csp = h["content-security-policy"].to_str().unwrap().to_string();
    for part in [
        "script-src 'self'",
        "frame-ancestors 'none'",
        "object-src 'none'",
        "connect-src 'self'",
    ] {
        assert!(csp.contains(part), "{part} in {csp}");
    }
    assert!(!csp.contains("unsafe-eval"), "{csp}");
    assert!(
        !csp.split(';')
            .any(|d| d.trim().starts_with("script-src") && d.contains("unsafe-inline")),
        "{csp}"
    );
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));
    let page = r.text().await.unwrap();
    assert!(page.contains("<html lang=\"en\""), "{page}");
    // No inline script: every <script> names its file.
    for tag in page.split("<script").skip(1) {
        let head = tag.split('>').next().unwrap_or("");
        assert!(
            head.contains("src="),
            "an inline script in the page: <script{head}>"
        );
    }
    // Each asset the page names is served, cacheable for good.
    let mut assets = 0;
    for part in page.split("\"/assets/").skip(1) {
        let name = part.split('"').next().unwrap();
        let r = api
            .client
            .get(format!("{}/assets/{name}", api.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
        assert!(r.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("immutable"));
        assets += 1;
    }
    assert_eq!(
        assets > 0,
        polydev_web::built(),
        "the built page names its assets"
    );
    // The API's answers allow nothing to run or frame them.
    let (st, h, _) = api.call(Method::GET, "/healthz", None, &[], None).await;
    assert_eq!(st, 200);
    assert_eq!(
        h["content-security-policy"],
        "default-src 'none'; frame-ancestors 'none'"
    );
    // Anything else is a problem, not the page.
    let (st, h, v) = api
        .call(Method::GET, "/assets/../Cargo.toml", None, &[], None)
        .await;
    assert_problem(
        (st, &h, &v),
        404,
        "no-such-route",
        "a path out of the assets",
    );
    let (st, h, v) = api
        .call(Method::GET, "/nothing-here.js", None, &[], None)
        .await;
    assert_problem((st, &h, &v), 404, "no-such-route", "an unknown file");
}

async fn admins_see_every_users_vms_and_sessions_counted(db: common::TestDb) {
    let api = Api::start(&db, HttpConfig::unlimited(), AuthConfig::default()).await;
    let a = &api.auth;
    let alice = a.create_user("alice", Role::User, None).await.unwrap();
    let bob = a.create_user("bob", Role::User, None).await.unwrap();
    let admin = a.create_user("root", Role::Admin, None).await.unwrap();
    let (_, admin_token) = a
        .create_token(&admin.id, "all", &Scope::ALL, None)
        .await
        .unwrap();
    let user_scopes: Vec<Scope> = Scope::ALL.into_iter().filter(|s| !s.admin_only()).collect();
    let (_, bob_token) = a
        .create_token(&bob.id, "all", &user_scopes, None)
        .await
        .unwrap();

    let s = &api.store;
    let vm_a = s.create_vm(&alice.id, VmKind::Cli).await.unwrap();
    let vm_b = s.create_vm(&bob.id, VmKind::Browser).await.unwrap();
    let failed = s.create_session(&alice.id, "codex").await.unwrap();
    s.transition_session(
        &failed,
        SessionState::Failed,
        Some(polydev_controller::state::Failure {
            reason: FailureReason::Timeout,
            detail: "the person never signed in".into(),
        }),
        Also::default(),
    )
    .await
    .unwrap();
    s.create_session(&bob.id, "codex").await.unwrap();
    s.create_session(&bob.id, "claude-code").await.unwrap();

    let (st, _, v) = api
        .call(
            Method::GET,
            "/api/v1/admin/vms",
            Some(&admin_token),
            &[],
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{v}");
    let find = |id: &str| rows.iter().find(|r| r["id"] == id).unwrap().clone();
    let (ra, rb) = (find(&vm_a.id), find(&vm_b.id));
    assert_eq!(ra["owner_name"], "alice");
    assert_eq!(ra["owner_id"], alice.id.as_str());
    assert_eq!(ra["kind"], "cli");
    assert_eq!(ra["state"], "pending");
    assert_eq!(rb["owner_name"], "bob");
    // Nothing at a host here: no shape to report.
    assert!(ra["memory_mib"].is_null() && ra["vcpus"].is_null(), "{ra}");

    let (st, _, v) = api
        .call(
            Method::GET,
            "/api/v1/admin/sessions/summary",
            Some(&admin_token),
            &[],
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v,
        json!({"by_state": {"failed": 1, "requested": 2}, "failures_by_reason": {"timeout": 1}})
    );

    // Users get neither.
    for path in ["/api/v1/admin/vms", "/api/v1/admin/sessions/summary"] {
        let (st, h, v) = api
            .call(Method::GET, path, Some(&bob_token), &[], None)
            .await;
        assert_problem((st, &h, &v), 403, "forbidden", path);
    }
    // A log name that is not one is refused before anything is looked up.
    let (st, h, v) = api
        .call(
            Method::GET,
            &format!("/api/v1/admin/vms/{}/logs/shadow", vm_a.id),
            Some(&admin_token),
            &[],
            None,
        )
        .await;
    assert!(st == 400 || st == 422, "{st} {v}");
    assert!(h["content-type"].to_str().unwrap().contains("problem"));
}

async fn state_changes_from_another_origin_need_json_and_change_nothing(db: common::TestDb) {
    let api = Api::start(&db, HttpConfig::unlimited(), AuthConfig::default()).await;
    let alice = api
        .auth
        .create_user("alice", Role::User, Some("correct horse battery staple"))
        .await
        .unwrap();
    // Logged in with a password: the browser holds the cookie.
    let (st, h, v) = api
        .call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            &[],
            Some(json!({"name": "alice", "password": "correct horse battery staple"})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let cookie = set_cookie(&h).expect("the session cookie");
    // What a page of another origin can send without a preflight: a form
    // or plain text, with the cookie.
    for (ctype, body) in [
        ("application/x-www-form-urlencoded", "provider=codex"),
        ("text/plain", "{\"provider\":\"codex\"}"),
        (
            "multipart/form-data; boundary=x",
            "--x\r\nContent-Disposition: form-data; name=\"provider\"\r\n\r\ncodex\r\n--x--\r\n",
        ),
    ] {
        for path in ["/api/v1/sessions", "/api/v1/tokens", "/api/v1/vms"] {
            let r = api
                .client
                .post(format!("{}{path}", api.base))
                .header("cookie", &cookie)
                .header("origin", "http://127.0.0.1:9")
                .header("content-type", ctype)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 415, "{path} as {ctype}");
            assert!(r.headers().get("access-control-allow-origin").is_none());
        }
    }
    assert!(api.store.sessions_of(&alice.id).await.unwrap().is_empty());
    assert!(api.store.vms_of(&alice.id).await.unwrap().is_empty());
    assert!(api.auth.list_tokens(&alice.id).await.unwrap().is_empty());
    // The same request as JSON from the page's own origin works.
    let (st, _, v) = call(
        &api.client,
        &api.base,
        Method::POST,
        "/api/v1/sessions",
        None,
        &[("cookie", &cookie)],
        Some(json!({"provider": "codex"})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
}

async fn a_login_link_lets_someone_who_lost_their_password_set_a_new_one(db: common::TestDb) {
    let api = Api::start(&db, HttpConfig::unlimited(), AuthConfig::default()).await;
    let old = "the password nobody remembers";
    let bob = api
        .auth
        .create_user("bob", Role::User, Some(old))
        .await
        .unwrap();
    let login = |name: &str, password: &str| {
        let body = json!({"name": name, "password": password});
        let api = &api;
        async move {
            let (st, h, _) = api
                .call(Method::POST, "/api/v1/auth/login", None, &[], Some(body))
                .await;
            (st, set_cookie(&h))
        }
    };
    // A session that a password started must prove the old password.
    let (st, cookie) = login("bob", old).await;
    assert_eq!(st, 200);
    let cookie = cookie.unwrap();
    let (st, h, v) = api
        .call(
            Method::PUT,
            "/api/v1/me/password",
            None,
            &[("cookie", &cookie)],
            Some(json!({"new_password": "an attacker with a borrowed laptop"})),
        )
        .await;
    assert_problem((st, &h, &v), 422, "invalid", "no current password");

    // The administrator's one-time link: its session sets a new one.
    let link = api.auth.create_login_link(&bob.id).await.unwrap();
    let (st, h, v) = api
        .call(
            Method::POST,
            "/api/v1/auth/link",
            None,
            &[],
            Some(json!({"token": link.token.to_string()})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let linked = set_cookie(&h).expect("the session cookie");
    let new = "a fresh passphrase for bob";
    let (st, _, v) = api
        .call(
            Method::PUT,
            "/api/v1/me/password",
            None,
            &[("cookie", &linked)],
            Some(json!({"new_password": new})),
        )
        .await;
    assert_eq!(st, 204, "{v}");
    assert_eq!(login("bob", old).await.0, 401);
    assert_eq!(login("bob", new).await.0, 200);
    // Every session of the account ended, the password one included.
    let (st, _, _) = api
        .call(
            Method::GET,
            "/api/v1/me",
            None,
            &[("cookie", &cookie)],
            None,
        )
        .await;
    assert_eq!(st, 401);
}
