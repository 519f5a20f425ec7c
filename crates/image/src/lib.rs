//! Guest boot artifacts for Polydev Remote: Debian's cloud kernel unpacked
//! to a PVH-bootable `vmlinux`, its module tree, and an initramfs carrying
//! the guest agent as `/init`, a static busybox and the virtio/vsock modules.
//!
//! Everything is content-addressed under a [`Cache`]:
//!
//! ```text
//! <cache>/apt/pkgcache.bin                    (apt's binary index, ~40 MB: fast lookups)
//! <cache>/downloads/<deb-sha256>.deb          (only while a build needs it)
//! <cache>/kernel/<deb-sha256>/{vmlinux,config,modules/,modules.json,manifest.json}
//! <cache>/busybox/<deb-sha256>/{busybox,manifest.json}
//! <cache>/initramfs/<key>/{initramfs.cpio,manifest.json}
//! <cache>/images/<key>/{rootfs.erofs,manifest.json}   (golden images, see `rootfs`)
//! <cache>/images/names/<name>                         (key of an image name's newest build)
//! ```
//!
//! Artifacts are built in `.staging-*` siblings and renamed into place, so a
//! directory with a `manifest.json` is always complete.
//!
//! ```no_run
//! # fn main() -> Result<(), polydev_image::ImageError> {
//! use polydev_image::{ensure_initramfs, ensure_kernel, Cache};
//! let cache = Cache::new(Cache::default_root()?);
//! let say = |line: &str| eprintln!("{line}");
//! let kernel = ensure_kernel(&cache, &say)?;
//! let initrd = ensure_initramfs(&cache, &kernel, "target/polydev-guest".as_ref(), &say)?;
//! println!("-kernel {} -initrd {}", kernel.vmlinux.display(), initrd.path.display());
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod apt;
mod busybox;
mod bzimage;
pub mod cpio;
mod debversion;
mod elf;
mod error;
mod initramfs;
mod kernel;
pub mod modules;
pub mod recipe;
mod rootfs;
mod store;

use std::path::{Path, PathBuf};

pub use busybox::{
    ensure_busybox, find_cached_busybox, BusyboxArtifact, BusyboxManifest, BUSYBOX_PACKAGE,
};
pub use error::ImageError;
pub use initramfs::{
    ensure_initramfs, ensure_initramfs_with, find_cached_initramfs, InitramfsArtifact,
    InitramfsInfo, InitramfsManifest, InitramfsOptions, INITRAMFS_FORMAT, INITRAMFS_INFO_PATH,
    MODULES_LIST_PATH,
};
pub use kernel::{
    ensure_kernel, find_cached_kernel, KernelArtifact, KernelManifest, KERNEL_METAPACKAGE,
};
pub use modules::DEFAULT_MODULES;
pub use recipe::{
    ImageMemory, ImagePlan, Recipe, Writable, BUILTIN_RECIPE, MIN_IMAGE_MEMORY_MIB, ROOTFS_FORMAT,
};
pub use rootfs::{
    build_image, find_image, find_image_by_key, gc_images, list_images, mirrors_from_sources,
    remove_image, BuildOptions, GcReport, HostAccess, ImageArtifact, ImageManifest, ROOTFS_FILE,
};

/// The root of the artifact cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// A cache rooted at `root` (created on first use).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Cache { root: root.into() }
    }

    /// `$POLYDEV_CACHE`, else `$XDG_CACHE_HOME/polydev`, else `~/.cache/polydev`.
    pub fn default_root() -> Result<PathBuf, ImageError> {
        let non_empty = |v: &str| std::env::var_os(v).filter(|s| !s.is_empty());
        if let Some(p) = non_empty("POLYDEV_CACHE") {
            return Ok(PathBuf::from(p));
        }
        if let Some(p) = non_empty("XDG_CACHE_HOME") {
            return Ok(PathBuf::from(p).join("polydev"));
        }
        non_empty("HOME")
            .map(|h| PathBuf::from(h).join(".cache").join("polydev"))
            .ok_or(ImageError::NoCacheDir)
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn kernel_dir(&self) -> PathBuf {
        self.root.join("kernel")
    }

    pub(crate) fn busybox_dir(&self) -> PathBuf {
        self.root.join("busybox")
    }

    pub(crate) fn initramfs_dir(&self) -> PathBuf {
        self.root.join("initramfs")
    }

    pub(crate) fn downloads_dir(&self) -> PathBuf {
        self.root.join("downloads")
    }
}
