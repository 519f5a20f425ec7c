//! Just enough ELF64 (little endian) reading for kernel modules and `vmlinux`.
//!
//! A general ELF crate would do, but we need two things only (one section by
//! name, and the notes) and every byte here comes from a package we verified,
//! so a small bounds-checked reader keeps the dependency tree lean.

/// `\x7fELF`.
pub(crate) const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const PT_NOTE: u32 = 4;
const SHT_NOTE: u32 = 7;

/// The Xen note type the kernel uses to advertise its 32-bit PVH entry point,
/// which QEMU's microvm and Firecracker look for to boot a `vmlinux` directly.
pub(crate) const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn bytes<const N: usize>(data: &[u8], off: usize) -> Option<[u8; N]> {
    data.get(off..off.checked_add(N)?)
        .and_then(|b| b.try_into().ok())
}

/// `base + i * size` for table walks, without overflow on hostile headers.
fn entry(base: usize, i: usize, size: usize) -> Result<usize, String> {
    i.checked_mul(size)
        .and_then(|o| o.checked_add(base))
        .ok_or_else(|| "ELF table offset overflows".to_string())
}

fn u16_at(data: &[u8], off: usize) -> Result<u16, String> {
    bytes(data, off)
        .map(u16::from_le_bytes)
        .ok_or_else(|| format!("truncated ELF (needed 2 bytes at {off:#x})"))
}

fn u32_at(data: &[u8], off: usize) -> Result<u32, String> {
    bytes(data, off)
        .map(u32::from_le_bytes)
        .ok_or_else(|| format!("truncated ELF (needed 4 bytes at {off:#x})"))
}

fn u64_at(data: &[u8], off: usize) -> Result<usize, String> {
    let v = bytes(data, off)
        .map(u64::from_le_bytes)
        .ok_or_else(|| format!("truncated ELF (needed 8 bytes at {off:#x})"))?;
    usize::try_from(v).map_err(|_| format!("ELF offset {v:#x} does not fit in memory"))
}

fn slice(data: &[u8], off: usize, len: usize) -> Result<&[u8], String> {
    off.checked_add(len)
        .and_then(|end| data.get(off..end))
        .ok_or_else(|| format!("ELF range {off:#x}+{len:#x} is past the end of the file"))
}

fn check_header(data: &[u8]) -> Result<(), String> {
    if data.len() < 64 || &data[..4] != ELF_MAGIC {
        return Err("not an ELF file".into());
    }
    if data[4] != ELFCLASS64 || data[5] != ELFDATA2LSB {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    Ok(())
}

struct SectionHeader {
    name_off: usize,
    kind: u32,
    offset: usize,
    size: usize,
}

fn section_headers(data: &[u8]) -> Result<Vec<SectionHeader>, String> {
    check_header(data)?;
    let shoff = u64_at(data, 0x28)?;
    let shentsize = usize::from(u16_at(data, 0x3a)?);
    let shnum = usize::from(u16_at(data, 0x3c)?);
    if shnum == 0 {
        return Ok(Vec::new());
    }
    if shentsize < 64 {
        return Err(format!("section header size {shentsize} is too small"));
    }
    (0..shnum)
        .map(|i| {
            let base = entry(shoff, i, shentsize)?;
            Ok(SectionHeader {
                name_off: u32_at(data, base)? as usize,
                kind: u32_at(data, base.saturating_add(4))?,
                offset: u64_at(data, base.saturating_add(0x18))?,
                size: u64_at(data, base.saturating_add(0x20))?,
            })
        })
        .collect()
}

/// The bytes of the section called `name`, or `None` when there is none.
pub(crate) fn section<'a>(data: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, String> {
    let headers = section_headers(data)?;
    if headers.is_empty() {
        return Ok(None);
    }
    let shstrndx = usize::from(u16_at(data, 0x3e)?);
    let strtab = headers
        .get(shstrndx)
        .ok_or_else(|| format!("section name table index {shstrndx} out of range"))?;
    let strtab = slice(data, strtab.offset, strtab.size)?;
    for h in &headers {
        let Some(rest) = strtab.get(h.name_off..) else {
            continue;
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        if &rest[..end] == name.as_bytes() {
            return slice(data, h.offset, h.size).map(Some);
        }
    }
    Ok(None)
}

/// One ELF note.
pub(crate) struct Note<'a> {
    pub name: &'a [u8],
    pub kind: u32,
    pub desc: &'a [u8],
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn parse_notes<'a>(mut buf: &'a [u8], out: &mut Vec<Note<'a>>) -> Result<(), String> {
    while buf.len() >= 12 {
        let namesz = u32_at(buf, 0)? as usize;
        let descsz = u32_at(buf, 4)? as usize;
        let kind = u32_at(buf, 8)?;
        let name = slice(buf, 12, namesz)?;
        let desc_off = 12 + align4(namesz);
        let desc = slice(buf, desc_off, descsz)?;
        // Note names are NUL-terminated; compare without the terminator.
        let name = name.strip_suffix(&[0]).unwrap_or(name);
        out.push(Note { name, kind, desc });
        let next = desc_off + align4(descsz);
        buf = buf.get(next..).unwrap_or(&[]);
    }
    Ok(())
}

/// All notes, from `PT_NOTE` segments or (when there are none) `SHT_NOTE` sections.
pub(crate) fn notes(data: &[u8]) -> Result<Vec<Note<'_>>, String> {
    check_header(data)?;
    let phoff = u64_at(data, 0x20)?;
    let phentsize = usize::from(u16_at(data, 0x36)?);
    let phnum = usize::from(u16_at(data, 0x38)?);
    let mut out = Vec::new();
    for i in 0..phnum {
        let base = entry(phoff, i, phentsize)?;
        if u32_at(data, base)? == PT_NOTE {
            let off = u64_at(data, base.saturating_add(8))?;
            let size = u64_at(data, base.saturating_add(0x20))?;
            parse_notes(slice(data, off, size)?, &mut out)?;
        }
    }
    if out.is_empty() {
        for h in section_headers(data)? {
            if h.kind == SHT_NOTE {
                parse_notes(slice(data, h.offset, h.size)?, &mut out)?;
            }
        }
    }
    Ok(out)
}

/// Whether this ELF advertises a PVH entry point (`XEN_ELFNOTE_PHYS32_ENTRY`).
pub(crate) fn has_pvh_note(data: &[u8]) -> Result<bool, String> {
    Ok(notes(data)?
        .iter()
        .any(|n| n.name == b"Xen" && n.kind == XEN_ELFNOTE_PHYS32_ENTRY && n.desc.len() >= 4))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a minimal relocatable ELF64 with the given named sections, the
    /// way a `.ko` is laid out: header, section bodies, then section headers.
    pub(crate) fn synth_elf(sections: &[(&str, u32, &[u8])]) -> Vec<u8> {
        let mut shstrtab = vec![0u8];
        let mut name_offs = Vec::new();
        for (name, _, _) in sections {
            name_offs.push(shstrtab.len() as u32);
            shstrtab.extend_from_slice(name.as_bytes());
            shstrtab.push(0);
        }
        let shstrtab_name = shstrtab.len() as u32;
        shstrtab.extend_from_slice(b".shstrtab\0");

        let mut body = vec![0u8; 64];
        let mut placed = Vec::new();
        for (_, _, data) in sections {
            placed.push((body.len() as u64, data.len() as u64));
            body.extend_from_slice(data);
        }
        let strtab_off = body.len() as u64;
        body.extend_from_slice(&shstrtab);
        while body.len() & 7 != 0 {
            body.push(0);
        }
        let shoff = body.len() as u64;
        let mut sh = |name: u32, kind: u32, off: u64, size: u64| {
            let mut h = [0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&off.to_le_bytes());
            h[0x20..0x28].copy_from_slice(&size.to_le_bytes());
            body.extend_from_slice(&h);
        };
        sh(0, 0, 0, 0);
        for (i, (_, kind, _)) in sections.iter().enumerate() {
            sh(name_offs[i], *kind, placed[i].0, placed[i].1);
        }
        sh(shstrtab_name, 3, strtab_off, shstrtab.len() as u64);
        let shnum = sections.len() as u16 + 2;

        body[..4].copy_from_slice(ELF_MAGIC);
        body[4] = ELFCLASS64;
        body[5] = ELFDATA2LSB;
        body[6] = 1;
        body[0x10..0x12].copy_from_slice(&1u16.to_le_bytes()); // ET_REL
        body[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        body[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        body[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        body[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        body[0x3c..0x3e].copy_from_slice(&shnum.to_le_bytes());
        body[0x3e..0x40].copy_from_slice(&(shnum - 1).to_le_bytes());
        body
    }

    pub(crate) fn note_bytes(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
        v.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        v.extend_from_slice(&kind.to_le_bytes());
        v.extend_from_slice(name);
        v.push(0);
        while v.len() & 3 != 0 {
            v.push(0);
        }
        v.extend_from_slice(desc);
        while v.len() & 3 != 0 {
            v.push(0);
        }
        v
    }

    #[test]
    fn finds_sections_by_name() {
        let elf = synth_elf(&[(".text", 1, b"\x90\x90"), (".modinfo", 1, b"name=x\0")]);
        assert_eq!(section(&elf, ".modinfo").unwrap(), Some(&b"name=x\0"[..]));
        assert_eq!(section(&elf, ".text").unwrap(), Some(&b"\x90\x90"[..]));
        assert_eq!(section(&elf, ".data").unwrap(), None);
    }

    #[test]
    fn detects_pvh_note_in_note_sections() {
        let mut notes = note_bytes(b"GNU", 3, b"abcd1234");
        notes.extend(note_bytes(
            b"Xen",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x100_0000u32.to_le_bytes(),
        ));
        let with = synth_elf(&[(".notes", SHT_NOTE, &notes)]);
        assert!(has_pvh_note(&with).unwrap());
        let without = synth_elf(&[(".notes", SHT_NOTE, &note_bytes(b"GNU", 3, b"x"))]);
        assert!(!has_pvh_note(&without).unwrap());
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(section(b"not an elf", ".modinfo").is_err());
        let mut elf = synth_elf(&[(".modinfo", 1, b"name=x\0")]);
        let len = elf.len();
        elf.truncate(len - 40);
        assert!(section(&elf, ".modinfo").is_err());
    }
}
