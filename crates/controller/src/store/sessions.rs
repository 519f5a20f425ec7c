//! Connect-session records: creating them (within the per-user limit of
//! active sessions) and reading them.

use serde_json::json;

use super::{
    deadline_for, final_list, life_from, life_row, Dialect, Life, Session, Store, StoreError,
    LIFE_COLS,
};
use crate::state::{Lifecycle, SessionState};
use crate::util::{new_id, now_ms};

impl Store {
    /// Record a new connect-provider session in [`SessionState::Requested`]
    /// (no per-user limit: the API uses [`Store::create_session_limited`]).
    pub async fn create_session(
        &self,
        user_id: &str,
        provider: &str,
    ) -> Result<Session, StoreError> {
        self.insert_session(user_id, provider, None).await
    }

    /// Record a new session unless the user already has `max_active`
    /// sessions that are not final ([`StoreError::SessionLimit`] then).
    /// The count and the insert are one transaction that holds the user's
    /// row (PostgreSQL) or the write lock (SQLite), so concurrent creates
    /// cannot both see room for one more.
    pub async fn create_session_limited(
        &self,
        user_id: &str,
        provider: &str,
        max_active: usize,
    ) -> Result<Session, StoreError> {
        self.insert_session(user_id, provider, Some(max_active))
            .await
    }

    async fn insert_session(
        &self,
        user_id: &str,
        provider: &str,
        max_active: Option<usize>,
    ) -> Result<Session, StoreError> {
        let now = now_ms();
        let s = Session {
            id: new_id("ses")?,
            user_id: user_id.to_string(),
            provider: provider.to_string(),
            browser_vm_id: None,
            created_at: now,
            life: Life {
                state: SessionState::INITIAL,
                state_since: now,
                deadline_at: deadline_for(SessionState::INITIAL, now),
                attempts: 0,
                failure: None,
                version: 1,
            },
        };
        let mut tx = self.begin_write().await?;
        if let Some(limit) = max_active {
            if self.dialect == Dialect::Postgres {
                // READ COMMITTED: the count below runs after the lock, so
                // it sees the sessions a concurrent create just committed.
                sqlx::query("SELECT id FROM users WHERE id = $1 FOR UPDATE")
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
            }
            let finals = final_list::<SessionState>();
            let active: Vec<(String,)> = sqlx::query_as(&format!(
                "SELECT id FROM sessions WHERE user_id = $1 AND state NOT IN ({finals})
                 ORDER BY created_at, id"
            ))
            .bind(user_id)
            .fetch_all(&mut *tx)
            .await?;
            if active.len() >= limit {
                return Err(StoreError::SessionLimit {
                    user_id: user_id.to_string(),
                    limit,
                    active: active.into_iter().map(|r| r.0).collect(),
                });
            }
        }
        sqlx::query(&format!(
            "INSERT INTO sessions (id, user_id, provider, created_at, {LIFE_COLS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0, NULL, NULL, 1)"
        ))
        .bind(&s.id)
        .bind(&s.user_id)
        .bind(provider)
        .bind(now)
        .bind(s.life.state.as_str())
        .bind(now)
        .bind(s.life.deadline_at)
        .execute(&mut *tx)
        .await?;
        Self::append_event(
            &mut tx,
            now,
            "session",
            &s.id,
            Some(user_id),
            "created",
            None,
            json!({ "provider": provider, "state": s.life.state.as_str() }),
        )
        .await?;
        tx.commit().await?;
        Ok(s)
    }

    /// A session by id.
    pub async fn session(&self, id: &str) -> Result<Session, StoreError> {
        self.sessions_where("id = $1", Some(id))
            .await?
            .pop()
            .ok_or_else(|| StoreError::NotFound {
                kind: "session",
                id: id.to_string(),
            })
    }

    /// Every session not in a final state.
    pub async fn non_final_sessions(&self) -> Result<Vec<Session>, StoreError> {
        let finals = final_list::<SessionState>();
        self.sessions_where(&format!("state NOT IN ({finals})"), None)
            .await
    }

    pub(super) async fn sessions_where(
        &self,
        cond: &str,
        arg: Option<&str>,
    ) -> Result<Vec<Session>, StoreError> {
        let sql = format!(
            "SELECT id, user_id, provider, browser_vm_id, created_at, {LIFE_COLS} FROM sessions WHERE {cond} ORDER BY created_at, id"
        );
        let mut q = sqlx::query(&sql);
        if let Some(a) = arg {
            q = q.bind(a);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                use sqlx::Row as _;
                Ok(Session {
                    id: r.try_get(0)?,
                    user_id: r.try_get(1)?,
                    provider: r.try_get(2)?,
                    browser_vm_id: r.try_get(3)?,
                    created_at: r.try_get(4)?,
                    life: life_from(life_row(r, 5)?)?,
                })
            })
            .collect()
    }
}
