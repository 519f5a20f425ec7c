//! Turning an x86 `bzImage` back into the ELF `vmlinux` inside it.
//!
//! QEMU `-M microvm` and Firecracker boot a kernel through its PVH entry point,
//! which only the ELF image carries; Debian ships only the compressed
//! `vmlinuz`. The kernel's setup header says where the compressed payload is
//! (see Documentation/arch/x86/boot.rst), and the payload is the whole ELF,
//! compressed with whatever `CONFIG_KERNEL_*` chose.

use std::io::Read;

use crate::elf;

/// Compressed-payload formats, by their leading magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    /// LZ4 "legacy" frames, as written by `lz4 -l` (Debian 6.1).
    Lz4Legacy,
    /// gzip (the kernel default for many distributions).
    Gzip,
    Xz,
    Zstd,
    Bzip2,
    Lzma,
    Lzo,
}

const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// `lz4 -l` never writes a block that expands to more than this.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

fn detect(payload: &[u8]) -> Option<Compression> {
    let m = |p: &[u8]| payload.starts_with(p);
    Some(if m(&LZ4_LEGACY_MAGIC.to_le_bytes()) {
        Compression::Lz4Legacy
    } else if m(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if m(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Compression::Xz
    } else if m(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else if m(b"BZh") {
        Compression::Bzip2
    } else if m(&[0x5d, 0, 0]) {
        Compression::Lzma
    } else if m(&[0x89, b'L', b'Z', b'O']) {
        Compression::Lzo
    } else {
        return None;
    })
}

fn le32(data: &[u8], off: usize) -> Option<u32> {
    data.get(off..off.checked_add(4)?)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
}

/// The compressed payload inside a bzImage.
pub(crate) fn payload(image: &[u8]) -> Result<&[u8], String> {
    if image.get(0x202..0x206) != Some(b"HdrS") {
        return Err("no Linux boot setup header (`HdrS` at 0x202): not an x86 bzImage".into());
    }
    let version = image
        .get(0x206..0x208)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .unwrap_or(0);
    // payload_offset/length appeared in boot protocol 2.08.
    if version < 0x0208 {
        return Err(format!(
            "boot protocol {version:#06x} is older than 2.08 and does not locate its payload"
        ));
    }
    let setup_sects = match image.get(0x1f1) {
        // Zero means the historical default of four.
        Some(0) | None => 4,
        Some(&n) => usize::from(n),
    };
    let offset = le32(image, 0x248).ok_or("truncated setup header")? as usize;
    let length = le32(image, 0x24c).ok_or("truncated setup header")? as usize;
    let start = (setup_sects + 1) * 512 + offset;
    start
        .checked_add(length)
        .and_then(|end| image.get(start..end))
        .ok_or_else(|| {
            format!(
                "payload {start:#x}+{length:#x} runs past the end of the {}-byte image",
                image.len()
            )
        })
}

/// Decodes an LZ4 legacy stream. `expected` is the uncompressed size when the
/// caller knows it (a bzImage appends it), so truncation is caught.
pub(crate) fn decode_lz4_legacy(data: &[u8], expected: Option<usize>) -> Result<Vec<u8>, String> {
    if le32(data, 0) != Some(LZ4_LEGACY_MAGIC) {
        return Err("not an LZ4 legacy stream".into());
    }
    let mut out = Vec::with_capacity(expected.unwrap_or(data.len() * 3));
    let mut pos = 4;
    while pos < data.len() {
        let Some(len) = le32(data, pos) else {
            return Err(format!("truncated block header at {pos:#x}"));
        };
        pos += 4;
        // `cat a.lz4 b.lz4` is a valid legacy stream: skip the second magic.
        if len == LZ4_LEGACY_MAGIC {
            continue;
        }
        let len = len as usize;
        let block = pos
            .checked_add(len)
            .and_then(|end| data.get(pos..end))
            .ok_or_else(|| format!("block at {:#x} claims {len} bytes past the end", pos - 4))?;
        pos += len;
        let start = out.len();
        out.resize(start + LZ4_LEGACY_BLOCK, 0);
        let n = lz4_flex::block::decompress_into(block, &mut out[start..])
            .map_err(|e| format!("corrupt LZ4 block at {:#x}: {e}", pos - len - 4))?;
        out.truncate(start + n);
    }
    if let Some(expected) = expected {
        if out.len() != expected {
            return Err(format!(
                "decompressed {} bytes but the image says {expected}",
                out.len()
            ));
        }
    }
    Ok(out)
}

/// Extracts `vmlinux` from a bzImage and checks that it is a bootable ELF.
/// Returns the ELF bytes and whether it carries a PVH entry note.
pub(crate) fn extract_vmlinux(image: &[u8]) -> Result<(Vec<u8>, bool), String> {
    let payload = payload(image)?;
    // The build appends the uncompressed size (size_append in the kernel
    // makefiles) after the compressed stream, inside payload_length.
    let (stream, size) = match payload.len().checked_sub(4) {
        Some(n) => (&payload[..n], le32(payload, n).map(|s| s as usize)),
        None => return Err("payload shorter than its size trailer".into()),
    };
    let vmlinux = match detect(payload) {
        Some(Compression::Lz4Legacy) => decode_lz4_legacy(stream, size)?,
        Some(Compression::Gzip) => {
            let mut out = Vec::with_capacity(size.unwrap_or(0));
            // gzip ends with its own trailer; the decoder stops there and the
            // size_append bytes after it are ignored.
            flate2::read::GzDecoder::new(payload)
                .read_to_end(&mut out)
                .map_err(|e| format!("corrupt gzip payload: {e}"))?;
            out
        }
        Some(other) => {
            return Err(format!(
                "payload is {other:?}-compressed, which this builder does not decompress yet \
                 (only LZ4 legacy and gzip are supported; use a kernel built with one of those)"
            ))
        }
        None => {
            let magic: Vec<String> = payload.iter().take(6).map(|b| format!("{b:02x}")).collect();
            return Err(format!(
                "unknown payload compression (magic {})",
                magic.join(" ")
            ));
        }
    };
    if !vmlinux.starts_with(elf::ELF_MAGIC) {
        return Err("decompressed payload is not an ELF file".into());
    }
    let pvh = elf::has_pvh_note(&vmlinux)?;
    Ok((vmlinux, pvh))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes `data` the way `lz4 -l` does: magic, then length-prefixed blocks
    /// of at most 8 MiB each.
    pub(crate) fn lz4_legacy(data: &[u8], block: usize) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(block) {
            let c = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
            out.extend_from_slice(&c);
        }
        out
    }

    fn sample(len: usize) -> Vec<u8> {
        // Compressible but not trivial.
        (0..len).map(|i| ((i / 7) ^ (i % 251)) as u8).collect()
    }

    #[test]
    fn lz4_legacy_round_trip_multi_block() {
        let data = sample(LZ4_LEGACY_BLOCK * 2 + 12345);
        let enc = lz4_legacy(&data, LZ4_LEGACY_BLOCK);
        assert_eq!(decode_lz4_legacy(&enc, Some(data.len())).unwrap(), data);
        assert_eq!(decode_lz4_legacy(&enc, None).unwrap(), data);
    }

    #[test]
    fn lz4_legacy_concatenated_streams() {
        let a = sample(1000);
        let b = sample(5000);
        let mut enc = lz4_legacy(&a, 4096);
        enc.extend(lz4_legacy(&b, 4096));
        let mut want = a.clone();
        want.extend(&b);
        assert_eq!(decode_lz4_legacy(&enc, None).unwrap(), want);
    }

    #[test]
    fn lz4_legacy_errors() {
        let data = sample(10_000);
        let enc = lz4_legacy(&data, 4096);
        assert!(decode_lz4_legacy(&enc[..enc.len() - 3], None).is_err());
        assert!(decode_lz4_legacy(&enc, Some(data.len() + 1)).is_err());
        assert!(decode_lz4_legacy(b"\x1f\x8b....", None).is_err());
        let mut corrupt = enc.clone();
        corrupt[9] ^= 0xff;
        corrupt[10] ^= 0xff;
        // Either an error or different bytes, never a panic.
        if let Ok(out) = decode_lz4_legacy(&corrupt, None) {
            assert_ne!(out, data);
        }
    }

    /// A fake bzImage: setup sectors, header fields, then the payload with
    /// the uncompressed size appended.
    pub(crate) fn fake_bzimage(vmlinux: &[u8], compress: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
        let setup_sects = 3u8;
        let mut img = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        img[0x1f1] = setup_sects;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        let payload_offset = 0x40usize;
        let mut payload = compress(vmlinux);
        payload.extend_from_slice(&(vmlinux.len() as u32).to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&(payload_offset as u32).to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend(vec![0u8; payload_offset]);
        img.extend(payload);
        img.extend(vec![0xAAu8; 100]); // trailing signature or padding
        img
    }

    fn fake_vmlinux() -> Vec<u8> {
        let note = crate::elf::tests::note_bytes(
            b"Xen",
            crate::elf::XEN_ELFNOTE_PHYS32_ENTRY,
            &0x1000u32.to_le_bytes(),
        );
        let mut elf = crate::elf::tests::synth_elf(&[(".notes", 7, &note)]);
        elf.extend(sample(100_000));
        elf
    }

    #[test]
    fn extracts_lz4_bzimage() {
        let vmlinux = fake_vmlinux();
        let img = fake_bzimage(&vmlinux, |d| lz4_legacy(d, LZ4_LEGACY_BLOCK));
        let (out, pvh) = extract_vmlinux(&img).unwrap();
        assert_eq!(out, vmlinux);
        assert!(pvh);
    }

    #[test]
    fn extracts_gzip_bzimage() {
        use std::io::Write;
        let vmlinux = fake_vmlinux();
        let img = fake_bzimage(&vmlinux, |d| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(d).unwrap();
            e.finish().unwrap()
        });
        assert_eq!(extract_vmlinux(&img).unwrap().0, vmlinux);
    }

    #[test]
    fn unsupported_compression_is_named() {
        let img = fake_bzimage(b"whatever", |_| vec![0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3]);
        let err = extract_vmlinux(&img).unwrap_err();
        assert!(err.contains("Zstd"), "{err}");
        assert!(payload(b"short").is_err());
    }
}
