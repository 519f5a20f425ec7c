//! VM records: creating them (at most one live CLI VM per user, enforced
//! by the database) and reading them.

use serde_json::json;

use super::{
    deadline_for, final_list, life_from, life_row, unique_to_duplicate, Life, Store, StoreError,
    Vm, VmKind, LIFE_COLS,
};
use crate::state::{Lifecycle, VmState};
use crate::util::{new_id, now_ms};

impl Store {
    /// Record a new VM in [`VmState::Pending`] (with its `created` event).
    pub async fn create_vm(&self, user_id: &str, kind: VmKind) -> Result<Vm, StoreError> {
        let now = now_ms();
        let vm = Vm {
            id: new_id("vm")?,
            user_id: user_id.to_string(),
            kind,
            host_id: None,
            host_vm_id: None,
            created_at: now,
            life: Life {
                state: VmState::INITIAL,
                state_since: now,
                deadline_at: deadline_for(VmState::INITIAL, now),
                attempts: 0,
                failure: None,
                version: 1,
            },
        };
        let mut tx = self.begin_write().await?;
        sqlx::query(&format!(
            "INSERT INTO vms (id, user_id, kind, created_at, {LIFE_COLS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0, NULL, NULL, 1)"
        ))
        .bind(&vm.id)
        .bind(&vm.user_id)
        .bind(kind.as_str())
        .bind(now)
        .bind(vm.life.state.as_str())
        .bind(now)
        .bind(vm.life.deadline_at)
        .execute(&mut *tx)
        .await
        // The partial unique index `vms_one_cli_per_user` (migration 4)
        // refuses a second CLI VM of a user that is not stopping or final;
        // the transaction rolls back, so the loser leaves no row or event.
        .map_err(|e| unique_to_duplicate(e, || format!("a CLI VM of user {user_id}")))?;
        Self::append_event(
            &mut tx,
            now,
            "vm",
            &vm.id,
            Some(user_id),
            "created",
            None,
            json!({ "kind": kind.as_str(), "state": vm.life.state.as_str() }),
        )
        .await?;
        tx.commit().await?;
        Ok(vm)
    }

    /// A VM by id.
    pub async fn vm(&self, id: &str) -> Result<Vm, StoreError> {
        self.vms_where("id = $1", Some(id))
            .await?
            .pop()
            .ok_or_else(|| StoreError::NotFound {
                kind: "vm",
                id: id.to_string(),
            })
    }

    /// Record a use of VM `id` at `at` (ms): the idle hibernation counts
    /// from the latest. Never moves the time back, and bumps no version.
    pub async fn touch_vm(&self, id: &str, at: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE vms SET active_at = $1 WHERE id = $2 AND (active_at IS NULL OR active_at < $1)",
        )
        .bind(at)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// When VM `id` was last used ([`Store::touch_vm`]); `None` if never.
    pub async fn vm_active_at(&self, id: &str) -> Result<Option<i64>, StoreError> {
        let row: Option<(Option<i64>,)> = sqlx::query_as("SELECT active_at FROM vms WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.and_then(|(a,)| a))
    }

    /// The states of the sessions whose browser VM is `id`.
    pub async fn browser_vm_session_states(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT state FROM sessions WHERE browser_vm_id = $1")
                .bind(id)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(|(s,)| s).collect())
    }

    /// Every VM not in a final state (what a restarting controller resumes).
    pub async fn non_final_vms(&self) -> Result<Vec<Vm>, StoreError> {
        let finals = final_list::<VmState>();
        self.vms_where(&format!("state NOT IN ({finals})"), None)
            .await
    }

    pub(super) async fn vms_where(
        &self,
        cond: &str,
        arg: Option<&str>,
    ) -> Result<Vec<Vm>, StoreError> {
        type Row = (String, String, String, Option<String>, Option<String>, i64);
        let sql = format!(
            "SELECT id, user_id, kind, host_id, host_vm_id, created_at, {LIFE_COLS} FROM vms WHERE {cond} ORDER BY created_at, id"
        );
        let mut q = sqlx::query(&sql);
        if let Some(a) = arg {
            q = q.bind(a);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                use sqlx::Row as _;
                let head: Row = (
                    r.try_get(0)?,
                    r.try_get(1)?,
                    r.try_get(2)?,
                    r.try_get(3)?,
                    r.try_get(4)?,
                    r.try_get(5)?,
                );
                Ok(Vm {
                    id: head.0,
                    user_id: head.1,
                    kind: VmKind::parse(&head.2)?,
                    host_id: head.3,
                    host_vm_id: head.4,
                    created_at: head.5,
                    life: life_from(life_row(r, 6)?)?,
                })
            })
            .collect()
    }
}
