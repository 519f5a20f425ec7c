//! A small HTTP/1.1 client for the controller API over loopback (one
//! request per connection), plus a Server-Sent Events reader and the
//! `polydev server`/`polydev up` process and its startup lines.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An answer: status, headers (lower-case names), body.
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Answer {
    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Null` when empty or not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

fn head(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&serde_json::Value>,
) -> (TcpStream, Vec<u8>) {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(120))).ok();
    let body = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = &body {
        req.push_str(&format!(
            "content-type: application/json\r\ncontent-length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend(body.unwrap_or_default());
    (s, bytes)
}

fn read_head(r: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).expect("header line");
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    (status, headers)
}

/// Send one request and read the whole answer (the server closes).
pub fn call(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&serde_json::Value>,
) -> Answer {
    let (mut s, bytes) = head(addr, method, path, headers, body);
    s.write_all(&bytes).expect("send request");
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    let mut body = Vec::new();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).expect("chunk size");
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).expect("chunk");
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_to_end(&mut body).expect("body");
    }
    Answer {
        status,
        headers,
        body,
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// `event:`.
    pub event: String,
    /// `id:`.
    pub id: String,
    /// `data:` as JSON.
    pub data: serde_json::Value,
}

/// Open an SSE stream and collect events until one named `until` (or the
/// stream ends).
pub fn sse_until(addr: &str, path: &str, headers: &[(&str, &str)], until: &str) -> Vec<SseEvent> {
    let mut hs = headers.to_vec();
    hs.push(("accept", "text/event-stream"));
    let (mut s, bytes) = head(addr, "GET", path, &hs, None);
    s.write_all(&bytes).expect("send request");
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    assert_eq!(status, 200, "SSE open: {headers:?}");
    let mut out = Vec::new();
    let (mut ev, mut id, mut data) = (String::new(), String::new(), String::new());
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 {
            return out;
        }
        let l = l.trim_end();
        // Chunk-size lines of the chunked framing are hex digits only;
        // SSE field lines always have a colon.
        if let Some(v) = l.strip_prefix("event:") {
            ev = v.trim().to_string();
        } else if let Some(v) = l.strip_prefix("id:") {
            id = v.trim().to_string();
        } else if let Some(v) = l.strip_prefix("data:") {
            data.push_str(v.trim());
        } else if l.is_empty() && !ev.is_empty() {
            let e = SseEvent {
                event: std::mem::take(&mut ev),
                id: std::mem::take(&mut id),
                data: serde_json::from_str(&std::mem::take(&mut data))
                    .unwrap_or(serde_json::Value::Null),
            };
            let done = e.event == until;
            out.push(e);
            if done {
                return out;
            }
        }
    }
}

/// From the stderr of `polydev server`/`up`: the API address
/// (`controller API on http://ADDR/api/v1 …`) and the first-start login
/// link token, if printed.
pub fn startup_lines(stderr: &str) -> (Option<String>, Option<String>) {
    let addr = stderr.lines().find_map(|l| {
        l.split("controller API on http://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .map(str::to_string)
    });
    let link = stderr
        .lines()
        .find_map(|l| l.split("/#/link/").nth(1).map(|t| t.trim().to_string()));
    (addr, link)
}

/// A `polydev server` or `polydev up` under test: its output goes to a log
/// file in its data directory; killed when dropped.
pub struct ApiProcess {
    child: Child,
    log: PathBuf,
}

impl ApiProcess {
    /// Start `polydev --data-dir DATA <args>` logging to `DATA/<log>`, then
    /// poll the log until `ready` gives a value (what the caller needs of
    /// the startup lines). Panics with the log when the process exits
    /// first or `timeout` passes.
    pub fn start<T>(
        data: &Path,
        args: &[&str],
        log: &str,
        timeout: Duration,
        mut ready: impl FnMut(&str) -> Option<T>,
    ) -> (ApiProcess, T) {
        let log = data.join(log);
        let f = std::fs::File::create(&log).expect("log file");
        let child = Command::new(crate::polydev_bin())
            .arg("--data-dir")
            .arg(data)
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log file"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", crate::polydev_bin().display()));
        let mut p = ApiProcess { child, log };
        let deadline = Instant::now() + timeout;
        loop {
            let text = p.text();
            if let Some(v) = ready(&text) {
                return (p, v);
            }
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!("polydev {args:?} exited early ({st}): {text}");
            }
            assert!(
                Instant::now() < deadline,
                "polydev {args:?} did not come up: {text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything it logged so far.
    pub fn text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// SIGTERM, then its exit code (it must exit within a minute).
    pub fn stop(mut self) -> i32 {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "polydev ignored SIGTERM: {}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ApiProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `polydev up` on `data` listening on a free loopback port, logging to
/// `log` under `data`: the process, the API address and the first-start
/// login link if one was printed (the "recovery done" line ends startup).
pub fn start_up(data: &Path, log: &str) -> (ApiProcess, String, Option<String>) {
    let (up, (addr, link)) = ApiProcess::start(
        data,
        &["up", "--listen", "127.0.0.1:0"],
        log,
        Duration::from_secs(180),
        |text| match startup_lines(text) {
            (Some(addr), link) if text.contains("driver: recovery done") => Some((addr, link)),
            _ => None,
        },
    );
    (up, addr, link)
}

/// Log in with a one-time login `link` (the session cookie, `name=value`).
pub fn redeem_link(addr: &str, link: &str) -> String {
    let r = call(
        addr,
        "GET",
        &format!("/api/v1/auth/link?token={link}"),
        &[],
        None,
    );
    assert_eq!(r.status, 200, "login link: {:?}", r.json());
    r.header("set-cookie")
        .and_then(|c| c.split(';').next())
        .expect("session cookie")
        .to_string()
}

/// A new API token with `scopes`, made with the session `cookie`.
pub fn make_token(addr: &str, cookie: &str, name: &str, scopes: &[&str]) -> String {
    let r = call(
        addr,
        "POST",
        "/api/v1/tokens",
        &[("cookie", cookie)],
        Some(&serde_json::json!({ "name": name, "scopes": scopes })),
    );
    assert_eq!(r.status, 201, "token: {:?}", r.json());
    r.json()["token"].as_str().expect("token").to_string()
}

/// An account `name` made by the administrator (session `admin_cookie`),
/// logged in: its session cookie (`name=value`).
pub fn new_user(addr: &str, admin_cookie: &str, name: &str) -> String {
    let pw = format!(
        "pw-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let body = serde_json::json!({ "name": name, "password": pw });
    let r = call(
        addr,
        "POST",
        "/api/v1/admin/users",
        &[("cookie", admin_cookie)],
        Some(&body),
    );
    assert_eq!(r.status, 201, "create {name}: {:?}", r.json());
    let r = call(addr, "POST", "/api/v1/auth/login", &[], Some(&body));
    assert_eq!(r.status, 200, "log in as {name}: {:?}", r.json());
    r.header("set-cookie")
        .and_then(|c| c.split(';').next())
        .expect("session cookie")
        .to_string()
}

/// Read terminal output until it contains `want` (or the stream ends).
pub fn read_until(ws: &mut tungstenite::WebSocket<std::net::TcpStream>, want: &str) -> String {
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains(want) {
        match ws.read() {
            Ok(tungstenite::Message::Binary(b)) => out.extend_from_slice(&b),
            Ok(tungstenite::Message::Close(c)) => {
                panic!(
                    "terminal closed ({c:?}) before {want:?}: {}",
                    String::from_utf8_lossy(&out)
                )
            }
            Ok(_) => {}
            Err(e) => panic!(
                "terminal read before {want:?}: {e}: {}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Open a WebSocket at `path`: the upgrade's status, and on 101 the
/// connection.
pub fn websocket(
    addr: &str,
    path: &str,
) -> Result<tungstenite::WebSocket<std::net::TcpStream>, u16> {
    let url = format!("ws://{addr}{path}");
    let stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(300))).ok();
    match tungstenite::client::client(url, stream) {
        Ok((ws, resp)) => {
            assert_eq!(resp.status(), 101);
            Ok(ws)
        }
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
            Err(r.status().as_u16())
        }
        Err(e) => panic!("WebSocket handshake: {e}"),
    }
}

/// A caller of the controller's API with a bearer token.
pub struct Client {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The `authorization` header's value.
    pub auth: String,
}

impl Client {
    /// A client of the API at `addr` with bearer `token`.
    pub fn bearer(addr: &str, token: &str) -> Self {
        Client {
            addr: addr.to_string(),
            auth: format!("Bearer {token}"),
        }
    }

    /// One request, its JSON `body` if any.
    pub fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> Answer {
        call(
            &self.addr,
            method,
            path,
            &[("authorization", &self.auth)],
            body.as_ref(),
        )
    }

    /// Poll `path` (every 200 ms, at most `limit`) until `pred` holds of
    /// its JSON; the last answer.
    pub fn wait(
        &self,
        path: &str,
        what: &str,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.call("GET", path, None).json();
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{what}: {v}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Poll VM `id` until its state is `want` (failing at once if it ends,
    /// or after `limit`).
    pub fn wait_vm(&self, id: &str, want: &str, limit: Duration) -> serde_json::Value {
        self.wait(
            &format!("/api/v1/vms/{id}"),
            &format!("VM {id} not {want}"),
            limit,
            |v| {
                assert!(v["done"] != true, "VM {id} ended: {v}");
                v["state"] == want
            },
        )
    }
}
