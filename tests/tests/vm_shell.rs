//! `polydev vm shell`: a login shell on a real pseudo-terminal in a real
//! VM, through the host agent's terminal forward and the guest agent.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use polydev_e2e::{polydev_bin, Host};

/// `polydev vm shell <id> <args>` with `input` piped in.
fn shell(host: &Host, id: &str, args: &[&str], input: &str) -> (i32, String, String) {
    let mut child = Command::new(polydev_bin())
        .arg("--data-dir")
        .arg(host.data())
        .args(["vm", "shell", id])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn polydev vm shell");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_shell_runs_on_a_terminal_of_the_asked_size_and_hangs_up_with_its_client() {
    let host = Host::start();
    let vm = host.run_vm(&[]);

    // A terminal of the asked size, the shell's exit status back.
    let (code, out, err) = shell(
        &host,
        &vm.id,
        &["--cols", "77", "--rows", "11"],
        "stty size; tty; echo \"home=$HOME\"\nexit 5\n",
    );
    assert_eq!(code, 5, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("11 77"), "{out}");
    assert!(out.contains("/dev/pts/"), "{out}");
    assert!(out.contains("home=/"), "{out}");

    // Refused sizes and unknown users are errors before anything starts.
    let (code, _, err) = shell(&host, &vm.id, &["--cols", "0"], "");
    assert_ne!(code, 0);
    assert!(err.contains("1-1000"), "{err}");
    let (code, _, err) = shell(&host, &vm.id, &["--user", "nobody-here"], "");
    assert_ne!(code, 0);
    assert!(err.contains("nobody-here"), "{err}");

    // A client that goes away hangs the shell up: what it started in the
    // foreground goes with it.
    let mut client = Command::new(polydev_bin())
        .arg("--data-dir")
        .arg(host.data())
        .args(["vm", "shell", &vm.id])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = client.stdin.take().unwrap();
    stdin.write_all(b"sleep 4242\n").unwrap();
    stdin.flush().unwrap();
    let sleeping = || {
        host.sh(&vm.id, "ps | grep '[s]leep 4242' || true")
            .stdout
            .contains("sleep 4242")
    };
    host.wait_for("sleep 4242 in the VM", Duration::from_secs(60), || {
        sleeping().then_some(())
    });
    client.kill().unwrap();
    client.wait().unwrap();
    host.wait_for(
        "the hung-up shell's sleep to end",
        Duration::from_secs(30),
        || (!sleeping()).then_some(()),
    );
    host.ok(&["vm", "rm", &vm.id]);
}
