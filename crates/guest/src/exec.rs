//! The `exec` request: run a program and stream its output.

use std::io::{Read, Write};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use polydev_api::agent::{AgentErrorKind, ExecRequest, ExitStatus, Response};

use crate::logger;
use crate::net::Stream;
use crate::process;
use crate::reaper;
use crate::server::{send, send_error};
use crate::supervisor::SharedEnv;
use crate::util::lock;

/// Largest output chunk per frame.
pub const CHUNK: usize = 64 * 1024;

/// How long output may still arrive after the process exited. Longer-lived
/// descendants that keep the pipes open (a daemon started in the
/// background) must not hold the answer hostage.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// How often the disconnect watcher checks whether the exec is over.
const WATCH_POLL: Duration = Duration::from_millis(500);

enum Event {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Eof,
    Exit(ExitStatus),
    Disconnected,
}

/// Serve one `exec` request on `conn`.
pub fn handle(conn: &Stream, env: &SharedEnv, req: ExecRequest) {
    if let Err(e) = process::validate(&req.argv, &req.env) {
        send_error(conn, AgentErrorKind::BadRequest, e.to_string());
        return;
    }
    let cwd = req.cwd.as_deref().unwrap_or("/");
    if !std::path::Path::new(cwd).is_dir() {
        send_error(
            conn,
            AgentErrorKind::NotFound,
            format!("working directory {cwd} does not exist in the guest; create it first or pass another cwd"),
        );
        return;
    }
    let mut full_env = lock(env).clone();
    full_env.extend(req.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let stdin_data = req.stdin.filter(|d| !d.is_empty());
    let mut cmd = process::command(process::Spec {
        argv: &req.argv,
        env: &full_env,
        cwd,
        creds: None,
        stdin: if stdin_data.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        },
        tty: false,
    });

    let (tx, rx) = mpsc::channel::<Event>();
    let exit_tx = tx.clone();
    let on_exit: reaper::OnExit = Box::new(move |st| {
        let _ = exit_tx.send(Event::Exit(st));
    });
    let mut child = match reaper::spawn(&mut cmd, on_exit) {
        Ok(c) => c,
        Err(e) => {
            let program = &req.argv[0];
            let (kind, msg) = match e.kind() {
                std::io::ErrorKind::NotFound => (
                    AgentErrorKind::NotFound,
                    format!(
                        "program {program:?} not found (PATH={}); install it in the image or give an absolute path",
                        full_env.get("PATH").map(String::as_str).unwrap_or("")
                    ),
                ),
                std::io::ErrorKind::PermissionDenied => (
                    AgentErrorKind::Refused,
                    format!("program {program:?} cannot be executed: {e}; check its mode"),
                ),
                _ => (AgentErrorKind::Internal, format!("cannot start {program:?}: {e}")),
            };
            send_error(conn, kind, msg);
            return;
        }
    };
    let pid = child.id();
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    drop(child);

    if send(conn, &Response::Started { pid }).is_err() {
        reaper::kill_group(pid, libc::SIGKILL);
        return;
    }

    let mut pending_eofs = 0;
    if let (Some(mut w), Some(data)) = (stdin, stdin_data) {
        // A program that does not read its input makes this fail with EPIPE,
        // which is its business.
        let _ = std::thread::Builder::new()
            .name("exec-stdin".into())
            .spawn(move || {
                let _ = w.write_all(&data);
            });
    }
    if let Some(out) = stdout {
        pending_eofs += pump(out, tx.clone(), Event::Stdout);
    }
    if let Some(err) = stderr {
        pending_eofs += pump(err, tx.clone(), Event::Stderr);
    }
    let done = Arc::new(AtomicBool::new(false));
    let _watch_guard = DoneOnDrop(done.clone());
    watch_disconnect(conn, tx.clone(), done);
    drop(tx);

    let deadline = req
        .timeout_ms
        .and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
    let mut exit: Option<ExitStatus> = None;
    let mut drain_until: Option<Instant> = None;
    let mut timed_out = false;
    loop {
        if exit.is_some() && pending_eofs == 0 {
            break;
        }
        let now = Instant::now();
        let mut wake: Option<Instant> = drain_until;
        if !timed_out {
            if let Some(d) = deadline {
                wake = Some(wake.map_or(d, |w| w.min(d)));
            }
        }
        let ev = match wake {
            Some(w) => rx.recv_timeout(w.saturating_duration_since(now)),
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        match ev {
            Ok(Event::Stdout(data)) => {
                if send(conn, &Response::Stdout { data }).is_err() {
                    return client_gone(pid);
                }
            }
            Ok(Event::Stderr(data)) => {
                if send(conn, &Response::Stderr { data }).is_err() {
                    return client_gone(pid);
                }
            }
            Ok(Event::Eof) => pending_eofs -= 1,
            Ok(Event::Exit(st)) => {
                exit = Some(st);
                drain_until = Some(Instant::now() + DRAIN_GRACE);
            }
            Ok(Event::Disconnected) => return client_gone(pid),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let now = Instant::now();
                if drain_until.is_some_and(|d| now >= d) {
                    break;
                }
                if !timed_out && deadline.is_some_and(|d| now >= d) {
                    reaper::kill_group(pid, libc::SIGKILL);
                    timed_out = true;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let mut status = exit.unwrap_or(ExitStatus {
        code: None,
        signal: None,
        timed_out: false,
    });
    status.timed_out = timed_out;
    let _ = send(conn, &Response::Exit(status));
    // Wakes the disconnect watcher at once where the stream allows it.
    conn.shutdown(std::net::Shutdown::Both);
}

/// Tells the watcher to stop on every way out of `handle`.
struct DoneOnDrop(Arc<AtomicBool>);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn client_gone(pid: u32) {
    logger::warn(format!(
        "exec client disconnected; killing process group {pid}"
    ));
    reaper::kill_group(pid, libc::SIGKILL);
}

/// Read `r` in chunks into `tx`; returns 1 (one EOF to expect) or 0 if the
/// thread could not start.
fn pump<R: Read + Send + 'static>(
    mut r: R,
    tx: mpsc::Sender<Event>,
    wrap: fn(Vec<u8>) -> Event,
) -> usize {
    let spawned = std::thread::Builder::new()
        .name("exec-output".into())
        .spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.send(wrap(buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            let _ = tx.send(Event::Eof);
        });
    usize::from(spawned.is_ok())
}

/// The client sends nothing after its request, so any end of its side of
/// the stream (EOF or error) means it is gone. The watcher polls `done` so
/// that it also ends when the exec finishes while the client keeps the
/// stream open (a mux stream cannot be shut down for reading to wake it).
fn watch_disconnect(conn: &Stream, tx: mpsc::Sender<Event>, done: Arc<AtomicBool>) {
    let Ok(reader) = conn.try_clone() else {
        return;
    };
    if reader.set_read_timeout(Some(WATCH_POLL)).is_err() {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("exec-watch".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match (&reader).read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock
                                | std::io::ErrorKind::TimedOut
                                | std::io::ErrorKind::Interrupted
                        ) =>
                    {
                        if done.load(Ordering::Relaxed) {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            let _ = tx.send(Event::Disconnected);
        });
}
