//! The dashboard (`web/`, TypeScript built by Vite), embedded into the
//! binary so that serving it needs no Node.js and no files beside the
//! binary. The README's setup builds `web/dist` before the release build;
//! a build without it still works and serves a page that says so.

mod files {
    /// One embedded file: path below `dist/`, bytes, gzip-compressed bytes.
    type Embedded = (&'static str, &'static [u8], Option<&'static [u8]>);
    include!(concat!(env!("OUT_DIR"), "/files.rs"));
}

/// One embedded file.
#[derive(Clone, Copy, Debug)]
pub struct Asset {
    /// Its bytes.
    pub bytes: &'static [u8],
    /// The same, gzip-compressed, when that is smaller.
    pub gzip: Option<&'static [u8]>,
    /// Its media type (from the extension).
    pub content_type: &'static str,
    /// Whether its name carries a content hash (Vite's `assets/`), so a
    /// browser may keep it forever.
    pub immutable: bool,
}

/// The file at `path` (relative, `/`-separated, no leading slash).
pub fn asset(path: &str) -> Option<Asset> {
    files::FILES
        .iter()
        .find(|(p, _, _)| *p == path)
        .map(|(p, bytes, gzip)| Asset {
            bytes,
            gzip: *gzip,
            content_type: content_type(p),
            immutable: p.starts_with("assets/"),
        })
}

/// Whether the web app was built into this binary.
pub fn built() -> bool {
    asset("index.html").is_some()
}

/// What a binary without the web app serves at `/`.
pub const NOT_BUILT: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Polydev Remote</title></head><body><main><h1>Polydev Remote</h1><p>This binary was built without the dashboard. Run <code>./polydev.sh setup</code> (it builds <code>web/</code> with npm, then the release binary), or use the API under <code>/api/v1</code>.</p></main></body></html>";

/// The media type for a file name.
pub fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    match ext {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "woff" => "font/woff",
        "txt" => "text/plain; charset=utf-8",
        "wasm" => "application/wasm",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_follow_the_extension() {
        assert_eq!(content_type("index.html"), "text/html; charset=utf-8");
        assert_eq!(
            content_type("assets/a-1f.js"),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type("x"), "application/octet-stream");
    }

    #[test]
    fn only_hashed_assets_are_immutable() {
        for (p, _, _) in files::FILES {
            let a = asset(p).map(|a| a.immutable);
            assert_eq!(a, Some(p.starts_with("assets/")), "{p}");
        }
        assert!(asset("../Cargo.toml").is_none());
    }

    #[test]
    fn compressed_copies_hold_the_same_bytes() {
        use std::io::Read as _;
        for (p, bytes, gz) in files::FILES {
            if let Some(gz) = gz {
                let mut back = Vec::new();
                flate2::read::GzDecoder::new(*gz)
                    .read_to_end(&mut back)
                    .unwrap_or_else(|e| panic!("{p}: {e}"));
                assert_eq!(&back[..], *bytes, "{p}");
                assert!(gz.len() < bytes.len(), "{p}");
            }
        }
    }
}
