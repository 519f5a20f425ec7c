//! Disconnect: take a provider's delivered credential back out of the
//! user's running CLI VM before its sealed copy is deleted. Whole files are
//! removed; files the credential was merged into (`deliver_keys`) lose only
//! those fields, so the CLI VM's own settings stay. Everything runs as the
//! VM's user, like delivery (see [`super::login::write_file`]).

use super::login::{self, WriteError};
use super::session::{decode_credential, owner_user};
use super::vm::host_ref;
use super::{HostError, Inner};
use crate::state::VmState;
use crate::store::StoreError;

/// Why a credential could not be taken out of the CLI VM. The sealed
/// credential is kept in every case, so nothing is lost and the disconnect
/// can be tried again.
#[derive(Debug, thiserror::Error)]
pub enum DisconnectError {
    /// The CLI VM did not answer.
    #[error(
        "the CLI VM {vm} did not answer ({cause}); the credential is kept: try the disconnect again \
         in a minute, or stop the VM (POST /api/v1/vms/{vm}/stop) and disconnect then"
    )]
    Unreachable {
        /// The CLI VM.
        vm: String,
        /// The host's error.
        cause: HostError,
    },
    /// The hibernated CLI VM holding the files could not be resumed.
    #[error("the CLI VM {vm} holds the files but could not be resumed ({cause}); the credential is kept: try the disconnect again")]
    NotResumed {
        /// The CLI VM.
        vm: String,
        /// Why.
        cause: super::WakeError,
    },
    /// A removal ran in the VM and failed.
    #[error(
        "{cause}; the credential is kept: fix that file in the CLI VM {vm} and disconnect again"
    )]
    Refused {
        /// The CLI VM.
        vm: String,
        /// What failed (never file content).
        cause: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How long a disconnect waits for a hibernated CLI VM to resume.
const RESUME_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Remove `provider`'s delivered files from `user_id`'s CLI VM, resuming
/// it if it hibernated: `Ok(Some(vm))` when they were removed from it,
/// `Ok(None)` when the user has no CLI VM that can hold them.
pub(super) async fn remove_delivered(
    inner: &Inner,
    user_id: &str,
    provider: &str,
) -> Result<Option<String>, DisconnectError> {
    let Some(vm) = inner.store.live_cli_vm(user_id).await? else {
        return Ok(None);
    };
    let Some(p) = inner.providers.get(provider) else {
        // Not configured here: nothing says which files it delivered.
        return Ok(None);
    };
    // A hibernated VM still holds the files: it is resumed to give them up.
    let vm = match vm.life.state {
        VmState::Running => vm,
        VmState::Hibernating | VmState::Hibernated | VmState::Resuming => {
            super::idle::awake(inner, &vm.id, RESUME_WAIT)
                .await
                .map_err(|cause| DisconnectError::NotResumed {
                    vm: vm.id.clone(),
                    cause,
                })?
        }
        _ => return Ok(None),
    };
    // The files the sealed credential holds (what was delivered); when it
    // cannot be opened, every file the provider captures.
    let sealed: Option<Vec<String>> = match inner.keys.vault() {
        Ok(vault) => match vault.load(&inner.store, user_id, provider).await {
            Ok(Some(pt)) => decode_credential(&pt).map(|f| f.into_keys().collect()),
            _ => None,
        },
        Err(_) => None,
    };
    let paths = sealed.unwrap_or_else(|| p.capture.iter().map(|c| c.path.clone()).collect());
    let host = &*inner.host;
    let r = host_ref(&vm);
    let owner = inner.cfg.cli_owner.as_deref().and_then(owner_user);
    let failed = |e: WriteError| match e {
        WriteError::Host(cause) => DisconnectError::Unreachable {
            vm: vm.id.clone(),
            cause,
        },
        WriteError::Refused(cause) => DisconnectError::Refused {
            vm: vm.id.clone(),
            cause,
        },
    };
    for path in &paths {
        let Some(spec) = p.capture.iter().find(|c| &c.path == path) else {
            continue;
        };
        let full = format!("{}/{path}", inner.cfg.cli_home);
        if spec.deliver_keys.is_empty() {
            login::remove_file(host, r, &full, owner)
                .await
                .map_err(failed)?;
            continue;
        }
        let Some(existing) = login::read_as(host, r, &full, owner)
            .await
            .map_err(failed)?
        else {
            continue;
        };
        let stripped = super::fields::strip(path, &existing, &spec.deliver_keys)
            .map_err(|e| failed(WriteError::Refused(e.to_string())))?;
        if let Some(content) = stripped {
            login::write_file(host, r, &full, content, owner)
                .await
                .map_err(failed)?;
        }
    }
    tracing::info!(vm = %vm.id, %provider, files = paths.len(), "removed a disconnected credential from the CLI VM");
    Ok(Some(vm.id))
}
