//! The guest kernel: Debian's cloud kernel, unpacked to a PVH-bootable
//! `vmlinux` plus its module tree.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::modules::ModuleIndex;
use crate::{apt, bzimage, debversion, store, Cache, ImageError};

/// The metapackage that always depends on the current cloud kernel.
pub const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";

/// Bumped when the layout of a kernel artifact changes, so older ones are
/// not mistaken for current ones.
const KERNEL_FORMAT: u32 = 1;

/// What `<cache>/kernel/<deb-sha256>/manifest.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelManifest {
    /// Layout version of the artifact directory.
    pub format: u32,
    /// Debian package the kernel came from, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    /// Its Debian version, e.g. `6.1.192-2`.
    pub version: String,
    /// `uname -r`, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// sha256 of the `.deb` (also the directory name).
    pub deb_sha256: String,
    /// sha256 of `vmlinux`.
    pub vmlinux_sha256: String,
    /// Size of `vmlinux` in bytes.
    pub vmlinux_size: u64,
    /// Whether `vmlinux` has a PVH entry note (needed by microvm/Firecracker).
    pub pvh: bool,
    /// Number of loadable modules in `modules/`.
    pub module_count: usize,
}

/// A kernel ready to boot, as stored in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelArtifact {
    /// The artifact directory, `<cache>/kernel/<deb-sha256>`.
    pub dir: PathBuf,
    /// Uncompressed ELF kernel for PVH boot (`-kernel` / `kernel_image_path`).
    pub vmlinux: PathBuf,
    /// The module tree (what `/lib/modules/<release>` would hold).
    pub modules_dir: PathBuf,
    /// The kernel's build configuration.
    pub config: PathBuf,
    /// `manifest.json`.
    pub manifest_path: PathBuf,
    /// sha256 of the manifest's bytes: identifies this kernel in other keys.
    pub manifest_sha256: String,
    /// The parsed manifest.
    pub manifest: KernelManifest,
}

impl KernelArtifact {
    /// `uname -r` of this kernel.
    pub fn release(&self) -> &str {
        &self.manifest.release
    }

    /// The Debian package version.
    pub fn package_version(&self) -> &str {
        &self.manifest.version
    }

    /// The module index computed when the artifact was built.
    pub fn module_index(&self) -> Result<ModuleIndex, ImageError> {
        Ok(store::read_json(&self.dir.join("modules.json"))?.0)
    }

    /// Loads a published artifact directory, checking that its files exist.
    pub fn load(dir: &Path) -> Result<Self, ImageError> {
        let manifest_path = dir.join("manifest.json");
        let (manifest, bytes): (KernelManifest, _) = store::read_json(&manifest_path)?;
        if manifest.format != KERNEL_FORMAT {
            return Err(ImageError::Manifest {
                path: manifest_path,
                detail: format!(
                    "kernel artifact format {} (this build expects {KERNEL_FORMAT})",
                    manifest.format
                ),
            });
        }
        let art = KernelArtifact {
            dir: dir.to_path_buf(),
            vmlinux: dir.join("vmlinux"),
            modules_dir: dir.join("modules"),
            config: dir.join("config"),
            manifest_path,
            manifest_sha256: hex::encode(Sha256::digest(&bytes)),
            manifest,
        };
        for p in [&art.vmlinux, &art.modules_dir, &art.config] {
            if !p.exists() {
                return Err(ImageError::Manifest {
                    path: art.manifest_path.clone(),
                    detail: format!("{} is missing", p.display()),
                });
            }
        }
        Ok(art)
    }
}

/// The newest kernel in the cache by Debian version, without asking apt.
pub fn find_cached_kernel(cache: &Cache) -> Option<KernelArtifact> {
    store::artifact_dirs(&cache.kernel_dir())
        .iter()
        .filter_map(|d| KernelArtifact::load(d).ok())
        .max_by(|a, b| {
            debversion::compare(&a.manifest.version, &b.manifest.version)
                .then_with(|| a.manifest.deb_sha256.cmp(&b.manifest.deb_sha256))
        })
}

/// Makes sure the current Debian cloud kernel is in the cache and returns
/// it. A cache hit costs one `apt-cache` lookup and nothing else. When apt
/// cannot be used (no package lists, no mirror), the newest cached kernel is
/// returned instead, with a warning through `progress`.
pub fn ensure_kernel(cache: &Cache, progress: &dyn Fn(&str)) -> Result<KernelArtifact, ImageError> {
    let meta = match apt::show(cache, KERNEL_METAPACKAGE) {
        Ok(meta) => meta,
        Err(e) => return fallback(cache, e, progress),
    };
    let Some((name, version)) = apt::pinned_dependency(&meta.depends, "linux-image-") else {
        let err = ImageError::AptLookup {
            package: KERNEL_METAPACKAGE.to_string(),
            detail: format!(
                "its Depends ({}) names no linux-image package",
                meta.depends
            ),
        };
        return fallback(cache, err, progress);
    };
    let cached = |art: KernelArtifact| {
        progress(&format!(
            "kernel: cached {} {} ({})",
            art.manifest.package,
            art.manifest.version,
            art.release()
        ));
        Ok(art)
    };
    // A Debian archive never reuses a (package, version) for different
    // bytes, so a match here spares the second lookup for the checksum.
    if let Some(version) = &version {
        let hit = store::artifact_dirs(&cache.kernel_dir())
            .iter()
            .filter_map(|d| KernelArtifact::load(d).ok())
            .find(|a| a.manifest.package == name && a.manifest.version == *version);
        if let Some(art) = hit {
            return cached(art);
        }
    }
    let spec = match version {
        Some(v) => format!("{name}={v}"),
        None => name,
    };
    let info = match apt::show(cache, &spec) {
        Ok(info) => info,
        Err(e) => return fallback(cache, e, progress),
    };
    let dir = cache.kernel_dir().join(&info.sha256);
    if let Ok(art) = KernelArtifact::load(&dir) {
        return cached(art);
    }
    let _lock = store::BuildLock::acquire(cache.root())?;
    // Another process may have built it while we waited for the lock.
    if let Ok(art) = KernelArtifact::load(&dir) {
        return cached(art);
    }
    let size = info
        .size
        .map(|s| format!(" ({:.1} MB)", s as f64 / 1e6))
        .unwrap_or_default();
    progress(&format!(
        "kernel: downloading {} {}{size}",
        info.package, info.version
    ));
    let deb = match apt::download(cache, &info) {
        Ok(deb) => deb,
        Err(e) => return fallback(cache, e, progress),
    };
    progress(&format!("kernel: extracting {}", info.package));
    build(&info, &deb, &dir, progress)?;
    // The artifact holds everything we need; the 27 MB package is dead weight.
    if let Err(e) = std::fs::remove_file(&deb) {
        tracing::warn!(path = %deb.display(), error = %e, "could not remove downloaded package");
    }
    KernelArtifact::load(&dir)
}

fn fallback(
    cache: &Cache,
    err: ImageError,
    progress: &dyn Fn(&str),
) -> Result<KernelArtifact, ImageError> {
    match find_cached_kernel(cache) {
        Some(art) => {
            progress(&format!(
                "kernel: warning: {err}; using cached {} {} instead",
                art.manifest.package, art.manifest.version
            ));
            Ok(art)
        }
        None => Err(err),
    }
}

/// The single entry of `dir` whose name starts with `prefix`.
fn only_entry(dir: &Path, prefix: &str) -> Result<PathBuf, ImageError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(ImageError::io("listing", dir))? {
        let entry = entry.map_err(ImageError::io("listing", dir))?;
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            found.push(entry.path());
        }
    }
    match <[PathBuf; 1]>::try_from(found) {
        Ok([one]) => Ok(one),
        Err(found) => Err(ImageError::Layout(format!(
            "expected exactly one {prefix}* in {}, found {}",
            dir.display(),
            found.len()
        ))),
    }
}

fn build(
    info: &apt::PackageInfo,
    deb: &Path,
    target: &Path,
    progress: &dyn Fn(&str),
) -> Result<(), ImageError> {
    let parent = target
        .parent()
        .ok_or_else(|| ImageError::Layout(format!("{} has no parent", target.display())))?;
    let staging = store::staging(parent)?;
    let tree = staging.path().join("extract");
    let out = staging.path().join("out");
    apt::extract(deb, &tree)?;
    std::fs::create_dir_all(&out).map_err(ImageError::io("creating directory", &out))?;

    // Packages built for merged-/usr put modules under usr/lib.
    let modules_root = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|p| tree.join(p))
        .find(|p| p.is_dir())
        .ok_or_else(|| ImageError::Layout(format!("no lib/modules in {}", deb.display())))?;
    let kver_dir = only_entry(&modules_root, "")?;
    let release = kver_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();

    let boot = tree.join("boot");
    let vmlinuz = boot.join(format!("vmlinuz-{release}"));
    let vmlinuz = if vmlinuz.is_file() {
        vmlinuz
    } else {
        only_entry(&boot, "vmlinuz-")?
    };
    let image = std::fs::read(&vmlinuz).map_err(ImageError::io("reading", &vmlinuz))?;
    let (vmlinux, pvh) =
        bzimage::extract_vmlinux(&image).map_err(|detail| ImageError::KernelImage {
            path: vmlinuz.clone(),
            detail,
        })?;
    if !pvh {
        progress("kernel: warning: vmlinux has no PVH entry note; microvm and Firecracker cannot boot it");
    }
    let vmlinux_path = out.join("vmlinux");
    std::fs::write(&vmlinux_path, &vmlinux).map_err(ImageError::io("writing", &vmlinux_path))?;

    let config = boot.join(format!("config-{release}"));
    let config = if config.is_file() {
        config
    } else {
        only_entry(&boot, "config-")?
    };
    let config_out = out.join("config");
    std::fs::copy(&config, &config_out).map_err(ImageError::io("copying", &config))?;

    let modules_out = out.join("modules");
    std::fs::rename(&kver_dir, &modules_out).map_err(ImageError::io("moving", &kver_dir))?;
    progress(&format!("kernel: indexing modules of {release}"));
    let index = ModuleIndex::scan(&modules_out, &release)?;
    store::write_json(&out.join("modules.json"), &index)?;

    let manifest = KernelManifest {
        format: KERNEL_FORMAT,
        package: info.package.clone(),
        version: info.version.clone(),
        release: release.clone(),
        deb_sha256: info.sha256.clone(),
        vmlinux_sha256: hex::encode(Sha256::digest(&vmlinux)),
        vmlinux_size: vmlinux.len() as u64,
        pvh,
        module_count: index.modules.len(),
    };
    // Written last: its presence marks a complete artifact.
    store::write_json(&out.join("manifest.json"), &manifest)?;
    store::publish(&out, target)?;
    progress(&format!(
        "kernel: built {release} (vmlinux {:.1} MB, {} modules{})",
        vmlinux.len() as f64 / 1e6,
        index.modules.len(),
        if pvh { ", PVH" } else { "" }
    ));
    Ok(())
}
