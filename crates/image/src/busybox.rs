//! A static busybox for the initramfs, from Debian's `busybox-static`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::{apt, debversion, store, Cache, ImageError};

/// The Debian package providing a statically linked busybox.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

const BUSYBOX_FORMAT: u32 = 1;

/// What `<cache>/busybox/<deb-sha256>/manifest.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusyboxManifest {
    /// Layout version of the artifact directory.
    pub format: u32,
    /// Debian package name.
    pub package: String,
    /// Debian version, e.g. `1:1.35.0-4+deb12u1+b1`.
    pub version: String,
    /// sha256 of the `.deb` (also the directory name).
    pub deb_sha256: String,
    /// Applet names from `busybox --list`, sorted.
    pub applets: Vec<String>,
}

/// A cached static busybox binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusyboxArtifact {
    /// The binary, `<cache>/busybox/<deb-sha256>/busybox`.
    pub path: PathBuf,
    /// The parsed manifest.
    pub manifest: BusyboxManifest,
}

impl BusyboxArtifact {
    fn load(dir: &Path) -> Result<Self, ImageError> {
        let manifest_path = dir.join("manifest.json");
        let (manifest, _): (BusyboxManifest, _) = store::read_json(&manifest_path)?;
        let path = dir.join("busybox");
        if manifest.format != BUSYBOX_FORMAT || !path.is_file() {
            return Err(ImageError::Manifest {
                path: manifest_path,
                detail: "outdated format or missing binary".into(),
            });
        }
        Ok(BusyboxArtifact { path, manifest })
    }
}

/// The newest busybox in the cache, without asking apt.
pub fn find_cached_busybox(cache: &Cache) -> Option<BusyboxArtifact> {
    store::artifact_dirs(&cache.busybox_dir())
        .iter()
        .filter_map(|d| BusyboxArtifact::load(d).ok())
        .max_by(|a, b| debversion::compare(&a.manifest.version, &b.manifest.version))
}

/// Makes sure the candidate `busybox-static` is in the cache and returns it;
/// like [`crate::ensure_kernel`], falls back to the newest cached one (with
/// a warning) when apt cannot be used.
pub fn ensure_busybox(
    cache: &Cache,
    progress: &dyn Fn(&str),
) -> Result<BusyboxArtifact, ImageError> {
    let fallback = |err: ImageError| match find_cached_busybox(cache) {
        Some(art) => {
            progress(&format!(
                "busybox: warning: {err}; using cached {} instead",
                art.manifest.version
            ));
            Ok(art)
        }
        None => Err(err),
    };
    let info = match apt::show(cache, BUSYBOX_PACKAGE) {
        Ok(info) => info,
        Err(e) => return fallback(e),
    };
    let dir = cache.busybox_dir().join(&info.sha256);
    let cached = |art| {
        progress(&format!("busybox: cached {}", info.version));
        Ok(art)
    };
    if let Ok(art) = BusyboxArtifact::load(&dir) {
        return cached(art);
    }
    let _lock = store::BuildLock::acquire(cache.root())?;
    // Another process may have built it while we waited for the lock.
    if let Ok(art) = BusyboxArtifact::load(&dir) {
        return cached(art);
    }
    progress(&format!(
        "busybox: downloading {} {}",
        info.package, info.version
    ));
    let deb = match apt::download(cache, &info) {
        Ok(deb) => deb,
        Err(e) => return fallback(e),
    };
    let staging = store::staging(&cache.busybox_dir())?;
    let tree = staging.path().join("extract");
    let out = staging.path().join("out");
    apt::extract(&deb, &tree)?;
    std::fs::create_dir_all(&out).map_err(ImageError::io("creating directory", &out))?;
    let src = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| tree.join(p))
        .find(|p| p.is_file())
        .ok_or_else(|| ImageError::Layout(format!("no bin/busybox in {}", deb.display())))?;
    let bin = out.join("busybox");
    std::fs::rename(&src, &bin).map_err(ImageError::io("moving", &src))?;
    let applets = list_applets(&bin)?;
    let manifest = BusyboxManifest {
        format: BUSYBOX_FORMAT,
        package: info.package.clone(),
        version: info.version.clone(),
        deb_sha256: info.sha256.clone(),
        applets,
    };
    store::write_json(&out.join("manifest.json"), &manifest)?;
    store::publish(&out, &dir)?;
    if let Err(e) = std::fs::remove_file(&deb) {
        tracing::warn!(path = %deb.display(), error = %e, "could not remove downloaded package");
    }
    progress(&format!(
        "busybox: built {} ({} applets)",
        info.version,
        manifest.applets.len()
    ));
    BusyboxArtifact::load(&dir)
}

/// Runs the (static, so host-runnable) binary to learn its applets.
fn list_applets(bin: &Path) -> Result<Vec<String>, ImageError> {
    let err = |detail: String| ImageError::Busybox {
        path: bin.to_path_buf(),
        detail,
    };
    let out = Command::new(bin)
        .arg("--list")
        .output()
        .map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut applets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        // An applet name becomes a path component: refuse anything odd.
        .filter(|l| !l.is_empty() && !l.contains('/') && *l != "." && *l != "..")
        .map(str::to_string)
        .collect();
    applets.sort();
    applets.dedup();
    if applets.is_empty() {
        return Err(err("it listed no applets".into()));
    }
    Ok(applets)
}
