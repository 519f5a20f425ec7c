//! Supervision of long-running services: start, capture output into the
//! log, restart with exponential backoff, stop.
//!
//! Each service has one thread that owns its lifecycle; everyone else only
//! changes the service's desired state (spec, generation, stopping) and
//! wakes that thread through its condition variable.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{ChildStderr, ChildStdout, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use polydev_api::agent::{ExitStatus, ReadyProbe, RestartPolicy, ServiceSpec, ServiceStatus};

use crate::logger::{self, logger};
use crate::process::{self, Credentials};
use crate::reaper;
use crate::util::{lock, LineSplitter};

/// First restart delay.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest restart delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A run at least this long resets the backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Time between SIGTERM and SIGKILL when stopping.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// Time between readiness probes of a run that is not ready yet.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// Longest an exec probe may run before it counts as failed (and is killed).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Exit code recorded when a service could not be started at all (as a
/// shell reports a command it cannot run).
pub const SPAWN_FAILED_CODE: i32 = 127;

/// The environment shared by every exec and service (configured env on top
/// of the agent's own).
pub type SharedEnv = Arc<Mutex<BTreeMap<String, String>>>;

/// Errors of service declaration.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// Bad service name.
    #[error("service name `{0}` is invalid: use 1 to 64 characters from a-z, 0-9, `_`, `.`, `-`")]
    BadName(String),
    /// Bad argv or env.
    #[error("service `{name}`: {source}")]
    Spec {
        /// Service name.
        name: String,
        /// What is wrong.
        source: process::ProcessError,
    },
    /// Two entries with one name in one declaration.
    #[error("service `{0}` is declared twice; give each service a unique name")]
    Duplicate(String),
    /// The service thread could not start.
    #[error("cannot start the supervisor thread for `{0}`; the guest is probably out of memory")]
    Thread(String),
}

/// Whether `name` is a valid service name.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

/// Check a list of specs before applying any of them.
pub fn validate(specs: &[ServiceSpec]) -> Result<(), SupervisorError> {
    let mut seen = std::collections::HashSet::new();
    for s in specs {
        if !valid_name(&s.name) {
            return Err(SupervisorError::BadName(s.name.clone()));
        }
        if !seen.insert(s.name.as_str()) {
            return Err(SupervisorError::Duplicate(s.name.clone()));
        }
        process::validate(&s.argv, &s.env).map_err(|source| SupervisorError::Spec {
            name: s.name.clone(),
            source,
        })?;
    }
    Ok(())
}

/// The delay after `current`: doubled, capped at [`BACKOFF_MAX`].
pub fn next_backoff(current: Duration) -> Duration {
    (current * 2).min(BACKOFF_MAX)
}

/// Whether a run that ended with `status` is restarted under `policy`.
pub fn should_restart(policy: RestartPolicy, status: &ExitStatus) -> bool {
    match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => status.code != Some(0),
        RestartPolicy::Never => false,
    }
}

struct SvcState {
    spec: ServiceSpec,
    /// Bumped on every change of spec; a running process of an older
    /// generation is stopped and replaced.
    generation: u64,
    stopping: bool,
    thread_running: bool,
    run: u64,
    pid: Option<u32>,
    exited: Option<(u64, ExitStatus)>,
    starts: u32,
    last_exit: Option<ExitStatus>,
    backoff_until: Option<Instant>,
    /// Run number whose readiness probe passed, and how long it took.
    ready: Option<(u64, Duration)>,
}

struct Service {
    name: String,
    state: Mutex<SvcState>,
    cv: Condvar,
}

impl Service {
    fn wait_timeout<'a>(
        &self,
        g: MutexGuard<'a, SvcState>,
        t: Duration,
    ) -> MutexGuard<'a, SvcState> {
        match self.cv.wait_timeout(g, t) {
            Ok((g, _)) => g,
            Err(e) => e.into_inner().0,
        }
    }
}

/// All supervised services.
pub struct Supervisor {
    services: Mutex<BTreeMap<String, Arc<Service>>>,
    env: SharedEnv,
}

impl Supervisor {
    /// A supervisor whose services see `env` (plus their own).
    pub fn new(env: SharedEnv) -> Self {
        Supervisor {
            services: Mutex::new(BTreeMap::new()),
            env,
        }
    }

    /// Declare services: start new ones, restart changed ones, leave
    /// identical ones alone. Services not mentioned are left alone too.
    pub fn declare(&self, specs: Vec<ServiceSpec>) -> Result<(), SupervisorError> {
        validate(&specs)?;
        for spec in specs {
            self.declare_one(spec)?;
        }
        Ok(())
    }

    fn declare_one(&self, spec: ServiceSpec) -> Result<(), SupervisorError> {
        let mut map = lock(&self.services);
        let name = spec.name.clone();
        let svc = match map.get(&name) {
            Some(svc) => {
                let mut st = lock(&svc.state);
                if st.spec == spec && !st.stopping {
                    return Ok(());
                }
                logger::info(format!(
                    "service {name}: declaration changed, restarting it"
                ));
                st.spec = spec;
                st.generation += 1;
                st.stopping = false;
                svc.cv.notify_all();
                if st.thread_running {
                    return Ok(());
                }
                st.thread_running = true;
                svc.clone()
            }
            None => {
                let svc = Arc::new(Service {
                    name: name.clone(),
                    state: Mutex::new(SvcState {
                        spec,
                        generation: 0,
                        stopping: false,
                        thread_running: true,
                        run: 0,
                        pid: None,
                        exited: None,
                        starts: 0,
                        last_exit: None,
                        backoff_until: None,
                        ready: None,
                    }),
                    cv: Condvar::new(),
                });
                map.insert(name.clone(), svc.clone());
                svc
            }
        };
        let env = self.env.clone();
        let thread_svc = svc.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("svc-{name}"))
            .spawn(move || run_service(thread_svc, env));
        if spawned.is_err() {
            lock(&svc.state).thread_running = false;
            return Err(SupervisorError::Thread(name));
        }
        Ok(())
    }

    /// Status of every service, by name.
    pub fn status(&self) -> Vec<ServiceStatus> {
        let map = lock(&self.services);
        let now = Instant::now();
        map.values()
            .map(|svc| {
                let st = lock(&svc.state);
                let ready = st
                    .ready
                    .filter(|(run, _)| *run == st.run && st.pid.is_some())
                    .map(|(_, after)| after);
                ServiceStatus {
                    name: svc.name.clone(),
                    pid: st.pid,
                    starts: st.starts,
                    last_exit: st.last_exit,
                    backoff_ms: st
                        .backoff_until
                        .map(|t| t.saturating_duration_since(now).as_millis() as u64),
                    ready: ready.is_some(),
                    has_probe: st.spec.ready.is_some(),
                    ready_after_ms: ready.map(|d| d.as_millis() as u64),
                }
            })
            .collect()
    }

    /// Stop every service (SIGTERM, then SIGKILL after [`STOP_GRACE`]) and
    /// wait for them, at most a little longer than the grace period.
    pub fn stop_all(&self) {
        let services: Vec<Arc<Service>> = lock(&self.services).values().cloned().collect();
        for svc in &services {
            let mut st = lock(&svc.state);
            st.stopping = true;
            svc.cv.notify_all();
        }
        let deadline = Instant::now() + STOP_GRACE + Duration::from_secs(1);
        for svc in &services {
            let mut st = lock(&svc.state);
            while st.thread_running {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    logger::warn(format!("service {} did not stop in time", svc.name));
                    break;
                }
                st = svc.wait_timeout(st, left.min(Duration::from_millis(100)));
            }
        }
    }
}

/// The life of one service: start, wait, decide, back off, repeat.
fn run_service(svc: Arc<Service>, env: SharedEnv) {
    let mut backoff = BACKOFF_START;
    loop {
        let (spec, generation, run) = {
            let mut st = lock(&svc.state);
            if st.stopping {
                st.thread_running = false;
                svc.cv.notify_all();
                return;
            }
            st.run += 1;
            (st.spec.clone(), st.generation, st.run)
        };
        let started = Instant::now();
        let (status, what) = match start(&svc, &spec, &env, run) {
            Ok(pid) => {
                if let Some(probe) = spec.ready.clone() {
                    spawn_prober(&svc, &spec, &env, probe, run, started);
                }
                let status = wait_exit(&svc, pid, generation, run);
                (status, describe(&status))
            }
            Err(msg) => {
                let status = ExitStatus {
                    code: Some(SPAWN_FAILED_CODE),
                    signal: None,
                    timed_out: false,
                };
                (status, format!("could not start: {msg}"))
            }
        };
        let mut st = lock(&svc.state);
        st.pid = None;
        st.last_exit = Some(status);
        if st.stopping || st.generation != generation || !should_restart(spec.restart, &status) {
            logger::info(format!("service {}: {what}", svc.name));
        }
        if st.stopping {
            st.thread_running = false;
            svc.cv.notify_all();
            return;
        }
        if st.generation != generation {
            backoff = BACKOFF_START;
            continue;
        }
        if !should_restart(spec.restart, &status) {
            st.thread_running = false;
            svc.cv.notify_all();
            return;
        }
        if started.elapsed() >= STABLE_AFTER {
            backoff = BACKOFF_START;
        }
        // One line per run, so a crash loop is visible in the shipped log.
        logger::record_service_end(&svc.name, &what, backoff);
        let until = Instant::now() + backoff;
        st.backoff_until = Some(until);
        while !st.stopping && st.generation == generation {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = svc.wait_timeout(st, left);
        }
        st.backoff_until = None;
        backoff = next_backoff(backoff);
    }
}

fn describe(s: &ExitStatus) -> String {
    match (s.code, s.signal) {
        (Some(c), _) => format!("exited with code {c}"),
        (_, Some(sig)) => format!("killed by signal {sig}"),
        _ => "ended".into(),
    }
}

/// A command for `argv` run the way `spec`'s service runs: its user,
/// environment and working directory.
fn command_as(
    spec: &ServiceSpec,
    env: &SharedEnv,
    argv: &[String],
) -> Result<std::process::Command, String> {
    let creds: Option<Credentials> = match &spec.user {
        Some(u) => Some(process::lookup_user(u).map_err(|e| e.to_string())?),
        None => None,
    };
    let mut full_env = lock(env).clone();
    if let Some(c) = &creds {
        full_env.insert("HOME".into(), c.home.clone());
        full_env.insert("USER".into(), c.name.clone());
        full_env.insert("LOGNAME".into(), c.name.clone());
    }
    full_env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let cwd = spec.cwd.as_deref().unwrap_or("/");
    if !std::path::Path::new(cwd).is_dir() {
        return Err(format!(
            "working directory {cwd} does not exist; create it or fix `cwd`"
        ));
    }
    if argv.first().is_none_or(|a| a.is_empty()) {
        return Err("argv must name a program".into());
    }
    Ok(process::command(process::Spec {
        argv,
        env: &full_env,
        cwd,
        creds: creds.as_ref(),
        stdin: Stdio::null(),
        tty: false,
    }))
}

/// Probe run `run` of `svc` every [`PROBE_INTERVAL`] until it passes (then
/// record it as ready) or the run ends.
fn spawn_prober(
    svc: &Arc<Service>,
    spec: &ServiceSpec,
    env: &SharedEnv,
    probe: ReadyProbe,
    run: u64,
    started: Instant,
) {
    let svc = svc.clone();
    let name = spec.name.clone();
    let spec = spec.clone();
    let env = env.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("probe-{}", svc.name))
        .spawn(move || loop {
            {
                let st = lock(&svc.state);
                let current = st.run == run && !st.stopping;
                let ended = matches!(st.exited, Some((r, _)) if r == run);
                if !current || ended {
                    return;
                }
            }
            if probe_once(&spec, &env, &probe) {
                let after = started.elapsed();
                let mut st = lock(&svc.state);
                if st.run == run {
                    st.ready = Some((run, after));
                    logger::info(format!(
                        "service {}: ready after {} ms",
                        svc.name,
                        after.as_millis()
                    ));
                }
                return;
            }
            std::thread::sleep(PROBE_INTERVAL);
        });
    if let Err(e) = spawned {
        logger::warn(format!("service {name}: cannot start its probe: {e}"));
    }
}

/// One readiness check.
fn probe_once(spec: &ServiceSpec, env: &SharedEnv, probe: &ReadyProbe) -> bool {
    match probe {
        ReadyProbe::Tcp { port } => std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], *port)),
            Duration::from_secs(1),
        )
        .is_ok(),
        ReadyProbe::Exec { argv } => {
            let Ok(mut cmd) = command_as(spec, env, argv) else {
                return false;
            };
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
            let (tx, rx) = std::sync::mpsc::channel();
            let on_exit: reaper::OnExit = Box::new(move |status| {
                let _ = tx.send(status);
            });
            let Ok(child) = reaper::spawn(&mut cmd, on_exit) else {
                return false;
            };
            let pid = child.id();
            drop(child);
            match rx.recv_timeout(PROBE_TIMEOUT) {
                Ok(status) => status.code == Some(0),
                Err(_) => {
                    reaper::kill_group(pid, libc::SIGKILL);
                    false
                }
            }
        }
    }
}

/// Spawn one run; returns its pid or why it could not start.
fn start(svc: &Arc<Service>, spec: &ServiceSpec, env: &SharedEnv, run: u64) -> Result<u32, String> {
    let mut cmd = command_as(spec, env, &spec.argv)?;
    let notify = svc.clone();
    let on_exit: reaper::OnExit = Box::new(move |status| {
        let mut st = lock(&notify.state);
        st.exited = Some((run, status));
        notify.cv.notify_all();
    });
    let mut child = reaper::spawn(&mut cmd, on_exit)
        .map_err(|e| format!("cannot start {:?}: {e}", spec.argv[0]))?;
    let pid = child.id();
    logger::info(format!("service {}: started, pid {pid}", svc.name));
    let source = format!("service:{}", svc.name);
    if let Some(out) = child.stdout.take() {
        capture(source.clone(), "stdout", Pipe::Out(out));
    }
    if let Some(err) = child.stderr.take() {
        capture(source, "stderr", Pipe::Err(err));
    }
    drop(child);
    let mut st = lock(&svc.state);
    st.starts = st.starts.saturating_add(1);
    // The run may already be over (reaped before this lock); then the pid
    // is stale and must not be shown.
    if !matches!(st.exited, Some((r, _)) if r == run) {
        st.pid = Some(pid);
    }
    drop(st);
    Ok(pid)
}

/// Wait for run `run` to end, stopping it if the service is stopped or
/// redeclared meanwhile.
fn wait_exit(svc: &Service, pid: u32, generation: u64, run: u64) -> ExitStatus {
    let mut st = lock(&svc.state);
    let mut term_sent: Option<Instant> = None;
    let mut killed = false;
    loop {
        if let Some((r, status)) = st.exited {
            if r == run {
                st.exited = None;
                return status;
            }
        }
        if term_sent.is_none() && (st.stopping || st.generation != generation) {
            reaper::kill_group(pid, libc::SIGTERM);
            term_sent = Some(Instant::now());
        }
        let mut wait = Duration::from_secs(60);
        if let (Some(t), false) = (term_sent, killed) {
            let left = STOP_GRACE.saturating_sub(t.elapsed());
            if left.is_zero() {
                logger::warn(format!(
                    "service {}: still running {}s after SIGTERM, sending SIGKILL",
                    svc.name,
                    STOP_GRACE.as_secs()
                ));
                reaper::kill_group(pid, libc::SIGKILL);
                killed = true;
            } else {
                wait = left;
            }
        }
        st = svc.wait_timeout(st, wait);
    }
}

enum Pipe {
    Out(ChildStdout),
    Err(ChildStderr),
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Pipe::Out(p) => p.read(buf),
            Pipe::Err(p) => p.read(buf),
        }
    }
}

/// Forward a service's output, line by line, into the log.
fn capture(source: String, stream: &'static str, mut pipe: Pipe) {
    let thread_name = format!("{source}-{stream}");
    let label = source.clone();
    let spawned = std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || {
            let mut split = LineSplitter::default();
            let mut buf = vec![0u8; 8192];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        for line in split.push(&buf[..n]) {
                            logger().record(&source, stream, line);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            if let Some(line) = split.finish() {
                logger().record(&source, stream, line);
            }
        });
    if let Err(e) = spawned {
        logger::error(format!("cannot capture {stream} of {label}: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("xvfb"));
        assert!(valid_name("a.b-c_9"));
        assert!(!valid_name(""));
        assert!(!valid_name("Upper"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"a".repeat(65)));
        assert!(valid_name(&"a".repeat(64)));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let mut b = BACKOFF_START;
        let mut seen = vec![b.as_millis()];
        for _ in 0..12 {
            b = next_backoff(b);
            seen.push(b.as_millis());
        }
        assert_eq!(&seen[..5], &[100, 200, 400, 800, 1600]);
        assert_eq!(*seen.last().unwrap_or(&0), 30_000);
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn restart_policy() {
        let ok = ExitStatus {
            code: Some(0),
            signal: None,
            timed_out: false,
        };
        let bad = ExitStatus {
            code: None,
            signal: Some(9),
            timed_out: false,
        };
        assert!(should_restart(RestartPolicy::Always, &ok));
        assert!(!should_restart(RestartPolicy::OnFailure, &ok));
        assert!(should_restart(RestartPolicy::OnFailure, &bad));
        assert!(!should_restart(RestartPolicy::Never, &bad));
    }

    #[test]
    fn validation_rejects_duplicates_and_empty_argv() {
        let spec = |name: &str, argv: Vec<&str>| ServiceSpec {
            name: name.into(),
            argv: argv.into_iter().map(String::from).collect(),
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            restart: RestartPolicy::Always,
            ready: None,
        };
        assert!(validate(&[spec("a", vec!["x"])]).is_ok());
        assert!(validate(&[spec("a", vec![])]).is_err());
        assert!(validate(&[spec("a", vec!["x"]), spec("a", vec!["y"])]).is_err());
        assert!(validate(&[spec("A", vec!["x"])]).is_err());
    }
}
