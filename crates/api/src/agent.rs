//! The guest agent protocol, spoken over one vsock stream per request.
//!
//! Framing: the host opens a stream to [`AGENT_PORT`] (through the hybrid
//! vsock Unix socket: `CONNECT 1024\n` → `OK …\n`), writes exactly one
//! [`Request`] as a single JSON line, and reads [`Response`] frames, one JSON
//! line each, until a final frame ([`Response::is_final`]). A
//! [`Request::Forward`] that succeeds answers [`Response::ForwardReady`] and the
//! stream then carries raw bytes in both directions ([`crate::pty`] frames
//! for a terminal).
//!
//! Guest-initiated streams go to the host's CID 2: [`LOG_PORT`] carries
//! [`LogRecord`] JSON lines (the agent's own log and every supervised
//! service's output) so that a crash inside the VM is visible outside it.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Vsock port the guest agent serves its API on.
pub const AGENT_PORT: u32 = 1024;
/// Vsock port on the host that receives the guest's log stream.
pub const LOG_PORT: u32 = 1025;
/// Vsock port on the host that receives the guest's egress connections
/// (see [`EgressRequest`]).
pub const EGRESS_PORT: u32 = 1026;
/// Address of the guest's HTTP(S) forward proxy, which carries every
/// connection to [`EGRESS_PORT`].
pub const EGRESS_PROXY_ADDR: &str = "127.0.0.1:3128";
/// Longest [`EgressRequest`] line the host accepts, in bytes.
pub const MAX_EGRESS_LINE: usize = 4096;
/// Vsock context id of the host, as seen from a guest.
pub const HOST_CID: u32 = 2;
/// Longest request line the agent accepts, in bytes.
pub const MAX_REQUEST_LINE: usize = 16 * 1024 * 1024;
/// Largest file a [`Request::ReadFile`] answer may carry, in bytes, and the
/// default `max_bytes`: the most that fits in one [`MAX_RESPONSE_LINE`] frame
/// (base64 grows it by 4/3). Larger files are read with exec (`cat`), whose
/// output streams in small frames.
pub const MAX_READ_FILE: u64 = 12 * 1024 * 1024;
/// Longest answer frame (one JSON line) the host reads from the guest agent,
/// in bytes; a longer one is a protocol error and its stream is closed, so a
/// guest that sends no newline cannot grow the host's memory. The largest
/// legitimate frame is a [`Response::File`] of [`MAX_READ_FILE`] bytes
/// (16 MiB of base64); exec output chunks are far smaller (64 KiB, 87 KiB
/// as base64). The 64 KiB above that is headroom for the frame's JSON.
///
/// A [`Response::Logs`] answer grows with its `limit`: ask for what fits
/// (the agent keeps lines of at most 16 KiB).
pub const MAX_RESPONSE_LINE: usize = 16 * 1024 * 1024 + 64 * 1024;
/// Longest line of the guest's log stream ([`LOG_PORT`]) the host accepts,
/// in bytes; a guest that sends a longer one has that connection closed.
/// Fits a [`LogRecord`] whose 16 KiB line (the agent's own cap) is all
/// control characters, each escaped to six bytes in JSON.
pub const MAX_LOG_LINE: usize = 128 * 1024;
/// Most log stream connections one VM may have open at once; the agent
/// needs one, a few more cover reconnects racing the old connection's end.
pub const MAX_LOG_CONNECTIONS: usize = 4;
/// Protocol revision; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// One request to the guest agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Liveness: answered with [`Response::Health`].
    Health,
    /// Static facts about the guest: answered with [`Response::Info`].
    Info,
    /// Run a program, streaming its output.
    Exec(ExecRequest),
    /// Read a whole file (up to `max_bytes`).
    ReadFile {
        /// Absolute path inside the guest.
        path: String,
        /// Refuse files larger than this many bytes (default and most the
        /// host accepts: [`MAX_READ_FILE`]).
        #[serde(default = "default_max_read")]
        max_bytes: u64,
    },
    /// Write (create or replace) a file atomically.
    WriteFile(FileSpec),
    /// Push per-VM configuration; see [`GuestConfig`].
    Configure(GuestConfig),
    /// Splice this stream to a guest-local TCP port or Unix socket.
    Forward {
        /// Where to connect inside the guest.
        target: ForwardTarget,
    },
    /// The agent's in-memory log ring (most recent last).
    Logs {
        /// Return at most this many records.
        #[serde(default = "default_log_limit")]
        limit: usize,
    },
    /// State of every supervised service.
    Services,
    /// Wait until one of a user's files differs from what the host knows,
    /// or the timeout passes (a long poll); answered with
    /// [`Response::Watched`].
    WatchFiles(WatchSpec),
    /// Stop all services, sync and power off (or reboot).
    Shutdown {
        /// Reboot instead of powering off.
        #[serde(default)]
        reboot: bool,
    },
}

fn default_max_read() -> u64 {
    MAX_READ_FILE
}

fn default_log_limit() -> usize {
    1000
}

/// A program to run in the guest.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Extra environment, on top of the agent's configured environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Bytes fed to standard input, then closed (base64 on the wire).
    #[serde(default, with = "b64_opt")]
    pub stdin: Option<Vec<u8>>,
    /// Kill the process (SIGKILL) after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Most files one [`Request::WatchFiles`] may watch.
pub const MAX_WATCH_FILES: usize = 8;
/// Largest watched file the agent reads, in bytes (credential files are a
/// few KiB); a larger one is answered as refused, so one answer stays
/// below `MAX_WATCH_FILES` MiB.
pub const MAX_WATCH_FILE: u64 = 1024 * 1024;
/// Longest a [`Request::WatchFiles`] waits, in milliseconds: below the
/// host's 60 s deadline for an agent answer.
pub const MAX_WATCH_MS: u64 = 45_000;
/// [`WatchedFile::key`] of a file that does not exist.
pub const WATCH_MISSING: &str = "missing";
/// [`WatchedFile::key`] of a file the agent refused to read (see
/// [`WatchedFile::problem`]).
pub const WATCH_REFUSED: &str = "refused";

/// Files of one user to watch. The agent reads each as data, as root but
/// without following any symlink on its path (`openat2`
/// `RESOLVE_NO_SYMLINKS`), and only a regular file owned by `user` of at
/// most `max_bytes`: a user who plants a link or a device gets a refusal,
/// never another file's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchSpec {
    /// The files' owner (name or numeric uid).
    pub user: String,
    /// What to watch, with the key the host knows for each.
    pub files: Vec<WatchPath>,
    /// Answer after this many milliseconds even if nothing changed (at
    /// most [`MAX_WATCH_MS`]).
    pub timeout_ms: u64,
    /// Largest file read, in bytes (at most [`MAX_WATCH_FILE`]).
    pub max_bytes: u64,
}

/// One watched path and the key the host last saw for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchPath {
    /// Absolute path inside the guest.
    pub path: String,
    /// The [`WatchedFile::key`] the host knows; anything else (e.g. `""`)
    /// makes the agent answer at once.
    pub known: String,
}

/// A watched file as it is now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchedFile {
    /// The path, as asked.
    pub path: String,
    /// Lower-case hex SHA-256 of the content, [`WATCH_MISSING`] or
    /// [`WATCH_REFUSED`].
    pub key: String,
    /// The content, when the file was read (base64 on the wire).
    #[serde(default, with = "b64_opt")]
    pub data: Option<Vec<u8>>,
    /// Why the file was not read, for [`WATCH_REFUSED`].
    #[serde(default)]
    pub problem: Option<String>,
}

/// A file to write in the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Absolute path inside the guest.
    pub path: String,
    /// Contents (base64 on the wire).
    #[serde(with = "b64")]
    pub data: Vec<u8>,
    /// Permission bits, e.g. `0o600` (default `0o644`).
    #[serde(default = "default_mode")]
    pub mode: u32,
    /// Create missing parent directories.
    #[serde(default)]
    pub create_dirs: bool,
}

fn default_mode() -> u32 {
    0o644
}

/// Per-VM configuration pushed by the host after boot and after every
/// snapshot restore. Every field is optional so a push can carry only what
/// changed.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    /// Host name of the guest.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Environment given to every exec and service started afterwards.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Files to write before anything else in this push.
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// Fresh entropy mixed into the guest's pool (base64 on the wire), so two
    /// VMs restored from one snapshot do not share random state.
    #[serde(default, with = "b64_opt")]
    pub entropy: Option<Vec<u8>>,
    /// Wall clock to set, in nanoseconds since the Unix epoch (u64: serde
    /// cannot decode u128 inside an internally tagged enum; u64 lasts until
    /// the year 2554).
    #[serde(default)]
    pub clock_unix_ns: Option<u64>,
    /// Services to (re)declare; the agent starts new ones and restarts
    /// changed ones.
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
}

/// A long-running program the guest agent supervises.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Unique name; `[a-z0-9_.-]`, at most 64 characters.
    pub name: String,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Run as this user (name or numeric uid); default root.
    #[serde(default)]
    pub user: Option<String>,
    /// When to restart the service after it exits.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// How the agent tells that a run of the service is ready for use
    /// (none: never reported ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<ReadyProbe>,
}

/// A readiness check the guest agent repeats after each start of a service
/// until it passes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ReadyProbe {
    /// Something accepts TCP connections on `127.0.0.1:<port>`.
    Tcp {
        /// TCP port.
        port: u16,
    },
    /// A command, run as the service's user with its environment and
    /// working directory, exits with status 0.
    Exec {
        /// Program and arguments.
        argv: Vec<String>,
    },
}

/// Restart policy of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// Restart whatever the exit status (with exponential backoff).
    #[default]
    Always,
    /// Restart only after a non-zero exit or a signal.
    OnFailure,
    /// Never restart.
    Never,
}

/// Where a forwarded stream connects inside the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ForwardTarget {
    /// `127.0.0.1:<port>` in the guest.
    Tcp {
        /// TCP port.
        port: u16,
    },
    /// A Unix stream socket in the guest.
    Unix {
        /// Absolute path of the socket.
        path: String,
    },
    /// A terminal: the user's login shell on a new pseudo-terminal, in its
    /// home directory. After [`Response::ForwardReady`] the stream carries
    /// [`crate::pty::PtyFrame`]s both ways (input and resizes in, output
    /// and the exit status out) instead of raw bytes.
    Pty(PtySpec),
}

/// A terminal to open in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtySpec {
    /// Run as this user (a name or uid; default: the agent's user, root).
    #[serde(default)]
    pub user: Option<String>,
    /// Initial width in columns (1-1000).
    pub cols: u16,
    /// Initial height in rows (1-1000).
    pub rows: u16,
    /// Keep the terminal under this name ([`PtySpec::session_ok`]): the
    /// shell outlives the stream, and the next `forward` with the same name
    /// (and user) attaches to it, the screen restored from its recent
    /// output. Without a name the terminal ends with its stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

impl PtySpec {
    /// Largest accepted width or height.
    pub const MAX_SIZE: u16 = 1000;

    /// Whether the size is usable (both 1..=[`Self::MAX_SIZE`]).
    pub fn size_ok(cols: u16, rows: u16) -> bool {
        (1..=Self::MAX_SIZE).contains(&cols) && (1..=Self::MAX_SIZE).contains(&rows)
    }

    /// Whether `name` can name a kept terminal: 1-32 of `a-z`, `0-9` and
    /// `-`, starting with a letter or digit.
    pub fn session_ok(name: &str) -> bool {
        (1..=32).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
    }
}

/// One frame of an answer from the guest agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Health`].
    Health(Health),
    /// Answer to [`Request::Info`].
    Info(AgentInfo),
    /// The exec'd process has started.
    Started {
        /// Its pid inside the guest.
        pid: u32,
    },
    /// A chunk of the process's standard output.
    Stdout {
        /// Raw bytes (base64 on the wire).
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// A chunk of the process's standard error.
    Stderr {
        /// Raw bytes (base64 on the wire).
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// The process ended; final.
    Exit(ExitStatus),
    /// Contents of a file; final.
    File {
        /// Raw bytes (base64 on the wire).
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// The agent's log ring; final.
    Logs {
        /// Records, oldest first.
        records: Vec<LogRecord>,
    },
    /// Supervised services; final.
    Services {
        /// One entry per declared service.
        services: Vec<ServiceStatus>,
    },
    /// Answer to [`Request::WatchFiles`]: every watched file as it is now,
    /// in the order asked; final.
    Watched {
        /// One entry per watched path.
        files: Vec<WatchedFile>,
    },
    /// The stream now carries raw bytes to the forward target; final.
    ForwardReady,
    /// The request succeeded and has nothing else to say; final.
    Done,
    /// The request failed; final.
    Error(AgentError),
}

impl Response {
    /// Whether this frame ends the answer to a request.
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            Response::Started { .. } | Response::Stdout { .. } | Response::Stderr { .. }
        )
    }
}

/// How an exec'd process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal number, if a signal killed it.
    pub signal: Option<i32>,
    /// Killed by the agent because `timeout_ms` passed.
    #[serde(default)]
    pub timed_out: bool,
}

/// Liveness answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// Always true when the agent answers.
    pub ok: bool,
    /// Seconds since the guest kernel booted.
    pub uptime_s: f64,
}

/// Static facts about the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Agent version (the crate version).
    pub version: String,
    /// [`PROTOCOL_VERSION`] of the agent.
    pub protocol: u32,
    /// Guest kernel release (`uname -r`).
    pub kernel: String,
    /// Whether the agent switched into a root filesystem.
    pub rootfs: bool,
    /// Number of online CPUs.
    pub cpus: u32,
    /// Total memory in KiB.
    pub mem_total_kib: u64,
    /// Seconds since the guest kernel booted.
    pub uptime_s: f64,
}

/// State of one supervised service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// Pid while running.
    pub pid: Option<u32>,
    /// How many times it has been started.
    pub starts: u32,
    /// How the last run ended.
    pub last_exit: Option<ExitStatus>,
    /// Milliseconds until the next restart, when waiting on backoff.
    pub backoff_ms: Option<u64>,
    /// The current run passed its readiness probe.
    #[serde(default)]
    pub ready: bool,
    /// Whether the service has a readiness probe at all.
    #[serde(default)]
    pub has_probe: bool,
    /// Milliseconds from the current run's start to its probe passing.
    #[serde(default)]
    pub ready_after_ms: Option<u64>,
}

impl ServiceStatus {
    /// Whether the service holds up readiness: it has a probe that has not
    /// passed for its current run. A VM is ready when no service does.
    pub fn awaiting_readiness(&self) -> bool {
        self.has_probe && !self.ready
    }
}

/// A failure reported by the guest agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentError {
    /// Machine-readable kind.
    pub kind: AgentErrorKind,
    /// What went wrong and what to do about it.
    pub message: String,
}

/// Machine-readable kinds of [`AgentError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentErrorKind {
    /// The request was malformed or invalid.
    BadRequest,
    /// A file or program was not found.
    NotFound,
    /// The guest refused (permissions, size limits).
    Refused,
    /// Something failed inside the guest.
    Internal,
}

/// One line of log output from inside the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Monotonic sequence number assigned by the agent.
    pub seq: u64,
    /// Guest wall clock, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// `agent` for the agent itself, `service:<name>` for a service.
    pub source: String,
    /// `info`, `warn`, `error` for the agent; `stdout`/`stderr` for services.
    pub stream: String,
    /// The line, without its newline.
    pub line: String,
}

/// First line of a guest-initiated stream to [`EGRESS_PORT`]: where the
/// guest wants to go. The host answers one [`EgressReply`] line; when it is
/// `ok`, the stream carries raw bytes to and from the target.
///
/// The host name travels unresolved: the guest has no DNS, the host resolves
/// it (and applies its policy to the addresses it resolves to).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressRequest {
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// The host's answer to an [`EgressRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressReply {
    /// The stream is now connected to the target.
    pub ok: bool,
    /// Why not, when `ok` is false (safe to show inside the VM: it never
    /// names upstream credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The refusal is the host's policy (deny list, limits), not a failure
    /// to connect; the shim answers 403 instead of 502.
    #[serde(default)]
    pub denied: bool,
}

/// Encode a value as one protocol line (JSON followed by `\n`).
pub fn encode_line<T: Serialize>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = serde_json::to_vec(value)?;
    out.push(b'\n');
    Ok(out)
}

mod b64 {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

mod b64_opt {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| {
            base64::engine::general_purpose::STANDARD
                .decode(s.as_bytes())
                .map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_request_round_trips_with_binary_stdin() {
        let req = Request::Exec(ExecRequest {
            argv: vec!["cat".into()],
            stdin: Some(vec![0, 1, 2, 255]),
            ..Default::default()
        });
        let line = encode_line(&req).unwrap();
        assert_eq!(line.last(), Some(&b'\n'));
        let back: Request = serde_json::from_slice(&line).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn unknown_fields_and_ops_are_rejected() {
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"exec","argv":["a"],"bogus":1}"#).is_err()
        );
    }

    #[test]
    fn only_output_frames_are_non_final() {
        assert!(!Response::Stdout { data: vec![] }.is_final());
        assert!(!Response::Started { pid: 1 }.is_final());
        assert!(Response::Done.is_final());
        assert!(Response::Exit(ExitStatus {
            code: Some(0),
            signal: None,
            timed_out: false
        })
        .is_final());
    }

    #[test]
    fn configure_with_a_clock_decodes_through_the_request_enum() {
        let req = Request::Configure(GuestConfig {
            clock_unix_ns: Some(1_795_331_382_996_000_000),
            ..Default::default()
        });
        let line = encode_line(&req).unwrap();
        assert_eq!(serde_json::from_slice::<Request>(&line).unwrap(), req);
    }

    #[test]
    fn egress_lines_round_trip_and_reject_unknown_fields() {
        let req = EgressRequest {
            host: "example.com".into(),
            port: 443,
        };
        let line = encode_line(&req).unwrap();
        assert_eq!(serde_json::from_slice::<EgressRequest>(&line).unwrap(), req);
        assert!(serde_json::from_str::<EgressRequest>(r#"{"host":"a","port":1,"x":2}"#).is_err());
        assert!(serde_json::from_str::<EgressRequest>(r#"{"host":"a","port":70000}"#).is_err());
        let ok: EgressReply = serde_json::from_str(r#"{"ok":true}"#).unwrap();
        assert!(ok.ok && !ok.denied && ok.reason.is_none());
    }

    #[test]
    fn the_largest_legitimate_frames_fit_their_caps() {
        let file = encode_line(&Response::File {
            data: vec![0xff; MAX_READ_FILE as usize],
        })
        .unwrap();
        assert!(file.len() <= MAX_RESPONSE_LINE, "{}", file.len());
        // The guest's exec chunk (crates/guest/src/exec.rs CHUNK).
        let chunk = encode_line(&Response::Stdout {
            data: vec![0xff; 64 * 1024],
        })
        .unwrap();
        assert!(chunk.len() <= MAX_RESPONSE_LINE);
        // The guest's longest log line (crates/guest/src/util.rs MAX_LINE),
        // all escapes.
        let log = encode_line(&LogRecord {
            seq: u64::MAX,
            ts_ms: u64::MAX,
            source: format!("service:{}", "s".repeat(64)),
            stream: "stderr".into(),
            line: "\u{1}".repeat(16 * 1024),
        })
        .unwrap();
        assert!(log.len() <= MAX_LOG_LINE, "{}", log.len());
    }

    #[test]
    fn bad_base64_is_an_error_not_a_panic() {
        let r = serde_json::from_str::<Response>(r#"{"type":"stdout","data":"!!!"}"#);
        assert!(r.is_err());
    }
}
