//! First start: an `admin` account and a one-time login link for it.
//!
//! A fresh install has no users and nobody to set a password, so the first
//! `polydev up` creates `admin` without a password and prints a link; opening
//! it logs the operator in (once, within `login_link_ttl`), who then sets a
//! password. Link tokens are stored only as SHA-256 and are single use.

use serde_json::json;

use super::secret::{hash, new_secret, plausible};
use super::{event, ms, Auth, AuthError, AuthMethod, LoginLink, LoginSession, Principal, Role};
use crate::util::now_ms;

/// Every login link token starts with this.
pub const PREFIX: &str = "pdl_";

/// Name of the account [`Auth::bootstrap_admin`] creates.
pub const ADMIN_NAME: &str = "admin";

impl Auth {
    /// When no admin account exists, create `admin` (no password) and return
    /// a one-time login link for it; otherwise `None`. Concurrent first starts
    /// create one account: the loser of the unique-name race gets `None`.
    pub async fn bootstrap_admin(&self) -> Result<Option<LoginLink>, AuthError> {
        if self.admin_exists().await? {
            return Ok(None);
        }
        let user = match self
            .insert_user(ADMIN_NAME, Role::Admin, None, json!({ "bootstrap": true }))
            .await
        {
            Ok(u) => u,
            Err(AuthError::Conflict(_)) if self.admin_exists().await? => return Ok(None),
            Err(AuthError::Conflict(_)) => {
                return Err(AuthError::Conflict(format!(
                    "there is no admin account, and a user named {ADMIN_NAME:?} exists without the admin role: give that user the admin role in the database, or rename it"
                )))
            }
            Err(e) => return Err(e),
        };
        tracing::info!(user_id = %user.id, "created the first admin account");
        self.create_login_link(&user.id).await.map(Some)
    }

    async fn admin_exists(&self) -> Result<bool, AuthError> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM users WHERE role = 'admin'")
            .fetch_one(self.store.pool())
            .await?;
        Ok(n > 0)
    }

    /// A new one-time login link for `user_id` (for the first admin, or an
    /// admin helping a user who lost their password).
    pub async fn create_login_link(&self, user_id: &str) -> Result<LoginLink, AuthError> {
        let user = self.user(user_id).await?;
        let token = new_secret(PREFIX)?;
        let now = now_ms();
        let expires_at = now.saturating_add(ms(self.cfg.login_link_ttl));
        let mut tx = self.store.begin_write().await?;
        sqlx::query(
            "INSERT INTO login_links (token_hash, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(hash(&token))
        .bind(user_id)
        .bind(now)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        event(
            &mut tx,
            now,
            "user",
            user_id,
            Some(user_id),
            "login_link_created",
            json!({ "expires_at": expires_at }),
        )
        .await?;
        tx.commit().await?;
        Ok(LoginLink {
            user_name: user.name,
            token: token.to_string(),
            expires_at,
        })
    }

    /// Log in with a login link token: a login session, once. A used,
    /// expired or unknown token is [`AuthError::Unauthenticated`].
    pub async fn redeem_login_link(
        &self,
        token: &str,
    ) -> Result<(Principal, LoginSession), AuthError> {
        if !token.strip_prefix(PREFIX).is_some_and(plausible) {
            return Err(AuthError::Unauthenticated);
        }
        let h = hash(token);
        let now = now_ms();
        let mut tx = self.store.begin_write().await?;
        let done = sqlx::query(
            "UPDATE login_links SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL AND expires_at > $1",
        )
        .bind(now)
        .bind(&h)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            tracing::debug!("login link rejected: unknown, used or expired");
            return Err(AuthError::Unauthenticated);
        }
        let (user_id, name, role): (String, String, String) = sqlx::query_as(
            "SELECT u.id, u.name, u.role FROM login_links l JOIN users u ON u.id = l.user_id
             WHERE l.token_hash = $1",
        )
        .bind(&h)
        .fetch_one(&mut *tx)
        .await?;
        event(
            &mut tx,
            now,
            "user",
            &user_id,
            Some(&user_id),
            "login_link_used",
            json!({}),
        )
        .await?;
        tx.commit().await?;
        let p = Principal::from_row(user_id, name, &role, None, AuthMethod::LoginLink)?;
        let s = self.create_login_session(&p.user_id, true).await?;
        Ok((p, s))
    }
}
