//! The systemd units in `deploy/systemd` are valid units, and every flag
//! their `ExecStart=` passes is one the real binary accepts.

use std::path::{Path, PathBuf};
use std::process::Command;

const UNITS: [&str; 3] = [
    "polydev-host.service",
    "polydev-server.service",
    "polydev-up.service",
];

/// The path every unit starts the binary from.
const INSTALLED: &str = "/usr/local/bin/polydev";

fn unit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/systemd")
}

fn exec_start(unit: &str) -> Vec<String> {
    let text = std::fs::read_to_string(unit_dir().join(unit)).expect("unit file");
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("ExecStart="))
        .collect();
    assert_eq!(lines.len(), 1, "{unit}: one ExecStart");
    // The units use no quoting, so whitespace splits them as systemd does.
    let argv: Vec<String> = lines[0].split_whitespace().map(str::to_string).collect();
    assert_eq!(argv[0], INSTALLED, "{unit}: binary path");
    argv
}

/// Run the real binary with a unit's arguments plus `extra`.
fn run_with(argv: &[String], extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_polydev"))
        .args(&argv[1..])
        .args(extra)
        .output()
        .expect("run polydev")
}

#[test]
fn exec_start_flags_parse_with_the_real_binary() {
    for unit in UNITS {
        let argv = exec_start(unit);
        // clap parses (and validates) everything before `--help`, then
        // prints the subcommand's help and exits 0.
        let out = run_with(&argv, &["--help"]);
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{unit}: {argv:?} does not parse: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for flag in argv.iter().filter(|a| a.starts_with("--")) {
            // Global flags (--data-dir) are listed in every subcommand's help.
            assert!(
                help.contains(flag.as_str()),
                "{unit}: {flag} not in help:\n{help}"
            );
        }
        // The check can fail: an unknown flag before --help is an error.
        let bad = run_with(&argv, &["--no-such-flag", "--help"]);
        assert!(!bad.status.success(), "{unit}: unknown flags are refused");
    }
}

#[test]
fn the_host_agent_units_keep_vms_across_restarts() {
    for unit in ["polydev-host.service", "polydev-up.service"] {
        let text = std::fs::read_to_string(unit_dir().join(unit)).expect("unit file");
        for line in ["KillMode=process", "Delegate=yes", "NoNewPrivileges=yes"] {
            assert!(text.lines().any(|l| l == line), "{unit}: {line}");
        }
    }
}

/// `systemd-analyze verify` on each unit, with `ExecStart=` pointing at the
/// binary under test (verify checks that it exists). A missing
/// systemd-analyze is a failure that says how to install it.
#[test]
fn systemd_analyze_verifies_the_units() {
    let analyze = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "systemd-analyze is not installed: run ./polydev.sh setup (apt-get install systemd)"
            )
        });
    let version = Command::new(analyze)
        .arg("--version")
        .output()
        .expect("systemd-analyze --version");
    // "systemd 252 (252.38-1~deb12u1)"
    let major: u32 = String::from_utf8_lossy(&version.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("systemd version");
    let tmp = tempfile::tempdir().expect("temp dir");
    for unit in UNITS {
        let text = std::fs::read_to_string(unit_dir().join(unit)).expect("unit file");
        let path = tmp.path().join(unit);
        std::fs::write(
            &path,
            text.replace(INSTALLED, env!("CARGO_BIN_EXE_polydev")),
        )
        .expect("write unit");
        let out = Command::new(analyze)
            .args(["verify", "--man=no", "--generators=no"])
            .arg(&path)
            .output()
            .expect("systemd-analyze verify");
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{unit}: {said}");
        // Every complaint is a defect, except that systemd before 254 does
        // not know DelegateSubgroup= (and ignores it, as the unit says).
        let complaints: Vec<&str> = said
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| !(major < 254 && l.contains("Unknown key 'DelegateSubgroup'")))
            .collect();
        assert!(
            complaints.is_empty(),
            "{unit} (systemd {major}): {complaints:#?}"
        );
    }
}
