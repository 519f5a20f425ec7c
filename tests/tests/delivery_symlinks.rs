//! Delivery into a CLI VM whose user planted symlinks, with the production
//! defaults on the CLI side (the cli image, its unprivileged `user`,
//! delivery as that user, the image's memory): the user owns their home,
//! so `~/.t -> /` and `~/.t.json.polydev-tmp -> /etc/shadow` are theirs to
//! make. A delivery written as root would follow them (create files in
//! `/`, overwrite `/etc/shadow`, chown them to the user: root in the VM).
//! Written as the user, the writes fail: `/` and `/etc/shadow` stay root's,
//! untouched, and the session fails `delivery_failed` naming the file and
//! the user it was written as.
//!
//! The driver runs in process over the real host agent; the browser VM is
//! the minimal image with a script login (what it runs does not matter
//! here, only where its files go).

use std::time::Duration;

use polydev_controller::driver::DriverConfig;
use polydev_controller::state::{FailureReason, SessionState};
use polydev_controller::store::Store;
use polydev_controller::upstream::UpstreamConfig;
use polydev_e2e::Host;

mod driver_support;

/// Writes the two capture files: a credential and an account file.
const LOGIN: &str = r#"
echo "Open https://auth.test.invalid/authorize?state=s1 in your browser"
mkdir -p "$HOME/.t"
printf '{"token": "tok-sym-1"}' > "$HOME/.t/creds.json"
printf '{"account": "a1"}' > "$HOME/.t.json"
"#;

fn provider() -> String {
    driver_support::test_provider("sym", LOGIN, "output", ".t/creds.json").replace(
        "[refresh]",
        "[[capture]]\npath = \".t.json\"\nrequired = false\njson_keys = [\"account\"]\ndeliver_keys = [\"account\"]\n\n[refresh]",
    )
}

#[test]
fn a_delivery_never_follows_the_users_symlinks_as_root() {
    polydev_e2e::require_images(&["cli"]);
    let host = Host::start();
    let data = host.data().to_path_buf();
    std::fs::create_dir_all(data.join("providers")).unwrap();
    std::fs::write(data.join("providers/sym.toml"), provider()).unwrap();
    // The browser side is a throwaway minimal VM with the login as root;
    // the CLI side is the production default (cli image, `user`).
    let cfg = DriverConfig::parse(
        "browser_image = \"minimal\"\nbrowser_memory_mib = 0\nlogin_user = \"root\"\nlogin_home = \"/root\"\npoll_ms = 200\nidle_poll_ms = 300\n",
        "driver.toml",
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(Store::open_in_dir(&data)).unwrap();
    let driver = driver_support::driver_at_host(&store, &data, UpstreamConfig::none(), cfg);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let running = rt.spawn(driver.clone().run(stop_rx));
    let user = rt.block_on(store.create_user("sym", "user")).unwrap();

    let finish = |id: &str| driver_support::wait_final(&rt, &store, id, Duration::from_secs(600));

    // A first delivery makes the CLI VM and puts the files there, as the
    // user, 0600.
    let s1 = rt.block_on(store.create_session(&user.id, "sym")).unwrap();
    driver.notify();
    let s1 = finish(&s1.id);
    assert_eq!(
        s1.life.state,
        SessionState::Completed,
        "{:?}",
        s1.life.failure
    );
    let cli = rt
        .block_on(store.non_final_vms())
        .unwrap()
        .into_iter()
        .find(|v| v.user_id == user.id && v.kind == polydev_controller::store::VmKind::Cli)
        .expect("the user's CLI VM");
    let cli = cli.host_vm_id.expect("placed");
    let out = host.sh(
        &cli,
        "stat -c '%n %U %a' /home/user/.t/creds.json /home/user/.t.json",
    );
    assert!(
        out.stdout.contains("/home/user/.t/creds.json user 600")
            && out.stdout.contains("/home/user/.t.json user 600"),
        "{}",
        out.stdout
    );

    // The user plants their symlinks.
    host.sh(
        &cli,
        "runuser -u user -- sh -c 'rm -rf ~/.t && ln -s / ~/.t && ln -s /etc/shadow ~/.t.json.polydev-tmp && ls -la ~'",
    );
    let before = host.sh(
        &cli,
        "stat -c '%n %U %G %a %s %Y' / /etc/shadow; md5sum /etc/shadow",
    );

    // A second delivery: refused, nothing of root's touched.
    let s2 = rt.block_on(store.create_session(&user.id, "sym")).unwrap();
    driver.notify();
    let s2 = finish(&s2.id);
    assert_eq!(s2.life.state, SessionState::Failed, "{:?}", s2.life);
    let failure = s2.life.failure.expect("failure");
    assert_eq!(
        failure.reason,
        FailureReason::DeliveryFailed,
        "{}",
        failure.detail
    );
    assert!(
        failure.detail.contains("/home/user/.t") && failure.detail.contains("as user"),
        "the reason names the file and who wrote it: {}",
        failure.detail
    );
    let after = host.sh(
        &cli,
        "stat -c '%n %U %G %a %s %Y' / /etc/shadow; md5sum /etc/shadow",
    );
    assert_eq!(before.stdout, after.stdout, "/ and /etc/shadow unchanged");
    assert!(after.stdout.contains("/ root root"), "{}", after.stdout);
    assert!(
        after.stdout.contains("/etc/shadow root"),
        "{}",
        after.stdout
    );
    let planted = host.sh(&cli, "ls -A / | grep -c '^creds.json' || true");
    assert_eq!(planted.stdout.trim(), "0", "no file written into /");

    stop.send(true).unwrap();
    rt.block_on(running).unwrap().unwrap();
    host.cli(&["vm", "rm", &cli]);
}
