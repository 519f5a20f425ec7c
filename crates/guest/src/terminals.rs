//! Kept terminals: a `forward` to a [`ForwardTarget::Pty`] with a
//! `session` name runs the user's login shell once and keeps it when the
//! stream ends (a closed browser tab, a dropped network). The next forward
//! with that name and user attaches to the same shell: its recent output
//! (the last [`RING`] bytes, cut at a line start) is sent first, so the
//! screen comes back, and the shell is told to redraw (SIGWINCH). One
//! viewer at a time: a new one takes over from the old. A
//! [`PtyFrame::Close`] from the viewer, or the shell's own exit, ends it.
//!
//! [`ForwardTarget::Pty`]: polydev_api::agent::ForwardTarget::Pty

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use polydev_api::agent::{AgentErrorKind, ExitStatus, PtySpec, Response};
use polydev_api::pty::{PtyDecoder, PtyFrame};

use crate::net::Stream;
use crate::pty::{readable, set_size, start_shell, Hangup};
use crate::reaper;
use crate::server::{send, send_error};
use crate::supervisor::SharedEnv;
use crate::util::lock;

/// Recent output kept per terminal for the next viewer.
pub const RING: usize = 128 * 1024;

/// Kept terminals per VM: each holds a shell and a ring.
pub const MAX_TERMINALS: usize = 16;

/// How long output may still arrive after the shell exited.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

struct Viewer {
    id: u64,
    conn: Arc<Stream>,
}

#[derive(Default)]
struct Screen {
    ring: VecDeque<u8>,
    viewer: Option<Viewer>,
    viewers: u64,
    ended: bool,
}

struct Terminal {
    user: String,
    master: Arc<File>,
    hangup: Arc<Hangup>,
    exited: Arc<AtomicBool>,
    status: Arc<Mutex<Option<ExitStatus>>>,
    screen: Mutex<Screen>,
}

fn registry() -> &'static Mutex<HashMap<String, Arc<Terminal>>> {
    static R: OnceLock<Mutex<HashMap<String, Arc<Terminal>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Serve `conn` as a viewer of the kept terminal `spec.session`, starting
/// it first if there is none by that name.
pub fn attach(conn: Stream, env: &SharedEnv, spec: PtySpec, early: Vec<u8>) {
    let name = spec.session.clone().unwrap_or_default();
    if !PtySpec::session_ok(&name) {
        return send_error(
            &conn,
            AgentErrorKind::BadRequest,
            format!("terminal name {name:?}: use 1-32 of a-z, 0-9 and '-'"),
        );
    }
    let user = spec.user.clone().unwrap_or_else(|| "0".into());
    let term = match find_or_start(&name, &user, env, &spec) {
        Ok(t) => t,
        Err((kind, message)) => return send_error(&conn, kind, message),
    };
    // The viewer's size first, so what is redrawn fits its window.
    let _ = set_size(&term.master, spec.cols, spec.rows);
    let conn = Arc::new(conn);
    let id = {
        let mut s = lock(&term.screen);
        if s.ended {
            drop(s);
            return send_error(
                &conn,
                AgentErrorKind::NotFound,
                format!("terminal {name} has just ended; open it again for a new shell"),
            );
        }
        if let Some(old) = s.viewer.take() {
            old.conn.shutdown(Shutdown::Both);
        }
        if send(&conn, &Response::ForwardReady).is_err() {
            return;
        }
        // Under the lock: output read meanwhile is either in this replay
        // or sent to this viewer afterwards, never both, never neither.
        let (a, b) = s.ring.as_slices();
        let replay = [a, b].concat();
        if !replay.is_empty() && (&*conn).write_all(&PtyFrame::data_frames(&replay)).is_err() {
            return;
        }
        s.viewers += 1;
        s.viewer = Some(Viewer {
            id: s.viewers,
            conn: conn.clone(),
        });
        s.viewers
    };
    redraw(&term.master);
    read_input(&conn, &term, early);
    let mut s = lock(&term.screen);
    if s.viewer.as_ref().is_some_and(|v| v.id == id) {
        s.viewer = None;
    }
}

/// The live terminal `name` of `user`, or a new one.
fn find_or_start(
    name: &str,
    user: &str,
    env: &SharedEnv,
    spec: &PtySpec,
) -> Result<Arc<Terminal>, (AgentErrorKind, String)> {
    let mut reg = lock(registry());
    if let Some(t) = reg.get(name) {
        if t.user != user {
            return Err((
                AgentErrorKind::BadRequest,
                format!("terminal {name} belongs to another user; choose another name"),
            ));
        }
        return Ok(t.clone());
    }
    if reg.len() >= MAX_TERMINALS {
        return Err((
            AgentErrorKind::BadRequest,
            format!(
                "this VM keeps at most {MAX_TERMINALS} terminals: close one (its close control) first"
            ),
        ));
    }
    let exited = Arc::new(AtomicBool::new(false));
    let status: Arc<Mutex<Option<ExitStatus>>> = Arc::default();
    let (exited_cb, status_cb) = (exited.clone(), status.clone());
    let on_exit: reaper::OnExit = Box::new(move |st| {
        *lock(&status_cb) = Some(st);
        exited_cb.store(true, Ordering::SeqCst);
    });
    let (master, pid) = start_shell(env, spec, on_exit)?;
    let term = Arc::new(Terminal {
        user: user.to_string(),
        master: Arc::new(master),
        hangup: Arc::new(Hangup::new(pid, exited.clone())),
        exited,
        status,
        screen: Mutex::default(),
    });
    let name_owned = name.to_string();
    let t = term.clone();
    let spawned = std::thread::Builder::new()
        .name("term-out".into())
        .spawn(move || pump_output(&name_owned, &t));
    if let Err(e) = spawned {
        term.hangup.run();
        return Err((
            AgentErrorKind::Internal,
            format!("cannot start the terminal's output thread: {e}"),
        ));
    }
    reg.insert(name.to_string(), term.clone());
    Ok(term)
}

/// Ask the programs on the terminal to redraw, as a window system does when
/// a window is shown again: SIGWINCH to its foreground process group.
fn redraw(master: &File) {
    // SAFETY: tcgetpgrp on a descriptor we own; kill(2) with a negative
    // pid signals that process group.
    unsafe {
        let pgrp = libc::tcgetpgrp(master.as_raw_fd());
        if pgrp > 0 {
            libc::kill(-pgrp, libc::SIGWINCH);
        }
    }
}

/// Frames from one viewer until it leaves: input to the terminal, sizes
/// to its window; a close ends the terminal.
fn read_input(mut conn: &Stream, term: &Terminal, early: Vec<u8>) {
    let mut dec = PtyDecoder::default();
    dec.push(&early);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        loop {
            match dec.next_frame() {
                Ok(Some(PtyFrame::Data(d))) => {
                    if (&*term.master).write_all(&d).is_err() {
                        return;
                    }
                }
                Ok(Some(PtyFrame::Resize { cols, rows })) => {
                    if PtySpec::size_ok(cols, rows) {
                        let _ = set_size(&term.master, cols, rows);
                    }
                }
                // Still the viewer: the exit status comes to it when the
                // shell is gone, and then the stream ends.
                Ok(Some(PtyFrame::Close)) => term.hangup.run(),
                // Only the guest sends exits; a viewer that does is
                // confused, and so is one that breaks framing: it leaves,
                // the terminal stays.
                Ok(Some(PtyFrame::Exit(_))) | Err(_) => return,
                Ok(None) => break,
            }
        }
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => dec.push(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Read the terminal's output for its whole life: into the ring and to the
/// viewer of the moment. When the shell is gone, tell the viewer its exit
/// status and forget the terminal.
fn pump_output(name: &str, term: &Arc<Terminal>) {
    let mut buf = vec![0u8; polydev_api::pty::MAX_PAYLOAD];
    let mut exited_at: Option<Instant> = None;
    loop {
        if term.exited.load(Ordering::SeqCst) {
            let at = *exited_at.get_or_insert_with(Instant::now);
            // A background job that keeps the terminal open must not keep
            // the exit from its viewer.
            if at.elapsed() > DRAIN_GRACE {
                break;
            }
        }
        match readable(&term.master) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(_) => break,
        }
        let n = match (&*term.master).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // EIO: every process holding the terminal has closed it.
            Err(_) => break,
        };
        let viewer = {
            let mut s = lock(&term.screen);
            keep(&mut s.ring, &buf[..n]);
            s.viewer.as_ref().map(|v| (v.id, v.conn.clone()))
        };
        if let Some((id, conn)) = viewer {
            if (&*conn)
                .write_all(&PtyFrame::data_frames(&buf[..n]))
                .is_err()
            {
                let mut s = lock(&term.screen);
                if s.viewer.as_ref().is_some_and(|v| v.id == id) {
                    s.viewer = None;
                }
            }
        }
    }
    // The reaper reports the exit right after the shell is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while lock(&term.status).is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = *lock(&term.status);
    {
        let mut reg = lock(registry());
        if reg.get(name).is_some_and(|t| Arc::ptr_eq(t, term)) {
            reg.remove(name);
        }
    }
    let viewer = {
        let mut s = lock(&term.screen);
        s.ended = true;
        s.viewer.take()
    };
    if let Some(v) = viewer {
        if let Some(st) = status {
            let _ = (&*v.conn).write_all(&PtyFrame::Exit(st).encode());
        }
        v.conn.shutdown(Shutdown::Both);
    }
}

/// Append `data` to `ring`, dropping the oldest bytes beyond [`RING`] up to
/// the next line start, so a replay does not begin inside a line.
fn keep(ring: &mut VecDeque<u8>, data: &[u8]) {
    ring.extend(data);
    if ring.len() > RING {
        let excess = ring.len() - RING;
        let cut = ring
            .iter()
            .skip(excess)
            .position(|&b| b == b'\n')
            .map_or(excess, |p| excess + p + 1);
        ring.drain(..cut.min(ring.len()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_output_from_a_line_start() {
        let mut ring = VecDeque::new();
        keep(&mut ring, b"first\n");
        assert_eq!(ring.iter().copied().collect::<Vec<u8>>(), b"first\n");
        let line = [b'x'; 99];
        for _ in 0..(RING / 100 + 10) {
            keep(&mut ring, &line);
            keep(&mut ring, b"\n");
        }
        assert!(ring.len() <= RING);
        assert_eq!(ring.front(), Some(&b'x'), "starts at a line start");
        assert_eq!(ring.back(), Some(&b'\n'));
    }
}
