//! Write transactions: one writer at a time on SQLite.
//!
//! SQLite allows a single writer. With plain (deferred) `BEGIN`, concurrent
//! writers inside one controller meet in SQLite's busy handler, which sleeps
//! in growing steps (measured: 1 s stalls on session create under 16
//! concurrent clients), and a transaction that read before it writes can
//! fail outright with `SQLITE_BUSY_SNAPSHOT`. Queuing writers on an async
//! mutex and taking the write lock up front (`BEGIN IMMEDIATE`) makes them
//! wait in FIFO order instead, without sleeping. PostgreSQL has row locks
//! and gets a plain transaction.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use sqlx::{Any, AnyConnection, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::{Dialect, Store};

/// Serializes this process's SQLite writers; `None` on PostgreSQL.
pub(super) type WriteLock = Option<Arc<Mutex<()>>>;

/// The lock for a store of `dialect`.
pub(super) fn write_lock(dialect: Dialect) -> WriteLock {
    match dialect {
        Dialect::Sqlite => Some(Arc::new(Mutex::new(()))),
        Dialect::Postgres => None,
    }
}

/// A transaction that may write; derefs to its connection (`&mut *tx`).
/// Dropping it without [`WriteTx::commit`] rolls back.
pub struct WriteTx {
    tx: Transaction<'static, Any>,
    // Declared after `tx`: the rollback on drop runs before the next
    // writer is let in.
    _turn: Option<OwnedMutexGuard<()>>,
}

impl WriteTx {
    /// Commit, then let the next writer in.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }
}

impl Deref for WriteTx {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.tx
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }
}

impl Store {
    /// Begin a transaction that may write. Use it for every transaction
    /// that changes rows; reads go to the pool directly.
    pub async fn begin_write(&self) -> Result<WriteTx, sqlx::Error> {
        let turn = match &self.write_lock {
            Some(m) => Some(Arc::clone(m).lock_owned().await),
            None => None,
        };
        let tx = match self.dialect {
            Dialect::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Dialect::Postgres => self.pool.begin().await?,
        };
        Ok(WriteTx { tx, _turn: turn })
    }
}

impl Store {
    /// Run one writing statement in its own [`Store::begin_write`]
    /// transaction (so it queues with the other writers).
    pub async fn write_one<'q>(
        &self,
        q: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    ) -> Result<sqlx::any::AnyQueryResult, sqlx::Error> {
        let mut tx = self.begin_write().await?;
        let r = q.execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(r)
    }
}
