//! Lifecycles of VMs and connect-provider sessions as explicit state machines.
//!
//! Each machine is a closed enum of states plus one exhaustive `match` that
//! names every allowed transition (the pattern of Cloud Hypervisor's
//! `VmState::valid_transition`). The store refuses anything else, so a row can
//! never reach a state by a path nobody wrote down. Per-state timeouts and the
//! retry budget live next to the table so they are reviewed together.

use std::fmt;
use std::time::Duration;

/// A state that was not recognised when parsed (from the database or a request).
#[derive(Debug, thiserror::Error)]
#[error("unknown {machine} state {value:?}; expected one of: {expected}")]
pub struct UnknownState {
    /// Which machine (`vm`, `session`, `failure reason`).
    pub machine: &'static str,
    /// The text that did not parse.
    pub value: String,
    /// The accepted spellings, comma separated.
    pub expected: String,
}

/// What every lifecycle offers to the store.
pub trait Lifecycle: Copy + Eq + fmt::Debug + fmt::Display + Sized + 'static {
    /// Name of the machine in errors and events (`vm`, `session`).
    const MACHINE: &'static str;
    /// Every state, for exhaustive tests and for parsing.
    const ALL: &'static [Self];
    /// The state a new record starts in.
    const INITIAL: Self;
    /// The one failure state (entered with a [`FailureReason`]).
    const FAILED: Self;
    /// Whether `self -> to` is allowed.
    fn valid_transition(self, to: Self) -> bool;
    /// A final state is never left.
    fn is_final(self) -> bool;
    /// How long a record may stay in this state before it is failed with
    /// [`FailureReason::Timeout`]; `None` for states that wait on a user
    /// without bound or are final.
    fn timeout(self) -> Option<Duration>;
    /// How many times this state may be entered (the first entry counts);
    /// `None` = no limit. Only the state a retry loops back to has a limit.
    fn entry_limit(self) -> Option<u32>;
    /// Stable lower-case name used in the database and the API.
    fn as_str(self) -> &'static str;
    /// Inverse of [`Lifecycle::as_str`].
    fn parse(s: &str) -> Result<Self, UnknownState> {
        Self::ALL
            .iter()
            .copied()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState {
                machine: Self::MACHINE,
                value: s.to_string(),
                expected: Self::ALL
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// Lifecycle of a VM as the controller sees it (the host agent has its own,
/// finer one; this is the record of intent and outcome).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VmState {
    /// Asked for, not yet placed on a host.
    Pending,
    /// Placed; the host agent is creating and booting it.
    Creating,
    /// Booted and healthy.
    Running,
    /// Being stopped: powered off at its host with its disks (`/home`)
    /// kept (a CLI VM its user stopped).
    Hibernating,
    /// Stopped with its disks kept; started again on request or when a
    /// delivery needs it.
    Hibernated,
    /// Being started again from its kept disks.
    Resuming,
    /// Being destroyed on request.
    Stopping,
    /// Gone on request. Final.
    Destroyed,
    /// Gone because something failed; the reason is recorded. Final.
    Failed,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Lifecycle for VmState {
    const MACHINE: &'static str = "vm";
    const ALL: &'static [Self] = &[
        Self::Pending,
        Self::Creating,
        Self::Running,
        Self::Hibernating,
        Self::Hibernated,
        Self::Resuming,
        Self::Stopping,
        Self::Destroyed,
        Self::Failed,
    ];
    const INITIAL: Self = Self::Pending;
    const FAILED: Self = Self::Failed;

    fn valid_transition(self, to: Self) -> bool {
        use VmState::*;
        match (self, to) {
            (Pending, Creating | Stopping | Failed) => true,
            // A failed create goes back to Pending for another placement
            // (bounded by Creating's entry limit).
            (Creating, Running | Pending | Stopping | Failed) => true,
            (Running, Hibernating | Stopping | Failed) => true,
            // A stop the host refuses leaves the VM running. A VM being
            // stopped or started can be destroyed: the destroy waits for
            // the host's power-off or boot to end.
            (Hibernating, Hibernated | Running | Stopping | Failed) => true,
            (Hibernated, Resuming | Stopping | Failed) => true,
            // A start the host could not finish leaves the VM off with its
            // disks: stopped again, to be started once more, not lost.
            (Resuming, Running | Hibernated | Stopping | Failed) => true,
            (Stopping, Destroyed | Failed) => true,
            (Destroyed | Failed, _) => false,
            (Pending | Creating | Running | Hibernating | Hibernated | Resuming | Stopping, _) => {
                false
            }
        }
    }

    fn is_final(self) -> bool {
        matches!(self, Self::Destroyed | Self::Failed)
    }

    fn timeout(self) -> Option<Duration> {
        use VmState::*;
        match self {
            // No host with capacity for this long is a failure, not a queue.
            Pending => Some(Duration::from_secs(120)),
            // The prototype's 34 s boots are what we must beat; TCG boots to
            // desktop in well under this.
            Creating => Some(Duration::from_secs(180)),
            Hibernating => Some(Duration::from_secs(120)),
            // A start is a whole boot: as long as a create's.
            Resuming => Some(Duration::from_secs(180)),
            Stopping => Some(Duration::from_secs(60)),
            Running | Hibernated | Destroyed | Failed => None,
        }
    }

    fn entry_limit(self) -> Option<u32> {
        match self {
            // "creation retries": three attempts, then Failed.
            Self::Creating => Some(3),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        use VmState::*;
        match self {
            Pending => "pending",
            Creating => "creating",
            Running => "running",
            Hibernating => "hibernating",
            Hibernated => "hibernated",
            Resuming => "resuming",
            Stopping => "stopping",
            Destroyed => "destroyed",
            Failed => "failed",
        }
    }
}

/// Lifecycle of a "Connect <provider>" session (MISSION.md, "The flow a user sees").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionState {
    /// Created by the user; no browser VM yet.
    Requested,
    /// The browser VM is being created.
    StartingVm,
    /// The desktop is up; the provider's login is being started.
    StartingLogin,
    /// The login runs and the auth URL is open in the VM's browser; the user signs in.
    AwaitingUser,
    /// Credential files appeared; they are being validated and sealed into the vault.
    Capturing,
    /// Delivering the sealed credential to the user's CLI VM.
    Delivering,
    /// Credential stored and delivered; browser VM destroyed. Final.
    Completed,
    /// Cancelled by the user. Final.
    Cancelled,
    /// Failed with a recorded reason. Final.
    Failed,
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Lifecycle for SessionState {
    const MACHINE: &'static str = "session";
    const ALL: &'static [Self] = &[
        Self::Requested,
        Self::StartingVm,
        Self::StartingLogin,
        Self::AwaitingUser,
        Self::Capturing,
        Self::Delivering,
        Self::Completed,
        Self::Cancelled,
        Self::Failed,
    ];
    const INITIAL: Self = Self::Requested;
    const FAILED: Self = Self::Failed;

    fn valid_transition(self, to: Self) -> bool {
        use SessionState::*;
        match (self, to) {
            (Requested, StartingVm | Cancelled | Failed) => true,
            // A browser VM that failed to start is retried (bounded by
            // StartingVm's entry limit) by going back to Requested.
            (StartingVm, StartingLogin | Requested | Cancelled | Failed) => true,
            (StartingLogin, AwaitingUser | Cancelled | Failed) => true,
            (AwaitingUser, Capturing | Cancelled | Failed) => true,
            // Files that do not validate yet (the CLI writes them in steps)
            // send the session back to waiting.
            (Capturing, Delivering | AwaitingUser | Failed) => true,
            // Once the credential is in the vault the user can no longer
            // cancel: the vault copy is theirs either way.
            (Delivering, Completed | Failed) => true,
            (Completed | Cancelled | Failed, _) => false,
            (Requested | StartingVm | StartingLogin | AwaitingUser | Capturing | Delivering, _) => {
                false
            }
        }
    }

    fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled | Self::Failed)
    }

    fn timeout(self) -> Option<Duration> {
        use SessionState::*;
        match self {
            Requested => Some(Duration::from_secs(60)),
            StartingVm => Some(Duration::from_secs(240)),
            // The provider's CLI starting up: Node.js CLIs take ≈45 s just
            // to print a version under TCG on an idle 2-core host, and a
            // host running several VMs is slower still; Gemini CLI draws
            // two dialogs (answered by its definition) before its URL.
            StartingLogin => Some(Duration::from_secs(480)),
            // A person signs in; long enough for 2FA, short enough that an
            // abandoned browser VM does not linger.
            AwaitingUser => Some(Duration::from_secs(15 * 60)),
            Capturing => Some(Duration::from_secs(180)),
            // May include booting the user's CLI VM (created, or started
            // again from its disk): longer than a create or a start.
            Delivering => Some(Duration::from_secs(300)),
            Completed | Cancelled | Failed => None,
        }
    }

    fn entry_limit(self) -> Option<u32> {
        match self {
            Self::StartingVm => Some(3),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        use SessionState::*;
        match self {
            Requested => "requested",
            StartingVm => "starting_vm",
            StartingLogin => "starting_login",
            AwaitingUser => "awaiting_user",
            Capturing => "capturing",
            Delivering => "delivering",
            Completed => "completed",
            Cancelled => "cancelled",
            Failed => "failed",
        }
    }
}

/// Why a VM or session failed: a closed set (for metrics by reason) plus a
/// free-text detail stored beside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// A state's deadline passed.
    Timeout,
    /// The retry budget of a state was used up.
    RetriesExhausted,
    /// No host could take the VM.
    NoCapacity,
    /// The host agent refused or failed to create/boot the VM.
    VmCreateFailed,
    /// The VM died unexpectedly.
    VmDied,
    /// The host the VM lived on is gone or unreachable.
    HostLost,
    /// Snapshot or restore failed.
    SnapshotFailed,
    /// The provider's login command failed or exited early.
    LoginFailed,
    /// The login ran but no auth URL was recognised.
    AuthUrlNotFound,
    /// Captured credential files did not validate.
    CredentialInvalid,
    /// The provider refused the delivered credential when the provider's
    /// check used it (e.g. userinfo answered 401).
    CredentialRejected,
    /// The VM's egress (the user's upstream, or direct egress) refused or
    /// failed the connections the login needs.
    EgressFailed,
    /// Sealing or opening the credential failed.
    VaultError,
    /// The credential could not be delivered to the CLI VM.
    DeliveryFailed,
    /// The controller stopped while the record was in a state it cannot resume.
    ControllerRestart,
    /// Anything else; the detail says what.
    Internal,
}

impl FailureReason {
    /// Every reason, for parsing and tests.
    pub const ALL: &'static [Self] = &[
        Self::Timeout,
        Self::RetriesExhausted,
        Self::NoCapacity,
        Self::VmCreateFailed,
        Self::VmDied,
        Self::HostLost,
        Self::SnapshotFailed,
        Self::LoginFailed,
        Self::AuthUrlNotFound,
        Self::CredentialInvalid,
        Self::CredentialRejected,
        Self::EgressFailed,
        Self::VaultError,
        Self::DeliveryFailed,
        Self::ControllerRestart,
        Self::Internal,
    ];

    /// Stable name used in the database, the API and metrics labels.
    pub fn as_str(self) -> &'static str {
        use FailureReason::*;
        match self {
            Timeout => "timeout",
            RetriesExhausted => "retries_exhausted",
            NoCapacity => "no_capacity",
            VmCreateFailed => "vm_create_failed",
            VmDied => "vm_died",
            HostLost => "host_lost",
            SnapshotFailed => "snapshot_failed",
            LoginFailed => "login_failed",
            AuthUrlNotFound => "auth_url_not_found",
            CredentialInvalid => "credential_invalid",
            CredentialRejected => "credential_rejected",
            EgressFailed => "egress_failed",
            VaultError => "vault_error",
            DeliveryFailed => "delivery_failed",
            ControllerRestart => "controller_restart",
            Internal => "internal",
        }
    }

    /// Inverse of [`FailureReason::as_str`].
    pub fn parse(s: &str) -> Result<Self, UnknownState> {
        Self::ALL
            .iter()
            .copied()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownState {
                machine: "failure reason",
                value: s.to_string(),
                expected: Self::ALL
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure: the closed reason plus what exactly happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The category.
    pub reason: FailureReason,
    /// Human-readable detail (never a secret).
    pub detail: String,
}

impl Failure {
    /// A failure with a reason and detail.
    pub fn new(reason: FailureReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The allowed pairs, written out independently of the match so a change
    /// to either is caught.
    fn vm_expected() -> Vec<(VmState, VmState)> {
        use VmState::*;
        vec![
            (Pending, Creating),
            (Pending, Stopping),
            (Pending, Failed),
            (Creating, Running),
            (Creating, Pending),
            (Creating, Stopping),
            (Creating, Failed),
            (Running, Hibernating),
            (Running, Stopping),
            (Running, Failed),
            (Hibernating, Hibernated),
            (Hibernating, Running),
            (Hibernating, Stopping),
            (Hibernating, Failed),
            (Hibernated, Resuming),
            (Hibernated, Stopping),
            (Hibernated, Failed),
            (Resuming, Running),
            (Resuming, Hibernated),
            (Resuming, Stopping),
            (Resuming, Failed),
            (Stopping, Destroyed),
            (Stopping, Failed),
        ]
    }

    fn session_expected() -> Vec<(SessionState, SessionState)> {
        use SessionState::*;
        vec![
            (Requested, StartingVm),
            (Requested, Cancelled),
            (Requested, Failed),
            (StartingVm, StartingLogin),
            (StartingVm, Requested),
            (StartingVm, Cancelled),
            (StartingVm, Failed),
            (StartingLogin, AwaitingUser),
            (StartingLogin, Cancelled),
            (StartingLogin, Failed),
            (AwaitingUser, Capturing),
            (AwaitingUser, Cancelled),
            (AwaitingUser, Failed),
            (Capturing, Delivering),
            (Capturing, AwaitingUser),
            (Capturing, Failed),
            (Delivering, Completed),
            (Delivering, Failed),
        ]
    }

    fn check_all_pairs<S: Lifecycle + std::hash::Hash>(expected: Vec<(S, S)>) {
        let allowed: std::collections::HashSet<(S, S)> = expected.into_iter().collect();
        let mut n = 0;
        for &from in S::ALL {
            for &to in S::ALL {
                n += 1;
                assert_eq!(
                    from.valid_transition(to),
                    allowed.contains(&(from, to)),
                    "{} {from} -> {to}",
                    S::MACHINE
                );
            }
        }
        assert_eq!(n, S::ALL.len() * S::ALL.len());
    }

    #[test]
    fn vm_transitions_exhaustive() {
        check_all_pairs(vm_expected());
    }

    #[test]
    fn session_transitions_exhaustive() {
        check_all_pairs(session_expected());
    }

    fn check_invariants<S: Lifecycle>() {
        for &s in S::ALL {
            // Final states are never left and have no deadline.
            if s.is_final() {
                assert!(S::ALL.iter().all(|&t| !s.valid_transition(t)), "{s}");
                assert_eq!(s.timeout(), None, "{s}");
            } else {
                // Every non-final state can fail, so nothing can get stuck.
                assert!(s.valid_transition(S::FAILED), "{s} cannot fail");
            }
            // No self-loops: a retry is an explicit step back.
            assert!(!s.valid_transition(s), "{s} self-loop");
            assert_eq!(S::parse(s.as_str()).ok(), Some(s));
        }
        assert!(S::FAILED.is_final());
        assert!(!S::INITIAL.is_final());
        assert!(S::parse("bogus").is_err());
    }

    /// Stop and start of a CLI VM: running → hibernating → hibernated →
    /// resuming → running, over and over; a failed stop or start lands in
    /// a state that keeps the disk, and a stopped VM can be destroyed.
    #[test]
    fn stop_start_cycle() {
        use VmState::*;
        let cycle = [Running, Hibernating, Hibernated, Resuming, Running];
        for w in cycle.windows(2) {
            assert!(w[0].valid_transition(w[1]), "{} -> {}", w[0], w[1]);
        }
        assert!(Hibernating.valid_transition(Running));
        assert!(Resuming.valid_transition(Hibernated));
        for st in [Hibernating, Hibernated, Resuming] {
            assert!(st.valid_transition(Stopping), "{st} cannot be destroyed");
        }
        // No shortcut skips the host's power-off or boot.
        assert!(!Running.valid_transition(Hibernated));
        assert!(!Hibernated.valid_transition(Running));
        // A start is a boot: it gets at least a create's time.
        assert!(Resuming.timeout() >= Creating.timeout());
        assert_eq!(Hibernated.timeout(), None);
    }

    #[test]
    fn invariants() {
        check_invariants::<VmState>();
        check_invariants::<SessionState>();
    }

    #[test]
    fn every_state_reachable_from_initial() {
        fn reach<S: Lifecycle + std::hash::Hash>() {
            let mut seen = std::collections::HashSet::from([S::INITIAL]);
            let mut todo = vec![S::INITIAL];
            while let Some(s) = todo.pop() {
                for &t in S::ALL {
                    if s.valid_transition(t) && seen.insert(t) {
                        todo.push(t);
                    }
                }
            }
            assert_eq!(
                seen.len(),
                S::ALL.len(),
                "{}: unreachable states",
                S::MACHINE
            );
        }
        reach::<VmState>();
        reach::<SessionState>();
    }

    #[test]
    fn failure_reasons_round_trip() {
        for &r in FailureReason::ALL {
            assert_eq!(FailureReason::parse(r.as_str()).ok(), Some(r));
        }
        let e = FailureReason::parse("nope").unwrap_err().to_string();
        assert!(e.contains("timeout"), "{e}");
    }
}
