//! `polydev up` end to end through its HTTP API: the first start prints a
//! one-time admin link; the admin logs in with it, makes an API token,
//! connects a (test) provider, reaches the login's desktop through a
//! ticket and the WebSocket stream, and follows the session's event stream
//! while real VMs boot, the login runs and the credential is sealed and
//! delivered; the credential and the CLI VM are visible through the API;
//! the CLI VM's terminal runs a shell that sees the credential; a restart
//! prints no second link and keeps the token; SIGTERM stops cleanly.

use std::time::{Duration, Instant};

use polydev_e2e::http::{
    call, make_token, read_until, redeem_link, sse_until, websocket, ApiProcess,
};
use serde_json::json;

mod driver_support;

/// The login serves a stand-in "desktop" on the VNC port (a line echo,
/// which then opens the gate) and writes its credential only after the
/// gate opened: the session completes only if the desktop stream reached
/// the VM.
const LOGIN: &str = r#"
printf '#!/bin/sh\nread l\necho "echo:$l"\ntouch /tmp/desktop-seen\n' > /tmp/h.sh
chmod +x /tmp/h.sh
busybox nc -ll -p 5900 -e /tmp/h.sh &
echo "Open https://auth.test.invalid/authorize?state=up1 in your browser"
while [ ! -f /tmp/desktop-seen ]; do sleep 0.2; done
mkdir -p "$HOME/.quick"
printf '{"token": "tok-up-1"}' > "$HOME/.quick/auth.json"
"#;

/// Open the session's desktop WebSocket with `ticket`: the upgrade's
/// status, and on 101 the connection.
fn desktop(
    addr: &str,
    id: &str,
    ticket: &str,
) -> Result<tungstenite::WebSocket<std::net::TcpStream>, u16> {
    websocket(
        addr,
        &format!("/api/v1/sessions/{id}/desktop?ticket={ticket}"),
    )
}

/// `polydev up` on `data`, logging to `up-<tag>.log`.
fn start_up(data: &std::path::Path, tag: &str) -> (ApiProcess, String, Option<String>) {
    polydev_e2e::http::start_up(data, &format!("up-{tag}.log"))
}

#[test]
fn up_serves_the_api_and_a_connect_session_completes_through_it() {
    let dir = tempfile::Builder::new()
        .prefix("pdu")
        .tempdir_in("/tmp")
        .unwrap();
    let data = dir.path();
    std::fs::create_dir_all(data.join("providers")).unwrap();
    std::fs::write(
        data.join("providers/quick.toml"),
        driver_support::test_provider("quick", LOGIN, "output", ".quick/auth.json"),
    )
    .unwrap();
    std::fs::write(
        data.join("driver.toml"),
        format!(
            "providers_dir = \"{}\"\nbrowser_image = \"minimal\"\ncli_image = \"minimal\"\nbrowser_memory_mib = 0\ncli_memory_mib = 0\nlogin_user = \"root\"\nlogin_home = \"/root\"\ncli_home = \"/root\"\ncli_owner = \"\"\npoll_ms = 200\nidle_poll_ms = 300\n",
            data.join("providers").display()
        ),
    )
    .unwrap();

    let (up, addr, link) = start_up(data, "first");
    let link = link.unwrap_or_else(|| panic!("no login link on first start: {}", up.text()));
    let cookie = redeem_link(&addr, &link);
    let token = make_token(
        &addr,
        &cookie,
        "e2e",
        &[
            "sessions:read",
            "sessions:write",
            "vms:read",
            "vms:write",
            "credentials:read",
            "streams:connect",
        ],
    );
    let auth = format!("Bearer {token}");
    let h = [("authorization", auth.as_str())];

    let r = call(&addr, "GET", "/api/v1/providers", &h, None);
    let ids: Vec<String> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["quick"]);

    let r = call(
        &addr,
        "POST",
        "/api/v1/sessions",
        &h,
        Some(&json!({"provider": "quick"})),
    );
    assert_eq!(r.status, 201, "{:?}", r.json());
    let id = r.json()["id"].as_str().unwrap().to_string();

    // The login waits on its desktop: reach it through a ticket.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let r = call(&addr, "GET", &format!("/api/v1/sessions/{id}"), &h, None);
        let st = r.json()["state"].as_str().unwrap_or("").to_string();
        if st == "awaiting_user" {
            break;
        }
        assert!(
            !r.json()["done"].as_bool().unwrap_or(true),
            "session ended: {:?}",
            r.json()
        );
        assert!(
            Instant::now() < deadline,
            "session stuck in {st}: {}",
            up.text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let ticket = |h: &[(&str, &str)]| {
        let r = call(
            &addr,
            "POST",
            "/api/v1/tickets",
            h,
            Some(&json!({"kind": "desktop", "resource_id": id})),
        );
        assert_eq!(r.status, 201, "{:?}", r.json());
        r.json()["ticket"].as_str().unwrap().to_string()
    };
    let t = ticket(&h);
    let mut ws = desktop(&addr, &id, &t).expect("desktop WebSocket");
    ws.send(tungstenite::Message::Binary(b"hello rfb\n".to_vec().into()))
        .unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"\n") {
        match ws.read().expect("desktop bytes") {
            tungstenite::Message::Binary(b) => got.extend_from_slice(&b),
            tungstenite::Message::Close(_) => break,
            _ => {}
        }
    }
    assert_eq!(got, b"echo:hello rfb\n");
    drop(ws);
    assert_eq!(
        desktop(&addr, &id, &t).err(),
        Some(401),
        "a ticket opens one stream"
    );

    let events = sse_until(&addr, &format!("/api/v1/sessions/{id}/events"), &h, "end");
    let states: Vec<&str> = events
        .iter()
        .filter(|e| e.event == "state")
        .filter_map(|e| e.data["to_state"].as_str())
        .collect();
    assert_eq!(
        states.last().copied(),
        Some("completed"),
        "{events:#?}\n{}",
        up.text()
    );
    for s in [
        "starting_vm",
        "starting_login",
        "awaiting_user",
        "capturing",
        "delivering",
    ] {
        assert!(states.contains(&s), "{s} missing from {states:?}");
    }
    assert!(
        events.iter().any(
            |e| e.data["detail"]["auth_url"] == "https://auth.test.invalid/authorize?state=up1"
        ),
        "auth URL in the events: {events:#?}"
    );
    let r = call(&addr, "GET", &format!("/api/v1/sessions/{id}"), &h, None);
    assert_eq!(r.json()["state"], "completed");
    let r = call(&addr, "GET", "/api/v1/credentials", &h, None);
    let creds = r.json();
    assert_eq!(creds.as_array().unwrap().len(), 1, "{creds}");
    assert_eq!(creds[0]["provider"], "quick");
    assert!(creds[0].get("ciphertext").is_none());
    let r = call(&addr, "GET", "/api/v1/vms", &h, None);
    let vms = r.json();
    let cli = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["kind"] == "cli")
        .unwrap_or_else(|| panic!("the CLI VM: {vms}"));
    assert_eq!(cli["state"], "running");
    let cli_id = cli["id"].as_str().unwrap().to_string();

    // The CLI VM's terminal: a login shell on a terminal of the asked
    // size, resizable, where the delivered credential is; its exit status
    // comes back and the ticket is spent.
    let ticket = || {
        let r = call(
            &addr,
            "POST",
            "/api/v1/tickets",
            &h,
            Some(&json!({"kind": "terminal", "resource_id": cli_id})),
        );
        assert_eq!(r.status, 201, "{:?}", r.json());
        r.json()["ticket"].as_str().unwrap().to_string()
    };
    let t = ticket();
    let path = format!("/api/v1/vms/{cli_id}/terminal?ticket={t}&cols=100&rows=30");
    let mut term = websocket(&addr, &path).expect("terminal WebSocket");
    let bin = |s: &str| tungstenite::Message::Binary(s.as_bytes().to_vec().into());
    term.send(bin("stty size; tty\n")).unwrap();
    let out = read_until(&mut term, "30 100");
    assert!(
        read_until(&mut term, "/dev/pts/").contains("/dev/pts/"),
        "{out}"
    );
    term.send(tungstenite::Message::Text(
        r#"{"type": "resize", "cols": 90, "rows": 20}"#.into(),
    ))
    .unwrap();
    term.send(bin("stty size\n")).unwrap();
    read_until(&mut term, "20 90");
    term.send(bin("cat /root/.quick/auth.json; echo\n"))
        .unwrap();
    read_until(&mut term, "tok-up-1");
    term.send(bin("exit 7\n")).unwrap();
    let exit = loop {
        match term.read().expect("terminal exit") {
            tungstenite::Message::Text(t) => {
                break serde_json::from_str::<serde_json::Value>(&t).unwrap()
            }
            tungstenite::Message::Binary(_) => {}
            other => panic!("terminal ended without an exit status: {other:?}"),
        }
    };
    assert_eq!(exit, json!({"type": "exit", "code": 7, "signal": null}));
    match term.read() {
        Ok(tungstenite::Message::Close(Some(c))) => assert_eq!(u16::from(c.code), 1000),
        other => panic!("expected a normal close after the exit: {other:?}"),
    }
    assert_eq!(
        websocket(&addr, &path).err(),
        Some(401),
        "a ticket opens one terminal"
    );

    // Kept terminals: leaving keeps the shell, coming back restores the
    // screen and reaches the same shell; names give several; a close
    // control ends one.
    let open = |name: &str| {
        let t = ticket();
        websocket(
            &addr,
            &format!("/api/v1/vms/{cli_id}/terminal?ticket={t}&session={name}"),
        )
        .expect("terminal WebSocket")
    };
    // The shell's pid, printed so that the typed line (echoed by the
    // terminal) cannot be mistaken for the answer.
    let shell_pid = |ws: &mut tungstenite::WebSocket<std::net::TcpStream>, tag: &str| {
        ws.send(bin(&format!("echo {tag}-$((1+1))-$$-end\n")))
            .unwrap();
        let want = format!("{tag}-2-");
        let mut text = String::new();
        loop {
            text.push_str(&read_until(ws, "-end"));
            if let Some(at) = text.find(&want) {
                if let Some(pid) = text[at + want.len()..].split("-end").next() {
                    if text[at..].contains("-end") {
                        return pid.to_string();
                    }
                }
            }
        }
    };
    let mut one = open("work");
    let pid_one = shell_pid(&mut one, "first");
    assert!(pid_one.parse::<u32>().is_ok(), "{pid_one}");
    one.send(bin("echo kept-$((40+2))-marker\n")).unwrap();
    read_until(&mut one, "kept-42-marker");
    drop(one);
    let again = Instant::now();
    let mut one = open("work");
    // The replay alone brings the marker back: nothing typed yet.
    read_until(&mut one, "kept-42-marker");
    let reconnect = again.elapsed();
    assert_eq!(shell_pid(&mut one, "again"), pid_one, "the same shell");
    let mut two = open("other");
    let pid_two = shell_pid(&mut two, "second");
    assert_ne!(pid_two, pid_one, "another name, another shell");
    one.send(tungstenite::Message::Text(r#"{"type": "close"}"#.into()))
        .unwrap();
    let closed = loop {
        match one.read().expect("the closed terminal's exit") {
            tungstenite::Message::Text(t) => {
                break serde_json::from_str::<serde_json::Value>(&t).unwrap()
            }
            tungstenite::Message::Binary(_) => {}
            other => panic!("terminal ended without an exit status: {other:?}"),
        }
    };
    assert_eq!(closed["type"], "exit", "{closed}");
    let mut one = open("work");
    assert_ne!(shell_pid(&mut one, "third"), pid_one, "closed: a new shell");
    assert_eq!(
        shell_pid(&mut two, "fourth"),
        pid_two,
        "the other one lives on"
    );
    println!(
        "kept terminal: reconnect (ticket, WebSocket, screen restored) in {} ms",
        reconnect.as_millis()
    );
    assert_eq!(call(&addr, "GET", "/metrics", &[], None).status, 401);
    assert_eq!(call(&addr, "GET", "/metrics", &h, None).status, 403);
    // The admin's login session holds metrics:read (a scraper would get a
    // token with only that scope).
    let m = call(&addr, "GET", "/metrics", &[("cookie", &cookie)], None);
    assert_eq!(m.status, 200);
    let text = String::from_utf8_lossy(&m.body).to_string();
    assert!(
        text.contains("polydev_sessions{state=\"completed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("route=\"/api/v1/sessions\",status=\"201\"} 1"),
        "{text}"
    );
    assert!(
        !up.text().contains(&token[20..]),
        "the API token reached the log"
    );
    assert_eq!(up.stop(), 0);

    // A restart: no second admin link, the token still works, and the API
    // destroys the CLI VM through the driver.
    let (up, addr, link) = start_up(data, "second");
    assert!(
        link.is_none(),
        "a second login link was printed: {}",
        up.text()
    );
    let r = call(&addr, "GET", "/api/v1/me", &h, None);
    assert_eq!(r.status, 200);
    let r = call(&addr, "DELETE", &format!("/api/v1/vms/{cli_id}"), &h, None);
    assert_eq!(r.status, 202, "{:?}", r.json());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = call(&addr, "GET", &format!("/api/v1/vms/{cli_id}"), &h, None);
        if r.json()["state"] == "destroyed" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "VM not destroyed: {:?}",
            r.json()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = call(&addr, "GET", "/readyz", &[], None);
    assert_eq!(r.status, 200);
    assert_eq!(up.stop(), 0);
}
