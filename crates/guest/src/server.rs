//! The agent API: one request per connection, answered with JSON-line frames.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use polydev_api::agent::{
    encode_line, AgentError, AgentErrorKind, AgentInfo, Health, Request, Response,
    MAX_REQUEST_LINE, PROTOCOL_VERSION,
};

use crate::logger::{self, logger};
use crate::net::{Listener, Stream};
use crate::supervisor::{SharedEnv, Supervisor};
use crate::util::uptime_s;
use crate::{configure, exec, files, forward, pty};

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What the agent does on `shutdown`.
pub type ShutdownFn = Box<dyn Fn(bool) + Send + Sync>;

/// State shared by every connection.
pub struct State {
    /// Whether the agent switched into a root filesystem.
    pub rootfs: bool,
    /// Environment for execs and services.
    pub env: SharedEnv,
    /// The service supervisor.
    pub supervisor: Arc<Supervisor>,
    /// Stops services and powers off (PID 1) or exits (`--listen`); the
    /// argument asks for a reboot.
    pub shutdown: ShutdownFn,
}

/// Write one frame.
pub fn send(mut conn: &Stream, resp: &Response) -> io::Result<()> {
    let line = encode_line(resp).map_err(io::Error::other)?;
    conn.write_all(&line)
}

/// Write an error frame; a client that already left needs no answer.
pub fn send_error(conn: &Stream, kind: AgentErrorKind, message: String) {
    let _ = send(conn, &Response::Error(AgentError { kind, message }));
}

/// Accept connections forever, each on its own thread.
pub fn serve(listener: Listener, state: Arc<State>) {
    loop {
        match listener.accept() {
            Ok(conn) => {
                let st = state.clone();
                let spawned = std::thread::Builder::new()
                    .name("conn".into())
                    .spawn(move || handle(conn, &st));
                if let Err(e) = spawned {
                    logger::error(format!("cannot start a connection thread: {e}"));
                }
            }
            Err(e) => {
                // EMFILE/ENOMEM and friends: wait rather than spin.
                logger::error(format!("accept failed: {e}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Why a request line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No newline within the limit.
    #[error("request line exceeds {MAX_REQUEST_LINE} bytes; send one JSON object per line and large files in several requests")]
    TooLong,
    /// The client closed before sending anything.
    #[error("empty request: send one JSON object followed by a newline")]
    Empty,
    /// Reading failed (or timed out).
    #[error("cannot read the request: {0}; send the request line right after connecting")]
    Io(#[from] io::Error),
}

/// Read one line (without its newline); also returns any bytes that came
/// after it, which belong to a forwarded stream.
pub fn read_request_line<R: Read>(
    mut r: R,
    limit: usize,
) -> Result<(Vec<u8>, Vec<u8>), RequestError> {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut scanned = 0;
    loop {
        if let Some(i) = buf[scanned..].iter().position(|&b| b == b'\n') {
            let nl = scanned + i;
            let rest = buf.split_off(nl + 1);
            buf.truncate(nl);
            return Ok((buf, rest));
        }
        scanned = buf.len();
        if buf.len() > limit {
            return Err(RequestError::TooLong);
        }
        let n = match r.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            // Be lenient with a last line lacking its newline.
            if buf.iter().all(|b| b.is_ascii_whitespace()) {
                return Err(RequestError::Empty);
            }
            if buf.len() > limit {
                return Err(RequestError::TooLong);
            }
            return Ok((buf, Vec::new()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Parse a request line into a [`Request`], with a message that says what
/// was wrong.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice::<Request>(line).map_err(|e| {
        format!(
            "malformed request: {e}; send one JSON object with an \"op\" field (health, info, exec, read_file, write_file, configure, forward, logs, services, watch_files, shutdown)"
        )
    })
}

fn handle(conn: Stream, state: &State) {
    let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
    let (line, early) = match read_request_line(&conn, MAX_REQUEST_LINE) {
        Ok(v) => v,
        Err(e) => {
            send_error(&conn, AgentErrorKind::BadRequest, e.to_string());
            return;
        }
    };
    // Later reads (exec's disconnect watch, forward) must block indefinitely.
    let _ = conn.set_read_timeout(None);
    let req = match parse_request(&line) {
        Ok(r) => r,
        Err(msg) => {
            send_error(&conn, AgentErrorKind::BadRequest, msg);
            return;
        }
    };
    let answer = match req {
        Request::Health => Response::Health(Health {
            ok: true,
            uptime_s: uptime_s(),
        }),
        Request::Info => Response::Info(info(state.rootfs)),
        Request::Exec(r) => return exec::handle(&conn, &state.env, r),
        Request::Forward {
            target: polydev_api::agent::ForwardTarget::Pty(spec),
        } => return pty::handle(conn, &state.env, spec, early),
        Request::Forward { target } => return forward::handle(conn, target, early),
        Request::ReadFile { path, max_bytes } => match files::read(&path, max_bytes) {
            Ok(data) => Response::File { data },
            Err(e) => error(e.kind(), e.to_string()),
        },
        Request::WriteFile(spec) => match files::write(&spec) {
            Ok(()) => Response::Done,
            Err(e) => error(e.kind(), e.to_string()),
        },
        Request::Configure(cfg) => match configure::apply(cfg, &state.env, &state.supervisor) {
            Ok(()) => Response::Done,
            Err(e) => error(e.kind(), e.to_string()),
        },
        Request::Logs { limit } => Response::Logs {
            records: logger().tail(limit),
        },
        Request::Services => Response::Services {
            services: state.supervisor.status(),
        },
        Request::WatchFiles(spec) => crate::watch::handle(spec),
        Request::Shutdown { reboot } => {
            logger::info(format!(
                "shutdown requested ({})",
                if reboot { "reboot" } else { "power off" }
            ));
            let _ = send(&conn, &Response::Done);
            conn.shutdown(std::net::Shutdown::Both);
            (state.shutdown)(reboot);
            return;
        }
    };
    let _ = send(&conn, &answer);
}

fn error(kind: AgentErrorKind, message: String) -> Response {
    Response::Error(AgentError { kind, message })
}

/// Facts about this guest.
pub fn info(rootfs: bool) -> AgentInfo {
    AgentInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: PROTOCOL_VERSION,
        kernel: kernel_release(),
        rootfs,
        // SAFETY: plain sysconf query.
        cpus: u32::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).unwrap_or(1),
        mem_total_kib: std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| mem_total_kib(&s))
            .unwrap_or(0),
        uptime_s: uptime_s(),
    }
}

fn kernel_release() -> String {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: u is a valid utsname to write into.
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    let bytes: Vec<u8> = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `MemTotal` from `/proc/meminfo` text.
pub fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_line_and_keeps_the_rest() {
        let input: &[u8] = b"{\"op\":\"health\"}\nRAW BYTES";
        let (line, rest) = read_request_line(input, 100).unwrap_or_default();
        assert_eq!(line, b"{\"op\":\"health\"}");
        assert_eq!(rest, b"RAW BYTES");
    }

    #[test]
    fn line_limits_and_eof() {
        assert!(matches!(
            read_request_line(&[b'a'; 20][..], 10),
            Err(RequestError::TooLong)
        ));
        assert!(matches!(
            read_request_line(&b""[..], 10),
            Err(RequestError::Empty)
        ));
        let (line, _) = read_request_line(&b"{}"[..], 10).unwrap_or_default();
        assert_eq!(line, b"{}");
    }

    #[test]
    fn parse_errors_say_what_is_wrong() {
        assert!(parse_request(b"{\"op\":\"health\"}").is_ok());
        let e = parse_request(b"{\"op\":\"format_disk\"}")
            .err()
            .unwrap_or_default();
        assert!(e.contains("format_disk"), "{e}");
        assert!(parse_request(b"not json").is_err());
        assert!(parse_request(b"{\"op\":\"exec\"}").is_err());
    }

    #[test]
    fn configure_with_clock_parses() {
        let cfg = polydev_api::agent::GuestConfig {
            clock_unix_ns: Some(1_795_330_849_556_000_000),
            hostname: Some("vm".into()),
            ..Default::default()
        };
        let line = encode_line(&Request::Configure(cfg.clone())).unwrap_or_default();
        assert_eq!(parse_request(&line), Ok(Request::Configure(cfg)));
        assert!(parse_request(b"{\"op\":\"configure\",\"bogus\":1}").is_err());
        assert!(parse_request(b"{\"op\":\"configure\"}").is_ok());
    }

    #[test]
    fn meminfo() {
        let s = "MemTotal:        2030000 kB\nMemFree: 1 kB\n";
        assert_eq!(mem_total_kib(s), Some(2_030_000));
        assert_eq!(mem_total_kib("x"), None);
    }
}
