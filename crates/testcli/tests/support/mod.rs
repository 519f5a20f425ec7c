//! Reusable parts for tests that sign in against `tests/oidc/signin.js`:
//! the run-time PKI and the node server (shared with the desktop e2e tests
//! in `polydev_e2e::oauth`), an HTTP CONNECT proxy that stands in for DNS,
//! and a scripted HTTP "browser" with a cookie jar.
//!
//! Nothing here is a mock: the server is panva/oidc-provider over real TLS,
//! the proxy tunnels real bytes. Everything listens on loopback only.

#![allow(dead_code)] // Each test binary uses a different subset.

pub use polydev_e2e::oauth::*;

use std::collections::HashMap;
use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Url;

/// An HTTP CONNECT proxy on 127.0.0.1 that maps host:port names to loopback
/// addresses, as the VM's egress shim and its upstream would. Upstream
/// connections come from `source` (e.g. 127.0.0.2), so the server's logged
/// peer address shows they came through this proxy.
pub struct ConnectProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    targets: Arc<Mutex<Vec<String>>>,
}

impl ConnectProxy {
    /// Starts the proxy on its own thread and runtime.
    pub fn start(routes: HashMap<String, SocketAddr>, source: IpAddr) -> ConnectProxy {
        let listener =
            std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind CONNECT proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy address");
        let targets = Arc::new(Mutex::new(Vec::new()));
        let seen = targets.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                let routes = Arc::new(routes);
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    let (routes, seen) = (routes.clone(), seen.clone());
                    tokio::spawn(async move {
                        let _ = tunnel(client, &routes, &seen, source).await;
                    });
                }
            });
        });
        ConnectProxy { addr, targets }
    }

    /// `http://127.0.0.1:<port>`, for `HTTPS_PROXY`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The CONNECT targets asked for so far.
    pub fn targets(&self) -> Vec<String> {
        self.targets.lock().unwrap().clone()
    }
}

async fn tunnel(
    mut client: tokio::net::TcpStream,
    routes: &HashMap<String, SocketAddr>,
    seen: &Mutex<Vec<String>>,
    source: IpAddr,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: nothing after the head may be consumed before the
    // tunnel is up (the client waits for 200 anyway).
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 || client.read(&mut byte).await? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut words = head.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (words.next(), words.next()) else {
        client
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    seen.lock().unwrap().push(target.to_owned());
    let Some(upstream_addr) = routes.get(target) else {
        client
            .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let mut upstream = socket.connect(*upstream_addr).await?;
    client
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// One HTTP answer as the browser saw it.
#[derive(Debug)]
pub struct Page {
    /// The URL requested.
    pub url: Url,
    /// Its status.
    pub status: u16,
    /// Its `Location`, resolved against `url`.
    pub location: Option<Url>,
    /// Its body.
    pub body: String,
}

impl Page {
    /// The `action` of the form that holds the element with `id`, resolved.
    pub fn form_action(&self, id: &str) -> Url {
        let at = self
            .body
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("no #{id} on {}: {}", self.url, self.body));
        let form = self.body[..at]
            .rfind("<form")
            .unwrap_or_else(|| panic!("#{id} is in no form"));
        let rest = &self.body[form..];
        let start = rest.find("action=\"").expect("form action") + "action=\"".len();
        let end = rest[start..].find('"').expect("end of action") + start;
        self.url.join(&rest[start..end]).expect("action URL")
    }
}

/// A scripted browser: HTTPS through the CONNECT proxy trusting the test
/// CA, plain HTTP to loopback directly (as a browser reaches the CLI's
/// redirect listener), cookies kept per name and path, redirects followed
/// one at a time so each hop can be asserted.
pub struct Browser {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    /// (name, path) → value.
    cookies: HashMap<(String, String), String>,
}

impl Browser {
    /// A browser behind `proxy` trusting `ca_pem`.
    pub fn new(proxy: &ConnectProxy, ca_pem: &Path) -> Browser {
        let ca = std::fs::read(ca_pem).expect("read CA");
        let client = reqwest::Client::builder()
            .no_proxy()
            .proxy(reqwest::Proxy::https(proxy.url()).expect("proxy URL"))
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA PEM"))
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .expect("browser client");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("browser runtime");
        Browser {
            rt,
            client,
            cookies: HashMap::new(),
        }
    }

    fn cookie_header(&self, url: &Url) -> Option<String> {
        let pairs: Vec<String> = self
            .cookies
            .iter()
            .filter(|((_, path), _)| url.path().starts_with(path.as_str()))
            .map(|((name, _), value)| format!("{name}={value}"))
            .collect();
        (!pairs.is_empty()).then(|| pairs.join("; "))
    }

    fn store_cookies(&mut self, url: &Url, headers: &reqwest::header::HeaderMap) {
        for h in headers.get_all(reqwest::header::SET_COOKIE) {
            let Ok(h) = h.to_str() else { continue };
            let mut parts = h.split(';').map(str::trim);
            let Some((name, value)) = parts.next().and_then(|nv| nv.split_once('=')) else {
                continue;
            };
            let mut path = url
                .path()
                .rsplit_once('/')
                .map_or("/", |(d, _)| d)
                .to_owned();
            let mut expired = value.is_empty();
            for attr in parts {
                // Attribute names are case-insensitive, their values not.
                let (key, val) = attr.split_once('=').unwrap_or((attr, ""));
                match key.to_ascii_lowercase().as_str() {
                    "path" => path = val.to_owned(),
                    "max-age" if val == "0" => expired = true,
                    "expires" if val.contains("1970") => expired = true,
                    _ => {}
                }
            }
            if path.is_empty() {
                path = "/".to_owned();
            }
            let key = (name.to_owned(), path);
            if expired {
                self.cookies.remove(&key);
            } else {
                self.cookies.insert(key, value.to_owned());
            }
        }
    }

    fn send(&mut self, url: Url, form: Option<&[(&str, &str)]>) -> Page {
        let mut req = match form {
            Some(f) => self.client.post(url.clone()).form(f),
            None => self.client.get(url.clone()),
        };
        if let Some(c) = self.cookie_header(&url) {
            req = req.header(reqwest::header::COOKIE, c);
        }
        let resp = self
            .rt
            .block_on(async { req.send().await })
            .unwrap_or_else(|e| panic!("browser request to {url}: {e:?}"));
        let status = resp.status().as_u16();
        self.store_cookies(&url, resp.headers());
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| url.join(l).ok());
        let body = self
            .rt
            .block_on(async { resp.text().await })
            .expect("response body");
        Page {
            url,
            status,
            location,
            body,
        }
    }

    /// GET without following redirects.
    pub fn get(&mut self, url: &Url) -> Page {
        self.send(url.clone(), None)
    }

    /// POST a form without following redirects.
    pub fn post(&mut self, url: &Url, form: &[(&str, &str)]) -> Page {
        self.send(url.clone(), Some(form))
    }

    /// Follows `page`'s redirects (at most 10) and returns the last page.
    pub fn follow(&mut self, mut page: Page) -> Page {
        for _ in 0..10 {
            match (page.status, page.location.clone()) {
                (300..=399, Some(next)) => page = self.get(&next),
                _ => return page,
            }
        }
        panic!("too many redirects, last {}", page.url);
    }
}

/// A running `polydev-testcli`, with its stdout read line by line.
pub struct RunningCli {
    pid: u32,
    /// Its stdout.
    pub stdout: Lines,
    exit: mpsc::Receiver<(ExitStatus, String)>,
    exited: Arc<AtomicBool>,
}

impl RunningCli {
    /// Spawns `cmd` (stdout and stderr piped).
    pub fn spawn(mut cmd: Command) -> RunningCli {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start polydev-testcli");
        let stdout = Lines::default();
        stdout.clone().collect(child.stdout.take().expect("stdout"));
        let mut stderr = child.stderr.take().expect("stderr");
        let (tx, exit) = mpsc::channel();
        let exited = Arc::new(AtomicBool::new(false));
        let flag = exited.clone();
        let pid = child.id();
        std::thread::spawn(move || {
            let mut err = String::new();
            let _ = stderr.read_to_string(&mut err);
            let status = child.wait().expect("wait for polydev-testcli");
            flag.store(true, Ordering::SeqCst);
            let _ = tx.send((status, err));
        });
        RunningCli {
            pid,
            stdout,
            exit,
            exited,
        }
    }

    /// Waits for the exit: (exit code, stderr); stdout is complete then.
    pub fn wait(self, timeout: Duration) -> (i32, String) {
        let (status, err) = self
            .exit
            .recv_timeout(timeout)
            .unwrap_or_else(|_| panic!("polydev-testcli still running after {timeout:?}"));
        assert!(
            self.stdout.wait_closed(timeout),
            "polydev-testcli exited but its stdout stayed open"
        );
        (status.code().unwrap_or(-1), err)
    }
}

impl Drop for RunningCli {
    fn drop(&mut self) {
        if !self.exited.load(Ordering::SeqCst) {
            // SAFETY: kill(2) on our child; its waiter has not reaped it.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
    }
}
