//! Size-capped, rotated log files and bounded tails of them.
//!
//! A VM's `console.log`, `agent.log` and `egress.log` are written from what
//! the guest does, and whoever is root in the guest decides how much that
//! is. Each is a [`CappedLog`]: when an append would take the file past its
//! cap, the file becomes `<name>.1` (replacing the previous one) and a new
//! file starts. What the replaced `<name>.1` held is dropped: its lines and
//! bytes are counted in [`crate::metrics::LOG_CAPS`] and the first line of
//! the new file says how many were dropped so far ([`MARKER`]), so a reader
//! sees that the log is incomplete and why. A VM's logs therefore never take
//! more than twice the cap.
//!
//! Readers get tails ([`tail`]): at most a given number of bytes (and
//! lines) from the end of `<name>.1` + `<name>`, read with a seek, never the
//! whole file.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::metrics::{LogName, LOG_CAPS};

/// Default cap of each log file (`polydev host --log-max-bytes`).
pub const DEFAULT_LOG_MAX_BYTES: u64 = 8 * 1024 * 1024;

/// Smallest accepted cap: room for the marker line and some log.
pub const MIN_LOG_MAX_BYTES: u64 = 4096;

/// Start of the line that opens a log file after older lines were dropped.
pub const MARKER: &str = "[polydev: ";

/// Default of the logs endpoint's `tail_bytes`.
pub const DEFAULT_TAIL_BYTES: u64 = 1024 * 1024;

/// Largest tail the logs endpoint serves.
pub const MAX_TAIL_BYTES: u64 = 16 * 1024 * 1024;

/// A log file shared by the tasks that append to it.
pub type SharedLog = Arc<Mutex<CappedLog>>;

/// Open `path` as a [`CappedLog`] of `max` bytes per file, to be shared.
pub fn open_shared(path: PathBuf, name: LogName, max: u64) -> std::io::Result<SharedLog> {
    Ok(Arc::new(Mutex::new(CappedLog::open(path, name, max)?)))
}

/// Append to a shared log. Appends are small and the file is local, so
/// the write happens under the lock, in place.
pub fn append(log: &SharedLog, data: &[u8]) -> std::io::Result<()> {
    log.lock().unwrap_or_else(|p| p.into_inner()).append(data)
}

/// The rotated file of `path`: `<name>.1`.
pub fn rotated(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// Open (create) a log file for appending, mode 0600 whatever the umask.
fn open_append(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// An append-only log file that rotates at a size cap, keeping one old file.
#[derive(Debug)]
pub struct CappedLog {
    path: PathBuf,
    name: LogName,
    max: u64,
    file: File,
    size: u64,
    /// Lines and bytes dropped from this log so far (recovered from the
    /// current file's marker when a host agent reopens it).
    dropped_lines: u64,
    dropped_bytes: u64,
}

impl CappedLog {
    /// Open `path` (appending to what is there) with a cap of `max` bytes
    /// per file (raised to [`MIN_LOG_MAX_BYTES`]).
    pub fn open(path: PathBuf, name: LogName, max: u64) -> std::io::Result<Self> {
        let file = open_append(&path)?;
        let size = file.metadata()?.len();
        let (dropped_lines, dropped_bytes) = read_marker(&path).unwrap_or((0, 0));
        Ok(CappedLog {
            path,
            name,
            max: max.max(MIN_LOG_MAX_BYTES),
            file,
            size,
            dropped_lines,
            dropped_bytes,
        })
    }

    /// Lines and bytes this log has dropped (its marker's numbers).
    pub fn dropped(&self) -> (u64, u64) {
        (self.dropped_lines, self.dropped_bytes)
    }

    /// Append `data`, rotating first when it would not fit. A piece larger
    /// than a whole file is written in cap-sized parts.
    pub fn append(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            if self.size + data.len() as u64 > self.max && self.size > 0 {
                self.rotate()?;
            }
            let room = (self.max - self.size.min(self.max)) as usize;
            let n = data.len().min(room.max(1));
            self.file.write_all(&data[..n])?;
            self.size += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    /// `<name>` → `<name>.1`, counting what the replaced `<name>.1` held as
    /// dropped, and start a new file that opens with the marker.
    fn rotate(&mut self) -> std::io::Result<()> {
        let old = rotated(&self.path);
        if let Ok((lines, bytes)) = count_lines(&old) {
            if bytes > 0 {
                self.dropped_lines += lines;
                self.dropped_bytes += bytes;
                LOG_CAPS.dropped(self.name, lines, bytes);
            }
        }
        std::fs::rename(&self.path, &old)?;
        // Truncate: nothing else writes this file, so one left there can only
        // be a stale copy of what was just moved away.
        self.file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.path)?;
        self.size = 0;
        if self.dropped_lines > 0 || self.dropped_bytes > 0 {
            let marker = format!(
                "{MARKER}{} lines ({} bytes) of this log were dropped by its size cap of {} bytes (polydev host --log-max-bytes); the newest are kept]\n",
                self.dropped_lines, self.dropped_bytes, self.max
            );
            self.file.write_all(marker.as_bytes())?;
            self.size = marker.len() as u64;
        }
        Ok(())
    }
}

/// Newlines and bytes in `path`, not counting a marker line at its start.
fn count_lines(path: &Path) -> std::io::Result<(u64, u64)> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut lines, mut bytes) = (0u64, 0u64);
    let mut first: Vec<u8> = Vec::new();
    let mut marker_len = None;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if marker_len.is_none() {
            first.extend_from_slice(&buf[..n.min(MARKER.len())]);
            if first.len() >= MARKER.len() || n < buf.len() {
                marker_len = Some(first.starts_with(MARKER.as_bytes()));
            }
        }
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        bytes += n as u64;
    }
    if marker_len == Some(true) {
        // The marker is the file's first line: neither a dropped log line
        // nor its bytes.
        let (_, mb) = first_line_len(path)?;
        lines = lines.saturating_sub(1);
        bytes = bytes.saturating_sub(mb);
    }
    Ok((lines, bytes))
}

/// The first line of `path` (at most 512 bytes) and its length with its
/// newline.
fn first_line_len(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let mut buf = [0u8; 512];
    let mut n = 0;
    while n < buf.len() {
        let r = f.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let end = buf[..n].iter().position(|&b| b == b'\n');
    let line = String::from_utf8_lossy(&buf[..end.unwrap_or(n)]).into_owned();
    Ok((line, end.map_or(n, |e| e + 1) as u64))
}

/// The dropped lines and bytes a file's marker line states.
fn read_marker(path: &Path) -> Option<(u64, u64)> {
    let (line, _) = first_line_len(path).ok()?;
    let rest = line.strip_prefix(MARKER)?;
    let mut words = rest.split_whitespace();
    let lines = words.next()?.parse().ok()?;
    let bytes = words.nth(1)?.strip_prefix('(')?.parse().ok()?;
    Some((lines, bytes))
}

/// The end of a log: at most `max_bytes` from the end of `<path>.1` followed
/// by `<path>`, cut to whole lines, then at most `max_lines` lines. Missing
/// files are empty. Memory is bounded by `max_bytes` whatever the files'
/// sizes.
pub fn tail(path: &Path, max_bytes: u64, max_lines: Option<usize>) -> std::io::Result<Vec<u8>> {
    let (current, mut partial, cut) = read_end(path, max_bytes)?;
    let mut out = Vec::new();
    let left = max_bytes - current.len() as u64;
    if left > 0 && !cut {
        let (old, old_partial, _) = read_end(&rotated(path), left)?;
        out = old;
        partial = old_partial;
    }
    out.extend_from_slice(&current);
    if partial {
        // Started mid-line: drop the partial first line.
        match out.iter().position(|&b| b == b'\n') {
            Some(i) => {
                out.drain(..=i);
            }
            None => out.clear(),
        }
    }
    if let Some(n) = max_lines {
        if n == 0 {
            out.clear();
        }
        let body = out.strip_suffix(b"\n").unwrap_or(&out);
        if let Some(i) = body
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, &b)| b == b'\n')
            .nth(n.saturating_sub(1))
            .map(|(i, _)| i)
        {
            out.drain(..=i);
        }
    }
    Ok(out)
}

/// The last `max` bytes of `path`, whether they start mid-line, and
/// whether the file holds more than that.
fn read_end(path: &Path, max: u64) -> std::io::Result<(Vec<u8>, bool, bool)> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((Vec::new(), false, false))
        }
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max);
    // One byte before the start tells whether the first line is whole.
    let from = start.saturating_sub(1);
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::with_capacity((len - from) as usize);
    f.take(len - from).read_to_end(&mut buf)?;
    let mut partial = false;
    if start > 0 && !buf.is_empty() {
        partial = buf[0] != b'\n';
        buf.remove(0);
    }
    Ok((buf, partial, start > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn rotates_at_the_cap_and_counts_what_it_drops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("egress.log");
        let mut log = CappedLog::open(path.clone(), LogName::Egress, 4096).unwrap();
        let n = 1000;
        for i in 0..n {
            log.append(format!("line {i:05} {}\n", "x".repeat(80)).as_bytes())
                .unwrap();
        }
        let cur = lines(&path);
        let old = lines(&rotated(&path));
        for p in [&path, &rotated(&path)] {
            assert!(std::fs::metadata(p).unwrap().len() <= 4096, "{p:?}");
        }
        let kept = |l: &Vec<String>| l.iter().filter(|s| !s.starts_with(MARKER)).count() as u64;
        let (dropped, _) = log.dropped();
        assert_eq!(dropped + kept(&cur) + kept(&old), n);
        assert!(cur[0].starts_with(MARKER), "{:?}", cur[0]);
        assert!(cur[0].contains(&format!("{dropped} lines")), "{:?}", cur[0]);
        assert_eq!(
            cur.last().unwrap(),
            &format!("line 00999 {}", "x".repeat(80))
        );
        // Kept lines are the newest, contiguous across the two files.
        let kept_all: Vec<&String> = old
            .iter()
            .chain(cur.iter())
            .filter(|s| !s.starts_with(MARKER))
            .collect();
        assert!(kept_all[0].starts_with(&format!("line {dropped:05}")));
        // A reopened log (a restarted host agent) continues the count.
        let again = CappedLog::open(path.clone(), LogName::Egress, 4096).unwrap();
        assert_eq!(again.dropped(), log.dropped());
        // Tails: bounded by bytes and lines, whole lines only, newest last.
        let t = tail(&path, 1000, None).unwrap();
        assert!(t.len() <= 1000 && t.ends_with(b"\n"));
        let t = String::from_utf8(t).unwrap();
        assert!(t.starts_with("line "), "{t}");
        let t = String::from_utf8(tail(&path, 1 << 20, Some(3)).unwrap()).unwrap();
        assert_eq!(t.lines().count(), 3);
        assert!(t.ends_with(&format!("line 00999 {}\n", "x".repeat(80))));
        // A tail larger than the current file reaches into `<name>.1`.
        let t = String::from_utf8(tail(&path, 6000, None).unwrap()).unwrap();
        assert!(t.contains(&old[old.len() - 1]), "{t}");
    }

    #[test]
    fn a_huge_write_is_split_and_never_exceeds_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = CappedLog::open(path.clone(), LogName::Console, 4096).unwrap();
        log.append(&vec![b'a'; 50_000]).unwrap();
        log.append(b"end\n").unwrap();
        for p in [&path, &rotated(&path)] {
            assert!(std::fs::metadata(p).unwrap().len() <= 4096, "{p:?}");
        }
        assert!(log.dropped().1 > 40_000, "{:?}", log.dropped());
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("end\n"));
    }

    #[test]
    fn tails_of_missing_and_small_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.log");
        assert!(tail(&path, 100, None).unwrap().is_empty());
        std::fs::write(&path, "a\nb\n").unwrap();
        assert_eq!(tail(&path, 100, None).unwrap(), b"a\nb\n");
        assert_eq!(tail(&path, 100, Some(1)).unwrap(), b"b\n");
        assert_eq!(tail(&path, 100, Some(0)).unwrap(), b"");
        assert_eq!(tail(&path, 2, None).unwrap(), b"b\n");
    }
}
