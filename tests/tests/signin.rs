//! Real sign-ins on the real browser image, as a person does them: the
//! test CLI's login runs in the desktop session, its authorize URL opens in
//! the desktop's Chromium, and the test signs in *only through the
//! session's desktop WebSocket* — RFB pointer clicks on the fields and
//! buttons (found by their colours) and key events typing the name and
//! password. The authorization server is real (panva/oidc-provider over
//! TLS with a CA made for this run, `tests/oidc/signin.js`), reached by the
//! VMs under its name `auth.polydev.test` through the user's upstream proxy
//! only; the upstream maps that name to the loopback server and refuses
//! everything else. The CLI's loopback callback gets the code, the
//! credential is captured, sealed, delivered into the user's CLI VM, and
//! the provider's check (`polydev-testcli whoami` through the same
//! upstream) decides completion. Everything else is production defaults:
//! the browser and CLI images, their unprivileged user, delivery as that
//! user, memory.
//!
//! One controller serves the whole test. Three people connect, each
//! through their own upstream (its own port of the provider's range,
//! leaving from its own address), their sessions live at the same time
//! (one browser VM boots at a time while the earlier ones wait; all three
//! are signed in on their consent pages before any allows): the authorization server sees each
//! person's sign-in, token exchange and check arrive from that person's
//! upstream, and each CLI VM holds its own person's credential only. The
//! first mistypes their password once (the page says so, the flow goes
//! on). Then the first connects again and denies consent, which fails with
//! the CLI's own message, kept in the browser VM's archived console log.

mod egress_support;
mod signin_support;

use std::time::{Duration, Instant};

use polydev_e2e::http::call;
use polydev_e2e::oauth::{colour, ISSUER_HOST};
use polydev_e2e::rfb::{self, Frame, WsStream};
use serde_json::{json, Value};
use signin_support::{artifacts, world, Api, World, DESKTOP_DEADLINE, F5};

/// A box's centre.
fn centre((x, y, w, h): (usize, usize, usize, usize)) -> (usize, usize) {
    (x + w / 2, y + h / 2)
}

/// Capture frames until `found` holds for one (saved as `png`), reloading
/// the page now and then as a person would when it shows an error.
fn wait_screen<T>(
    desk: &mut rfb::Session<WsStream>,
    what: &str,
    png: &str,
    deadline: Duration,
    reload: bool,
    found: impl Fn(&Frame) -> Option<T>,
) -> (Frame, T) {
    let path = artifacts().join(png);
    let until = Instant::now() + deadline;
    let mut reload_at = Instant::now() + Duration::from_secs(90);
    loop {
        let f = desk.frame().expect("capture the desktop");
        if let Some(v) = found(&f) {
            f.save_png(&path).expect("save screenshot");
            eprintln!("{what}: {}", path.display());
            return (f, v);
        }
        if reload && Instant::now() > reload_at {
            desk.tap(F5).expect("reload");
            reload_at = Instant::now() + Duration::from_secs(90);
        }
        if Instant::now() > until {
            f.save_png(&path).expect("save screenshot");
            panic!("{what} never showed; last screen: {}", path.display());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The sign-in page fills the screen (the window is maximised): its
/// background spans nearly the whole width.
fn signin_page(f: &Frame) -> Option<()> {
    let (_, _, w, h) = f.find_colour(colour("login_background"), 6, 200_000)?;
    (w * 10 >= f.width * 9 && h * 2 >= f.height).then_some(())
}

/// Click into the field filled with `fill` and type `text`, then look at
/// the screen until the field shows it (a page still settling can swallow
/// the first keys: a person looks and types again).
fn fill_field(desk: &mut rfb::Session<WsStream>, tag: &str, fill: [u8; 3], text: &str, what: &str) {
    // A page still loading on a busy host takes keys late: a person
    // looks, and types again, for a few minutes.
    let until = Instant::now() + Duration::from_secs(300);
    while Instant::now() < until {
        // The page may be covered a moment (a window opening over it).
        let (_, field) = wait_screen(
            desk,
            &format!("{tag}: the {what} field"),
            &format!("signin-{tag}-field.png"),
            Duration::from_secs(120),
            false,
            |f| f.find_colour(fill, 8, 500),
        );
        let (x, y) = centre(field);
        desk.click(x, y).expect("click the field");
        desk.ctrl('a').expect("select all");
        desk.tap(rfb::keysym::BACKSPACE).expect("clear");
        desk.type_text(text).expect("type");
        let until = Instant::now() + Duration::from_secs(20);
        while Instant::now() < until {
            let f = desk.frame().expect("capture the desktop");
            if let Some((fx, fy, fw, fh)) = f.find_colour(fill, 8, 500) {
                // Typed characters (or a password's dots) are dark pixels
                // inside the field's box.
                let dark = (fy..fy + fh)
                    .flat_map(|yy| (fx..fx + fw).map(move |xx| (xx, yy)))
                    .filter(|&(xx, yy)| f.at(xx, yy).iter().all(|c| *c < 90))
                    .count();
                if dark >= 40 * text.len().min(8) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        eprintln!("{tag}: the {what} field did not show the typed text; typing again");
    }
    panic!("{tag}: could not type into the {what} field");
}

/// The consent page (both buttons on it): where the button filled with
/// colour `button` is.
fn consent_page(button: &str) -> impl Fn(&Frame) -> Option<(usize, usize, usize, usize)> + '_ {
    move |f| {
        f.find_colour(colour("consent_background"), 6, 100_000)?;
        f.find_colour(colour("deny_button"), 8, 500)?;
        f.find_colour(colour("allow_button"), 8, 500)?;
        f.find_colour(colour(button), 8, 500)
    }
}

/// Wait for the consent page, save it as `png`, and click the button
/// filled with colour `button`.
fn consent(desk: &mut rfb::Session<WsStream>, png: &str, button: &str) {
    let (_, target) = wait_screen(
        desk,
        "consent page",
        png,
        Duration::from_secs(300),
        false,
        consent_page(button),
    );
    let (x, y) = centre(target);
    desk.click(x, y).expect("click the button");
}

/// Sign in on the page shown: name, then password, then Enter.
fn type_credentials(desk: &mut rfb::Session<WsStream>, tag: &str, user: &str, password: &str) {
    fill_field(desk, tag, colour("username_input"), user, "user name");
    fill_field(desk, tag, colour("password_input"), password, "password");
    desk.tap(rfb::keysym::RETURN).expect("Enter");
}

/// Run `script` in the user's CLI VM as its user through the terminal
/// WebSocket; the output up to the shell's exit.
fn in_cli_vm(api: &Api, vm: &str, script: &str) -> String {
    let (st, t) = api.post(
        "/api/v1/tickets",
        json!({"kind": "terminal", "resource_id": vm}),
    );
    assert_eq!(st, 201, "{t}");
    let url = format!(
        "ws://{}/api/v1/vms/{vm}/terminal?ticket={}&cols=200&rows=50",
        api.addr,
        t["ticket"].as_str().expect("ticket")
    );
    let stream = std::net::TcpStream::connect(&api.addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(300))).ok();
    let (mut ws, _) = tungstenite::client::client(url, stream).expect("terminal WebSocket");
    ws.send(tungstenite::Message::Binary(
        format!("{script}; exit\n").into_bytes().into(),
    ))
    .expect("type into the terminal");
    let mut out = Vec::new();
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Binary(b)) => out.extend_from_slice(&b),
            Ok(tungstenite::Message::Text(t)) if t.contains("\"exit\"") => break,
            Ok(tungstenite::Message::Close(_)) => break,
            Ok(_) => {}
            Err(e) => panic!("terminal: {e}: {}", String::from_utf8_lossy(&out)),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Counts people who reached a step; others wait for a count (bounded:
/// a person who failed makes the others fail at the deadline, not hang).
#[derive(Default)]
struct Gate {
    /// People arrived, and whether someone gave up (panicked).
    count: std::sync::Mutex<(usize, bool)>,
    changed: std::sync::Condvar,
}

impl Gate {
    fn arrive(&self) {
        self.count.lock().unwrap_or_else(|p| p.into_inner()).0 += 1;
        self.changed.notify_all();
    }

    fn give_up(&self) {
        self.count.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.changed.notify_all();
    }

    fn wait_for(&self, n: usize, what: &str) {
        let until = Instant::now() + DESKTOP_DEADLINE * 2;
        let mut count = self.count.lock().unwrap_or_else(|p| p.into_inner());
        while count.0 < n {
            assert!(!count.1, "someone else failed while waiting for {what}");
            let left = until.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "waited too long for {what}");
            count = self
                .changed
                .wait_timeout(count, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Where the people of the test stand: whose turn it is to connect (one
/// browser VM boots at a time, the others' sessions already waiting), and
/// who reached the consent page (all Allow together, so the three
/// sign-ins are live at once).
#[derive(Default)]
struct Together {
    connected: Gate,
    at_consent: Gate,
}

/// Held by each person's thread: a person who fails releases the others
/// from waiting for them.
struct GiveUpOnPanic<'a>(&'a Together);

impl Drop for GiveUpOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.connected.give_up();
            self.0.at_consent.give_up();
        }
    }
}

/// The message a thread panicked with.
fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// What one person's sign-in left to check.
struct SignedIn {
    session: Value,
    visible: Duration,
}

/// One person connects the test provider through their desktop: the
/// sign-in page, optionally a wrong password first, the right one,
/// consent, and completion.
fn sign_in(w: &World, i: usize, together: &Together) -> SignedIn {
    let _give_up = GiveUpOnPanic(together);
    let who = &w.people[i];
    let wrong_first = i == 0;
    let api = &who.api;
    let tag = who.name.as_str();
    // 1. Connect: the browser VM boots, the login starts in its desktop.
    // One boot at a time (a desktop under TCG is the heaviest step); the
    // earlier people's sessions keep waiting for them meanwhile.
    together
        .connected
        .wait_for(i, &format!("{tag}'s turn to connect"));
    let (st, s) = api.post("/api/v1/sessions", json!({"provider": "testcli"}));
    assert_eq!(st, 201, "{tag}: {s}");
    let id = s["id"].as_str().expect("id").to_string();
    let created = Instant::now();
    api.wait_session(
        &id,
        &format!("{tag}: the login to await the person"),
        DESKTOP_DEADLINE,
        &["awaiting_user"],
    );
    together.connected.arrive();
    let events = api.get(&format!("/api/v1/sessions/{id}/events"));
    let url = events
        .as_array()
        .and_then(|e| e.iter().find_map(|e| e["detail"]["auth_url"].as_str()))
        .unwrap_or_else(|| panic!("{tag}: no auth URL in the timeline: {events}"))
        .to_string();
    assert!(url.starts_with("https://auth.polydev.test/auth?"), "{url}");
    for part in [
        "client_id=polydev-testcli",
        "code_challenge_method=S256",
        "state=",
        "redirect_uri=http%3A%2F%2F127.0.0.1%3A",
    ] {
        assert!(url.contains(part), "{part} in {url}");
    }

    // 2. The sign-in page, full screen, in the desktop the person sees.
    let mut desk = api.desktop(&id);
    wait_screen(
        &mut desk,
        &format!("{tag}: sign-in page"),
        &format!("signin-{tag}-1-page.png"),
        DESKTOP_DEADLINE,
        true,
        signin_page,
    );
    let visible = created.elapsed();

    // What the authorization server made of each of this person's
    // submissions (told apart from the others' by their upstream's
    // address). A busy host can lose keys while the page settles, so a
    // submission may reach the server mangled (an empty or cut name): a
    // person then sees the page again and types again, up to 3 times.
    let peer = upstream_of(w, i).source.to_string();
    let outcomes = || -> Vec<Value> {
        w.server
            .events()
            .into_iter()
            .filter(|e| {
                (e["event"] == "login_ok" || e["event"] == "login_failed")
                    && e["peer"].as_str().map(|p| p.trim_start_matches("::ffff:"))
                        == Some(peer.as_str())
            })
            .collect()
    };
    let submit = |desk: &mut rfb::Session<WsStream>, password: &str, want: &str| {
        for attempt in 1..=3 {
            let before = outcomes().len();
            type_credentials(desk, tag, &who.name, password);
            let typed = Instant::now();
            // A submission whose Enter was lost never arrives: typed again.
            let until = typed + Duration::from_secs(120);
            let seen = loop {
                if let Some(e) = outcomes().get(before) {
                    break e.clone();
                }
                if Instant::now() > until {
                    break json!({"event": "nothing within 120 s"});
                }
                std::thread::sleep(Duration::from_millis(300));
            };
            if seen["event"] == want && seen["user"] == who.name.as_str() {
                return typed;
            }
            assert!(
                attempt < 3,
                "{tag}: the server kept seeing {seen}, not {want}"
            );
            eprintln!("{tag}: the server saw {seen} (keys lost while typing); typing again");
        }
        unreachable!("the loop returns or fails")
    };

    // 3. A wrong password: the page says so and the flow goes on.
    if wrong_first {
        submit(&mut desk, "not-the-password", "login_failed");
        wait_screen(
            &mut desk,
            &format!("{tag}: wrong password banner"),
            &format!("signin-{tag}-2-wrong-password.png"),
            Duration::from_secs(180),
            false,
            |f| {
                f.find_colour(colour("error_banner"), 6, 2000)?;
                f.find_colour(colour("password_input"), 8, 500).map(|_| ())
            },
        );
    }

    // 4. The right one, then consent.
    let submitted = submit(&mut desk, &who.password, "login_ok");
    let (_, allow) = wait_screen(
        &mut desk,
        &format!("{tag}: consent page"),
        &format!("signin-{tag}-3-consent.png"),
        Duration::from_secs(300),
        false,
        consent_page("allow_button"),
    );
    // Everyone is signed in and on their consent page: all sessions are
    // live at once. Then each allows.
    together.at_consent.arrive();
    together
        .at_consent
        .wait_for(w.people.len(), "everyone at their consent page");
    let (x, y) = centre(allow);
    desk.click(x, y).expect("click Allow");
    let allowed = Instant::now();

    // 5. The CLI's callback, capture, seal, delivery, and the check.
    let done = api.wait_session(
        &id,
        &format!("{tag}: completion"),
        Duration::from_secs(900),
        &["completed"],
    );
    eprintln!(
        "MEASURE {tag}: session create -> sign-in page visible: {visible:.1?}; password submit -> delivered: {:.1?} (Allow click -> delivered: {:.1?})",
        submitted.elapsed(),
        allowed.elapsed()
    );
    let _ = desk
        .frame()
        .map(|f| f.save_png(&artifacts().join(format!("signin-{tag}-4-after-allow.png"))));
    SignedIn {
        session: done,
        visible,
    }
}

/// Person `i`'s upstream (the port the controller assigned them): the
/// authorization server sees their requests come from its address.
fn upstream_of(w: &World, i: usize) -> &signin_support::Upstream {
    let who = &w.people[i];
    let r = call(
        &w.people[0].api.addr,
        "GET",
        "/api/v1/admin/upstreams",
        &[("cookie", &w.admin_cookie)],
        None,
    );
    assert_eq!(r.status, 200, "{:?}", r.json());
    let assigned = r.json();
    let port = assigned["assignments"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["user_id"] == who.user_id.as_str()))
        .and_then(|a| a["port"].as_u64())
        .unwrap_or_else(|| panic!("{}: no upstream port: {assigned}", who.name));
    w.upstreams
        .iter()
        .find(|u| u64::from(u.port) == port)
        .unwrap_or_else(|| panic!("{}: port {port} is not one of the test's", who.name))
}

#[test]
fn three_people_sign_in_through_their_desktops_and_each_cli_vm_uses_only_its_own() {
    let w = world(&["alice", "bob", "carol"]);

    // Three people connect, each through their own desktop and upstream,
    // all live at once; the first mistypes their password once.
    let together = Together::default();
    let done: Vec<SignedIn> = std::thread::scope(|scope| {
        let running: Vec<_> = (0..w.people.len())
            .map(|i| {
                let (w, together) = (&w, &together);
                scope.spawn(move || sign_in(w, i, together))
            })
            .collect();
        let joined: Vec<_> = running.into_iter().map(|t| t.join()).collect();
        // The person who failed first, not those released by their failure.
        let mut failures: Vec<_> = joined.iter().filter_map(|r| r.as_ref().err()).collect();
        failures.sort_by_key(|e| panic_text(e.as_ref()).contains("someone else failed"));
        if let Some(first) = failures.first() {
            panic!("{}", panic_text(first.as_ref()));
        }
        joined.into_iter().filter_map(Result::ok).collect()
    });
    let slowest = done.iter().map(|d| d.visible).max().unwrap_or_default();
    eprintln!("MEASURE slowest of three: session create -> sign-in page visible: {slowest:.1?}");

    // Each person's upstream is their own port, and the authorization
    // server saw everything of each person's sign-in, token exchange and
    // check come from that person's upstream.
    let mut sources = Vec::new();
    for (i, who) in w.people.iter().enumerate() {
        let up = upstream_of(&w, i);
        sources.push(up.source);
        let mut events = vec!["login_ok", "consent_ok", "token", "userinfo"];
        if who.name == w.people[0].name {
            events.push("login_failed");
        }
        for event in events {
            let e = w
                .server
                .wait_event(event, |e| e["user"] == who.name.as_str());
            assert_eq!(
                e["peer"].as_str().map(|p| p.trim_start_matches("::ffff:")),
                Some(up.source.to_string().as_str()),
                "{}: {event} must arrive from their upstream: {e}",
                who.name
            );
        }
        let seen = up.log.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert!(
            seen.iter()
                .any(|p| p.target == format!("{ISSUER_HOST}:443")),
            "{}: {seen:?}",
            who.name
        );
        assert!(seen.iter().all(|p| p.auth == w.upstream_auth), "{seen:?}");
    }
    sources.sort();
    sources.dedup();
    assert_eq!(sources.len(), w.people.len(), "one upstream per person");

    // Each credential is sealed; each browser VM is gone; each CLI VM holds
    // its own person's credential and nobody else's.
    for (who, d) in w.people.iter().zip(&done) {
        let api = &who.api;
        api.has_credential("testcli");
        api.wait_destroyed(d.session["browser_vm_id"].as_str().expect("browser VM"));
        let vms = api.get("/api/v1/vms");
        let cli_vm = vms
            .as_array()
            .and_then(|v| {
                v.iter()
                    .find(|v| v["kind"] == "cli" && v["state"] == "running")
            })
            .and_then(|v| v["id"].as_str())
            .unwrap_or_else(|| panic!("{}: no running CLI VM: {vms}", who.name))
            .to_string();
        let userinfo_before = w
            .server
            .events()
            .iter()
            .filter(|e| e["event"] == "userinfo" && e["user"] == who.name.as_str())
            .count();
        let out = in_cli_vm(
            api,
            &cli_vm,
            "polydev-testcli whoami; stat -c 'mode=%a owner=%U' ~/.testcli/auth.json ~/.testcli; echo files: $(ls -A ~/.testcli)",
        );
        assert!(
            out.contains(&format!("signed in as {}", who.name)),
            "{}: {out}",
            who.name
        );
        for other in &w.people {
            assert!(
                other.name == who.name || !out.contains(&format!("signed in as {}", other.name)),
                "{}: {out}",
                who.name
            );
        }
        assert!(out.contains("mode=600 owner=user"), "{out}");
        assert!(out.contains("mode=700 owner=user"), "{out}");
        assert!(
            out.contains("files: auth.json\r") || out.contains("files: auth.json\n"),
            "{out}"
        );
        let userinfo_after = w
            .server
            .events()
            .iter()
            .filter(|e| e["event"] == "userinfo" && e["user"] == who.name.as_str())
            .count();
        assert!(
            userinfo_after > userinfo_before,
            "whoami reached userinfo as {}",
            who.name
        );
    }

    // Consent denied: the first person connects again (a new browser VM);
    // the CLI exits non-zero and its words are the reason.
    let who = &w.people[0];
    let api = &who.api;
    let (st, s) = api.post("/api/v1/sessions", json!({"provider": "testcli"}));
    assert_eq!(st, 201, "{s}");
    let id2 = s["id"].as_str().expect("id").to_string();
    api.wait_session(
        &id2,
        "the second login",
        DESKTOP_DEADLINE,
        &["awaiting_user"],
    );
    let mut desk = api.desktop(&id2);
    wait_screen(
        &mut desk,
        "sign-in page (second session)",
        "signin-5-page-again.png",
        DESKTOP_DEADLINE,
        true,
        signin_page,
    );
    type_credentials(&mut desk, "again", &who.name, &who.password);
    consent(&mut desk, "signin-6-consent-again.png", "deny_button");
    drop(desk);
    let until = Instant::now() + Duration::from_secs(600);
    let failed = loop {
        let s = api.get(&format!("/api/v1/sessions/{id2}"));
        if s["done"].as_bool().unwrap_or(false) {
            break s;
        }
        assert!(Instant::now() < until, "denied session did not end: {s}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(failed["state"], "failed", "{failed}");
    assert_eq!(failed["failure"]["reason"], "login_failed", "{failed}");
    let detail = failed["failure"]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("exited with status 1") && detail.contains("access_denied"),
        "the CLI's own message is the reason: {detail}"
    );
    w.server.wait_event("consent_denied", |_| true);
    // Its browser VM is gone and its logs are kept, the CLI's last words
    // among them.
    let vm2 = failed["browser_vm_id"]
        .as_str()
        .expect("browser VM")
        .to_string();
    api.wait_destroyed(&vm2);
    let kept = std::fs::read_dir(w.data.join("logs"))
        .ok()
        .and_then(|d| {
            d.flatten().find(|e| {
                std::fs::read_to_string(e.path().join("vm.json")).is_ok_and(|t| t.contains(&vm2))
            })
        })
        .map(|e| std::fs::read_to_string(e.path().join("console.log")).unwrap_or_default())
        .unwrap_or_default();
    assert!(
        kept.contains("access_denied"),
        "the denied session's browser VM console log under {}/logs keeps the CLI's output: {kept}",
        w.data.display()
    );
    // The first credential is untouched by the failed second session.
    api.has_credential("testcli");
    drop(w.up);
}
