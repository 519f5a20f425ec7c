//! Test harness: a store on a fresh SQLite file, or on a real PostgreSQL
//! server that the harness starts itself ([`polydev_controller::pgtemp`]:
//! `initdb` into a temp dir, listening only on a Unix socket in that dir).
//! No test is ever skipped for a missing server: it fails and says how to
//! install one.

#![allow(dead_code)]

pub mod api;
pub mod rig;

use std::path::{Path, PathBuf};

use polydev_controller::pgtemp::PgTemp;
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

/// The throwaway PostgreSQL server (shared with `polydev bench api`), with
/// the panicking calls tests want: a missing server fails the test with
/// the install hint, never skips it.
pub struct Postgres(PgTemp);

impl Postgres {
    pub fn start() -> Postgres {
        Postgres(PgTemp::start().unwrap_or_else(|e| panic!("{e}")))
    }

    /// A fresh database for one test.
    pub async fn create_database(&self) -> String {
        self.0
            .create_database()
            .await
            .unwrap_or_else(|e| panic!("cannot create a test database: {e}"))
    }

    pub fn dir(&self) -> &Path {
        self.0.dir()
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
