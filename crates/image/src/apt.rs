//! Package resolution and download through the host's apt, and extraction
//! with dpkg-deb. apt is the only way we reach the network: it already knows
//! the configured mirror, proxy and signing keys.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

use crate::{Cache, ImageError};

/// One package version as the apt index describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PackageInfo {
    pub package: String,
    pub version: String,
    /// sha256 of the `.deb`, from the signed index: lets us find a cached
    /// artifact without downloading anything.
    pub sha256: String,
    pub size: Option<u64>,
    pub depends: String,
}

fn run(
    cache: Option<&Cache>,
    program: &str,
    args: &[&str],
    cwd: Option<&Path>,
) -> Result<Output, ImageError> {
    let mut cmd = Command::new(program);
    if let Some(cache) = cache {
        // Hosts built from Debian's container images disable apt's binary
        // package cache, so every apt-cache call re-parses all package lists
        // (~1.7 s). A cache of our own makes a lookup ~0.4 s; apt rebuilds it
        // whenever the lists change, so it is never stale.
        let dir = cache.root().join("apt");
        std::fs::create_dir_all(&dir).map_err(ImageError::io("creating directory", &dir))?;
        cmd.arg("-o").arg(format!(
            "Dir::Cache::pkgcache={}",
            dir.join("pkgcache.bin").display()
        ));
    }
    cmd.args(args).env("LC_ALL", "C");
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    tracing::debug!(program, ?args, ?cwd, "running");
    cmd.output().map_err(|source| ImageError::Spawn {
        program: program.to_string(),
        source,
    })
}

fn stderr_of(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        // apt warns when its sandbox user cannot write our (private) download
        // directory; it then downloads as root, which is fine.
        .filter(|l| !l.is_empty() && !l.contains("unsandboxed"))
        .collect();
    if lines.is_empty() {
        format!("exit status {}", out.status)
    } else {
        lines.join("; ")
    }
}

/// Parses the first stanza of `apt-cache show` output.
pub(crate) fn parse_show(text: &str) -> Option<PackageInfo> {
    let stanza = text.split("\n\n").find(|s| !s.trim().is_empty())?;
    let field = |name: &str| {
        stanza.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|r| r.strip_prefix(':'))
                .map(|v| v.trim().to_string())
        })
    };
    Some(PackageInfo {
        package: field("Package")?,
        version: field("Version")?,
        sha256: field("SHA256")?.to_ascii_lowercase(),
        size: field("Size").and_then(|s| s.parse().ok()),
        depends: field("Depends").unwrap_or_default(),
    })
}

/// The candidate version of `spec` (`name` or `name=version`).
pub(crate) fn show(cache: &Cache, spec: &str) -> Result<PackageInfo, ImageError> {
    let out = run(
        Some(cache),
        "apt-cache",
        &["show", "--no-all-versions", spec],
        None,
    )?;
    let lookup = |detail: String| ImageError::AptLookup {
        package: spec.to_string(),
        detail,
    };
    if !out.status.success() {
        return Err(lookup(stderr_of(&out)));
    }
    parse_show(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| lookup("no Package/Version/SHA256 in its record".into()))
}

/// From a metapackage's `Depends`, the first `prefix*` package and the exact
/// version it pins, e.g. `linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)`.
pub(crate) fn pinned_dependency(depends: &str, prefix: &str) -> Option<(String, Option<String>)> {
    depends
        .split(',')
        .flat_map(|alt| alt.split('|'))
        .map(str::trim)
        .find(|d| d.starts_with(prefix))
        .map(|d| {
            let (name, rest) = d.split_once(' ').unwrap_or((d, ""));
            let version = rest
                .trim()
                .strip_prefix("(=")
                .and_then(|v| v.strip_suffix(')'))
                .map(|v| v.trim().to_string());
            (name.to_string(), version)
        })
}

/// sha256 of a file, streamed.
pub(crate) fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let mut file = std::fs::File::open(path).map_err(ImageError::io("opening", path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(ImageError::io("reading", path))?;
    Ok(hex::encode(hasher.finalize()))
}

/// Downloads `info` into `downloads/<sha256>.deb` (reusing a verified
/// earlier download) and returns its path.
pub(crate) fn download(cache: &Cache, info: &PackageInfo) -> Result<PathBuf, ImageError> {
    let downloads = &cache.downloads_dir();
    std::fs::create_dir_all(downloads).map_err(ImageError::io("creating directory", downloads))?;
    let target = downloads.join(format!("{}.deb", info.sha256));
    if target.exists() {
        if sha256_file(&target)? == info.sha256 {
            return Ok(target);
        }
        std::fs::remove_file(&target).map_err(ImageError::io("removing", &target))?;
    }
    // apt names the file after the package (with the epoch's `:` escaped);
    // a private directory makes "the one .deb in it" unambiguous.
    let tmp = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(downloads)
        .map_err(ImageError::io("creating temporary directory in", downloads))?;
    let spec = format!("{}={}", info.package, info.version);
    let out = run(
        Some(cache),
        "apt-get",
        &["-q", "download", &spec],
        Some(tmp.path()),
    )?;
    if !out.status.success() {
        return Err(ImageError::AptDownload {
            package: spec,
            detail: stderr_of(&out),
        });
    }
    let mut debs = Vec::new();
    for entry in std::fs::read_dir(tmp.path()).map_err(ImageError::io("listing", tmp.path()))? {
        let path = entry.map_err(ImageError::io("listing", tmp.path()))?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            debs.push(path);
        }
    }
    let [deb] = debs.as_slice() else {
        return Err(ImageError::AptDownload {
            package: spec,
            detail: format!(
                "expected one .deb in {}, found {}",
                tmp.path().display(),
                debs.len()
            ),
        });
    };
    let actual = sha256_file(deb)?;
    if actual != info.sha256 {
        return Err(ImageError::ChecksumMismatch {
            path: deb.clone(),
            expected: info.sha256.clone(),
            actual,
        });
    }
    std::fs::rename(deb, &target).map_err(ImageError::io("moving download to", &target))?;
    Ok(target)
}

/// `dpkg-deb -x deb dest`.
pub(crate) fn extract(deb: &Path, dest: &Path) -> Result<(), ImageError> {
    std::fs::create_dir_all(dest).map_err(ImageError::io("creating directory", dest))?;
    let (Some(deb_s), Some(dest_s)) = (deb.to_str(), dest.to_str()) else {
        return Err(ImageError::Extract {
            deb: deb.to_path_buf(),
            detail: "path is not valid UTF-8; use a cache directory with a plain path".into(),
        });
    };
    let out = run(None, "dpkg-deb", &["-x", deb_s, dest_s], None)?;
    if !out.status.success() {
        return Err(ImageError::Extract {
            deb: deb.to_path_buf(),
            detail: stderr_of(&out),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: &str = "Package: linux-image-cloud-amd64\nSource: linux-signed-amd64 (6.1.192+2)\nVersion: 6.1.192-2\nInstalled-Size: 13\nDepends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\nFilename: pool/updates/main/l/linux-signed-amd64/linux-image-cloud-amd64_6.1.192-2_amd64.deb\nSize: 1492\nSHA256: 00BE21C0c17f08ddf26e82d3b53fe7a41efa4a288938da6bb69e89c4b25c281d\nDescription: Linux for x86-64 cloud (meta-package)\n This package depends on the latest Linux kernel.\n\nPackage: linux-image-cloud-amd64\nVersion: 6.1.176-1\nSHA256: ff\n\n";

    #[test]
    fn parses_first_stanza() {
        let info = parse_show(META).unwrap();
        assert_eq!(info.package, "linux-image-cloud-amd64");
        assert_eq!(info.version, "6.1.192-2");
        assert_eq!(info.size, Some(1492));
        assert_eq!(
            info.sha256,
            "00be21c0c17f08ddf26e82d3b53fe7a41efa4a288938da6bb69e89c4b25c281d"
        );
        assert!(parse_show("Package: x\nVersion: 1\n").is_none());
        assert!(parse_show("").is_none());
    }

    #[test]
    fn finds_pinned_dependency() {
        let info = parse_show(META).unwrap();
        assert_eq!(
            pinned_dependency(&info.depends, "linux-image-"),
            Some((
                "linux-image-6.1.0-56-cloud-amd64".into(),
                Some("6.1.192-2".into())
            ))
        );
        assert_eq!(
            pinned_dependency("foo, linux-image-x | bar", "linux-image-"),
            Some(("linux-image-x".into(), None))
        );
        assert_eq!(pinned_dependency("foo", "linux-image-"), None);
    }
}
