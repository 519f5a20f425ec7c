//! Test harness: a store on a fresh SQLite file, or on a real PostgreSQL
//! server that the harness starts itself (Debian's `postgresql` package:
//! `initdb` into a temp dir, listening only on a Unix socket in that dir).
//! No test is ever skipped for a missing server: it fails and says how to
//! install one.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use polydev_controller::store::Store;

/// Which database a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A store plus whatever keeps its database alive; dropped last.
pub struct TestDb {
    pub store: Store,
    pub url: String,
    /// SQLite file, for tests that read it raw.
    pub sqlite_path: Option<PathBuf>,
    _pg: Option<Postgres>,
    _dir: tempfile::TempDir,
}

impl TestDb {
    pub async fn open(backend: Backend) -> TestDb {
        let dir = tempfile::tempdir().expect("tempdir");
        match backend {
            Backend::Sqlite => {
                let path = dir.path().join("controller.db");
                let url = format!("sqlite://{}", path.display());
                let store = Store::open(&url).await.expect("open sqlite store");
                TestDb {
                    store,
                    url,
                    sqlite_path: Some(path),
                    _pg: None,
                    _dir: dir,
                }
            }
            Backend::Postgres => {
                let pg = Postgres::start();
                let url = pg.create_database().await;
                let store = Store::open(&url).await.expect("open postgres store");
                TestDb {
                    store,
                    url,
                    sqlite_path: None,
                    _pg: Some(pg),
                    _dir: dir,
                }
            }
        }
    }

    /// URL of another, empty database on the same backend (never migrated).
    pub async fn fresh_url(&self) -> String {
        match &self._pg {
            Some(pg) => pg.create_database().await,
            None => {
                let mut b = [0u8; 6];
                getrandom::fill(&mut b).unwrap();
                format!(
                    "sqlite://{}/{}.db",
                    self._dir.path().display(),
                    hex::encode(b)
                )
            }
        }
    }

    /// Open the same database again (as a restarted controller would).
    pub async fn reopen(&self) -> Store {
        Store::open(&self.url).await.expect("reopen store")
    }
}

/// Run one async test body against both backends.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name(common::TestDb::open(common::Backend::Sqlite).await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$name(common::TestDb::open(common::Backend::Postgres).await).await
            }
        }
    )*};
}

/// A private PostgreSQL server in a temp dir, killed and removed on drop.
pub struct Postgres {
    child: Child,
    dir: tempfile::TempDir,
    socket_dir: PathBuf,
}

const HOW_TO_INSTALL: &str = "PostgreSQL server binaries (initdb, postgres) not found in \
$POLYDEV_PG_BINDIR or /usr/lib/postgresql/<version>/bin: run `./polydev.sh setup` \
(installs Debian's `postgresql` package) or `apt-get install postgresql`";

fn pg_bindir() -> PathBuf {
    if let Ok(d) = std::env::var("POLYDEV_PG_BINDIR") {
        let d = PathBuf::from(d);
        assert!(d.join("initdb").exists(), "{HOW_TO_INSTALL}");
        return d;
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
    found.pop().map(|(_, b)| b).expect(HOW_TO_INSTALL)
}

/// (uid, gid) of the `postgres` system user: PostgreSQL refuses to run as root.
fn postgres_ids() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    let line = passwd.lines().find(|l| l.starts_with("postgres:")).expect(
        "running as root needs the `postgres` system user (created by Debian's postgresql package)",
    );
    let f: Vec<&str> = line.split(':').collect();
    Some((f[2].parse().unwrap(), f[3].parse().unwrap()))
}

fn as_pg_user(cmd: &mut Command, ids: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = ids {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

impl Postgres {
    pub fn start() -> Postgres {
        let bindir = pg_bindir();
        let ids = postgres_ids();
        let dir = tempfile::tempdir().expect("tempdir");
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown pg dir");
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
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
            .expect(HOW_TO_INSTALL);
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let socket_dir = dir.path().to_path_buf();
        let log = std::fs::File::create(dir.path().join("postgres.log")).unwrap();
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(dir.path().join("postgres.log"), Some(uid), Some(gid))
                .unwrap();
        }
        let mut cmd = Command::new(bindir.join("postgres"));
        as_pg_user(&mut cmd, ids)
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&socket_dir)
            // Unix socket only: no TCP port to collide with other tests.
            .args(["-c", "listen_addresses=", "-F", "-c", "max_connections=60"])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe. The server dies with this test
        // process even on SIGKILL (set after the uid change, which would
        // otherwise clear it).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect(HOW_TO_INSTALL);
        let pg = Postgres {
            child,
            dir,
            socket_dir,
        };
        pg.wait_ready();
        pg
    }

    fn wait_ready(&self) {
        let sock = self.socket_dir.join(".s.PGSQL.5432");
        let t0 = Instant::now();
        while !sock.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "postgres did not start: {}",
                std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@localhost/{db}?host={}&port=5432",
            self.socket_dir.display()
        )
    }

    /// A fresh database for one test.
    pub async fn create_database(&self) -> String {
        use sqlx::Connection;
        let mut b = [0u8; 6];
        getrandom::fill(&mut b).unwrap();
        let name = format!("t_{}", hex::encode(b));
        let t0 = Instant::now();
        let mut conn = loop {
            // The socket appears slightly before the server accepts logins.
            match sqlx::PgConnection::connect(&self.url("postgres")).await {
                Ok(c) => break c,
                Err(e) if t0.elapsed() < Duration::from_secs(30) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot connect to test postgres: {e}"),
            }
        };
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        self.url(&name)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGQUIT = immediate shutdown; the data dir is thrown away anyway.
        // SAFETY: signalling our own child by pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGQUIT);
        }
        let _ = self.child.wait();
    }
}

/// Every file in `dir` (a SQLite database's folder) with its bytes, for
/// tests that check what is stored at rest. A file SQLite removed while we
/// listed (`-wal`/`-shm` as the last connection closes: their content is
/// then in the main file, which is read too) is skipped.
pub fn files_in(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        match std::fs::read(&p) {
            Ok(b) => out.push((p, b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{}: {e}", p.display()),
        }
    }
    out
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
