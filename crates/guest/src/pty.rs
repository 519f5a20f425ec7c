//! The terminal: a `forward` to a [`ForwardTarget::Pty`] runs the user's
//! login shell on a new pseudo-terminal and frames the stream both ways
//! (`polydev_api::pty`): input and window sizes in, output and the exit
//! status out.
//!
//! [`ForwardTarget::Pty`]: polydev_api::agent::ForwardTarget::Pty

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use polydev_api::agent::{AgentErrorKind, ExitStatus, PtySpec, Response};
use polydev_api::pty::{PtyDecoder, PtyFrame};

use crate::net::Stream;
use crate::process;
use crate::reaper;
use crate::server::{send, send_error};
use crate::supervisor::SharedEnv;
use crate::util::lock;

/// How long output may still arrive after the shell exited (a background
/// job that keeps the terminal open must not hold the exit status back).
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// After a hang-up (the viewer left), how long the shell has to exit
/// before its process group is killed.
const HANGUP_GRACE: Duration = Duration::from_secs(2);

/// How often the output reader checks whether the terminal is over.
const READ_POLL_MS: libc::c_int = 200;

enum Event {
    Output(Vec<u8>),
    OutputEnd,
    Exit(ExitStatus),
}

/// Serve one terminal on `conn`. `early` holds bytes the client sent after
/// its request line (frames it did not wait for `forward_ready` to send).
pub fn handle(conn: Stream, env: &SharedEnv, spec: PtySpec, early: Vec<u8>) {
    if !PtySpec::size_ok(spec.cols, spec.rows) {
        send_error(
            &conn,
            AgentErrorKind::BadRequest,
            format!(
                "terminal size {}x{} is out of range: columns and rows must be 1-{}",
                spec.cols,
                spec.rows,
                PtySpec::MAX_SIZE
            ),
        );
        return;
    }
    if spec.session.is_some() {
        return crate::terminals::attach(conn, env, spec, early);
    }
    let (tx, rx) = mpsc::channel::<Event>();
    let exit_tx = tx.clone();
    let exited = Arc::new(AtomicBool::new(false));
    let exited_cb = exited.clone();
    let on_exit: reaper::OnExit = Box::new(move |st| {
        exited_cb.store(true, Ordering::SeqCst);
        let _ = exit_tx.send(Event::Exit(st));
    });
    let (master, pid) = match start_shell(env, &spec, on_exit) {
        Ok(s) => s,
        Err((kind, message)) => return send_error(&conn, kind, message),
    };
    if send(&conn, &Response::ForwardReady).is_err() {
        reaper::kill_group(pid, libc::SIGKILL);
        return;
    }
    let conn = Arc::new(conn);
    let master = Arc::new(master);
    let over = Arc::new(AtomicBool::new(false));
    let hangup = Arc::new(Hangup::new(pid, exited));
    spawn_output_reader(master.clone(), tx.clone(), over.clone());
    spawn_input(conn.clone(), master.clone(), early, hangup.clone());
    drop(tx);

    let mut conn_ok = true;
    let mut write = |bytes: &[u8]| {
        if conn_ok && (&*conn).write_all(bytes).is_err() {
            conn_ok = false;
            hangup.run();
        }
    };
    let mut status = None;
    let mut output_open = true;
    while output_open || status.is_none() {
        let ev = if status.is_some() {
            match rx.recv_timeout(DRAIN_GRACE) {
                Ok(ev) => ev,
                Err(_) => break,
            }
        } else {
            match rx.recv() {
                Ok(ev) => ev,
                Err(_) => break,
            }
        };
        match ev {
            Event::Output(data) => write(&PtyFrame::data_frames(&data)),
            Event::OutputEnd => output_open = false,
            Event::Exit(st) => status = Some(st),
        }
    }
    over.store(true, Ordering::SeqCst);
    if let Some(st) = status {
        write(&PtyFrame::Exit(st).encode());
    }
    conn.shutdown(Shutdown::Both);
}

/// Start `spec.user`'s login shell on a new pseudo-terminal of
/// `spec.cols`x`spec.rows` in its home directory; `on_exit` gets its exit
/// status. Returns the terminal's master side and the shell's pid (the
/// leader of its process group), or what to answer.
pub(crate) fn start_shell(
    env: &SharedEnv,
    spec: &PtySpec,
    on_exit: reaper::OnExit,
) -> Result<(File, u32), (AgentErrorKind, String)> {
    let user = spec.user.as_deref().unwrap_or("0");
    let creds =
        process::lookup_user(user).map_err(|e| (AgentErrorKind::NotFound, e.to_string()))?;
    let (master, slave) = open_pty(spec.cols, spec.rows, creds.uid).map_err(|e| {
        (
            AgentErrorKind::Internal,
            format!("cannot open a pseudo-terminal in the guest: {e}; is /dev/pts mounted?"),
        )
    })?;
    let mut full_env = lock(env).clone();
    for (k, v) in [
        ("HOME", creds.home.as_str()),
        ("USER", creds.name.as_str()),
        ("LOGNAME", creds.name.as_str()),
        ("SHELL", creds.shell.as_str()),
    ] {
        full_env.insert(k.into(), v.into());
    }
    full_env
        .entry("TERM".into())
        .or_insert_with(|| "xterm-256color".into());
    let cwd = if std::path::Path::new(&creds.home).is_dir() {
        creds.home.clone()
    } else {
        "/".into()
    };
    let argv = [creds.shell.clone(), "-l".into()];
    let stdio = || slave.try_clone().map(Stdio::from);
    let (stdin, stdout, stderr) = match (stdio(), stdio(), stdio()) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            return Err((
                AgentErrorKind::Internal,
                format!("cannot duplicate the terminal: {e}"),
            ))
        }
    };
    drop(slave);
    let mut cmd = process::command(process::Spec {
        argv: &argv,
        env: &full_env,
        cwd: &cwd,
        creds: Some(&creds),
        stdin,
        tty: true,
    });
    cmd.stdout(stdout).stderr(stderr);
    let spawned = reaper::spawn(&mut cmd, on_exit);
    // The Command holds the slave's descriptors: the master only sees the
    // end of output once every copy outside the shell's tree is closed.
    drop(cmd);
    match spawned {
        Ok(child) => Ok((master, child.id())),
        Err(e) => Err((
            AgentErrorKind::NotFound,
            format!(
                "cannot start the login shell {:?} of {}: {e}; set a shell that exists in /etc/passwd",
                creds.shell, creds.name
            ),
        )),
    }
}

/// Ends the shell when the viewer leaves: SIGHUP to its process group, as
/// a terminal emulator does when its window closes, then SIGKILL if it is
/// still there after [`HANGUP_GRACE`]. Runs once.
pub(crate) struct Hangup {
    pid: u32,
    exited: Arc<AtomicBool>,
    done: AtomicBool,
}

impl Hangup {
    /// For the shell `pid` (its process group's leader); `exited` says
    /// whether it is gone already.
    pub(crate) fn new(pid: u32, exited: Arc<AtomicBool>) -> Self {
        Hangup {
            pid,
            exited,
            done: AtomicBool::new(false),
        }
    }

    pub(crate) fn run(&self) {
        if self.done.swap(true, Ordering::SeqCst) || self.exited.load(Ordering::SeqCst) {
            return;
        }
        reaper::kill_group(self.pid, libc::SIGHUP);
        let (pid, exited) = (self.pid, self.exited.clone());
        let _ = std::thread::Builder::new()
            .name("pty-hangup".into())
            .spawn(move || {
                std::thread::sleep(HANGUP_GRACE);
                if !exited.load(Ordering::SeqCst) {
                    reaper::kill_group(pid, libc::SIGKILL);
                }
            });
    }
}

/// Terminal output to `tx` until the terminal has no writer left or the
/// stream is over.
fn spawn_output_reader(master: Arc<File>, tx: mpsc::Sender<Event>, over: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new()
        .name("pty-out".into())
        .spawn(move || {
            let mut buf = vec![0u8; polydev_api::pty::MAX_PAYLOAD];
            while !over.load(Ordering::SeqCst) {
                match readable(&master) {
                    Ok(false) => continue,
                    Ok(true) => {}
                    Err(_) => break,
                }
                match (&*master).read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.send(Event::Output(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // EIO: every process holding the terminal has closed it.
                    Err(_) => break,
                }
            }
            let _ = tx.send(Event::OutputEnd);
        });
    if spawned.is_err() {
        // Without a reader no output arrives; the exit still does.
        crate::logger::warn("pty: cannot start the output reader thread");
    }
}

/// Whether the terminal has output (or has hung up) within one poll step.
pub(crate) fn readable(master: &File) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: master.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, READ_POLL_MS) };
    match n {
        n if n < 0 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

/// Frames from the viewer: input to the terminal, sizes to its window.
/// The end of the stream (or a malformed frame) hangs up.
fn spawn_input(conn: Arc<Stream>, master: Arc<File>, early: Vec<u8>, hangup: Arc<Hangup>) {
    let spawned = std::thread::Builder::new()
        .name("pty-in".into())
        .spawn(move || {
            let mut dec = PtyDecoder::default();
            dec.push(&early);
            let mut buf = vec![0u8; 16 * 1024];
            'stream: loop {
                loop {
                    match dec.next_frame() {
                        Ok(Some(PtyFrame::Data(d))) => {
                            if (&*master).write_all(&d).is_err() {
                                break 'stream;
                            }
                        }
                        Ok(Some(PtyFrame::Resize { cols, rows })) => {
                            if PtySpec::size_ok(cols, rows) {
                                let _ = set_size(&master, cols, rows);
                            }
                        }
                        // Only the guest sends exits; a viewer that does
                        // is confused, and so is one that breaks framing.
                        // A close ends this terminal as leaving does.
                        Ok(Some(PtyFrame::Exit(_) | PtyFrame::Close)) | Err(_) => break 'stream,
                        Ok(None) => break,
                    }
                }
                match (&*conn).read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => dec.push(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            hangup.run();
        });
    if spawned.is_err() {
        crate::logger::warn("pty: cannot start the input thread");
    }
}

/// A new pseudo-terminal of `cols`x`rows`: (master, slave), the slave
/// owned by `uid` (so programs that reopen it by name may).
pub(crate) fn open_pty(cols: u16, rows: u16, uid: libc::uid_t) -> io::Result<(File, File)> {
    let err = io::Error::last_os_error;
    // SAFETY: plain syscalls on descriptors we own; ptsname_r writes a
    // NUL-terminated name into the buffer it is given.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if m < 0 {
            return Err(err());
        }
        let master = File::from_raw_fd(m);
        if libc::grantpt(m) < 0 || libc::unlockpt(m) < 0 {
            return Err(err());
        }
        let mut name = [0 as libc::c_char; 128];
        let rc = libc::ptsname_r(m, name.as_mut_ptr(), name.len());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        let path = CStr::from_ptr(name.as_ptr());
        let s = libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if s < 0 {
            return Err(err());
        }
        let slave = File::from_raw_fd(s);
        if libc::fchown(s, uid, libc::gid_t::MAX) < 0 {
            return Err(err());
        }
        set_size(&master, cols, rows)?;
        Ok((master, slave))
    }
}

pub(crate) fn set_size(master: &File, cols: u16, rows: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size set on the master is what the slave side reports.
    #[test]
    fn a_new_terminal_has_the_asked_size() {
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        let (_m, s) = open_pty(132, 43, uid).unwrap();
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes one winsize.
        assert_eq!(
            unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) },
            0
        );
        assert_eq!((ws.ws_col, ws.ws_row), (132, 43));
    }
}
