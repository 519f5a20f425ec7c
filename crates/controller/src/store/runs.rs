//! Prompt runs and their events (`runs`, `run_events`; migration 7).
//!
//! A run's row changes only by compare-and-swap on its `version`, and
//! everything one driver step learned (output events, the new read offset,
//! a state change with its `state` event) is one transaction: a controller
//! killed between two steps re-reads the output from the stored offset, so
//! no line is stored twice or lost. Every query filters by owner where a
//! user asks.

use serde_json::json;

use super::{Dialect, Store, StoreError};
use crate::util::{new_id, now_ms};

/// Where a run stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Accepted; the driver has not started it in the VM yet.
    Queued,
    /// Started in the VM; its output is being read.
    Running,
    /// Exited 0.
    Succeeded,
    /// Exited non-zero, could not start, timed out or printed too much.
    Failed,
    /// Cancelled by its user.
    Cancelled,
    /// Its VM or its directory in the VM went away before it ended.
    Lost,
}

impl RunState {
    /// Every state.
    pub const ALL: [RunState; 6] = [
        RunState::Queued,
        RunState::Running,
        RunState::Succeeded,
        RunState::Failed,
        RunState::Cancelled,
        RunState::Lost,
    ];

    /// Database and API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
            RunState::Lost => "lost",
        }
    }

    /// Whether the run is over.
    pub fn is_final(self) -> bool {
        !matches!(self, RunState::Queued | RunState::Running)
    }

    /// Whether a run may go from `self` to `to`.
    pub fn valid_transition(self, to: RunState) -> bool {
        use RunState::*;
        matches!(
            (self, to),
            (Queued, Running | Failed | Cancelled | Lost)
                | (Running, Succeeded | Failed | Cancelled | Lost)
        )
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        RunState::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| StoreError::Corrupt {
                table: "runs",
                detail: format!("unknown state {s:?}"),
            })
    }
}

/// A run record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    /// `run-…`.
    pub id: String,
    /// Owner.
    pub user_id: String,
    /// The CLI VM it runs in (`vm-…`).
    pub vm_id: String,
    /// Provider id.
    pub provider: String,
    /// The prompt, passed to the provider's command as one argument.
    pub prompt: String,
    /// Working directory in the VM (absolute).
    pub cwd: String,
    /// Longest the run may take before it is stopped.
    pub timeout_secs: i64,
    /// State.
    pub state: RunState,
    /// Why it failed, was lost or cancelled.
    pub reason: Option<String>,
    /// The command's exit code, once it exited.
    pub exit_code: Option<i64>,
    /// Its user asked to cancel it; the driver stops it in the VM.
    pub cancel_requested: bool,
    /// Bytes of the output file read into events so far.
    pub output_offset: i64,
    /// The sequence number the next event gets.
    pub next_seq: i64,
    /// Created (ms).
    pub created_at: i64,
    /// Started in the VM (ms).
    pub started_at: Option<i64>,
    /// Finished (ms).
    pub finished_at: Option<i64>,
    /// Row version (the compare-and-swap token).
    pub version: i64,
}

/// What a new run is.
#[derive(Clone, Debug)]
pub struct NewRun {
    /// Owner.
    pub user_id: String,
    /// The owner's CLI VM.
    pub vm_id: String,
    /// Provider id.
    pub provider: String,
    /// The prompt.
    pub prompt: String,
    /// Working directory (absolute).
    pub cwd: String,
    /// Time limit.
    pub timeout_secs: i64,
}

/// One event to store: a parsed output line or a state change.
#[derive(Clone, Debug, PartialEq)]
pub struct NewRunEvent {
    /// `output` or `state`.
    pub source: &'static str,
    /// Output: the JSON object's `type` (or `raw`); state: the new state.
    pub kind: String,
    /// Output: the JSON value (`null` for a raw line); state: its detail.
    pub data: serde_json::Value,
    /// The line as printed (without its newline); empty for state events.
    pub raw: String,
}

/// A stored event of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunEvent {
    /// The run's event number (1, 2, …, the `queued` event first; the SSE
    /// `id`).
    pub seq: i64,
    /// Time it was stored (ms).
    pub at: i64,
    /// `output` or `state`.
    pub source: String,
    /// See [`NewRunEvent::kind`].
    pub kind: String,
    /// See [`NewRunEvent::data`].
    pub data: serde_json::Value,
    /// See [`NewRunEvent::raw`].
    pub raw: String,
}

/// One driver step's changes to a run, applied together
/// ([`Store::advance_run`]).
#[derive(Clone, Debug, Default)]
pub struct RunStep {
    /// Output events read in this step.
    pub events: Vec<NewRunEvent>,
    /// The new read offset (with `events`).
    pub output_offset: Option<i64>,
    /// A new state (a `state` event is added), with its reason and the
    /// exit code.
    pub state: Option<(RunState, Option<String>, Option<i64>)>,
    /// Ask the driver to stop the run.
    pub cancel_requested: bool,
}

const RUN_COLS: &str = "id, user_id, vm_id, provider, prompt, cwd, timeout_secs, state, reason, \
     exit_code, cancel_requested, output_offset, next_seq, created_at, started_at, finished_at, version";

fn run_from(r: &sqlx::any::AnyRow) -> Result<Run, StoreError> {
    use sqlx::Row as _;
    let state: String = r.try_get(7)?;
    let cancel: i64 = r.try_get(10)?;
    Ok(Run {
        id: r.try_get(0)?,
        user_id: r.try_get(1)?,
        vm_id: r.try_get(2)?,
        provider: r.try_get(3)?,
        prompt: r.try_get(4)?,
        cwd: r.try_get(5)?,
        timeout_secs: r.try_get(6)?,
        state: RunState::parse(&state)?,
        reason: r.try_get(8)?,
        exit_code: r.try_get(9)?,
        cancel_requested: cancel != 0,
        output_offset: r.try_get(11)?,
        next_seq: r.try_get(12)?,
        created_at: r.try_get(13)?,
        started_at: r.try_get(14)?,
        finished_at: r.try_get(15)?,
        version: r.try_get(16)?,
    })
}

fn active_list() -> &'static str {
    "'queued', 'running'"
}

impl Store {
    /// Create a queued run unless its user already has `max_active` runs
    /// queued or running ([`StoreError::RunLimit`] then). The count and the
    /// insert are one transaction holding the user's row (PostgreSQL) or
    /// the write lock (SQLite), so concurrent creates cannot overshoot.
    pub async fn create_run_limited(
        &self,
        new: NewRun,
        max_active: usize,
    ) -> Result<Run, StoreError> {
        let now = now_ms();
        let id = new_id("run")?;
        let mut tx = self.begin_write().await?;
        if self.dialect == Dialect::Postgres {
            sqlx::query("SELECT id FROM users WHERE id = $1 FOR UPDATE")
                .bind(&new.user_id)
                .execute(&mut *tx)
                .await?;
        }
        let active: Vec<(String,)> = sqlx::query_as(&format!(
            "SELECT id FROM runs WHERE user_id = $1 AND state IN ({}) ORDER BY created_at, id",
            active_list()
        ))
        .bind(&new.user_id)
        .fetch_all(&mut *tx)
        .await?;
        if active.len() >= max_active {
            return Err(StoreError::RunLimit {
                limit: max_active,
                active: active.into_iter().map(|r| r.0).collect(),
            });
        }
        sqlx::query(
            "INSERT INTO runs (id, user_id, vm_id, provider, prompt, cwd, timeout_secs, state, created_at, next_seq)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', $8, 2)",
        )
        .bind(&id)
        .bind(&new.user_id)
        .bind(&new.vm_id)
        .bind(&new.provider)
        .bind(&new.prompt)
        .bind(&new.cwd)
        .bind(new.timeout_secs)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO run_events (run_id, user_id, seq, at, source, kind, data, raw)
             VALUES ($1, $2, 1, $3, 'state', 'queued', $4, '')",
        )
        .bind(&id)
        .bind(&new.user_id)
        .bind(now)
        .bind(json!({ "state": "queued" }).to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.run(&id).await
    }

    /// A run by id.
    pub async fn run(&self, id: &str) -> Result<Run, StoreError> {
        let row = sqlx::query(&format!("SELECT {RUN_COLS} FROM runs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                kind: "run",
                id: id.to_string(),
            })?;
        run_from(&row)
    }

    /// The user's runs, newest first: at most `limit`, and only those
    /// older than the run `before` (a cursor: the last id of the previous
    /// page; another user's run is not found).
    pub async fn runs_of(
        &self,
        user_id: &str,
        limit: i64,
        before: Option<&str>,
    ) -> Result<Vec<Run>, StoreError> {
        let rows = match before {
            None => {
                sqlx::query(&format!(
                    "SELECT {RUN_COLS} FROM runs WHERE user_id = $1
                     ORDER BY created_at DESC, id DESC LIMIT $2"
                ))
                .bind(user_id)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            Some(b) => {
                let cursor = self.run(b).await?;
                if cursor.user_id != user_id {
                    return Err(StoreError::NotFound {
                        kind: "run",
                        id: b.to_string(),
                    });
                }
                sqlx::query(&format!(
                    "SELECT {RUN_COLS} FROM runs WHERE user_id = $1
                       AND (created_at < $2 OR (created_at = $2 AND id < $3))
                     ORDER BY created_at DESC, id DESC LIMIT $4"
                ))
                .bind(user_id)
                .bind(cursor.created_at)
                .bind(&cursor.id)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(run_from).collect()
    }

    /// Every run that is queued or running (what the driver steps, and
    /// what a restarted controller picks up again).
    pub async fn active_runs(&self) -> Result<Vec<Run>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLS} FROM runs WHERE state IN ({}) ORDER BY created_at, id",
            active_list()
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(run_from).collect()
    }

    /// How many runs in VM `vm_id` are queued or running.
    pub async fn active_runs_in_vm(&self, vm_id: &str) -> Result<i64, StoreError> {
        let (n,): (i64,) = sqlx::query_as(&format!(
            "SELECT COUNT(*) FROM runs WHERE vm_id = $1 AND state IN ({})",
            active_list()
        ))
        .bind(vm_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(n)
    }

    /// Apply one step's changes to `run` (read at its version) in one
    /// transaction: its events with the next sequence numbers, the new
    /// offset, the new state with a `state` event. [`StoreError::Conflict`]
    /// when the row changed since it was read (nothing is applied).
    pub async fn advance_run(&self, run: &Run, step: RunStep) -> Result<Run, StoreError> {
        let now = now_ms();
        let mut events = step.events;
        let (state, reason, exit_code) = match &step.state {
            Some((to, reason, code)) => {
                if !run.state.valid_transition(*to) {
                    return Err(StoreError::InvalidTransition {
                        machine: "run",
                        id: run.id.clone(),
                        from: run.state.as_str(),
                        to: to.as_str(),
                    });
                }
                let mut detail = json!({ "state": to.as_str() });
                if let Some(r) = reason {
                    detail["reason"] = json!(r);
                }
                if let Some(c) = code {
                    detail["exit_code"] = json!(c);
                }
                events.push(NewRunEvent {
                    source: "state",
                    kind: to.as_str().to_string(),
                    data: detail,
                    raw: String::new(),
                });
                (*to, reason.clone(), *code)
            }
            None => (run.state, run.reason.clone(), run.exit_code),
        };
        let started_at = match (run.started_at, state) {
            (None, RunState::Running) => Some(now),
            (s, _) => s,
        };
        let finished_at = match (run.finished_at, state.is_final()) {
            (None, true) => Some(now),
            (f, _) => f,
        };
        let n = i64::try_from(events.len()).unwrap_or(i64::MAX);
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE runs SET state = $1, reason = $2, exit_code = $3, cancel_requested = $4,
                output_offset = $5, next_seq = next_seq + $6, started_at = $7, finished_at = $8,
                version = version + 1
             WHERE id = $9 AND version = $10",
        )
        .bind(state.as_str())
        .bind(reason)
        .bind(exit_code)
        .bind(i64::from(run.cancel_requested || step.cancel_requested))
        .bind(step.output_offset.unwrap_or(run.output_offset))
        .bind(n)
        .bind(started_at)
        .bind(finished_at)
        .bind(&run.id)
        .bind(run.version)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Conflict {
                kind: "run",
                id: run.id.clone(),
                expected: run.version,
            });
        }
        for (i, e) in events.iter().enumerate() {
            sqlx::query(
                "INSERT INTO run_events (run_id, user_id, seq, at, source, kind, data, raw)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&run.id)
            .bind(&run.user_id)
            .bind(run.next_seq + i64::try_from(i).unwrap_or(i64::MAX))
            .bind(now)
            .bind(e.source)
            .bind(&e.kind)
            .bind(e.data.to_string())
            .bind(&e.raw)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.run(&run.id).await
    }

    /// Up to `limit` events of a run with a sequence number above `after`,
    /// in order.
    pub async fn run_events_after(
        &self,
        run_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<RunEvent>, StoreError> {
        let rows: Vec<(i64, i64, String, String, String, String)> = sqlx::query_as(
            "SELECT seq, at, source, kind, data, raw FROM run_events
             WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(run_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(seq, at, source, kind, data, raw)| {
                Ok(RunEvent {
                    seq,
                    at,
                    source,
                    kind,
                    data: serde_json::from_str(&data).map_err(|e| StoreError::Corrupt {
                        table: "run_events",
                        detail: format!("data is not JSON: {e}"),
                    })?,
                    raw,
                })
            })
            .collect()
    }

    /// Retention: delete finished runs (and their events) that finished
    /// before `finished_before` (ms), and every user's finished runs beyond
    /// their newest `keep_per_user`. Returns how many runs went.
    pub async fn purge_runs(
        &self,
        finished_before: i64,
        keep_per_user: i64,
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        let doomed: Vec<(String,)> = sqlx::query_as(
            "SELECT r.id FROM runs r WHERE r.finished_at IS NOT NULL AND (r.finished_at < $1 OR
                (SELECT COUNT(*) FROM runs n WHERE n.user_id = r.user_id AND n.finished_at IS NOT NULL
                   AND (n.created_at > r.created_at OR (n.created_at = r.created_at AND n.id > r.id))) >= $2)",
        )
        .bind(finished_before)
        .bind(keep_per_user)
        .fetch_all(&mut *tx)
        .await?;
        for (id,) in &doomed {
            sqlx::query("DELETE FROM run_events WHERE run_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM runs WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(doomed.len() as u64)
    }
}
