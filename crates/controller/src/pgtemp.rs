//! A throwaway PostgreSQL server for tests and benchmarks.
//!
//! [`PgTemp::start`] runs Debian's `postgresql` server binaries (`initdb`,
//! `postgres`) into a fresh temp dir, listening only on a Unix socket in
//! that dir (no TCP port, so parallel users never collide), with `trust`
//! authentication for the `postgres` role. When running as root the server
//! runs as the `postgres` system user (PostgreSQL refuses root). Dropping
//! the [`PgTemp`] stops the server (immediate shutdown) and removes the dir;
//! the server also dies with this process, even on SIGKILL (it is spawned
//! from a keeper thread that lives as long as the [`PgTemp`], so the caller
//! may start it from any thread, `spawn_blocking` included).
//!
//! The binaries are looked up in `$POLYDEV_PG_BINDIR`, else the newest
//! `/usr/lib/postgresql/<version>/bin`; when missing, [`PgTempError::NotInstalled`]
//! says how to install them. Never used by the controller itself: shared by
//! the controller's test harness and `polydev bench api`.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How to get the server binaries when they are missing.
pub const HOW_TO_INSTALL: &str = "PostgreSQL server binaries (initdb, postgres) not found in \
$POLYDEV_PG_BINDIR or /usr/lib/postgresql/<version>/bin: run `./polydev.sh setup` \
(installs Debian's `postgresql` package) or `apt-get install postgresql`";

/// How long the server may take to open its socket and accept logins.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a throwaway server could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum PgTempError {
    /// `initdb`/`postgres` are not installed.
    #[error("{HOW_TO_INSTALL}")]
    NotInstalled,
    /// Running as root without a `postgres` system user to run the server as.
    #[error(
        "running as root needs the `postgres` system user (created by Debian's postgresql \
         package): {0}"
    )]
    NoPostgresUser(String),
    /// Creating, chowning or reading the server's files failed.
    #[error("postgres temp dir: {0}")]
    Io(#[from] std::io::Error),
    /// `initdb` exited with an error.
    #[error("initdb failed: {0}")]
    Initdb(String),
    /// The server did not become ready in time; the text is its log.
    #[error("postgres did not start within {READY_TIMEOUT:?}: {0}")]
    NotReady(String),
    /// Connecting or creating a database failed.
    #[error("throwaway postgres: {0}")]
    Sql(#[from] sqlx::Error),
}

/// A private PostgreSQL server in a temp dir, killed and removed on drop.
pub struct PgTemp {
    /// Dropping it tells the keeper thread to stop the server.
    stop: Option<mpsc::Sender<()>>,
    /// The thread that spawned the server and waits to stop it.
    keeper: Option<std::thread::JoinHandle<()>>,
    dir: tempfile::TempDir,
}

/// Spawn the server from a thread of our own that lives until the
/// [`PgTemp`] is dropped. `PR_SET_PDEATHSIG` fires when the *thread* that
/// spawned the child exits, not the process: spawned from a caller's
/// short-lived thread (tokio's `spawn_blocking` pool retires idle threads
/// after 10 s) the server would be killed mid-use.
fn spawn_keeper(
    mut cmd: Command,
) -> Result<(mpsc::Sender<()>, std::thread::JoinHandle<()>), PgTempError> {
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let (spawned_tx, spawned_rx) = mpsc::channel::<std::io::Result<()>>();
    let keeper = std::thread::Builder::new()
        .name("pgtemp".into())
        .spawn(move || {
            let mut child: Child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    let _ = spawned_tx.send(Err(e));
                    return;
                }
            };
            let _ = spawned_tx.send(Ok(()));
            // Returns when the PgTemp drops its sender.
            let _ = stop_rx.recv();
            // SIGQUIT = immediate shutdown; the data dir is thrown away anyway.
            // SAFETY: signalling our own child by pid.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGQUIT);
            }
            let _ = child.wait();
        })?;
    match spawned_rx.recv() {
        Ok(Ok(())) => Ok((stop_tx, keeper)),
        Ok(Err(e)) => {
            let _ = keeper.join();
            Err(e.into())
        }
        Err(_) => {
            let _ = keeper.join();
            Err(std::io::Error::other("pgtemp keeper thread ended early").into())
        }
    }
}

/// The directory holding `initdb` and `postgres`.
pub fn bindir() -> Result<PathBuf, PgTempError> {
    if let Ok(d) = std::env::var("POLYDEV_PG_BINDIR") {
        let d = PathBuf::from(d);
        return if d.join("initdb").exists() {
            Ok(d)
        } else {
            Err(PgTempError::NotInstalled)
        };
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).ok_or(PgTempError::NotInstalled)
}

/// (uid, gid) of the `postgres` system user when we are root (PostgreSQL
/// refuses to run as root); `None` when not root.
fn postgres_ids() -> Result<Option<(u32, u32)>, PgTempError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .ok_or_else(|| PgTempError::NoPostgresUser("no such user in /etc/passwd".into()))?;
    let f: Vec<&str> = line.split(':').collect();
    match (
        f.get(2).and_then(|s| s.parse().ok()),
        f.get(3).and_then(|s| s.parse().ok()),
    ) {
        (Some(uid), Some(gid)) => Ok(Some((uid, gid))),
        _ => Err(PgTempError::NoPostgresUser(format!(
            "unreadable /etc/passwd line {line:?}"
        ))),
    }
}

fn as_pg_user(cmd: &mut Command, ids: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = ids {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

impl PgTemp {
    /// Run `initdb` and start the server; returns once its socket exists.
    /// Blocking (runs `initdb`, polls for the socket): call it from
    /// `spawn_blocking` on a busy runtime.
    pub fn start() -> Result<PgTemp, PgTempError> {
        let bindir = bindir()?;
        let ids = postgres_ids()?;
        let dir = tempfile::Builder::new().prefix("pgtemp").tempdir()?;
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        }
        let data = dir.path().join("data");
        let out = as_pg_user(&mut Command::new(bindir.join("initdb")), ids)
            .args([
                "--no-sync",
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-instructions",
                "-D",
            ])
            .arg(&data)
            .current_dir(dir.path())
            .output()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => PgTempError::NotInstalled,
                _ => PgTempError::Io(e),
            })?;
        if !out.status.success() {
            return Err(PgTempError::Initdb(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        let log_path = dir.path().join("postgres.log");
        let log = std::fs::File::create(&log_path)?;
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(&log_path, Some(uid), Some(gid))?;
        }
        let mut cmd = Command::new(bindir.join("postgres"));
        as_pg_user(&mut cmd, ids)
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(dir.path())
            // Unix socket only: no TCP port to collide with other users.
            // max_connections: enough for several stores (16 each) at once.
            .args(["-c", "listen_addresses=", "-F", "-c", "max_connections=60"])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe. The server dies with its
        // spawning (keeper) thread, so with this process even on SIGKILL
        // (set after the uid change, which would otherwise clear it).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let (stop, keeper) = spawn_keeper(cmd)?;
        let pg = PgTemp {
            stop: Some(stop),
            keeper: Some(keeper),
            dir,
        };
        pg.wait_socket()?;
        Ok(pg)
    }

    fn wait_socket(&self) -> Result<(), PgTempError> {
        let sock = self.dir.path().join(".s.PGSQL.5432");
        let t0 = Instant::now();
        while !sock.exists() {
            if t0.elapsed() > READY_TIMEOUT {
                return Err(PgTempError::NotReady(self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The server's log so far (for error messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// The URL of database `db` on this server (role `postgres`, no password).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@localhost/{db}?host={}&port=5432",
            self.dir.path().display()
        )
    }

    /// Create a fresh, empty database with a random name; returns its URL.
    /// Waits (up to 30 s) for the server to accept logins: its socket
    /// appears slightly before it does.
    pub async fn create_database(&self) -> Result<String, PgTempError> {
        use sqlx::Connection;
        let mut b = [0u8; 6];
        getrandom::fill(&mut b).map_err(|e| std::io::Error::other(e.to_string()))?;
        let name = format!("t_{}", hex::encode(b));
        let t0 = Instant::now();
        let mut conn = loop {
            match sqlx::PgConnection::connect(&self.url("postgres")).await {
                Ok(c) => break c,
                Err(_) if t0.elapsed() < READY_TIMEOUT => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        Ok(self.url(&name))
    }

    /// The server's temp dir (data dir, socket and log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgTemp {
    fn drop(&mut self) {
        // The keeper stops the server and reaps it; the temp dir goes after.
        drop(self.stop.take());
        if let Some(k) = self.keeper.take() {
            let _ = k.join();
        }
    }
}
