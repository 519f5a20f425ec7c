//! Prompt runs in a user's CLI VM: queued → running → succeeded | failed |
//! cancelled | lost.
//!
//! Like the login ([`super::login`]), a run is started **detached in the
//! VM** so that it outlives the controller: a launcher (as root) creates
//! `<runs_dir>/<run id>` with `mkdir` (the once-only guard: a driver that
//! resumes after a crash never starts a run twice), then starts the
//! provider's `[prompt]` command in its own session (`setsid`, so the
//! process group can be killed as one) as the CLI VM's user (`runuser`),
//! in the run's working directory; its output goes to `output` there and
//! its exit status to `exit`. The prompt is one argv element all the way
//! down: no shell ever parses it.
//!
//! Before the start the VM gets its `[[vm_files]]` and `vm_setup` if this
//! boot has not had them ([`super::provision`]).
//!
//! The driver then reads the output from the stored offset in bounded
//! chunks (a guest can print without end and can stall: each read is at
//! most [`READ_CHUNK`] bytes under the exec deadline), turns each line
//! into a typed event ([`parse`]) and stores the events with the new offset
//! in one transaction. A controller that restarts reads on from that
//! offset; a run whose VM stopped or whose directory is gone is `lost`
//! with the reason. Deadlines keep every run moving: a run that cannot
//! start within [`START_TIMEOUT_MS`] fails, a run past its time limit is
//! killed and fails, and one whose VM does not answer until
//! [`UNREACHABLE_MS`] past that limit is lost.

use std::sync::Arc;

use polydev_api::agent::ExecRequest;
use polydev_providers::PromptOutput;
use serde_json::Value;

use super::host::HostError;
use super::session::owner_user;
use super::vm::{changed, host_ref};
use super::Inner;
use crate::state::{Lifecycle, VmState};
use crate::store::{NewRunEvent, Run, RunState, RunStep, StoreError, VmKind};
use crate::util::now_ms;

/// Most output bytes one read takes from the VM.
pub const READ_CHUNK: usize = 1 << 20;

/// A line longer than this is stored in pieces of this size (raw events).
pub const MAX_LINE: usize = READ_CHUNK;

/// A queued run that could not be started for this long fails.
pub const START_TIMEOUT_MS: i64 = 120_000;

/// A running run whose VM still does not answer this long after its time
/// limit is lost.
pub const UNREACHABLE_MS: i64 = 300_000;

/// Start the run unless a previous driver already did. Arguments: the
/// run's directory, the user (empty: the agent's user), the working
/// directory, the inner script, then the command's argv.
const START: &str = r#"d="$1"; user="$2"; cwd="$3"; inner="$4"; shift 4
mkdir -p "${d%/*}" && chmod 0711 "${d%/*}" || exit 1
mkdir "$d" 2>/dev/null || exit 0
chmod 0700 "$d" && : >"$d/output" || exit 1
setsid sh -c "$inner" sh "$d" "$user" "$cwd" "$@" >/dev/null 2>&1 </dev/null &
echo $! >"$d/pid.tmp" && mv "$d/pid.tmp" "$d/pid""#;

/// The detached part (its process group is the run's): change into the
/// working directory as the user (so a directory they cannot enter is
/// their error, not a root chdir), run the command, record its exit
/// status atomically.
const INNER: &str = r#"d="$1"; user="$2"; cwd="$3"; shift 3
if [ -n "$user" ]; then
  set -- runuser -u "$user" -- sh -c 'cd "$1" && shift && exec "$@"' sh "$cwd" "$@"
else
  set -- sh -c 'cd "$1" && shift && exec "$@"' sh "$cwd" "$@"
fi
"$@" >"$d/output" 2>&1 </dev/null
echo $? >"$d/exit.tmp" && mv "$d/exit.tmp" "$d/exit""#;

/// Where the run stands (first line: `absent`, `running`, `dead` or
/// `exit N`; a zombie counts as dead, since whoever reaps orphans may not), then at most `$3` bytes of its output from offset `$2`. The
/// status is read first, so an `exit` line means the bytes after it are
/// the complete rest of the output; the exit file is looked for again
/// after the liveness check, since the run may end between the two.
const READ: &str = r#"d="$1"; off="$2"; max="$3"
alive() { s=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null); [ -n "$s" ] && [ "$s" != Z ]; }
[ -d "$d" ] || { echo absent; exit 0; }
if [ -f "$d/exit" ]; then echo "exit $(cat "$d/exit")"
elif [ -f "$d/pid" ] && alive "$(cat "$d/pid")"; then echo running
elif [ -f "$d/exit" ]; then echo "exit $(cat "$d/exit")"
else echo dead; fi
tail -c +"$((off + 1))" "$d/output" 2>/dev/null | head -c "$max""#;

/// Stop the run's process group: TERM, up to 3 s for it to end, then KILL.
const KILL: &str = r#"d="$1"
alive() { s=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null); [ -n "$s" ] && [ "$s" != Z ]; }
[ -f "$d/pid" ] || exit 0
p=$(cat "$d/pid")
kill -TERM "-$p" 2>/dev/null || exit 0
i=0
while alive "$p" && [ "$i" -lt 30 ]; do sleep 0.1; i=$((i + 1)); done
kill -KILL "-$p" 2>/dev/null
exit 0"#;

fn sh(script: &str, args: &[&str]) -> Vec<String> {
    let mut v = vec!["sh".to_string(), "-c".into(), script.into(), "sh".into()];
    v.extend(args.iter().map(|a| a.to_string()));
    v
}

/// The run's directory in the VM.
pub fn dir(runs_dir: &str, run_id: &str) -> String {
    format!("{}/{run_id}", runs_dir.trim_end_matches('/'))
}

/// What the run's process is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    /// No directory: the VM restarted (its `/run` is memory) or it never
    /// started.
    Absent,
    Running,
    /// Not running and no exit status: its process group was killed.
    Dead,
    /// Exited with this code (`None`: unreadable).
    Exited(Option<i64>),
}

fn parse_status(line: &str) -> Status {
    match line.trim() {
        "absent" => Status::Absent,
        "running" => Status::Running,
        "dead" => Status::Dead,
        t => Status::Exited(t.strip_prefix("exit ").and_then(|c| c.trim().parse().ok())),
    }
}

/// Turn output bytes into events: every complete line, the rest only at
/// the end of the output (`eof`) or when it is already [`MAX_LINE`] long.
/// Returns the events and how many bytes they consumed.
pub fn parse(buf: &[u8], eof: bool, format: PromptOutput) -> (Vec<NewRunEvent>, usize) {
    let mut events = Vec::new();
    let mut used = 0;
    while used < buf.len() {
        let rest = &buf[used..];
        let (line, step) = match rest.iter().position(|b| *b == b'\n') {
            Some(n) if n <= MAX_LINE => (&rest[..n], n + 1),
            _ if rest.len() >= MAX_LINE => (&rest[..MAX_LINE], MAX_LINE),
            _ if eof => (rest, rest.len()),
            _ => break,
        };
        used += step;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        events.push(event_of(&String::from_utf8_lossy(line), format));
    }
    (events, used)
}

/// One output line as an event: for JSON formats a JSON object is typed by
/// its `type` field (`object` without one); anything else is `raw`.
pub fn event_of(line: &str, format: PromptOutput) -> NewRunEvent {
    let raw = |line: &str| NewRunEvent {
        source: "output",
        kind: "raw".into(),
        data: Value::Null,
        raw: line.to_string(),
    };
    if format == PromptOutput::Text {
        return raw(line);
    }
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(o)) => {
            let kind = match o.get("type").and_then(Value::as_str) {
                Some(t)
                    if !t.is_empty()
                        && t.len() <= 64
                        && t.chars().all(|c| c.is_ascii_graphic()) =>
                {
                    t.to_string()
                }
                _ => "object".into(),
            };
            NewRunEvent {
                source: "output",
                kind,
                data: Value::Object(o),
                raw: line.to_string(),
            }
        }
        _ => raw(line),
    }
}

/// One step of an active run.
pub(super) async fn step(inner: &Arc<Inner>, run: Run) -> Result<bool, StoreError> {
    match run.state {
        RunState::Queued => queued(inner, &run).await,
        RunState::Running => running(inner, &run).await,
        _ => Ok(false),
    }
}

/// Finish `run` as lost, with why.
async fn lost(inner: &Inner, run: &Run, why: String) -> Result<bool, StoreError> {
    finish(
        inner,
        run,
        RunState::Lost,
        Some(why),
        None,
        RunStep::default(),
    )
    .await
}

async fn finish(
    inner: &Inner,
    run: &Run,
    to: RunState,
    reason: Option<String>,
    code: Option<i64>,
    step: RunStep,
) -> Result<bool, StoreError> {
    if let Some(r) = &reason {
        tracing::info!(run = %run.id, state = to.as_str(), reason = %r, "run finished");
    }
    // Idle hibernation counts from the end of the run.
    inner.store.touch_vm(&run.vm_id, now_ms()).await?;
    changed(
        inner
            .store
            .advance_run(
                run,
                RunStep {
                    state: Some((to, reason, code)),
                    ..step
                },
            )
            .await,
    )
}

/// Why a run's VM cannot take it now (`None`: it can).
async fn vm_problem(inner: &Inner, run: &Run) -> Result<Option<String>, StoreError> {
    let vm = match inner.store.vm(&run.vm_id).await {
        Ok(vm) => vm,
        Err(StoreError::NotFound { .. }) => {
            return Ok(Some(format!("the CLI VM {} no longer exists", run.vm_id)))
        }
        Err(e) => return Err(e),
    };
    Ok(match vm.life.state {
        VmState::Running => None,
        s => Some(format!(
            "the CLI VM {} is {}: a stopped or ended VM ends the runs in it; start it and run the prompt again",
            vm.id,
            s.as_str()
        )),
    })
}

async fn queued(inner: &Inner, run: &Run) -> Result<bool, StoreError> {
    let overdue = now_ms() - run.created_at > START_TIMEOUT_MS;
    if run.cancel_requested {
        return finish(
            inner,
            run,
            RunState::Cancelled,
            None,
            None,
            RunStep::default(),
        )
        .await;
    }
    // A hibernated VM is resumed for the run (which waits for it, within
    // its start deadline).
    match inner.store.vm(&run.vm_id).await {
        Ok(vm)
            if !overdue
                && matches!(
                    vm.life.state,
                    VmState::Hibernating | VmState::Hibernated | VmState::Resuming
                ) =>
        {
            super::idle::wake(inner, &vm).await?;
            return Ok(false);
        }
        Ok(_) | Err(StoreError::NotFound { .. }) => {}
        Err(e) => return Err(e),
    }
    if let Some(why) = vm_problem(inner, run).await? {
        return finish(
            inner,
            run,
            RunState::Failed,
            Some(why),
            None,
            RunStep::default(),
        )
        .await;
    }
    let Some(p) = inner.providers.get(&run.provider) else {
        let why = format!(
            "the provider {} is not configured on this controller any more",
            run.provider
        );
        return finish(
            inner,
            run,
            RunState::Failed,
            Some(why),
            None,
            RunStep::default(),
        )
        .await;
    };
    let vm = inner.store.vm(&run.vm_id).await?;
    // The VM's `[[vm_files]]` and `vm_setup` (once per boot): a VM
    // started again since its last delivery has not had them yet.
    let c = &inner.cfg;
    match super::provision::provision(
        &*inner.host,
        host_ref(&vm),
        VmKind::Cli,
        &c.vm_files,
        c.vm_setup.as_deref(),
    )
    .await
    {
        Ok(()) => {}
        Err(super::provision::ProvisionError::Host(e)) if !overdue => {
            tracing::debug!(run = %run.id, error = %e, "provisioning: VM not answering; retrying");
            return Ok(false);
        }
        Err(e) => {
            let why = format!("preparing the CLI VM for the run failed: {e}");
            return finish(
                inner,
                run,
                RunState::Failed,
                Some(why),
                None,
                RunStep::default(),
            )
            .await;
        }
    }
    let user = inner
        .cfg
        .cli_owner
        .as_deref()
        .and_then(owner_user)
        .unwrap_or("");
    let d = dir(&inner.cfg.runs_dir, &run.id);
    let argv = p.prompt_argv(&run.prompt);
    let mut args: Vec<&str> = vec![&d, user, &run.cwd, INNER];
    args.extend(argv.iter().map(String::as_str));
    let req = ExecRequest {
        argv: sh(START, &args),
        env: p
            .prompt_env
            .clone()
            .into_iter()
            .chain([("HOME".to_string(), inner.cfg.cli_home.clone())])
            .collect(),
        timeout_ms: Some(30_000),
        ..Default::default()
    };
    match inner.host.exec(host_ref(&vm), req).await {
        Ok(out) if out.success() => {
            tracing::info!(run = %run.id, vm = %vm.id, "run started");
            changed(
                inner
                    .store
                    .advance_run(
                        run,
                        RunStep {
                            state: Some((RunState::Running, None, None)),
                            ..RunStep::default()
                        },
                    )
                    .await,
            )
        }
        Ok(out) => {
            let why = format!(
                "starting the run in the CLI VM failed: {}",
                super::login::redact(String::from_utf8_lossy(&out.stderr).trim())
            );
            finish(
                inner,
                run,
                RunState::Failed,
                Some(why),
                None,
                RunStep::default(),
            )
            .await
        }
        Err(e) if overdue => {
            let why = format!(
                "the run could not be started within {} s: {e}",
                START_TIMEOUT_MS / 1000
            );
            finish(
                inner,
                run,
                RunState::Failed,
                Some(why),
                None,
                RunStep::default(),
            )
            .await
        }
        Err(e) => {
            tracing::warn!(run = %run.id, error = %e, "cannot start the run yet; retrying");
            Ok(false)
        }
    }
}

/// Stop the run's process group in the VM.
async fn kill(inner: &Inner, vm: &str, run: &Run) -> Result<(), HostError> {
    let req = ExecRequest {
        argv: sh(KILL, &[&dir(&inner.cfg.runs_dir, &run.id)]),
        timeout_ms: Some(30_000),
        ..Default::default()
    };
    inner.host.exec(vm, req).await.map(|_| ())
}

async fn running(inner: &Inner, run: &Run) -> Result<bool, StoreError> {
    let now = now_ms();
    if let Some(why) = vm_problem(inner, run).await? {
        return lost(inner, run, why).await;
    }
    let vm = inner.store.vm(&run.vm_id).await?;
    let r = host_ref(&vm);
    let started = run.started_at.unwrap_or(run.created_at);
    let timed_out = now > started.saturating_add(run.timeout_secs.saturating_mul(1000));
    let too_much = u64::try_from(run.output_offset).unwrap_or(0) > inner.cfg.run_output_max_bytes;
    let d = dir(&inner.cfg.runs_dir, &run.id);
    let req = ExecRequest {
        argv: sh(
            READ,
            &[&d, &run.output_offset.to_string(), &READ_CHUNK.to_string()],
        ),
        timeout_ms: Some(30_000),
        ..Default::default()
    };
    let out = match inner.host.exec(r, req).await {
        Ok(out) if out.success() => out,
        Ok(out) => {
            tracing::warn!(run = %run.id, stderr = %String::from_utf8_lossy(&out.stderr), "reading the run's output failed; retrying");
            return Ok(false);
        }
        Err(HostError::NotFound(m)) => {
            let why = format!("the CLI VM {} is gone at its host: {m}", vm.id);
            return lost(inner, run, why).await;
        }
        Err(e) => {
            // Past its time limit and then some: the VM is not coming back
            // for this run.
            let give_up = started
                .saturating_add(run.timeout_secs.saturating_mul(1000))
                .saturating_add(UNREACHABLE_MS);
            if now > give_up {
                let why = format!("the CLI VM {} stopped answering: {e}", vm.id);
                return lost(inner, run, why).await;
            }
            tracing::warn!(run = %run.id, error = %e, "cannot read the run's output; retrying");
            return Ok(false);
        }
    };
    let nl = out
        .stdout
        .iter()
        .position(|b| *b == b'\n')
        .unwrap_or(out.stdout.len());
    let status = parse_status(&String::from_utf8_lossy(&out.stdout[..nl]));
    let bytes = out.stdout.get(nl + 1..).unwrap_or(&[]);
    if status == Status::Absent {
        let why = format!(
            "the run's directory {d} is gone from the CLI VM {} (the VM restarted): its output after byte {} is lost",
            vm.id, run.output_offset
        );
        return lost(inner, run, why).await;
    }
    // A CLI whose refresh was refused says so in its own (non-JSON) output.
    if let Some(reason) = super::custody::refusal_in(&String::from_utf8_lossy(bytes)) {
        super::custody::note_refusal(inner, &run.user_id, &run.provider, &reason).await?;
    }
    let ended = matches!(status, Status::Dead | Status::Exited(_));
    let eof = ended && bytes.len() < READ_CHUNK;
    let format = inner
        .providers
        .get(&run.provider)
        .map_or(PromptOutput::Text, |p| p.prompt_output);
    let (events, used) = parse(bytes, eof, format);
    let offset = run.output_offset + i64::try_from(used).unwrap_or(0);
    let step = RunStep {
        events,
        output_offset: Some(offset),
        ..RunStep::default()
    };
    if eof {
        let (to, reason, code) = match status {
            _ if run.cancel_requested => (RunState::Cancelled, None, None),
            Status::Exited(Some(0)) if !too_much => (RunState::Succeeded, None, Some(0)),
            _ if too_much => (
                RunState::Failed,
                Some(format!(
                    "the run printed more than {} bytes and was stopped",
                    inner.cfg.run_output_max_bytes
                )),
                None,
            ),
            _ if timed_out => (
                RunState::Failed,
                Some(format!(
                    "the run took longer than its time limit of {} s and was stopped",
                    run.timeout_secs
                )),
                None,
            ),
            Status::Exited(Some(c)) => (
                RunState::Failed,
                Some(format!("the command exited with status {c}")),
                Some(c),
            ),
            Status::Exited(None) => (
                RunState::Failed,
                Some("the command's exit status could not be read".into()),
                None,
            ),
            _ => (
                RunState::Failed,
                Some(
                    "the run's processes ended without an exit status (killed inside the VM)"
                        .into(),
                ),
                None,
            ),
        };
        return finish(inner, run, to, reason, code, step).await;
    }
    if status == Status::Running && (run.cancel_requested || timed_out || too_much) {
        if let Err(e) = kill(inner, r, run).await {
            tracing::warn!(run = %run.id, error = %e, "cannot stop the run yet; retrying");
        }
    }
    if step.events.is_empty() && used == 0 {
        // Nothing new: let the record rest unless it is being stopped.
        return Ok(run.cancel_requested || timed_out || too_much);
    }
    changed(inner.store.advance_run(run, step).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_typed_events_and_partial_lines_wait() {
        let buf = b"{\"type\":\"start\",\"x\":1}\nnot json\n\n[1,2]\r\n{\"no\":\"type\"}\n{\"type\":\"del";
        let (ev, used) = parse(buf, false, PromptOutput::Jsonl);
        let kinds: Vec<&str> = ev.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["start", "raw", "raw", "object"]);
        assert_eq!(ev[0].data["x"], 1);
        assert_eq!(ev[1].raw, "not json");
        assert_eq!(ev[2].raw, "[1,2]");
        assert_eq!(&buf[used..], b"{\"type\":\"del");
        let (ev, used2) = parse(&buf[used..], true, PromptOutput::Jsonl);
        assert_eq!(used2, buf.len() - used);
        assert_eq!(ev[0].kind, "raw");
        let (ev, _) = parse(b"{\"type\":\"a\"}\n", true, PromptOutput::Text);
        assert_eq!(ev[0].kind, "raw");
    }

    #[test]
    fn a_line_without_end_is_cut_at_the_limit() {
        let buf = vec![b'x'; MAX_LINE + 10];
        let (ev, used) = parse(&buf, false, PromptOutput::StreamJson);
        assert_eq!((ev.len(), used), (1, MAX_LINE));
        assert_eq!(ev[0].raw.len(), MAX_LINE);
        let odd = format!("{{\"type\":\"{}\"}}", "t".repeat(65));
        assert_eq!(event_of(&odd, PromptOutput::Jsonl).kind, "object");
    }

    #[test]
    fn statuses_are_read() {
        assert_eq!(parse_status("exit 3"), Status::Exited(Some(3)));
        assert_eq!(parse_status("exit "), Status::Exited(None));
        assert_eq!(parse_status("running"), Status::Running);
        assert_eq!(parse_status("dead"), Status::Dead);
        assert_eq!(parse_status("absent"), Status::Absent);
    }
}
