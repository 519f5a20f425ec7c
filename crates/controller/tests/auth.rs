//! Accounts and authorization, on SQLite and on a real PostgreSQL server.
//! Time is moved by editing the stored timestamps (never by sleeping).

mod common;

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
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{}: {e}", p.display()),
        };
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

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
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
