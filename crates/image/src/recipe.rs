//! The image recipe (`image/recipe.toml`): what goes into each golden image,
//! as data. [`Recipe::image`] flattens the common layer and one image's own
//! layer into an [`ImagePlan`], whose hash is that image's cache key.
//!
//! An image's `memory` is launch configuration, not image bytes: it stays
//! out of the [`ImagePlan`] (and so out of the key), so changing it never
//! rebuilds an image. The host reads it from the recipe compiled into its
//! binary ([`Recipe::memory`]).

use std::collections::BTreeMap;

use polydev_api::agent::ServiceSpec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ImageError;

/// The recipe shipped with this build of polydev (`image/recipe.toml`).
pub const BUILTIN_RECIPE: &str = include_str!("../../../image/recipe.toml");

/// Bumped whenever the builder lays out or seals images differently, so an
/// unchanged recipe still yields a new key when the builder changes.
pub const ROOTFS_FORMAT: u32 = 1;

/// The smallest `memory.min_mib` a recipe may declare: a golden image runs
/// a Debian userland on top of the initramfs, which needs more than the
/// host's floor for the bare initramfs.
pub const MIN_IMAGE_MEMORY_MIB: u32 = 128;

/// The whole recipe file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The Debian base system.
    pub debian: DebianBase,
    /// The unprivileged user.
    pub user: User,
    /// The guest's egress proxy every HTTP client is pointed at.
    pub proxy: Proxy,
    /// What every image gets.
    pub common: Layer,
    /// The images by name.
    pub images: BTreeMap<String, ImageLayer>,
}

/// `[debian]`: what debootstrap builds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebianBase {
    /// Release codename, e.g. `trixie`.
    pub suite: String,
    /// debootstrap `--variant`, e.g. `minbase`.
    pub variant: String,
    /// Archive components.
    pub components: Vec<String>,
    /// Mirror written into the sealed image's sources.
    pub mirror: String,
    /// Security mirror written into the sealed image's sources.
    pub security_mirror: String,
}

/// `[user]`: the unprivileged account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Login name.
    pub name: String,
    /// Numeric uid (and gid of its own group).
    pub uid: u32,
    /// Login shell.
    pub shell: String,
}

/// `[proxy]`: the in-guest egress proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proxy {
    /// Proxy URL, `http://127.0.0.1:3128`.
    pub url: String,
    /// Hosts that bypass it.
    pub no_proxy: String,
}

/// A file the recipe adds to the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Absolute path in the image.
    pub path: String,
    /// Contents.
    pub content: String,
    /// Octal mode, default `0644`.
    #[serde(default)]
    pub mode: Option<String>,
}

/// Packages, npm packages, files, services and environment.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    /// Debian packages.
    #[serde(default)]
    pub packages: Vec<String>,
    /// npm packages installed globally, name → exact version.
    #[serde(default)]
    pub npm: BTreeMap<String, String>,
    /// Files to add.
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// Services the guest agent supervises (`/etc/polydev/services.json`).
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// Environment for every process the agent starts.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// The writable layer VMs of an image get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Writable {
    /// A tmpfs overlay inside the guest: nothing on the host disk.
    Tmpfs,
    /// A persistent per-VM ext4 disk as the overlay's upper layer.
    Disk,
}

/// `memory = { default_mib = …, min_mib = … }` of an image: what its VMs
/// get when a request names no memory, and the least a request may name
/// (its programs fail below that, e.g. the CLIs crash or hang at 256 MiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageMemory {
    /// MiB a VM of the image gets when its request names none.
    pub default_mib: u32,
    /// The least MiB a request for the image may name.
    pub min_mib: u32,
}

/// `[images.<name>]`. (No `deny_unknown_fields` here: serde cannot combine
/// it with `flatten`; the flattened [`Layer`] rejects unknown keys itself.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageLayer {
    /// One line for `polydev image ls`.
    pub description: String,
    /// The writable layer.
    pub writable: Writable,
    /// Default and minimum memory of the image's VMs; `None`: the host's
    /// default and bounds apply. Not part of the [`ImagePlan`], see the
    /// module documentation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ImageMemory>,
    /// Everything else.
    #[serde(flatten)]
    pub layer: Layer,
}

/// One image, fully resolved: everything its bytes depend on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImagePlan {
    /// Image name.
    pub name: String,
    /// [`ROOTFS_FORMAT`].
    pub format: u32,
    /// Description.
    pub description: String,
    /// Debian base.
    pub debian: DebianBase,
    /// The unprivileged user.
    pub user: User,
    /// Egress proxy.
    pub proxy: Proxy,
    /// Writable layer.
    pub writable: Writable,
    /// Common layer then the image's own, merged.
    pub layer: Layer,
}

impl Recipe {
    /// Parse and check recipe text.
    pub fn parse(text: &str) -> Result<Recipe, ImageError> {
        let r: Recipe = toml::from_str(text).map_err(|e| ImageError::Recipe(e.to_string()))?;
        if r.images.is_empty() {
            return Err(ImageError::Recipe("no [images.<name>] defined".into()));
        }
        for (name, img) in &r.images {
            if !valid_name(name) {
                return Err(ImageError::Recipe(format!(
                    "image name {name:?} must be 1-32 characters from a-z, 0-9 and '-'"
                )));
            }
            if let Some(m) = img.memory {
                if m.min_mib < MIN_IMAGE_MEMORY_MIB {
                    return Err(ImageError::Recipe(format!(
                        "image {name}: memory.min_mib must be at least {MIN_IMAGE_MEMORY_MIB}; got {}",
                        m.min_mib
                    )));
                }
                if m.default_mib < m.min_mib {
                    return Err(ImageError::Recipe(format!(
                        "image {name}: memory.default_mib ({}) must be at least memory.min_mib ({})",
                        m.default_mib, m.min_mib
                    )));
                }
            }
        }
        Ok(r)
    }

    /// The memory settings of image `name`, if the recipe defines that
    /// image and gives it any.
    pub fn memory(&self, name: &str) -> Option<ImageMemory> {
        self.images.get(name).and_then(|i| i.memory)
    }

    /// The recipe compiled into this binary.
    pub fn builtin() -> Result<Recipe, ImageError> {
        Recipe::parse(BUILTIN_RECIPE)
    }

    /// The plan for image `name`.
    pub fn image(&self, name: &str) -> Result<ImagePlan, ImageError> {
        let img = self
            .images
            .get(name)
            .ok_or_else(|| ImageError::UnknownImage {
                name: name.to_string(),
                known: self.images.keys().cloned().collect::<Vec<_>>().join(", "),
            })?;
        let mut layer = self.common.clone();
        layer.packages.extend(img.layer.packages.iter().cloned());
        layer.packages.sort();
        layer.packages.dedup();
        layer.npm.extend(img.layer.npm.clone());
        layer.files.extend(img.layer.files.iter().cloned());
        layer.services.extend(img.layer.services.iter().cloned());
        layer.env.extend(img.layer.env.clone());
        for (k, v) in proxy_env(&self.proxy) {
            layer.env.entry(k).or_insert(v);
        }
        let plan = ImagePlan {
            name: name.to_string(),
            format: ROOTFS_FORMAT,
            description: img.description.clone(),
            debian: self.debian.clone(),
            user: self.user.clone(),
            proxy: self.proxy.clone(),
            writable: img.writable,
            layer,
        };
        plan.check()?;
        Ok(plan)
    }
}

/// `http_proxy` and friends in both spellings: curl reads only the lower
/// case `http_proxy`, Node-based tools mostly the upper case ones.
pub fn proxy_env(p: &Proxy) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for k in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"] {
        env.insert(k.to_string(), p.url.clone());
    }
    for k in ["no_proxy", "NO_PROXY"] {
        env.insert(k.to_string(), p.no_proxy.clone());
    }
    env
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl ImagePlan {
    /// The cache key: sha256 of the plan's canonical JSON (struct fields in
    /// declaration order, maps sorted), which covers the format version.
    pub fn key(&self) -> String {
        // Serializing plain data to a Vec cannot fail.
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(Sha256::digest(&bytes))
    }

    fn check(&self) -> Result<(), ImageError> {
        let bad = |what: String| Err(ImageError::Recipe(format!("image {}: {what}", self.name)));
        for p in &self.layer.packages {
            let ok = !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.:=".contains(&b));
            if !ok {
                return bad(format!("{p:?} is not a Debian package name"));
            }
        }
        for (n, v) in &self.layer.npm {
            let ok = !v.is_empty()
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.+".contains(&b));
            if !ok || n.is_empty() || n.contains(char::is_whitespace) {
                return bad(format!(
                    "npm package {n:?} needs an exact version (got {v:?})"
                ));
            }
        }
        for f in &self.layer.files {
            if !f.path.starts_with('/') || f.path.split('/').any(|c| c == "..") {
                return bad(format!(
                    "file path {:?} must be absolute without '..'",
                    f.path
                ));
            }
            if let Some(m) = &f.mode {
                if u32::from_str_radix(m, 8).is_err() {
                    return bad(format!("mode {m:?} of {} is not octal", f.path));
                }
            }
        }
        if !valid_name(&self.user.name) || self.user.uid < 1000 {
            return bad("the user needs a plain name and a uid of at least 1000".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_recipe_parses_and_every_image_resolves() {
        let r = Recipe::builtin().unwrap();
        for name in r.images.keys() {
            let plan = r.image(name).unwrap();
            assert_eq!(plan.layer.npm.len(), 3, "{name} carries the three CLIs");
            assert_eq!(
                plan.layer.env.get("https_proxy").map(String::as_str),
                Some("http://127.0.0.1:3128")
            );
        }
        let cli = r.image("cli").unwrap();
        assert_eq!(cli.writable, Writable::Disk);
        let browser = r.image("browser").unwrap();
        assert!(browser.layer.packages.iter().any(|p| p == "chromium"));
        assert!(browser.layer.services.iter().any(|s| s.name == "vnc"));
    }

    #[test]
    fn key_follows_the_recipe() {
        let r = Recipe::builtin().unwrap();
        let a = r.image("cli").unwrap();
        assert_eq!(a.key(), r.image("cli").unwrap().key());
        let mut r2 = r.clone();
        r2.common.packages.push("jq".into());
        assert_ne!(a.key(), r2.image("cli").unwrap().key());
        assert_ne!(a.key(), r.image("browser").unwrap().key());
    }

    #[test]
    fn bad_recipes_say_what_is_wrong() {
        let r = Recipe::builtin().unwrap();
        assert!(matches!(
            r.image("nope"),
            Err(ImageError::UnknownImage { .. })
        ));
        let mut r2 = r.clone();
        r2.common.npm.insert("x".into(), "".into());
        assert!(r2.image("cli").is_err());
        let mut r3 = r.clone();
        r3.common.files.push(FileSpec {
            path: "etc/x".into(),
            content: String::new(),
            mode: None,
        });
        assert!(r3.image("cli").is_err());
        assert!(Recipe::parse("[debian]\nsuite = 1\n").is_err());
    }

    /// The builtin recipe with `memory` of image cli replaced by `line`
    /// (an empty line: none).
    fn with_cli_memory(line: &str) -> String {
        let old = "memory = { default_mib = 1024, min_mib = 1024 }\npackages = []";
        assert!(
            BUILTIN_RECIPE.contains(old),
            "the cli image's memory line moved"
        );
        BUILTIN_RECIPE.replace(old, &format!("{line}\npackages = []"))
    }

    #[test]
    fn the_builtin_images_need_a_gib_of_memory() {
        let r = Recipe::builtin().unwrap();
        let gib = Some(ImageMemory {
            default_mib: 1024,
            min_mib: 1024,
        });
        assert_eq!(r.memory("cli"), gib);
        assert_eq!(r.memory("browser"), gib);
        assert_eq!(r.memory("nope"), None);
    }

    #[test]
    fn memory_is_optional_and_parsed_when_present() {
        let r = Recipe::parse(&with_cli_memory("")).unwrap();
        assert_eq!(r.memory("cli"), None);
        let r = Recipe::parse(&with_cli_memory(
            "memory = { default_mib = 2048, min_mib = 512 }",
        ))
        .unwrap();
        assert_eq!(
            r.memory("cli"),
            Some(ImageMemory {
                default_mib: 2048,
                min_mib: 512
            })
        );
    }

    #[test]
    fn invalid_memory_is_refused_naming_the_image_and_field() {
        for (line, needle) in [
            (
                "memory = { default_mib = 1024, min_mib = 64 }",
                "image cli: memory.min_mib must be at least 128; got 64",
            ),
            (
                "memory = { default_mib = 512, min_mib = 1024 }",
                "image cli: memory.default_mib (512) must be at least memory.min_mib (1024)",
            ),
            ("memory = { default_mib = 1024 }", "min_mib"),
            (
                "memory = { default_mib = 1024, min_mib = 1024, max_mib = 1 }",
                "max_mib",
            ),
            (
                "memory = { default_mib = -1, min_mib = 1024 }",
                "default_mib",
            ),
        ] {
            let e = Recipe::parse(&with_cli_memory(line))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{line}: {e}");
        }
    }

    /// Memory is how an image's VMs are launched: changing it must not
    /// change the key, or every cached image would be rebuilt.
    #[test]
    fn memory_is_not_part_of_the_key() {
        let r = Recipe::builtin().unwrap();
        let without = Recipe::parse(&with_cli_memory("")).unwrap();
        let other = Recipe::parse(&with_cli_memory(
            "memory = { default_mib = 4096, min_mib = 2048 }",
        ))
        .unwrap();
        let key = r.image("cli").unwrap().key();
        assert_eq!(key, without.image("cli").unwrap().key());
        assert_eq!(key, other.image("cli").unwrap().key());
    }
}
