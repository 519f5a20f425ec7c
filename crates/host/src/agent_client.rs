//! Client of the guest agent API (see `polydev_api::agent`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use polydev_api::agent::{self, Request, Response};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;

use crate::vsock::{self, Line, VsockError};

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

/// Talks to one VM's guest agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    socket: PathBuf,
}

/// A stream of answer frames for one request.
pub struct FrameStream {
    reader: BufReader<OwnedReadHalf>,
    // Kept so the write side stays open while frames are read.
    _writer: tokio::net::unix::OwnedWriteHalf,
    done: bool,
}

impl FrameStream {
    /// The next frame, or `None` after the final one.
    pub async fn next(&mut self) -> Result<Option<Response>, AgentCallError> {
        if self.done {
            return Ok(None);
        }
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).await?;
        if n == 0 {
            return Err(AgentCallError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the guest agent closed the stream before its final frame",
            )));
        }
        let frame: Response = serde_json::from_str(line.trim_end())
            .map_err(|e| AgentCallError::Protocol(e.to_string()))?;
        if frame.is_final() {
            self.done = true;
        }
        Ok(Some(frame))
    }
}

impl AgentClient {
    /// A client for the hybrid vsock socket at `socket`.
    pub fn new(socket: &Path) -> Self {
        AgentClient {
            socket: socket.to_path_buf(),
        }
    }

    async fn open(&self, req: &Request) -> Result<UnixStream, AgentCallError> {
        let mut s = vsock::connect(&self.socket, agent::AGENT_PORT, Duration::from_secs(5)).await?;
        let line = agent::encode_line(req).map_err(|e| AgentCallError::Protocol(e.to_string()))?;
        s.write_all(&line).await?;
        Ok(s)
    }

    /// Send a request and return its frames as they arrive.
    pub async fn stream(&self, req: &Request) -> Result<FrameStream, AgentCallError> {
        let s = self.open(req).await?;
        let (r, w) = s.into_split();
        Ok(FrameStream {
            reader: BufReader::new(r),
            _writer: w,
            done: false,
        })
    }

    /// Send a request and return its final frame; an `Error` frame becomes
    /// [`AgentCallError::Agent`].
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
        let mut s = self.open(&Request::Forward { target }).await?;
        let line = match vsock::read_line_unbuffered(&mut s, agent::MAX_REQUEST_LINE).await? {
            Line::Complete(l) | Line::Eof(l) => l,
            Line::TooLong(_) => {
                return Err(AgentCallError::Protocol(
                    "the guest agent's forward answer has no end".into(),
                ))
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
