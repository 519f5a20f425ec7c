//! The egress shim: an HTTP forward proxy on 127.0.0.1:3128, the only way
//! out of a VM (which has no network interface).
//!
//! Each client connection serves exactly one request target: a `CONNECT
//! host:port` (HTTPS and anything else tunnelled), or one absolute-form
//! request (`GET http://host/path`) rewritten to origin-form. For it the shim
//! opens one stream to the host's [`EGRESS_PORT`], sends an
//! [`EgressRequest`] line (the *name*, unresolved: the guest has no DNS),
//! reads the [`EgressReply`] line and then splices raw bytes.
//!
//! Keep-alive: plain-HTTP requests are sent upstream with `Connection:
//! close`, and the client connection is closed when the response ends. A
//! client that sent a second request on the same connection (keep-alive
//! reuse or pipelining) sees the close and retries on a new connection, as
//! HTTP/1.1 requires of it; a second request is never forwarded to the first
//! request's host. The request body is forwarded by its framing
//! (`Content-Length` or chunked), so bytes after it are never mistaken for
//! body.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use polydev_api::agent::{encode_line, EgressReply, EgressRequest, EGRESS_PROXY_ADDR};

use crate::forward::splice;
use crate::logger;
use crate::net::{Addr, Stream};

/// Longest request head (request line plus headers) the shim accepts.
const MAX_HEAD: usize = 64 * 1024;
/// Longest reply line from the host.
const MAX_REPLY: usize = 4096;
/// A client that does not finish its request head in this time is dropped.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a client request could not be served; each maps to one HTTP status.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ShimError {
    /// The request head is not HTTP/1.x or is too large.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Only `http://` targets and CONNECT are proxied.
    #[error("only CONNECT and absolute http:// URLs are proxied here (got {0:?}); for https use CONNECT (set https_proxy=http://127.0.0.1:3128)")]
    Unsupported(String),
    /// The host refused the target by policy.
    #[error("egress refused: {0}")]
    Denied(String),
    /// The host could not reach the target, or the host link failed.
    #[error("egress failed: {0}")]
    Gateway(String),
}

impl ShimError {
    fn status(&self) -> &'static str {
        match self {
            ShimError::BadRequest(_) => "400 Bad Request",
            ShimError::Unsupported(_) => "501 Not Implemented",
            ShimError::Denied(_) => "403 Forbidden",
            ShimError::Gateway(_) => "502 Bad Gateway",
        }
    }
}

/// How the request body is framed (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// No body.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed client request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Target host (no brackets for IPv6).
    pub host: String,
    /// Target port.
    pub port: u16,
    /// `CONNECT` (tunnel) rather than a plain HTTP request.
    pub connect: bool,
    /// For plain HTTP: the head to send to the origin (origin-form,
    /// `Connection: close`). Empty for CONNECT.
    pub head: Vec<u8>,
    /// For plain HTTP: how the request body is framed.
    pub body: Body,
}

/// Start the shim: listen on 127.0.0.1:3128 and carry each connection to
/// `host` (the host's egress port). Returns once listening, so the caller
/// knows the proxy is up before it starts services that use it.
pub fn start(host: Addr) -> io::Result<()> {
    let listener = TcpListener::bind(EGRESS_PROXY_ADDR)?;
    let host = Arc::new(host);
    std::thread::Builder::new()
        .name("egress".into())
        .spawn(move || serve(listener, host))?;
    Ok(())
}

fn serve(listener: TcpListener, host: Arc<Addr>) {
    for conn in listener.incoming() {
        let client = match conn {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                logger::warn(format!("egress shim: accept failed: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let host = host.clone();
        let spawned = std::thread::Builder::new()
            .name("egress-conn".into())
            .spawn(move || handle(client, &host));
        if let Err(e) = spawned {
            logger::warn(format!("egress shim: cannot start a thread: {e}"));
        }
    }
}

fn handle(client: TcpStream, host: &Addr) {
    let _ = client.set_read_timeout(Some(HEAD_TIMEOUT));
    let (head, rest) = match read_head(&client) {
        Ok(Some(x)) => x,
        // The client went away before sending a request.
        Ok(None) => return,
        Err(e) => return answer_error(&client, &e),
    };
    let _ = client.set_read_timeout(None);
    let parsed = match parse_head(&head) {
        Ok(p) => p,
        Err(e) => return answer_error(&client, &e),
    };
    let upstream = match open(host, &parsed) {
        Ok(s) => s,
        Err(e) => return answer_error(&client, &e),
    };
    if parsed.connect {
        if (&client)
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .is_err()
        {
            return;
        }
        splice(Stream::from(client), upstream, rest);
    } else {
        plain(client, upstream, &parsed, rest);
    }
}

/// Forward one plain-HTTP request: the rewritten head, the body by its
/// framing, and the response until the origin closes.
fn plain(client: TcpStream, upstream: Stream, parsed: &Parsed, rest: Vec<u8>) {
    let upstream = Arc::new(upstream);
    let Ok(client_w) = client.try_clone() else {
        return;
    };
    let up_r = upstream.clone();
    // The response flows while the body is still being sent: a server may
    // answer early (errors, `Expect: 100-continue`).
    let back = std::thread::Builder::new()
        .name("egress-resp".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut from: &Stream = &up_r;
            let mut to = &client_w;
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            // Connection: close semantics: the response ends the connection.
            let _ = client_w.shutdown(Shutdown::Both);
            up_r.shutdown(Shutdown::Both);
        });
    let mut to: &Stream = &upstream;
    if to.write_all(&parsed.head).is_ok() {
        let mut body = BodyReader::new(parsed.body, rest, &client);
        let _ = body.copy_to(&mut to);
    }
    // Bytes after the body (a second request) are left unread on purpose.
    if let Ok(h) = back {
        let _ = h.join();
    }
}

/// Open the host stream for `p` and read the host's verdict.
fn open(host: &Addr, p: &Parsed) -> Result<Stream, ShimError> {
    let s = Stream::connect(host)
        .map_err(|e| ShimError::Gateway(format!("cannot reach the host egress proxy: {e}")))?;
    let line = encode_line(&EgressRequest {
        host: p.host.clone(),
        port: p.port,
    })
    .map_err(|e| ShimError::Gateway(e.to_string()))?;
    (&s).write_all(&line)
        .map_err(|e| ShimError::Gateway(format!("host egress stream: {e}")))?;
    let reply = read_line(&s, MAX_REPLY)
        .map_err(|e| ShimError::Gateway(format!("host egress stream: {e}")))?;
    let reply: EgressReply = serde_json::from_slice(&reply)
        .map_err(|e| ShimError::Gateway(format!("bad reply from the host: {e}")))?;
    if reply.ok {
        return Ok(s);
    }
    let reason = reply.reason.unwrap_or_else(|| "no reason given".into());
    Err(if reply.denied {
        ShimError::Denied(reason)
    } else {
        ShimError::Gateway(reason)
    })
}

/// Read up to and including `\n` one byte at a time, so nothing after the
/// line (the start of the spliced stream) is consumed.
fn read_line(mut s: &Stream, max: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if s.read(&mut b)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the host closed the stream before answering",
            ));
        }
        if b[0] == b'\n' {
            return Ok(out);
        }
        if out.len() >= max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "reply line too long",
            ));
        }
        out.push(b[0]);
    }
}

/// A request head and the bytes that followed it in the same reads.
type HeadAndRest = (Vec<u8>, Vec<u8>);

/// Read the request head; returns it and whatever followed it in the
/// same reads. `None` when the client closed without sending anything.
fn read_head(mut c: &TcpStream) -> Result<Option<HeadAndRest>, ShimError> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = c
            .read(&mut chunk)
            .map_err(|e| ShimError::BadRequest(format!("reading the request: {e}")))?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(ShimError::BadRequest(
                "the connection closed inside the request head".into(),
            ));
        }
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = find(&buf[from..], b"\r\n\r\n") {
            let end = from + i + 4;
            let rest = buf.split_off(end);
            return Ok(Some((buf, rest)));
        }
        if buf.len() > MAX_HEAD {
            return Err(ShimError::BadRequest(format!(
                "request head larger than {MAX_HEAD} bytes"
            )));
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) that must not travel to the origin.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
];

/// Parse a request head (everything up to and including the blank line).
pub fn parse_head(head: &[u8]) -> Result<Parsed, ShimError> {
    let text = std::str::from_utf8(head)
        .map_err(|_| ShimError::BadRequest("request head is not UTF-8".into()))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ShimError::BadRequest(format!(
            "malformed request line {request_line:?}"
        )));
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(ShimError::BadRequest(format!(
            "unsupported version {version:?}"
        )));
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(ShimError::BadRequest(format!("bad method {method:?}")));
    }
    let mut headers: Vec<(&str, &str)> = Vec::new();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| ShimError::BadRequest(format!("malformed header line {line:?}")))?;
        if k.is_empty() || k.contains([' ', '\t']) {
            return Err(ShimError::BadRequest(format!("bad header name {k:?}")));
        }
        headers.push((k, v.trim()));
    }
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = split_authority(target, None)?;
        return Ok(Parsed {
            host,
            port,
            connect: true,
            head: Vec::new(),
            body: Body::None,
        });
    }
    let Some(after) = target
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("http://"))
        .map(|_| &target[7..])
    else {
        return Err(ShimError::Unsupported(target.to_string()));
    };
    let (authority, path) = match after.find(['/', '?']) {
        Some(i) if after.as_bytes()[i] == b'/' => (&after[..i], after[i..].to_string()),
        Some(i) => (&after[..i], format!("/{}", &after[i..])),
        None => (after, "/".to_string()),
    };
    let authority = authority.rsplit('@').next().unwrap_or_default();
    let (host, port) = split_authority(authority, Some(80))?;
    let body = body_framing(&headers)?;
    let mut out = format!("{method} {path} {version}\r\n");
    let mut has_host = false;
    // Headers named by Connection are hop-by-hop too.
    let named: Vec<String> = headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for (k, v) in &headers {
        let lk = k.to_ascii_lowercase();
        if HOP_BY_HOP.contains(&lk.as_str()) || named.contains(&lk) {
            continue;
        }
        has_host |= lk == "host";
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_host {
        out.push_str(&format!("Host: {authority}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    Ok(Parsed {
        host,
        port,
        connect: false,
        head: out.into_bytes(),
        body,
    })
}

fn body_framing(headers: &[(&str, &str)]) -> Result<Body, ShimError> {
    let mut body = Body::None;
    for (k, v) in headers {
        if k.eq_ignore_ascii_case("transfer-encoding") {
            if v.to_ascii_lowercase().trim_end().ends_with("chunked") {
                return Ok(Body::Chunked);
            }
            return Err(ShimError::BadRequest(format!(
                "Transfer-Encoding {v:?} without chunked cannot be framed"
            )));
        }
        if k.eq_ignore_ascii_case("content-length") {
            let n = v
                .parse::<u64>()
                .map_err(|_| ShimError::BadRequest(format!("bad Content-Length {v:?}")))?;
            if matches!(body, Body::Length(m) if m != n) {
                return Err(ShimError::BadRequest("conflicting Content-Length".into()));
            }
            body = Body::Length(n);
        }
    }
    Ok(body)
}

/// `host:port`, `[v6]:port` or (with a default) a bare host.
fn split_authority(a: &str, default_port: Option<u16>) -> Result<(String, u16), ShimError> {
    let bad = || ShimError::BadRequest(format!("bad host:port {a:?}"));
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, tail) = rest.split_once(']').ok_or_else(bad)?;
        match tail.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if tail.is_empty() => (h, None),
            None => return Err(bad()),
        }
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
        None => default_port.ok_or_else(bad)?,
    };
    if host.is_empty()
        || host.len() > 253
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
    {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// Copies a request body, by its framing, from the client.
struct BodyReader<'a> {
    framing: Body,
    pending: Vec<u8>,
    client: &'a TcpStream,
}

impl<'a> BodyReader<'a> {
    fn new(framing: Body, pending: Vec<u8>, client: &'a TcpStream) -> Self {
        BodyReader {
            framing,
            pending,
            client,
        }
    }

    /// Next bytes from the client (buffered bytes first); 0 at EOF.
    fn fill(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            let mut buf = vec![0u8; 64 * 1024];
            let mut c = self.client;
            let n = c.read(&mut buf)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed inside the body",
                ));
            }
            buf.truncate(n);
            self.pending = buf;
        }
        Ok(())
    }

    fn take(&mut self, max: usize) -> io::Result<Vec<u8>> {
        self.fill()?;
        let n = max.min(self.pending.len());
        let rest = self.pending.split_off(n);
        Ok(std::mem::replace(&mut self.pending, rest))
    }

    fn line(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            self.fill()?;
            if let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
                let rest = self.pending.split_off(i + 1);
                out.extend_from_slice(&std::mem::replace(&mut self.pending, rest));
                return Ok(out);
            }
            out.append(&mut self.pending);
            if out.len() > MAX_HEAD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "chunk line too long",
                ));
            }
        }
    }

    fn copy_exact(&mut self, mut n: u64, to: &mut impl Write) -> io::Result<()> {
        while n > 0 {
            let part = self.take(n.min(64 * 1024) as usize)?;
            to.write_all(&part)?;
            n -= part.len() as u64;
        }
        Ok(())
    }

    fn copy_to(&mut self, to: &mut impl Write) -> io::Result<()> {
        match self.framing {
            Body::None => Ok(()),
            Body::Length(n) => self.copy_exact(n, to),
            Body::Chunked => loop {
                let line = self.line()?;
                to.write_all(&line)?;
                let text = String::from_utf8_lossy(&line);
                let size = text.trim().split(';').next().unwrap_or_default().trim();
                let size = u64::from_str_radix(size, 16)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
                if size == 0 {
                    // Trailers, up to the blank line.
                    loop {
                        let l = self.line()?;
                        to.write_all(&l)?;
                        if l == b"\r\n" || l == b"\n" {
                            return Ok(());
                        }
                    }
                }
                self.copy_exact(size + 2, to)?;
            },
        }
    }
}

fn answer_error(mut client: &TcpStream, e: &ShimError) {
    let body = format!("polydev egress: {e}\n");
    let msg = format!(
        "HTTP/1.1 {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        e.status(),
        body.len()
    );
    let _ = client.write_all(msg.as_bytes());
    let _ = client.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> Vec<u8> {
        s.replace('\n', "\r\n").into_bytes()
    }

    #[test]
    fn connect_targets_parse() {
        let p = parse_head(&head("CONNECT example.com:443 HTTP/1.1\nHost: x\n\n")).unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.connect),
            ("example.com", 443, true)
        );
        let p = parse_head(&head("CONNECT [::1]:8443 HTTP/1.1\n\n")).unwrap();
        assert_eq!((p.host.as_str(), p.port), ("::1", 8443));
        assert!(parse_head(&head("CONNECT example.com HTTP/1.1\n\n")).is_err());
        assert!(parse_head(&head("CONNECT a:0 HTTP/1.1\n\n")).is_err());
        assert!(parse_head(&head("CONNECT a b:1:2 HTTP/1.1\n\n")).is_err());
    }

    #[test]
    fn absolute_form_is_rewritten_to_origin_form_with_close() {
        let p = parse_head(&head(
            "GET http://Example.com:8080/a/b?c=1 HTTP/1.1\nHost: example.com:8080\nProxy-Connection: keep-alive\nConnection: keep-alive, X-Hop\nX-Hop: 1\nProxy-Authorization: Basic Zm9v\nAccept: */*\n\n",
        ))
        .unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.connect),
            ("Example.com", 8080, false)
        );
        let out = String::from_utf8(p.head).unwrap();
        assert_eq!(
            out,
            "GET /a/b?c=1 HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(p.body, Body::None);
    }

    #[test]
    fn missing_path_and_host_are_filled_in() {
        let p = parse_head(&head("GET http://a.test HTTP/1.0\n\n")).unwrap();
        assert_eq!(p.port, 80);
        assert_eq!(
            String::from_utf8(p.head).unwrap(),
            "GET / HTTP/1.0\r\nHost: a.test\r\nConnection: close\r\n\r\n"
        );
        let p = parse_head(&head("GET http://a.test?q HTTP/1.1\n\n")).unwrap();
        assert!(String::from_utf8(p.head).unwrap().starts_with("GET /?q "));
    }

    #[test]
    fn origin_form_https_and_garbage_are_refused() {
        assert!(matches!(
            parse_head(&head("GET / HTTP/1.1\n\n")),
            Err(ShimError::Unsupported(_))
        ));
        assert!(matches!(
            parse_head(&head("GET https://a/ HTTP/1.1\n\n")),
            Err(ShimError::Unsupported(_))
        ));
        assert!(matches!(
            parse_head(&head("GET http://a/ HTTP/2\n\n")),
            Err(ShimError::BadRequest(_))
        ));
        assert!(matches!(
            parse_head(&head("GET http://a b/ HTTP/1.1\n\n")),
            Err(ShimError::BadRequest(_))
        ));
        assert!(matches!(
            parse_head(&head("GET http://a/ HTTP/1.1\nnocolon\n\n")),
            Err(ShimError::BadRequest(_))
        ));
    }

    #[test]
    fn body_framing_is_recognised() {
        let p = parse_head(&head("POST http://a/ HTTP/1.1\nContent-Length: 12\n\n")).unwrap();
        assert_eq!(p.body, Body::Length(12));
        let p = parse_head(&head(
            "POST http://a/ HTTP/1.1\nTransfer-Encoding: chunked\n\n",
        ))
        .unwrap();
        assert_eq!(p.body, Body::Chunked);
        assert!(parse_head(&head(
            "POST http://a/ HTTP/1.1\nContent-Length: 1\nContent-Length: 2\n\n"
        ))
        .is_err());
        assert!(parse_head(&head("POST http://a/ HTTP/1.1\nContent-Length: x\n\n")).is_err());
    }

    #[test]
    fn chunked_bodies_are_copied_exactly_and_nothing_after() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let body = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n";
        let mut sent = body.to_vec();
        sent.extend_from_slice(b"GET http://other/ HTTP/1.1\r\n\r\n");
        let writer = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            // Split the body over two writes to exercise refills.
            c.write_all(&sent[..7]).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            c.write_all(&sent[7..]).unwrap();
            c
        });
        let (server, _) = listener.accept().unwrap();
        let mut out = Vec::new();
        BodyReader::new(Body::Chunked, Vec::new(), &server)
            .copy_to(&mut out)
            .unwrap();
        assert_eq!(out, body);
        let _keep = writer.join().unwrap();

        // A Content-Length body stops at its length, even with more buffered.
        let mut out = Vec::new();
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = a.local_addr().unwrap();
        let _c = TcpStream::connect(addr).unwrap();
        let (s, _) = a.accept().unwrap();
        BodyReader::new(Body::Length(4), b"abcdef".to_vec(), &s)
            .copy_to(&mut out)
            .unwrap();
        assert_eq!(out, b"abcd");
    }
}
