//! Accounts and authorization, on SQLite and on a real PostgreSQL server.
//! Time is moved by editing the stored timestamps (never by sleeping).

mod common;

use common::{contains, files_in};

use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue};
use polydev_controller::auth::{
    Auth, AuthConfig, AuthError, AuthMethod, Principal, Role, Scope, SESSION_COOKIE,
};
use polydev_controller::util::now_ms;

const PW: &str = "correct horse battery staple";

both_backends!(
    password_login,
    account_input_is_validated,
    session_expiry_and_logout,
    token_scopes_and_last_use,
    token_expiry_and_revocation,
    tokens_are_private_to_their_owner,
    bearer_is_never_masked_by_cookie,
    secrets_are_hashed_at_rest,
    ticket_single_use,
    ticket_binding_and_expiry,
    bootstrap_once_and_login_link_single_use,
    concurrent_bootstrap_creates_one_admin,
    roles_change_but_the_last_admin_stays,
    jwt_valid_token_provisions_once,
    jwt_wrong_audience_issuer_or_signature,
    jwt_expired,
    jwt_key_rotation_picked_up_by_refetch,
    jwt_refetch_is_rate_limited,
    jwt_old_cache_refreshes_and_survives_an_outage,
    jwt_unreachable_jwks,
);

fn auth(db: &common::TestDb) -> Auth {
    Auth::new(db.store.clone(), AuthConfig::default()).unwrap()
}

fn bearer(t: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
    );
    h
}

fn cookie(v: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::COOKIE,
        HeaderValue::from_str(&format!("theme=dark; {SESSION_COOKIE}={v}")).unwrap(),
    );
    h
}

fn unauthenticated<T: std::fmt::Debug>(r: Result<T, AuthError>) {
    match r {
        Err(AuthError::Unauthenticated) => {}
        other => panic!("expected Unauthenticated, got {other:?}"),
    }
}

async fn password_login(db: common::TestDb) {
    let a = auth(&db);
    let u = a.create_user("alice", Role::User, Some(PW)).await.unwrap();
    a.create_user("nopass", Role::User, None).await.unwrap();

    let (p, s) = a.login("alice", PW).await.unwrap();
    assert_eq!(p.user_id, u.id);
    assert_eq!(p.role, Role::User);
    assert_eq!(p.scopes, Role::User.scopes());
    assert!(!p.is_admin());
    assert!(s.expires_at > now_ms());
    let again = a.authenticate(&cookie(&s.cookie_value)).await.unwrap();
    assert_eq!(again.user_id, u.id);
    assert_eq!(again.via, AuthMethod::Cookie);

    unauthenticated(a.login("alice", "correct horse battery stapler").await);
    unauthenticated(a.login("bob", PW).await);
    unauthenticated(a.login("nopass", "").await);
    unauthenticated(a.login("nopass", PW).await);
    unauthenticated(a.login("alice", &"x".repeat(5000)).await);
    // The stored hash is argon2id, never the password.
    let (h,): (String,) = sqlx::query_as("SELECT password_hash FROM users WHERE id = $1")
        .bind(&u.id)
        .fetch_one(db.store.pool())
        .await
        .unwrap();
    assert!(h.starts_with("$argon2id$"), "{h}");
    assert!(!h.contains("horse"));

    // A new password works, the old one doesn't, and old sessions end.
    a.set_password(&u.id, "another long passphrase here")
        .await
        .unwrap();
    unauthenticated(a.authenticate(&cookie(&s.cookie_value)).await);
    unauthenticated(a.login("alice", PW).await);
    a.login("alice", "another long passphrase here")
        .await
        .unwrap();
    assert!(matches!(
        a.set_password("usr-nobody", PW).await,
        Err(AuthError::NotFound)
    ));
    let users = a.list_users().await.unwrap();
    assert_eq!(
        users.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(),
        ["alice", "nopass"]
    );
    let ev = db.store.events_for("user", &u.id).await.unwrap();
    let kinds: Vec<&str> = ev.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["created", "password_set"]);
    assert!(!ev.iter().any(|e| e.detail.to_string().contains("horse")));
}

async fn account_input_is_validated(db: common::TestDb) {
    let a = auth(&db);
    for bad in ["", "Alice", "a b", "../etc", "-x"] {
        match a.create_user(bad, Role::User, Some(PW)).await {
            Err(AuthError::Invalid(m)) => assert!(m.contains("a-z"), "{m}"),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    match a.create_user("bob", Role::User, Some("short")).await {
        Err(AuthError::Invalid(m)) => assert!(m.contains("at least 15"), "{m}"),
        other => panic!("{other:?}"),
    }
    a.create_user("bob", Role::User, Some(PW)).await.unwrap();
    match a.create_user("bob", Role::Admin, None).await {
        Err(AuthError::Conflict(m)) => assert!(m.contains("taken"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Nothing half-created.
    assert_eq!(a.list_users().await.unwrap().len(), 1);
}

async fn session_expiry_and_logout(db: common::TestDb) {
    let a = auth(&db);
    a.create_user("alice", Role::User, Some(PW)).await.unwrap();
    let pool = db.store.pool();
    let count = || async {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM login_sessions")
            .fetch_one(pool)
            .await
            .unwrap();
        n
    };

    // Absolute expiry.
    let (_, s) = a.login("alice", PW).await.unwrap();
    a.authenticate(&cookie(&s.cookie_value)).await.unwrap();
    sqlx::query("UPDATE login_sessions SET expires_at = $1")
        .bind(now_ms() - 1)
        .execute(pool)
        .await
        .unwrap();
    unauthenticated(a.authenticate(&cookie(&s.cookie_value)).await);
    assert_eq!(count().await, 0, "an expired session is deleted when seen");

    // Idle expiry: last use longer ago than session_idle.
    let (_, s) = a.login("alice", PW).await.unwrap();
    let idle = i64::try_from(AuthConfig::default().session_idle.as_millis()).unwrap();
    sqlx::query("UPDATE login_sessions SET last_seen_at = $1")
        .bind(now_ms() - idle - 1)
        .execute(pool)
        .await
        .unwrap();
    unauthenticated(a.authenticate(&cookie(&s.cookie_value)).await);

    // Use refreshes the idle clock.
    let (_, s) = a.login("alice", PW).await.unwrap();
    let old = now_ms() - idle + 60_000;
    sqlx::query("UPDATE login_sessions SET last_seen_at = $1")
        .bind(old)
        .execute(pool)
        .await
        .unwrap();
    a.authenticate(&cookie(&s.cookie_value)).await.unwrap();
    let (seen,): (i64,) = sqlx::query_as("SELECT last_seen_at FROM login_sessions")
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(seen > old + 60_000 - 1000, "idle clock refreshed");

    // Logout deletes it; logout is idempotent; junk cookies are refused.
    a.logout(&s.cookie_value).await.unwrap();
    unauthenticated(a.authenticate(&cookie(&s.cookie_value)).await);
    a.logout(&s.cookie_value).await.unwrap();
    assert_eq!(count().await, 0);
    unauthenticated(a.authenticate(&cookie("nonsense")).await);
    unauthenticated(a.authenticate(&cookie("a b;c")).await);
    unauthenticated(a.authenticate(&HeaderMap::new()).await);

    // purge_expired removes what can no longer be used.
    let (_, s2) = a.login("alice", PW).await.unwrap();
    a.login("alice", PW).await.unwrap();
    sqlx::query("UPDATE login_sessions SET expires_at = $1 WHERE id_hash <> $2")
        .bind(now_ms() - 1)
        .bind(sha256_hex(&s2.cookie_value))
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(a.purge_expired().await.unwrap(), 1);
    a.authenticate(&cookie(&s2.cookie_value)).await.unwrap();
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

async fn token_scopes_and_last_use(db: common::TestDb) {
    let a = auth(&db);
    let u = a.create_user("alice", Role::User, Some(PW)).await.unwrap();
    let (info, token) = a
        .create_token(
            &u.id,
            "ci",
            &[
                Scope::SessionsRead,
                Scope::StreamsConnect,
                Scope::SessionsRead,
            ],
            None,
        )
        .await
        .unwrap();
    assert!(token.starts_with("pdt_"), "recognisable prefix");
    assert!(token.contains(info.id.trim_start_matches("tok-")));
    assert_eq!(
        info.scopes,
        vec![Scope::SessionsRead, Scope::StreamsConnect]
    );
    assert_eq!(info.last_used_at, None);
    assert!(!format!("{info:?}").contains(&token[20..]));

    let p = a.authenticate(&bearer(&token)).await.unwrap();
    assert_eq!(p.user_id, u.id);
    assert_eq!(
        p.via,
        AuthMethod::ApiToken {
            token_id: info.id.clone()
        }
    );
    assert!(p.allows(Scope::SessionsRead));
    assert!(!p.allows(Scope::SessionsWrite));
    assert!(!p.allows(Scope::Admin));
    match p.require(Scope::VmsWrite) {
        Err(AuthError::Forbidden { scope }) => assert_eq!(scope, "vms:write"),
        other => panic!("{other:?}"),
    }
    let listed = a.list_tokens(&u.id).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].last_used_at.is_some_and(|t| t >= info.created_at));

    // Scope rules: none is invalid; admin only for admins.
    assert!(matches!(
        a.create_token(&u.id, "x", &[], None).await,
        Err(AuthError::Invalid(_))
    ));
    match a.create_token(&u.id, "x", &[Scope::Admin], None).await {
        Err(AuthError::Forbidden { scope }) => assert_eq!(scope, "admin"),
        other => panic!("{other:?}"),
    }
    let root = a.create_user("root", Role::Admin, Some(PW)).await.unwrap();
    let (_, admin_tok) = a
        .create_token(&root.id, "ops", &[Scope::Admin], None)
        .await
        .unwrap();
    let ap = a.authenticate(&bearer(&admin_tok)).await.unwrap();
    assert!(ap.is_admin());
    let (_, narrow) = a
        .create_token(&root.id, "ro", &[Scope::VmsRead], None)
        .await
        .unwrap();
    assert!(
        !a.authenticate(&bearer(&narrow)).await.unwrap().is_admin(),
        "an admin's token without the admin scope is not an admin credential"
    );
    // Demoting the admin takes the admin scope away from old tokens.
    sqlx::query("UPDATE users SET role = 'user' WHERE id = $1")
        .bind(&root.id)
        .execute(db.store.pool())
        .await
        .unwrap();
    let demoted = a.authenticate(&bearer(&admin_tok)).await.unwrap();
    assert!(!demoted.is_admin() && !demoted.allows(Scope::Admin));
}

async fn token_expiry_and_revocation(db: common::TestDb) {
    let a = auth(&db);
    let u = a.create_user("alice", Role::User, Some(PW)).await.unwrap();
    match a
        .create_token(&u.id, "old", &[Scope::VmsRead], Some(now_ms() - 1))
        .await
    {
        Err(AuthError::Invalid(m)) => assert!(m.contains("past"), "{m}"),
        other => panic!("{other:?}"),
    }
    let (info, token) = a
        .create_token(&u.id, "soon", &[Scope::VmsRead], Some(now_ms() + 3_600_000))
        .await
        .unwrap();
    a.authenticate(&bearer(&token)).await.unwrap();
    sqlx::query("UPDATE api_tokens SET expires_at = $1 WHERE id = $2")
        .bind(now_ms() - 1)
        .bind(&info.id)
        .execute(db.store.pool())
        .await
        .unwrap();
    unauthenticated(a.authenticate(&bearer(&token)).await);

    let (info, token) = a
        .create_token(&u.id, "live", &[Scope::VmsRead], None)
        .await
        .unwrap();
    a.authenticate(&bearer(&token)).await.unwrap();
    a.revoke_token(&u.id, &info.id).await.unwrap();
    unauthenticated(a.authenticate(&bearer(&token)).await);
    a.revoke_token(&u.id, &info.id).await.unwrap(); // idempotent
    let listed = a.list_tokens(&u.id).await.unwrap();
    assert!(listed
        .iter()
        .any(|t| t.id == info.id && t.revoked_at.is_some()));

    // Tampered or malformed tokens.
    let mut tampered = token.clone().into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    unauthenticated(
        a.authenticate(&bearer(&String::from_utf8(tampered).unwrap()))
            .await,
    );
    for junk in ["pdt_", "pdt_zz_zz", "not-a-token", "a.b.c"] {
        unauthenticated(a.authenticate(&bearer(junk)).await);
    }
    let mut basic = HeaderMap::new();
    basic.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Basic YTpi"),
    );
    unauthenticated(a.authenticate(&basic).await);
    let ev = db.store.events_for("api_token", &info.id).await.unwrap();
    assert_eq!(
        ev.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["created", "revoked"]
    );
}

async fn tokens_are_private_to_their_owner(db: common::TestDb) {
    let a = auth(&db);
    let alice = a.create_user("alice", Role::User, Some(PW)).await.unwrap();
    let bob = a.create_user("bob", Role::User, Some(PW)).await.unwrap();
    let (info, token) = a
        .create_token(&alice.id, "mine", &[Scope::VmsRead], None)
        .await
        .unwrap();
    assert!(matches!(
        a.revoke_token(&bob.id, &info.id).await,
        Err(AuthError::NotFound)
    ));
    assert!(matches!(
        a.revoke_token(&bob.id, "tok-0000000000000000").await,
        Err(AuthError::NotFound)
    ));
    assert!(a.list_tokens(&bob.id).await.unwrap().is_empty());
    // Bob's attempt changed nothing.
    a.authenticate(&bearer(&token)).await.unwrap();
}

async fn bearer_is_never_masked_by_cookie(db: common::TestDb) {
    let a = auth(&db);
    a.create_user("alice", Role::User, Some(PW)).await.unwrap();
    let (_, s) = a.login("alice", PW).await.unwrap();
    let mut h = cookie(&s.cookie_value);
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static(
            "Bearer pdt_0000000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ),
    );
    unauthenticated(a.authenticate(&h).await);
    // A JWT-shaped bearer without JWT configuration is refused too.
    unauthenticated(a.authenticate(&bearer("eyJh.eyJz.c2ln")).await);
}

async fn secrets_are_hashed_at_rest(db: common::TestDb) {
    let a = auth(&db);
    let u = a.create_user("alice", Role::User, Some(PW)).await.unwrap();
    let (_, token) = a
        .create_token(&u.id, "ci", &[Scope::StreamsConnect], None)
        .await
        .unwrap();
    let (p, s) = a.login("alice", PW).await.unwrap();
    let ticket = a.issue_ticket(&p, "terminal", "vm-1").await.unwrap();
    let link = a.bootstrap_admin().await.unwrap().unwrap();
    let secrets: Vec<String> = vec![
        token.clone(),
        token[21..].to_string(), // the secret part alone
        s.cookie_value.clone(),
        ticket.value.clone(),
        link.token.clone(),
        PW.to_string(),
    ];
    let hashes = [sha256_hex(&token), sha256_hex(&s.cookie_value)];

    let Some(path) = db.sqlite_path.clone() else {
        // PostgreSQL: every text column of every auth table, through SQL.
        let mut seen_hash = false;
        for (table, cols) in [
            ("api_tokens", "id || name || token_hash || scopes"),
            ("login_sessions", "id_hash || user_id"),
            ("stream_tickets", "ticket_hash || kind || resource_id"),
            ("login_links", "token_hash || user_id"),
            ("users", "name || COALESCE(password_hash, '')"),
            ("events", "detail"),
        ] {
            let rows: Vec<(String,)> = sqlx::query_as(&format!("SELECT {cols} FROM {table}"))
                .fetch_all(db.store.pool())
                .await
                .unwrap();
            for (r,) in rows {
                for sec in &secrets {
                    assert!(!r.contains(sec.as_str()), "secret in {table}");
                }
                seen_hash |= hashes.iter().any(|h| r.contains(h.as_str()));
            }
        }
        assert!(seen_hash, "the check saw the stored hashes");
        return;
    };
    db.store.close().await;
    let dir = path.parent().unwrap();
    let mut seen_hash = false;
    for (p, bytes) in files_in(dir) {
        for sec in &secrets {
            assert!(
                !contains(&bytes, sec.as_bytes()),
                "a secret is stored in {}",
                p.display()
            );
        }
        seen_hash |= hashes.iter().any(|h| contains(&bytes, h.as_bytes()));
    }
    assert!(
        seen_hash,
        "the grep saw the stored hashes (it reads the data)"
    );
}

async fn ticket_single_use(db: common::TestDb) {
    let a = auth(&db);
    let u = a.create_user("alice", Role::User, Some(PW)).await.unwrap();
    let (_, token) = a
        .create_token(&u.id, "streams", &[Scope::StreamsConnect], None)
        .await
        .unwrap();
    let p = a.authenticate(&bearer(&token)).await.unwrap();
    let t = a.issue_ticket(&p, "desktop", "ses-1").await.unwrap();
    assert!(t.expires_at > now_ms());
    // Many concurrent redeems: exactly one wins.
    let value = Arc::new(t.value.clone());
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (a, v) = (a.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            a.redeem_ticket(&v, "desktop", "ses-1").await
        }));
    }
    let mut wins: Vec<Principal> = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(p) => wins.push(p),
            Err(AuthError::Unauthenticated) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(wins.len(), 1, "exactly one redeem wins");
    let w = &wins[0];
    assert_eq!(w.user_id, u.id);
    assert_eq!(w.scopes, vec![Scope::StreamsConnect]);
    assert_eq!(
        w.via,
        AuthMethod::Ticket {
            kind: "desktop".into(),
            resource_id: "ses-1".into()
        }
    );
    unauthenticated(a.redeem_ticket(&value, "desktop", "ses-1").await);
}

async fn ticket_binding_and_expiry(db: common::TestDb) {
    let a = auth(&db);
    let u = a.create_user("alice", Role::User, Some(PW)).await.unwrap();
    let (_, s) = a.login("alice", PW).await.unwrap();
    let p = a.authenticate(&cookie(&s.cookie_value)).await.unwrap();
    let t = a.issue_ticket(&p, "terminal", "vm-a").await.unwrap();
    unauthenticated(a.redeem_ticket(&t.value, "terminal", "vm-b").await);
    unauthenticated(a.redeem_ticket(&t.value, "desktop", "vm-a").await);
    unauthenticated(a.redeem_ticket("pdk_garbage", "terminal", "vm-a").await);
    // The right stream still works after the wrong attempts.
    a.redeem_ticket(&t.value, "terminal", "vm-a").await.unwrap();

    let t = a.issue_ticket(&p, "terminal", "vm-a").await.unwrap();
    sqlx::query("UPDATE stream_tickets SET expires_at = $1 WHERE used_at IS NULL")
        .bind(now_ms() - 1)
        .execute(db.store.pool())
        .await
        .unwrap();
    unauthenticated(a.redeem_ticket(&t.value, "terminal", "vm-a").await);

    // Without streams:connect, no ticket.
    let (_, token) = a
        .create_token(&u.id, "ro", &[Scope::VmsRead], None)
        .await
        .unwrap();
    let ro = a.authenticate(&bearer(&token)).await.unwrap();
    match a.issue_ticket(&ro, "terminal", "vm-a").await {
        Err(AuthError::Forbidden { scope }) => assert_eq!(scope, "streams:connect"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        a.issue_ticket(&p, "terminal", "../../etc").await,
        Err(AuthError::Invalid(_))
    ));
}

async fn bootstrap_once_and_login_link_single_use(db: common::TestDb) {
    let a = auth(&db);
    let link = a
        .bootstrap_admin()
        .await
        .unwrap()
        .expect("first start makes an admin");
    assert_eq!(link.user_name, "admin");
    assert!(link.token.starts_with("pdl_"));
    let day = 24 * 3600 * 1000;
    assert!(link.expires_at > now_ms() + day - 60_000 && link.expires_at <= now_ms() + day);
    assert!(!format!("{link:?}").contains(&link.token));
    assert!(a.bootstrap_admin().await.unwrap().is_none(), "only once");

    let (p, s) = a.redeem_login_link(&link.token).await.unwrap();
    assert_eq!(p.role, Role::Admin);
    assert!(p.is_admin());
    assert_eq!(p.via, AuthMethod::LoginLink);
    let via_cookie = a.authenticate(&cookie(&s.cookie_value)).await.unwrap();
    assert!(via_cookie.is_admin());
    unauthenticated(a.redeem_login_link(&link.token).await);
    // The admin has no password until they set one.
    unauthenticated(a.login("admin", "").await);
    a.set_password(&p.user_id, PW).await.unwrap();
    a.login("admin", PW).await.unwrap();

    // An expired link is refused.
    let l2 = a.create_login_link(&p.user_id).await.unwrap();
    sqlx::query("UPDATE login_links SET expires_at = $1 WHERE used_at IS NULL")
        .bind(now_ms() - 1)
        .execute(db.store.pool())
        .await
        .unwrap();
    unauthenticated(a.redeem_login_link(&l2.token).await);
    unauthenticated(a.redeem_login_link("pdl_nothing").await);
    // Still one admin, still nothing to bootstrap after a restart.
    let b = Auth::new(db.reopen().await, AuthConfig::default()).unwrap();
    assert!(b.bootstrap_admin().await.unwrap().is_none());
    assert_eq!(b.list_users().await.unwrap().len(), 1);
}

async fn concurrent_bootstrap_creates_one_admin(db: common::TestDb) {
    let a = auth(&db);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move { a.bootstrap_admin().await }));
    }
    let mut links = 0;
    for t in tasks {
        if t.await.unwrap().unwrap().is_some() {
            links += 1;
        }
    }
    assert_eq!(links, 1);
    let admins: Vec<_> = a
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .filter(|u| u.role == "admin")
        .collect();
    assert_eq!(admins.len(), 1);
}

async fn roles_change_but_the_last_admin_stays(db: common::TestDb) {
    let a = auth(&db);
    let root = a.create_user("root", Role::Admin, Some(PW)).await.unwrap();
    let bob = a.create_user("bob", Role::User, Some(PW)).await.unwrap();
    match a.set_role(&root.id, Role::User).await {
        Err(AuthError::Conflict(m)) => assert!(m.contains("last admin"), "{m}"),
        other => panic!("{other:?}"),
    }
    a.set_role(&bob.id, Role::Admin).await.unwrap();
    let (p, _) = a.login("bob", PW).await.unwrap();
    assert!(p.is_admin());
    a.set_role(&root.id, Role::User).await.unwrap();
    let (p, _) = a.login("root", PW).await.unwrap();
    assert!(!p.is_admin() && !p.scopes.contains(&Scope::Admin));
    assert!(matches!(
        a.set_role("usr-nobody", Role::User).await,
        Err(AuthError::NotFound)
    ));
    let kinds: Vec<String> = db
        .store
        .events_for("user", &bob.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["created", "role_set"]);
}

// ---- JWTs from a real OpenID Connect provider --------------------------------

mod oidc {
    //! panva/oidc-provider (tests/oidc/server.js) under `node`, on loopback.

    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    pub struct Oidc {
        child: Child,
        pub port: u16,
        dir: PathBuf,
        secret: String,
    }

    fn server_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/oidc")
    }

    impl Oidc {
        /// Start the provider; `port` 0 picks a free one. Keys live in `dir`.
        pub fn start(dir: &Path, port: u16, rotate: bool) -> Oidc {
            let node_ok = Command::new("node")
                .arg("--version")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            assert!(
                node_ok,
                "`node` not found: the JWT tests run a real OpenID Connect provider on Node.js >= 20.19; run ./polydev.sh setup (installs nodejs and npm, then `npm ci --prefix tests/oidc`)"
            );
            let srv = server_dir();
            assert!(
                srv.join("node_modules/oidc-provider/package.json").exists(),
                "tests/oidc/node_modules is missing: run ./polydev.sh setup (or `npm ci --prefix tests/oidc`)"
            );
            let mut secret = [0u8; 24];
            getrandom::fill(&mut secret).unwrap();
            let secret = hex::encode(secret);
            let mut cmd = Command::new("node");
            cmd.arg(srv.join("server.js"))
                .args(["--port", &port.to_string(), "--keys"])
                .arg(dir.join("keys.json"))
                .env("OIDC_CLIENT_SECRET", &secret)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(dir.join("oidc.log")).unwrap());
            if rotate {
                cmd.arg("--rotate");
            }
            // SAFETY: prctl is async-signal-safe; the provider dies with the test.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let mut child = cmd.spawn().expect("spawn node");
            // Ready when it says so (it prints after binding).
            let stdout = child.stdout.take().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                let first = lines.next().and_then(|l| l.ok());
                let _ = tx.send(first);
                for _ in lines {}
            });
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .ok()
                .flatten()
                .unwrap_or_else(|| {
                    panic!(
                        "the OIDC provider did not start: {}",
                        std::fs::read_to_string(dir.join("oidc.log")).unwrap_or_default()
                    )
                });
            let port: u16 = line
                .strip_prefix("listening http://127.0.0.1:")
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("unexpected first line from the provider: {line}"));
            Oidc {
                child,
                port,
                dir: dir.to_path_buf(),
                secret,
            }
        }

        /// Stop and start again on the same port with a new key pair in front.
        pub fn rotate(mut self) -> Oidc {
            let (dir, port) = (self.dir.clone(), self.port);
            self.stop();
            Oidc::start(&dir, port, true)
        }

        fn stop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }

        pub fn issuer(&self) -> String {
            format!("http://127.0.0.1:{}", self.port)
        }

        pub fn jwks_url(&self) -> String {
            format!("{}/jwks", self.issuer())
        }

        /// A JWT access token for `resource` through client_credentials.
        pub async fn token(&self, resource: &str, scope: Option<&str>) -> String {
            let client = reqwest::Client::builder().no_proxy().build().unwrap();
            let mut form = vec![("grant_type", "client_credentials"), ("resource", resource)];
            if let Some(s) = scope {
                form.push(("scope", s));
            }
            let resp = client
                .post(format!("{}/token", self.issuer()))
                .basic_auth("polydev-test", Some(&self.secret))
                .form(&form)
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let body = resp.bytes().await.unwrap();
            assert!(
                status.is_success(),
                "token request failed: {status} {}",
                String::from_utf8_lossy(&body)
            );
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            v["access_token"].as_str().unwrap().to_string()
        }
    }

    impl Drop for Oidc {
        fn drop(&mut self) {
            self.stop();
        }
    }
}

use oidc::Oidc;
use polydev_controller::auth::jwt::JwtError;
use polydev_controller::auth::JwtConfig;

fn jwt_auth(db: &common::TestDb, o: &Oidc, tune: impl FnOnce(&mut AuthConfig)) -> Auth {
    let mut cfg = AuthConfig {
        jwt: Some(JwtConfig {
            jwks_url: o.jwks_url(),
            issuer: o.issuer(),
            audience: "polydev-api".into(),
        }),
        ..AuthConfig::default()
    };
    tune(&mut cfg);
    Auth::new(db.store.clone(), cfg).unwrap()
}

/// The decoded JSON of a JWT part (0 header, 1 payload).
fn jwt_part(t: &str, i: usize) -> serde_json::Value {
    use base64::Engine as _;
    let part = t.split('.').nth(i).unwrap();
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap();
    serde_json::from_slice(&raw).unwrap()
}

fn b64(v: &serde_json::Value) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

async fn rejected(a: &Auth, t: &str) -> JwtError {
    unauthenticated(a.authenticate(&bearer(t)).await);
    a.jwt_verifier().unwrap().check(t).await.unwrap_err()
}

async fn count(db: &common::TestDb, table: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(db.store.pool())
        .await
        .unwrap();
    n
}

async fn jwt_valid_token_provisions_once(db: common::TestDb) {
    // A system proxy must not be used for the JWKS (nor can it be reached).
    std::env::set_var("HTTP_PROXY", "http://127.0.0.1:9");
    std::env::set_var("http_proxy", "http://127.0.0.1:9");
    std::env::set_var("ALL_PROXY", "http://127.0.0.1:9");
    let dir = tempfile::tempdir().unwrap();
    let o = Oidc::start(dir.path(), 0, false);
    let a = jwt_auth(&db, &o, |_| {});

    let t = o
        .token("urn:polydev:api", Some("sessions:read vms:read"))
        .await;
    assert_eq!(jwt_part(&t, 0)["alg"], "RS256");
    let p = a.authenticate(&bearer(&t)).await.unwrap();
    assert_eq!(
        p.via,
        AuthMethod::Jwt {
            issuer: o.issuer(),
            subject: "polydev-test".into()
        }
    );
    assert_eq!(p.role, Role::User);
    assert_eq!(p.scopes, vec![Scope::SessionsRead, Scope::VmsRead]);
    assert!(p.name.starts_with("ext-"), "{}", p.name);

    // Again, without a scope claim, and ES256-signed: the same account.
    let t2 = o.token("urn:polydev:api", None).await;
    let p2 = a.authenticate(&bearer(&t2)).await.unwrap();
    assert_eq!(p2.user_id, p.user_id);
    assert_eq!(p2.scopes, Role::User.scopes());
    let t3 = o.token("urn:polydev:api:es256", None).await;
    assert_eq!(jwt_part(&t3, 0)["alg"], "ES256");
    let p3 = a.authenticate(&bearer(&t3)).await.unwrap();
    assert_eq!(p3.user_id, p.user_id);

    assert_eq!(count(&db, "users").await, 1, "provisioned once");
    assert_eq!(count(&db, "external_identities").await, 1);
    assert_eq!(a.jwt_verifier().unwrap().fetches(), 1, "the JWKS is cached");
    let ev = db.store.events_for("user", &p.user_id).await.unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].detail["issuer"], o.issuer());

    // Concurrent first tokens of a new subject provision one account.
    sqlx::query("DELETE FROM users")
        .execute(db.store.pool())
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (a, t) = (a.clone(), t.clone());
        tasks.push(tokio::spawn(
            async move { a.authenticate(&bearer(&t)).await },
        ));
    }
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap().unwrap().user_id);
    }
    assert_eq!(ids.len(), 1);
}

async fn jwt_wrong_audience_issuer_or_signature(db: common::TestDb) {
    use jsonwebtoken::errors::ErrorKind;
    let dir = tempfile::tempdir().unwrap();
    let o = Oidc::start(dir.path(), 0, false);
    let a = jwt_auth(&db, &o, |_| {});

    let other = o.token("urn:other:api", None).await;
    assert_eq!(jwt_part(&other, 1)["aud"], "other-api");
    assert!(matches!(
        rejected(&a, &other).await,
        JwtError::Rejected(ErrorKind::InvalidAudience)
    ));

    let good = o.token("urn:polydev:api", None).await;
    let wrong_iss = jwt_auth(&db, &o, |c| {
        c.jwt.as_mut().unwrap().issuer = "https://issuer.example".into()
    });
    assert!(matches!(
        rejected(&wrong_iss, &good).await,
        JwtError::Rejected(ErrorKind::InvalidIssuer)
    ));

    // Tampered signature (a byte in the middle) and tampered claims.
    let parts: Vec<&str> = good.split('.').collect();
    let mut sig = parts[2].as_bytes().to_vec();
    let mid = sig.len() / 2;
    sig[mid] = if sig[mid] == b'A' { b'B' } else { b'A' };
    let bad_sig = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        String::from_utf8(sig).unwrap()
    );
    assert!(matches!(
        rejected(&a, &bad_sig).await,
        JwtError::Rejected(ErrorKind::InvalidSignature)
    ));
    let mut claims = jwt_part(&good, 1);
    claims["sub"] = "someone-else".into();
    let bad_claims = format!("{}.{}.{}", parts[0], b64(&claims), parts[2]);
    assert!(matches!(
        rejected(&a, &bad_claims).await,
        JwtError::Rejected(ErrorKind::InvalidSignature)
    ));

    // Algorithm confusion: HS256 or none with a real kid never gets near a key.
    let mut header = jwt_part(&good, 0);
    for alg in ["HS256", "none", "PS256"] {
        header["alg"] = alg.into();
        let forged = format!("{}.{}.{}", b64(&header), parts[1], parts[2]);
        assert!(
            matches!(
                (alg, rejected(&a, &forged).await),
                (_, JwtError::AlgorithmNotAllowed(_))
                // `none` is not even an algorithm to the JWT library.
                | ("none", JwtError::Malformed)
            ),
            "{alg}"
        );
    }
    // An RS256 header on the EC key's kid.
    let es = o.token("urn:polydev:api:es256", None).await;
    let mut h = jwt_part(&es, 0);
    h["alg"] = "RS256".into();
    let es_parts: Vec<&str> = es.split('.').collect();
    let confused = format!("{}.{}.{}", b64(&h), es_parts[1], es_parts[2]);
    assert!(matches!(
        rejected(&a, &confused).await,
        JwtError::KeyAlgorithmMismatch { .. }
    ));
    assert_eq!(count(&db, "users").await, 0, "nothing provisioned");
}

async fn jwt_expired(db: common::TestDb) {
    use jsonwebtoken::errors::ErrorKind;
    let dir = tempfile::tempdir().unwrap();
    let o = Oidc::start(dir.path(), 0, false);
    let a = jwt_auth(&db, &o, |c| c.jwt_leeway = std::time::Duration::ZERO);
    let t = o.token("urn:polydev:api:short", None).await;
    let exp = jwt_part(&t, 1)["exp"].as_i64().unwrap();
    // Let the token's one second of life pass: a token is expired once the
    // clock (whole seconds) is past `exp`.
    loop {
        let now = now_ms() / 1000;
        if now > exp {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(
            u64::try_from((exp + 1) * 1000 - now_ms()).unwrap_or(0) + 10,
        ))
        .await;
    }
    assert!(matches!(
        rejected(&a, &t).await,
        JwtError::Rejected(ErrorKind::ExpiredSignature)
    ));
    // With the default leeway (30 s) the same token is still accepted: the
    // leeway is small but real.
    let lenient = jwt_auth(&db, &o, |_| {});
    lenient.authenticate(&bearer(&t)).await.unwrap();
}

async fn jwt_key_rotation_picked_up_by_refetch(db: common::TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let o = Oidc::start(dir.path(), 0, false);
    let a = jwt_auth(&db, &o, |c| c.jwks_min_refetch = std::time::Duration::ZERO);
    let old = o.token("urn:polydev:api", None).await;
    let old_kid = jwt_part(&old, 0)["kid"].as_str().unwrap().to_string();
    let p = a.authenticate(&bearer(&old)).await.unwrap();
    let v = a.jwt_verifier().unwrap();
    assert_eq!(v.fetches(), 1);

    let o = o.rotate();
    let new = o.token("urn:polydev:api", None).await;
    let new_kid = jwt_part(&new, 0)["kid"].as_str().unwrap().to_string();
    assert_ne!(new_kid, old_kid, "the provider signs with the new key");
    let p2 = a.authenticate(&bearer(&new)).await.unwrap();
    assert_eq!(p2.user_id, p.user_id);
    assert_eq!(v.fetches(), 2, "the unknown kid triggered one refetch");
    // The old key is still published: old tokens keep working, no refetch.
    a.authenticate(&bearer(&old)).await.unwrap();
    let es = o.token("urn:polydev:api:es256", None).await;
    a.authenticate(&bearer(&es)).await.unwrap();
    assert_eq!(v.fetches(), 2);
}

async fn jwt_refetch_is_rate_limited(db: common::TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let o = Oidc::start(dir.path(), 0, false);
    let a = jwt_auth(&db, &o, |c| {
        c.jwks_min_refetch = std::time::Duration::from_secs(3600)
    });
    let good = o.token("urn:polydev:api", None).await;
    a.authenticate(&bearer(&good)).await.unwrap();
    let v = a.jwt_verifier().unwrap();
    assert_eq!(v.fetches(), 1);
    // Junk kids cannot make us hammer the provider.
    let parts: Vec<&str> = good.split('.').collect();
    let mut header = jwt_part(&good, 0);
    for i in 0..5 {
        header["kid"] = format!("junk-{i}").into();
        let forged = format!("{}.{}.{}", b64(&header), parts[1], parts[2]);
        assert!(matches!(
            rejected(&a, &forged).await,
            JwtError::UnknownKey { .. }
        ));
    }
    assert_eq!(v.fetches(), 1, "no refetch within jwks_min_refetch");
    // Even a genuinely new key waits for the interval.
    let o = o.rotate();
    let new = o.token("urn:polydev:api", None).await;
    assert!(matches!(
        rejected(&a, &new).await,
        JwtError::UnknownKey { .. }
    ));
    assert_eq!(v.fetches(), 1);
}

async fn jwt_old_cache_refreshes_and_survives_an_outage(db: common::TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let o = Oidc::start(dir.path(), 0, false);
    let a = jwt_auth(&db, &o, |c| {
        c.jwks_max_age = std::time::Duration::ZERO;
        c.jwks_min_refetch = std::time::Duration::ZERO;
    });
    let t = o.token("urn:polydev:api", None).await;
    a.authenticate(&bearer(&t)).await.unwrap();
    a.authenticate(&bearer(&t)).await.unwrap();
    let v = a.jwt_verifier().unwrap();
    assert_eq!(v.fetches(), 2, "an old cache is refreshed before use");
    // The provider goes away: the refresh fails, the cached keys still work.
    drop(o);
    a.authenticate(&bearer(&t)).await.unwrap();
    assert_eq!(v.fetches(), 3);
}

async fn jwt_unreachable_jwks(db: common::TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let o = Oidc::start(dir.path(), 0, false);
    let t = o.token("urn:polydev:api", None).await;
    // A port with nothing listening.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = l.local_addr().unwrap().port();
    drop(l);
    let a = jwt_auth(&db, &o, |c| {
        c.jwt.as_mut().unwrap().jwks_url = format!("http://127.0.0.1:{dead}/jwks")
    });
    match a.authenticate(&bearer(&t)).await {
        Err(AuthError::Jwks(m)) => assert!(m.contains("/jwks"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Within the refetch interval it stays "keys unavailable" (503), not
    // "bad token" (401), and does not fetch again.
    match a.authenticate(&bearer(&t)).await {
        Err(AuthError::Jwks(m)) => assert!(m.contains("retrying"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(a.jwt_verifier().unwrap().fetches(), 1);
    // Bad settings are refused up front.
    for (url, iss) in [
        ("ftp://x/jwks", "i"),
        ("not a url", "i"),
        ("http://h/jwks", ""),
    ] {
        let cfg = AuthConfig {
            jwt: Some(JwtConfig {
                jwks_url: url.into(),
                issuer: iss.into(),
                audience: "a".into(),
            }),
            ..AuthConfig::default()
        };
        assert!(matches!(
            Auth::new(db.store.clone(), cfg),
            Err(AuthError::Invalid(_))
        ));
    }
}
