//! The agent's log: an in-memory ring, the console, and a guest-initiated
//! stream to the host.
//!
//! Why it ships to the host: the prototype's agent crash-looped and nobody
//! could see it, because its logs died with the VM. Recording never blocks:
//! it only appends to bounded queues that two threads drain (console writes
//! can stall on a slow serial port; the host stream can be down).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use polydev_api::agent::{encode_line, LogRecord};

use crate::net::{Addr, Stream};
use crate::util::{lock, now_ms, MAX_LINE};

/// Records kept in the ring for the `logs` request.
pub const RING_CAPACITY: usize = 10_000;
/// Records buffered for the host while its stream is down.
pub const SHIP_CAPACITY: usize = 10_000;
/// Records buffered for the console while it is slow.
pub const CONSOLE_CAPACITY: usize = 2_000;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often an idle log stream is checked for having gone away.
const IDLE_PROBE: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_millis(5);

#[derive(Default)]
struct Queue {
    records: VecDeque<LogRecord>,
    dropped: u64,
}

impl Queue {
    fn push(&mut self, rec: LogRecord, cap: usize) {
        if self.records.len() >= cap {
            self.records.pop_front();
            self.dropped += 1;
        }
        self.records.push_back(rec);
    }
}

struct Inner {
    seq: u64,
    ring: VecDeque<LogRecord>,
    console: Queue,
    ship: Queue,
    shipping: bool,
}

/// The process-wide log.
pub struct Logger {
    inner: Mutex<Inner>,
    console_cv: Condvar,
    ship_cv: Condvar,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// The process-wide logger.
pub fn logger() -> &'static Logger {
    LOGGER.get_or_init(|| Logger {
        inner: Mutex::new(Inner {
            seq: 0,
            ring: VecDeque::new(),
            console: Queue::default(),
            ship: Queue::default(),
            shipping: true,
        }),
        console_cv: Condvar::new(),
        ship_cv: Condvar::new(),
    })
}

/// Log an agent message at `info`.
pub fn info(msg: impl Into<String>) {
    logger().record("agent", "info", msg.into());
}

/// Log an agent message at `warn`.
pub fn warn(msg: impl Into<String>) {
    logger().record("agent", "warn", msg.into());
}

/// Log an agent message at `error`.
pub fn error(msg: impl Into<String>) {
    logger().record("agent", "error", msg.into());
}

/// Log the end of a service run that will be restarted after `backoff`.
pub fn record_service_end(name: &str, what: &str, backoff: Duration) {
    let stream = if what.starts_with("could not start") {
        "error"
    } else {
        "warn"
    };
    logger().record(
        "agent",
        stream,
        format!(
            "service {name}: {what}; restarting in {} ms",
            backoff.as_millis()
        ),
    );
}

fn truncate(mut line: String) -> String {
    if line.len() > MAX_LINE {
        let mut cut = MAX_LINE;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
    }
    line
}

impl Logger {
    /// Record one line from `source` on `stream`.
    pub fn record(&self, source: &str, stream: &str, line: String) {
        let mut g = lock(&self.inner);
        let rec = self.make_locked(&mut g, source, stream, line);
        if g.shipping {
            g.ship.push(rec, SHIP_CAPACITY);
            self.ship_cv.notify_one();
        }
    }

    /// Build a record with the next sequence number and put it in the ring
    /// and the console queue (not the ship queue).
    fn make(&self, source: &str, stream: &str, line: String) -> LogRecord {
        let mut g = lock(&self.inner);
        self.make_locked(&mut g, source, stream, line)
    }

    fn make_locked(&self, g: &mut Inner, source: &str, stream: &str, line: String) -> LogRecord {
        g.seq += 1;
        let rec = LogRecord {
            seq: g.seq,
            ts_ms: now_ms(),
            source: source.to_string(),
            stream: stream.to_string(),
            line: truncate(line),
        };
        if g.ring.len() >= RING_CAPACITY {
            g.ring.pop_front();
        }
        g.ring.push_back(rec.clone());
        g.console.push(rec.clone(), CONSOLE_CAPACITY);
        self.console_cv.notify_one();
        rec
    }

    /// The most recent `limit` records, oldest first.
    pub fn tail(&self, limit: usize) -> Vec<LogRecord> {
        let g = lock(&self.inner);
        let skip = g.ring.len().saturating_sub(limit);
        g.ring.iter().skip(skip).cloned().collect()
    }

    /// Stop queuing records for the host (no log stream configured).
    pub fn disable_shipping(&self) {
        let mut g = lock(&self.inner);
        g.shipping = false;
        g.ship = Queue::default();
    }

    /// Start the thread that writes records to standard error (the console
    /// when PID 1).
    pub fn start_console(&'static self) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("log-console".into())
            .spawn(move || self.console_loop())
            .map(|_| ())
    }

    fn console_loop(&self) {
        loop {
            let (batch, dropped) = {
                let mut g = lock(&self.inner);
                while g.console.records.is_empty() {
                    g = self.console_cv.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                let dropped = std::mem::take(&mut g.console.dropped);
                (std::mem::take(&mut g.console.records), dropped)
            };
            let mut text = String::new();
            if dropped > 0 {
                text.push_str(&format!(
                    "[agent/warn] {dropped} log lines were not printed because the console was too slow\n"
                ));
            }
            for r in batch {
                text.push_str(&format!("[{}/{}] {}\n", r.source, r.stream, r.line));
            }
            // Nothing useful can be done if the console itself fails.
            let _ = std::io::stderr().lock().write_all(text.as_bytes());
        }
    }

    /// Start the thread that ships records to `addr`, reconnecting with
    /// backoff whenever the stream is down.
    pub fn start_shipper(&'static self, addr: Addr) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("log-ship".into())
            .spawn(move || self.ship_loop(addr))
            .map(|_| ())
    }

    fn ship_loop(&self, addr: Addr) {
        let mut backoff = BACKOFF_START;
        let mut reported_down = false;
        loop {
            let stream = match Stream::connect(&addr) {
                Ok(s) => s,
                Err(e) => {
                    if !reported_down {
                        // Only once per outage: each record would otherwise
                        // feed the very queue that cannot drain.
                        self.make(
                            "agent",
                            "warn",
                            format!("log stream to the host is down ({e}); buffering up to {SHIP_CAPACITY} records and retrying"),
                        );
                        reported_down = true;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            backoff = BACKOFF_START;
            reported_down = false;
            self.ship_connected(&stream);
            stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Send records until the stream breaks.
    fn ship_connected(&self, stream: &Stream) {
        let dropped = std::mem::take(&mut lock(&self.inner).ship.dropped);
        if dropped > 0 {
            let note = self.make(
                "agent",
                "warn",
                format!(
                    "{dropped} log records were dropped while the log stream to the host was down"
                ),
            );
            if send_batch(stream, std::slice::from_ref(&note)).is_err() {
                return;
            }
        }
        // Probing reads must return quickly.
        let _ = stream.set_read_timeout(Some(PROBE_TIMEOUT));
        loop {
            let batch: Vec<LogRecord> = {
                let mut g = lock(&self.inner);
                while g.ship.records.is_empty() {
                    let (g2, timeout) = self
                        .ship_cv
                        .wait_timeout(g, IDLE_PROBE)
                        .unwrap_or_else(|e| e.into_inner());
                    g = g2;
                    if timeout.timed_out() && g.ship.records.is_empty() {
                        drop(g);
                        if !peer_alive(stream) {
                            return;
                        }
                        g = lock(&self.inner);
                    }
                }
                let n = g.ship.records.len().min(256);
                g.ship.records.drain(..n).collect()
            };
            if send_batch(stream, &batch).is_err() {
                // Put the batch back: a duplicate (told apart by seq) is
                // better than a hole.
                let mut g = lock(&self.inner);
                for rec in batch.into_iter().rev() {
                    if g.ship.records.len() >= SHIP_CAPACITY {
                        g.ship.dropped += 1;
                    } else {
                        g.ship.records.push_front(rec);
                    }
                }
                return;
            }
        }
    }
}

/// The host never writes on the log stream, so a read that ends (EOF or
/// error, not a timeout) means the stream is gone: the host restarted its
/// listener, or a snapshot restore reset every stream. Noticing while idle
/// lets the host see the guest reconnect without waiting for a log line.
fn peer_alive(mut stream: &Stream) -> bool {
    let mut buf = [0u8; 256];
    match stream.read(&mut buf) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::Interrupted
        ),
    }
}

fn send_batch(mut stream: &Stream, batch: &[LogRecord]) -> std::io::Result<()> {
    let mut buf = Vec::new();
    for r in batch {
        buf.extend(encode_line(r).map_err(std::io::Error::other)?);
    }
    stream.write_all(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_drops_oldest_and_counts() {
        let mut q = Queue::default();
        for i in 0..5 {
            q.push(
                LogRecord {
                    seq: i,
                    ts_ms: 0,
                    source: "a".into(),
                    stream: "b".into(),
                    line: String::new(),
                },
                3,
            );
        }
        assert_eq!(q.dropped, 2);
        let seqs: Vec<u64> = q.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![2, 3, 4]);
    }

    #[test]
    fn truncates_on_char_boundary() {
        let s = "é".repeat(MAX_LINE);
        let t = truncate(s);
        assert!(t.len() <= MAX_LINE);
        assert!(t.chars().all(|c| c == 'é'));
    }

    #[test]
    fn ring_tail_is_oldest_first() {
        let l = logger();
        l.record("test", "info", "one".into());
        l.record("test", "info", "two".into());
        let tail = l.tail(2);
        assert_eq!(tail.len(), 2);
        assert!(tail[0].seq < tail[1].seq);
    }
}
