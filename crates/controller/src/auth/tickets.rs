//! Stream tickets: short-lived, single-use credentials for desktop/terminal
//! WebSocket streams.
//!
//! Browsers cannot set an `Authorization` header on a WebSocket, and a
//! cookie alone would let any page the user visits open a stream (CSRF on the
//! upgrade). So an authenticated API call obtains a ticket bound to (user,
//! kind, resource id), and the upgrade request presents it. Redeeming is one
//! conditional `UPDATE … WHERE used_at IS NULL`: of concurrent redeems,
//! exactly one changes the row.

use super::secret::{hash, new_secret, plausible};
use super::{ms, Auth, AuthError, AuthMethod, Principal, Scope, Ticket};
use crate::util::now_ms;

/// Every ticket starts with this.
pub const PREFIX: &str = "pdk_";

fn validate_binding(kind: &str, resource_id: &str) -> Result<(), AuthError> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    };
    if !ok(kind) || !ok(resource_id) {
        return Err(AuthError::Invalid(
            "ticket kind and resource id must be 1-128 characters of A-Z, a-z, 0-9, '-', '_', '.', ':'"
                .into(),
        ));
    }
    Ok(())
}

impl Auth {
    /// Issue a ticket for `p` to open the `kind` stream (`desktop`,
    /// `terminal`) of `resource_id`. Needs the `streams:connect` scope; the
    /// caller must already have checked that `p` owns the resource.
    pub async fn issue_ticket(
        &self,
        p: &Principal,
        kind: &str,
        resource_id: &str,
    ) -> Result<Ticket, AuthError> {
        p.require(Scope::StreamsConnect)?;
        validate_binding(kind, resource_id)?;
        let value = new_secret(PREFIX)?;
        let now = now_ms();
        let expires_at = now.saturating_add(ms(self.cfg.ticket_ttl));
        self.store.write_one(sqlx::query(
            "INSERT INTO stream_tickets (ticket_hash, user_id, kind, resource_id, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(hash(&value))
        .bind(&p.user_id)
        .bind(kind)
        .bind(resource_id)
        .bind(now)
        .bind(expires_at))
        .await?;
        Ok(Ticket {
            value: value.to_string(),
            expires_at,
        })
    }

    /// Redeem a ticket for the `kind` stream of `resource_id`: the owner's
    /// principal (scope `streams:connect` only) once; every later attempt,
    /// an expired ticket, or one for another stream is
    /// [`AuthError::Unauthenticated`].
    pub async fn redeem_ticket(
        &self,
        value: &str,
        kind: &str,
        resource_id: &str,
    ) -> Result<Principal, AuthError> {
        let Some(body) = value.strip_prefix(PREFIX) else {
            return Err(AuthError::Unauthenticated);
        };
        if !plausible(body) || validate_binding(kind, resource_id).is_err() {
            return Err(AuthError::Unauthenticated);
        }
        let h = hash(value);
        let now = now_ms();
        let done = self.store.write_one(sqlx::query(
            "UPDATE stream_tickets SET used_at = $1
             WHERE ticket_hash = $2 AND kind = $3 AND resource_id = $4 AND used_at IS NULL AND expires_at > $1",
        )
        .bind(now)
        .bind(&h)
        .bind(kind)
        .bind(resource_id))
        .await?;
        if done.rows_affected() != 1 {
            tracing::debug!(
                kind,
                resource_id,
                "stream ticket rejected: unknown, used, expired or for another stream"
            );
            return Err(AuthError::Unauthenticated);
        }
        let row: Option<(String, String, String)> = sqlx::query_as(
            "SELECT u.id, u.name, u.role FROM stream_tickets t JOIN users u ON u.id = t.user_id
             WHERE t.ticket_hash = $1",
        )
        .bind(&h)
        .fetch_optional(self.store.pool())
        .await?;
        let (user_id, name, role) = row.ok_or(AuthError::Unauthenticated)?;
        let p = Principal::from_row(
            user_id,
            name,
            &role,
            Some(vec![Scope::StreamsConnect]),
            AuthMethod::Ticket {
                kind: kind.to_string(),
                resource_id: resource_id.to_string(),
            },
        )?;
        Ok(p)
    }
}
