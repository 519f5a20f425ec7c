//! Reusable parts for tests that sign in against `tests/oidc/signin.js`:
//! a run-time PKI, the node server, an HTTP CONNECT proxy that stands in for
//! DNS, and a scripted HTTP "browser" with a cookie jar.
//!
//! Nothing here is a mock: the server is panva/oidc-provider over real TLS,
//! the proxy tunnels real bytes. Everything listens on loopback only.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use reqwest::Url;
use serde_json::Value;

/// The issuer the tests use; only the CONNECT proxy knows where it is.
pub const ISSUER: &str = "https://auth.polydev.test";
/// The issuer's host name.
pub const ISSUER_HOST: &str = "auth.polydev.test";

/// `tests/oidc` in the workspace.
pub fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/oidc")
}

/// Random hex, for passwords and unique names.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("OS random numbers");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// The colours of the sign-in pages, from `tests/oidc/signin-colours.json`.
pub fn colours() -> HashMap<String, String> {
    let text = std::fs::read_to_string(oidc_dir().join("signin-colours.json"))
        .expect("read tests/oidc/signin-colours.json");
    serde_json::from_str(&text).expect("signin-colours.json is a map of names to colours")
}

/// A CA and a server certificate for one host, generated at run time and
/// written as PEM files into a directory.
pub struct Pki {
    /// The CA certificate (what clients trust).
    pub ca_pem: PathBuf,
    /// The server certificate.
    pub cert_pem: PathBuf,
    /// The server's private key (PKCS#8), mode 0600.
    pub key_pem: PathBuf,
}

impl Pki {
    /// Generates a CA and a leaf for `host` into `dir`.
    pub fn generate(dir: &Path, host: &str) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        use std::os::unix::fs::OpenOptionsExt as _;
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(
            DnType::CommonName,
            format!("polydev signin test CA {}", random_hex(4)),
        );
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).expect("self-sign CA");
        let issuer = Issuer::new(ca, ca_key);
        let leaf_key = KeyPair::generate().expect("server key");
        let mut leaf = CertificateParams::new(vec![host.to_owned()]).expect("server params");
        leaf.distinguished_name.push(DnType::CommonName, host);
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).expect("sign server");

        let pki = Pki {
            ca_pem: dir.join("ca.pem"),
            cert_pem: dir.join("server.pem"),
            key_pem: dir.join("server-key.pem"),
        };
        std::fs::write(&pki.ca_pem, ca_cert.pem()).expect("write CA");
        std::fs::write(&pki.cert_pem, leaf_cert.pem()).expect("write server cert");
        let mut key = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pki.key_pem)
            .expect("create server key file");
        std::io::Write::write_all(&mut key, leaf_key.serialize_pem().as_bytes())
            .expect("write server key");
        pki
    }
}

#[derive(Default)]
struct LinesState {
    lines: Vec<String>,
    /// The stream ended: no more lines will come.
    closed: bool,
}

/// Lines a child process printed, shared with the thread reading them.
#[derive(Clone, Default)]
pub struct Lines(Arc<(Mutex<LinesState>, Condvar)>);

impl Lines {
    fn collect(self, out: impl std::io::Read + Send + 'static) {
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let (lock, cv) = &*self.0;
                lock.lock().unwrap().lines.push(line);
                cv.notify_all();
            }
            let (lock, cv) = &*self.0;
            lock.lock().unwrap().closed = true;
            cv.notify_all();
        });
    }

    /// All lines so far.
    pub fn all(&self) -> Vec<String> {
        self.0 .0.lock().unwrap().lines.clone()
    }

    /// Waits until the stream ended (all lines are in), at most `timeout`.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let (lock, cv) = &*self.0;
        let guard = lock.lock().unwrap();
        let (guard, _) = cv
            .wait_timeout_while(guard, timeout, |s| !s.closed)
            .unwrap();
        guard.closed
    }

    /// Waits (without polling) for a line matching `pred`, at most `timeout`.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.0;
        let mut guard = lock.lock().unwrap();
        loop {
            if let Some(l) = guard.lines.iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if guard.closed || now >= deadline {
                return None;
            }
            guard = cv.wait_timeout(guard, deadline - now).unwrap().0;
        }
    }
}

/// `node tests/oidc/signin.js`, stopped with SIGTERM (killed on drop).
pub struct SigninServer {
    child: Child,
    /// Its loopback port.
    pub port: u16,
    /// What it printed on stdout (the `listening` line and JSON events).
    pub stdout: Lines,
    stopped: bool,
}

impl SigninServer {
    /// Starts the server with the given users, PKI and issuer; returns once
    /// it printed its `listening` line. Panics with the `npm ci` command to
    /// run when its dependencies are not installed.
    pub fn start(dir: &Path, pki: &Pki, users: &[(&str, &str)]) -> SigninServer {
        let oidc = oidc_dir();
        assert!(
            oidc.join("node_modules/oidc-provider").is_dir(),
            "tests/oidc/node_modules is missing; run: \
             npm ci --prefix tests/oidc --no-audit --no-fund --cache $HOME/.cache/polydev/npm"
        );
        let users_file = dir.join("users.json");
        let users: serde_json::Map<String, Value> = users
            .iter()
            .map(|(u, p)| ((*u).to_owned(), Value::from(*p)))
            .collect();
        std::fs::write(&users_file, Value::Object(users).to_string()).expect("write users.json");
        let mut child = Command::new("node")
            .arg(oidc.join("signin.js"))
            .args(["--port", "0", "--issuer", ISSUER, "--tls-cert"])
            .arg(&pki.cert_pem)
            .arg("--tls-key")
            .arg(&pki.key_pem)
            .arg("--keys")
            .arg(dir.join("jwks.json"))
            .arg("--users")
            .arg(&users_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start node (is Node.js >= 20 installed?)");
        let stdout = Lines::default();
        stdout
            .clone()
            .collect(child.stdout.take().expect("piped stdout"));
        let mut server = SigninServer {
            child,
            port: 0,
            stdout,
            stopped: false,
        };
        let line = server
            .stdout
            .wait_for(Duration::from_secs(60), |l| l.starts_with("listening "))
            .expect("signin.js printed no `listening` line (see its stderr above)");
        server.port = line
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port in the listening line");
        server
    }

    /// The JSON events logged so far.
    pub fn events(&self) -> Vec<Value> {
        self.stdout
            .all()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for an event named `name` matching `pred`.
    pub fn wait_event(&self, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let line = self
            .stdout
            .wait_for(Duration::from_secs(30), |l| {
                serde_json::from_str::<Value>(l).is_ok_and(|v| v["event"] == name && pred(&v))
            })
            .unwrap_or_else(|| panic!("no {name} event; got {:?}", self.stdout.all()));
        serde_json::from_str(&line).expect("JSON event")
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> ExitStatus {
        self.stopped = true;
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().expect("wait for node")
    }
}

impl Drop for SigninServer {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

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
