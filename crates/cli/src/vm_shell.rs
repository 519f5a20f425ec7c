//! `polydev vm shell`: a login shell in a VM, through the host agent's
//! terminal forward (`polydev_api::pty` frames).
//!
//! On a terminal the local side goes raw (every key to the VM, Ctrl-C
//! included) and window size changes follow (SIGWINCH). Piped input goes
//! as typed and should end the shell itself (`exit`): a Ctrl-D sent for
//! the end of input could arrive before the shell's line editor is up,
//! where the terminal turns it into a NUL byte. The exit status is the
//! shell's (128 + signal when a signal ended it).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;

use anyhow::{bail, Context};
use polydev_api::agent::{ForwardTarget, PtySpec};
use polydev_api::pty::{PtyDecoder, PtyFrame};
use polydev_host::client::HostClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Restores the local terminal's settings when dropped.
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    /// Raw mode on `fd` if it is a terminal; `None` otherwise.
    fn enter(fd: i32) -> anyhow::Result<Option<RawMode>> {
        // SAFETY: isatty/tcgetattr/tcsetattr on a descriptor we hold;
        // termios is plain data filled by tcgetattr.
        unsafe {
            if libc::isatty(fd) != 1 {
                return Ok(None);
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut t) != 0 {
                return Err(std::io::Error::last_os_error())
                    .context("read the terminal's settings");
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
                return Err(std::io::Error::last_os_error())
                    .context("switch the terminal to raw mode");
            }
            Ok(Some(RawMode { fd, saved }))
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores what tcgetattr returned for the same fd.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved);
        }
    }
}

/// The local terminal's size, if stdout or stdin is one.
fn local_size() -> Option<(u16, u16)> {
    for fd in [1, 0] {
        // SAFETY: TIOCGWINSZ writes one winsize.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_col > 0 {
            return Some((ws.ws_col, ws.ws_row));
        }
    }
    None
}

/// Run the shell; returns its exit status.
pub async fn run(
    c: &HostClient,
    id: &str,
    user: Option<String>,
    size: (Option<u16>, Option<u16>),
) -> anyhow::Result<i32> {
    let (lc, lr) = local_size().unwrap_or((80, 24));
    let (cols, rows) = (size.0.unwrap_or(lc), size.1.unwrap_or(lr));
    if !PtySpec::size_ok(cols, rows) {
        bail!("--cols and --rows must be 1-{}", PtySpec::MAX_SIZE);
    }
    let conn = c
        .forward(
            id,
            &ForwardTarget::Pty(PtySpec {
                user,
                cols,
                rows,
                session: None,
            }),
        )
        .await
        .with_context(|| format!("open a terminal in {id}"))?;
    let (mut rd, mut wr) = tokio::io::split(conn);
    let stdin_fd = std::io::stdin().as_raw_fd();
    let raw = RawMode::enter(stdin_fd)?;

    // Standard input is read on a thread: tokio's stdin is one too, but
    // cannot be abandoned when the shell ends first.
    let (tx, mut input) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::Builder::new()
        .name("shell-stdin".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            let mut stdin = std::io::stdin().lock();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        })
        .context("start the input thread")?;
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        .context("watch window size changes")?;

    let mut dec = PtyDecoder::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut stdout = std::io::stdout();
    let mut input_open = true;
    loop {
        tokio::select! {
            chunk = input.recv(), if input_open => match chunk {
                Some(b) => wr.write_all(&PtyFrame::data_frames(&b)).await.context("send input")?,
                None => input_open = false,
            },
            _ = winch.recv() => {
                if let Some((cols, rows)) = local_size() {
                    wr.write_all(&PtyFrame::Resize { cols, rows }.encode()).await.context("send the window size")?;
                }
            }
            r = rd.read(&mut buf) => {
                let n = r.context("read the terminal")?;
                if n == 0 {
                    drop(raw);
                    bail!("the terminal in {id} ended without an exit status (the VM stopped?)");
                }
                dec.push(&buf[..n]);
                while let Some(f) = dec.next_frame()? {
                    match f {
                        PtyFrame::Data(d) => {
                            stdout.write_all(&d)?;
                            stdout.flush()?;
                        }
                        PtyFrame::Exit(st) => {
                            drop(raw);
                            return Ok(st.code.unwrap_or_else(|| 128 + st.signal.unwrap_or(0)));
                        }
                        PtyFrame::Resize { .. } | PtyFrame::Close => bail!("the guest sent a frame only a viewer sends; agent and CLI versions differ"),
                    }
                }
            }
        }
    }
}
