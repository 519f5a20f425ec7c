//! Prompt runs over the real HTTP API on SQLite and on a real PostgreSQL:
//! what `POST /api/v1/runs` refuses and why, ownership, the per-user
//! concurrency limit, paging, cancel and retention; and the driver's runs
//! (start detached, typed events, exit status, cancel killing the process
//! group, a controller restart picking a run up from its offset or losing
//! it with a reason).
//!
//! The driver's host here runs each exec as a local process (the same
//! shell scripts the guest agent would run, in a temp directory instead of
//! a VM), with a shell script standing in for the provider's CLI; the
//! real CLI in a real VM is `tests/tests/runs.rs`.

mod common;

use std::path::Path;

use common::api::{assert_problem, call, eventually, Api};
use common::rig::{cli_vm, connect, host_row, run_body, user, Rig};
use polydev_controller::auth::AuthConfig;
use polydev_controller::http::HttpConfig;
use polydev_controller::state::VmState;
use polydev_controller::store::{Also, RunState, RunStep};
use reqwest::Method;
use serde_json::{json, Value};

both_backends!(
    creates_are_validated_and_runs_are_private,
    the_concurrency_limit_paging_cancel_and_retention,
    runs_stream_typed_events_exit_and_cancel,
    a_restarted_controller_resumes_or_loses_runs,
);

async fn creates_are_validated_and_runs_are_private(db: common::TestDb) {
    let api = Api::start(&db, HttpConfig::unlimited(), AuthConfig::default()).await;
    let s = &api.store;
    host_row(s).await;
    let (alice, t) = user(&api.auth, "alice").await;
    let (_bob, bob_t) = user(&api.auth, "bob").await;
    let post = |body: Value| {
        let api = &api;
        let t = t.clone();
        async move {
            api.call(Method::POST, "/api/v1/runs", Some(&t), &[], Some(body))
                .await
        }
    };

    let (st, h, v) = post(json!({"provider": "nope", "prompt": "hi"})).await;
    assert_problem((st, &h, &v), 404, "unknown-provider", "unknown provider");
    assert!(v["detail"].as_str().unwrap().contains("codex"), "{v}");
    for (body, why) in [
        (json!({"provider": "codex", "prompt": ""}), "empty prompt"),
        (json!({"provider": "codex", "prompt": "a\u{0}b"}), "NUL"),
        (
            json!({"provider": "codex", "prompt": "x".repeat(40_000)}),
            "long prompt",
        ),
        (
            json!({"provider": "codex", "prompt": "hi", "cwd": "a\nb"}),
            "cwd control",
        ),
        (
            json!({"provider": "codex", "prompt": "hi", "options": {"timeout_secs": 0}}),
            "timeout 0",
        ),
        (
            json!({"provider": "codex", "prompt": "hi", "options": {"timeout_secs": 86401}}),
            "timeout big",
        ),
        (
            json!({"provider": "codex", "prompt": "hi", "options": {"env": {}}}),
            "unknown option",
        ),
        (
            json!({"provider": "codex", "prompt": "hi", "shell": true}),
            "unknown field",
        ),
    ] {
        let (st, _, v) = post(body).await;
        assert!(st == 422 || st == 413, "{why}: {st} {v}");
    }
    // Not connected, then no CLI VM, then a stopped one: 409s that say what to do.
    let (st, h, v) = post(json!({"provider": "codex", "prompt": "hi"})).await;
    assert_problem((st, &h, &v), 409, "provider-not-connected", "not connected");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("POST /api/v1/sessions"),
        "{v}"
    );
    connect(s, &alice, "codex").await;
    let (st, h, v) = post(json!({"provider": "codex", "prompt": "hi"})).await;
    assert_problem((st, &h, &v), 409, "no-cli-vm", "no CLI VM");
    // A VM still being created cannot take a run (a hibernated one can:
    // the driver resumes it first, `tests/idle.rs`).
    let vm = cli_vm(s, &alice, &[]).await;
    let (st, h, v) = post(json!({"provider": "codex", "prompt": "hi"})).await;
    assert_problem((st, &h, &v), 409, "cli-vm-not-running", "VM being created");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("{} is pending", vm.id)),
        "{v}"
    );
    let vm = s
        .transition_vm(
            &vm,
            VmState::Creating,
            None,
            polydev_controller::store::Also {
                placement: Some(("local".into(), vm.id.clone())),
                ..Also::default()
            },
        )
        .await
        .unwrap();
    s.transition_vm(&vm, VmState::Running, None, Also::default())
        .await
        .unwrap();
    let before = s.runs_of(&alice, 100, None).await.unwrap().len();
    assert_eq!(before, 0, "nothing refused left a run behind");

    // Accepted: queued, in the caller's home by default.
    let (st, h, v) = post(json!({"provider": "codex", "prompt": "say \"hi\"; $(reboot)"})).await;
    assert_eq!(st, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(h["location"], format!("/api/v1/runs/{id}").as_str());
    assert_eq!(v["state"], "queued");
    assert_eq!(v["cwd"], "/home/user");
    assert_eq!(v["prompt"], "say \"hi\"; $(reboot)");
    assert_eq!(v["timeout_secs"], 3600);
    let (st, _, v) = post(json!({"provider": "codex", "prompt": "hi", "cwd": "src/app", "options": {"timeout_secs": 5}})).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["cwd"], "/home/user/src/app");
    assert_eq!(v["timeout_secs"], 5);

    // Another user's run is a 404 on every route, like a missing one.
    for (m, path) in [
        (Method::GET, format!("/api/v1/runs/{id}")),
        (Method::DELETE, format!("/api/v1/runs/{id}")),
        (Method::GET, format!("/api/v1/runs/{id}/events")),
    ] {
        let (st, h, v) = api.call(m.clone(), &path, Some(&bob_t), &[], None).await;
        assert_problem((st, &h, &v), 404, "not-found", &format!("bob {m} {path}"));
        let (st, _, _) = api.call(m, &path, Some(&t), &[], None).await;
        assert!(st.is_success(), "alice {path}: {st}");
    }
    let (_, _, v) = api
        .call(Method::GET, "/api/v1/runs", Some(&bob_t), &[], None)
        .await;
    assert_eq!(v, json!([]));
    let (st, h, v) = api
        .call(
            Method::GET,
            &format!("/api/v1/runs?before={id}"),
            Some(&bob_t),
            &[],
            None,
        )
        .await;
    assert_problem((st, &h, &v), 422, "invalid", "bob pages from alice's run");
    let (st, h, v) = api
        .call(Method::GET, "/api/v1/runs/run-../x", Some(&t), &[], None)
        .await;
    assert!(st == 400 || st == 404, "{st} {v} {h:?}");
}

async fn the_concurrency_limit_paging_cancel_and_retention(db: common::TestDb) {
    let mut cfg = HttpConfig::unlimited();
    cfg.max_runs_per_user = 2;
    let api = Api::start(&db, cfg, AuthConfig::default()).await;
    let s = &api.store;
    host_row(s).await;
    let (alice, t) = user(&api.auth, "alice").await;
    let (bob, bob_t) = user(&api.auth, "bob").await;
    for u in [&alice, &bob] {
        connect(s, u, "codex").await;
        cli_vm(s, u, &[VmState::Creating, VmState::Running]).await;
    }
    let post = |t: String, prompt: String| {
        let api = &api;
        async move {
            api.call(
                Method::POST,
                "/api/v1/runs",
                Some(&t),
                &[],
                Some(json!({"provider": "codex", "prompt": prompt})),
            )
            .await
        }
    };
    // Eight at once under a limit of two: exactly two are accepted.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8 {
        let (client, base, t) = (api.client.clone(), api.base.clone(), t.clone());
        set.spawn(async move {
            call(
                &client,
                &base,
                Method::POST,
                "/api/v1/runs",
                Some(&t),
                &[],
                Some(json!({"provider": "codex", "prompt": format!("p{i}")})),
            )
            .await
        });
    }
    let tries = set.join_all().await;
    let ok: Vec<&Value> = tries.iter().filter(|r| r.0 == 201).map(|r| &r.2).collect();
    assert_eq!(ok.len(), 2, "{tries:?}");
    for r in tries.iter().filter(|r| r.0 != 201) {
        assert_problem((r.0, &r.1, &r.2), 429, "run-limit", "over the limit");
        assert!(
            r.2["detail"]
                .as_str()
                .unwrap()
                .contains("DELETE /api/v1/runs/"),
            "{}",
            r.2
        );
    }
    // Another user is not held up by alice's runs.
    let (st, _, v) = post(bob_t.clone(), "bob's".into()).await;
    assert_eq!(st, 201, "{v}");

    // Cancel a queued run: cancelled at once, which makes room.
    let first = ok[0]["id"].as_str().unwrap().to_string();
    let (st, _, v) = api
        .call(
            Method::DELETE,
            &format!("/api/v1/runs/{first}"),
            Some(&t),
            &[],
            None,
        )
        .await;
    assert_eq!(st, 202, "{v}");
    assert_eq!(v["state"], "cancelled");
    let (st, h, v) = api
        .call(
            Method::DELETE,
            &format!("/api/v1/runs/{first}"),
            Some(&t),
            &[],
            None,
        )
        .await;
    assert_problem((st, &h, &v), 409, "conflict", "second cancel");
    let (st, _, v) = post(t.clone(), "third".into()).await;
    assert_eq!(st, 201, "{v}");
    let third = v["id"].as_str().unwrap().to_string();

    // Newest first, one page at a time.
    let (_, _, page1) = api
        .call(Method::GET, "/api/v1/runs?limit=2", Some(&t), &[], None)
        .await;
    let page1 = page1.as_array().unwrap().clone();
    assert_eq!(page1.len(), 2);
    assert_eq!(page1[0]["id"], third.as_str());
    let last = page1[1]["id"].as_str().unwrap();
    let (_, _, page2) = api
        .call(
            Method::GET,
            &format!("/api/v1/runs?limit=2&before={last}"),
            Some(&t),
            &[],
            None,
        )
        .await;
    let page2 = page2.as_array().unwrap();
    assert_eq!(page2.len(), 1, "{page2:?}");
    let mut all: Vec<String> = page1
        .iter()
        .chain(page2)
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 3);
    for bad in ["limit=0", "limit=101", "before=vm-12", "color=red"] {
        let (st, _, v) = api
            .call(
                Method::GET,
                &format!("/api/v1/runs?{bad}"),
                Some(&t),
                &[],
                None,
            )
            .await;
        assert!(st == 400 || st == 422, "{bad}: {st} {v}");
    }

    // Retention: finished runs beyond the newest N per user go, with
    // their events; active runs and other users' runs stay.
    for r in s.runs_of(&alice, 100, None).await.unwrap() {
        if !r.state.is_final() {
            s.advance_run(
                &r,
                RunStep {
                    state: Some((RunState::Failed, Some("test".into()), None)),
                    ..RunStep::default()
                },
            )
            .await
            .unwrap();
        }
    }
    assert_eq!(s.purge_runs(0, 1).await.unwrap(), 2);
    let left = s.runs_of(&alice, 100, None).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, third);
    assert!(s.run_events_after(&first, 0, 100).await.unwrap().is_empty());
    assert_eq!(
        s.runs_of(&bob, 100, None).await.unwrap().len(),
        1,
        "bob's active run stays"
    );
    // Age: everything finished before now.
    assert_eq!(
        s.purge_runs(polydev_controller::util::now_ms() + 1, 100)
            .await
            .unwrap(),
        1
    );
    assert!(s.runs_of(&alice, 100, None).await.unwrap().is_empty());
}

async fn runs_stream_typed_events_exit_and_cancel(db: common::TestDb) {
    let mut rig = Rig::start(&db, HttpConfig::unlimited()).await;
    host_row(&rig.store).await;
    let (alice, t) = user(&rig.auth, "alice").await;
    connect(&rig.store, &alice, "fakecli").await;
    cli_vm(&rig.store, &alice, &[VmState::Creating, VmState::Running]).await;
    rig.run_driver();
    let work = rig.dir.path().join("home/work");
    std::fs::create_dir_all(&work).unwrap();

    // A prompt with shell syntax reaches the CLI as one argument, as is.
    let prompt = "it's \"$(touch /tmp/polydev-injected)\"; `id` | cat";
    let (st, _, v) = rig
        .call(
            Method::POST,
            "/api/v1/runs",
            &t,
            Some(json!({"provider": "fakecli", "prompt": prompt, "cwd": "work"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    // Follow it over SSE from the start: stored events, then live, then end.
    let sse = rig
        .client
        .get(format!("{}/api/v1/runs/{id}/events", rig.base))
        .bearer_auth(&t)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let text = tokio::time::timeout(std::time::Duration::from_secs(30), sse.text())
        .await
        .expect("the stream ends after the final state")
        .unwrap();
    let run = rig.wait_state(&id, RunState::Succeeded).await;
    assert_eq!(run.exit_code, Some(0));
    let evs = rig.events(&id).await;
    let kinds: Vec<(&str, &str)> = evs
        .iter()
        .map(|e| (e.source.as_str(), e.kind.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("state", "queued"),
            ("state", "running"),
            ("output", "start"),
            ("output", "raw"),
            ("output", "raw"),
            ("output", "result"),
            ("state", "succeeded"),
        ],
        "{evs:?}"
    );
    assert_eq!(evs[2].data["n"], 1);
    assert_eq!(evs[2].raw, r#"{"type":"start","n":1}"#);
    assert_eq!(
        evs[3].raw, prompt,
        "the prompt arrived as one argument, unchanged"
    );
    assert_eq!(
        evs[4].raw,
        work.display().to_string(),
        "it ran in the asked directory"
    );
    assert!(!Path::new("/tmp/polydev-injected").exists());
    assert_eq!(
        evs.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..8).collect::<Vec<_>>()
    );
    // The SSE stream carried the same events in order, then `end`.
    let ids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    assert_eq!(ids, ["1", "2", "3", "4", "5", "6", "7"], "{text}");
    assert!(
        text.contains("event: output") && text.contains("event: state"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("event: end\ndata: {}"), "{text}");
    // Resume after an event: only the later ones.
    let resumed = rig
        .client
        .get(format!("{}/api/v1/runs/{id}/events", rig.base))
        .bearer_auth(&t)
        .header("accept", "text/event-stream")
        .header("last-event-id", "5")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let ids: Vec<&str> = resumed
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    assert_eq!(ids, ["6", "7"]);
    // JSON form: the same events.
    let (_, _, v) = rig
        .call(Method::GET, &format!("/api/v1/runs/{id}/events"), &t, None)
        .await;
    assert_eq!(v.as_array().unwrap().len(), 7);
    assert_eq!(v[2]["type"], "start");
    assert_eq!(v[2]["source"], "output");

    // A failing command: failed with its exit code; stderr kept as raw.
    let (_, _, v) = rig
        .call(Method::POST, "/api/v1/runs", &t, Some(run_body("fail")))
        .await;
    let fid = v["id"].as_str().unwrap().to_string();
    let run = rig.wait_state(&fid, RunState::Failed).await;
    assert_eq!(run.exit_code, Some(3));
    assert!(run.reason.unwrap().contains("status 3"));
    assert!(rig
        .events(&fid)
        .await
        .iter()
        .any(|e| e.raw == "something went wrong"));

    // Cancel a long run: its process group is killed, the run is cancelled.
    let gate = rig.dir.path().join("never");
    let (_, _, v) = rig
        .call(
            Method::POST,
            "/api/v1/runs",
            &t,
            Some(run_body(&format!("wait {}", gate.display()))),
        )
        .await;
    let cid = v["id"].as_str().unwrap().to_string();
    rig.wait_state(&cid, RunState::Running).await;
    eventually(30, "the long run printed", || async {
        rig.events(&cid).await.iter().any(|e| e.kind == "start")
    })
    .await;
    let pid: i32 = std::fs::read_to_string(rig.runs_dir().join(&cid).join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let (st, _, v) = rig
        .call(Method::DELETE, &format!("/api/v1/runs/{cid}"), &t, None)
        .await;
    assert_eq!(st, 202, "{v}");
    assert_eq!(v["cancel_requested"], true);
    let run = rig.wait_state(&cid, RunState::Cancelled).await;
    assert!(run.finished_at.is_some());
    assert!(!alive(pid), "the run's process group is gone");
    assert!(!rig
        .events(&cid)
        .await
        .iter()
        .any(|e| e.raw.contains("after the gate")));
    rig.stop_driver();
}

/// Whether `pid` runs (a zombie does not: nobody here may reap it).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2) != Some("Z"))
        .unwrap_or(false)
}

async fn a_restarted_controller_resumes_or_loses_runs(db: common::TestDb) {
    let mut rig = Rig::start(&db, HttpConfig::unlimited()).await;
    host_row(&rig.store).await;
    let (alice, t) = user(&rig.auth, "alice").await;
    connect(&rig.store, &alice, "fakecli").await;
    let vm = cli_vm(&rig.store, &alice, &[VmState::Creating, VmState::Running]).await;
    rig.run_driver();
    let gate = rig.dir.path().join("gate");
    let gate2 = rig.dir.path().join("gate2");
    let mut ids = Vec::new();
    for g in [&gate, &gate2] {
        let (st, _, v) = rig
            .call(
                Method::POST,
                "/api/v1/runs",
                &t,
                Some(run_body(&format!("wait {}", g.display()))),
            )
            .await;
        assert_eq!(st, 201, "{v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        eventually(30, "the run printed its first line", || async {
            rig.events(id).await.iter().any(|e| e.kind == "start")
        })
        .await;
    }
    // The controller's driver goes away; the runs go on in the VM.
    rig.stop_driver();
    let before: Vec<i64> = {
        let mut v = Vec::new();
        for id in &ids {
            v.push(rig.store.run(id).await.unwrap().output_offset);
        }
        v
    };
    assert!(before.iter().all(|o| *o > 0), "offsets stored: {before:?}");
    // The first finishes while no controller reads it; the second's
    // directory is gone (as after a VM restart).
    std::fs::write(&gate, b"").unwrap();
    let pid: i32 = std::fs::read_to_string(rig.runs_dir().join(&ids[1]).join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The directory goes first: a step of the stopped driver still in
    // flight then reads `absent` (lost, as wanted), never a killed run
    // whose directory is still there.
    // Renamed away in one step, since `remove_dir_all` deletes `pid` before
    // the directory: a read in between would see a dead run, not a gone one.
    let away = rig.dir.path().join("gone-run");
    std::fs::rename(rig.runs_dir().join(&ids[1]), &away).unwrap();
    std::fs::remove_dir_all(&away).unwrap();
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    eventually(30, "the first run exits in the VM", || async {
        rig.runs_dir().join(&ids[0]).join("exit").exists()
    })
    .await;

    rig.run_driver();
    let done = rig.wait_state(&ids[0], RunState::Succeeded).await;
    assert_eq!(done.exit_code, Some(0));
    let evs = rig.events(&ids[0]).await;
    let outputs: Vec<&str> = evs
        .iter()
        .filter(|e| e.source == "output")
        .map(|e| e.kind.as_str())
        .collect();
    assert_eq!(
        outputs,
        ["start", "delta", "result"],
        "every line once: {evs:?}"
    );
    let lost = rig.wait_state(&ids[1], RunState::Lost).await;
    let why = lost.reason.unwrap();
    assert!(why.contains("gone") && why.contains(&vm.id), "{why}");

    // A run whose VM stops is lost with the VM's state as the reason.
    let gate3 = rig.dir.path().join("gate3");
    let (_, _, v) = rig
        .call(
            Method::POST,
            "/api/v1/runs",
            &t,
            Some(run_body(&format!("wait {}", gate3.display()))),
        )
        .await;
    let id3 = v["id"].as_str().unwrap().to_string();
    rig.wait_state(&id3, RunState::Running).await;
    let vm = rig.store.vm(&vm.id).await.unwrap();
    rig.store
        .transition_vm(&vm, VmState::Hibernating, None, Also::default())
        .await
        .unwrap();
    let lost = rig.wait_state(&id3, RunState::Lost).await;
    assert!(lost.reason.unwrap().contains("hibernating"));
    std::fs::write(&gate3, b"").unwrap();
    rig.stop_driver();
}
