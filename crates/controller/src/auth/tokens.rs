//! Bearer API tokens for services.
//!
//! Format: `pdt_<16 hex id>_<43 base64url secret>`. The prefix makes leaked
//! tokens recognisable to secret scanners and lets [`Auth::authenticate`]
//! tell them from JWTs; the id part names the row (`tok-<hex>`) so a token
//! can be listed and revoked without its secret. Only the SHA-256 of the
//! whole token is stored.

use serde_json::json;

use super::secret::{hash, new_secret, plausible};
use super::{event, ApiTokenInfo, Auth, AuthError, AuthMethod, Principal, Role, Scope};
use crate::util::{new_id, now_ms};

/// Every API token starts with this.
pub const PREFIX: &str = "pdt_";

/// Longest token name.
pub const MAX_TOKEN_NAME_CHARS: usize = 100;

/// Don't write `last_used_at` more often than this per token.
const LAST_USED_RESOLUTION_MS: i64 = 60_000;

/// The row id a token string claims (`tok-<hex>`), if it is well formed.
fn token_id(token: &str) -> Option<String> {
    let rest = token.strip_prefix(PREFIX)?;
    let (hex_id, secret) = rest.split_once('_')?;
    let hex_ok = hex_id.len() == 16
        && hex_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (hex_ok && secret.len() == 43 && plausible(secret)).then(|| format!("tok-{hex_id}"))
}

type TokenRow = (
    String,
    String,
    String,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

fn info(r: TokenRow) -> Result<ApiTokenInfo, AuthError> {
    Ok(ApiTokenInfo {
        id: r.0,
        name: r.1,
        scopes: Scope::split(&r.2)?,
        created_at: r.3,
        expires_at: r.4,
        revoked_at: r.5,
        last_used_at: r.6,
    })
}

impl Auth {
    /// Create an API token for `user_id`. Returns its metadata and the token
    /// itself, which is shown this once and never stored.
    ///
    /// `scopes` must be non-empty and within what the user's role allows
    /// (`admin` only for admins: else [`AuthError::Forbidden`]); `expires_at`
    /// (ms), if given, must be in the future.
    pub async fn create_token(
        &self,
        user_id: &str,
        name: &str,
        scopes: &[Scope],
        expires_at: Option<i64>,
    ) -> Result<(ApiTokenInfo, String), AuthError> {
        let name = name.trim();
        if name.is_empty()
            || name.chars().count() > MAX_TOKEN_NAME_CHARS
            || name.chars().any(char::is_control)
        {
            return Err(AuthError::Invalid(format!(
                "token name must be 1-{MAX_TOKEN_NAME_CHARS} printable characters"
            )));
        }
        if scopes.is_empty() {
            return Err(AuthError::Invalid(
                "a token needs at least one scope, e.g. \"sessions:read\"".into(),
            ));
        }
        let now = now_ms();
        if let Some(e) = expires_at {
            if e <= now {
                return Err(AuthError::Invalid(format!(
                    "expires_at {e} is in the past (now is {now}, milliseconds since the epoch)"
                )));
            }
        }
        let user = self.user(user_id).await?;
        let role = Role::parse(&user.role)?;
        let allowed = role.scopes();
        if let Some(s) = scopes.iter().find(|s| !allowed.contains(s)) {
            return Err(AuthError::Forbidden {
                scope: s.as_str().to_string(),
            });
        }
        let mut scopes = scopes.to_vec();
        scopes.sort();
        scopes.dedup();

        let id = new_id("tok")?;
        let hex_id = id.trim_start_matches("tok-");
        let secret = new_secret("")?;
        let token = format!("{PREFIX}{hex_id}_{}", secret.as_str());
        let mut tx = self.store.begin_write().await?;
        sqlx::query(
            "INSERT INTO api_tokens (id, user_id, name, token_hash, scopes, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&id)
        .bind(user_id)
        .bind(name)
        .bind(hash(&token))
        .bind(Scope::join(&scopes))
        .bind(now)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        event(
            &mut tx,
            now,
            "api_token",
            &id,
            Some(user_id),
            "created",
            json!({ "name": name, "scopes": Scope::join(&scopes), "expires_at": expires_at }),
        )
        .await?;
        tx.commit().await?;
        let info = ApiTokenInfo {
            id,
            name: name.to_string(),
            scopes,
            created_at: now,
            expires_at,
            revoked_at: None,
            last_used_at: None,
        };
        Ok((info, token))
    }

    /// The user's tokens (revoked and expired ones included), newest first.
    pub async fn list_tokens(&self, user_id: &str) -> Result<Vec<ApiTokenInfo>, AuthError> {
        let rows: Vec<TokenRow> = sqlx::query_as(
            "SELECT id, name, scopes, created_at, expires_at, revoked_at, last_used_at
             FROM api_tokens WHERE user_id = $1 ORDER BY created_at DESC, id",
        )
        .bind(user_id)
        .fetch_all(self.store.pool())
        .await?;
        rows.into_iter().map(info).collect()
    }

    /// Revoke one of the user's tokens (idempotent). Another user's token, or
    /// no such token, is [`AuthError::NotFound`].
    pub async fn revoke_token(&self, user_id: &str, token_id: &str) -> Result<(), AuthError> {
        let now = now_ms();
        let mut tx = self.store.begin_write().await?;
        let done = sqlx::query(
            "UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(token_id)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            let mine: Option<(String,)> =
                sqlx::query_as("SELECT id FROM api_tokens WHERE id = $1 AND user_id = $2")
                    .bind(token_id)
                    .bind(user_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            // Already revoked: fine. Not ours or not there: the same 404.
            return match mine {
                Some(_) => Ok(()),
                None => Err(AuthError::NotFound),
            };
        }
        event(
            &mut tx,
            now,
            "api_token",
            token_id,
            Some(user_id),
            "revoked",
            json!({}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The principal of a bearer API token.
    pub(crate) async fn authenticate_token(&self, token: &str) -> Result<Principal, AuthError> {
        let Some(claimed_id) = token_id(token) else {
            tracing::debug!("API token rejected: malformed");
            return Err(AuthError::Unauthenticated);
        };
        type Row = (
            String,
            String,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            String,
            String,
            String,
        );
        let row: Option<Row> = sqlx::query_as(
            "SELECT t.id, t.scopes, t.expires_at, t.revoked_at, t.last_used_at, u.id, u.name, u.role
             FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = $1",
        )
        .bind(hash(token))
        .fetch_optional(self.store.pool())
        .await?;
        let Some((id, scopes, expires_at, revoked_at, last_used_at, user_id, name, role)) = row
        else {
            tracing::debug!(token_id = %claimed_id, "API token rejected: unknown");
            return Err(AuthError::Unauthenticated);
        };
        let now = now_ms();
        if id != claimed_id {
            // Cannot happen for tokens we issued (the hash covers the id).
            return Err(AuthError::Unauthenticated);
        }
        if revoked_at.is_some() {
            tracing::debug!(token_id = %id, "API token rejected: revoked");
            return Err(AuthError::Unauthenticated);
        }
        if expires_at.is_some_and(|e| now >= e) {
            tracing::debug!(token_id = %id, "API token rejected: expired");
            return Err(AuthError::Unauthenticated);
        }
        if last_used_at.is_none_or(|t| now - t >= LAST_USED_RESOLUTION_MS) {
            self.store
                .write_one(
                    sqlx::query("UPDATE api_tokens SET last_used_at = $1 WHERE id = $2")
                        .bind(now)
                        .bind(&id),
                )
                .await?;
        }
        Principal::from_row(
            user_id,
            name,
            &role,
            Some(Scope::split(&scopes)?),
            AuthMethod::ApiToken { token_id: id },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_parse() {
        let secret = "A".repeat(43);
        assert_eq!(
            token_id(&format!("pdt_0123456789abcdef_{secret}")).as_deref(),
            Some("tok-0123456789abcdef")
        );
        // Secrets may contain '_' (base64url): only the first splits.
        let s2 = format!("a_{}", "b".repeat(41));
        assert!(token_id(&format!("pdt_0123456789abcdef_{s2}")).is_some());
        for bad in [
            "pdt_".to_string(),
            format!("pdt_0123456789ABCDEF_{secret}"),
            format!("pdt_0123_{secret}"),
            "pdt_0123456789abcdef_short".to_string(),
            format!("xyz_0123456789abcdef_{secret}"),
        ] {
            assert!(token_id(&bad).is_none(), "{bad}");
        }
    }
}
