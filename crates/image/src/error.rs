//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while resolving, downloading, extracting or
/// assembling guest boot artifacts. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A filesystem operation on a cache or staging path failed.
    #[error("{action} {path}: {source} (check that the cache directory is writable and the disk is not full)")]
    Io {
        /// What we were doing, e.g. "reading" or "creating directory".
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A helper program (apt-cache, apt-get, dpkg-deb, busybox) could not be started.
    #[error("could not run `{program}`: {source} (is it installed and on PATH? this needs a Debian-based host)")]
    Spawn {
        /// The program name.
        program: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// `apt-cache` could not tell us about a package.
    #[error("apt-cache lookup of `{package}` failed: {detail} (run `apt-get update` first)")]
    AptLookup {
        /// The package looked up.
        package: String,
        /// What apt said, or what was missing from its answer.
        detail: String,
    },

    /// `apt-get download` failed.
    #[error("apt-get download of `{package}` failed: {detail} (run `apt-get update` first and check that the Debian mirror is reachable)")]
    AptDownload {
        /// The package (and version) requested.
        package: String,
        /// What apt said.
        detail: String,
    },

    /// A downloaded package does not have the checksum the package index promised.
    #[error("downloaded {path} has sha256 {actual} but the package index says {expected} (delete it and run `apt-get update`, then retry)")]
    ChecksumMismatch {
        /// The downloaded file.
        path: PathBuf,
        /// From `apt-cache show`.
        expected: String,
        /// What we computed.
        actual: String,
    },

    /// `dpkg-deb -x` failed.
    #[error(
        "dpkg-deb -x {deb} failed: {detail} (the download may be corrupt: delete it and retry)"
    )]
    Extract {
        /// The package file.
        deb: PathBuf,
        /// What dpkg-deb said.
        detail: String,
    },

    /// An extracted package does not look the way this builder expects.
    #[error("unexpected package layout: {0} (this Debian package may have changed; report it with the package version)")]
    Layout(String),

    /// The kernel image (bzImage) could not be unpacked into an ELF `vmlinux`.
    #[error("cannot extract vmlinux from {path}: {detail}")]
    KernelImage {
        /// The bzImage.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },

    /// A kernel module file could not be parsed.
    #[error("cannot read module info from {path}: {detail} (the module file may be corrupt: delete the kernel from the cache and rebuild)")]
    ModuleInfo {
        /// The `.ko` file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },

    /// A required module (or one of its dependencies) is not in the kernel package.
    #[error("kernel module `{module}` is not available in kernel {release}{} (check the module name; built-in modules need not be listed)", needed_by.as_ref().map(|p| format!(" (needed by `{p}`)")).unwrap_or_default())]
    MissingModule {
        /// The missing module.
        module: String,
        /// The module that depends on it, if it is not a root.
        needed_by: Option<String>,
        /// The kernel release searched.
        release: String,
    },

    /// Module dependencies form a cycle, which the kernel could never load.
    #[error("kernel module dependency cycle: {} (the module metadata is inconsistent; rebuild the kernel artifact)", cycle.join(" -> "))]
    ModuleCycle {
        /// The modules on the cycle, first repeated at the end.
        cycle: Vec<String>,
    },

    /// `busybox --list` failed or listed nothing.
    #[error("`{path} --list` failed: {detail} (the extracted busybox cannot run on this host; delete it from the cache and retry)")]
    Busybox {
        /// The busybox binary.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },

    /// The guest agent binary given by the caller is unusable.
    #[error("guest agent {path}: {detail} (build it statically: `RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p polydev-guest --target x86_64-unknown-linux-gnu`, as `./polydev.sh setup` does)")]
    Agent {
        /// The path given.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },

    /// A manifest in the cache is unreadable.
    #[error("corrupt manifest {path}: {detail} (delete that cache directory and rebuild)")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },

    /// The cache location could not be determined.
    #[error("no cache directory: set POLYDEV_CACHE or HOME")]
    NoCacheDir,

    /// The image recipe is malformed.
    #[error("image recipe: {0} (fix image/recipe.toml)")]
    Recipe(String),

    /// No image of that name in the recipe.
    #[error("no image named {name:?} in the recipe; known images: {known}")]
    UnknownImage {
        /// The name asked for.
        name: String,
        /// The names the recipe defines.
        known: String,
    },

    /// No built image of that name in the cache.
    #[error("image {0:?} is not built on this host: run `polydev image build {0}`")]
    NotBuilt(String),

    /// A step of an image build failed.
    #[error("image build step `{step}` failed: {detail} (the build resumes from this step when run again)")]
    Build {
        /// The step.
        step: &'static str,
        /// What went wrong, with the tool's own words.
        detail: String,
    },

    /// An image build needs root (debootstrap, chroot, device nodes).
    #[error("building an image needs root (debootstrap and chroot): run it as root or via sudo")]
    NeedRoot,

    /// A cpio archive could not be parsed.
    #[error("malformed cpio archive: {0}")]
    Cpio(String),

    /// The cpio archive would need a field larger than newc can hold.
    #[error("cpio entry {name}: {detail}")]
    CpioTooLarge {
        /// The entry name.
        name: String,
        /// Which field overflowed.
        detail: String,
    },
}

impl ImageError {
    /// Shorthand for [`ImageError::Io`].
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> ImageError {
        let path = path.into();
        move |source| ImageError::Io {
            action,
            path,
            source,
        }
    }
}
