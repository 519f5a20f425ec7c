//! Harness for end-to-end tests: each test starts its own `polydev host`
//! (the real binary) on its own temporary data directory and drives it with
//! the real CLI, so tests run in parallel without sharing anything.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use polydev_api::vm::VmInfo;

pub mod http;
pub mod oauth;
pub mod rfb;

/// The `polydev` binary under test: `$POLYDEV_BIN`, or the release build.
/// A static program the README's setup builds for VMs (`polydev-testcli`,
/// `polydev-egress-flood`), which tests copy in.
pub fn static_test_bin(name: &str) -> PathBuf {
    // The build's own target directory: a worktree built with
    // CARGO_TARGET_DIR has its binaries there, not in ../target.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join("x86_64-unknown-linux-gnu/release").join(name);
    assert!(
        p.is_file(),
        "{} is missing: build it with RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build \
         --release -p polydev-testcli --target x86_64-unknown-linux-gnu (./polydev.sh setup does)",
        p.display()
    );
    p
}

pub fn polydev_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("POLYDEV_BIN") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/polydev")
}

/// A host agent owned by one test.
pub struct Host {
    /// Temporary data directory (removed on drop).
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    /// Extra `polydev host` options.
    args: Vec<String>,
    /// The umask the host agent starts with (`None`: the test's own).
    umask: Option<u32>,
}

/// Result of a CLI invocation.
pub struct Run {
    /// Exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Host {
    /// Start a host agent on a fresh data directory and wait until it serves.
    pub fn start() -> Host {
        Host::start_with(&[], None)
    }

    /// Start a host agent with extra `polydev host` options, under `umask`
    /// when given (set between fork and exec, so only the agent has it).
    pub fn start_with(args: &[&str], umask: Option<u32>) -> Host {
        // Short paths: Unix socket paths must stay under 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("pd")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let mut h = Host {
            dir,
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
            umask,
        };
        h.spawn();
        h
    }

    /// The data directory.
    pub fn data(&self) -> &Path {
        self.dir.path()
    }

    /// (Re)start the host agent process on this data directory.
    pub fn spawn(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.data().join("host-agent.log"))
            .expect("log file");
        let mut cmd = Command::new(polydev_bin());
        cmd.arg("--data-dir")
            .arg(self.data())
            .arg("host")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if let Some(mask) = self.umask {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: umask(2) is async-signal-safe and affects only the
            // child between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask as libc::mode_t);
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("spawn polydev host");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        let sock = self.data().join("host.sock");
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("host agent exited early ({st}): {}", self.agent_log());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("host agent did not come up: {}", self.agent_log());
    }

    /// Kill the host agent process with `signal` and reap it.
    pub fn kill(&mut self, signal: i32) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, signal);
            }
            let _ = c.wait();
        }
    }

    /// The host agent's own output so far.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.data().join("host-agent.log")).unwrap_or_default()
    }

    /// Run `polydev <args>` against this host.
    pub fn cli(&self, args: &[&str]) -> Run {
        Command::new(polydev_bin())
            .arg("--data-dir")
            .arg(self.data())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run polydev")
            .into()
    }

    /// Run `polydev <args>` with extra environment variables (secrets that
    /// must not appear on a command line).
    pub fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        Command::new(polydev_bin())
            .arg("--data-dir")
            .arg(self.data())
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("run polydev")
            .into()
    }

    /// Run a CLI command that must succeed.
    pub fn ok(&self, args: &[&str]) -> Run {
        let r = self.cli(args);
        assert_eq!(
            r.code,
            0,
            "polydev {args:?} failed: {}{}\nhost agent:\n{}",
            r.stdout,
            r.stderr,
            self.agent_log()
        );
        r
    }

    /// `vm exec <id> -- sh -c <script>`, which must succeed.
    pub fn sh(&self, id: &str, script: &str) -> Run {
        self.ok(&["vm", "exec", id, "--", "sh", "-c", script])
    }

    /// How many VM state directories exist (live VMs).
    pub fn vm_dirs(&self) -> usize {
        std::fs::read_dir(self.data().join("vms"))
            .map(|rd| rd.count())
            .unwrap_or(0)
    }

    /// `vm run --json` with extra args; returns the VM.
    pub fn run_vm(&self, extra: &[&str]) -> VmInfo {
        let mut args = vec!["vm", "run", "--json"];
        args.extend_from_slice(extra);
        let r = self.ok(&args);
        serde_json::from_str(r.stdout.trim()).expect("vm run --json prints a VM")
    }

    /// `vm inspect` as a VM.
    pub fn inspect(&self, id: &str) -> VmInfo {
        let r = self.ok(&["vm", "inspect", id]);
        serde_json::from_str(&r.stdout).expect("inspect prints a VM")
    }

    /// Poll `f` until it returns `Some` or `timeout` passes.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}\nhost agent:\n{}",
                    self.agent_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `polydev vm forward <id> --port <port>` running in the background;
    /// returns once it listens.
    pub fn forward(&self, id: &str, port: u16) -> Forward {
        let mut child = Command::new(polydev_bin())
            .arg("--data-dir")
            .arg(self.data())
            .args(["vm", "forward", id, "--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn polydev vm forward");
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            use std::io::BufRead;
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .map(str::to_string)
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("vm forward did not start: {line:?}")
            });
        Forward { child, addr }
    }

    /// Processes whose command line mentions this host's data directory.
    pub fn processes(&self) -> Vec<(u32, String)> {
        processes_mentioning(&self.data().display().to_string())
            .into_iter()
            .filter(|(pid, _)| Some(*pid) != self.child.as_ref().map(|c| c.id()))
            .collect()
    }
}

/// A running `polydev vm forward`; killed on drop.
pub struct Forward {
    child: Child,
    /// `127.0.0.1:<port>` it listens on.
    pub addr: String,
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Destroy whatever a failed test left, then stop the agent.
        if self.child.is_some() {
            let ls = self.cli(&["vm", "ls", "--json"]);
            if let Ok(vms) = serde_json::from_str::<Vec<VmInfo>>(ls.stdout.trim()) {
                for vm in vms {
                    let _ = self.cli(&["vm", "rm", &vm.id]);
                }
            }
        }
        self.kill(libc::SIGTERM);
        for (pid, _) in self.processes() {
            // SAFETY: kill(2) on processes started for this test's data dir.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
    }
}

/// Live (non-zombie) processes whose command line contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|s| s == "Z");
        let text = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !zombie && text.contains(needle) {
            out.push((pid, text));
        }
    }
    out
}

/// Kills whatever still runs from a data directory when dropped: the VMs
/// that a `polydev up` leaves running by design when it stops (so that a
/// restart adopts them), once a test ends, passed or failed. Declare it
/// before the directory it names, so the processes go first.
pub struct Reaper(pub PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for (pid, _) in processes_mentioning(&self.0.display().to_string()) {
            // SAFETY: kill(2) on a process whose command line names this
            // test's own temp directory.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// `polydev image inspect <name>` (the image's manifest), or a panic that
/// says how to build it.
pub fn image_manifest(name: &str) -> serde_json::Value {
    let out = std::process::Command::new(polydev_bin())
        .args(["image", "inspect", name])
        .output()
        .expect("run polydev image inspect");
    assert!(
        out.status.success(),
        "the {name} image is not built: run `./target/release/polydev image build {name}` \
         (./polydev.sh setup does): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("inspect prints the manifest")
}

/// Panics with the command to run unless each golden image in `names` is
/// built.
pub fn require_images(names: &[&str]) {
    for image in names {
        image_manifest(image);
    }
}
