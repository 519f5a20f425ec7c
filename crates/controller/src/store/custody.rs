//! Custody of delivered credentials: which CLI VM holds each one, the
//! versions its holder writes back, and whether it still works
//! (`0008_credential_custody.sql`). Only the latest version of a
//! credential is ever kept (one row per user and provider), so however
//! often a holder refreshes, the vault holds one record per credential.

use serde_json::json;

use super::{Store, StoreError};
use crate::util::now_ms;
use crate::vault::SealedRecord;

/// `credentials.status` of a working credential.
pub const STATUS_OK: &str = "ok";
/// `credentials.status` of a credential known dead: only a new sign-in
/// (a new sealed version) revives it.
pub const STATUS_NEEDS_LOGIN: &str = "needs_login";

/// A credential and the user's running CLI VM: what custody acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CustodyTarget {
    /// Owner.
    pub user_id: String,
    /// Provider id.
    pub provider: String,
    /// The sealed version.
    pub version: i64,
    /// Where it was delivered (`None`: nowhere yet, or that VM is gone).
    pub holder_vm_id: Option<String>,
    /// `ok` or `needs_login`.
    pub status: String,
    /// The user's running CLI VM.
    pub cli_vm_id: String,
}

/// What a write-back records beside the new sealed version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// When the holder's new tokens were seen (ms).
    pub at: i64,
    /// When the new access token expires (ms), when its files say.
    pub expires_at: Option<i64>,
}

impl Store {
    /// Every credential whose user has a running CLI VM.
    pub async fn custody_targets(&self) -> Result<Vec<CustodyTarget>, StoreError> {
        type Row = (String, String, i64, Option<String>, String, String);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT c.user_id, c.provider, c.version, c.holder_vm_id, c.status, v.id
             FROM credentials c JOIN vms v ON v.user_id = c.user_id
             WHERE v.kind = 'cli' AND v.state = 'running'
             ORDER BY c.user_id, c.provider",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| CustodyTarget {
                user_id: r.0,
                provider: r.1,
                version: r.2,
                holder_vm_id: r.3,
                status: r.4,
                cli_vm_id: r.5,
            })
            .collect())
    }

    /// Record `vm` as the holder of version `version`, which was just
    /// delivered into it, if the credential is still at that version and
    /// held by nobody; `false` otherwise (the delivery is then stale).
    pub async fn set_credential_holder(
        &self,
        user_id: &str,
        provider: &str,
        version: i64,
        vm: &str,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE credentials SET holder_vm_id = $1
             WHERE user_id = $2 AND provider = $3 AND version = $4 AND holder_vm_id IS NULL",
        )
        .bind(vm)
        .bind(user_id)
        .bind(provider)
        .bind(version)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            Self::append_event(
                &mut tx,
                now,
                "credential",
                &format!("{user_id}/{provider}"),
                Some(user_id),
                "delivered",
                None,
                json!({ "version": version, "holder_vm_id": vm }),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Seal what the holder `vm` wrote as the next version (`rec.version`
    /// is one more than the stored one): a compare-and-swap on the version
    /// and the holder, so a write-back from a VM that stopped holding the
    /// credential (a new sign-in sealed another version meanwhile) is
    /// refused with [`StoreError::Conflict`]. The credential stays held by
    /// `vm` and is `ok` again.
    pub async fn write_back_credential(
        &self,
        rec: &SealedRecord,
        vm: &str,
        refreshed: Refreshed,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let id = format!("{}/{}", rec.user_id, rec.provider);
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE credentials SET version = $1, key_id = $2, wrapped_key = $3, nonce = $4, ciphertext = $5,
                updated_at = $6, refreshed_at = $7, expires_at = $8, status = 'ok', status_reason = NULL
             WHERE user_id = $9 AND provider = $10 AND version = $11 AND holder_vm_id = $12",
        )
        .bind(rec.version)
        .bind(&rec.key_id)
        .bind(rec.wrapped_key.clone())
        .bind(rec.nonce.clone())
        .bind(rec.ciphertext.clone())
        .bind(now)
        .bind(refreshed.at)
        .bind(refreshed.expires_at)
        .bind(&rec.user_id)
        .bind(&rec.provider)
        .bind(rec.version - 1)
        .bind(vm)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n != 1 {
            return Err(StoreError::Conflict {
                kind: "credential",
                id,
                expected: rec.version - 1,
            });
        }
        Self::append_event(
            &mut tx,
            now,
            "credential",
            &id,
            Some(&rec.user_id),
            "written_back",
            None,
            json!({ "version": rec.version, "key_id": rec.key_id, "holder_vm_id": vm }),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Record the expiry read from version `version` (the one a sign-in
    /// sealed, first seen in its holder).
    pub async fn set_credential_expiry(
        &self,
        user_id: &str,
        provider: &str,
        version: i64,
        expires_at: Option<i64>,
    ) -> Result<(), StoreError> {
        self.write_one(
            sqlx::query(
                "UPDATE credentials SET expires_at = $1
                 WHERE user_id = $2 AND provider = $3 AND version = $4",
            )
            .bind(expires_at)
            .bind(user_id)
            .bind(provider)
            .bind(version),
        )
        .await?;
        Ok(())
    }

    /// Mark version `version` dead with `reason` (never a secret); `false`
    /// when it already was for that reason, or the credential moved on to
    /// another version (a new sign-in) meanwhile.
    pub async fn mark_needs_login(
        &self,
        user_id: &str,
        provider: &str,
        version: i64,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE credentials SET status = 'needs_login', status_reason = $1
             WHERE user_id = $2 AND provider = $3 AND version = $4
               AND (status <> 'needs_login' OR status_reason IS NULL OR status_reason <> $1)",
        )
        .bind(reason)
        .bind(user_id)
        .bind(provider)
        .bind(version)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            Self::append_event(
                &mut tx,
                now,
                "credential",
                &format!("{user_id}/{provider}"),
                Some(user_id),
                "needs_login",
                None,
                json!({ "version": version, "reason": reason }),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }
}
