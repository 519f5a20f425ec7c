//! The loopback listener the browser is redirected to (RFC 8252 §7.3).
//!
//! Each connection is read in its own task, so a browser's idle
//! preconnection cannot hold up the real redirect. Requests for other paths
//! (a favicon, a stray probe) get 404 and the wait goes on.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::authorize::{parse_callback, Callback};
use crate::Error;

/// A request head larger than this is not a redirect from our server.
const MAX_HEAD: usize = 16 * 1024;
/// How long one connection may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// The bound listener.
#[derive(Debug)]
pub struct RedirectListener {
    listener: TcpListener,
    port: u16,
}

/// A redirect that reached `/callback`, with the connection to answer on.
#[derive(Debug)]
pub struct Arrival {
    /// The parsed query.
    pub callback: Callback,
    stream: TcpStream,
}

impl RedirectListener {
    /// Binds `127.0.0.1:<port>` (0 = any free port).
    pub async fn bind(port: u16) -> Result<Self, Error> {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .await
            .map_err(|source| Error::Bind { port, source })?;
        let port = listener
            .local_addr()
            .map_err(|source| Error::Bind { port, source })?
            .port();
        Ok(RedirectListener { listener, port })
    }

    /// `http://127.0.0.1:<port>/callback`.
    pub fn redirect_uri(&self) -> String {
        format!("http://127.0.0.1:{}/callback", self.port)
    }

    /// Waits up to `timeout` for a request to `/callback`.
    pub async fn wait(self, timeout: Duration) -> Result<Arrival, Error> {
        let (tx, mut rx) = mpsc::channel::<Arrival>(1);
        let listener = self.listener;
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // accept fails transiently (EMFILE, aborted handshakes);
                    // a pause avoids a hot loop, the deadline ends the wait.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Some(arrival) = read_request(stream).await {
                        let _ = tx.send(arrival).await;
                    }
                });
            }
        });
        let result = tokio::time::timeout(timeout, rx.recv()).await;
        accept.abort();
        match result {
            Ok(Some(arrival)) => Ok(arrival),
            // The sender lives in the aborted loop, so None cannot happen
            // before the deadline; treat it as one anyway.
            Ok(None) | Err(_) => Err(Error::LoginTimeout(timeout.as_secs())),
        }
    }
}

impl Arrival {
    /// Answers the browser with a small page and closes the connection.
    pub async fn respond(mut self, ok: bool, message: &str) {
        let title = if ok { "Signed in" } else { "Sign-in failed" };
        let body = format!(
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{title}</title></head>\
             <body><h1>{title}</h1><p>{}</p></body></html>\n",
            escape_html(message)
        );
        let status = if ok { "200 OK" } else { "400 Bad Request" };
        let _ = write_response(&mut self.stream, status, &body).await;
    }
}

async fn read_request(mut stream: TcpStream) -> Option<Arrival> {
    let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream))
        .await
        .ok()??;
    let target = request_target(&head)?;
    match parse_callback(target) {
        Some(callback) => Some(Arrival { callback, stream }),
        None => {
            let _ = write_response(&mut stream, "404 Not Found", "not found\n").await;
            None
        }
    }
}

/// Reads up to the blank line that ends the request head.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > MAX_HEAD {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(buf).ok()
}

/// The target of a `GET <target> HTTP/1.x` request line.
fn request_target(head: &str) -> Option<&str> {
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    (method == "GET" && version.starts_with("HTTP/1.")).then_some(target)
}

async fn write_response(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n\
         Content-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn escape_html(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".to_owned(),
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '"' => "&quot;".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_line_parsing() {
        assert_eq!(
            request_target("GET /callback?code=1 HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some("/callback?code=1")
        );
        assert_eq!(request_target("POST /callback HTTP/1.1\r\n\r\n"), None);
        assert_eq!(request_target("garbage"), None);
    }

    #[tokio::test]
    async fn stray_requests_get_404_and_the_callback_is_returned() {
        let listener = RedirectListener::bind(0).await.unwrap();
        let uri = listener.redirect_uri();
        let port: u16 = uri
            .trim_start_matches("http://127.0.0.1:")
            .trim_end_matches("/callback")
            .parse()
            .unwrap();
        let waiter = tokio::spawn(listener.wait(Duration::from_secs(30)));

        async fn get(port: u16, target: &str) -> String {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            s.write_all(format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
        // An idle connection must not block the others.
        let _idle = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        assert!(get(port, "/favicon.ico").await.starts_with("HTTP/1.1 404"));

        let answer = tokio::spawn(get(port, "/callback?code=c&state=s"));
        let arrival = waiter.await.unwrap().unwrap();
        assert_eq!(arrival.callback.code.as_deref(), Some("c"));
        arrival
            .respond(true, "Signed in, <you> can close this window")
            .await;
        let page = answer.await.unwrap();
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(page.contains("Signed in, &lt;you&gt; can close this window"));
    }

    #[tokio::test]
    async fn wait_times_out() {
        let listener = RedirectListener::bind(0).await.unwrap();
        let err = listener.wait(Duration::from_millis(50)).await.unwrap_err();
        assert!(matches!(err, Error::LoginTimeout(_)));
    }
}
