//! Client of the guest agent API (see `polydev_api::agent`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use polydev_api::agent::{self, Request, Response};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;

use crate::vsock::{self, Capped, Line, VsockError};

/// Why a call to the guest agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentCallError {
    /// The stream could not be opened.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// The stream broke mid-answer.
    #[error("connection to the guest agent broke: {0}")]
    Io(#[from] std::io::Error),
    /// The agent sent something that is not a protocol frame.
    #[error("the guest agent sent an invalid frame: {0}")]
    Protocol(String),
    /// The agent did not answer in time.
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent answered with an error.
    #[error("the guest agent refused: {0}")]
    Agent(String),
}

/// How long the host waits for the guest agent, measured from the start of
/// a request to its final frame. The guest is not trusted to end a stream:
/// when a deadline passes the stream is closed (which also makes the agent
/// kill an exec'd process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// Any request but exec (health, info, files, configure, services,
    /// logs, shutdown) and the answer to a forward.
    pub call: Duration,
    /// Added to an exec's `timeout_ms`: the agent kills the process then and
    /// still has to drain its output and report the exit.
    pub exec_grace: Duration,
    /// The whole of an exec that has no `timeout_ms`.
    pub exec_default: Duration,
}

impl Deadlines {
    /// Upper bound on any deadline, so that a huge `timeout_ms` cannot
    /// overflow the clock.
    const MAX: Duration = Duration::from_secs(365 * 24 * 3600);

    /// The deadline of the whole answer to `req`.
    pub fn for_request(&self, req: &Request) -> Duration {
        match req {
            Request::Exec(e) => match e.timeout_ms {
                Some(ms) => Duration::from_millis(ms).saturating_add(self.exec_grace),
                None => self.exec_default,
            },
            _ => self.call,
        }
        .min(Self::MAX)
    }
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            call: Duration::from_secs(60),
            exec_grace: Duration::from_secs(10),
            // Long enough for any build or install a user runs through
            // `polydev vm exec` without `--timeout`.
            exec_default: Duration::from_secs(3600),
        }
    }
}

/// Longest answer to a forward request (`forward_ready` or an error).
const MAX_FORWARD_ANSWER: usize = 64 * 1024;

/// Talks to one VM's guest agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    socket: PathBuf,
    deadlines: Deadlines,
}

/// An open request: the read side buffered, the write side kept open
/// while frames are read (closing it tells the agent the host left).
struct Conn {
    reader: BufReader<OwnedReadHalf>,
    _writer: tokio::net::unix::OwnedWriteHalf,
}

/// A stream of answer frames for one request, ending at the request's
/// deadline at the latest.
pub struct FrameStream {
    /// `None` once the final frame arrived or the stream failed.
    conn: Option<Conn>,
    line: Vec<u8>,
    deadline: tokio::time::Instant,
    budget: Duration,
    done: bool,
}

impl FrameStream {
    /// The next frame, or `None` after the final one. Fails with
    /// [`AgentCallError::Timeout`] once the request's deadline passes and
    /// with [`AgentCallError::Protocol`] on a frame longer than
    /// [`agent::MAX_RESPONSE_LINE`]; either closes the stream.
    pub async fn next(&mut self) -> Result<Option<Response>, AgentCallError> {
        let Some(conn) = self.conn.as_mut() else {
            return if self.done {
                Ok(None)
            } else {
                Err(AgentCallError::Protocol(
                    "the stream was closed after an earlier error".into(),
                ))
            };
        };
        let read = tokio::time::timeout_at(self.deadline, read_frame(conn, &mut self.line)).await;
        let frame = match read {
            Ok(Ok(frame)) => frame,
            Ok(Err(e)) => {
                self.conn = None;
                return Err(e);
            }
            Err(_) => {
                self.conn = None;
                return Err(AgentCallError::Timeout(self.budget));
            }
        };
        if frame.is_final() {
            self.done = true;
            self.conn = None;
        }
        Ok(Some(frame))
    }
}

async fn read_frame(conn: &mut Conn, line: &mut Vec<u8>) -> Result<Response, AgentCallError> {
    match vsock::read_line_capped(&mut conn.reader, line, agent::MAX_RESPONSE_LINE).await? {
        Capped::Complete => {}
        // A last frame without its newline is still a frame.
        Capped::Eof if !line.is_empty() => {}
        Capped::Eof => {
            return Err(AgentCallError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the guest agent closed the stream before its final frame",
            )))
        }
        Capped::TooLong => {
            return Err(AgentCallError::Protocol(format!(
                "answer frame longer than {} bytes; the stream was closed",
                agent::MAX_RESPONSE_LINE
            )))
        }
    }
    serde_json::from_slice(line.trim_ascii_end())
        .map_err(|e| AgentCallError::Protocol(e.to_string()))
}

impl AgentClient {
    /// A client for the hybrid vsock socket at `socket`, with the default
    /// [`Deadlines`].
    pub fn new(socket: &Path) -> Self {
        AgentClient {
            socket: socket.to_path_buf(),
            deadlines: Deadlines::default(),
        }
    }

    /// The same client with other deadlines.
    pub fn with_deadlines(mut self, deadlines: Deadlines) -> Self {
        self.deadlines = deadlines;
        self
    }

    async fn open(&self, req: &Request) -> Result<UnixStream, AgentCallError> {
        let mut s = vsock::connect(&self.socket, agent::AGENT_PORT, Duration::from_secs(5)).await?;
        let line = agent::encode_line(req).map_err(|e| AgentCallError::Protocol(e.to_string()))?;
        s.write_all(&line).await?;
        Ok(s)
    }

    /// Send a request and return its frames as they arrive. The whole
    /// answer, sending the request included, must come within
    /// [`Deadlines::for_request`].
    pub async fn stream(&self, req: &Request) -> Result<FrameStream, AgentCallError> {
        let budget = self.deadlines.for_request(req);
        let deadline = tokio::time::Instant::now() + budget;
        let s = tokio::time::timeout_at(deadline, self.open(req))
            .await
            .map_err(|_| AgentCallError::Timeout(budget))??;
        let (r, w) = s.into_split();
        Ok(FrameStream {
            conn: Some(Conn {
                reader: BufReader::new(r),
                _writer: w,
            }),
            line: Vec::new(),
            deadline,
            budget,
            done: false,
        })
    }

    /// Send a request and return its final frame; an `Error` frame becomes
    /// [`AgentCallError::Agent`]. Fails after `timeout` or the request's
    /// own deadline, whichever is sooner.
    pub async fn call(&self, req: &Request, timeout: Duration) -> Result<Response, AgentCallError> {
        let fut = async {
            let mut frames = self.stream(req).await?;
            loop {
                match frames.next().await? {
                    Some(Response::Error(e)) => return Err(AgentCallError::Agent(e.message)),
                    Some(f) if f.is_final() => return Ok(f),
                    Some(_) => continue,
                    None => {
                        return Err(AgentCallError::Protocol("answer ended early".into()));
                    }
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| AgentCallError::Timeout(timeout))?
    }

    /// Open a raw stream to a guest-local target (VNC, PTY, …).
    pub async fn forward(
        &self,
        target: agent::ForwardTarget,
    ) -> Result<UnixStream, AgentCallError> {
        let budget = self.deadlines.call;
        tokio::time::timeout(budget, self.forward_inner(target))
            .await
            .map_err(|_| AgentCallError::Timeout(budget))?
    }

    async fn forward_inner(
        &self,
        target: agent::ForwardTarget,
    ) -> Result<UnixStream, AgentCallError> {
        let mut s = self.open(&Request::Forward { target }).await?;
        // Unbuffered: the bytes after the answer belong to the forwarded
        // stream.
        let line = match vsock::read_line_unbuffered(&mut s, MAX_FORWARD_ANSWER).await? {
            Line::Complete(l) | Line::Eof(l) => l,
            Line::TooLong(_) => {
                return Err(AgentCallError::Protocol(format!(
                    "the guest agent's forward answer is longer than {MAX_FORWARD_ANSWER} bytes"
                )))
            }
        };
        match serde_json::from_slice::<Response>(&line) {
            Ok(Response::ForwardReady) => Ok(s),
            Ok(Response::Error(e)) => Err(AgentCallError::Agent(e.message)),
            Ok(other) => Err(AgentCallError::Protocol(format!("{other:?}"))),
            Err(e) => Err(AgentCallError::Protocol(e.to_string())),
        }
    }

    /// Wait until the agent answers `health`, or `deadline` passes, or
    /// `alive()` says the VM died. Polls because the agent cannot announce
    /// itself before its listener exists.
    pub async fn wait_ready(
        &self,
        deadline: Instant,
        alive: impl Fn() -> bool,
    ) -> Result<(), AgentCallError> {
        let mut last = None;
        while Instant::now() < deadline {
            if !alive() {
                return Err(AgentCallError::Protocol(
                    "the hypervisor exited before the guest agent came up".into(),
                ));
            }
            match self.call(&Request::Health, Duration::from_secs(2)).await {
                Ok(Response::Health(h)) if h.ok => return Ok(()),
                Ok(other) => last = Some(AgentCallError::Protocol(format!("{other:?}"))),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(last.unwrap_or(AgentCallError::Timeout(Duration::ZERO)))
    }
}
