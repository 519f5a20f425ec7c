//! The `newc` cpio format the kernel unpacks an initramfs from.
//!
//! Each member is a 110-byte ASCII header (`070701` and thirteen 8-digit hex
//! fields), the NUL-terminated name padded to 4 bytes, then the data padded
//! to 4 bytes; the archive ends with a member named `TRAILER!!!`. Names are
//! written without a leading `/`, as `cpio -o` and the kernel's
//! `gen_init_cpio` do.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::ImageError;

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

/// File type bits of `st_mode`.
pub mod mode {
    /// Directory.
    pub const S_IFDIR: u32 = 0o040000;
    /// Regular file.
    pub const S_IFREG: u32 = 0o100000;
    /// Symbolic link.
    pub const S_IFLNK: u32 = 0o120000;
    /// Character device.
    pub const S_IFCHR: u32 = 0o020000;
    /// Mask of the type bits.
    pub const S_IFMT: u32 = 0o170000;
}

#[derive(Debug, Clone)]
enum Body {
    Dir,
    Bytes(Vec<u8>),
    File(PathBuf),
    Symlink(String),
    CharDev(u32, u32),
}

#[derive(Debug, Clone)]
struct Member {
    perm: u32,
    body: Body,
}

/// Collects members and writes them as one deterministic archive: sorted by
/// name (so parents precede children), owned by root, mtime 0, inode numbers
/// assigned in order. Adding a path twice replaces the earlier member.
#[derive(Debug, Default, Clone)]
pub struct CpioBuilder {
    members: BTreeMap<String, Member>,
}

fn clean(path: &str) -> String {
    path.trim_matches('/').to_string()
}

impl CpioBuilder {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn insert(&mut self, path: &str, perm: u32, body: Body) {
        let path = clean(path);
        // Create missing parents so the kernel never has to: it does not
        // create intermediate directories for a member.
        let mut parent = path.as_str();
        while let Some((p, _)) = parent.rsplit_once('/') {
            self.members.entry(p.to_string()).or_insert(Member {
                perm: 0o755,
                body: Body::Dir,
            });
            parent = p;
        }
        if !path.is_empty() {
            self.members.insert(path, Member { perm, body });
        }
    }

    /// A directory with permission bits `perm` (e.g. `0o755`).
    pub fn dir(&mut self, path: &str, perm: u32) -> &mut Self {
        self.insert(path, perm, Body::Dir);
        self
    }

    /// A regular file with the given contents.
    pub fn bytes(&mut self, path: &str, perm: u32, data: impl Into<Vec<u8>>) -> &mut Self {
        self.insert(path, perm, Body::Bytes(data.into()));
        self
    }

    /// A regular file whose contents are read from `source` when writing.
    pub fn file(&mut self, path: &str, perm: u32, source: impl Into<PathBuf>) -> &mut Self {
        self.insert(path, perm, Body::File(source.into()));
        self
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.insert(path, 0o777, Body::Symlink(target.to_string()));
        self
    }

    /// A character device node.
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> &mut Self {
        self.insert(path, perm, Body::CharDev(major, minor));
        self
    }

    /// Whether `path` has been added (explicitly or as a parent).
    pub fn contains(&self, path: &str) -> bool {
        self.members.contains_key(&clean(path))
    }

    /// Writes the archive; returns the number of bytes written.
    pub fn write_to(&self, out: &mut impl Write) -> Result<u64, ImageError> {
        let mut w = CountingWriter {
            inner: out,
            count: 0,
        };
        for (ino, (name, member)) in self.members.iter().enumerate() {
            let loaded;
            let (kind, data, nlink, rdev): (u32, &[u8], u32, (u32, u32)) = match &member.body {
                Body::Dir => (mode::S_IFDIR, &[], 2, (0, 0)),
                Body::Bytes(b) => (mode::S_IFREG, b, 1, (0, 0)),
                Body::File(p) => {
                    loaded = std::fs::read(p).map_err(ImageError::io("reading", p))?;
                    (mode::S_IFREG, &loaded, 1, (0, 0))
                }
                Body::Symlink(t) => (mode::S_IFLNK, t.as_bytes(), 1, (0, 0)),
                Body::CharDev(maj, min) => (mode::S_IFCHR, &[], 1, (*maj, *min)),
            };
            let header = Header {
                ino: u32::try_from(ino + 1).unwrap_or(u32::MAX),
                mode: kind | (member.perm & 0o7777),
                nlink,
                filesize: data.len(),
                rdev,
            };
            write_member(&mut w, name, &header, data)?;
        }
        let trailer = Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            filesize: 0,
            rdev: (0, 0),
        };
        write_member(&mut w, TRAILER, &trailer, &[])?;
        Ok(w.count)
    }

    /// Writes the archive to `path` (created or truncated).
    pub fn write_file(&self, path: &Path) -> Result<u64, ImageError> {
        let file = std::fs::File::create(path).map_err(ImageError::io("creating", path))?;
        let mut buf = std::io::BufWriter::new(file);
        let n = self.write_to(&mut buf)?;
        let file = buf
            .into_inner()
            .map_err(|e| ImageError::io("writing", path)(e.into_error()))?;
        file.sync_all().map_err(ImageError::io("syncing", path))?;
        Ok(n)
    }
}

struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: usize,
    rdev: (u32, u32),
}

struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    count: u64,
}

impl<W: Write> CountingWriter<'_, W> {
    fn put(&mut self, b: &[u8]) -> Result<(), ImageError> {
        self.inner
            .write_all(b)
            .map_err(ImageError::io("writing", "cpio archive"))?;
        self.count += b.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> Result<(), ImageError> {
        let pad = (4 - (self.count % 4) as usize) % 4;
        self.put(&[0u8; 3][..pad])
    }
}

fn write_member<W: Write>(
    w: &mut CountingWriter<'_, W>,
    name: &str,
    h: &Header,
    data: &[u8],
) -> Result<(), ImageError> {
    let too_large = |detail: &str| ImageError::CpioTooLarge {
        name: name.to_string(),
        detail: detail.to_string(),
    };
    let filesize = u32::try_from(h.filesize).map_err(|_| too_large("file is 4 GiB or larger"))?;
    let namesize = u32::try_from(name.len() + 1).map_err(|_| too_large("name too long"))?;
    let fields = [
        h.ino, h.mode, 0, // uid
        0, // gid
        h.nlink, 0, // mtime: fixed so identical inputs give identical bytes
        filesize, 0, // devmajor
        0, // devminor
        h.rdev.0, h.rdev.1, namesize, 0, // check (unused by newc)
    ];
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    for f in fields {
        header.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    w.put(&header)?;
    w.put(name.as_bytes())?;
    w.put(&[0])?;
    w.pad4()?;
    w.put(data)?;
    w.pad4()
}

/// One member read back from an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioEntry {
    /// Name as stored (no leading `/`).
    pub name: String,
    /// Full `st_mode` (type and permission bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time.
    pub mtime: u32,
    /// Inode number.
    pub ino: u32,
    /// Device numbers for device nodes.
    pub rdev: (u32, u32),
    /// File contents, or the target of a symlink.
    pub data: Vec<u8>,
}

impl CpioEntry {
    /// The type bits of [`CpioEntry::mode`].
    pub fn kind(&self) -> u32 {
        self.mode & mode::S_IFMT
    }
}

/// Parses a `newc` archive up to its trailer. Zero padding between
/// concatenated archives is skipped, as the kernel does.
pub fn read_archive(data: &[u8]) -> Result<Vec<CpioEntry>, ImageError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    loop {
        while data.get(pos) == Some(&0) {
            pos += 1;
        }
        if pos >= data.len() {
            return Err(ImageError::Cpio("archive ends without TRAILER!!!".into()));
        }
        if pos & 3 != 0 {
            return Err(ImageError::Cpio(format!(
                "member at {pos:#x} is not 4-byte aligned"
            )));
        }
        let header = data
            .get(pos..pos + HEADER_LEN)
            .ok_or_else(|| ImageError::Cpio(format!("truncated header at {pos:#x}")))?;
        if &header[..6] != MAGIC {
            return Err(ImageError::Cpio(format!("bad magic at {pos:#x}")));
        }
        let field = |i: usize| -> Result<u32, ImageError> {
            let raw = &header[6 + i * 8..6 + (i + 1) * 8];
            std::str::from_utf8(raw)
                .ok()
                .and_then(|s| u32::from_str_radix(s, 16).ok())
                .ok_or_else(|| ImageError::Cpio(format!("bad header field {i} at {pos:#x}")))
        };
        let (ino, mode, uid, gid, mtime, filesize) = (
            field(0)?,
            field(1)?,
            field(2)?,
            field(3)?,
            field(5)?,
            field(6)? as usize,
        );
        let rdev = (field(9)?, field(10)?);
        let namesize = field(11)? as usize;
        let name_start = pos + HEADER_LEN;
        let name_bytes = data
            .get(name_start..name_start + namesize)
            .ok_or_else(|| ImageError::Cpio(format!("truncated name at {name_start:#x}")))?;
        let name = name_bytes.strip_suffix(&[0]).ok_or_else(|| {
            ImageError::Cpio(format!("name at {name_start:#x} is not NUL-terminated"))
        })?;
        let name = String::from_utf8_lossy(name).into_owned();
        let data_start = (name_start + namesize + 3) & !3;
        let body = data
            .get(data_start..data_start + filesize)
            .ok_or_else(|| ImageError::Cpio(format!("truncated data of {name}")))?;
        pos = (data_start + filesize + 3) & !3;
        if name == TRAILER {
            return Ok(out);
        }
        out.push(CpioEntry {
            name,
            mode,
            uid,
            gid,
            mtime,
            ino,
            rdev,
            data: body.to_vec(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpioBuilder {
        let mut b = CpioBuilder::new();
        b.bytes("/init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
            .dir("/proc", 0o755)
            .symlink("/bin/sh", "busybox")
            .bytes("/bin/busybox", 0o755, vec![7u8; 5])
            .char_device("/dev/console", 0o600, 5, 1)
            .bytes(
                "/etc/polydev/modules",
                0o644,
                b"/lib/modules/x/virtio.ko\n".to_vec(),
            )
            .bytes("/a", 0o644, Vec::new());
        b
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        let n = sample().write_to(&mut buf).unwrap();
        assert_eq!(n as usize, buf.len());
        assert_eq!(buf.len() % 4, 0);
        let entries = read_archive(&buf).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "a",
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev",
                "dev/console",
                "etc",
                "etc/polydev",
                "etc/polydev/modules",
                "init",
                "proc"
            ]
        );
        let get = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(get("init").mode, mode::S_IFREG | 0o755);
        assert_eq!(get("init").data, b"#!/bin/sh\necho hi\n");
        assert_eq!(get("bin/sh").kind(), mode::S_IFLNK);
        assert_eq!(get("bin/sh").data, b"busybox");
        assert_eq!(get("dev/console").kind(), mode::S_IFCHR);
        assert_eq!(get("dev/console").rdev, (5, 1));
        assert_eq!(get("etc/polydev").kind(), mode::S_IFDIR);
        assert_eq!(get("a").data, b"");
        assert!(entries
            .iter()
            .all(|e| e.mtime == 0 && e.uid == 0 && e.gid == 0));
        let inos: std::collections::BTreeSet<u32> = entries.iter().map(|e| e.ino).collect();
        assert_eq!(inos.len(), entries.len(), "inode numbers are unique");
    }

    #[test]
    fn alignment_of_every_member() {
        // Names and sizes of every residue mod 4 exercise all padding paths.
        let mut b = CpioBuilder::new();
        for i in 0..8 {
            b.bytes(&format!("f{}", "x".repeat(i)), 0o644, vec![b'z'; i]);
        }
        let mut buf = Vec::new();
        b.write_to(&mut buf).unwrap();
        let mut pos = 0;
        let mut headers = 0;
        while let Some(off) = buf[pos..].windows(6).position(|w| w == MAGIC) {
            assert_eq!((pos + off) % 4, 0, "header at {} misaligned", pos + off);
            headers += 1;
            pos += off + 6;
        }
        assert_eq!(headers, 9);
        let entries = read_archive(&buf).unwrap();
        for e in &entries {
            assert_eq!(e.data.len(), e.name.len() - 1);
        }
    }

    #[test]
    fn deterministic_regardless_of_insertion_order() {
        let mut a = Vec::new();
        sample().write_to(&mut a).unwrap();
        let mut b2 = CpioBuilder::new();
        b2.bytes("/a", 0o644, Vec::new())
            .bytes(
                "/etc/polydev/modules",
                0o644,
                b"/lib/modules/x/virtio.ko\n".to_vec(),
            )
            .char_device("/dev/console", 0o600, 5, 1)
            .bytes("/bin/busybox", 0o755, vec![7u8; 5])
            .symlink("/bin/sh", "busybox")
            .dir("/proc", 0o755)
            .bytes("/init", 0o755, b"#!/bin/sh\necho hi\n".to_vec());
        let mut b = Vec::new();
        b2.write_to(&mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn reader_rejects_damage() {
        let mut buf = Vec::new();
        sample().write_to(&mut buf).unwrap();
        assert!(read_archive(&buf[..buf.len() - 8]).is_err());
        assert!(read_archive(&buf[..50]).is_err());
        let mut bad = buf.clone();
        bad[0] = b'1';
        assert!(read_archive(&bad).is_err());
    }

    #[test]
    fn matches_gnu_cpio() {
        // GNU cpio is the reference reader; `./polydev.sh setup` installs it.
        let status = std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .expect("GNU cpio is not installed: run `./polydev.sh setup`");
        assert!(status.status.success(), "cpio --version failed");
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        sample().write_file(&archive).unwrap();
        let out = std::process::Command::new("cpio")
            .args(["-t", "--quiet", "-F"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed = String::from_utf8_lossy(&out.stdout);
        assert!(
            listed.lines().any(|l| l == "etc/polydev/modules"),
            "{listed}"
        );
    }
}
