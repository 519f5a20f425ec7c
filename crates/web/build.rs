//! Embed `web/dist` (what `npm run build` in `web/` produces) as a table of
//! `include_bytes!`. A checkout where the web app was not built still
//! compiles: the table is empty and the server says how to build it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    println!("cargo:rerun-if-env-changed=POLYDEV_WEB_DIST");
    let dist = std::env::var_os("POLYDEV_WEB_DIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../../web/dist"));
    // Cargo scans a directory named here for changes to anything below it.
    // A missing path would make it rerun on every build, so without a
    // build, watch `web/` itself: creating `dist` changes it.
    let watched = if dist.is_dir() {
        dist.clone()
    } else {
        dist.parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dist.clone())
    };
    println!("cargo:rerun-if-changed={}", watched.display());
    let mut files = Vec::new();
    if dist.join("index.html").is_file() {
        collect(&dist, &dist, &mut files);
    }
    files.sort();
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let mut out = String::from(
        "/// Every built file: (path below `dist/`, bytes, gzip-compressed bytes when that is smaller).\npub static FILES: &[Embedded] = &[\n",
    );
    for (i, (rel, abs)) in files.iter().enumerate() {
        let gz = match gzip(abs, &out_dir.join(format!("{i}.gz"))) {
            Some(p) => format!("Some(include_bytes!({:?}))", p.display().to_string()),
            None => "None".into(),
        };
        let _ = writeln!(
            out,
            "    ({rel:?}, include_bytes!({:?}), {gz}),",
            abs.display().to_string()
        );
    }
    out.push_str("];\n");
    let target = out_dir.join("files.rs");
    if let Err(e) = std::fs::write(&target, out) {
        panic!("writing {}: {e}", target.display());
    }
}

/// Regular files below `dir`, as (`/`-separated path relative to `root`, absolute path).
fn collect(root: &Path, dir: &Path, files: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(kind) = e.file_type() else { continue };
        if kind.is_dir() {
            collect(root, &path, files);
        } else if kind.is_file() {
            if let Ok(rel) = path.strip_prefix(root) {
                let rel = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                let abs = path.canonicalize().unwrap_or(path);
                files.push((rel, abs));
            }
        }
    }
}

/// `src` gzip-compressed into `dst`, when that saves at least a tenth.
fn gzip(src: &Path, dst: &Path) -> Option<PathBuf> {
    use std::io::Write as _;
    let data = std::fs::read(src).ok()?;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(&data).ok()?;
    let gz = enc.finish().ok()?;
    if gz.len() * 10 > data.len() * 9 {
        return None;
    }
    std::fs::write(dst, gz).ok()?;
    Some(dst.to_path_buf())
}
