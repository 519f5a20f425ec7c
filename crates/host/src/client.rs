//! Client of the host agent API over its Unix socket (used by the CLI and
//! by tests).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request as HttpRequest};
use hyper_util::rt::TokioIo;
use polydev_api::agent::{ExecRequest, Response as Frame, MAX_RESPONSE_LINE};
use polydev_api::Problem;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

/// Why a call to the host agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No host agent listens on the socket.
    #[error("cannot reach the host agent at {path}: {cause}; start it with `polydev host` (or `polydev up`)")]
    Connect {
        /// Socket path.
        path: String,
        /// Underlying error.
        cause: std::io::Error,
    },
    /// HTTP-level failure.
    #[error("host agent connection failed: {0}")]
    Http(String),
    /// The host agent answered with a problem.
    #[error("{0}")]
    Problem(Problem),
    /// The answer could not be decoded.
    #[error("unexpected answer from the host agent: {0}")]
    Decode(String),
}

/// A host agent client.
#[derive(Debug, Clone)]
pub struct HostClient {
    socket: PathBuf,
}

/// Exec output as it streams.
pub struct ExecStream {
    body: Incoming,
    /// The current frame line so far (never more than
    /// [`MAX_RESPONSE_LINE`] bytes).
    line: Vec<u8>,
    /// What is left of the last body chunk after the lines taken from it.
    rest: Bytes,
}

impl ExecStream {
    /// The next frame, or `None` at the end. A frame line longer than
    /// [`MAX_RESPONSE_LINE`] is an error: the host agent caps what it
    /// relays at that, so such a line means the stream is broken.
    pub async fn next(&mut self) -> Result<Option<Frame>, ClientError> {
        loop {
            if let Some(pos) = self.rest.iter().position(|b| *b == b'\n') {
                let head = self.rest.split_to(pos + 1);
                if !self.append(&head[..pos]) {
                    return Err(too_long());
                }
                let f = serde_json::from_slice(&self.line)
                    .map_err(|e| ClientError::Decode(e.to_string()));
                self.line.clear();
                return f.map(Some);
            }
            let tail = std::mem::take(&mut self.rest);
            if !self.append(&tail) {
                return Err(too_long());
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.rest = data;
                    }
                }
                Some(Err(e)) => return Err(ClientError::Http(e.to_string())),
                None => return Ok(None),
            }
        }
    }

    /// Add `bytes` to the current line; false (and the line dropped) when
    /// that would make it longer than the cap.
    fn append(&mut self, bytes: &[u8]) -> bool {
        let want = self.line.len() + bytes.len();
        if want > MAX_RESPONSE_LINE {
            self.line = Vec::new();
            return false;
        }
        if want > self.line.capacity() {
            // Vec's own growth doubles, which would overshoot the cap.
            let target = self
                .line
                .capacity()
                .saturating_mul(2)
                .clamp(want, MAX_RESPONSE_LINE);
            self.line.reserve_exact(target - self.line.len());
        }
        self.line.extend_from_slice(bytes);
        true
    }
}

fn too_long() -> ClientError {
    ClientError::Decode(format!(
        "an exec frame is longer than {MAX_RESPONSE_LINE} bytes"
    ))
}

impl HostClient {
    /// A client for the socket at `socket`.
    pub fn new(socket: &Path) -> Self {
        HostClient {
            socket: socket.to_path_buf(),
        }
    }

    /// One HTTP/1.1 connection to the host agent (upgrades allowed).
    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|cause| ClientError::Connect {
                    path: self.socket.display().to_string(),
                    cause,
                })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(conn.with_upgrades());
        Ok(sender)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let mut sender = self.connect().await?;
        let mut req = HttpRequest::builder()
            .method(method)
            .uri(path)
            .header("host", "polydev-host");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        if resp.status().is_client_error() || resp.status().is_server_error() {
            return Err(problem_of(resp).await);
        }
        Ok(resp)
    }

    /// Send a request and decode a JSON answer.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        let bytes = body_bytes(self.send(method, path, body).await?).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Send a request and return the raw answer body as text.
    pub async fn text(&self, path: &str) -> Result<String, ClientError> {
        let bytes = body_bytes(self.send(Method::GET, path, None).await?).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Send a request whose answer has no body.
    pub async fn call_empty(&self, method: Method, path: &str) -> Result<(), ClientError> {
        self.send(method, path, None).await.map(|_| ())
    }

    /// Open a raw byte stream to a TCP port (`port`) or Unix socket
    /// (`unix`) inside a running VM, or a terminal (framed: see
    /// `polydev_api::pty`).
    pub async fn forward(
        &self,
        id: &str,
        target: &polydev_api::agent::ForwardTarget,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, ClientError> {
        use polydev_api::agent::ForwardTarget;
        let escape = |s: &str| {
            let mut q = String::new();
            for b in s.bytes() {
                if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
                    q.push(b as char);
                } else {
                    q.push_str(&format!("%{b:02X}"));
                }
            }
            q
        };
        let query = match target {
            ForwardTarget::Tcp { port } => format!("port={port}"),
            ForwardTarget::Unix { path } => format!("unix={}", escape(path)),
            ForwardTarget::Pty(p) => {
                let mut q = format!("pty=true&cols={}&rows={}", p.cols, p.rows);
                if let Some(u) = &p.user {
                    q.push_str(&format!("&user={}", escape(u)));
                }
                if let Some(s) = &p.session {
                    q.push_str(&format!("&session={}", escape(s)));
                }
                q
            }
        };
        let mut sender = self.connect().await?;
        let req = HttpRequest::builder()
            .method(Method::POST)
            .uri(format!("/v1/vms/{id}/forward?{query}"))
            .header("host", "polydev-host")
            .header("connection", "upgrade")
            .header("upgrade", crate::server::FORWARD_PROTOCOL)
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
            return Err(problem_of(resp).await);
        }
        let up = hyper::upgrade::on(resp)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        Ok(TokioIo::new(up))
    }

    /// Run a command in a VM, streaming its frames.
    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecStream, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Decode(e.to_string()))?;
        let resp = self
            .send(Method::POST, &format!("/v1/vms/{id}/exec"), Some(body))
            .await?;
        Ok(ExecStream {
            body: resp.into_body(),
            line: Vec::new(),
            rest: Bytes::new(),
        })
    }
}

/// The problem an error answer carries (or one made of its text).
async fn problem_of(resp: hyper::Response<Incoming>) -> ClientError {
    let status = resp.status().as_u16();
    let bytes = match body_bytes(resp).await {
        Ok(b) => b,
        Err(e) => return e,
    };
    ClientError::Problem(
        serde_json::from_slice::<Problem>(&bytes).unwrap_or_else(|_| {
            Problem::new(
                status,
                "unknown",
                "Error",
                String::from_utf8_lossy(&bytes).into_owned(),
            )
        }),
    )
}

async fn body_bytes(resp: hyper::Response<Incoming>) -> Result<Bytes, ClientError> {
    Ok(resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?
        .to_bytes())
}
