//! Golden root filesystems: `polydev image build <name>`.
//!
//! A build runs debootstrap into a build directory, installs the recipe's
//! Debian and npm packages inside a chroot, adds the recipe's files, user and
//! services, seals the tree (no build-host CA, apt/npm settings, caches,
//! docs, machine ids or host keys remain) and packs it read-only with
//! `mkfs.erofs`. Layout under the cache:
//!
//! ```text
//! <cache>/images/<key>/{rootfs.erofs,manifest.json}   (published images)
//! <cache>/images/names/<name>                         (key of the newest build)
//! <cache>/images/.staging-<key>/{root/,steps,build.log} (a build in progress)
//! <cache>/images/timings.json                         (step durations, for estimates)
//! ```
//!
//! The registries here sit behind an intercepting proxy, so the chroot gets
//! the host's CA bundle and apt/npm configuration under
//! `/etc/polydev-build` and `*polydev-build*` apt snippets for the build
//! only; sealing removes them and checks that they are gone.
//!
//! Every command inside the chroot (and debootstrap itself) runs in a
//! private mount namespace, so the `/proc` mounts it needs vanish with it:
//! an interrupted build never leaves host mounts under the build directory,
//! which makes deleting that directory safe.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::recipe::{ImagePlan, Writable};
use crate::{store, Cache, ImageError};

/// The file name of the read-only root filesystem inside an image directory.
pub const ROOTFS_FILE: &str = "rootfs.erofs";

/// Where the build-only host configuration lives inside the chroot.
const BUILD_DIR_IN_ROOT: &str = "etc/polydev-build";
/// Prefix of the build-only apt snippets in `/etc/apt/apt.conf.d`.
const APT_BUILD_PREFIX: &str = "00polydev-build-";
/// PATH for commands in the chroot.
const CHROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The build steps, in order, with a first-build estimate in seconds
/// (measured on a 2-core machine; replaced by this host's own timings once
/// an image was built here).
const STEPS: [(&str, u64); 7] = [
    ("debootstrap", 30),
    ("build access", 1),
    ("apt install", 120),
    ("npm install", 30),
    ("configure", 3),
    ("seal", 10),
    ("mkfs.erofs", 120),
];

/// `<cache>/images/<key>/manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageManifest {
    /// Image name from the recipe.
    pub name: String,
    /// Cache key: sha256 of the resolved recipe ([`ImagePlan::key`]).
    pub key: String,
    /// One line about it.
    pub description: String,
    /// Builder format ([`crate::ROOTFS_FORMAT`]).
    pub format: u32,
    /// Debian suite.
    pub suite: String,
    /// The writable layer VMs of this image get.
    pub writable: Writable,
    /// Environment the host passes to every process in the guest.
    pub env: BTreeMap<String, String>,
    /// Guest agent protocol version the image was built for. The agent
    /// itself lives in the initramfs; this records what the image's
    /// services were written against.
    pub agent_protocol: u32,
    /// Every installed Debian package and its exact version.
    pub packages: BTreeMap<String, String>,
    /// Every npm package the recipe installed and its exact version.
    pub npm: BTreeMap<String, String>,
    /// Filesystem type of [`ROOTFS_FILE`].
    pub fstype: String,
    /// Bytes of all files in the sealed tree.
    pub tree_bytes: u64,
    /// Size of [`ROOTFS_FILE`].
    pub image_bytes: u64,
    /// sha256 of [`ROOTFS_FILE`].
    pub image_sha256: String,
    /// Seconds the build took (all steps of this run).
    pub build_secs: u64,
    /// When it was built (Unix seconds).
    pub built_unix: u64,
}

/// A built image in the cache.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageArtifact {
    /// The read-only root filesystem.
    pub rootfs: PathBuf,
    /// Its directory.
    pub dir: PathBuf,
    /// The parsed manifest.
    pub manifest: ImageManifest,
}

impl ImageArtifact {
    fn load(dir: &Path) -> Result<Self, ImageError> {
        let manifest_path = dir.join("manifest.json");
        let (manifest, _): (ImageManifest, _) = store::read_json(&manifest_path)?;
        let rootfs = dir.join(ROOTFS_FILE);
        if !rootfs.is_file() {
            return Err(ImageError::Manifest {
                path: manifest_path,
                detail: format!("{ROOTFS_FILE} is missing"),
            });
        }
        Ok(ImageArtifact {
            rootfs,
            dir: dir.to_path_buf(),
            manifest,
        })
    }
}

fn images_dir(cache: &Cache) -> PathBuf {
    cache.root().join("images")
}

fn names_dir(cache: &Cache) -> PathBuf {
    images_dir(cache).join("names")
}

fn is_key(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The image built for recipe image `name` (the newest build), if any.
pub fn find_image(cache: &Cache, name: &str) -> Option<ImageArtifact> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return None;
    }
    let key = std::fs::read_to_string(names_dir(cache).join(name)).ok()?;
    let key = key.trim();
    if !is_key(key) {
        return None;
    }
    ImageArtifact::load(&images_dir(cache).join(key)).ok()
}

/// The image with this exact key, if it is built.
pub fn find_image_by_key(cache: &Cache, key: &str) -> Option<ImageArtifact> {
    is_key(key)
        .then(|| ImageArtifact::load(&images_dir(cache).join(key)).ok())
        .flatten()
}

/// Every built image, with the names that point at it.
pub fn list_images(cache: &Cache) -> Vec<(ImageArtifact, Vec<String>)> {
    let names = read_names(cache);
    store::artifact_dirs(&images_dir(cache))
        .iter()
        .filter_map(|d| ImageArtifact::load(d).ok())
        .map(|a| {
            let n = names
                .iter()
                .filter(|(_, k)| **k == a.manifest.key)
                .map(|(n, _)| n.clone())
                .collect();
            (a, n)
        })
        .collect()
}

fn read_names(cache: &Cache) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(names_dir(cache)) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if let Ok(k) = std::fs::read_to_string(e.path()) {
                out.insert(name, k.trim().to_string());
            }
        }
    }
    out
}

/// Remove an image by name or key (and the names pointing at it). Returns
/// the keys removed. VMs already running keep their open file.
pub fn remove_image(cache: &Cache, name_or_key: &str) -> Result<Vec<String>, ImageError> {
    let _lock = store::BuildLock::acquire(&images_dir(cache))?;
    let names = read_names(cache);
    let key = if is_key(name_or_key) {
        name_or_key.to_string()
    } else {
        names
            .get(name_or_key)
            .cloned()
            .ok_or_else(|| ImageError::NotBuilt(name_or_key.to_string()))?
    };
    for (n, k) in &names {
        if *k == key {
            let p = names_dir(cache).join(n);
            std::fs::remove_file(&p).map_err(ImageError::io("removing", &p))?;
        }
    }
    let dir = images_dir(cache).join(&key);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    std::fs::remove_dir_all(&dir).map_err(ImageError::io("removing", &dir))?;
    Ok(vec![key])
}

/// What [`gc_images`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Keys of images no name pointed at.
    pub images: Vec<String>,
    /// Abandoned build directories.
    pub builds: Vec<String>,
    /// Bytes freed (image files only).
    pub bytes: u64,
}

/// Remove images that no name points at (superseded builds) and abandoned
/// build directories. Takes the build lock, so it never races a build.
pub fn gc_images(cache: &Cache) -> Result<GcReport, ImageError> {
    let dir = images_dir(cache);
    let _lock = store::BuildLock::acquire(&dir)?;
    let live: Vec<String> = read_names(cache).into_values().collect();
    let mut report = GcReport::default();
    for (a, _) in list_images(cache) {
        if live.contains(&a.manifest.key) {
            continue;
        }
        report.bytes += a.manifest.image_bytes;
        std::fs::remove_dir_all(&a.dir).map_err(ImageError::io("removing", &a.dir))?;
        report.images.push(a.manifest.key);
    }
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".staging-") && e.path().is_dir() {
                remove_build_dir(&e.path())?;
                report.builds.push(name);
            }
        }
    }
    Ok(report)
}

/// Deletes a build directory after making sure nothing is mounted below
/// it: `remove_dir_all` through a leaked bind mount would delete host files.
fn remove_build_dir(dir: &Path) -> Result<(), ImageError> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = dir.display().to_string();
    if let Some(m) = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .find(|mp| mp.starts_with(&prefix))
    {
        return Err(ImageError::Build {
            step: "cleanup",
            detail: format!("{m} is still mounted; unmount it (umount -R {m}) and retry"),
        });
    }
    std::fs::remove_dir_all(dir).map_err(ImageError::io("removing", dir))
}

/// How `polydev image build` reaches the package registries: taken from
/// the build host, used inside the chroot during the build only.
#[derive(Debug, Clone, Default)]
pub struct HostAccess {
    /// The host's CA bundle (the intercepting proxy's CA is in it).
    pub ca_bundle: Option<PathBuf>,
    /// Debian mirror from the host's apt sources.
    pub mirror: Option<String>,
    /// Debian security mirror from the host's apt sources.
    pub security_mirror: Option<String>,
    /// Files from the host's `/etc/apt/apt.conf.d`.
    pub apt_conf: Vec<PathBuf>,
    /// npm configuration lines (registry, cafile, proxies, `~/.npmrc`).
    pub npmrc: String,
    /// `http_proxy` and friends from the build's environment.
    pub proxy_env: BTreeMap<String, String>,
}

impl HostAccess {
    /// What this host uses to reach Debian and npm.
    pub fn detect() -> HostAccess {
        let ca = PathBuf::from("/etc/ssl/certs/ca-certificates.crt");
        let mut sources = String::new();
        for f in std::iter::once(PathBuf::from("/etc/apt/sources.list"))
            .chain(sorted_files(Path::new("/etc/apt/sources.list.d")))
        {
            let n = f.display().to_string();
            if n.ends_with(".list") || n.ends_with(".sources") {
                sources.push_str(&std::fs::read_to_string(&f).unwrap_or_default());
                sources.push('\n');
            }
        }
        let (mirror, security_mirror) = mirrors_from_sources(&sources);
        let mut npmrc = String::new();
        if let Some(home) = std::env::var_os("HOME") {
            if let Ok(t) = std::fs::read_to_string(PathBuf::from(home).join(".npmrc")) {
                npmrc.push_str(&t);
                npmrc.push('\n');
            }
        }
        for key in ["registry", "proxy", "https-proxy", "noproxy", "strict-ssl"] {
            if let Some(v) = npm_config_get(key) {
                npmrc.push_str(&format!("{key}={v}\n"));
            }
        }
        let mut proxy_env = BTreeMap::new();
        for k in [
            "http_proxy",
            "https_proxy",
            "no_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "NO_PROXY",
        ] {
            if let Some(v) = std::env::var(k).ok().filter(|v| !v.is_empty()) {
                proxy_env.insert(k.to_string(), v);
            }
        }
        HostAccess {
            ca_bundle: ca.is_file().then_some(ca),
            mirror,
            security_mirror,
            apt_conf: sorted_files(Path::new("/etc/apt/apt.conf.d")),
            npmrc,
            proxy_env,
        }
    }
}

fn sorted_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `npm config get <key>` on the host; `None` when unset or npm is absent.
fn npm_config_get(key: &str) -> Option<String> {
    let out = Command::new("npm")
        .args(["config", "get", key])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !v.is_empty() && v != "null" && v != "undefined").then_some(v)
}

/// The first Debian and Debian-security mirrors named in apt sources text
/// (one-line and deb822 formats).
pub fn mirrors_from_sources(text: &str) -> (Option<String>, Option<String>) {
    let mut uris = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("URIs:") {
            uris.extend(rest.split_whitespace().map(str::to_string));
        } else if let Some(rest) = line.strip_prefix("deb ") {
            // `deb [opts] uri suite comps`
            let rest = rest.trim_start();
            let rest = match rest.strip_prefix('[') {
                Some(r) => r.split_once(']').map(|(_, r)| r).unwrap_or(""),
                None => rest,
            };
            if let Some(u) = rest.split_whitespace().next() {
                uris.push(u.to_string());
            }
        }
    }
    let find = |suffix: &str| {
        uris.iter()
            .map(|u| u.trim_end_matches('/').to_string())
            .find(|u| {
                (u.starts_with("http://") || u.starts_with("https://")) && u.ends_with(suffix)
            })
    };
    (find("/debian"), find("/debian-security"))
}

/// Per-image step durations measured on this host.
type Timings = BTreeMap<String, Vec<u64>>;

fn human(secs: u64) -> String {
    if secs >= 90 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

fn short_list(items: &[String]) -> String {
    let shown: Vec<&str> = items.iter().take(4).map(String::as_str).collect();
    if items.len() > 4 {
        format!("{}, … +{}", shown.join(", "), items.len() - 4)
    } else {
        shown.join(", ")
    }
}

/// One build in progress: its directory and the log every tool writes to.
struct Build {
    dir: PathBuf,
    root: PathBuf,
    log: PathBuf,
}

impl Build {
    fn steps_done(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("steps"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn mark_done(&self, step: &str) -> Result<(), ImageError> {
        let p = self.dir.join("steps");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(ImageError::io("opening", &p))?;
        writeln!(f, "{step}").map_err(ImageError::io("writing", &p))
    }

    /// Runs `cmd` with stdout/stderr appended to the build log; on failure
    /// the error carries the log's tail.
    fn run(&self, step: &'static str, cmd: &mut Command) -> Result<(), ImageError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(ImageError::io("opening", &self.log))?;
        let log2 = log
            .try_clone()
            .map_err(ImageError::io("opening", &self.log))?;
        let program = cmd.get_program().to_string_lossy().into_owned();
        let status = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .status()
            .map_err(|source| ImageError::Spawn {
                program: program.clone(),
                source,
            })?;
        if status.success() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(ImageError::Build {
            step,
            detail: format!(
                "`{program}` exited with {status}; last lines of {}:\n{}",
                self.log.display(),
                tail.join("\n")
            ),
        })
    }

    /// A command run inside the chroot, in private mount and PID
    /// namespaces with its own `/proc`, with a clean environment.
    fn chroot(&self, access: &HostAccess, argv: &[&str]) -> Command {
        let mut c = Command::new("unshare");
        c.arg("--mount")
            .arg("--propagation")
            .arg("private")
            .arg("--pid")
            .arg("--fork")
            .arg(format!("--mount-proc={}", self.root.join("proc").display()))
            .arg("chroot")
            .arg(&self.root)
            .arg("/usr/bin/env")
            .arg("-i")
            .arg(format!("PATH={CHROOT_PATH}"))
            .arg("HOME=/root")
            .arg("LC_ALL=C.UTF-8")
            .arg("DEBIAN_FRONTEND=noninteractive")
            .arg(format!("NODE_EXTRA_CA_CERTS=/{BUILD_DIR_IN_ROOT}/ca.crt"))
            .arg(format!("npm_config_userconfig=/{BUILD_DIR_IN_ROOT}/npmrc"));
        for (k, v) in &access.proxy_env {
            c.arg(format!("{k}={v}"));
        }
        c.args(argv);
        c
    }

    fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    fn write(&self, abs: &str, content: &str, mode: u32) -> Result<(), ImageError> {
        use std::os::unix::fs::PermissionsExt;
        let p = self.path(abs);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)
                .map_err(ImageError::io("creating directory", parent))?;
        }
        // A symlink here (e.g. /etc/resolv.conf) must not be followed out
        // of the tree.
        if p.symlink_metadata().is_ok() {
            std::fs::remove_file(&p).map_err(ImageError::io("replacing", &p))?;
        }
        std::fs::write(&p, content).map_err(ImageError::io("writing", &p))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .map_err(ImageError::io("chmod", &p))
    }
}

/// Build options.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Rebuild even when the image is cached.
    pub force: bool,
}

/// Makes sure image `plan` is built, building it (resuming an interrupted
/// build) when it is not. `access` is asked only when something must be
/// built (detecting it runs npm). Progress lines go to `progress`.
pub fn build_image(
    cache: &Cache,
    plan: &ImagePlan,
    access: &dyn Fn() -> HostAccess,
    options: &BuildOptions,
    progress: &dyn Fn(&str),
) -> Result<ImageArtifact, ImageError> {
    let key = plan.key();
    let dir = images_dir(cache);
    let target = dir.join(&key);
    let hit = |a: ImageArtifact| -> Result<ImageArtifact, ImageError> {
        set_name(cache, &plan.name, &key)?;
        progress(&format!(
            "image {}: cached (key {}, {} MiB)",
            plan.name,
            &key[..12],
            a.manifest.image_bytes >> 20
        ));
        Ok(a)
    };
    if !options.force {
        if let Ok(a) = ImageArtifact::load(&target) {
            return hit(a);
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(ImageError::NeedRoot);
    }
    let _lock = store::BuildLock::acquire(&dir)?;
    if !options.force {
        if let Ok(a) = ImageArtifact::load(&target) {
            return hit(a);
        }
    }
    let access = &access();
    let build_dir = dir.join(format!(".staging-{key}"));
    std::fs::create_dir_all(&build_dir)
        .map_err(ImageError::io("creating directory", &build_dir))?;
    let b = Build {
        root: build_dir.join("root"),
        log: build_dir.join("build.log"),
        dir: build_dir.clone(),
    };
    let mut done = b.steps_done();
    if options.force {
        done.clear();
        let _ = std::fs::remove_file(b.dir.join("steps"));
    }
    let timings_path = dir.join("timings.json");
    let timings: Timings = store::read_json(&timings_path)
        .map(|(t, _)| t)
        .unwrap_or_default();
    let estimate: Vec<u64> = match timings.get(&plan.name) {
        Some(t) if t.len() == STEPS.len() => t.clone(),
        _ => STEPS.iter().map(|(_, s)| *s).collect(),
    };
    let npm_list: Vec<String> = plan
        .layer
        .npm
        .iter()
        .map(|(n, v)| format!("{n}@{v}"))
        .collect();
    progress(&format!(
        "image {}: building (key {}, log {})",
        plan.name,
        &key[..12],
        b.log.display()
    ));
    let started = Instant::now();
    let mut took = vec![0u64; STEPS.len()];
    let resumed = !done.is_empty();
    for (i, (step, _)) in STEPS.iter().enumerate() {
        let left: u64 = (i..STEPS.len())
            .filter(|j| !done.iter().any(|d| d == STEPS[*j].0))
            .map(|j| estimate[j])
            .sum();
        let what = match *step {
            "apt install" => format!("apt install ({})", short_list(&plan.layer.packages)),
            "npm install" => format!("npm install -g ({})", short_list(&npm_list)),
            s => s.to_string(),
        };
        if done.iter().any(|d| d == step) {
            progress(&format!(
                "[{}/{}] {what}: done in an earlier run",
                i + 1,
                STEPS.len()
            ));
            continue;
        }
        progress(&format!(
            "[{}/{}] {what} … (about {} left)",
            i + 1,
            STEPS.len(),
            human(left)
        ));
        let t = Instant::now();
        match *step {
            "debootstrap" => debootstrap(&b, plan, access)?,
            "build access" => build_access(&b, plan, access)?,
            "apt install" => apt_install(&b, plan, access)?,
            "npm install" => npm_install(&b, &npm_list, access)?,
            "configure" => configure(&b, plan, access, &key)?,
            "seal" => seal(&b, plan, access)?,
            _ => mkfs(&b, &key)?,
        }
        took[i] = t.elapsed().as_secs();
        progress(&format!("      {step}: {}", human(took[i])));
        b.mark_done(step)?;
        done.push(step.to_string());
    }
    let manifest = manifest(&b, plan, &key, started.elapsed())?;
    let staging = store::staging(&dir)?;
    let rootfs = staging.path().join(ROOTFS_FILE);
    let built = b.dir.join(ROOTFS_FILE);
    std::fs::rename(&built, &rootfs).map_err(ImageError::io("moving", &built))?;
    store::write_json(&staging.path().join("manifest.json"), &manifest)?;
    if options.force && target.exists() {
        std::fs::remove_dir_all(&target).map_err(ImageError::io("replacing", &target))?;
    }
    store::publish(staging.path(), &target)?;
    set_name(cache, &plan.name, &key)?;
    // Only a run of every step is a useful estimate for the next build.
    if !resumed {
        let mut timings = timings;
        timings.insert(
            plan.name.clone(),
            took.iter().map(|t| (*t).max(1)).collect(),
        );
        // Best effort: without it the next build shows the default estimate.
        let _ = store::write_json(&timings_path, &timings);
    }
    remove_build_dir(&b.dir)?;
    progress(&format!(
        "image {}: built in {} ({} MiB sealed, {} MiB unpacked)",
        plan.name,
        human(manifest.build_secs),
        manifest.image_bytes >> 20,
        manifest.tree_bytes >> 20
    ));
    ImageArtifact::load(&target)
}

fn set_name(cache: &Cache, name: &str, key: &str) -> Result<(), ImageError> {
    let dir = names_dir(cache);
    std::fs::create_dir_all(&dir).map_err(ImageError::io("creating directory", &dir))?;
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, format!("{key}\n")).map_err(ImageError::io("writing", &tmp))?;
    let p = dir.join(name);
    std::fs::rename(&tmp, &p).map_err(ImageError::io("writing", &p))
}

fn debootstrap(b: &Build, plan: &ImagePlan, access: &HostAccess) -> Result<(), ImageError> {
    if b.root.exists() {
        // A half-done debootstrap cannot be resumed: start over.
        remove_build_dir(&b.root)?;
    }
    let mirror = access.mirror.as_deref().unwrap_or(&plan.debian.mirror);
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "--propagation",
        "private",
        "--fork",
        "debootstrap",
    ])
    .arg(format!("--variant={}", plan.debian.variant))
    .arg(format!("--components={}", plan.debian.components.join(",")))
    .arg(&plan.debian.suite)
    .arg(&b.root)
    .arg(mirror)
    .envs(&access.proxy_env);
    b.run("debootstrap", &mut c)
}

fn sources_list(plan: &ImagePlan, mirror: &str, security: &str) -> String {
    let d = &plan.debian;
    let comps = d.components.join(" ");
    format!(
        "deb {mirror} {s} {comps}\ndeb {mirror} {s}-updates {comps}\ndeb {security} {s}-security {comps}\n",
        s = d.suite
    )
}

fn build_access(b: &Build, plan: &ImagePlan, access: &HostAccess) -> Result<(), ImageError> {
    let ca = match &access.ca_bundle {
        Some(p) => std::fs::read_to_string(p).map_err(ImageError::io("reading", p))?,
        None => String::new(),
    };
    b.write(&format!("/{BUILD_DIR_IN_ROOT}/ca.crt"), &ca, 0o644)?;
    let mut npmrc = access.npmrc.clone();
    npmrc.push_str(&format!(
        "cafile=/{BUILD_DIR_IN_ROOT}/ca.crt\nfund=false\naudit=false\nupdate-notifier=false\n"
    ));
    b.write(&format!("/{BUILD_DIR_IN_ROOT}/npmrc"), &npmrc, 0o600)?;
    for f in &access.apt_conf {
        let Some(name) = f.file_name() else { continue };
        let text = std::fs::read_to_string(f).map_err(ImageError::io("reading", f))?;
        b.write(
            &format!(
                "/etc/apt/apt.conf.d/{APT_BUILD_PREFIX}{}",
                name.to_string_lossy()
            ),
            &text,
            0o644,
        )?;
    }
    b.write(
        &format!("/etc/apt/apt.conf.d/{APT_BUILD_PREFIX}ca"),
        &format!("Acquire::https::CAInfo \"/{BUILD_DIR_IN_ROOT}/ca.crt\";\n"),
        0o644,
    )?;
    let mirror = access.mirror.as_deref().unwrap_or(&plan.debian.mirror);
    let security = access
        .security_mirror
        .as_deref()
        .unwrap_or(&plan.debian.security_mirror);
    b.write(
        "/etc/apt/sources.list",
        &sources_list(plan, mirror, security),
        0o644,
    )?;
    // Package scripts must not start daemons inside the build chroot.
    b.write("/usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n", 0o755)
}

fn apt_install(b: &Build, plan: &ImagePlan, access: &HostAccess) -> Result<(), ImageError> {
    b.run(
        "apt install",
        &mut b.chroot(access, &["apt-get", "update", "-q"]),
    )?;
    let mut argv = vec![
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "-o",
        "Dpkg::Options::=--force-confold",
    ];
    argv.extend(plan.layer.packages.iter().map(String::as_str));
    b.run("apt install", &mut b.chroot(access, &argv))?;
    b.run("apt install", &mut b.chroot(access, &["apt-get", "clean"]))
}

fn npm_install(b: &Build, npm: &[String], access: &HostAccess) -> Result<(), ImageError> {
    if npm.is_empty() {
        return Ok(());
    }
    let mut argv = vec!["npm", "install", "--global", "--cache", "/tmp/npm-cache"];
    argv.extend(npm.iter().map(String::as_str));
    b.run("npm install", &mut b.chroot(access, &argv))
}

fn shell_quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', r"'\''"))
}

fn configure(
    b: &Build,
    plan: &ImagePlan,
    access: &HostAccess,
    key: &str,
) -> Result<(), ImageError> {
    let u = &plan.user;
    let exists = std::fs::read_to_string(b.path("/etc/passwd"))
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(':').next() == Some(u.name.as_str()));
    if !exists {
        let uid = u.uid.to_string();
        b.run(
            "configure",
            &mut b.chroot(
                access,
                &[
                    "useradd",
                    "--create-home",
                    "--user-group",
                    "--uid",
                    &uid,
                    "--shell",
                    &u.shell,
                    &u.name,
                ],
            ),
        )?;
    }
    for f in &plan.layer.files {
        let mode = f
            .mode
            .as_deref()
            .and_then(|m| u32::from_str_radix(m, 8).ok())
            .unwrap_or(0o644);
        b.write(&f.path, f.content.trim_start_matches('\n'), mode)?;
    }
    let services = serde_json::to_string_pretty(&plan.layer.services).unwrap_or_default();
    b.write(
        "/etc/polydev/services.json",
        &format!("{services}\n"),
        0o644,
    )?;
    // The agent passes the manifest's env to every process; login shells
    // and PAM sessions get the same from these files.
    let mut environment = String::new();
    let mut profile = String::from("# Written by polydev image build from image/recipe.toml.\n");
    for (k, v) in &plan.layer.env {
        environment.push_str(&format!("{k}=\"{v}\"\n"));
        profile.push_str(&format!("export {k}={}\n", shell_quote(v)));
    }
    b.write("/etc/environment", &environment, 0o644)?;
    b.write("/etc/profile.d/polydev-env.sh", &profile, 0o644)?;
    b.write("/etc/hostname", "polydev\n", 0o644)?;
    b.write(
        "/etc/hosts",
        "127.0.0.1\tlocalhost polydev\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        0o644,
    )?;
    let info = serde_json::json!({ "name": plan.name, "key": key });
    b.write("/etc/polydev/image.json", &format!("{info}\n"), 0o644)
}

/// Paths (relative to the root) that must not exist in a sealed image.
const SEAL_REMOVE: &[&str] = &[
    BUILD_DIR_IN_ROOT,
    "usr/sbin/policy-rc.d",
    "root/.npm",
    "root/.npmrc",
    "root/.cache",
    "root/.config",
    "var/lib/dbus/machine-id",
    "var/cache/apt/pkgcache.bin",
    "var/cache/apt/srcpkgcache.bin",
    "usr/share/man",
    "usr/share/info",
];

/// Directories whose contents are removed but which stay.
const SEAL_EMPTY: &[&str] = &[
    "var/lib/apt/lists",
    "var/cache/apt/archives",
    "var/cache/debconf",
    "tmp",
    "var/tmp",
    "var/log",
];

fn seal(b: &Build, plan: &ImagePlan, access: &HostAccess) -> Result<(), ImageError> {
    // Docs go, but license texts stay.
    b.run(
        "seal",
        &mut b.chroot(
            access,
            &[
                "sh",
                "-c",
                "find /usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete; \
                 find /usr/share/doc -mindepth 1 -type d -empty -delete; \
                 find /var/lib/dpkg -name '*-old' -delete; \
                 find / -xdev -path /proc -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +",
            ],
        ),
    )?;
    let rm = |p: &Path| -> Result<(), ImageError> {
        match p.symlink_metadata() {
            Ok(m) if m.is_dir() => {
                std::fs::remove_dir_all(p).map_err(ImageError::io("removing", p))
            }
            Ok(_) => std::fs::remove_file(p).map_err(ImageError::io("removing", p)),
            Err(_) => Ok(()),
        }
    };
    for r in SEAL_REMOVE {
        rm(&b.root.join(r))?;
    }
    for d in SEAL_EMPTY {
        if let Ok(rd) = std::fs::read_dir(b.root.join(d)) {
            for e in rd.flatten() {
                rm(&e.path())?;
            }
        }
    }
    let ssh = b.root.join("etc/ssh");
    if let Ok(rd) = std::fs::read_dir(&ssh) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("ssh_host_") {
                rm(&e.path())?;
            }
        }
    }
    let aptconf = b.root.join("etc/apt/apt.conf.d");
    if let Ok(rd) = std::fs::read_dir(&aptconf) {
        for e in rd.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(APT_BUILD_PREFIX)
            {
                rm(&e.path())?;
            }
        }
    }
    // The image's own sources: the recipe's public mirrors, not the build
    // host's.
    b.write(
        "/etc/apt/sources.list",
        &sources_list(plan, &plan.debian.mirror, &plan.debian.security_mirror),
        0o644,
    )?;
    // Empty, not absent: tools that need one generate it on first boot.
    b.write("/etc/machine-id", "", 0o444)?;
    // The guest has no network interface and no resolver of its own; the
    // build host's (copied by debootstrap) must not leak.
    b.write("/etc/resolv.conf", "", 0o644)?;
    check_sealed(&b.root, access)
}

/// Fails if anything from the build host is still in the tree.
fn check_sealed(root: &Path, access: &HostAccess) -> Result<(), ImageError> {
    let mut leaks = Vec::new();
    for r in SEAL_REMOVE {
        if root.join(r).symlink_metadata().is_ok() {
            leaks.push(r.to_string());
        }
    }
    if let Ok(rd) = std::fs::read_dir(root.join("etc/apt/apt.conf.d")) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(APT_BUILD_PREFIX) {
                leaks.push(format!("etc/apt/apt.conf.d/{n}"));
            }
        }
    }
    if let Some(ca) = &access.ca_bundle {
        let host = std::fs::read(ca).unwrap_or_default();
        let image =
            std::fs::read(root.join("etc/ssl/certs/ca-certificates.crt")).unwrap_or_default();
        if !host.is_empty() && host == image {
            leaks.push("etc/ssl/certs/ca-certificates.crt (the build host's bundle)".into());
        }
    }
    if leaks.is_empty() {
        Ok(())
    } else {
        Err(ImageError::Build {
            step: "seal",
            detail: format!("build-host configuration remains: {}", leaks.join(", ")),
        })
    }
}

fn mkfs(b: &Build, key: &str) -> Result<(), ImageError> {
    let out = b.dir.join(ROOTFS_FILE);
    let _ = std::fs::remove_file(&out);
    // A UUID derived from the key: the same recipe gives the same UUID.
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &key[0..8],
        &key[8..12],
        &key[12..16],
        &key[16..20],
        &key[20..32]
    );
    let mut c = Command::new("mkfs.erofs");
    c.arg("-zlz4hc")
        .arg(format!("-U{uuid}"))
        .arg("--quiet")
        .arg(&out)
        .arg(&b.root);
    b.run("mkfs.erofs", &mut c)
}

fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

fn sha256_file(p: &Path) -> Result<String, ImageError> {
    use std::io::Read;
    let mut f = std::fs::File::open(p).map_err(ImageError::io("reading", p))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(ImageError::io("reading", p))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn manifest(
    b: &Build,
    plan: &ImagePlan,
    key: &str,
    took: Duration,
) -> Result<ImageManifest, ImageError> {
    let out = Command::new("dpkg-query")
        .arg(format!(
            "--admindir={}",
            b.root.join("var/lib/dpkg").display()
        ))
        .args(["-W", "-f", "${Package}\t${Version}\n"])
        .output()
        .map_err(|source| ImageError::Spawn {
            program: "dpkg-query".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(ImageError::Build {
            step: "manifest",
            detail: format!(
                "dpkg-query failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let packages = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(p, v)| (p.to_string(), v.to_string()))
        .collect();
    let mut npm = BTreeMap::new();
    for name in plan.layer.npm.keys() {
        let p = b
            .root
            .join("usr/local/lib/node_modules")
            .join(name)
            .join("package.json");
        let (v, _): (serde_json::Value, _) = store::read_json(&p)?;
        let version = v["version"].as_str().unwrap_or("").to_string();
        npm.insert(name.clone(), version);
    }
    let rootfs = b.dir.join(ROOTFS_FILE);
    let image_bytes = rootfs
        .metadata()
        .map_err(ImageError::io("reading", &rootfs))?
        .len();
    Ok(ImageManifest {
        name: plan.name.clone(),
        key: key.to_string(),
        description: plan.description.clone(),
        format: plan.format,
        suite: plan.debian.suite.clone(),
        writable: plan.writable,
        env: plan.layer.env.clone(),
        agent_protocol: polydev_api::agent::PROTOCOL_VERSION,
        packages,
        npm,
        fstype: "erofs".into(),
        tree_bytes: tree_bytes(&b.root),
        image_bytes,
        image_sha256: sha256_file(&rootfs)?,
        build_secs: took.as_secs(),
        built_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_from_both_source_formats() {
        let deb822 = "Types: deb\n# URIs: http://old/debian\nURIs: http://deb.example/debian\nSuites: bookworm\n\nTypes: deb\nURIs: http://deb.example/debian-security/\n";
        assert_eq!(
            mirrors_from_sources(deb822),
            (
                Some("http://deb.example/debian".into()),
                Some("http://deb.example/debian-security".into())
            )
        );
        let one = "deb [signed-by=/k.gpg] https://m.example/debian trixie main\n";
        assert_eq!(
            mirrors_from_sources(one),
            (Some("https://m.example/debian".into()), None)
        );
        assert_eq!(
            mirrors_from_sources("deb https://x/node_20 nodistro main"),
            (None, None)
        );
    }

    #[test]
    fn names_resolve_only_to_built_images() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::new(tmp.path());
        assert!(find_image(&cache, "cli").is_none());
        let key = "a".repeat(64);
        set_name(&cache, "cli", &key).unwrap();
        // A name pointing at nothing is not an image.
        assert!(find_image(&cache, "cli").is_none());
        assert!(find_image(&cache, "../x").is_none());
        assert!(matches!(
            remove_image(&cache, "browser"),
            Err(ImageError::NotBuilt(_))
        ));
        assert!(remove_image(&cache, "cli").unwrap().is_empty());
        assert!(read_names(&cache).is_empty());
    }

    #[test]
    fn build_dirs_with_mounts_are_never_deleted() {
        // /proc is always a mount point below "/".
        let err = remove_build_dir(Path::new("/pro")).unwrap_err();
        assert!(err.to_string().contains("still mounted"), "{err}");
    }
}
