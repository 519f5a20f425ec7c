//! Dashboard login sessions (the [`super::SESSION_COOKIE`] cookie).
//!
//! The cookie holds 256 random bits; the table holds their SHA-256. A
//! session ends at its absolute expiry, after `session_idle` without use,
//! or at logout (the row is deleted).

use super::secret::{hash, new_secret, plausible};
use super::{ms, Auth, AuthError, AuthMethod, LoginSession, Principal};
use crate::util::now_ms;

impl Auth {
    /// Start a login session for `user_id` (after a password or login-link
    /// check; `from_link`: a one-time link, whose session may set a new
    /// password without the old one).
    pub(crate) async fn create_login_session(
        &self,
        user_id: &str,
        from_link: bool,
    ) -> Result<LoginSession, AuthError> {
        let value = new_secret("")?;
        let now = now_ms();
        let expires_at = now.saturating_add(ms(self.cfg.session_ttl));
        self.store.write_one(sqlx::query(
            "INSERT INTO login_sessions (id_hash, user_id, created_at, expires_at, last_seen_at, from_link)
             VALUES ($1, $2, $3, $4, $3, $5)",
        )
        .bind(hash(&value))
        .bind(user_id)
        .bind(now)
        .bind(expires_at)
        .bind(i64::from(from_link)))
        .await?;
        Ok(LoginSession {
            cookie_value: value.to_string(),
            expires_at,
        })
    }

    /// The principal of a session cookie value.
    pub(crate) async fn authenticate_cookie(&self, value: &str) -> Result<Principal, AuthError> {
        if !plausible(value) {
            return Err(AuthError::Unauthenticated);
        }
        let id_hash = hash(value);
        let row: Option<(String, String, String, i64, i64, i64)> = sqlx::query_as(
            "SELECT u.id, u.name, u.role, s.expires_at, s.last_seen_at, s.from_link
             FROM login_sessions s JOIN users u ON u.id = s.user_id WHERE s.id_hash = $1",
        )
        .bind(&id_hash)
        .fetch_optional(self.store.pool())
        .await?;
        let Some((user_id, name, role, expires_at, last_seen_at, from_link)) = row else {
            tracing::debug!("session cookie rejected: unknown");
            return Err(AuthError::Unauthenticated);
        };
        let now = now_ms();
        let idle = ms(self.cfg.session_idle);
        if now >= expires_at || now >= last_seen_at.saturating_add(idle) {
            tracing::debug!(%user_id, "session cookie rejected: expired");
            self.store
                .write_one(
                    sqlx::query("DELETE FROM login_sessions WHERE id_hash = $1").bind(&id_hash),
                )
                .await?;
            return Err(AuthError::Unauthenticated);
        }
        // Refresh the idle clock coarsely (not a write per request): at most
        // once a minute, or every tenth of the idle window if that is shorter.
        let step = (idle / 10).clamp(1, 60_000);
        if now - last_seen_at >= step {
            self.store
                .write_one(
                    sqlx::query("UPDATE login_sessions SET last_seen_at = $1 WHERE id_hash = $2")
                        .bind(now)
                        .bind(&id_hash),
                )
                .await?;
        }
        // A session a one-time link started keeps saying so: it is how a
        // person without a (known) password sets one.
        let via = if from_link != 0 {
            AuthMethod::LoginLink
        } else {
            AuthMethod::Cookie
        };
        Principal::from_row(user_id, name, &role, None, via)
    }

    /// End a login session (logout). Unknown or already ended sessions are
    /// fine: logout is idempotent.
    pub async fn logout(&self, cookie_value: &str) -> Result<(), AuthError> {
        if !plausible(cookie_value) {
            return Ok(());
        }
        self.store
            .write_one(
                sqlx::query("DELETE FROM login_sessions WHERE id_hash = $1")
                    .bind(hash(cookie_value)),
            )
            .await?;
        Ok(())
    }

    /// End every login session of a user (e.g. after an admin disables them).
    pub async fn logout_everywhere(&self, user_id: &str) -> Result<u64, AuthError> {
        Ok(self
            .store
            .write_one(sqlx::query("DELETE FROM login_sessions WHERE user_id = $1").bind(user_id))
            .await?
            .rows_affected())
    }
}
