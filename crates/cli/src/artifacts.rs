//! Guest artifacts: the kernel, the initramfs carrying the guest agent, and
//! the golden root filesystem images built from `image/recipe.toml`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;

/// `polydev image …`
#[derive(Subcommand)]
pub enum ImageCmd {
    /// Fetch the guest kernel and build the initramfs with the guest agent
    /// (cached; rebuilt only when an input changes).
    Kernel {
        /// Print paths as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Build a golden image from the recipe (cached by the recipe's hash;
    /// an interrupted build resumes). Needs root.
    Build {
        /// Image name from the recipe, e.g. `cli` or `browser`.
        name: String,
        /// Recipe file instead of the one built into this binary.
        #[arg(long)]
        recipe: Option<PathBuf>,
        /// Rebuild even if an image for this recipe is cached.
        #[arg(long)]
        force: bool,
    },
    /// List built images.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print an image's manifest (package versions, sizes, key).
    Inspect {
        /// Image name or key.
        name: String,
    },
    /// Remove an image by name or key.
    Rm {
        /// Image name or key.
        name: String,
    },
    /// Remove superseded images and abandoned builds.
    Gc,
}

/// Kernel and initramfs ready to boot.
pub struct BootFiles {
    /// Uncompressed ELF kernel.
    pub kernel: PathBuf,
    /// Initramfs with the agent.
    pub initramfs: PathBuf,
    /// Kernel release.
    pub release: String,
}

pub async fn run(cmd: ImageCmd) -> anyhow::Result<i32> {
    match cmd {
        ImageCmd::Kernel { json } => {
            let files = ensure_boot_files(!json).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "kernel": files.kernel,
                        "initramfs": files.initramfs,
                        "release": files.release,
                    })
                );
            } else {
                println!("kernel    {}", files.kernel.display());
                println!("initramfs {}", files.initramfs.display());
            }
            Ok(0)
        }
        ImageCmd::Build {
            name,
            recipe,
            force,
        } => {
            let recipe = match recipe {
                Some(p) => polydev_image::Recipe::parse(
                    &std::fs::read_to_string(&p)
                        .with_context(|| format!("cannot read recipe {}", p.display()))?,
                )?,
                None => polydev_image::Recipe::builtin()?,
            };
            let plan = recipe.image(&name)?;
            let art = tokio::task::spawn_blocking(move || {
                let cache = image_cache()?;
                let say = |line: &str| eprintln!("{line}");
                let opts = polydev_image::BuildOptions { force };
                polydev_image::build_image(
                    &cache,
                    &plan,
                    &polydev_image::HostAccess::detect,
                    &opts,
                    &say,
                )
                .context("building the image")
            })
            .await
            .context("image build task failed")??;
            println!("{}", art.rootfs.display());
            Ok(0)
        }
        ImageCmd::Ls { json } => {
            let cache = image_cache()?;
            let images = polydev_image::list_images(&cache);
            if json {
                let v: Vec<_> = images
                    .iter()
                    .map(|(a, names)| {
                        serde_json::json!({
                            "names": names,
                            "key": a.manifest.key,
                            "name": a.manifest.name,
                            "image_bytes": a.manifest.image_bytes,
                            "built_unix": a.manifest.built_unix,
                            "rootfs": a.rootfs,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!(
                    "{:<10} {:<12} {:>8}  {:<10} DESCRIPTION",
                    "NAME", "KEY", "SIZE", "CURRENT"
                );
                for (a, names) in &images {
                    let m = &a.manifest;
                    println!(
                        "{:<10} {:<12} {:>5} MiB  {:<10} {}",
                        m.name,
                        &m.key[..12],
                        m.image_bytes >> 20,
                        if names.is_empty() { "no (gc)" } else { "yes" },
                        m.description
                    );
                }
            }
            Ok(0)
        }
        ImageCmd::Inspect { name } => {
            let cache = image_cache()?;
            let art = polydev_image::find_image(&cache, &name)
                .or_else(|| polydev_image::find_image_by_key(&cache, &name))
                .ok_or_else(|| polydev_image::ImageError::NotBuilt(name.clone()))?;
            println!("{}", serde_json::to_string_pretty(&art.manifest)?);
            Ok(0)
        }
        ImageCmd::Rm { name } => {
            let cache = image_cache()?;
            for key in polydev_image::remove_image(&cache, &name)? {
                println!("removed {key}");
            }
            Ok(0)
        }
        ImageCmd::Gc => {
            let cache = image_cache()?;
            let r = polydev_image::gc_images(&cache)?;
            println!(
                "removed {} superseded image(s) ({} MiB) and {} abandoned build(s)",
                r.images.len(),
                r.bytes >> 20,
                r.builds.len()
            );
            Ok(0)
        }
    }
}

fn image_cache() -> anyhow::Result<polydev_image::Cache> {
    Ok(polydev_image::Cache::new(
        polydev_image::Cache::default_root()?,
    ))
}

/// Make sure the kernel and an initramfs with the current guest agent exist.
pub async fn ensure_boot_files(verbose: bool) -> anyhow::Result<BootFiles> {
    let agent = guest_agent_path()?;
    tokio::task::spawn_blocking(move || {
        let cache = polydev_image::Cache::new(polydev_image::Cache::default_root()?);
        let progress = |msg: &str| {
            if verbose {
                eprintln!("{msg}");
            }
        };
        let kernel = polydev_image::ensure_kernel(&cache, &progress)
            .context("preparing the guest kernel")?;
        let initramfs = polydev_image::ensure_initramfs(&cache, &kernel, &agent, &progress)
            .context("building the initramfs")?;
        Ok(BootFiles {
            kernel: kernel.vmlinux.clone(),
            initramfs: initramfs.path.clone(),
            release: kernel.release().to_string(),
        })
    })
    .await
    .context("artifact build task failed")?
}

/// The statically linked guest agent: `$POLYDEV_GUEST_AGENT`, or built by
/// cargo next to this binary (`target/x86_64-unknown-linux-gnu/<profile>/`),
/// or installed beside it.
pub fn guest_agent_path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("POLYDEV_GUEST_AGENT") {
        let p = PathBuf::from(p);
        check_static(&p)?;
        return Ok(p);
    }
    let exe = std::env::current_exe().context("cannot locate the polydev binary")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let mut candidates = vec![dir.join("polydev-guest-static")];
    if let (Some(profile), Some(target)) = (dir.file_name(), dir.parent()) {
        candidates.push(
            target
                .join("x86_64-unknown-linux-gnu")
                .join(profile)
                .join("polydev-guest"),
        );
        // Test binaries live one level deeper, in deps/.
        if profile == "deps" {
            if let (Some(p2), Some(t2)) = (target.file_name(), target.parent()) {
                candidates.push(
                    t2.join("x86_64-unknown-linux-gnu")
                        .join(p2)
                        .join("polydev-guest"),
                );
            }
        }
    }
    for c in &candidates {
        if c.is_file() {
            check_static(c)?;
            return Ok(c.clone());
        }
    }
    bail!(
        "the static guest agent was not found (looked at {}); build it with \
         `RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p polydev-guest --target x86_64-unknown-linux-gnu` \
         or set POLYDEV_GUEST_AGENT",
        candidates.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

/// A dynamically linked agent cannot run as PID 1 of an initramfs that has
/// no libc: refuse it up front instead of producing a VM that never boots.
fn check_static(p: &Path) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(p).with_context(|| format!("cannot read guest agent {}", p.display()))?;
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        bail!("guest agent {} is not an ELF binary", p.display());
    }
    let phoff = u64::from_le_bytes(bytes[32..40].try_into()?) as usize;
    let phentsize = u16::from_le_bytes(bytes[54..56].try_into()?) as usize;
    let phnum = u16::from_le_bytes(bytes[56..58].try_into()?) as usize;
    for i in 0..phnum {
        let off = phoff + i * phentsize;
        let Some(h) = bytes.get(off..off + 4) else {
            break;
        };
        // PT_INTERP = 3: the binary needs a dynamic loader.
        if u32::from_le_bytes(h.try_into()?) == 3 {
            bail!(
                "guest agent {} is dynamically linked; build it with RUSTFLAGS=\"-C target-feature=+crt-static\" and --target x86_64-unknown-linux-gnu",
                p.display()
            );
        }
    }
    Ok(())
}
