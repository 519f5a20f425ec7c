//! Host agent configuration and validation of VM requests against it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use polydev_api::agent::ServiceSpec;
use polydev_api::vm::{Accel, HypervisorKind, VmSpec};
use polydev_image::ImageMemory;

/// Everything the host agent needs to know to run VMs.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Root of all host state: `vms/`, `logs/`, `snapshots/`, `host.sock`.
    pub data_dir: PathBuf,
    /// Default guest kernel (an uncompressed ELF `vmlinux`).
    pub kernel: PathBuf,
    /// Default initramfs (carries the guest agent).
    pub initramfs: PathBuf,
    /// Default hypervisor.
    pub hypervisor: HypervisorKind,
    /// Accelerator QEMU uses.
    pub accel: Accel,
    /// `qemu-system-x86_64` binary.
    pub qemu_bin: PathBuf,
    /// qboot firmware for `-M microvm`.
    pub qboot: PathBuf,
    /// `vhost-device-vsock` binary.
    pub vhost_vsock_bin: PathBuf,
    /// How QEMU VMs get their vsock transport.
    pub qemu_vsock: QemuVsock,
    /// Binary that runs `vsock-bridge` (the `polydev` binary itself).
    pub bridge_bin: PathBuf,
    /// `firecracker` binary, when installed.
    pub firecracker_bin: Option<PathBuf>,
    /// Host TSC frequency in kHz, passed to guests as `tsc_early_khz` because
    /// under TCG the guest cannot calibrate its TSC.
    pub tsc_khz: Option<u64>,
    /// vCPUs when a request names none.
    pub default_vcpus: u32,
    /// Memory when a request names none and its image declares no default
    /// (see [`HostConfig::image_memory`]).
    pub default_memory_mib: u32,
    /// Upper bound of vCPUs per VM.
    pub max_vcpus: u32,
    /// Upper bound of memory per VM.
    pub max_memory_mib: u32,
    /// How long a VM may take from launch to agent-ready.
    pub boot_timeout: Duration,
    /// How long `stop` waits for the guest to power off before killing it.
    pub stop_timeout: Duration,
    /// TCG translation cache per QEMU VM, MiB (TCG only).
    pub tcg_tb_mib: u32,
    /// How many dead VMs' logs to keep.
    pub log_retention: usize,
    /// Cap of each of a VM's `console.log`, `agent.log` and `egress.log`;
    /// at the cap the file rotates to `<name>.1` (one kept), see
    /// [`crate::logfile`].
    pub log_max_bytes: u64,
    /// Cap of all ended VMs' kept logs together (`<data>/logs/`); the
    /// oldest VMs' logs go first.
    pub logs_archive_max_bytes: u64,
    /// Per-VM limits of the egress proxy.
    pub egress: crate::egress::EgressLimits,
    /// The artifact cache holding golden images (`polydev image build`);
    /// `None`: only the minimal (initramfs-only) image is offered.
    pub image_cache: Option<PathBuf>,
    /// Default and minimum memory of golden images by name. Taken from the
    /// recipe compiled into this binary ([`polydev_image::Recipe::builtin`])
    /// rather than from a built image's manifest: memory is launch
    /// configuration, kept out of the image's key, so a cached image built
    /// before a change of it still gets the current values. An image the
    /// recipe does not define (e.g. built with `--recipe`) gets the host's
    /// default and bounds.
    pub image_memory: BTreeMap<String, ImageMemory>,
    /// Run QEMU under its seccomp filter (`-sandbox`, see
    /// [`crate::hypervisor::qemu::SANDBOX`]).
    pub qemu_sandbox: bool,
    /// Confinement of each VM's processes: cgroups, jailer.
    pub confinement: Confinement,
}

/// How each VM's host processes are confined (see [`crate::cgroup`]).
#[derive(Debug, Clone)]
pub struct Confinement {
    /// Whether VMs get cgroups of their own.
    pub cgroups: crate::cgroup::CgroupMode,
    /// cgroup v2 path (relative to the cgroup2 mount) under which VM
    /// cgroups go, instead of the host agent's own (delegated) cgroup.
    pub cgroup_parent: Option<PathBuf>,
    /// Host memory a VM's processes may use beyond its guest memory (and,
    /// under TCG, its translation cache): QEMU itself, device buffers, the
    /// vsock bridge.
    pub memory_overhead_mib: u32,
    /// CPU a VM's processes may use per vCPU, in percent of one host CPU.
    /// Above 100 so the I/O threads and the vsock bridge do not take
    /// their time from the vCPU.
    pub cpu_percent_per_vcpu: u32,
    /// Threads and processes of one VM (QEMU's I/O thread pool alone may
    /// grow to 64 per disk).
    pub pids_max: u64,
    /// Start Firecracker through this jailer (`None`: directly, for tests
    /// and development).
    pub jailer: Option<crate::hypervisor::jailer::Jailer>,
    /// Run each QEMU VM as a user of its own, uid and gid `base + n` for
    /// the lowest `n` no running VM has (QEMU's `-run-with user=`), when
    /// the host agent is root and QEMU offers `-run-with`; `None`: QEMU
    /// runs as the host agent's user.
    pub qemu_uid_base: Option<u32>,
}

/// The first uid of QEMU's per-VM users by default: above the ranges
/// systemd gives to regular users, dynamic users and containers
/// (systemd's `UIDS-GIDS.md`), so no file on the host belongs to them.
pub const DEFAULT_QEMU_UID_BASE: u32 = 0x7000_0000;

/// How many per-VM users there are from the base on.
pub const QEMU_UIDS: u32 = 1 << 20;

impl Default for Confinement {
    fn default() -> Self {
        Confinement {
            cgroups: crate::cgroup::CgroupMode::Auto,
            cgroup_parent: None,
            memory_overhead_mib: 256,
            cpu_percent_per_vcpu: 150,
            pids_max: 512,
            jailer: None,
            qemu_uid_base: Some(DEFAULT_QEMU_UID_BASE),
        }
    }
}

/// The vsock transport of QEMU VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QemuVsock {
    /// `vhost-user-vsock-device` + `vhost-device-vsock`: real virtio-vsock,
    /// but QEMU marks the device unmigratable, so no snapshots.
    VhostUser,
    /// A virtio-serial port carrying `polydev-mux`, bridged to the same
    /// hybrid vsock socket by `polydev vsock-bridge`; migratable.
    SerialMux,
}

/// Default cap of all ended VMs' kept logs together.
pub const DEFAULT_LOGS_ARCHIVE_MAX_BYTES: u64 = 1024 * 1024 * 1024;

/// Lower bound of guest memory: the kernel plus agent need about this much.
pub const MIN_MEMORY_MIB: u32 = 96;
/// Longest allowed VM name.
pub const MAX_NAME_LEN: usize = 63;
/// Largest data disk.
pub const MAX_DATA_DISK_MIB: u32 = 1024 * 1024;
/// Data disk of a VM whose image keeps its writable layer on disk (the CLI
/// image's persistent `/home`) when the request names no size. The file is
/// sparse, so this costs only what the guest writes.
pub const DEFAULT_PERSISTENT_DISK_MIB: u32 = 2048;
/// The image that is only the initramfs (no root filesystem).
pub const MINIMAL_IMAGE: &str = "minimal";

impl HostConfig {
    /// Defaults for a data directory; paths to binaries are looked up in
    /// `PATH`, resource limits follow the machine's size.
    pub fn with_defaults(data_dir: PathBuf, kernel: PathBuf, initramfs: PathBuf) -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let mem_mib = host_memory_mib().unwrap_or(4096);
        HostConfig {
            data_dir,
            kernel,
            initramfs,
            hypervisor: HypervisorKind::Qemu,
            accel: Accel::Tcg,
            qemu_bin: find_in_path("qemu-system-x86_64")
                .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
            qboot: PathBuf::from("/usr/share/qemu/qboot.rom"),
            vhost_vsock_bin: find_in_path("vhost-device-vsock")
                .unwrap_or_else(|| PathBuf::from("vhost-device-vsock")),
            qemu_vsock: QemuVsock::SerialMux,
            bridge_bin: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("polydev")),
            firecracker_bin: std::env::var_os("FIRECRACKER_BIN")
                .map(PathBuf::from)
                .or_else(|| find_in_path("firecracker")),
            tsc_khz: host_tsc_khz(),
            default_vcpus: 1,
            default_memory_mib: 256,
            max_vcpus: cpus.max(1) * 4,
            max_memory_mib: (mem_mib * 3 / 4).max(MIN_MEMORY_MIB),
            boot_timeout: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(30),
            tcg_tb_mib: 256,
            log_retention: 200,
            log_max_bytes: crate::logfile::DEFAULT_LOG_MAX_BYTES,
            logs_archive_max_bytes: DEFAULT_LOGS_ARCHIVE_MAX_BYTES,
            egress: crate::egress::EgressLimits::default(),
            image_cache: polydev_image::Cache::default_root().ok(),
            // The builtin recipe is checked by polydev-image's tests, so
            // the empty fallback (host defaults for every image) is never
            // expected to be taken.
            image_memory: polydev_image::Recipe::builtin()
                .map(|r| {
                    r.images
                        .iter()
                        .filter_map(|(name, i)| Some((name.clone(), i.memory?)))
                        .collect()
                })
                .unwrap_or_default(),
            qemu_sandbox: true,
            confinement: Confinement::default(),
        }
    }

    /// The cgroup limits of a VM of `spec` under this configuration.
    pub fn cgroup_limits(&self, spec: &ResolvedSpec) -> crate::cgroup::Limits {
        let tb = match (spec.hypervisor, self.accel) {
            (HypervisorKind::Qemu, Accel::Tcg) => u64::from(self.tcg_tb_mib),
            _ => 0,
        };
        let c = &self.confinement;
        let mib = u64::from(spec.memory_mib) + tb + u64::from(c.memory_overhead_mib);
        crate::cgroup::Limits {
            memory_bytes: mib * 1024 * 1024,
            cpu_quota_us: u64::from(spec.vcpus)
                * u64::from(c.cpu_percent_per_vcpu)
                * crate::cgroup::CPU_PERIOD_US
                / 100,
            pids_max: c.pids_max,
        }
    }

    /// Directory of live VMs.
    pub fn vms_dir(&self) -> PathBuf {
        self.data_dir.join("vms")
    }

    /// Directory of preserved logs of dead VMs.
    pub fn logs_dir(&self) -> PathBuf {
        self.data_dir.join("logs")
    }

    /// Directory of snapshots.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.data_dir.join("snapshots")
    }

    /// The host agent's API socket.
    pub fn socket_path(&self) -> PathBuf {
        self.data_dir.join("host.sock")
    }

    /// Check a request against the limits and fill in defaults.
    pub fn resolve(&self, spec: &VmSpec) -> Result<ResolvedSpec, SpecError> {
        if let Some(name) = &spec.name {
            validate_name(name)?;
        }
        let vcpus = spec.vcpus.unwrap_or(self.default_vcpus);
        if vcpus == 0 || vcpus > self.max_vcpus {
            return Err(SpecError::Vcpus {
                got: vcpus,
                max: self.max_vcpus,
            });
        }
        let image_name = spec.image.as_deref().unwrap_or(MINIMAL_IMAGE);
        let image = if image_name == MINIMAL_IMAGE {
            None
        } else {
            Some(self.find_image(image_name)?)
        };
        // After the image lookup: an image that is not built is the more
        // useful thing to hear about.
        let memory_mib = self.memory_for(spec.memory_mib, image_name)?;
        let kernel = match &spec.kernel {
            Some(k) => existing_file(k, "kernel")?,
            None => existing_default(&self.kernel, "kernel")?,
        };
        let initramfs = match &spec.initramfs {
            Some(i) => existing_file(i, "initramfs")?,
            None => existing_default(&self.initramfs, "initramfs")?,
        };
        let hypervisor = spec.hypervisor.unwrap_or(self.hypervisor);
        if hypervisor == HypervisorKind::Firecracker {
            if self.firecracker_bin.is_none() {
                return Err(SpecError::NoFirecracker);
            }
            if self.accel != Accel::Kvm {
                return Err(SpecError::FirecrackerNeedsKvm);
            }
        }
        if hypervisor == HypervisorKind::Firecracker && image.is_some() {
            return Err(SpecError::ImageNeedsQemu(image_name.to_string()));
        }
        let persistent = image.as_ref().is_some_and(|i| i.root.persistent_overlay);
        let data_disk_mib = match spec.data_disk_mib {
            Some(0) if persistent => {
                return Err(SpecError::NeedsDisk(image_name.to_string()));
            }
            Some(n) => n,
            None if persistent => DEFAULT_PERSISTENT_DISK_MIB,
            None => 0,
        };
        if data_disk_mib > MAX_DATA_DISK_MIB {
            return Err(SpecError::Disk {
                got: data_disk_mib,
                max: MAX_DATA_DISK_MIB,
            });
        }
        for key in spec.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(SpecError::Env(key.clone()));
            }
        }
        for svc in &spec.services {
            validate_service(svc)?;
        }
        if let Some(p) = &spec.egress {
            crate::egress::validate(p)?;
        }
        // The image's environment (proxy settings) first; the request's
        // own variables win.
        let mut env = image.as_ref().map(|i| i.env.clone()).unwrap_or_default();
        env.extend(spec.env.clone());
        Ok(ResolvedSpec {
            name: spec.name.clone(),
            vcpus,
            memory_mib,
            image: image_name.to_string(),
            kernel,
            initramfs,
            hypervisor,
            env,
            services: spec.services.clone(),
            data_disk_mib,
            egress: spec.egress.clone(),
            rootfs: image.map(|i| i.root),
        })
    }

    /// The memory of a VM of image `image` whose request asked for
    /// `requested`: the request's, else the image's default, else the
    /// host's; at least the image's minimum and within the host's bounds.
    fn memory_for(&self, requested: Option<u32>, image: &str) -> Result<u32, SpecError> {
        let max = self.max_memory_mib;
        let declared = if image == MINIMAL_IMAGE {
            None
        } else {
            self.image_memory.get(image)
        };
        let Some(m) = declared else {
            let got = requested.unwrap_or(self.default_memory_mib);
            if !(MIN_MEMORY_MIB..=max).contains(&got) {
                return Err(SpecError::Memory {
                    got,
                    min: MIN_MEMORY_MIB,
                    max,
                });
            }
            return Ok(got);
        };
        let image = image.to_string();
        // No request could fit: say so rather than suggest a range that
        // is empty.
        if m.min_mib > max {
            return Err(SpecError::ImageMemoryOverHost {
                image,
                min: m.min_mib,
                max,
            });
        }
        let min = m.min_mib.max(MIN_MEMORY_MIB);
        match requested {
            None if m.default_mib > max => Err(SpecError::ImageDefaultMemoryOverHost {
                image,
                default: m.default_mib,
                min,
                max,
            }),
            None => Ok(m.default_mib),
            Some(got) if got < min => Err(SpecError::ImageMemoryBelowMin { image, got, min }),
            Some(got) if got > max => Err(SpecError::Memory { got, min, max }),
            Some(got) => Ok(got),
        }
    }

    /// A built golden image by name, from the image cache.
    fn find_image(&self, name: &str) -> Result<FoundImage, SpecError> {
        let unknown = || SpecError::UnknownImage(name.to_string());
        let cache = polydev_image::Cache::new(self.image_cache.clone().ok_or_else(unknown)?);
        let art = polydev_image::find_image(&cache, name).ok_or_else(unknown)?;
        let m = &art.manifest;
        Ok(FoundImage {
            env: m.env.clone(),
            root: RootImage {
                path: art.rootfs.clone(),
                key: m.key.clone(),
                fstype: m.fstype.clone(),
                persistent_overlay: m.writable == polydev_image::Writable::Disk,
            },
        })
    }
}

struct FoundImage {
    env: std::collections::BTreeMap<String, String>,
    root: RootImage,
}

/// A read-only root filesystem a VM boots into. The file is shared by
/// every VM of the image and attached read-only: creating a VM never
/// copies it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RootImage {
    /// The image file (erofs).
    pub path: PathBuf,
    /// Its content key.
    pub key: String,
    /// Filesystem type, for `polydev.rootfstype=`.
    pub fstype: String,
    /// Whether the overlay's writable layer is the VM's data disk
    /// (persistent, e.g. `/home` of a CLI VM) rather than a guest tmpfs.
    pub persistent_overlay: bool,
}

impl ResolvedSpec {
    /// Kernel command line words that make the guest agent switch into the
    /// root image: it is the first virtio-blk device (`/dev/vda`, see the
    /// QEMU driver), the data disk the second (`/dev/vdb`).
    pub fn root_cmdline(&self) -> Option<String> {
        let r = self.rootfs.as_ref()?;
        let overlay = if r.persistent_overlay && self.data_disk_mib > 0 {
            "/dev/vdb"
        } else {
            "tmpfs"
        };
        Some(format!(
            "polydev.root=/dev/vda polydev.rootfstype={} polydev.overlay={overlay}",
            r.fstype
        ))
    }
}

/// A request with defaults filled in and every field checked.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ResolvedSpec {
    /// Optional human name.
    pub name: Option<String>,
    /// Whole vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Image name.
    pub image: String,
    /// Kernel path.
    pub kernel: PathBuf,
    /// Initramfs path.
    pub initramfs: PathBuf,
    /// Hypervisor.
    pub hypervisor: HypervisorKind,
    /// Environment for the guest.
    pub env: std::collections::BTreeMap<String, String>,
    /// Services for the guest agent.
    pub services: Vec<ServiceSpec>,
    /// Data disk size (0: none).
    pub data_disk_mib: u32,
    /// Egress policy, upstream credentials included: this is why VM records
    /// are written with mode 0600, and why archived records and snapshots
    /// store [`ResolvedSpec::without_secrets`] instead.
    #[serde(default)]
    pub egress: Option<polydev_api::vm::EgressPolicy>,
    /// Root filesystem image (`None`: the minimal image, initramfs only).
    #[serde(default)]
    pub rootfs: Option<RootImage>,
}

impl ResolvedSpec {
    /// This spec with upstream passwords removed, for anything kept after
    /// the VM (archived records) or shared between VMs (snapshots).
    pub fn without_secrets(&self) -> ResolvedSpec {
        let mut s = self.clone();
        if let Some(up) = s.egress.as_mut().and_then(|e| e.upstream.as_mut()) {
            up.password = None;
        }
        s
    }
}

/// Why a VM request was refused before anything was created.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    /// Name is not `[a-z0-9-]{1,63}`.
    #[error("invalid VM name {0:?}: use 1-63 characters from a-z, 0-9 and '-', starting with a letter or digit")]
    Name(String),
    /// vCPUs out of range.
    #[error("vcpus must be a whole number from 1 to {max}; got {got}")]
    Vcpus {
        /// Requested.
        got: u32,
        /// Allowed maximum.
        max: u32,
    },
    /// Memory out of range.
    #[error("memory_mib must be from {min} to {max} MiB on this host; got {got}")]
    Memory {
        /// Requested.
        got: u32,
        /// Allowed minimum.
        min: u32,
        /// Allowed maximum.
        max: u32,
    },
    /// Less memory than the image declares its programs need.
    #[error("image {image} needs at least {min} MiB of memory (its CLIs crash below that); got {got}: pass --memory {min} or more")]
    ImageMemoryBelowMin {
        /// Image name.
        image: String,
        /// Requested.
        got: u32,
        /// The image's minimum.
        min: u32,
    },
    /// The image's default memory is more than this host allows one VM.
    #[error("image {image} defaults to {default} MiB of memory, more than the {max} MiB this host allows one VM: pass --memory from {min} to {max}")]
    ImageDefaultMemoryOverHost {
        /// Image name.
        image: String,
        /// The image's default.
        default: u32,
        /// The image's minimum.
        min: u32,
        /// The host's maximum.
        max: u32,
    },
    /// The image needs more memory than this host allows one VM.
    #[error("image {image} needs at least {min} MiB of memory, more than the {max} MiB this host allows one VM: run it on a host with more memory")]
    ImageMemoryOverHost {
        /// Image name.
        image: String,
        /// The image's minimum.
        min: u32,
        /// The host's maximum.
        max: u32,
    },
    /// Data disk too large.
    #[error("data_disk_mib must be at most {max}; got {got}")]
    Disk {
        /// Requested.
        got: u32,
        /// Allowed maximum.
        max: u32,
    },
    /// No such image.
    #[error("unknown image {0:?}: it is not built on this host; build it with `polydev image build {0}` (see `polydev image ls`), or use \"minimal\"")]
    UnknownImage(String),
    /// Golden images are attached as virtio-blk drives by the QEMU driver only.
    #[error("image {0:?} runs on the qemu hypervisor only for now; use --hypervisor qemu or the minimal image")]
    ImageNeedsQemu(String),
    /// The image keeps its writable layer on the data disk.
    #[error("image {0:?} keeps its writable layer (/home) on a data disk; omit data_disk_mib or give a size above 0")]
    NeedsDisk(String),
    /// A kernel or initramfs path does not exist.
    #[error("{what} {path:?} does not exist or is not a file: build it with `polydev image kernel` or pass an existing path")]
    MissingFile {
        /// Which file.
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// Firecracker requested but not installed.
    #[error("hypervisor firecracker is not available on this host: install it and set FIRECRACKER_BIN, or use qemu")]
    NoFirecracker,
    /// Firecracker requested on a host without working KVM.
    #[error("hypervisor firecracker needs KVM, and this host runs VMs under TCG (see `polydev doctor`); use qemu")]
    FirecrackerNeedsKvm,
    /// Bad environment variable name.
    #[error("invalid environment variable name {0:?}: it must be non-empty without '=' or NUL")]
    Env(String),
    /// Bad egress policy.
    #[error(transparent)]
    Egress(#[from] crate::egress::EgressError),
    /// Bad service declaration.
    #[error("invalid service {name:?}: {why}")]
    Service {
        /// Service name.
        name: String,
        /// What is wrong.
        why: String,
    },
}

fn validate_name(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(SpecError::Name(name.to_string()))
    }
}

fn validate_service(svc: &ServiceSpec) -> Result<(), SpecError> {
    let name_ok = !svc.name.is_empty()
        && svc.name.len() <= 64
        && svc
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    if !name_ok {
        return Err(SpecError::Service {
            name: svc.name.clone(),
            why: "names use 1-64 characters from a-z, 0-9, '_', '.', '-'".into(),
        });
    }
    if svc.argv.is_empty() || svc.argv[0].is_empty() {
        return Err(SpecError::Service {
            name: svc.name.clone(),
            why: "argv must name a program".into(),
        });
    }
    Ok(())
}

fn existing_file(p: &str, what: &'static str) -> Result<PathBuf, SpecError> {
    existing_default(Path::new(p), what)
}

fn existing_default(p: &Path, what: &'static str) -> Result<PathBuf, SpecError> {
    if p.is_file() {
        Ok(p.to_path_buf())
    } else {
        Err(SpecError::MissingFile {
            what,
            path: p.to_path_buf(),
        })
    }
}

/// Find an executable in `PATH` (and `~/.cargo/bin`, where `cargo install`
/// puts things even when it is not on `PATH`).
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn host_memory_mib() -> Option<u32> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    u32::try_from(kib / 1024).ok()
}

/// The host's TSC frequency in kHz, from the kernel's `tsc` clocksource
/// calibration as shown in `/proc/cpuinfo`.
pub fn host_tsc_khz() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    Some((mhz * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> HostConfig {
        let k = dir.join("vmlinux");
        let i = dir.join("initramfs");
        std::fs::write(&k, b"k").unwrap();
        std::fs::write(&i, b"i").unwrap();
        let mut c = HostConfig::with_defaults(dir.join("data"), k, i);
        c.image_cache = Some(dir.join("cache"));
        c.max_vcpus = 8;
        c.max_memory_mib = 4096;
        c
    }

    #[test]
    fn defaults_resolve() {
        let d = tempfile::tempdir().unwrap();
        let r = cfg(d.path()).resolve(&VmSpec::default()).unwrap();
        assert_eq!((r.vcpus, r.memory_mib), (1, 256));
    }

    #[test]
    fn absurd_sizes_are_refused_with_bounds_in_the_message() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        let e = c
            .resolve(&VmSpec {
                memory_mib: Some(10_000_000),
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("96 to 4096"), "{e}");
        let e = c
            .resolve(&VmSpec {
                vcpus: Some(0),
                ..Default::default()
            })
            .unwrap_err();
        assert!(matches!(e, SpecError::Vcpus { got: 0, .. }));
    }

    /// A published cli image as `polydev image build` leaves it, in the
    /// cache of [`cfg`].
    fn publish_fake_cli_image(dir: &Path) {
        let key = "b".repeat(64);
        let img = dir.join("cache/images").join(&key);
        std::fs::create_dir_all(&img).unwrap();
        std::fs::write(img.join(polydev_image::ROOTFS_FILE), b"erofs").unwrap();
        let manifest = serde_json::json!({
            "name": "cli", "key": key, "description": "", "format": 1,
            "suite": "trixie", "writable": "disk",
            "env": {"https_proxy": "http://127.0.0.1:3128", "http_proxy": "http://127.0.0.1:3128"},
            "agent_protocol": 1, "packages": {}, "npm": {}, "fstype": "erofs",
            "tree_bytes": 1, "image_bytes": 1, "image_sha256": "", "build_secs": 1, "built_unix": 1
        });
        std::fs::write(img.join("manifest.json"), manifest.to_string()).unwrap();
        std::fs::create_dir_all(dir.join("cache/images/names")).unwrap();
        std::fs::write(dir.join("cache/images/names/cli"), &key).unwrap();
    }

    #[test]
    fn images_resolve_from_the_cache_with_env_disk_and_root_cmdline() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        let spec = |image: &str, disk: Option<u32>| VmSpec {
            image: Some(image.into()),
            data_disk_mib: disk,
            env: [("https_proxy".to_string(), "mine".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(
            c.resolve(&spec("cli", None)),
            Err(SpecError::UnknownImage("cli".into()))
        );
        publish_fake_cli_image(d.path());

        let r = c.resolve(&spec("cli", None)).unwrap();
        assert_eq!(r.image, "cli");
        assert_eq!(r.data_disk_mib, DEFAULT_PERSISTENT_DISK_MIB);
        assert_eq!(r.env["https_proxy"], "mine", "the request wins");
        assert_eq!(r.env["http_proxy"], "http://127.0.0.1:3128");
        assert_eq!(
            r.root_cmdline().as_deref(),
            Some("polydev.root=/dev/vda polydev.rootfstype=erofs polydev.overlay=/dev/vdb")
        );
        assert_eq!(
            c.resolve(&spec("cli", Some(0))),
            Err(SpecError::NeedsDisk("cli".into()))
        );
        let minimal = c.resolve(&VmSpec::default()).unwrap();
        assert_eq!(
            (minimal.image.as_str(), minimal.root_cmdline()),
            ("minimal", None)
        );
    }

    #[test]
    fn the_builtin_recipe_gives_cli_and_browser_vms_a_gib() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        let gib = ImageMemory {
            default_mib: 1024,
            min_mib: 1024,
        };
        assert_eq!(c.image_memory.get("cli"), Some(&gib));
        assert_eq!(c.image_memory.get("browser"), Some(&gib));
    }

    #[test]
    fn a_golden_image_vm_gets_the_images_memory_unless_it_asks_for_enough() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        publish_fake_cli_image(d.path());
        let spec = |memory_mib: Option<u32>| VmSpec {
            image: Some("cli".into()),
            memory_mib,
            ..Default::default()
        };
        assert_eq!(c.resolve(&spec(None)).unwrap().memory_mib, 1024);
        assert_eq!(c.resolve(&spec(Some(2048))).unwrap().memory_mib, 2048);
        let e = c.resolve(&spec(Some(256))).unwrap_err();
        assert_eq!(
            e,
            SpecError::ImageMemoryBelowMin {
                image: "cli".into(),
                got: 256,
                min: 1024
            }
        );
        assert_eq!(
            e.to_string(),
            "image cli needs at least 1024 MiB of memory (its CLIs crash below that); got 256: pass --memory 1024 or more"
        );
        // Refused before anything exists: resolve never touches the data
        // directory.
        assert!(!c.data_dir.exists());
        // The minimal image keeps the host's default and floor.
        let minimal = c
            .resolve(&VmSpec {
                memory_mib: Some(128),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(minimal.memory_mib, 128);
    }

    #[test]
    fn memory_follows_the_image_then_the_host() {
        let d = tempfile::tempdir().unwrap();
        let mut c = cfg(d.path());
        c.image_memory.insert(
            "big".into(),
            ImageMemory {
                default_mib: 3072,
                min_mib: 2048,
            },
        );
        // Images the recipe gives no memory (or does not know) and the
        // minimal image: the host's default and bounds.
        for image in ["custom", MINIMAL_IMAGE] {
            assert_eq!(c.memory_for(None, image), Ok(256));
            assert_eq!(c.memory_for(Some(100), image), Ok(100));
            assert!(matches!(
                c.memory_for(Some(5000), image),
                Err(SpecError::Memory { min: 96, .. })
            ));
        }
        assert_eq!(c.memory_for(None, "big"), Ok(3072));
        assert_eq!(c.memory_for(Some(2048), "big"), Ok(2048));
        assert_eq!(c.memory_for(Some(4096), "big"), Ok(4096));
        assert!(matches!(
            c.memory_for(Some(1024), "big"),
            Err(SpecError::ImageMemoryBelowMin {
                got: 1024,
                min: 2048,
                ..
            })
        ));
        // Above the host's maximum: the range named starts at the image's
        // minimum.
        let e = c.memory_for(Some(5000), "big").unwrap_err();
        assert!(e.to_string().contains("from 2048 to 4096"), "{e}");

        // A default above the host's maximum is refused, not clamped, and
        // the message names both and what would fit.
        c.max_memory_mib = 2560;
        let e = c.memory_for(None, "big").unwrap_err();
        assert_eq!(
            e.to_string(),
            "image big defaults to 3072 MiB of memory, more than the 2560 MiB this host allows one VM: pass --memory from 2048 to 2560"
        );
        assert_eq!(c.memory_for(Some(2560), "big"), Ok(2560));
        // A minimum above it: nothing fits.
        c.max_memory_mib = 1536;
        for requested in [None, Some(1536), Some(4096)] {
            let e = c.memory_for(requested, "big").unwrap_err();
            assert_eq!(
                e.to_string(),
                "image big needs at least 2048 MiB of memory, more than the 1536 MiB this host allows one VM: run it on a host with more memory"
            );
        }
    }

    #[test]
    fn names_and_missing_files_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        for bad in ["", "UPPER", "-lead", "a/b", "../x", &"x".repeat(64)] {
            let spec = VmSpec {
                name: Some(bad.to_string()),
                ..Default::default()
            };
            assert!(matches!(c.resolve(&spec), Err(SpecError::Name(_))), "{bad}");
        }
        let spec = VmSpec {
            kernel: Some("/nonexistent/vmlinux".into()),
            ..Default::default()
        };
        assert!(matches!(
            c.resolve(&spec),
            Err(SpecError::MissingFile { what: "kernel", .. })
        ));
    }

    #[test]
    fn services_are_validated() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        let spec = VmSpec {
            services: vec![ServiceSpec {
                name: "Bad Name".into(),
                argv: vec!["x".into()],
                env: Default::default(),
                cwd: None,
                user: None,
                restart: Default::default(),
                ready: None,
            }],
            ..Default::default()
        };
        assert!(matches!(c.resolve(&spec), Err(SpecError::Service { .. })));
    }
}
