//! VM steps: pending → creating (host create, named after the record, with
//! the user's upstream as egress policy) → running; stopping → destroyed;
//! a CLI VM's stop and start: hibernating (host power-off, disks kept) →
//! hibernated, resuming (host power-on) → running;
//! a VM the host reports dead → failed with the host's reason. Browser VMs
//! whose session is over (completed, cancelled, failed) or that no session
//! claims are stopped.

use std::sync::Arc;

use polydev_api::vm::{EgressPolicy, VmSpec, VmState as HostState};
use serde_json::json;

use super::host::{host_vm, HostError};
use super::Inner;
use crate::recovery::HostVm;
use crate::state::{Failure, FailureReason, Lifecycle, SessionState, VmState};
use crate::store::{Also, StoreError, UpstreamError, Vm, VmKind};
use crate::util::now_ms;

/// A VM still starting at its host after this long was abandoned there
/// (the host agent's own boot timeout is far shorter).
const STALE_START_MS: i64 = 150_000;

/// Record the driver's host in `hosts` (placements reference it).
pub(super) async fn register_host(inner: &Inner) -> Result<(), StoreError> {
    let id = inner.host.host_id();
    inner
        .store
        .write_one(
            sqlx::query(
                "INSERT INTO hosts (id, name, address, vcpus, memory_mib, state, created_at)
         VALUES ($1, $1, 'local', 0, 0, 'up', $2) ON CONFLICT (id) DO NOTHING",
            )
            .bind(id)
            .bind(now_ms()),
        )
        .await?;
    Ok(())
}

/// Before recovery: a VM recorded as creating that its host runs is
/// re-attached with the host's own VM id (recovery alone would keep the
/// name as its address, and a name no longer finds the VM's logs once it
/// ended); one the host still reports starting was abandoned with the
/// previous controller's request and is destroyed (then created again).
pub(super) async fn adopt_created(inner: &Arc<Inner>) -> Result<(), StoreError> {
    for v in inner.store.non_final_vms().await? {
        if v.life.state != VmState::Creating {
            continue;
        }
        match inner.host.inspect(host_ref(&v)).await {
            Ok(info) if info.state == HostState::Running => {
                tracing::info!(vm = %v.id, host_vm = %info.id, "re-attached a VM created before the restart");
                running(inner, &v, info.id).await?;
            }
            // Still starting: the previous controller died during its
            // create request, and the host agent abandons a boot whose
            // requester went away (it would stay `starting` for ever).
            // Destroy it; the creating step creates it afresh.
            Ok(info) if info.state == HostState::Starting => {
                tracing::warn!(vm = %v.id, host_vm = %info.id, "destroying a VM whose create was interrupted by the restart");
                if let Err(e) = inner.host.destroy(&info.id).await {
                    tracing::warn!(vm = %v.id, error = %e, "cannot destroy an interrupted VM");
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// How a VM is addressed at its host: its host id once known, else its
/// name (= the controller id).
pub(super) fn host_ref(v: &Vm) -> &str {
    v.host_vm_id.as_deref().unwrap_or(&v.id)
}

/// A transition whose record changed meanwhile is not an error: the next
/// pass re-reads it.
pub(super) fn changed<T>(r: Result<T, StoreError>) -> Result<bool, StoreError> {
    match r {
        Ok(_) | Err(StoreError::Conflict { .. }) => Ok(true),
        Err(e) => Err(e),
    }
}

async fn fail(
    inner: &Inner,
    v: &Vm,
    reason: FailureReason,
    detail: String,
) -> Result<bool, StoreError> {
    tracing::warn!(vm = %v.id, %reason, %detail, "VM failed");
    changed(
        inner
            .store
            .transition_vm(
                v,
                VmState::Failed,
                Some(Failure::new(reason, detail)),
                Also::default(),
            )
            .await,
    )
}

/// Whether a browser VM is no longer wanted: its session is final, or no
/// session has claimed it within the grace period.
async fn unwanted(inner: &Inner, v: &Vm) -> Result<bool, StoreError> {
    if v.kind != VmKind::Browser {
        return Ok(false);
    }
    let states = inner.store.browser_vm_session_states(&v.id).await?;
    if states.is_empty() {
        return Ok(now_ms() - v.created_at > inner.cfg.orphan_grace_ms);
    }
    Ok(states.iter().all(|st| {
        SessionState::parse(st)
            .map(|s| s.is_final())
            .unwrap_or(false)
    }))
}

/// One step for one VM; `Ok(true)` when something changed.
pub(super) async fn step(inner: &Arc<Inner>, v: Vm) -> Result<bool, StoreError> {
    use VmState::*;
    let st = v.life.state;
    if matches!(st, Pending | Creating | Running | Hibernated) && unwanted(inner, &v).await? {
        tracing::info!(vm = %v.id, "stopping browser VM: its session is over");
        return changed(
            inner
                .store
                .transition_vm(&v, Stopping, None, Also::default())
                .await,
        );
    }
    match st {
        Pending => {
            let placement = (inner.host.host_id().to_string(), v.id.clone());
            let v = inner
                .store
                .transition_vm(
                    &v,
                    Creating,
                    None,
                    Also {
                        placement: Some(placement),
                        ..Also::default()
                    },
                )
                .await;
            match v {
                // The retry budget may have turned this into `failed`.
                Ok(v) if v.life.state == Creating => create(inner, v).await,
                r => changed(r),
            }
        }
        Creating => create(inner, v).await,
        Running => {
            if let Some(idle) = super::idle::idle_past_limit(inner, &v).await? {
                tracing::info!(vm = %v.id, idle_secs = idle / 1000, "hibernating the idle CLI VM");
                let detail = json!({ "idle_ms": idle, "reason": "idle" });
                return to(inner, &v, Hibernating, Some(detail)).await;
            }
            let seen = inner.host.inspect(host_ref(&v)).await;
            match host_vm(&seen) {
                HostVm::Gone(reason) | HostVm::Off(reason) => {
                    let detail = match reason {
                        Some(r) => format!("the host reports the VM ended: {r}"),
                        None => "the VM is no longer running at its host".into(),
                    };
                    fail(inner, &v, FailureReason::VmDied, detail).await
                }
                _ => Ok(false),
            }
        }
        Stopping => match inner.host.destroy(host_ref(&v)).await {
            Ok(()) => changed(
                inner
                    .store
                    .transition_vm(&v, Destroyed, None, Also::default())
                    .await,
            ),
            Err(e) => {
                tracing::warn!(vm = %v.id, error = %e, "destroy failed; retrying");
                Ok(false)
            }
        },
        Hibernating => power_off(inner, &v).await,
        Resuming => power_on(inner, &v).await,
        Hibernated | Destroyed | Failed => Ok(false),
    }
}

/// Move `v` to `to` with `detail` in its event.
async fn to(
    inner: &Inner,
    v: &Vm,
    to: VmState,
    detail: Option<serde_json::Value>,
) -> Result<bool, StoreError> {
    changed(
        inner
            .store
            .transition_vm(
                v,
                to,
                None,
                Also {
                    detail,
                    ..Also::default()
                },
            )
            .await,
    )
}

/// The hibernating state: power the VM off at its host, disks kept. A
/// VM already off (a stop finished before a restart) is recorded as such;
/// one the host refuses to stop runs on (back to running, with why).
async fn power_off(inner: &Arc<Inner>, v: &Vm) -> Result<bool, StoreError> {
    let seen = inner.host.inspect(host_ref(v)).await;
    match &seen {
        Ok(info) if info.state == HostState::Off => to(inner, v, VmState::Hibernated, None).await,
        Ok(info) if info.state == HostState::Running => {
            let asked = std::time::Instant::now();
            match inner.host.hibernate(host_ref(v)).await {
                Ok(info) if info.state == HostState::Off => {
                    let ms = asked.elapsed().as_millis() as u64;
                    tracing::info!(vm = %v.id, memory_saved = info.hibernated, ms, "VM hibernated; its disks are kept");
                    let detail = json!({ "memory_saved": info.hibernated, "hibernate_ms": ms });
                    to(inner, v, VmState::Hibernated, Some(detail)).await
                }
                // Changed meanwhile: look again next pass.
                Ok(_) | Err(HostError::Conflict(_)) => Ok(false),
                Err(e @ HostError::Unreachable(_)) => {
                    tracing::warn!(vm = %v.id, error = %e, "host not answering; retrying the stop");
                    Ok(false)
                }
                Err(e) => {
                    tracing::warn!(vm = %v.id, error = %e, "the host could not stop the VM; it runs on");
                    to(
                        inner,
                        v,
                        VmState::Running,
                        Some(json!({ "stop_error": e.to_string() })),
                    )
                    .await
                }
            }
        }
        // Starting, stopping or paused at the host: look again next pass.
        Ok(info) if !info.state.is_final() => Ok(false),
        Ok(_) | Err(HostError::NotFound(_)) => {
            let detail = match host_vm(&seen) {
                HostVm::Gone(Some(r)) => {
                    format!("the VM ended at its host while being stopped: {r}")
                }
                _ => "the VM is no longer at its host (it was being stopped)".into(),
            };
            fail(inner, v, FailureReason::VmDied, detail).await
        }
        Err(e) => {
            tracing::warn!(vm = %v.id, error = %e, "host not answering; retrying");
            Ok(false)
        }
    }
}

/// The resuming state: boot the VM that is off again from its disks. One
/// the host could not boot is stopped again (its disks kept, the reason in
/// its event), so another start can be asked for.
async fn power_on(inner: &Arc<Inner>, v: &Vm) -> Result<bool, StoreError> {
    let seen = inner.host.inspect(host_ref(v)).await;
    match &seen {
        Ok(info) if info.state == HostState::Running => running(inner, v, info.id.clone()).await,
        Ok(info) if info.state == HostState::Off => match inner.host.start(host_ref(v)).await {
            Ok(info) if info.state == HostState::Running => {
                tracing::info!(vm = %v.id, boot_ms = info.boot_ms, "VM started again");
                running(inner, v, info.id).await
            }
            Ok(_) | Err(HostError::Conflict(_)) => Ok(false),
            Err(e @ HostError::Unreachable(_)) => {
                tracing::warn!(vm = %v.id, error = %e, "host not answering; retrying the start");
                Ok(false)
            }
            Err(e) => {
                tracing::warn!(vm = %v.id, error = %e, "the host could not start the VM; it stays stopped");
                to(
                    inner,
                    v,
                    VmState::Hibernated,
                    Some(json!({ "start_error": e.to_string() })),
                )
                .await
            }
        },
        Ok(info) if !info.state.is_final() => Ok(false),
        Ok(_) | Err(HostError::NotFound(_)) => {
            let detail = match host_vm(&seen) {
                HostVm::Gone(Some(r)) => {
                    format!("the VM ended at its host while being started: {r}")
                }
                _ => "the VM is no longer at its host (it was being started)".into(),
            };
            fail(inner, v, FailureReason::VmDied, detail).await
        }
        Err(e) => {
            tracing::warn!(vm = %v.id, error = %e, "host not answering; retrying");
            Ok(false)
        }
    }
}

/// The creating state: adopt what the host already has under the VM's name
/// (a create from before a crash), else create it.
async fn create(inner: &Arc<Inner>, v: Vm) -> Result<bool, StoreError> {
    let seen = inner.host.inspect(host_ref(&v)).await;
    match &seen {
        Ok(info) if info.state == HostState::Running => {
            return running(inner, &v, info.id.clone()).await;
        }
        // Starting, but not by this process (a step owns its record, and
        // this one is not mid-create): a previous controller's request the
        // host is still booting, or one the host abandoned when that
        // controller died mid-request. Past any boot the host would allow,
        // it is the latter: destroy it and create afresh.
        Ok(info)
            if info.state == HostState::Starting
                && now_ms().saturating_sub(i64::try_from(info.created_ms).unwrap_or(i64::MAX))
                    > STALE_START_MS =>
        {
            tracing::warn!(vm = %v.id, host_vm = %info.id, "destroying a VM stuck starting at the host");
            if let Err(e) = inner.host.destroy(&info.id).await {
                tracing::warn!(vm = %v.id, error = %e, "cannot destroy a stuck VM; retrying");
            }
            return Ok(false);
        }
        // Being created, paused or torn down: look again next pass.
        Ok(info) if !info.state.is_final() => return Ok(false),
        Ok(_) | Err(HostError::NotFound(_)) => {}
        Err(e) => {
            tracing::warn!(vm = %v.id, error = %e, "host not answering; retrying");
            return Ok(false);
        }
    }
    let egress = match egress_for(inner, &v).await {
        Ok(e) => e,
        Err(f) => return fail(inner, &v, f.reason, f.detail).await,
    };
    let spec = spec_for(inner, &v, egress);
    match inner.host.create(&spec).await {
        Ok(info) => running(inner, &v, info.id).await,
        // Another create of this name is in flight at the host.
        Err(HostError::Conflict(_)) => Ok(false),
        // The host calls the request itself invalid: retrying cannot help.
        Err(HostError::Refused(m)) => fail(inner, &v, FailureReason::VmCreateFailed, m).await,
        Err(e) => {
            tracing::warn!(vm = %v.id, error = %e, "VM create failed; will retry");
            changed(
                inner
                    .store
                    .transition_vm(
                        &v,
                        VmState::Pending,
                        None,
                        Also {
                            detail: Some(json!({ "host_error": e.to_string() })),
                            ..Also::default()
                        },
                    )
                    .await,
            )
        }
    }
}

/// Record a VM as running at `host_vm_id`. If the record moved meanwhile
/// (stopped or failed while the create ran), the VM is not wanted: destroy it.
async fn running(inner: &Arc<Inner>, v: &Vm, host_vm_id: String) -> Result<bool, StoreError> {
    let r = inner
        .store
        .transition_vm(
            v,
            VmState::Running,
            None,
            Also {
                placement: Some((inner.host.host_id().to_string(), host_vm_id.clone())),
                ..Also::default()
            },
        )
        .await;
    if let Err(StoreError::Conflict { .. }) = &r {
        let now = inner.store.vm(&v.id).await?;
        if now.life.state.is_final() || now.life.state == VmState::Stopping {
            if let Err(e) = inner.host.destroy(&host_vm_id).await {
                tracing::warn!(vm = %v.id, error = %e, "cannot destroy unwanted VM");
            }
        }
    }
    changed(r)
}

/// The egress policy of the VM's user: their upstream port (assigned on
/// first use); when no upstream provider is configured, direct egress from
/// the host (deny list in force) unless the operator turned that off.
async fn egress_for(inner: &Inner, v: &Vm) -> Result<Option<EgressPolicy>, Failure> {
    if inner.upstreams.is_empty() {
        return Ok(inner
            .cfg
            .direct_egress_without_upstream
            .then(|| EgressPolicy {
                direct: true,
                ..EgressPolicy::default()
            }));
    }
    match inner
        .store
        .assign_upstream_port(&v.user_id, &inner.upstreams)
        .await
    {
        Ok(a) => match inner.upstreams.provider(&a.provider) {
            Some(p) => Ok(Some(p.policy(a.port))),
            None => Err(Failure::new(
                FailureReason::VmCreateFailed,
                format!(
                    "the user's upstream provider {:?} is no longer configured: run `polydev upstream rotate {}`",
                    a.provider, v.user_id
                ),
            )),
        },
        Err(e @ UpstreamError::Exhausted { .. }) => {
            Err(Failure::new(FailureReason::NoCapacity, e.to_string()))
        }
        Err(e) => Err(Failure::new(FailureReason::Internal, e.to_string())),
    }
}

fn spec_for(inner: &Inner, v: &Vm, egress: Option<EgressPolicy>) -> VmSpec {
    let c = &inner.cfg;
    let (image, memory_mib, vcpus) = match v.kind {
        VmKind::Browser => (
            c.browser_image.clone(),
            c.browser_memory_mib,
            c.browser_vcpus,
        ),
        VmKind::Cli => (c.cli_image.clone(), c.cli_memory_mib, None),
    };
    VmSpec {
        // The controller id as the host's name: a create interrupted by a
        // crash is found again by name instead of being created twice.
        name: Some(v.id.clone()),
        image,
        memory_mib,
        vcpus,
        egress,
        ..VmSpec::default()
    }
}
