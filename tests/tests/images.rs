//! Golden images end to end: the `cli` image built by setup
//! (`polydev image build cli`) booted read-only by real QEMU VMs, and the
//! sealed image inspected from outside.
//!
//! These tests never build an image from scratch (that is setup, and it
//! fetches packages); they need the one setup built and fail with the
//! command to run when it is missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use polydev_api::vm::VmState;
use polydev_e2e::{polydev_bin, Host};

/// Node.js CLIs start slowly under TCG (gemini ≈ 45 s on an idle 2-core
/// host), and tests run in parallel.
const CLI_TIMEOUT: &str = "400";

/// `polydev image inspect <name>`, or a panic that says how to build it.
fn manifest(name: &str) -> serde_json::Value {
    polydev_e2e::image_manifest(name)
}

fn cli_manifest() -> serde_json::Value {
    manifest("cli")
}

/// `claude`, `codex` and `gemini` `--version` through the agent's exec
/// print the versions the image's manifest pins.
fn assert_clis_run(host: &Host, vm: &str, manifest: &serde_json::Value) {
    for (bin, pkg) in [
        ("claude", "@anthropic-ai/claude-code"),
        ("codex", "@openai/codex"),
        ("gemini", "@google/gemini-cli"),
    ] {
        let version = manifest["npm"][pkg]
            .as_str()
            .expect("npm version in manifest");
        let r = host.ok(&[
            "vm",
            "exec",
            "--timeout",
            CLI_TIMEOUT,
            vm,
            "--",
            bin,
            "--version",
        ]);
        assert!(
            r.stdout.contains(version),
            "{bin} --version prints {version}: {}{}",
            r.stdout,
            r.stderr
        );
    }
}

fn rootfs_path(manifest: &serde_json::Value) -> PathBuf {
    let out = Command::new(polydev_bin())
        .args(["image", "ls", "--json"])
        .output()
        .expect("run polydev image ls");
    let ls: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ls --json");
    let key = manifest["key"].as_str().expect("key");
    let entry = ls
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["key"] == key)
        .expect("the inspected image is listed");
    PathBuf::from(entry["rootfs"].as_str().expect("rootfs path"))
}

#[test]
fn the_three_clis_run_in_the_cli_image_behind_the_egress_proxy() {
    let manifest = cli_manifest();
    let host = Host::start();
    let vm = host.run_vm(&["--image", "cli", "--memory", "1024"]);
    assert_eq!(vm.image, "cli");
    assert_clis_run(&host, &vm.id, &manifest);
    // Every HTTP client is pointed at the guest's egress proxy: the agent's
    // processes get it from the image manifest, login shells from
    // /etc/profile.d, npm and apt from their global config.
    let r = host.sh(
        &vm.id,
        "echo $https_proxy $HTTPS_PROXY; env -i HOME=/root bash -lc 'echo $http_proxy'; \
         npm config get https-proxy; apt-config dump | grep -i 'Acquire::https::Proxy '",
    );
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "http://127.0.0.1:3128 http://127.0.0.1:3128",
            "http://127.0.0.1:3128",
            "http://127.0.0.1:3128",
            "Acquire::https::Proxy \"http://127.0.0.1:3128\";",
        ],
        "{}",
        r.stderr
    );
}

#[test]
fn browser_vms_share_the_read_only_base_and_never_see_each_others_writes() {
    let manifest = manifest("browser");
    let rootfs = rootfs_path(&manifest);
    let host = Host::start();
    let a = host.run_vm(&["--image", "browser", "--memory", "1024"]);
    let b = host.run_vm(&["--image", "browser", "--memory", "1024"]);
    host.sh(
        &a.id,
        "echo a > /home/user/mine && echo a > /etc/mine && rm /etc/hostname",
    );
    let r = host.sh(
        &b.id,
        "ls /home/user/mine /etc/mine 2>&1; cat /etc/hostname; cat /etc/polydev/image.json",
    );
    for p in ["/home/user/mine", "/etc/mine"] {
        assert!(
            r.stdout
                .lines()
                .any(|l| l.contains(&format!("'{p}'")) && l.contains("No such file")),
            "{p} written by the other VM: {}",
            r.stdout
        );
    }
    assert!(r.stdout.contains("polydev\n"), "{}", r.stdout);
    assert!(
        r.stdout.contains(manifest["key"].as_str().expect("key")),
        "{}",
        r.stdout
    );
    // The base is a read-only block device inside the guest...
    let r = host.sh(&a.id, "cat /sys/block/vda/ro");
    assert!(r.stdout.starts_with("1\n"), "{}", r.stdout);
    // ...and on the host the one cached file, opened read-only by both
    // QEMUs, never copied into a VM directory.
    for vm in [&a, &b] {
        let pid = vm.pid.expect("running VM has a pid");
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("qemu cmdline");
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            cmdline.contains(&format!("file={},", rootfs.display()))
                && cmdline.contains("readonly=on"),
            "{cmdline}"
        );
        let image_size = std::fs::metadata(&rootfs).expect("rootfs").len();
        let dir = host.data().join("vms").join(&vm.id);
        for e in std::fs::read_dir(&dir).expect("vm dir").flatten() {
            use std::os::unix::fs::MetadataExt;
            let m = e.metadata().expect("metadata");
            assert!(
                m.blocks() * 512 < image_size / 4,
                "{} holds {} bytes: the base must not be copied",
                e.path().display(),
                m.blocks() * 512
            );
        }
    }
}

/// The PEM bodies of the certificates the build host added to its trust
/// store (here: the intercepting proxy's CA), which must not reach an image.
fn host_added_certs() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/usr/local/share/ca-certificates") else {
        return out;
    };
    for e in rd.flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        // One full line of base64 from the middle of the certificate:
        // present as a line in any PEM copy, alone or in a bundle.
        if let Some(line) = text
            .lines()
            .filter(|l| l.len() >= 60 && !l.starts_with("-----"))
            .nth(2)
        {
            out.push(line.as_bytes().to_vec());
        }
    }
    out
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path, &std::fs::Metadata)) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(m) = e.path().symlink_metadata() else {
            continue;
        };
        if m.is_dir() {
            walk(&e.path(), f);
        } else {
            f(&e.path(), &m);
        }
    }
}

#[test]
fn the_sealed_images_hold_nothing_from_the_build_host() {
    for name in ["cli", "browser"] {
        assert_sealed(name);
    }
}

/// An image's file tree, read in place rather than unpacked: the browser
/// image is 3 GiB unpacked, and a scratch copy of it beside the tests'
/// VM disks can run a CI machine's disk full.
///
/// The image is loop-mounted read-only inside a private mount namespace
/// that only a child process holds; the test reads the tree through
/// `/proc/<child>/root`. Nothing is visible in the host's namespace, and
/// when the child ends (its stdin closes, also when the test is killed)
/// the namespace, the mount and the auto-clearing loop device go with it.
/// Where that cannot be done (no loop devices), the image is extracted
/// with `fsck.erofs` instead.
struct ImageTree {
    root: PathBuf,
    holder: Option<std::process::Child>,
    _scratch: tempfile::TempDir,
}

impl ImageTree {
    fn open(rootfs: &Path) -> ImageTree {
        use std::io::BufRead;
        use std::process::Stdio;
        let scratch = tempfile::tempdir().expect("tempdir");
        let mnt = scratch.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mount point");
        let mut holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount -t erofs -o ro,loop "$1" "$2" && echo mounted && exec cat >/dev/null"#)
            .arg("sh")
            .arg(rootfs)
            .arg(&mnt)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run unshare (util-linux)");
        let mut line = String::new();
        if let Some(out) = holder.stdout.take() {
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        if line.trim() == "mounted" {
            let root = PathBuf::from(format!("/proc/{}/root", holder.id()))
                .join(mnt.strip_prefix("/").expect("tempdir paths are absolute"));
            return ImageTree {
                root,
                holder: Some(holder),
                _scratch: scratch,
            };
        }
        drop(holder.stdin.take());
        let failed = holder.wait_with_output().expect("wait for unshare");
        eprintln!(
            "loop mount of {} failed ({}); extracting it instead",
            rootfs.display(),
            String::from_utf8_lossy(&failed.stderr).trim()
        );
        let root = scratch.path().join("root");
        let out = Command::new("fsck.erofs")
            .arg(format!("--extract={}", root.display()))
            .arg(rootfs)
            .output()
            .expect("run fsck.erofs (erofs-utils, installed by setup)");
        assert!(
            out.status.success(),
            "fsck.erofs --extract: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ImageTree {
            root,
            holder: None,
            _scratch: scratch,
        }
    }
}

impl Drop for ImageTree {
    fn drop(&mut self) {
        if let Some(mut holder) = self.holder.take() {
            drop(holder.stdin.take());
            let _ = holder.wait();
        }
    }
}

fn assert_sealed(name: &str) {
    let manifest = manifest(name);
    let rootfs = rootfs_path(&manifest);
    let tree = ImageTree::open(&rootfs);
    let root = tree.root.clone();
    // Build-only configuration is gone.
    for p in [
        "etc/polydev-build",
        "root/.npmrc",
        "root/.npm",
        "usr/sbin/policy-rc.d",
        "var/cache/apt/pkgcache.bin",
    ] {
        assert!(
            !root.join(p).exists(),
            "{p} must not be in the {name} image"
        );
    }
    let aptconf: Vec<String> = std::fs::read_dir(root.join("etc/apt/apt.conf.d"))
        .expect("apt.conf.d")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        aptconf.iter().all(|n| !n.contains("polydev-build")),
        "{aptconf:?}"
    );
    let empty = |p: &str| {
        std::fs::read_dir(root.join(p))
            .map(|rd| rd.count() == 0)
            .unwrap_or(true)
    };
    assert!(empty("var/lib/apt/lists"), "apt lists removed");
    assert!(empty("tmp"), "no build leftovers in /tmp");
    for p in ["etc/machine-id", "etc/resolv.conf"] {
        let len = std::fs::metadata(root.join(p))
            .map(|m| m.len())
            .unwrap_or(0);
        assert_eq!(len, 0, "{p} is empty (no build-host identity or DNS)");
    }
    let ssh_keys: Vec<_> = std::fs::read_dir(root.join("etc/ssh"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("ssh_host_"))
                .collect()
        })
        .unwrap_or_default();
    assert!(ssh_keys.is_empty(), "no SSH host keys");

    // No file anywhere carries a certificate the build host added, and
    // every proxy setting in a config file is the guest's egress proxy.
    let certs = host_added_certs();
    let mut leaks = Vec::new();
    let mut proxies = Vec::new();
    walk(&root, &mut |path, m| {
        if !m.is_file() || m.len() > 32 << 20 {
            return;
        }
        let Ok(bytes) = std::fs::read(path) else {
            return;
        };
        let leaked = bytes
            .split(|b| *b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .any(|l| certs.iter().any(|c| c.as_slice() == l));
        let rel = path.strip_prefix(&root).unwrap_or(path);
        if leaked {
            leaks.push(rel.display().to_string());
        }
        let config = rel.starts_with("etc") || rel.starts_with("root") || rel.starts_with("home");
        if config {
            let text = String::from_utf8_lossy(&bytes);
            for line in text.lines() {
                let l = line.trim().to_ascii_lowercase();
                let setting = (l.starts_with("acquire::") && l.contains("proxy"))
                    || l.starts_with("proxy=")
                    || l.starts_with("https-proxy=")
                    || l.starts_with("http_proxy=")
                    || l.starts_with("https_proxy=");
                if setting && !l.contains("127.0.0.1:3128") {
                    proxies.push(format!("{}: {line}", rel.display()));
                }
            }
        }
    });
    assert!(
        leaks.is_empty(),
        "build-host CA certificates in the {name} image: {leaks:?}"
    );
    assert!(
        proxies.is_empty(),
        "foreign proxy settings in the {name} image: {proxies:?}"
    );
    let environment =
        std::fs::read_to_string(root.join("etc/environment")).expect("/etc/environment");
    assert!(
        environment.contains("https_proxy=\"http://127.0.0.1:3128\""),
        "{environment}"
    );
}

#[test]
fn building_an_unchanged_recipe_again_is_a_cache_hit() {
    let manifest = cli_manifest();
    let out = Command::new(polydev_bin())
        .args(["image", "build", "cli"])
        .output()
        .expect("run polydev image build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("cached"), "{stderr}");
    assert!(!stderr.contains("[1/7]"), "no step ran: {stderr}");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(PathBuf::from(path), rootfs_path(&manifest));
}

#[test]
fn unknown_images_are_refused_with_the_build_command() {
    let host = Host::start();
    let r = host.cli(&["vm", "run", "--image", "nosuch"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("polydev image build nosuch"),
        "{}",
        r.stderr
    );
}

/// The browser image's desktop comes up by itself: the guest agent starts
/// Xvfb, openbox, x11vnc, xterm and Chromium from the image's
/// services.json as the unprivileged user and reports "desktop ready" once
/// their probes pass. A real RFB client outside the VM, through `polydev vm
/// forward`, then sees both windows where X says they are; the screenshot
/// is kept in target/test-artifacts/.
#[test]
fn the_browser_desktop_is_ready_and_seen_through_vnc_from_outside() {
    let manifest = manifest("browser");
    let host = Host::start();
    let vm = host.run_vm(&["--image", "browser", "--memory", "2048", "--vcpus", "2"]);
    let ready = host.ok(&["vm", "wait", &vm.id, "--timeout", "400"]);
    eprintln!("desktop: {}", ready.stdout.trim());
    let svcs = host.ok(&["vm", "services", &vm.id, "--json"]);
    let svcs: serde_json::Value = serde_json::from_str(&svcs.stdout).expect("services json");
    for name in ["vnc", "terminal", "chromium"] {
        let s = svcs
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name))
            .unwrap_or_else(|| panic!("service {name}: {svcs}"));
        assert_eq!(s["ready"], true, "{s}");
    }

    // Where X has the two windows (absolute geometry of the frames'
    // client windows).
    let tree = host.sh(&vm.id, "DISPLAY=:0 xwininfo -root -tree").stdout;
    let geometry = |class: &str, title_tail: &str| -> (usize, usize, usize, usize) {
        let line = tree
            .lines()
            .find(|l| l.contains(class) && l.contains(title_tail))
            .unwrap_or_else(|| panic!("no {class} window: {tree}"));
        let mut f = line.split_whitespace().rev();
        let abs = f.next().unwrap_or_default();
        let size = f.next().unwrap_or_default();
        let num = |s: &str| s.parse::<usize>().unwrap_or_else(|_| panic!("{line}"));
        let (w, h) = size
            .split_once('+')
            .map(|(wh, _)| wh)
            .and_then(|wh| wh.split_once('x'))
            .unwrap_or_else(|| panic!("{line}"));
        let mut xy = abs.trim_start_matches('+').split('+');
        let (x, y) = (xy.next().unwrap_or_default(), xy.next().unwrap_or_default());
        (num(x), num(y), num(w), num(h))
    };
    let term = geometry("(\"xterm\" \"XTerm\")", "\"user@");
    let chrome = geometry("(\"chromium\" \"Chromium\")", "- Chromium\"");

    // "Ready" means mapped; Chromium paints its first frame a little
    // later. Capture until both windows show content, then keep that frame.
    let fwd = host.forward(&vm.id, 5900);
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifact dir");
    let png = artifacts.join("browser-desktop.png");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let frame = polydev_e2e::rfb::capture(&fwd.addr, Duration::from_secs(120))
            .expect("capture the desktop over RFB");
        frame.save_png(&png).expect("save screenshot");
        assert_eq!((frame.width, frame.height), (1280, 800), "Xvfb's screen");
        let all = frame.colours_in(0, 0, frame.width, frame.height);
        // The root window shows where neither window is: the bottom-left
        // corner (xterm ends above it, Chromium starts right of it).
        let bg = frame.at(5, frame.height - 5);
        // (what, where, colours its content has at least): xterm is text
        // on a plain background; Chromium's toolbar, icons and anti-aliased
        // text have dozens.
        let seen: Vec<String> = [("terminal", term, 2), ("Chromium", chrome, 16)]
            .into_iter()
            .filter_map(|(what, (x, y, w, h), min)| {
                let share = frame.share_of(bg, x, y, w, h);
                let colours = frame.colours_in(x, y, w, h);
                (share >= 0.2 || colours < min).then(|| {
                    format!(
                        "{what} at {w}x{h}+{x}+{y}: {:.0}% background, {colours} colours",
                        share * 100.0
                    )
                })
            })
            .collect();
        if seen.is_empty() && all >= 16 {
            eprintln!("screenshot: {} ({all} colours)", png.display());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the desktop does not show both windows ({all} colours in all): {seen:?}; see {}",
            png.display()
        );
    }
    drop(fwd);

    // x11vnc listens on loopback port 5900 only: 127.0.0.1 and ::1 in
    // /proc/net/tcp{,6} notation, state 0A (LISTEN).
    let tcp = host.ok(&[
        "vm",
        "exec",
        &vm.id,
        "--",
        "cat",
        "/proc/net/tcp",
        "/proc/net/tcp6",
    ]);
    let listeners: Vec<&str> = tcp
        .stdout
        .lines()
        .filter(|l| l.split_whitespace().nth(3) == Some("0A"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|a| a.ends_with(":170C"))
        .collect();
    const LOOPBACK: [&str; 2] = ["0100007F:170C", "00000000000000000000000001000000:170C"];
    assert!(
        listeners.contains(&LOOPBACK[0]) && listeners.iter().all(|a| LOOPBACK.contains(a)),
        "{}",
        tcp.stdout
    );
    // The whole session runs as the unprivileged user, Chromium behind
    // the egress proxy with QUIC off.
    let ps = host.ok(&["vm", "exec", &vm.id, "--", "ps", "-eo", "user:12,args"]);
    for prog in [
        "Xvfb",
        "openbox",
        "x11vnc",
        "xterm",
        "/usr/lib/chromium/chromium",
    ] {
        let line = ps
            .stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(prog))
            .unwrap_or_else(|| panic!("{prog} is running: {}", ps.stdout));
        assert!(line.starts_with("user "), "{line}");
    }
    assert!(
        ps.stdout.contains("--proxy-server=http://127.0.0.1:3128")
            && ps.stdout.contains("--disable-quic"),
        "{}",
        ps.stdout
    );
    // The CLIs are in the browser image too.
    assert_clis_run(&host, &vm.id, &manifest);
}

/// A CLI VM keeps its writable layer on its own disk: `/home` (and the
/// rest of what the user changed) survives a stop and a start, and a host
/// agent restart while it is off; tmpfs mounts like /tmp do not.
#[test]
fn a_cli_vms_home_survives_a_stop_and_start() {
    cli_manifest();
    let mut host = Host::start();
    let vm = host.run_vm(&["--image", "cli"]);
    host.sh(
        &vm.id,
        "echo kept > /home/user/notes && chown user:user /home/user/notes && echo gone > /tmp/scratch",
    );

    let r = host.ok(&["vm", "stop", &vm.id]);
    assert!(r.stdout.contains(" off"), "{}", r.stdout);
    let off = host.inspect(&vm.id);
    assert_eq!(off.state, VmState::Off);
    assert_eq!(off.pid, None);
    assert!(
        host.processes().is_empty(),
        "nothing of a powered-off VM runs: {:?}",
        host.processes()
    );
    let dir = host.data().join("vms").join(&vm.id);
    assert!(dir.join("data.img").exists(), "the disk is kept");
    let r = host.cli(&["vm", "exec", &vm.id, "--", "true"]);
    assert!(
        r.code != 0 && r.stderr.contains("polydev vm start"),
        "{}",
        r.stderr
    );

    let r = host.ok(&["vm", "start", &vm.id]);
    assert!(r.stdout.contains(" running"), "{}", r.stdout);
    let r = host.sh(
        &vm.id,
        "cat /home/user/notes; stat -c %U /home/user/notes; ls /tmp/scratch 2>&1 || true",
    );
    assert!(r.stdout.starts_with("kept\nuser\n"), "{}", r.stdout);
    assert!(r.stdout.contains("No such file"), "{}", r.stdout);

    // Off survives a host agent restart, and it boots again afterwards.
    host.ok(&["vm", "stop", &vm.id]);
    host.kill(libc::SIGKILL);
    host.spawn();
    assert_eq!(host.inspect(&vm.id).state, VmState::Off);
    host.ok(&["vm", "start", &vm.id]);
    let r = host.sh(&vm.id, "cat /home/user/notes");
    assert_eq!(r.stdout, "kept\n");

    host.ok(&["vm", "rm", &vm.id]);
    assert_eq!(host.vm_dirs(), 0);
    assert!(host.processes().is_empty(), "{:?}", host.processes());
}
