//! Counts across every user, for `/metrics` and the admin API: records by
//! state, failures by reason, how long completed logins took, and every
//! VM with its owner's name. Never for a user's own requests (those go
//! through [`super::listing`], filtered by owner).

use super::{Store, StoreError, Vm};

/// A table of lifecycle records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Records {
    /// Connect sessions.
    Sessions,
    /// VMs.
    Vms,
}

impl Records {
    fn table(self) -> &'static str {
        match self {
            Records::Sessions => "sessions",
            Records::Vms => "vms",
        }
    }
}

impl Store {
    /// How many records are in each state (states with none are absent).
    pub async fn count_by_state(&self, of: Records) -> Result<Vec<(String, i64)>, StoreError> {
        let sql = format!(
            "SELECT state, COUNT(*) FROM {} GROUP BY state ORDER BY state",
            of.table()
        );
        Ok(sqlx::query_as::<_, (String, i64)>(&sql)
            .fetch_all(&self.pool)
            .await?)
    }

    /// How many failed records there are per failure reason (`None`: a
    /// record that failed without one).
    pub async fn failures_by_reason(
        &self,
        of: Records,
    ) -> Result<Vec<(Option<String>, i64)>, StoreError> {
        let sql = format!(
            "SELECT failure_reason, COUNT(*) FROM {} WHERE state = 'failed' GROUP BY failure_reason ORDER BY failure_reason",
            of.table()
        );
        Ok(sqlx::query_as::<_, (Option<String>, i64)>(&sql)
            .fetch_all(&self.pool)
            .await?)
    }

    /// VMs ever requested.
    pub async fn vm_count(&self) -> Result<i64, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM vms")
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }

    /// For each completed connect session, milliseconds from its request to
    /// the credential delivered.
    pub async fn completed_login_millis(&self) -> Result<Vec<i64>, StoreError> {
        let rows: Vec<(i64,)> = sqlx::query_as(
            "SELECT state_since - created_at FROM sessions WHERE state = 'completed'",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(ms,)| ms).collect())
    }

    /// Every user's VMs, oldest first, each with its owner's name (`None`
    /// if the account is gone).
    pub async fn all_vms_with_owners(&self) -> Result<Vec<(Vm, Option<String>)>, StoreError> {
        let vms = self.vms_where("1 = 1", None).await?;
        let names: Vec<(String, String)> = sqlx::query_as("SELECT id, name FROM users")
            .fetch_all(&self.pool)
            .await?;
        let names: std::collections::HashMap<String, String> = names.into_iter().collect();
        Ok(vms
            .into_iter()
            .map(|v| {
                let owner = names.get(&v.user_id).cloned();
                (v, owner)
            })
            .collect())
    }
}
