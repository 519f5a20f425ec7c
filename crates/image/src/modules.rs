//! Kernel module metadata and dependency resolution.
//!
//! Debian's kernel package ships no `modules.dep` (depmod writes it at install
//! time), so we read each module's `.modinfo` section ourselves. The index is
//! computed once per kernel artifact and stored beside it as `modules.json`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{elf, ImageError};

/// Modules the guest needs before it can reach its root filesystem and the
/// host: virtio-mmio discovery, the block device, vsock (Firecracker) and
/// virtio-serial (`virtio_console`: QEMU's snapshot-safe host link, see
/// `polydev-mux`), entropy, free page reporting, and the filesystems a read-only base plus a
/// writable overlay are made of. ext4 is built in.
pub const DEFAULT_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "vmw_vsock_virtio_transport",
    "virtio_console",
    "overlay",
    "erofs",
    "squashfs",
    "virtio_rng",
    // Free page reporting to the host (QEMU's virtio-balloon-device).
    "virtio_balloon",
];

/// The canonical module name: the kernel treats `-` and `_` alike, and the
/// name inside `.modinfo` always uses `_`.
pub fn canonical_name(name: &str) -> String {
    name.replace('-', "_")
}

/// What one module's `.modinfo` says about it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ModInfo {
    pub name: Option<String>,
    pub depends: Vec<String>,
    /// `softdep=pre: a b` names; often aliases rather than module names.
    pub softdep_pre: Vec<String>,
}

/// Parses the NUL-separated `key=value` strings of a `.modinfo` section.
pub(crate) fn parse_modinfo(section: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for field in section.split(|&b| b == 0) {
        let Ok(field) = std::str::from_utf8(field) else {
            continue;
        };
        let Some((key, value)) = field.split_once('=') else {
            continue;
        };
        match key {
            "name" => info.name = Some(canonical_name(value.trim())),
            "depends" => info.depends.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(canonical_name),
            ),
            "softdep" => {
                // Format: "pre: a b post: c"; only `pre` matters for load order.
                let mut in_pre = false;
                for word in value.split_whitespace() {
                    match word {
                        "pre:" => in_pre = true,
                        "post:" => in_pre = false,
                        w if in_pre => info.softdep_pre.push(canonical_name(w)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    info
}

/// Reads `.modinfo` from a module file's bytes.
pub(crate) fn modinfo_of(path: &Path, bytes: &[u8]) -> Result<ModInfo, ImageError> {
    let err = |detail: String| ImageError::ModuleInfo {
        path: path.to_path_buf(),
        detail,
    };
    let section = elf::section(bytes, ".modinfo")
        .map_err(err)?
        .ok_or_else(|| err("no .modinfo section".into()))?;
    Ok(parse_modinfo(section))
}

/// One loadable module in a kernel's module tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleEntry {
    /// Path relative to the modules directory, e.g. `kernel/fs/erofs/erofs.ko`.
    pub path: String,
    /// Hard dependencies (must be loaded first).
    pub depends: Vec<String>,
    /// Soft `pre:` dependencies that name a module (loaded first if present).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub softdep_pre: Vec<String>,
}

/// Every module of one kernel release, by canonical name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleIndex {
    /// `uname -r` of the kernel.
    pub release: String,
    /// Loadable modules.
    pub modules: BTreeMap<String, ModuleEntry>,
    /// Modules compiled into the kernel (from `modules.builtin`); asking for
    /// one of these is satisfied without loading anything.
    pub builtin: BTreeSet<String>,
}

fn walk_ko(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ImageError> {
    let rd = std::fs::read_dir(dir).map_err(ImageError::io("listing", dir))?;
    for entry in rd {
        let entry = entry.map_err(ImageError::io("listing", dir))?;
        let path = entry.path();
        let ft = entry
            .file_type()
            .map_err(ImageError::io("inspecting", &path))?;
        if ft.is_dir() {
            walk_ko(&path, out)?;
        } else if ft.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

impl ModuleIndex {
    /// Scans `modules_dir` (the contents of `/lib/modules/<release>`).
    pub fn scan(modules_dir: &Path, release: &str) -> Result<Self, ImageError> {
        let mut files = Vec::new();
        walk_ko(&modules_dir.join("kernel"), &mut files)?;
        files.sort();
        let mut modules = BTreeMap::new();
        for file in files {
            let fname = file
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if !fname.contains(".ko") {
                continue;
            }
            if !fname.ends_with(".ko") {
                return Err(ImageError::ModuleInfo {
                    path: file.clone(),
                    detail: "compressed kernel modules are not supported yet; \
                             use a kernel package with plain .ko files"
                        .into(),
                });
            }
            let bytes = std::fs::read(&file).map_err(ImageError::io("reading", &file))?;
            let info = modinfo_of(&file, &bytes)?;
            let name = info
                .name
                .unwrap_or_else(|| canonical_name(fname.trim_end_matches(".ko")));
            let rel = file
                .strip_prefix(modules_dir)
                .map_err(|_| {
                    ImageError::Layout(format!("{} escaped the modules dir", file.display()))
                })?
                .to_string_lossy()
                .into_owned();
            modules.insert(
                name,
                ModuleEntry {
                    path: rel,
                    depends: info.depends,
                    softdep_pre: info.softdep_pre,
                },
            );
        }
        // Softdeps often name aliases (`crc32c`); keep only real module names
        // so resolution never has to guess.
        let names: BTreeSet<String> = modules.keys().cloned().collect();
        for entry in modules.values_mut() {
            entry.softdep_pre.retain(|s| names.contains(s));
        }
        let builtin_file = modules_dir.join("modules.builtin");
        let builtin = match std::fs::read_to_string(&builtin_file) {
            Ok(text) => text
                .lines()
                .filter_map(|l| l.rsplit('/').next())
                .map(|f| canonical_name(f.trim_end_matches(".ko")))
                .filter(|n| !n.is_empty())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => return Err(ImageError::io("reading", &builtin_file)(e)),
        };
        Ok(ModuleIndex {
            release: release.to_string(),
            modules,
            builtin,
        })
    }

    /// The transitive closure of `roots` in load order (every module after
    /// all of its dependencies). Built-in roots are dropped; a root or
    /// dependency that is neither loadable nor built in is an error.
    pub fn resolve<S: AsRef<str>>(&self, roots: &[S]) -> Result<Vec<String>, ImageError> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        let mut stack = Vec::new();
        for root in roots {
            let root = canonical_name(root.as_ref());
            self.visit(&root, None, &mut stack, &mut done, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        parent: Option<&str>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<(), ImageError> {
        if done.contains(name) {
            return Ok(());
        }
        if let Some(pos) = stack.iter().position(|s| s == name) {
            let mut cycle = stack[pos..].to_vec();
            cycle.push(name.to_string());
            return Err(ImageError::ModuleCycle { cycle });
        }
        let Some(entry) = self.modules.get(name) else {
            if self.builtin.contains(name) {
                done.insert(name.to_string());
                return Ok(());
            }
            return Err(ImageError::MissingModule {
                module: name.to_string(),
                needed_by: parent.map(str::to_string),
                release: self.release.clone(),
            });
        };
        stack.push(name.to_string());
        for dep in &entry.depends {
            self.visit(dep, Some(name), stack, done, order)?;
        }
        for soft in &entry.softdep_pre {
            // A soft dependency never makes resolution fail: skip ones that
            // would close a loop and rely on the hard edges for order.
            if !stack.contains(soft) {
                self.visit(soft, Some(name), stack, done, order)?;
            }
        }
        stack.pop();
        done.insert(name.to_string());
        order.push(name.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, deps: &[&str]) -> ModuleEntry {
        ModuleEntry {
            path: path.into(),
            depends: deps.iter().map(|s| s.to_string()).collect(),
            softdep_pre: vec![],
        }
    }

    fn index() -> ModuleIndex {
        let mut modules = BTreeMap::new();
        modules.insert("virtio".into(), entry("kernel/virtio.ko", &[]));
        modules.insert("virtio_ring".into(), entry("kernel/virtio_ring.ko", &[]));
        modules.insert(
            "virtio_mmio".into(),
            entry("kernel/virtio_mmio.ko", &["virtio", "virtio_ring"]),
        );
        modules.insert("vsock".into(), entry("kernel/vsock.ko", &[]));
        modules.insert(
            "vmw_vsock_virtio_transport_common".into(),
            entry("kernel/common.ko", &["virtio", "virtio_ring", "vsock"]),
        );
        modules.insert(
            "vmw_vsock_virtio_transport".into(),
            entry(
                "kernel/t.ko",
                &[
                    "virtio",
                    "vmw_vsock_virtio_transport_common",
                    "virtio_ring",
                    "vsock",
                ],
            ),
        );
        modules.insert("erofs".into(), entry("kernel/erofs.ko", &["libcrc32c"]));
        let mut libcrc = entry("kernel/libcrc32c.ko", &[]);
        libcrc.softdep_pre = vec!["crc32c_intel".into()];
        modules.insert("libcrc32c".into(), libcrc);
        modules.insert("crc32c_intel".into(), entry("kernel/crc32c-intel.ko", &[]));
        modules.insert(
            "virtio_rng".into(),
            entry("kernel/virtio-rng.ko", &["virtio", "virtio_ring"]),
        );
        modules.insert("a".into(), entry("a.ko", &["b"]));
        modules.insert("b".into(), entry("b.ko", &["c"]));
        modules.insert("c".into(), entry("c.ko", &["a"]));
        modules.insert("broken".into(), entry("broken.ko", &["nonexistent"]));
        ModuleIndex {
            release: "6.1.0-test".into(),
            modules,
            builtin: ["ext4".to_string()].into_iter().collect(),
        }
    }

    fn pos(order: &[String], name: &str) -> usize {
        order.iter().position(|n| n == name).unwrap()
    }

    #[test]
    fn closure_is_in_dependency_order() {
        let idx = index();
        let order = idx
            .resolve(&[
                "vmw_vsock_virtio_transport",
                "virtio_mmio",
                "virtio-rng",
                "erofs",
                "ext4",
            ])
            .unwrap();
        for (name, entry) in &idx.modules {
            if let Some(p) = order.iter().position(|n| n == name) {
                for dep in entry.depends.iter().chain(&entry.softdep_pre) {
                    assert!(
                        pos(&order, dep) < p,
                        "{dep} must precede {name} in {order:?}"
                    );
                }
            }
        }
        assert!(order.contains(&"virtio_rng".to_string()));
        assert!(
            !order.contains(&"ext4".to_string()),
            "built-ins are not loaded"
        );
        let unique: BTreeSet<_> = order.iter().collect();
        assert_eq!(unique.len(), order.len(), "no duplicates in {order:?}");
        assert_eq!(order.len(), 10);
    }

    #[test]
    fn resolution_is_deterministic() {
        let idx = index();
        let roots = [
            "erofs",
            "virtio_rng",
            "vmw_vsock_virtio_transport",
            "virtio_mmio",
        ];
        assert_eq!(idx.resolve(&roots).unwrap(), idx.resolve(&roots).unwrap());
    }

    #[test]
    fn missing_module_names_it_and_its_parent() {
        let idx = index();
        let err = idx.resolve(&["nope"]).unwrap_err();
        assert!(
            matches!(&err, ImageError::MissingModule { module, needed_by: None, .. } if module == "nope")
        );
        let err = idx.resolve(&["broken"]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("`nonexistent`") && msg.contains("`broken`"),
            "{msg}"
        );
    }

    #[test]
    fn cycle_is_reported() {
        let err = index().resolve(&["a"]).unwrap_err();
        match err {
            ImageError::ModuleCycle { cycle } => assert_eq!(cycle, ["a", "b", "c", "a"]),
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn parses_modinfo_strings() {
        let raw = b"softdep=pre: crc32c post: foo\0license=GPL\0depends=virtio,vmw_vsock_virtio_transport_common,virtio-ring\0\0\0name=vmw_vsock_virtio_transport\0vermagic=6.1.0 SMP\0";
        let info = parse_modinfo(raw);
        assert_eq!(info.name.as_deref(), Some("vmw_vsock_virtio_transport"));
        assert_eq!(
            info.depends,
            ["virtio", "vmw_vsock_virtio_transport_common", "virtio_ring"]
        );
        assert_eq!(info.softdep_pre, ["crc32c"]);
        assert!(parse_modinfo(b"depends=\0name=overlay\0")
            .depends
            .is_empty());
    }

    #[test]
    fn modinfo_from_synthesized_elf() {
        let elf = crate::elf::tests::synth_elf(&[
            (".text", 1, b"\xc3"),
            (
                ".modinfo",
                1,
                b"depends=virtio,virtio_ring\0name=virtio_rng\0",
            ),
        ]);
        let info = modinfo_of(Path::new("virtio-rng.ko"), &elf).unwrap();
        assert_eq!(info.name.as_deref(), Some("virtio_rng"));
        assert_eq!(info.depends, ["virtio", "virtio_ring"]);
        let no_modinfo = crate::elf::tests::synth_elf(&[(".text", 1, b"\xc3")]);
        assert!(modinfo_of(Path::new("x.ko"), &no_modinfo).is_err());
    }

    #[test]
    fn scan_reads_a_module_tree() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("kernel/drivers");
        std::fs::create_dir_all(&k).unwrap();
        let ko = |deps: &str, name: &str| {
            crate::elf::tests::synth_elf(&[(
                ".modinfo",
                1,
                format!("depends={deps}\0name={name}\0").as_bytes(),
            )])
        };
        std::fs::write(k.join("virtio.ko"), ko("", "virtio")).unwrap();
        std::fs::write(k.join("virtio-rng.ko"), ko("virtio", "virtio_rng")).unwrap();
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/fs/ext4/ext4.ko\n",
        )
        .unwrap();
        let idx = ModuleIndex::scan(dir.path(), "r").unwrap();
        assert_eq!(
            idx.modules["virtio_rng"].path,
            "kernel/drivers/virtio-rng.ko"
        );
        assert!(idx.builtin.contains("ext4"));
        assert_eq!(
            idx.resolve(&["virtio-rng", "ext4"]).unwrap(),
            ["virtio", "virtio_rng"]
        );
    }

    /// Runs against a real Debian module tree when one is lying around
    /// (POLYDEV_TEST_MODULES_DIR=/path/to/lib/modules/<release>).
    #[test]
    fn real_module_tree_if_present() {
        let Some(dir) = std::env::var_os("POLYDEV_TEST_MODULES_DIR") else {
            return;
        };
        let dir = PathBuf::from(dir);
        let release = dir.file_name().unwrap().to_string_lossy().into_owned();
        let idx = ModuleIndex::scan(&dir, &release).unwrap();
        let order = idx.resolve(DEFAULT_MODULES).unwrap();
        assert!(pos(&order, "virtio") < pos(&order, "virtio_mmio"));
        assert!(pos(&order, "vsock") < pos(&order, "vmw_vsock_virtio_transport"));
    }
}
