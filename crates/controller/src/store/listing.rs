//! Per-owner reads for the HTTP API: a user's VMs, sessions and credential
//! metadata, and the events of a subject after a given one (for SSE).
//! Every query filters by owner in SQL, so another user's rows never leave
//! the database for a request.

use serde_json::json;

use super::{Event, Session, Store, StoreError, Vm};
use crate::state::{Lifecycle, VmState};
use crate::util::now_ms;

/// Metadata of a stored credential (never its ciphertext or keys).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialInfo {
    /// Provider id.
    pub provider: String,
    /// Record version (bumps on every re-seal).
    pub version: i64,
    /// Master key id wrapping its data key.
    pub key_id: String,
    /// First stored (ms).
    pub created_at: i64,
    /// Last re-sealed or re-wrapped (ms).
    pub updated_at: i64,
    /// The CLI VM the current version was delivered to (`None`: none, or
    /// that VM is gone).
    pub holder_vm_id: Option<String>,
    /// When its tokens were last obtained: sign-in or a refresh written
    /// back from the holder (ms).
    pub refreshed_at: Option<i64>,
    /// When its access token expires (ms), when its files say.
    pub expires_at: Option<i64>,
    /// `ok` or `needs_login`.
    pub status: String,
    /// Why it needs a login.
    pub status_reason: Option<String>,
}

impl Store {
    /// The user's VMs, oldest first (final ones included).
    pub async fn vms_of(&self, user_id: &str) -> Result<Vec<Vm>, StoreError> {
        self.vms_where("user_id = $1", Some(user_id)).await
    }

    /// The user's connect sessions, oldest first.
    pub async fn sessions_of(&self, user_id: &str) -> Result<Vec<Session>, StoreError> {
        self.sessions_where("user_id = $1", Some(user_id)).await
    }

    /// The user's live (not final) CLI VM, if any.
    pub async fn live_cli_vm(&self, user_id: &str) -> Result<Option<Vm>, StoreError> {
        Ok(self
            .vms_of(user_id)
            .await?
            .into_iter()
            .rfind(|v| v.kind == super::VmKind::Cli && !v.life.state.is_final()))
    }

    /// Move a VM to [`VmState::Stopping`] on its owner's request; the driver
    /// then destroys it at the host.
    pub async fn request_vm_stop(&self, vm: &Vm) -> Result<Vm, StoreError> {
        self.transition_vm(vm, VmState::Stopping, None, super::Also::default())
            .await
    }

    /// Metadata of the user's credentials, by provider.
    pub async fn credentials_of(&self, user_id: &str) -> Result<Vec<CredentialInfo>, StoreError> {
        type Row = (
            String,
            i64,
            String,
            i64,
            i64,
            Option<String>,
            Option<i64>,
            Option<i64>,
            String,
            Option<String>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT provider, version, key_id, created_at, updated_at, holder_vm_id,
                    refreshed_at, expires_at, status, status_reason FROM credentials
             WHERE user_id = $1 ORDER BY provider",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| CredentialInfo {
                provider: r.0,
                version: r.1,
                key_id: r.2,
                created_at: r.3,
                updated_at: r.4,
                holder_vm_id: r.5,
                refreshed_at: r.6,
                expires_at: r.7,
                status: r.8,
                status_reason: r.9,
            })
            .collect())
    }

    /// Delete the user's credential for `provider` (with a `deleted` event);
    /// `false` when there was none.
    pub async fn delete_credential(
        &self,
        user_id: &str,
        provider: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query("DELETE FROM credentials WHERE user_id = $1 AND provider = $2")
            .bind(user_id)
            .bind(provider)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 0 {
            return Ok(false);
        }
        Self::append_event(
            &mut tx,
            now_ms(),
            "credential",
            &format!("{user_id}/{provider}"),
            Some(user_id),
            "deleted",
            None,
            json!({ "provider": provider }),
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Append a note to a session's timeline (an event that changes no
    /// state, e.g. the person typed into the login). `detail` must hold no
    /// secret.
    pub async fn note_session(
        &self,
        s: &super::Session,
        kind: &str,
        detail: serde_json::Value,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        Self::append_event(
            &mut tx,
            now_ms(),
            "session",
            &s.id,
            Some(&s.user_id),
            kind,
            None,
            detail,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Events of one subject with an id above `after`, oldest first.
    pub async fn events_after(
        &self,
        subject_kind: &str,
        subject_id: &str,
        after: i64,
    ) -> Result<Vec<Event>, StoreError> {
        let mut all = self.events_for(subject_kind, subject_id).await?;
        all.retain(|e| e.id > after);
        Ok(all)
    }
}
