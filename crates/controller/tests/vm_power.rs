//! Stop and start of a CLI VM, and disconnect, over the real HTTP API on
//! SQLite and on a real PostgreSQL: what the routes accept and refuse in
//! each VM state (the driver's work at the host is the e2e test
//! `tests/tests/vm_power.rs`), a terminal ticket resuming a stopped VM, and the
//! credential's holder VM.

mod common;

use common::api::{assert_problem, Api};
use polydev_controller::auth::{AuthConfig, Role, Scope};
use polydev_controller::http::HttpConfig;
use polydev_controller::state::{SessionState, VmState};
use polydev_controller::store::{Also, Store, Vm, VmKind};
use polydev_controller::vault::{Keyring, Vault};
use reqwest::Method;
use serde_json::{json, Value};

both_backends!(
    stop_and_start_follow_the_vm_state,
    the_credential_names_its_holder_until_disconnect,
    a_disconnect_the_cli_vm_does_not_answer_keeps_the_credential,
);

fn user_scopes() -> Vec<Scope> {
    Scope::ALL.into_iter().filter(|s| !s.admin_only()).collect()
}

async fn walk(s: &Store, vm: &Vm, path: &[VmState]) -> Vm {
    let mut vm = vm.clone();
    for &st in path {
        let also = if st == VmState::Creating {
            Also {
                placement: Some(("local".into(), format!("h-{}", vm.id))),
                ..Also::default()
            }
        } else {
            Also::default()
        };
        vm = s.transition_vm(&vm, st, None, also).await.unwrap();
    }
    vm
}

async fn host(s: &Store) {
    sqlx::query("INSERT INTO hosts (id, name, address, vcpus, memory_mib, state, created_at) VALUES ('local', 'local', 'in-process', 4, 8192, 'up', 0)")
        .execute(s.pool())
        .await
        .unwrap();
}

async fn stop_and_start_follow_the_vm_state(db: common::TestDb) {
    let api = Api::start(&db, HttpConfig::unlimited(), AuthConfig::default()).await;
    let s = &api.store;
    host(s).await;
    let alice = api
        .auth
        .create_user("alice", Role::User, None)
        .await
        .unwrap();
    let bob = api.auth.create_user("bob", Role::User, None).await.unwrap();
    let (_, t) = api
        .auth
        .create_token(&alice.id, "all", &user_scopes(), None)
        .await
        .unwrap();
    let (_, bob_t) = api
        .auth
        .create_token(&bob.id, "all", &user_scopes(), None)
        .await
        .unwrap();
    let vm = s.create_vm(&alice.id, VmKind::Cli).await.unwrap();
    let post = |path: String, token: String, body: Option<Value>| {
        let api = &api;
        async move { api.call(Method::POST, &path, Some(&token), &[], body).await }
    };
    let stop = format!("/api/v1/vms/{}/stop", vm.id);
    let start = format!("/api/v1/vms/{}/start", vm.id);

    // Not running yet: stop is refused, naming the state.
    let (st, h, v) = post(stop.clone(), t.clone(), Some(json!({}))).await;
    assert_problem((st, &h, &v), 409, "conflict", "stop while pending");
    assert!(v["detail"].as_str().unwrap().contains("is pending"), "{v}");

    let vm = walk(s, &vm, &[VmState::Creating, VmState::Running]).await;
    // Start of a running VM: refused, naming the state.
    let (st, h, v) = post(start.clone(), t.clone(), Some(json!({}))).await;
    assert_problem((st, &h, &v), 409, "conflict", "start while running");
    assert!(v["detail"].as_str().unwrap().contains("is running"), "{v}");
    // The body is required and takes nothing.
    let (st, _, v) = post(stop.clone(), t.clone(), None).await;
    assert!(st.is_client_error() && st.as_u16() != 404, "{st} {v}");
    let (st, h, v) = post(stop.clone(), t.clone(), Some(json!({"force": true}))).await;
    assert_problem((st, &h, &v), 422, "invalid", "unknown field");
    // Another user's VM is not found, and is not touched.
    let (st, h, v) = post(stop.clone(), bob_t.clone(), Some(json!({}))).await;
    assert_problem((st, &h, &v), 404, "not-found", "bob stops alice's VM");
    assert_eq!(s.vm(&vm.id).await.unwrap().life.state, VmState::Running);

    // Stop: 202 with the VM, now hibernating.
    let (st, _, v) = post(stop.clone(), t.clone(), Some(json!({}))).await;
    assert_eq!(st.as_u16(), 202, "{v}");
    assert_eq!(
        (v["id"].as_str(), v["state"].as_str()),
        (Some(vm.id.as_str()), Some("hibernating"))
    );
    let (st, h, v) = post(stop.clone(), t.clone(), Some(json!({}))).await;
    assert_problem((st, &h, &v), 409, "conflict", "second stop");
    assert!(
        v["detail"].as_str().unwrap().contains("is hibernating"),
        "{v}"
    );

    // What the driver does at the host; then the VM is stopped.
    let vm = walk(s, &s.vm(&vm.id).await.unwrap(), &[VmState::Hibernated]).await;
    // A stopped VM's terminal resumes it: the ticket is given and the VM
    // is on its way back while the client connects.
    let (st, _, v) = post(
        "/api/v1/tickets".into(),
        t.clone(),
        Some(json!({"kind": "terminal", "resource_id": vm.id})),
    )
    .await;
    assert_eq!(st.as_u16(), 201, "{v}");
    let vm = s.vm(&vm.id).await.unwrap();
    assert_eq!(vm.life.state, VmState::Resuming);
    let vm = walk(s, &vm, &[VmState::Running, VmState::Hibernating]).await;
    let vm = walk(s, &vm, &[VmState::Hibernated]).await;
    // A ticket for a VM that is not the caller's resumes nothing.
    let (st, _, v) = post(
        "/api/v1/tickets".into(),
        bob_t.clone(),
        Some(json!({"kind": "terminal", "resource_id": vm.id})),
    )
    .await;
    assert_eq!(st.as_u16(), 404, "{v}");
    assert_eq!(s.vm(&vm.id).await.unwrap().life.state, VmState::Hibernated);

    // Start: 202, resuming.
    let (st, _, v) = post(start.clone(), t.clone(), Some(json!({}))).await;
    assert_eq!(
        (st.as_u16(), v["state"].as_str()),
        (202, Some("resuming")),
        "{v}"
    );
    let vm = walk(s, &s.vm(&vm.id).await.unwrap(), &[VmState::Running]).await;

    // Stopped again, it can still be deleted.
    let vm = walk(s, &vm, &[VmState::Hibernating, VmState::Hibernated]).await;
    let (st, _, v) = api
        .call(
            Method::DELETE,
            &format!("/api/v1/vms/{}", vm.id),
            Some(&t),
            &[],
            None,
        )
        .await;
    assert_eq!(
        (st.as_u16(), v["state"].as_str()),
        (202, Some("stopping")),
        "{v}"
    );

    // A browser VM is neither stopped nor started on request.
    let b = s.create_vm(&alice.id, VmKind::Browser).await.unwrap();
    let b = walk(s, &b, &[VmState::Creating, VmState::Running]).await;
    let (st, h, v) = post(
        format!("/api/v1/vms/{}/stop", b.id),
        t.clone(),
        Some(json!({})),
    )
    .await;
    assert_problem((st, &h, &v), 409, "conflict", "stop a browser VM");
    assert!(v["detail"].as_str().unwrap().contains("browser VM"), "{v}");
}

async fn the_credential_names_its_holder_until_disconnect(db: common::TestDb) {
    let api = Api::start(&db, HttpConfig::unlimited(), AuthConfig::default()).await;
    let s = &api.store;
    host(s).await;
    let alice = api
        .auth
        .create_user("alice", Role::User, None)
        .await
        .unwrap();
    let (_, t) = api
        .auth
        .create_token(&alice.id, "all", &user_scopes(), None)
        .await
        .unwrap();
    let creds = || async {
        let (st, _, v) = api
            .call(Method::GET, "/api/v1/credentials", Some(&t), &[], None)
            .await;
        assert_eq!(st.as_u16(), 200, "{v}");
        v
    };
    let vault = Vault::new(Keyring::generate().unwrap());
    vault
        .store(s, &alice.id, "codex", b"{\"k\":1}")
        .await
        .unwrap();
    // Sealed, not delivered: no holder.
    assert_eq!(creds().await[0]["holder_vm_id"], Value::Null);

    // A session delivers it into the CLI VM: that VM holds it.
    let cli = s.create_vm(&alice.id, VmKind::Cli).await.unwrap();
    let cli = walk(s, &cli, &[VmState::Creating, VmState::Running]).await;
    let alice_id = alice.id.as_str();
    let deliver = |cli: String| async move {
        let mut ses = s.create_session(alice_id, "codex").await.unwrap();
        for st in [
            SessionState::StartingVm,
            SessionState::StartingLogin,
            SessionState::AwaitingUser,
            SessionState::Capturing,
            SessionState::Delivering,
        ] {
            ses = s
                .transition_session(&ses, st, None, Also::default())
                .await
                .unwrap();
        }
        s.transition_session(
            &ses,
            SessionState::Completed,
            None,
            Also {
                detail: Some(json!({ "delivered_to": cli })),
                credential_holder: Some(cli.clone()),
                ..Also::default()
            },
        )
        .await
        .unwrap();
    };
    deliver(cli.id.clone()).await;
    let v = creds().await;
    assert_eq!(v[0]["holder_vm_id"].as_str(), Some(cli.id.as_str()), "{v}");
    // Stopping the VM keeps it the holder (its disk keeps the files).
    let cli = walk(s, &cli, &[VmState::Hibernating, VmState::Hibernated]).await;
    assert_eq!(
        creds().await[0]["holder_vm_id"].as_str(),
        Some(cli.id.as_str())
    );
    // A new version is held by nobody until delivered.
    vault
        .store(s, &alice.id, "codex", b"{\"k\":2}")
        .await
        .unwrap();
    assert_eq!(creds().await[0]["holder_vm_id"], Value::Null);
    deliver(cli.id.clone()).await;
    assert_eq!(
        creds().await[0]["holder_vm_id"].as_str(),
        Some(cli.id.as_str())
    );
    // The VM destroyed: nobody holds it.
    let _ = walk(s, &cli, &[VmState::Stopping, VmState::Destroyed]).await;
    assert_eq!(creds().await[0]["holder_vm_id"], Value::Null);

    // Disconnect answers what it removed (no running CLI VM here: nothing).
    let (st, _, v) = api
        .call(
            Method::DELETE,
            "/api/v1/credentials/codex",
            Some(&t),
            &[],
            None,
        )
        .await;
    assert_eq!(st.as_u16(), 200, "{v}");
    assert_eq!(v, json!({"provider": "codex", "removed_from_vm": null}));
    assert!(s.credential(&alice.id, "codex").await.unwrap().is_none());
    let (st, h, v) = api
        .call(
            Method::DELETE,
            "/api/v1/credentials/codex",
            Some(&t),
            &[],
            None,
        )
        .await;
    assert_problem((st, &h, &v), 404, "not-found", "second disconnect");
}

/// The user's CLI VM runs but its host agent does not answer (a socket
/// nobody serves): the disconnect is a 503 saying to try again, and the
/// sealed credential is kept.
async fn a_disconnect_the_cli_vm_does_not_answer_keeps_the_credential(db: common::TestDb) {
    use polydev_controller::driver::{Driver, KeySource, RemoteHost, LOCAL_HOST_ID};
    let s = &db.store;
    host(s).await;
    let dir = tempfile::tempdir().unwrap();
    let driver = Driver::new(
        s.clone(),
        std::sync::Arc::new(RemoteHost::new(
            LOCAL_HOST_ID,
            &dir.path().join("host.sock"),
        )),
        polydev_controller::providers::Providers::builtin().unwrap(),
        KeySource::fixed(Keyring::generate().unwrap()),
        polydev_controller::upstream::UpstreamConfig::none(),
    );
    let auth = polydev_controller::auth::Auth::new(s.clone(), AuthConfig::default()).unwrap();
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let state = polydev_controller::http::AppState::new(
        auth.clone(),
        Some(driver),
        HttpConfig::unlimited(),
        rx,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(polydev_controller::http::serve(listener, state));
    let client = reqwest::Client::builder().no_proxy().build().unwrap();

    let alice = auth.create_user("alice", Role::User, None).await.unwrap();
    let (_, t) = auth
        .create_token(&alice.id, "all", &user_scopes(), None)
        .await
        .unwrap();
    let cli = s.create_vm(&alice.id, VmKind::Cli).await.unwrap();
    walk(s, &cli, &[VmState::Creating, VmState::Running]).await;
    let vault = Vault::new(Keyring::generate().unwrap());
    vault
        .store(s, &alice.id, "codex", b"{\"k\":1}")
        .await
        .unwrap();

    let got = common::api::call(
        &client,
        &base,
        Method::DELETE,
        "/api/v1/credentials/codex",
        Some(&t),
        &[],
        None,
    )
    .await;
    assert_problem(
        (got.0, &got.1, &got.2),
        503,
        "cli-vm-unreachable",
        "unreachable VM",
    );
    let detail = got.2["detail"].as_str().unwrap();
    assert!(
        detail.contains(&cli.id)
            && detail.contains("the credential is kept")
            && detail.contains("try"),
        "{detail}"
    );
    assert!(s.credential(&alice.id, "codex").await.unwrap().is_some());
}
