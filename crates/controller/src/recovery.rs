//! Restart recovery: reload every non-final VM and session and decide, per
//! record, whether it continues where it was, steps back to retry, or fails
//! with a clear reason — so nothing a previous controller left behind stays
//! stuck (the prototype lost its sessions on every restart).
//!
//! VMs are settled first, against what their host reports now; sessions are
//! then settled against their browser VM's (already settled) record. The
//! decisions are pure functions of (record, observation, clock), tested over
//! every state; [`recover`] applies them through the store, so each change is
//! one transaction with its event like any other.
//!
//! Prompt runs need nothing here: a run's process lives in its VM and its
//! record keeps how far its output was read, so the driver's next step
//! ([`crate::driver::runs`]) reads on from that offset, or marks the run
//! lost with the reason once the VM (settled above) or the run's directory
//! in it is gone.

use std::future::Future;
use std::sync::Arc;

use crate::state::{Failure, FailureReason, Lifecycle, SessionState, VmState};
use crate::store::{Also, Session, Store, StoreError, Vm};
use crate::util::now_ms;

/// What a host reports about one of its VMs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostVm {
    /// Still being created/booted.
    Starting,
    /// Booted and healthy.
    Running,
    /// vCPUs stopped, memory kept.
    Paused,
    /// Being torn down.
    Stopping,
    /// Powered off with its disks kept (a stopped CLI VM): it can be
    /// started again; the host's reason when it went off by itself.
    Off(Option<String>),
    /// Not running any more (ended, failed, or unknown to the host), with
    /// the host's reason when it has one.
    Gone(Option<String>),
    /// The host could not be asked (unreachable, or not a host we know).
    Unknown,
}

/// The one question recovery asks hosts. Implemented for every
/// [`crate::driver::HostApi`] (the in-process [`LocalHost`] and the HTTP
/// [`crate::driver::RemoteHost`]).
pub trait HostLookup: Send + Sync {
    /// Status of `host_vm_id` on `host_id`.
    fn vm_status(&self, host_id: &str, host_vm_id: &str) -> impl Future<Output = HostVm> + Send;
}

/// The in-process host agent of `polydev up`, registered as `host_id`.
pub struct LocalHost {
    /// The id this host has in the store's `hosts` table.
    pub host_id: String,
    /// The host agent.
    pub manager: Arc<polydev_host::Manager>,
}

/// Every host the driver can talk to answers recovery's question the same
/// way (one mapping: [`crate::driver::host::host_vm`]).
impl<T: crate::driver::HostApi + ?Sized> HostLookup for T {
    async fn vm_status(&self, host_id: &str, host_vm_id: &str) -> HostVm {
        if host_id != self.host_id() {
            return HostVm::Unknown;
        }
        crate::driver::host::host_vm(&self.inspect(host_vm_id).await)
    }
}

/// What to do with one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision<S> {
    /// Leave it; the driver continues from this state.
    Keep,
    /// Step to this state (re-attach, retry, or finish a teardown).
    Move(S),
    /// Fail it.
    Fail(Failure),
}

fn overdue(deadline_at: Option<i64>, now: i64) -> bool {
    deadline_at.is_some_and(|d| d < now)
}

fn gone_detail(what: &str, reason: &Option<String>) -> String {
    match reason {
        Some(r) => format!("{what} ({r})"),
        None => what.to_string(),
    }
}

/// Decide a VM's fate from what its host reports (`None`: not placed yet).
pub fn decide_vm(vm: &Vm, host: Option<&HostVm>, now: i64) -> Decision<VmState> {
    use Decision::*;
    use VmState::*;
    let st = vm.life.state;
    if st.is_final() {
        return Keep;
    }
    // Re-attaching to a VM that came up while we were down beats a timeout.
    if matches!((st, host), (Creating | Resuming, Some(HostVm::Running))) {
        return Move(Running);
    }
    if overdue(vm.life.deadline_at, now) {
        return Fail(Failure::new(
            FailureReason::Timeout,
            format!("{st} passed its deadline while the controller was down"),
        ));
    }
    // `Some(reason)`: the VM is not running at its host (or was never placed).
    let gone: Option<Option<String>> = match host {
        None => Some(None),
        Some(HostVm::Gone(r) | HostVm::Off(r)) => Some(r.clone()),
        Some(_) => None,
    };
    // Gone for good: a VM that is off can still be started.
    let lost = match host {
        None | Some(HostVm::Gone(_)) => gone.clone(),
        Some(_) => None,
    };
    match st {
        Pending | Hibernated | Destroyed | Failed => Keep,
        // Placed but not running at the host: place it again (bounded by
        // Creating's entry limit).
        Creating => match gone {
            Some(_) => Move(Pending),
            None => Keep,
        },
        Running => match gone {
            Some(r) => Fail(Failure::new(
                FailureReason::VmDied,
                gone_detail("VM ended while the controller was down", &r),
            )),
            None => Keep,
        },
        // A stop (power off, disks kept) interrupted by the restart: off
        // at the host is the outcome; still running, the driver powers it
        // off again.
        Hibernating => match (lost, host) {
            (Some(r), _) => Fail(Failure::new(
                FailureReason::VmDied,
                gone_detail("VM ended while it was being stopped", &r),
            )),
            (None, Some(HostVm::Off(_))) => Move(Hibernated),
            (None, _) => Keep,
        },
        // Still off: the driver starts it again.
        Resuming => match lost {
            Some(r) => Fail(Failure::new(
                FailureReason::VmDied,
                gone_detail("VM ended while it was being started", &r),
            )),
            None => Keep,
        },
        // Destroy was asked for and the VM is gone: that is the outcome
        // (one that is only off still has its disk: the driver destroys it).
        Stopping => match lost {
            Some(_) => Move(Destroyed),
            None => Keep,
        },
    }
}

/// The browser VM as a session sees it after VM recovery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrowserVm {
    /// No VM recorded yet.
    None,
    /// Pending or being created.
    Starting,
    /// Running (or in any other live state).
    Live,
    /// Final: failed or destroyed.
    Gone,
}

impl BrowserVm {
    /// Classify a VM record.
    pub fn of(vm: Option<&Vm>) -> Self {
        match vm.map(|v| v.life.state) {
            None => BrowserVm::None,
            Some(VmState::Pending | VmState::Creating) => BrowserVm::Starting,
            Some(s) if s.is_final() => BrowserVm::Gone,
            Some(_) => BrowserVm::Live,
        }
    }
}

/// Decide a session's fate from its browser VM's record.
pub fn decide_session(s: &Session, vm: BrowserVm, now: i64) -> Decision<SessionState> {
    use Decision::*;
    use SessionState::*;
    let st = s.life.state;
    if st.is_final() {
        return Keep;
    }
    if overdue(s.life.deadline_at, now) {
        return Fail(Failure::new(
            FailureReason::Timeout,
            format!("{st} passed its deadline while the controller was down"),
        ));
    }
    let vm_died = || {
        Fail(Failure::new(
            FailureReason::VmDied,
            format!("the browser VM ended while the controller was down ({st}); start the connection again"),
        ))
    };
    match (st, vm) {
        (Requested, _) => Keep,
        // The VM start failed for good: retry from the top (bounded by
        // StartingVm's entry limit).
        (StartingVm, BrowserVm::Gone) => Move(Requested),
        (StartingVm, _) => Keep,
        // The login, the user's sign-in and the credential files all live in
        // the browser VM: without it they are lost.
        (StartingLogin | AwaitingUser | Capturing, BrowserVm::Gone | BrowserVm::None) => vm_died(),
        (StartingLogin | AwaitingUser | Capturing, _) => Keep,
        // The credential is already in the vault; delivery is idempotent and
        // does not need the browser VM.
        (Delivering, _) => Keep,
        (Completed | Cancelled | Failed, _) => Keep,
    }
}

/// What [`recover`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Records left in their state for the driver to continue.
    pub kept: usize,
    /// Records moved to another non-failed state (re-attached, retried, finished).
    pub moved: usize,
    /// Records failed, with their ids.
    pub failed: Vec<String>,
}

/// Settle every non-final VM and session after a (re)start.
pub async fn recover<H: HostLookup + ?Sized>(
    store: &Store,
    hosts: &H,
) -> Result<Report, StoreError> {
    let mut report = Report::default();
    for vm in store.non_final_vms().await? {
        let host = match (&vm.host_id, &vm.host_vm_id) {
            (Some(h), Some(v)) => Some(hosts.vm_status(h, v).await),
            _ => None,
        };
        let d = decide_vm(&vm, host.as_ref(), now_ms());
        apply(&mut report, &vm.id, d, |to, f| {
            store.transition_vm(&vm, to, f, Also::default())
        })
        .await?;
    }
    for s in store.non_final_sessions().await? {
        let vm = match &s.browser_vm_id {
            Some(id) => Some(store.vm(id).await?),
            None => None,
        };
        let d = decide_session(&s, BrowserVm::of(vm.as_ref()), now_ms());
        apply(&mut report, &s.id, d, |to, f| {
            store.transition_session(&s, to, f, Also::default())
        })
        .await?;
    }
    tracing::info!(
        kept = report.kept,
        moved = report.moved,
        failed = report.failed.len(),
        "recovered records after start"
    );
    Ok(report)
}

/// Fail every non-final VM and session whose state deadline has passed
/// (run periodically while the controller runs; [`recover`] covers the time
/// it was down). Returns the ids failed. A record that moved meanwhile is
/// left to its new deadline.
pub async fn fail_overdue(store: &Store, now: i64) -> Result<Vec<String>, StoreError> {
    let mut failed = Vec::new();
    let timeout = |st: &dyn std::fmt::Display, since: i64| {
        Failure::new(
            FailureReason::Timeout,
            format!(
                "{st} did not finish within its limit ({} s in state)",
                (now - since) / 1000
            ),
        )
    };
    for vm in store.non_final_vms().await? {
        if overdue(vm.life.deadline_at, now) {
            let f = timeout(&vm.life.state, vm.life.state_since);
            match store
                .transition_vm(&vm, VmState::Failed, Some(f), Also::default())
                .await
            {
                Ok(_) => failed.push(vm.id.clone()),
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }
    for s in store.non_final_sessions().await? {
        if overdue(s.life.deadline_at, now) {
            let f = timeout(&s.life.state, s.life.state_since);
            match store
                .transition_session(&s, SessionState::Failed, Some(f), Also::default())
                .await
            {
                Ok(_) => failed.push(s.id.clone()),
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(failed)
}

async fn apply<S, R, F, Fut>(
    report: &mut Report,
    id: &str,
    d: Decision<S>,
    step: F,
) -> Result<(), StoreError>
where
    S: Lifecycle,
    F: FnOnce(S, Option<Failure>) -> Fut,
    Fut: Future<Output = Result<R, StoreError>>,
{
    match d {
        Decision::Keep => report.kept += 1,
        Decision::Move(to) => {
            step(to, None).await?;
            report.moved += 1;
        }
        Decision::Fail(f) => {
            tracing::warn!(id, reason = %f.reason, detail = %f.detail, "failing record on recovery");
            step(S::FAILED, Some(f)).await?;
            report.failed.push(id.to_string());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Life, VmKind};

    fn vm(state: VmState, deadline_at: Option<i64>, placed: bool) -> Vm {
        Vm {
            id: "vm-1".into(),
            user_id: "usr-1".into(),
            kind: VmKind::Browser,
            host_id: placed.then(|| "h1".into()),
            host_vm_id: placed.then(|| "vm-abc".into()),
            created_at: 0,
            life: Life {
                state,
                state_since: 0,
                deadline_at,
                attempts: 1,
                failure: None,
                version: 1,
            },
        }
    }

    fn session(state: SessionState, deadline_at: Option<i64>) -> Session {
        Session {
            id: "ses-1".into(),
            user_id: "usr-1".into(),
            provider: "codex".into(),
            browser_vm_id: None,
            created_at: 0,
            life: Life {
                state,
                state_since: 0,
                deadline_at,
                attempts: 1,
                failure: None,
                version: 1,
            },
        }
    }

    fn host_views() -> Vec<Option<HostVm>> {
        vec![
            None,
            Some(HostVm::Starting),
            Some(HostVm::Running),
            Some(HostVm::Paused),
            Some(HostVm::Stopping),
            Some(HostVm::Gone(None)),
            Some(HostVm::Gone(Some("killed by SIGKILL".into()))),
            Some(HostVm::Off(None)),
            Some(HostVm::Off(Some("start failed: no answer".into()))),
            Some(HostVm::Unknown),
        ]
    }

    /// Every decision over every (state, observation, deadline) is a legal
    /// step of the machine, and an overdue record never stays as it is.
    #[test]
    fn vm_decisions_are_valid_transitions() {
        for &st in VmState::ALL {
            for h in host_views() {
                for (deadline, overdue) in
                    [(Some(1_000), true), (Some(10_000), false), (None, false)]
                {
                    let v = vm(st, deadline, h.is_some());
                    let d = decide_vm(&v, h.as_ref(), 5_000);
                    match &d {
                        Decision::Keep => {
                            assert!(!overdue || st.is_final(), "{st} {h:?}: overdue kept")
                        }
                        Decision::Move(to) => assert!(st.valid_transition(*to), "{st} -> {to}"),
                        Decision::Fail(f) => {
                            assert!(st.valid_transition(VmState::Failed), "{st} fail");
                            assert!(!f.detail.is_empty());
                        }
                    }
                    if st.is_final() {
                        assert_eq!(d, Decision::Keep);
                    }
                }
            }
        }
    }

    #[test]
    fn vm_decisions_examples() {
        use VmState::*;
        let run = Some(HostVm::Running);
        let gone = Some(HostVm::Gone(Some("killed by SIGKILL".into())));
        assert_eq!(
            decide_vm(&vm(Creating, Some(1), true), run.as_ref(), 5),
            Decision::Move(Running)
        );
        assert_eq!(
            decide_vm(&vm(Creating, None, true), gone.as_ref(), 5),
            Decision::Move(Pending)
        );
        assert_eq!(
            decide_vm(&vm(Stopping, None, true), gone.as_ref(), 5),
            Decision::Move(Destroyed)
        );
        assert_eq!(
            decide_vm(&vm(Running, None, true), run.as_ref(), 5),
            Decision::Keep
        );
        // A stop or start the restart interrupted is finished, not failed:
        // off is where a stop ends and where a start begins.
        let off = Some(HostVm::Off(None));
        assert_eq!(
            decide_vm(&vm(Hibernating, None, true), off.as_ref(), 5),
            Decision::Move(Hibernated)
        );
        for st in [Hibernating, Hibernated, Resuming] {
            let kept = if st == Hibernating { &run } else { &off };
            assert_eq!(
                decide_vm(&vm(st, None, true), kept.as_ref(), 5),
                Decision::Keep,
                "{st}"
            );
        }
        assert_eq!(
            decide_vm(&vm(Resuming, None, true), run.as_ref(), 5),
            Decision::Move(Running)
        );
        // A VM being destroyed that is only off still has its disk.
        assert_eq!(
            decide_vm(&vm(Stopping, None, true), off.as_ref(), 5),
            Decision::Keep
        );
        match decide_vm(&vm(Running, None, true), gone.as_ref(), 5) {
            Decision::Fail(f) => {
                assert_eq!(f.reason, FailureReason::VmDied);
                assert!(f.detail.contains("SIGKILL"), "{}", f.detail);
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn session_decisions_are_valid_transitions() {
        let vms = [
            BrowserVm::None,
            BrowserVm::Starting,
            BrowserVm::Live,
            BrowserVm::Gone,
        ];
        for &st in SessionState::ALL {
            for vmv in vms {
                for (deadline, overdue) in [(Some(1_000), true), (Some(10_000), false)] {
                    let d = decide_session(&session(st, deadline), vmv, 5_000);
                    match &d {
                        Decision::Keep => assert!(!overdue || st.is_final(), "{st}: overdue kept"),
                        Decision::Move(to) => assert!(st.valid_transition(*to), "{st} -> {to}"),
                        Decision::Fail(_) => assert!(st.valid_transition(SessionState::Failed)),
                    }
                }
            }
        }
        // Only the VM-bound states die with their browser VM.
        let d = decide_session(
            &session(SessionState::AwaitingUser, None),
            BrowserVm::Gone,
            5,
        );
        assert!(matches!(
            d,
            Decision::Fail(Failure {
                reason: FailureReason::VmDied,
                ..
            })
        ));
        let d = decide_session(&session(SessionState::Delivering, None), BrowserVm::Gone, 5);
        assert_eq!(d, Decision::Keep);
    }
}
