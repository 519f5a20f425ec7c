//! The store: the controller's system of record on SQLite or PostgreSQL.
//!
//! One code path for both through sqlx's `Any` driver: the SQL is portable
//! (`$n` parameters work on SQLite too), timestamps are BIGINT milliseconds,
//! and the few dialect differences live in the migration files. Every state
//! change of a VM or session is an optimistic compare-and-swap on the row's
//! `version` plus an `events` row, in one transaction.

mod census;
mod custody;
mod listing;
mod migrate;
mod runs;
mod sessions;
mod upstream;
mod vms;
mod write_tx;

pub use write_tx::WriteTx;

use std::path::Path;
use std::str::FromStr;

use serde_json::json;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{AnyPool, ConnectOptions, Connection};

use crate::state::{Failure, FailureReason, Lifecycle, SessionState, UnknownState, VmState};
use crate::util::{new_id, now_ms, RandomError};
use crate::vault::SealedRecord;

pub use census::Records;
pub use custody::{CustodyTarget, Refreshed, STATUS_NEEDS_LOGIN, STATUS_OK};
pub use listing::CredentialInfo;
pub use migrate::latest_version;
pub use runs::{NewRun, NewRunEvent, Run, RunEvent, RunState, RunStep};
pub use upstream::{Assignment, Quarantined, UpstreamError, UpstreamStats};

/// Errors of the store. Messages name what to do where there is something to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL is neither `sqlite:` nor `postgres:`.
    #[error("unsupported database URL {0:?}: use sqlite://<path> or postgres://user@host/db")]
    UnsupportedUrl(String),
    /// Could not open or create the database.
    #[error("cannot open database {url}: {source}")]
    Open {
        /// The URL with any password removed.
        url: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The database's directory or file could not be made private.
    #[error("cannot prepare {path} (mode 0700 for the directory, 0600 for the database): {source}; check that the data directory belongs to this user")]
    Files {
        /// The path involved.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The database was migrated by a newer controller.
    #[error("database schema version {database} is newer than this binary's {binary}: run the newer polydev, or restore a backup taken before the upgrade")]
    SchemaTooNew {
        /// Newest version recorded in the database.
        database: i64,
        /// Newest version this binary knows.
        binary: i64,
    },
    /// The database records a migration this binary does not ship.
    #[error("database records migration {version}, which this binary does not know: it was migrated by a different build")]
    MigrationUnknown {
        /// The unknown version.
        version: i64,
    },
    /// A shipped migration file differs from the one that was applied.
    #[error("migration {version} ({name}) differs from the one applied to this database: migrations must never be edited after release")]
    MigrationChanged {
        /// The version.
        version: i64,
        /// Its name.
        name: &'static str,
    },
    /// Applying a migration failed; nothing of it was kept.
    #[error("applying migration {version} ({name}) failed: {source}")]
    Migrate {
        /// The version.
        version: i64,
        /// Its name.
        name: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// No such record.
    #[error("{kind} {id} not found")]
    NotFound {
        /// Table-level kind (`vm`, `session`, `user`, `credential`).
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// The state machine does not allow this step.
    #[error("{machine} {id}: transition {from} -> {to} is not allowed")]
    InvalidTransition {
        /// `vm` or `session`.
        machine: &'static str,
        /// Record id.
        id: String,
        /// Current state.
        from: &'static str,
        /// Requested state.
        to: &'static str,
    },
    /// A failure reason was missing for the failed state, or given for another.
    #[error("{machine} {id}: a failure reason is required for, and only for, the failed state (to {to})")]
    FailureMismatch {
        /// `vm` or `session`.
        machine: &'static str,
        /// Record id.
        id: String,
        /// Requested state.
        to: &'static str,
    },
    /// Someone else changed the record since it was read; re-read and decide again.
    #[error(
        "{kind} {id} changed concurrently (expected version {expected}); re-read it and retry"
    )]
    Conflict {
        /// `vm`, `session` or `credential`.
        kind: &'static str,
        /// Record id.
        id: String,
        /// The version the caller had.
        expected: i64,
    },
    /// A row holds a value the code does not know (hand-edited or newer data).
    #[error("corrupt row in {table}: {detail}")]
    Corrupt {
        /// Table.
        table: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// A unique constraint refused a duplicate.
    #[error("{what} already exists")]
    Duplicate {
        /// What was duplicated.
        what: String,
    },
    /// The user already has as many active (not final) connect sessions
    /// as one user may have at once.
    #[error("user {user_id} already has {} active connect session(s) ({}); at most {limit} may run at once: wait for one to finish, or cancel it", active.len(), active.join(", "))]
    SessionLimit {
        /// The user.
        user_id: String,
        /// Sessions one user may have at once.
        limit: usize,
        /// The user's active sessions, oldest first.
        active: Vec<String>,
    },
    /// The user already has as many prompt runs queued or running as one
    /// user may have at once.
    #[error("you already have {} prompt run(s) queued or running ({}); at most {limit} may run at once: wait for one to finish, or cancel it", active.len(), active.join(", "))]
    RunLimit {
        /// Runs one user may have at once.
        limit: usize,
        /// The user's active runs, oldest first.
        active: Vec<String>,
    },
    /// Random id generation failed.
    #[error(transparent)]
    Random(#[from] RandomError),
    /// Any other database error.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

impl From<UnknownState> for StoreError {
    fn from(e: UnknownState) -> Self {
        StoreError::Corrupt {
            table: e.machine,
            detail: e.to_string(),
        }
    }
}

/// Which SQL dialect a store speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// Embedded SQLite (WAL), the single-host default.
    Sqlite,
    /// PostgreSQL, for a fleet.
    Postgres,
}

impl Dialect {
    /// Name used in migration `-- dialect:` blocks.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgres",
        }
    }
}

/// SQLITE_BUSY (any extended code of it).
fn sqlite_busy(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => d
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| c & 0xff == 5),
        _ => false,
    }
}

/// Strip the password from a URL before it goes into an error or a log.
fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((auth, host)) = rest.split_once('@') {
            let user = auth.split(':').next().unwrap_or("");
            return format!("{scheme}://{user}:***@{host}");
        }
    }
    url.to_string()
}

/// A user account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// `usr-…`.
    pub id: String,
    /// Unique login name.
    pub name: String,
    /// `user` or `admin`.
    pub role: String,
    /// Creation time (ms).
    pub created_at: i64,
}

/// Lifecycle bookkeeping shared by VMs and sessions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Life<S> {
    /// Current state.
    pub state: S,
    /// When it was entered (ms).
    pub state_since: i64,
    /// When the state times out (ms), if it does.
    pub deadline_at: Option<i64>,
    /// Entries into the state machine's retried state so far.
    pub attempts: u32,
    /// Why it failed, in the failed state.
    pub failure: Option<Failure>,
    /// Row version; bumps on every change (the compare-and-swap token).
    pub version: i64,
}

/// Kind of VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmKind {
    /// Ephemeral desktop for a login.
    Browser,
    /// The user's persistent CLI VM.
    Cli,
}

impl VmKind {
    /// Database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            VmKind::Browser => "browser",
            VmKind::Cli => "cli",
        }
    }
    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "browser" => Ok(VmKind::Browser),
            "cli" => Ok(VmKind::Cli),
            other => Err(StoreError::Corrupt {
                table: "vms",
                detail: format!("unknown kind {other:?}"),
            }),
        }
    }
}

/// A VM record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vm {
    /// `vm-…` (controller id).
    pub id: String,
    /// Owner.
    pub user_id: String,
    /// Browser or CLI VM.
    pub kind: VmKind,
    /// Host it is placed on.
    pub host_id: Option<String>,
    /// Its id at that host's agent.
    pub host_vm_id: Option<String>,
    /// Creation time (ms).
    pub created_at: i64,
    /// Lifecycle.
    pub life: Life<VmState>,
}

/// A connect-provider session record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// `ses-…`.
    pub id: String,
    /// Owner.
    pub user_id: String,
    /// Provider id (`claude-code`, …).
    pub provider: String,
    /// The browser VM, once requested.
    pub browser_vm_id: Option<String>,
    /// Creation time (ms).
    pub created_at: i64,
    /// Lifecycle.
    pub life: Life<SessionState>,
}

/// One row of the append-only events table.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Monotonic id (global order).
    pub id: i64,
    /// Time (ms).
    pub at: i64,
    /// `vm`, `session`, `user`, `credential`.
    pub subject_kind: String,
    /// The subject's id.
    pub subject_id: String,
    /// Owner, when there is one.
    pub user_id: Option<String>,
    /// `created`, `state`, `stored`, `rewrapped`, ….
    pub kind: String,
    /// Previous state for state events.
    pub from_state: Option<String>,
    /// New state for state events.
    pub to_state: Option<String>,
    /// Structured detail (never a secret).
    pub detail: serde_json::Value,
}

/// Optional side changes recorded in the same transaction as a state change.
#[derive(Clone, Debug, Default)]
pub struct Also {
    /// VM: placement (host id, id at the host agent).
    pub placement: Option<(String, String)>,
    /// Session: its browser VM.
    pub browser_vm_id: Option<String>,
    /// Extra fields merged into the event's detail (never a secret), e.g.
    /// the auth URL a login printed.
    pub detail: Option<serde_json::Value>,
    /// Session: the CLI VM its credential was delivered to, recorded as
    /// the holder of the user's credential for the session's provider.
    pub credential_holder: Option<String>,
}

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    write_lock: write_tx::WriteLock,
}

type LifeRow = (
    String,
    i64,
    Option<i64>,
    i64,
    Option<String>,
    Option<String>,
    i64,
);

const LIFE_COLS: &str =
    "state, state_since, deadline_at, attempts, failure_reason, failure_detail, version";

fn life_from<S: Lifecycle>(r: LifeRow) -> Result<Life<S>, StoreError> {
    let (state, state_since, deadline_at, attempts, reason, detail, version) = r;
    let failure = match reason {
        Some(r) => Some(Failure::new(
            FailureReason::parse(&r)?,
            detail.unwrap_or_default(),
        )),
        None => None,
    };
    Ok(Life {
        state: S::parse(&state)?,
        state_since,
        deadline_at,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        failure,
        version,
    })
}

fn deadline_for<S: Lifecycle>(s: S, now: i64) -> Option<i64> {
    s.timeout()
        .map(|d| now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
}

/// Make `dir` 0700 and create `db` 0600 unless it exists (then make it
/// 0600). A missing `dir` is left for SQLite to report.
fn private_sqlite_files(dir: &Path, db: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |p: &Path| {
        let path = p.display().to_string();
        move |source| StoreError::Files { path, source }
    };
    if !dir.is_dir() {
        return Ok(());
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err(dir))?;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(db)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(err(db)(e)),
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let p = std::path::PathBuf::from(p);
        match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(&p)(e)),
        }
    }
    Ok(())
}

impl Store {
    /// Open the SQLite database `controller.db` in `data_dir` (created if missing).
    /// The directory (which must exist) is made 0700 and the database 0600
    /// whatever the umask
    /// (SQLite gives its `-wal` and `-shm` files the database's mode): the
    /// database holds sealed credentials and token hashes.
    pub async fn open_in_dir(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join("controller.db");
        private_sqlite_files(data_dir, &path)?;
        // Built from the path, not a formatted URL: a data dir may contain
        // spaces, `?` or `#`.
        let opts = SqliteConnectOptions::new().filename(&path);
        Self::open_sqlite(opts, &path.display().to_string()).await
    }

    async fn open_sqlite(opts: SqliteConnectOptions, shown: &str) -> Result<Self, StoreError> {
        // Switching a new file to WAL takes a lock SQLite does not wait for
        // (no busy handler): controllers opening a fresh file at the same
        // moment get SQLITE_BUSY and try again shortly.
        let started = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(10);
        loop {
            match Self::open_sqlite_once(opts.clone(), shown).await {
                Err(StoreError::Open { source, .. })
                    if sqlite_busy(&source) && started.elapsed().as_secs() < 10 =>
                {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_millis(200));
                }
                r => return r,
            }
        }
    }

    async fn open_sqlite_once(opts: SqliteConnectOptions, shown: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let open_err = |source| StoreError::Open {
            url: shown.to_string(),
            source,
        };
        // Create the file and switch it to WAL once; WAL is a property of
        // the file, so every later connection (through `Any`) gets it.
        let opts = opts
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let mut c = opts.connect().await.map_err(open_err)?;
        c.ping().await.map_err(open_err)?;
        c.close().await.map_err(open_err)?;
        let any = AnyConnectOptions::from_str(opts.to_url_lossy().as_str()).map_err(open_err)?;
        Self::finish_open(any, Dialect::Sqlite, 4, shown).await
    }

    async fn finish_open(
        opts: AnyConnectOptions,
        dialect: Dialect,
        max: u32,
        shown: &str,
    ) -> Result<Self, StoreError> {
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .connect_with(opts)
            .await
            .map_err(|source| StoreError::Open {
                url: shown.to_string(),
                source,
            })?;
        let store = Store {
            pool,
            dialect,
            write_lock: write_tx::write_lock(dialect),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Open a database by URL (`sqlite://<path>` or `postgres://…`), apply
    /// pending migrations, and refuse a database newer than this binary.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let open_err = |source| StoreError::Open {
            url: redact(url),
            source,
        };
        if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url).map_err(open_err)?;
            Self::open_sqlite(opts, &redact(url)).await
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let opts = AnyConnectOptions::from_str(url).map_err(open_err)?;
            Self::finish_open(opts, Dialect::Postgres, 16, &redact(url)).await
        } else {
            Err(StoreError::UnsupportedUrl(redact(url)))
        }
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        migrate::run(&mut conn, self.dialect).await
    }

    /// The dialect in use.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The underlying pool (for tests and maintenance queries).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Close all connections (checkpoints SQLite's WAL).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Newest applied schema version.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        let (v,): (i64,) = sqlx::query_as("SELECT MAX(version) FROM schema_migrations")
            .fetch_one(&self.pool)
            .await?;
        Ok(v)
    }

    // ---- events -------------------------------------------------------

    /// Append an audit event inside the caller's transaction (also used by
    /// `auth`, whose events are rows of the same table).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn append_event(
        conn: &mut sqlx::AnyConnection,
        at: i64,
        subject_kind: &str,
        subject_id: &str,
        user_id: Option<&str>,
        kind: &str,
        from_to: Option<(&str, &str)>,
        detail: serde_json::Value,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO events (at, subject_kind, subject_id, user_id, kind, from_state, to_state, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(at)
        .bind(subject_kind)
        .bind(subject_id)
        .bind(user_id)
        .bind(kind)
        .bind(from_to.map(|f| f.0))
        .bind(from_to.map(|f| f.1))
        .bind(detail.to_string())
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Events of one subject, oldest first.
    pub async fn events_for(
        &self,
        subject_kind: &str,
        subject_id: &str,
    ) -> Result<Vec<Event>, StoreError> {
        type Row = (
            i64,
            i64,
            String,
            String,
            Option<String>,
            String,
            Option<String>,
            Option<String>,
            String,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, at, subject_kind, subject_id, user_id, kind, from_state, to_state, detail
             FROM events WHERE subject_kind = $1 AND subject_id = $2 ORDER BY id",
        )
        .bind(subject_kind)
        .bind(subject_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(Event {
                    id: r.0,
                    at: r.1,
                    subject_kind: r.2,
                    subject_id: r.3,
                    user_id: r.4,
                    kind: r.5,
                    from_state: r.6,
                    to_state: r.7,
                    detail: serde_json::from_str(&r.8).map_err(|e| StoreError::Corrupt {
                        table: "events",
                        detail: format!("detail is not JSON: {e}"),
                    })?,
                })
            })
            .collect()
    }

    // ---- users --------------------------------------------------------

    /// Create a user (`role` is `user` or `admin`).
    pub async fn create_user(&self, name: &str, role: &str) -> Result<User, StoreError> {
        self.insert_user(name, role, None, json!({})).await
    }

    /// Insert a user row (with an optional password hash, set by `auth`)
    /// and its `created` event, whose detail is `detail` plus the name and
    /// role, in one transaction.
    pub(crate) async fn insert_user(
        &self,
        name: &str,
        role: &str,
        password_hash: Option<String>,
        mut detail: serde_json::Value,
    ) -> Result<User, StoreError> {
        let user = User {
            id: new_id("usr")?,
            name: name.to_string(),
            role: role.to_string(),
            created_at: now_ms(),
        };
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO users (id, name, role, password_hash, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&user.id)
        .bind(&user.name)
        .bind(&user.role)
        .bind(password_hash)
        .bind(user.created_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| unique_to_duplicate(e, || format!("user {name:?}")))?;
        detail["name"] = json!(user.name);
        detail["role"] = json!(user.role);
        Self::append_event(
            &mut tx,
            user.created_at,
            "user",
            &user.id,
            Some(&user.id),
            "created",
            None,
            detail,
        )
        .await?;
        tx.commit().await?;
        Ok(user)
    }

    /// A user by id.
    pub async fn user(&self, id: &str) -> Result<User, StoreError> {
        let row: Option<(String, String, String, i64)> =
            sqlx::query_as("SELECT id, name, role, created_at FROM users WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        let (id, name, role, created_at) = row.ok_or_else(|| StoreError::NotFound {
            kind: "user",
            id: id.to_string(),
        })?;
        Ok(User {
            id,
            name,
            role,
            created_at,
        })
    }

    // ---- state changes --------------------------------------------------

    /// Move a VM to `to` (see [`Store::transition`]); `also.placement` is
    /// written in the same transaction.
    pub async fn transition_vm(
        &self,
        vm: &Vm,
        to: VmState,
        failure: Option<Failure>,
        also: Also,
    ) -> Result<Vm, StoreError> {
        self.transition("vms", &vm.id, &vm.user_id, &vm.life, to, failure, also)
            .await?;
        self.vm(&vm.id).await
    }

    /// Move a session to `to` (see [`Store::transition`]); `also.browser_vm_id`
    /// is written in the same transaction.
    pub async fn transition_session(
        &self,
        s: &Session,
        to: SessionState,
        failure: Option<Failure>,
        also: Also,
    ) -> Result<Session, StoreError> {
        self.transition("sessions", &s.id, &s.user_id, &s.life, to, failure, also)
            .await?;
        self.session(&s.id).await
    }

    /// The one place a lifecycle changes. `current` is what the caller read;
    /// the update only applies if the row still has that version (otherwise
    /// [`StoreError::Conflict`]). Entering a state beyond its entry limit
    /// records [`FailureReason::RetriesExhausted`] instead, so a retry loop
    /// can never spin forever. The new state, its deadline and the event are
    /// one transaction.
    #[allow(clippy::too_many_arguments)]
    async fn transition<S: Lifecycle>(
        &self,
        table: &'static str,
        id: &str,
        user_id: &str,
        current: &Life<S>,
        to: S,
        failure: Option<Failure>,
        also: Also,
    ) -> Result<(), StoreError> {
        let machine = S::MACHINE;
        if !current.state.valid_transition(to) {
            return Err(StoreError::InvalidTransition {
                machine,
                id: id.to_string(),
                from: current.state.as_str(),
                to: to.as_str(),
            });
        }
        if (to == S::FAILED) != failure.is_some() {
            return Err(StoreError::FailureMismatch {
                machine,
                id: id.to_string(),
                to: to.as_str(),
            });
        }
        let (mut to, mut failure, mut attempts) = (to, failure, current.attempts);
        if let Some(limit) = to.entry_limit() {
            if attempts >= limit {
                failure = Some(Failure::new(
                    FailureReason::RetriesExhausted,
                    format!("{} entered {attempts} times (limit {limit})", to.as_str()),
                ));
                to = S::FAILED;
            } else {
                attempts += 1;
            }
        }
        let now = now_ms();
        let deadline = deadline_for(to, now);
        let mut tx = self.begin_write().await?;
        // The UPDATE comes first so SQLite takes its write lock at once (a
        // read-then-write transaction could fail with SQLITE_BUSY on upgrade).
        let extra = match (table, &also) {
            (
                "vms",
                Also {
                    placement: Some(_), ..
                },
            ) => ", host_id = $9, host_vm_id = $10",
            (
                "sessions",
                Also {
                    browser_vm_id: Some(_),
                    ..
                },
            ) => ", browser_vm_id = $9",
            _ => "",
        };
        let sql = format!(
            "UPDATE {table} SET state = $1, state_since = $2, deadline_at = $3, attempts = $4,
                failure_reason = $5, failure_detail = $6, version = version + 1{extra}
             WHERE id = $7 AND version = $8"
        );
        let mut q = sqlx::query(&sql)
            .bind(to.as_str())
            .bind(now)
            .bind(deadline)
            .bind(i64::from(attempts))
            .bind(failure.as_ref().map(|f| f.reason.as_str()))
            .bind(failure.as_ref().map(|f| f.detail.clone()))
            .bind(id)
            .bind(current.version);
        if !extra.is_empty() {
            if let Some((host, host_vm)) = &also.placement {
                q = q.bind(host.clone()).bind(host_vm.clone());
            } else if let Some(b) = &also.browser_vm_id {
                q = q.bind(b.clone());
            }
        }
        let done = q.execute(&mut *tx).await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Conflict {
                kind: machine,
                id: id.to_string(),
                expected: current.version,
            });
        }
        if let ("sessions", Some(vm)) = (table, &also.credential_holder) {
            sqlx::query(
                "UPDATE credentials SET holder_vm_id = $1
                 WHERE user_id = $2 AND provider = (SELECT provider FROM sessions WHERE id = $3)",
            )
            .bind(vm.clone())
            .bind(user_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        // A VM that is gone holds nothing any more.
        if table == "vms" && to.is_final() {
            sqlx::query("UPDATE credentials SET holder_vm_id = NULL WHERE holder_vm_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        let mut detail = json!({ "version": current.version + 1, "attempts": attempts });
        if let Some(f) = &failure {
            detail["reason"] = json!(f.reason.as_str());
            detail["detail"] = json!(f.detail);
        }
        if let Some(d) = deadline {
            detail["deadline_at"] = json!(d);
        }
        if let Some(serde_json::Value::Object(extra)) = &also.detail {
            for (k, v) in extra {
                detail[k.as_str()] = v.clone();
            }
        }
        Self::append_event(
            &mut tx,
            now,
            machine,
            id,
            Some(user_id),
            "state",
            Some((current.state.as_str(), to.as_str())),
            detail,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    // ---- credentials (sealed records; see crate::vault) ------------------

    /// Store a sealed credential: `rec.version` must be 1 for a new one, or
    /// exactly one more than the stored version (compare-and-swap).
    pub async fn put_credential(&self, rec: &SealedRecord) -> Result<(), StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let done = if rec.version == 1 {
            sqlx::query(
                "INSERT INTO credentials (user_id, provider, version, key_id, wrapped_key, nonce, ciphertext, created_at, updated_at, refreshed_at)
                 VALUES ($1, $2, 1, $3, $4, $5, $6, $7, $7, $7)",
            )
            .bind(&rec.user_id)
            .bind(&rec.provider)
            .bind(&rec.key_id)
            .bind(rec.wrapped_key.clone())
            .bind(rec.nonce.clone())
            .bind(rec.ciphertext.clone())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                unique_to_duplicate(e, || {
                    format!("credential {}/{}", rec.user_id, rec.provider)
                })
            })?
        } else {
            sqlx::query(
                // A new version is held by no VM until it is delivered.
                "UPDATE credentials SET version = $1, key_id = $2, wrapped_key = $3, nonce = $4, ciphertext = $5, updated_at = $6,
                    holder_vm_id = NULL, refreshed_at = $6, expires_at = NULL, status = 'ok', status_reason = NULL
                 WHERE user_id = $7 AND provider = $8 AND version = $9",
            )
            .bind(rec.version)
            .bind(&rec.key_id)
            .bind(rec.wrapped_key.clone())
            .bind(rec.nonce.clone())
            .bind(rec.ciphertext.clone())
            .bind(now)
            .bind(&rec.user_id)
            .bind(&rec.provider)
            .bind(rec.version - 1)
            .execute(&mut *tx)
            .await?
        };
        if done.rows_affected() != 1 {
            return Err(StoreError::Conflict {
                kind: "credential",
                id: format!("{}/{}", rec.user_id, rec.provider),
                expected: rec.version - 1,
            });
        }
        Self::append_event(
            &mut tx,
            now,
            "credential",
            &format!("{}/{}", rec.user_id, rec.provider),
            Some(&rec.user_id),
            "stored",
            None,
            json!({ "version": rec.version, "key_id": rec.key_id }),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The sealed credential of (user, provider), if any.
    pub async fn credential(
        &self,
        user_id: &str,
        provider: &str,
    ) -> Result<Option<SealedRecord>, StoreError> {
        Ok(self
            .credentials_where("user_id = $1 AND provider = $2", &[user_id, provider])
            .await?
            .pop())
    }

    /// Every sealed credential whose data key is not wrapped by `key_id`.
    pub async fn credentials_not_under(
        &self,
        key_id: &str,
    ) -> Result<Vec<SealedRecord>, StoreError> {
        self.credentials_where("key_id <> $1", &[key_id]).await
    }

    /// Master key ids that still wrap at least one record.
    pub async fn credential_key_ids(&self) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT DISTINCT key_id FROM credentials ORDER BY key_id")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    async fn credentials_where(
        &self,
        cond: &str,
        args: &[&str],
    ) -> Result<Vec<SealedRecord>, StoreError> {
        type Row = (String, String, i64, String, Vec<u8>, Vec<u8>, Vec<u8>);
        let sql = format!(
            "SELECT user_id, provider, version, key_id, wrapped_key, nonce, ciphertext FROM credentials WHERE {cond} ORDER BY user_id, provider"
        );
        let mut q = sqlx::query_as::<_, Row>(&sql);
        for a in args {
            q = q.bind(*a);
        }
        Ok(q.fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|r| SealedRecord {
                user_id: r.0,
                provider: r.1,
                version: r.2,
                key_id: r.3,
                wrapped_key: r.4,
                nonce: r.5,
                ciphertext: r.6,
            })
            .collect())
    }

    /// Replace the wrapped data key of `old` by that of `new` (same record,
    /// same ciphertext), only if the row is still exactly `old`.
    pub async fn rewrap_credential(
        &self,
        old: &SealedRecord,
        new: &SealedRecord,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let id = format!("{}/{}", old.user_id, old.provider);
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE credentials SET key_id = $1, wrapped_key = $2, updated_at = $3
             WHERE user_id = $4 AND provider = $5 AND version = $6 AND key_id = $7",
        )
        .bind(&new.key_id)
        .bind(new.wrapped_key.clone())
        .bind(now)
        .bind(&old.user_id)
        .bind(&old.provider)
        .bind(old.version)
        .bind(&old.key_id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Conflict {
                kind: "credential",
                id,
                expected: old.version,
            });
        }
        Self::append_event(
            &mut tx,
            now,
            "credential",
            &id,
            Some(&old.user_id),
            "rewrapped",
            None,
            json!({ "version": old.version, "from_key_id": old.key_id, "to_key_id": new.key_id }),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

fn life_row(r: &sqlx::any::AnyRow, at: usize) -> Result<LifeRow, sqlx::Error> {
    use sqlx::Row as _;
    Ok((
        r.try_get(at)?,
        r.try_get(at + 1)?,
        r.try_get(at + 2)?,
        r.try_get(at + 3)?,
        r.try_get(at + 4)?,
        r.try_get(at + 5)?,
        r.try_get(at + 6)?,
    ))
}

/// `'a', 'b'` list of a machine's final states for `NOT IN (…)` (constants
/// from our own enum, never user input).
fn final_list<S: Lifecycle>() -> String {
    S::ALL
        .iter()
        .filter(|s| s.is_final())
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn unique_to_duplicate(e: sqlx::Error, what: impl FnOnce() -> String) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            StoreError::Duplicate { what: what() }
        }
        _ => StoreError::Db(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://bob:hunter2@db/x"),
            "postgres://bob:***@db/x"
        );
        assert_eq!(redact("sqlite:///a/b.db"), "sqlite:///a/b.db");
    }

    #[test]
    fn final_lists() {
        assert_eq!(final_list::<VmState>(), "'destroyed', 'failed'");
    }
}
