//! The initramfs: guest agent as `/init`, busybox, and the kernel modules the
//! agent loads before it mounts the root filesystem.
//!
//! It is an uncompressed newc archive: the kernel unpacks it without a
//! decompressor, which under TCG is noticeably faster than gunzip.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::busybox::{ensure_busybox, BusyboxArtifact};
use crate::cpio::CpioBuilder;
use crate::kernel::KernelArtifact;
use crate::modules::DEFAULT_MODULES;
use crate::{store, Cache, ImageError};

/// Bumped whenever the archive layout or the key derivation changes, so old
/// archives are never reused by a builder that would lay them out differently.
pub const INITRAMFS_FORMAT: u32 = 1;

/// Where the guest agent finds the modules to load, one absolute path per
/// line, in load order.
pub const MODULES_LIST_PATH: &str = "/etc/polydev/modules";

/// Where the guest agent finds a description of the initramfs it booted from.
pub const INITRAMFS_INFO_PATH: &str = "/etc/polydev/initramfs.json";

/// What goes into an initramfs beyond the kernel, agent and busybox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitramfsOptions {
    /// Modules the guest needs; their dependencies are added automatically.
    pub modules: Vec<String>,
}

impl Default for InitramfsOptions {
    fn default() -> Self {
        InitramfsOptions {
            modules: DEFAULT_MODULES.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// `/etc/polydev/initramfs.json` inside the archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitramfsInfo {
    /// Layout version ([`INITRAMFS_FORMAT`]).
    pub format: u32,
    /// `uname -r` the modules were built for.
    pub kernel_release: String,
    /// sha256 of `/init`.
    pub agent_sha256: String,
    /// Module names in load order.
    pub modules: Vec<String>,
    /// Debian version of busybox-static.
    pub busybox_version: String,
}

/// `<cache>/initramfs/<key>/manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitramfsManifest {
    /// The cache key (also the directory name).
    pub key: String,
    /// What the archive says about itself.
    pub info: InitramfsInfo,
    /// Kernel package version.
    pub kernel_version: String,
    /// sha256 of the kernel's manifest.
    pub kernel_manifest_sha256: String,
    /// sha256 of the busybox-static package.
    pub busybox_deb_sha256: String,
    /// Options it was built with.
    pub options: InitramfsOptions,
    /// sha256 of `initramfs.cpio`.
    pub cpio_sha256: String,
    /// Size of `initramfs.cpio` in bytes.
    pub cpio_size: u64,
}

/// A built initramfs in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitramfsArtifact {
    /// The archive to pass as `-initrd` / `initrd_path`.
    pub path: PathBuf,
    /// Its content key.
    pub key: String,
    /// `manifest.json` beside it.
    pub manifest_path: PathBuf,
    /// The parsed manifest.
    pub manifest: InitramfsManifest,
}

/// Everything the archive's bytes depend on. Hashing these (not the output)
/// lets a cache hit skip reading modules and busybox altogether.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyInputs<'a> {
    pub kernel_manifest_sha256: &'a str,
    pub agent_sha256: &'a str,
    pub busybox_deb_sha256: &'a str,
    pub modules: &'a [String],
    pub options: &'a InitramfsOptions,
}

/// The cache key: sha256 over length-prefixed fields, so no two different
/// input sets can serialize to the same byte stream.
pub(crate) fn cache_key(inputs: &KeyInputs<'_>) -> String {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &[u8]| {
        for part in [name.as_bytes(), value] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    };
    field("format", &INITRAMFS_FORMAT.to_le_bytes());
    field("kernel", inputs.kernel_manifest_sha256.as_bytes());
    field("agent", inputs.agent_sha256.as_bytes());
    field("busybox", inputs.busybox_deb_sha256.as_bytes());
    field("modules", &(inputs.modules.len() as u64).to_le_bytes());
    for m in inputs.modules {
        field("module", m.as_bytes());
    }
    // serde_json writes struct fields in declaration order: stable.
    let options = serde_json::to_vec(inputs.options).unwrap_or_default();
    field("options", &options);
    hex::encode(h.finalize())
}

impl InitramfsArtifact {
    fn load(dir: &Path) -> Result<Self, ImageError> {
        let manifest_path = dir.join("manifest.json");
        let (manifest, _): (InitramfsManifest, _) = store::read_json(&manifest_path)?;
        let path = dir.join("initramfs.cpio");
        if !path.is_file() {
            return Err(ImageError::Manifest {
                path: manifest_path,
                detail: "initramfs.cpio is missing".into(),
            });
        }
        Ok(InitramfsArtifact {
            path,
            key: manifest.key.clone(),
            manifest_path,
            manifest,
        })
    }
}

/// The cached initramfs with this key, if it was built before.
pub fn find_cached_initramfs(cache: &Cache, key: &str) -> Option<InitramfsArtifact> {
    // Keys are hex; anything else must not become a path.
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    InitramfsArtifact::load(&cache.initramfs_dir().join(key)).ok()
}

/// [`ensure_initramfs_with`] with the default module set.
pub fn ensure_initramfs(
    cache: &Cache,
    kernel: &KernelArtifact,
    agent: &Path,
    progress: &dyn Fn(&str),
) -> Result<InitramfsArtifact, ImageError> {
    ensure_initramfs_with(cache, kernel, agent, &InitramfsOptions::default(), progress)
}

/// Makes sure an initramfs for this kernel, agent binary and options is in
/// the cache, building it only when one of those inputs changed.
pub fn ensure_initramfs_with(
    cache: &Cache,
    kernel: &KernelArtifact,
    agent: &Path,
    options: &InitramfsOptions,
    progress: &dyn Fn(&str),
) -> Result<InitramfsArtifact, ImageError> {
    let agent_bytes = read_agent(agent)?;
    let agent_sha256 = hex::encode(Sha256::digest(&agent_bytes));
    let busybox = ensure_busybox(cache, progress)?;
    let index = kernel.module_index()?;
    let modules = index.resolve(&options.modules)?;
    let key = cache_key(&KeyInputs {
        kernel_manifest_sha256: &kernel.manifest_sha256,
        agent_sha256: &agent_sha256,
        busybox_deb_sha256: &busybox.manifest.deb_sha256,
        modules: &modules,
        options,
    });
    let dir = cache.initramfs_dir().join(&key);
    let cached = |art| {
        progress(&format!("initramfs: cached (key {})", short(&key)));
        Ok(art)
    };
    if let Ok(art) = InitramfsArtifact::load(&dir) {
        return cached(art);
    }
    let _lock = store::BuildLock::acquire(cache.root())?;
    // Another process may have built it while we waited for the lock.
    if let Ok(art) = InitramfsArtifact::load(&dir) {
        return cached(art);
    }
    progress(&format!(
        "initramfs: building for {} with {} modules (key {})",
        kernel.release(),
        modules.len(),
        short(&key)
    ));

    let release = kernel.release();
    let mut b = CpioBuilder::new();
    b.bytes("/init", 0o755, agent_bytes);
    add_busybox(&mut b, &busybox, agent);
    for d in [
        "/proc",
        "/sys",
        "/dev",
        "/run",
        "/mnt/lower",
        "/mnt/rw",
        "/newroot",
        "/etc",
        "/usr/bin",
        "/usr/sbin",
        "/sbin",
    ] {
        b.dir(d, 0o755);
    }
    b.dir("/tmp", 0o1777).dir("/root", 0o700);
    // The kernel opens /dev/console for init's stdio before anything could
    // mount devtmpfs, so the nodes must be in the archive.
    b.char_device("/dev/console", 0o600, 5, 1)
        .char_device("/dev/null", 0o666, 1, 3);

    let mut list = String::new();
    for name in &modules {
        let entry = index
            .modules
            .get(name)
            .ok_or_else(|| ImageError::MissingModule {
                module: name.clone(),
                needed_by: None,
                release: release.to_string(),
            })?;
        let dest = format!("/lib/modules/{release}/{name}.ko");
        b.file(&dest, 0o644, kernel.modules_dir.join(&entry.path));
        list.push_str(&dest);
        list.push('\n');
    }
    b.bytes(MODULES_LIST_PATH, 0o644, list);

    let info = InitramfsInfo {
        format: INITRAMFS_FORMAT,
        kernel_release: release.to_string(),
        agent_sha256,
        modules: modules.clone(),
        busybox_version: busybox.manifest.version.clone(),
    };
    let mut info_json = serde_json::to_vec_pretty(&info).map_err(|e| ImageError::Manifest {
        path: PathBuf::from(INITRAMFS_INFO_PATH),
        detail: e.to_string(),
    })?;
    info_json.push(b'\n');
    b.bytes(INITRAMFS_INFO_PATH, 0o644, info_json);

    let staging = store::staging(&cache.initramfs_dir())?;
    let out = staging.path().join("out");
    std::fs::create_dir_all(&out).map_err(ImageError::io("creating directory", &out))?;
    let cpio = out.join("initramfs.cpio");
    let size = b.write_file(&cpio)?;
    let manifest = InitramfsManifest {
        key: key.clone(),
        info,
        kernel_version: kernel.package_version().to_string(),
        kernel_manifest_sha256: kernel.manifest_sha256.clone(),
        busybox_deb_sha256: busybox.manifest.deb_sha256.clone(),
        options: options.clone(),
        cpio_sha256: crate::apt::sha256_file(&cpio)?,
        cpio_size: size,
    };
    store::write_json(&out.join("manifest.json"), &manifest)?;
    store::publish(&out, &dir)?;
    progress(&format!(
        "initramfs: built {:.1} MB (key {})",
        size as f64 / 1e6,
        short(&key)
    ));
    InitramfsArtifact::load(&dir)
}

fn short(key: &str) -> &str {
    key.get(..12).unwrap_or(key)
}

fn read_agent(agent: &Path) -> Result<Vec<u8>, ImageError> {
    let bytes = std::fs::read(agent).map_err(|e| ImageError::Agent {
        path: agent.to_path_buf(),
        detail: format!("cannot read it: {e}"),
    })?;
    if !bytes.starts_with(crate::elf::ELF_MAGIC) {
        return Err(ImageError::Agent {
            path: agent.to_path_buf(),
            detail: "not an ELF executable".into(),
        });
    }
    // A dynamically linked /init would fail in the guest with a bare
    // "No such file or directory" from the kernel: catch it here instead.
    if has_interpreter(&bytes) {
        return Err(ImageError::Agent {
            path: agent.to_path_buf(),
            detail: "is dynamically linked (has an ELF interpreter); /init must be static".into(),
        });
    }
    Ok(bytes)
}

/// Whether the ELF has a `PT_INTERP` program header.
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let rd = |off: usize, n: usize| elf.get(off..off.checked_add(n)?);
    let (Some(phoff), Some(phentsize), Some(phnum)) = (rd(0x20, 8), rd(0x36, 2), rd(0x38, 2))
    else {
        return false;
    };
    let phoff = u64::from_le_bytes(phoff.try_into().unwrap_or([0; 8])) as usize;
    let phentsize = usize::from(u16::from_le_bytes([phentsize[0], phentsize[1]]));
    let phnum = usize::from(u16::from_le_bytes([phnum[0], phnum[1]]));
    (0..phnum).any(|i| {
        i.checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .and_then(|o| rd(o, 4))
            .is_some_and(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]) == PT_INTERP)
    })
}

fn add_busybox(b: &mut CpioBuilder, busybox: &BusyboxArtifact, agent: &Path) {
    b.file("/bin/busybox", 0o755, &busybox.path);
    let agent_name = agent
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for applet in &busybox.manifest.applets {
        // `init`/`linuxrc` would shadow the agent as PID 1 if anything ever
        // exec'd them by name; the same goes for an applet named like it.
        if applet == "init" || applet == "linuxrc" || *applet == agent_name || applet == "busybox" {
            continue;
        }
        b.symlink(&format!("/bin/{applet}"), "busybox");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs_with<'a>(
        modules: &'a [String],
        options: &'a InitramfsOptions,
        agent: &'a str,
    ) -> KeyInputs<'a> {
        KeyInputs {
            kernel_manifest_sha256: "k",
            agent_sha256: agent,
            busybox_deb_sha256: "b",
            modules,
            options,
        }
    }

    #[test]
    fn cache_key_is_stable_and_sensitive() {
        let modules = vec!["virtio".to_string(), "virtio_mmio".to_string()];
        // Explicit, not Default: the pinned value must not move when the
        // default module set does (that changes keys through `modules`).
        let options = InitramfsOptions {
            modules: vec!["virtio_mmio".into(), "vsock".into()],
        };
        let key = cache_key(&inputs_with(&modules, &options, "a"));
        // Pinned: changing the derivation must come with an INITRAMFS_FORMAT bump.
        assert_eq!(key, cache_key(&inputs_with(&modules, &options, "a")));
        assert_eq!(key.len(), 64);
        assert_eq!(
            key,
            "50e7e0ffb9f7eddebfcc7c595e7d6397ef27f404ec28a06e9e95cbcd353fba60"
        );
        assert_ne!(key, cache_key(&inputs_with(&modules, &options, "a2")));
        let fewer = vec!["virtio".to_string()];
        assert_ne!(key, cache_key(&inputs_with(&fewer, &options, "a")));
        let other = InitramfsOptions {
            modules: vec!["virtio_mmio".into()],
        };
        assert_ne!(key, cache_key(&inputs_with(&modules, &other, "a")));
        // Field boundaries matter: moving a byte between fields changes the key.
        let joined = vec!["virtio\nvirtio_mmio".to_string()];
        assert_ne!(key, cache_key(&inputs_with(&joined, &options, "a")));
    }

    #[test]
    fn rejects_non_elf_and_dynamic_agents() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("init.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert!(matches!(read_agent(&script), Err(ImageError::Agent { .. })));
        assert!(matches!(
            read_agent(&dir.path().join("missing")),
            Err(ImageError::Agent { .. })
        ));
        // /bin/sh on the host is dynamically linked on Debian.
        if let Ok(bytes) = std::fs::read("/bin/sh") {
            assert!(has_interpreter(&bytes));
        }
        assert!(!has_interpreter(&crate::elf::tests::synth_elf(&[])));
    }
}
