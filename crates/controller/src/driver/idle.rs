//! Idle hibernation of CLI VMs, and waking them again.
//!
//! A CLI VM is used when a terminal is attached to it (refreshed every
//! [`touch_every`] while it stays attached), when a run goes on in it and
//! when a credential is delivered into it: each use is recorded with
//! [`crate::store::Store::touch_vm`], outside the row's version so that a
//! use never makes a state change fail. One unused for
//! `cli_idle_hibernate_secs` is hibernated by the VM driver
//! ([`idle_past_limit`]); the next terminal, run or delivery [`awake`]s it
//! and the person only sees it take a moment longer.

use std::time::{Duration, Instant};

use super::Inner;
use crate::state::{Lifecycle, VmState};
use crate::store::{Also, StoreError, Vm, VmKind};
use crate::util::now_ms;

/// Why a CLI VM could not be had running.
#[derive(Debug, thiserror::Error)]
pub enum WakeError {
    /// It is in a state no wait leads out of to `running`.
    #[error("VM {vm} is {state}: it cannot be used; create a new CLI VM (POST /api/v1/vms)")]
    Ended {
        /// The VM.
        vm: String,
        /// Its state.
        state: &'static str,
    },
    /// It did not come up in time.
    #[error("VM {vm} was not running within {secs} s (it is {state}); try again in a minute")]
    Timeout {
        /// The VM.
        vm: String,
        /// How long was waited.
        secs: u64,
        /// Its state then.
        state: &'static str,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How often a use that lasts (an attached terminal) is recorded: often
/// enough that the idle limit never passes during it.
pub(super) fn touch_every(inner: &Inner) -> Duration {
    match inner.cfg.cli_idle_hibernate_secs {
        0 => Duration::from_secs(60),
        s => Duration::from_millis((s.saturating_mul(1000) / 3).clamp(500, 60_000)),
    }
}

/// How long a running CLI VM has been idle (ms), if past the configured
/// limit: nobody used it since, it has no run going, and it has been
/// running at least that long.
pub(super) async fn idle_past_limit(inner: &Inner, v: &Vm) -> Result<Option<i64>, StoreError> {
    let limit = inner.cfg.cli_idle_hibernate_secs;
    if v.kind != VmKind::Cli || limit == 0 || v.life.state != VmState::Running {
        return Ok(None);
    }
    let limit_ms = i64::try_from(limit.saturating_mul(1000)).unwrap_or(i64::MAX);
    let since = inner
        .store
        .vm_active_at(&v.id)
        .await?
        .unwrap_or(0)
        .max(v.life.state_since);
    let idle = now_ms().saturating_sub(since);
    if idle < limit_ms || inner.store.active_runs_in_vm(&v.id).await? > 0 {
        return Ok(None);
    }
    Ok(Some(idle))
}

/// Ask for `v` to be resumed if it is hibernated, recording the use so it
/// is not hibernated again at once. `Ok(true)` when it is running now.
pub(super) async fn wake(inner: &Inner, v: &Vm) -> Result<bool, StoreError> {
    inner.store.touch_vm(&v.id, now_ms()).await?;
    match v.life.state {
        VmState::Running => Ok(true),
        VmState::Hibernated => {
            match inner
                .store
                .transition_vm(v, VmState::Resuming, None, Also::default())
                .await
            {
                Ok(_) => {
                    tracing::info!(vm = %v.id, "resuming the hibernated CLI VM for a use");
                    inner.wake.notify_one();
                    Ok(false)
                }
                // Moved meanwhile (another waker): look again.
                Err(StoreError::Conflict { .. }) => Ok(false),
                Err(e) => Err(e),
            }
        }
        _ => Ok(false),
    }
}

/// Have VM `id` running within `limit`: resume it if it is hibernated,
/// wait while it hibernates, resumes or boots. The use is recorded.
pub(super) async fn awake(inner: &Inner, id: &str, limit: Duration) -> Result<Vm, WakeError> {
    let deadline = Instant::now() + limit;
    loop {
        let v = inner.store.vm(id).await?;
        let state = v.life.state;
        if !matches!(
            state,
            VmState::Pending
                | VmState::Creating
                | VmState::Running
                | VmState::Hibernating
                | VmState::Hibernated
                | VmState::Resuming
        ) {
            return Err(WakeError::Ended {
                vm: v.id,
                state: state.as_str(),
            });
        }
        if wake(inner, &v).await? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(WakeError::Timeout {
                vm: v.id,
                secs: limit.as_secs(),
                state: state.as_str(),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
