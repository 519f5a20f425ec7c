//! The migration runner: one ordered migration set for both dialects.
//!
//! sqlx's own migrator needs its `macros` feature and knows nothing of our
//! dialect blocks, so the runner is ours (≈100 lines): every migration file
//! is embedded in the binary, rendered for the dialect, applied in its own
//! transaction together with its row in `schema_migrations`, and the
//! database is refused if it carries a version this binary does not know
//! (a newer binary migrated it) or a known version whose file changed.

use sha2::{Digest, Sha256};
use sqlx::{AnyConnection, Connection};

use super::{Dialect, StoreError};
use crate::util::now_ms;

/// One embedded migration.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// Every migration, in order. Append only; never edit a shipped file (the
/// checksum check refuses databases migrated by a different file).
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../../migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "auth",
        sql: include_str!("../../migrations/0002_auth.sql"),
    },
    Migration {
        version: 3,
        name: "upstreams",
        sql: include_str!("../../migrations/0003_upstreams.sql"),
    },
    Migration {
        version: 4,
        name: "quotas",
        sql: include_str!("../../migrations/0004_quotas.sql"),
    },
    Migration {
        version: 5,
        name: "credential_holder",
        sql: include_str!("../../migrations/0005_credential_holder.sql"),
    },
    Migration {
        version: 6,
        name: "login_from_link",
        sql: include_str!("../../migrations/0006_login_from_link.sql"),
    },
    Migration {
        version: 7,
        name: "runs",
        sql: include_str!("../../migrations/0007_runs.sql"),
    },
    Migration {
        version: 8,
        name: "vm_activity",
        sql: include_str!("../../migrations/0008_vm_activity.sql"),
    },
    Migration {
        version: 9,
        name: "credential_custody",
        sql: include_str!("../../migrations/0009_credential_custody.sql"),
    },
];

/// The schema version this binary brings a database to.
pub fn latest_version() -> i64 {
    MIGRATIONS.last().map(|m| m.version).unwrap_or(0)
}

fn checksum(sql: &str) -> String {
    hex::encode(Sha256::digest(sql.as_bytes()))
}

/// Render a portable migration for one dialect: substitute the type
/// placeholders and keep only matching `-- dialect:` blocks.
pub(crate) fn render(sql: &str, dialect: Dialect) -> String {
    let (auto_id, blob) = match dialect {
        Dialect::Sqlite => ("INTEGER PRIMARY KEY AUTOINCREMENT", "BLOB"),
        Dialect::Postgres => ("BIGSERIAL PRIMARY KEY", "BYTEA"),
    };
    let mut out = String::with_capacity(sql.len());
    let mut keep = true;
    for line in sql.lines() {
        if let Some(rest) = line.trim().strip_prefix("-- dialect:") {
            keep = match rest.trim() {
                "end" => true,
                name => name == dialect.name(),
            };
            continue;
        }
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.replace("{{AUTO_ID}}", auto_id)
        .replace("{{BLOB}}", blob)
}

/// Bring the database on `conn` up to [`latest_version`], or refuse it.
///
/// Everything happens in one transaction that first takes a database-wide
/// lock (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: a transaction-scoped advisory
/// lock), so controllers starting together migrate once and the others see
/// the result; a failed migration leaves nothing half-applied (DDL is
/// transactional on both).
pub(crate) async fn run(conn: &mut AnyConnection, dialect: Dialect) -> Result<(), StoreError> {
    let mut tx = match dialect {
        Dialect::Sqlite => AnyConnection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?,
        Dialect::Postgres => {
            let mut tx = AnyConnection::begin(&mut *conn).await?;
            sqlx::Executor::execute(&mut *tx, "SELECT pg_advisory_xact_lock(7305831)").await?;
            tx
        }
    };
    // Plain `&str` executes (no arguments: PostgreSQL's simple protocol,
    // which allows several statements). `sqlx::raw_sql` would do the same
    // but makes the future non-`Send` (sqlx lifetime bounds), and `Store::open`
    // must be spawnable.
    sqlx::Executor::execute(
        &mut *tx,
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version    BIGINT PRIMARY KEY,
            name       TEXT NOT NULL,
            checksum   TEXT NOT NULL,
            applied_at BIGINT NOT NULL
        )",
    )
    .await?;

    let applied: Vec<(i64, String)> =
        sqlx::query_as("SELECT version, checksum FROM schema_migrations ORDER BY version")
            .fetch_all(&mut *tx)
            .await?;
    let latest = latest_version();
    if let Some(&(newest, _)) = applied.last() {
        if newest > latest {
            return Err(StoreError::SchemaTooNew {
                database: newest,
                binary: latest,
            });
        }
    }
    for (version, sum) in &applied {
        let Some(m) = MIGRATIONS.iter().find(|m| m.version == *version) else {
            return Err(StoreError::MigrationUnknown { version: *version });
        };
        if checksum(m.sql) != *sum {
            return Err(StoreError::MigrationChanged {
                version: *version,
                name: m.name,
            });
        }
    }
    for m in MIGRATIONS
        .iter()
        .filter(|m| !applied.iter().any(|(v, _)| *v == m.version))
    {
        let fail = |source| StoreError::Migrate {
            version: m.version,
            name: m.name,
            source,
        };
        let sql = render(m.sql, dialect);
        sqlx::Executor::execute(&mut *tx, sql.as_str())
            .await
            .map_err(fail)?;
        sqlx::query(
            "INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(m.version)
        .bind(m.name)
        .bind(checksum(m.sql))
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(fail)?;
        tracing::info!(version = m.version, name = m.name, "applied migration");
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_keeps_only_own_dialect() {
        let sql = "A {{BLOB}}\n-- dialect: sqlite\nS\n-- dialect: end\n-- dialect: postgres\nP\n-- dialect: end\nB {{AUTO_ID}}\n";
        let s = render(sql, Dialect::Sqlite);
        assert_eq!(s, "A BLOB\nS\nB INTEGER PRIMARY KEY AUTOINCREMENT\n");
        let p = render(sql, Dialect::Postgres);
        assert_eq!(p, "A BYTEA\nP\nB BIGSERIAL PRIMARY KEY\n");
    }

    #[test]
    fn versions_strictly_increase() {
        for w in MIGRATIONS.windows(2) {
            assert!(w[0].version < w[1].version);
        }
        assert!(!render(MIGRATIONS[0].sql, Dialect::Postgres).contains("{{"));
    }
}
