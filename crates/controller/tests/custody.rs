//! Credential custody on a real store (SQLite and PostgreSQL): the holder's
//! write-back as new versions, `needs_login`, the one kept version, and
//! how a holder's files are judged.

mod common;

use polydev_api::agent::{WatchedFile, WATCH_MISSING, WATCH_REFUSED};
use polydev_controller::driver::custody::{judge, refusal_in, Judged};
use polydev_controller::providers::Provider;
use polydev_controller::state::VmState;
use polydev_controller::store::{
    Also, Refreshed, Store, StoreError, VmKind, STATUS_NEEDS_LOGIN, STATUS_OK,
};
use polydev_controller::vault::{Keyring, Vault};

both_backends!(
    write_back_is_a_new_version_kept_by_its_holder,
    needs_login_is_recorded_once_and_a_new_sign_in_clears_it,
    a_flood_of_write_backs_keeps_one_record,
);

/// A user with a running CLI VM.
async fn user_with_cli(s: &Store, name: &str) -> (String, String) {
    sqlx::query("INSERT INTO hosts (id, name, address, vcpus, memory_mib, state, created_at) VALUES ('local', 'local', 'in-process', 4, 8192, 'up', 0) ON CONFLICT (id) DO NOTHING")
        .execute(s.pool())
        .await
        .unwrap();
    let u = s.create_user(name, "user").await.unwrap();
    let vm = s.create_vm(&u.id, VmKind::Cli).await.unwrap();
    let vm = s
        .transition_vm(
            &vm,
            VmState::Creating,
            None,
            Also {
                placement: Some(("local".into(), format!("vm-{name}"))),
                ..Also::default()
            },
        )
        .await
        .unwrap();
    let vm = s
        .transition_vm(&vm, VmState::Running, None, Also::default())
        .await
        .unwrap();
    (u.id, vm.id)
}

async fn write_back_is_a_new_version_kept_by_its_holder(db: common::TestDb) {
    let s = &db.store;
    let v = Vault::new(Keyring::generate().unwrap());
    let (u, vm) = user_with_cli(s, "alice").await;
    let (_, other_vm) = user_with_cli(s, "bob").await;
    assert_eq!(v.store(s, &u, "testcli", b"signed-in").await.unwrap(), 1);
    let t = s.custody_targets().await.unwrap();
    let mine: Vec<_> = t.iter().filter(|t| t.user_id == u).collect();
    assert_eq!(mine.len(), 1, "{t:?}");
    assert_eq!(
        (mine[0].holder_vm_id.as_deref(), mine[0].cli_vm_id.as_str()),
        (None, vm.as_str())
    );

    // Delivered: held by the VM, once.
    assert!(s
        .set_credential_holder(&u, "testcli", 1, &vm)
        .await
        .unwrap());
    assert!(!s
        .set_credential_holder(&u, "testcli", 1, &other_vm)
        .await
        .unwrap());

    // The holder refreshed: version 2, still held by it, with its times.
    let rec = v.seal(&u, "testcli", 2, b"refreshed").unwrap();
    let r = Refreshed {
        at: 1_700_000_000_000,
        expires_at: Some(1_700_000_900_000),
    };
    // Only the holder writes back.
    assert!(matches!(
        s.write_back_credential(&rec, &other_vm, r).await,
        Err(StoreError::Conflict { .. })
    ));
    s.write_back_credential(&rec, &vm, r).await.unwrap();
    assert_eq!(
        &v.load(s, &u, "testcli").await.unwrap().unwrap()[..],
        b"refreshed"
    );
    let info = s.credentials_of(&u).await.unwrap().remove(0);
    assert_eq!(info.version, 2);
    assert_eq!(info.holder_vm_id.as_deref(), Some(vm.as_str()));
    assert_eq!(info.refreshed_at, Some(r.at));
    assert_eq!(info.expires_at, r.expires_at);
    assert_eq!(info.status, STATUS_OK);
    // A stale write-back (same version again) is refused.
    assert!(matches!(
        s.write_back_credential(&rec, &vm, r).await,
        Err(StoreError::Conflict { .. })
    ));
    let kinds: Vec<String> = s
        .events_for("credential", &format!("{u}/testcli"))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["stored", "delivered", "written_back"]);

    // A new sign-in seals a version held by nobody until delivered.
    assert_eq!(v.store(s, &u, "testcli", b"again").await.unwrap(), 3);
    let info = s.credentials_of(&u).await.unwrap().remove(0);
    assert_eq!((info.holder_vm_id, info.expires_at), (None, None));
    assert!(info.refreshed_at.is_some_and(|t| t > r.at));
}

async fn needs_login_is_recorded_once_and_a_new_sign_in_clears_it(db: common::TestDb) {
    let s = &db.store;
    let v = Vault::new(Keyring::generate().unwrap());
    let (u, _vm) = user_with_cli(s, "alice").await;
    v.store(s, &u, "testcli", b"signed-in").await.unwrap();
    let why = "the CLI blanked `refresh_token` in .testcli/auth.json";
    assert!(s.mark_needs_login(&u, "testcli", 1, why).await.unwrap());
    assert!(
        !s.mark_needs_login(&u, "testcli", 1, why).await.unwrap(),
        "no second event"
    );
    // A verdict on a version that was replaced meanwhile is dropped.
    assert!(!s.mark_needs_login(&u, "testcli", 7, "stale").await.unwrap());
    let info = s.credentials_of(&u).await.unwrap().remove(0);
    assert_eq!(info.status, STATUS_NEEDS_LOGIN);
    assert_eq!(info.status_reason.as_deref(), Some(why));
    let ev = s
        .events_for("credential", &format!("{u}/testcli"))
        .await
        .unwrap();
    assert_eq!(ev.iter().filter(|e| e.kind == "needs_login").count(), 1);

    v.store(s, &u, "testcli", b"signed-in-again").await.unwrap();
    let info = s.credentials_of(&u).await.unwrap().remove(0);
    assert_eq!(
        (info.status.as_str(), info.status_reason),
        (STATUS_OK, None)
    );
}

async fn a_flood_of_write_backs_keeps_one_record(db: common::TestDb) {
    let s = &db.store;
    let v = Vault::new(Keyring::generate().unwrap());
    let (u, vm) = user_with_cli(s, "alice").await;
    v.store(s, &u, "testcli", b"v1").await.unwrap();
    assert!(s
        .set_credential_holder(&u, "testcli", 1, &vm)
        .await
        .unwrap());
    for n in 2..=60i64 {
        let rec = v
            .seal(&u, "testcli", n, format!("v{n}").as_bytes())
            .unwrap();
        s.write_back_credential(
            &rec,
            &vm,
            Refreshed {
                at: n,
                expires_at: None,
            },
        )
        .await
        .unwrap();
    }
    let (rows,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM credentials WHERE user_id = $1")
        .bind(&u)
        .fetch_one(s.pool())
        .await
        .unwrap();
    assert_eq!(rows, 1, "only the latest version is kept");
    assert_eq!(s.credentials_of(&u).await.unwrap()[0].version, 60);
    assert_eq!(
        &v.load(s, &u, "testcli").await.unwrap().unwrap()[..],
        b"v60"
    );
}

fn testcli() -> Provider {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../providers/testcli.toml"),
    )
    .unwrap();
    Provider::parse(&text, "testcli.toml", Some("testcli")).unwrap()
}

fn file(key: &str, data: Option<&str>) -> Vec<(String, WatchedFile)> {
    vec![(
        ".testcli/auth.json".into(),
        WatchedFile {
            path: "/home/user/.testcli/auth.json".into(),
            key: key.into(),
            data: data.map(|d| d.as_bytes().to_vec()),
            problem: (key == WATCH_REFUSED).then(|| "a symlink is on its path".into()),
        },
    )]
}

const AUTH: &str = r#"{"issuer":"https://auth.polydev.test","client_id":"polydev-testcli","access_token":"at","refresh_token":"RT","id_token":"it","token_type":"Bearer","expires_at":1700000900}"#;

#[test]
fn a_valid_file_is_kept_with_its_expiry() {
    match judge(&testcli(), &file("k", Some(AUTH))) {
        Judged::Valid(files, expiry) => {
            assert_eq!(files[".testcli/auth.json"], AUTH.as_bytes());
            assert_eq!(expiry, Some(1_700_000_900_000), "seconds become ms");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn blanked_tokens_or_a_removed_file_are_a_dead_credential() {
    let blank = AUTH.replace("\"RT\"", "\"\"");
    match judge(&testcli(), &file("k", Some(&blank))) {
        Judged::Dead(why) => {
            assert!(
                why.contains("refresh_token") && why.contains("connect"),
                "{why}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        judge(&testcli(), &file(WATCH_MISSING, None)),
        Judged::Dead(_)
    ));
}

#[test]
fn half_written_or_refused_files_are_ignored() {
    assert!(matches!(
        judge(&testcli(), &file("k", Some("{\"access_tok"))),
        Judged::Ignore(_)
    ));
    match judge(&testcli(), &file(WATCH_REFUSED, None)) {
        Judged::Ignore(why) => assert!(why.contains("symlink"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn refused_refreshes_are_recognised_in_the_clis_own_output_only() {
    let out = "starting\ncredential rejected by https://auth.polydev.test/token: invalid_grant: grant request is invalid; run `polydev-testcli login` again\n";
    let why = refusal_in(out).expect("recognised");
    assert!(why.contains("invalid_grant"), "{why}");
    assert!(refusal_in("Error: refresh token already used\n").is_some());
    // The model's answer (JSON lines) may talk about OAuth freely.
    assert_eq!(
        refusal_in(
            "{\"type\":\"delta\",\"text\":\"invalid_grant means the refresh token was revoked\"}\n"
        ),
        None
    );
    assert_eq!(refusal_in("all good\n"), None);
}

#[test]
fn a_rewrite_with_the_same_tokens_is_not_a_new_version() {
    use polydev_controller::driver::custody::same_files;
    use std::collections::BTreeMap;
    let old = BTreeMap::from([(
        ".testcli/auth.json".to_string(),
        zeroize::Zeroizing::new(br#"{"a":"1","b":"2"}"#.to_vec()),
    )]);
    let reordered = BTreeMap::from([(
        ".testcli/auth.json".to_string(),
        b"{ \"b\": \"2\", \"a\": \"1\" }".to_vec(),
    )]);
    assert!(same_files(&old, &reordered));
    let rotated = BTreeMap::from([(
        ".testcli/auth.json".to_string(),
        br#"{"a":"1","b":"3"}"#.to_vec(),
    )]);
    assert!(!same_files(&old, &rotated));
}
