//! The test OAuth provider for end-to-end sign-ins: a CA and server
//! certificate made at run time, and `tests/oidc/signin.js`
//! (panva/oidc-provider over real TLS) with its JSON event log. Loopback
//! only; shared by the desktop sign-in tests and `crates/testcli`'s own.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The issuer the tests use; only the CONNECT proxy knows where it is.
pub const ISSUER: &str = "https://auth.polydev.test";
/// The issuer's host name.
pub const ISSUER_HOST: &str = "auth.polydev.test";

/// `tests/oidc` in the workspace.
pub fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc")
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

/// One colour of the sign-in pages as RGB (`#rrggbb` in the JSON).
pub fn colour(name: &str) -> [u8; 3] {
    let all = colours();
    let hex = all
        .get(name)
        .unwrap_or_else(|| panic!("no colour {name:?} in signin-colours.json: {all:?}"));
    let v = u32::from_str_radix(hex.trim_start_matches('#'), 16)
        .unwrap_or_else(|_| panic!("colour {name} is not #rrggbb: {hex}"));
    [(v >> 16) as u8, (v >> 8) as u8, v as u8]
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
    /// Collect `out`'s lines on a thread of their own.
    pub fn collect(self, out: impl std::io::Read + Send + 'static) {
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
