//! The provider's login inside the browser VM, run so that it outlives the
//! controller: a detached process (its own session, so the agent does not
//! kill it when our exec stream ends) whose output and exit status go to
//! files under [`LOGIN_DIR`]`/<session id>`. Every step is idempotent: the
//! directory is created with `mkdir` (atomic), so a driver that crashed and
//! resumed never starts a second login.

use std::collections::BTreeMap;

use polydev_api::agent::ExecRequest;

use super::host::{HostApi, HostError};
use crate::providers::{Provider, UrlSource};
pub use polydev_providers::terminal::{redact, strip_terminal_codes};

/// The terminal size a `tty` login gets.
const TTY_ROWS: u16 = 50;
/// See [`TTY_ROWS`].
const TTY_COLS: u16 = 160;

/// Where login state lives inside the VM (tmpfs in browser VMs).
pub const LOGIN_DIR: &str = "/run/polydev-login";

/// Start the login unless a previous driver already did.
///
/// `$d/browser` ([`BROWSER_WRAPPER`]) is what the login gets as `$BROWSER`
/// (xdg-open uses it outside a full desktop), and `$d/bin/xdg-open`, first
/// on the login's `PATH`, hands every URL to it too: a CLI that calls
/// xdg-open (Gemini CLI, through the `open` package) would otherwise reach
/// the desktop's default browser directly, unseen and unmaximised.
const START: &str = r#"inner="$1"; d="$2"; wrapper="$3"; shift 3
mkdir -p "${d%/*}" || exit 1
mkdir "$d" 2>/dev/null || exit 0
: >"$d/opened" && : >"$d/opened.log" && chmod 0666 "$d/opened" "$d/opened.log"
printf '%s' "$wrapper" >"$d/browser"
mkdir "$d/bin" && printf '#!/bin/sh\nexec "%s/browser" "$@"\n' "$d" >"$d/bin/xdg-open"
chmod 0755 "$d" "$d/browser" "$d/bin" "$d/bin/xdg-open"
setsid sh -c "$inner" sh "$d" "$@" >/dev/null 2>&1 </dev/null &
exit 0"#;

/// The `PATH` of a login, after its own `bin` (see [`START`]).
const LOGIN_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The login's `$BROWSER`: appends the URL it is asked to open to
/// `$POLYDEV_OPENED` (so an auth URL handed to xdg-open is seen as well as
/// one printed), then opens it with `$POLYDEV_REAL_BROWSER` (for the
/// desktop, `chromium --new-window`: its own window, not a tab beside the
/// desktop's blank one) and, where `wmctrl` exists, maximises and raises
/// the window that appeared, so the sign-in page fills the screen in focus.
const BROWSER_WRAPPER: &str = r#"#!/bin/sh
printf '%s\n' "$*" >>"$POLYDEV_OPENED"
[ -n "$POLYDEV_REAL_BROWSER" ] || exit 0
command -v wmctrl >/dev/null 2>&1 || exec $POLYDEV_REAL_BROWSER "$@"
before=" $(wmctrl -l 2>/dev/null | cut -d' ' -f1 | tr '\n' ' ') "
# A browser that is still starting can drop a URL handed over to it
# (measured under TCG right after its first window appeared): hand it over
# again when no window came within 60 s, up to three times.
tries=0
while [ "$tries" -lt 3 ]; do
  tries=$((tries + 1))
  $POLYDEV_REAL_BROWSER "$@" >>"$POLYDEV_OPENED.log" 2>&1
  i=0
  while [ "$i" -lt 240 ]; do
    for w in $(wmctrl -lx 2>/dev/null | awk '$3 ~ /[Cc]hromium/ {print $1}'); do
      case "$before" in *" $w "*) continue ;; esac
      wmctrl -i -r "$w" -b add,maximized_vert,maximized_horz
      wmctrl -i -a "$w"
      exit 0
    done
    sleep 0.25
    i=$((i + 1))
  done
done
exit 0
"#;

/// The detached part: run the command, record its exit status atomically.
/// Its standard input is the FIFO `$d/input`, held open for reading and
/// writing so that it never reads end-of-file: what the person types into
/// the login ([`send_input`]) arrives there (under `script`, on the
/// login's terminal).
const INNER: &str = r#"d="$1"; shift
cd "$HOME" 2>/dev/null || cd /
mkfifo -m 0600 "$d/input" && exec 3<>"$d/input" || exec 3</dev/null
"$@" >"$d/output" 2>&1 <&3
echo $? >"$d/exit.tmp" && mv "$d/exit.tmp" "$d/exit""#;

/// Hand stdin to a running login's input FIFO; refuse when the login is
/// not running (a FIFO without a reader would block the writer).
const INPUT: &str = r#"d="$1"
[ -p "$d/input" ] && [ ! -f "$d/exit" ] || { echo "the login is not running" >&2; exit 3; }
cat >"$d/input""#;

/// Type stdin into a running login once per answer: each `$@` names an
/// answer, recorded by an atomic `mkdir`, so a driver that resumes after a
/// crash never types an answer twice.
const RESPOND: &str = r#"d="$1"; shift
[ -p "$d/input" ] && [ ! -f "$d/exit" ] || { echo "the login is not running" >&2; exit 3; }
text=$(cat; echo .); text=${text%.}
for a in "$@"; do
  mkdir "$d/answered-$a" 2>/dev/null || continue
  printf '%s' "$text" >"$d/input"
done"#;

const STATUS: &str = r#"d="$1"
[ -d "$d" ] || { echo absent; exit 0; }
[ -f "$d/exit" ] && { echo "exit $(cat "$d/exit")"; exit 0; }
echo running"#;

/// Write stdin to a file atomically, creating its directory (mode 0700/0600).
/// The temporary file is `mktemp`'s (created exclusively, never through a
/// symlink, and unique: a write still running from a driver that was killed
/// must not rename the temporary file of the write that replaced it).
const WRITE: &str = r#"umask 077; mkdir -p "${1%/*}" && t=$(mktemp "$1.polydev-tmp.XXXXXX") || exit 1
cat >"$t" && mv "$t" "$1" || { rm -f "$t"; exit 1; }"#;

/// Where the login stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginStatus {
    /// Not started in this VM.
    Absent,
    /// Still running.
    Running,
    /// Ended with this exit code (`None`: unreadable).
    Exited(Option<i32>),
}

/// How the login is run in the VM (from the driver's config).
#[derive(Clone, Debug)]
pub struct LoginPlace {
    /// Home directory of the user the login runs as.
    pub home: String,
    /// Run as this user (`runuser -u`), or as the agent's user (root).
    pub user: Option<String>,
    /// Extra environment for the login (e.g. `DISPLAY`).
    pub env: BTreeMap<String, String>,
    /// The browser the `$BROWSER` wrapper hands URLs on to (`None`: none).
    pub browser: Option<String>,
}

fn sh(script: &str, args: &[&str]) -> Vec<String> {
    let mut v = vec!["sh".to_string(), "-c".into(), script.into(), "sh".into()];
    v.extend(args.iter().map(|a| a.to_string()));
    v
}

/// `argv` as one POSIX shell command line, every word single-quoted (for
/// `script -c`, which takes a command line, not an argv).
pub fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The login directory of a session.
pub fn dir(session_id: &str) -> String {
    format!("{LOGIN_DIR}/{session_id}")
}

/// Where the login stands in `vm`.
pub async fn status(
    host: &dyn HostApi,
    vm: &str,
    session_id: &str,
) -> Result<LoginStatus, HostError> {
    let out = host
        .exec(
            vm,
            ExecRequest {
                argv: sh(STATUS, &[&dir(session_id)]),
                timeout_ms: Some(30_000),
                ..Default::default()
            },
        )
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let text = text.trim();
    Ok(match text {
        "absent" => LoginStatus::Absent,
        "running" => LoginStatus::Running,
        t => LoginStatus::Exited(t.strip_prefix("exit ").and_then(|c| c.trim().parse().ok())),
    })
}

/// Write `data` to the absolute `path` in `vm` (atomic rename), as `user`
/// when given (else as the agent's user, root).
///
/// Files in a user's home are written *as that user*: the home and
/// everything in it is theirs, so a root write there would follow their
/// symlinks (`~/.claude -> /` would make root create and chown files in
/// `/`). As the user, a planted symlink can only lead where the user
/// could write anyway. A write the VM refuses is [`WriteError::Refused`]
/// (retrying cannot help); a VM that does not answer is
/// [`WriteError::Host`].
pub async fn write_file(
    host: &dyn HostApi,
    vm: &str,
    path: &str,
    data: Vec<u8>,
    user: Option<&str>,
) -> Result<(), WriteError> {
    let out = host
        .exec(
            vm,
            ExecRequest {
                argv: as_user(user, sh(WRITE, &[path])),
                stdin: Some(data),
                timeout_ms: Some(30_000),
                ..Default::default()
            },
        )
        .await
        .map_err(WriteError::Host)?;
    if out.success() {
        Ok(())
    } else {
        Err(WriteError::Refused(format!(
            "writing {path} in the VM{} failed: {}",
            user.map(|u| format!(" as {u}")).unwrap_or_default(),
            redact(String::from_utf8_lossy(&out.stderr).trim())
        )))
    }
}

/// Remove the file at the absolute `path` in `vm`, as `user` when given
/// (see [`write_file`] for why: as the user, a planted symlink is removed
/// itself, never what it points to). A file that is not there is not an
/// error.
pub async fn remove_file(
    host: &dyn HostApi,
    vm: &str,
    path: &str,
    user: Option<&str>,
) -> Result<(), WriteError> {
    let out = host
        .exec(
            vm,
            ExecRequest {
                argv: as_user(user, sh(r#"rm -f -- "$1""#, &[path])),
                timeout_ms: Some(30_000),
                ..Default::default()
            },
        )
        .await
        .map_err(WriteError::Host)?;
    if out.success() {
        Ok(())
    } else {
        Err(WriteError::Refused(format!(
            "removing {path} in the VM{} failed: {}",
            user.map(|u| format!(" as {u}")).unwrap_or_default(),
            redact(String::from_utf8_lossy(&out.stderr).trim())
        )))
    }
}

/// The largest home-directory file [`read_as`] reads back.
const READ_MAX: usize = 1 << 20;

/// The file at the absolute `path` in `vm`, read as `user` (so a symlink
/// the user planted leads only where they could read anyway); `None` when
/// there is none. Larger than 1 MiB is refused.
pub async fn read_as(
    host: &dyn HostApi,
    vm: &str,
    path: &str,
    user: Option<&str>,
) -> Result<Option<Vec<u8>>, WriteError> {
    let out = host
        .exec(
            vm,
            ExecRequest {
                argv: as_user(
                    user,
                    sh(
                        r#"[ -e "$1" ] || exit 3; head -c "$2" "$1""#,
                        &[path, &(READ_MAX + 1).to_string()],
                    ),
                ),
                timeout_ms: Some(30_000),
                ..Default::default()
            },
        )
        .await
        .map_err(WriteError::Host)?;
    match out.status.and_then(|s| s.code) {
        Some(0) if out.stdout.len() > READ_MAX => Err(WriteError::Refused(format!(
            "{path} in the VM is larger than {READ_MAX} bytes; it is not a credential file"
        ))),
        Some(0) => Ok(Some(out.stdout)),
        Some(3) => Ok(None),
        _ => Err(WriteError::Refused(format!(
            "reading {path} in the VM{} failed: {}",
            user.map(|u| format!(" as {u}")).unwrap_or_default(),
            redact(String::from_utf8_lossy(&out.stderr).trim())
        ))),
    }
}

/// Why [`write_file`] failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The VM's agent could not be reached or did not answer; try again.
    #[error(transparent)]
    Host(HostError),
    /// The write ran and failed (permissions, a planted symlink, a full
    /// disk): the message says why.
    #[error("{0}")]
    Refused(String),
}

/// `argv` run as `user` (util-linux `runuser`), or as is.
pub(super) fn as_user(user: Option<&str>, argv: Vec<String>) -> Vec<String> {
    match user {
        Some(u) => ["runuser", "-u", u, "--"]
            .into_iter()
            .map(String::from)
            .chain(argv)
            .collect(),
        None => argv,
    }
}

/// Type `text` into the running login (its terminal, or its standard
/// input). `Ok(false)`: the login is not running.
pub async fn send_input(
    host: &dyn HostApi,
    vm: &str,
    session_id: &str,
    text: Vec<u8>,
) -> Result<bool, HostError> {
    let out = host
        .exec(
            vm,
            ExecRequest {
                argv: sh(INPUT, &[&dir(session_id)]),
                stdin: Some(text),
                timeout_ms: Some(30_000),
                ..Default::default()
            },
        )
        .await?;
    Ok(out.success())
}

/// The last [`TAIL_BYTES`] of the login's output, secrets redacted (see
/// [`redact`]): what a failure detail shows of the CLI's own words.
pub async fn output_tail(
    host: &dyn HostApi,
    vm: &str,
    session_id: &str,
) -> Result<String, HostError> {
    let path = format!("{}/output", dir(session_id));
    let Some(b) = host.read_file(vm, &path).await? else {
        return Ok(String::new());
    };
    let start = b.len().saturating_sub(TAIL_BYTES);
    let text = String::from_utf8_lossy(&b[start..]);
    Ok(redact(&strip_terminal_codes(&text)).trim().to_string())
}

/// Write `text` to the VM's console, which the host records in the VM's
/// console log and keeps after the VM is destroyed: a failed login's last
/// words outlive the browser VM's memory-only filesystem. Best effort (a
/// VM that does not answer loses only this copy; the failure detail has
/// the same text).
pub async fn to_console(host: &dyn HostApi, vm: &str, text: &str) {
    let req = ExecRequest {
        argv: sh(r#"cat >/dev/console"#, &[]),
        stdin: Some(text.as_bytes().to_vec()),
        timeout_ms: Some(10_000),
        ..Default::default()
    };
    if let Err(e) = host.exec(vm, req).await {
        tracing::debug!(vm, error = %e, "cannot copy the login's output to the console log");
    }
}

/// How much of a failed login's output its failure detail keeps.
pub const TAIL_BYTES: usize = 2048;

/// Run `req` in the VM; a non-zero exit is an error naming `what` with the
/// command's stderr.
async fn run_ok(
    host: &dyn HostApi,
    vm: &str,
    req: ExecRequest,
    what: &str,
) -> Result<(), HostError> {
    let out = host.exec(vm, req).await?;
    if out.success() {
        Ok(())
    } else {
        Err(HostError::Failed(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Write the provider's pre-login files and start its login command,
/// detached. A second call finds the directory and does nothing.
pub async fn start(
    host: &dyn HostApi,
    vm: &str,
    session_id: &str,
    p: &Provider,
    place: &LoginPlace,
) -> Result<(), HostError> {
    for w in &p.login_write {
        let path = format!("{}/{}", place.home, w.path);
        write_file(
            host,
            vm,
            &path,
            w.content.clone().into_bytes(),
            place.user.as_deref(),
        )
        .await
        .map_err(|e| match e {
            WriteError::Host(e) => e,
            WriteError::Refused(m) => HostError::Failed(m),
        })?;
    }
    let d = dir(session_id);
    let mut argv = as_user(place.user.as_deref(), p.login_command.clone());
    if p.login_tty {
        // The CLI draws an interactive prompt: give it a terminal
        // (util-linux `script`, output still to our file; `-e` keeps the
        // command's exit status) with a real size: `script` copies the
        // size of its standard input, which is no terminal here, and a TUI
        // on a 0x0 terminal draws its header but none of its dialogs
        // (measured with Gemini CLI 0.61).
        argv = vec![
            "script".into(),
            "-q".into(),
            "-f".into(),
            "-e".into(),
            "-c".into(),
            format!(
                "stty rows {TTY_ROWS} cols {TTY_COLS} 2>/dev/null; exec {}",
                shell_words(&argv)
            ),
            "/dev/null".into(),
        ];
    }
    let mut args: Vec<&str> = vec![INNER, &d, BROWSER_WRAPPER];
    args.extend(argv.iter().map(String::as_str));
    let mut env: BTreeMap<String, String> = place.env.clone();
    env.extend(p.login_env.clone());
    env.insert("HOME".into(), place.home.clone());
    let path = env.get("PATH").map_or(LOGIN_PATH, String::as_str);
    env.insert("PATH".into(), format!("{d}/bin:{path}"));
    env.insert("BROWSER".into(), format!("{d}/browser"));
    env.insert("POLYDEV_OPENED".into(), format!("{d}/opened"));
    if let Some(b) = &place.browser {
        env.insert("POLYDEV_REAL_BROWSER".into(), b.clone());
    }
    run_ok(
        host,
        vm,
        ExecRequest {
            argv: sh(START, &args),
            env,
            timeout_ms: Some(30_000),
            ..Default::default()
        },
        "starting the login",
    )
    .await
}

/// What a login has said so far: its output and the URLs it handed to
/// `$BROWSER` (each empty before it wrote any), terminal codes removed.
#[derive(Clone, Debug, Default)]
pub struct LoginText {
    /// URLs handed to `$BROWSER` or xdg-open, one per line.
    pub opened: String,
    /// The login's output (standard output and error, or its terminal).
    pub printed: String,
}

impl LoginText {
    /// The text the provider's auth URL is looked for in: its sources'.
    pub fn for_sources(&self, p: &Provider) -> String {
        let mut text = String::new();
        if p.auth_url_sources.contains(&UrlSource::XdgOpen) {
            text.push_str(&self.opened);
            text.push('\n');
        }
        if p.auth_url_sources.contains(&UrlSource::Output) {
            text.push_str(&self.printed);
            text.push('\n');
        }
        text
    }
}

/// Read what the login has said so far (see [`LoginText`]).
pub async fn read(host: &dyn HostApi, vm: &str, session_id: &str) -> Result<LoginText, HostError> {
    async fn text(host: &dyn HostApi, vm: &str, path: &str) -> Result<String, HostError> {
        // A terminal's control codes would glue onto a URL.
        Ok(host
            .read_file(vm, path)
            .await?
            .map(|b| strip_terminal_codes(&String::from_utf8_lossy(&b)))
            .unwrap_or_default())
    }
    let d = dir(session_id);
    Ok(LoginText {
        opened: text(host, vm, &format!("{d}/opened")).await?,
        printed: text(host, vm, &format!("{d}/output")).await?,
    })
}

/// Answer the questions the login's output shows (the provider's
/// `[[login.respond]]`), each once. `Ok(false)`: the login is not running.
pub async fn respond(
    host: &dyn HostApi,
    vm: &str,
    session_id: &str,
    p: &Provider,
    printed: &str,
) -> Result<bool, HostError> {
    // One exec per distinct answer text; rules with the same text share it.
    let mut by_text: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (i, r) in p.login_respond.iter().enumerate() {
        if r.when.is_match(printed) {
            by_text
                .entry(r.send.as_str())
                .or_default()
                .push(i.to_string());
        }
    }
    let d = dir(session_id);
    for (text, answers) in by_text {
        let mut args: Vec<&str> = vec![&d];
        args.extend(answers.iter().map(String::as_str));
        let out = host
            .exec(
                vm,
                ExecRequest {
                    argv: sh(RESPOND, &args),
                    stdin: Some(text.as_bytes().to_vec()),
                    timeout_ms: Some(30_000),
                    ..Default::default()
                },
            )
            .await?;
        if !out.success() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Where the auth URL sends the browser back (`redirect_uri`), and for a
/// loopback `http` callback whether something in the VM listens on its
/// port (the CLI's own callback server) — recorded with the URL, so a
/// sign-in that cannot come back is visible before anyone tries.
/// `Null` when the URL has no `redirect_uri`.
pub async fn callback(host: &dyn HostApi, vm: &str, auth_url: &str) -> serde_json::Value {
    let Some(redirect) = query_param(auth_url, "redirect_uri") else {
        return serde_json::Value::Null;
    };
    let port = loopback_port(&redirect);
    let listening = match port {
        Some(port) => listening(host, vm, port).await,
        None => None,
    };
    serde_json::json!({
        "redirect_uri": redirect,
        "loopback_port": port,
        "listening": listening,
    })
}

/// The decoded value of `name` in a URL's query.
pub fn query_param(url: &str, name: &str) -> Option<String> {
    let query = url.split_once('?')?.1.split('#').next()?;
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The port of an `http://127.0.0.1|localhost|[::1]:PORT/…` URL.
fn loopback_port(url: &str) -> Option<u16> {
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let (host, port) = authority.rsplit_once(':')?;
    matches!(host, "127.0.0.1" | "localhost" | "[::1]")
        .then(|| port.parse().ok())
        .flatten()
}

/// Whether a TCP socket listens on `port` in the VM (its `/proc/net/tcp`
/// and `tcp6`, state 0A); `None` when that cannot be read.
async fn listening(host: &dyn HostApi, vm: &str, port: u16) -> Option<bool> {
    let out = host
        .exec(
            vm,
            ExecRequest {
                argv: vec![
                    "cat".into(),
                    "/proc/net/tcp".into(),
                    "/proc/net/tcp6".into(),
                ],
                timeout_ms: Some(30_000),
                ..Default::default()
            },
        )
        .await
        .ok()?;
    let want = format!(":{port:04X}");
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.split_whitespace().nth(3) == Some("0A"))
            .filter_map(|l| l.split_whitespace().nth(1))
            .any(|local| local.ends_with(&want)),
    )
}

/// The provider's capture files that exist in `vm` (path relative to home → content).
pub async fn captured(
    host: &dyn HostApi,
    vm: &str,
    p: &Provider,
    home: &str,
) -> Result<BTreeMap<String, Vec<u8>>, HostError> {
    let mut files = BTreeMap::new();
    for f in &p.capture {
        if let Some(data) = host.read_file(vm, &format!("{home}/{}", f.path)).await? {
            files.insert(f.path.clone(), data);
        }
    }
    Ok(files)
}

/// Whether the VM is ready for use: every supervised service that has a
/// readiness probe passed it (the image's own definition of ready, e.g. the
/// browser image's desktop), and the configured probe (an argv run in the
/// VM), if any, exits 0.
pub async fn ready(
    host: &dyn HostApi,
    vm: &str,
    probe: &Option<Vec<String>>,
) -> Result<bool, HostError> {
    if host
        .services(vm)
        .await?
        .iter()
        .any(|s| s.awaiting_readiness())
    {
        return Ok(false);
    }
    let Some(argv) = probe else {
        return Ok(true);
    };
    let out = host
        .exec(
            vm,
            ExecRequest {
                argv: argv.clone(),
                timeout_ms: Some(30_000),
                ..Default::default()
            },
        )
        .await?;
    Ok(out.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_uris_are_read_from_auth_urls() {
        let url = "https://auth.openai.com/oauth/authorize?response_type=code&client_id=app_x&redirect_uri=http%3A%2F%2Flocalhost%3A1455%2Fauth%2Fcallback&scope=openid+profile&state=s";
        let r = query_param(url, "redirect_uri").unwrap();
        assert_eq!(r, "http://localhost:1455/auth/callback");
        assert_eq!(loopback_port(&r), Some(1455));
        assert_eq!(query_param(url, "scope").unwrap(), "openid profile");
        assert_eq!(query_param(url, "missing"), None);
        assert_eq!(
            loopback_port("http://127.0.0.1:38123/oauth2callback"),
            Some(38123)
        );
        assert_eq!(
            loopback_port("https://console.anthropic.com/oauth/code/callback"),
            None
        );
        assert_eq!(loopback_port("http://example.com:80/cb"), None);
        assert_eq!(query_param("https://x/?a=%zz%4", "a").unwrap(), "%zz%4");
    }

    #[test]
    fn shell_words_survive_quotes_and_metacharacters() {
        let argv: Vec<String> = ["echo", "it's", "$(rm -rf /)", "a b"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let line = shell_words(&argv);
        assert_eq!(line, r#"'echo' 'it'\''s' '$(rm -rf /)' 'a b'"#);
        let out = std::process::Command::new("sh")
            .args(["-c", &format!("printf '%s|' {line}")])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "echo|it's|$(rm -rf /)|a b|"
        );
    }
}
