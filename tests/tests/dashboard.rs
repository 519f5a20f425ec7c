//! The dashboard in a real browser (Debian's Chromium driven by
//! playwright-core: `web/e2e/*.mjs`), against a real `polydev up` on the
//! real browser and CLI images with the test provider, a real
//! authorization server and the user's upstream — one controller and one
//! browser VM for the whole test.
//!
//! `journey.mjs` walks what a person does: the first-start link and a new
//! password, Providers → Connect, the desktop in the page, sign-in and
//! consent by clicking and typing on the noVNC canvas, Connected, then
//! `polydev-testcli whoami` in the CLI workspace's terminal. On the way it
//! cuts the desktop WebSocket (the session goes on, the page reconnects)
//! and runs axe-core on every page. `access.mjs` then checks a second
//! user cannot see the first one's session, admin pages need the admin
//! role, a cookie whose login ended lands on sign-in, and another origin
//! cannot change anything with the user's cookie. Screenshots go to
//! `target/test-artifacts/dashboard-*.png`; the numbers the issue asks for
//! are the MEASURE lines.

mod egress_support;
mod signin_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use polydev_e2e::oauth::random_hex;
use signin_support::{artifacts, world_unclaimed};

/// The web app's directory, with its packages installed and its build
/// present (the README's setup does both).
fn web_dir() -> PathBuf {
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("../web");
    for need in [
        "node_modules/playwright-core",
        "node_modules/@axe-core/playwright",
        "dist/index.html",
    ] {
        assert!(
            web.join(need).exists(),
            "web/{need} is missing: run ./polydev.sh setup (it installs the web app's packages and builds it)"
        );
    }
    web
}

/// Run one browser script; its output is echoed as it comes, and returned.
fn run_script(web: &Path, script: &str, env: &[(&str, String)]) -> String {
    use std::io::BufRead as _;
    let mut cmd = Command::new("node");
    cmd.arg(web.join("e2e").join(script))
        .current_dir(web)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!("cannot run node for {script}: {e} (./polydev.sh setup installs Node.js)")
    });
    let mut out = String::new();
    if let Some(stdout) = child.stdout.take() {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            eprintln!("{script}: {line}");
            out.push_str(&line);
            out.push('\n');
        }
    }
    let status = child.wait().expect("wait for node");
    assert!(
        status.success(),
        "{script} failed ({status}); its output is above"
    );
    out
}

#[test]
fn a_person_connects_and_uses_the_cli_from_the_web_page() {
    let web = web_dir();
    let w = world_unclaimed(&["alice"]);
    let (who, password) = w.accounts[0].clone();
    let link = w.first_link.clone().expect("the first-start link");
    let admin_password = format!("admin-{}", random_hex(12));
    let common = vec![
        ("POLYDEV_URL", format!("http://{}", w.addr)),
        ("POLYDEV_ARTIFACTS", artifacts().display().to_string()),
        (
            "POLYDEV_SIGNIN_COLOURS",
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("oidc/signin-colours.json")
                .display()
                .to_string(),
        ),
        ("POLYDEV_ADMIN_PASSWORD", admin_password),
    ];
    let mut journey = common.clone();
    journey.extend([
        ("POLYDEV_LINK", link),
        ("POLYDEV_OIDC_USER", who.clone()),
        ("POLYDEV_OIDC_PASSWORD", password),
    ]);
    let out = run_script(&web, "journey.mjs", &journey);
    let session = out
        .lines()
        .find_map(|l| l.strip_prefix("SESSION "))
        .expect("the journey names its session")
        .trim()
        .to_string();
    // The authorization server saw the person sign in, consent, and the
    // CLI VM's check use the credential: all through the desktop.
    for event in ["login_ok", "consent_ok", "token", "userinfo"] {
        w.server.wait_event(event, |e| e["user"] == who.as_str());
    }

    let mut access = common;
    access.push(("POLYDEV_OTHER_SESSION", session));
    run_script(&web, "access.mjs", &access);
}
