//! Provider definitions: data, not code (`providers/*.toml` at the repo root).
//!
//! A provider file says how to log in (command, environment, files to write
//! first, whether it needs a terminal), how to recognise the auth URL (a
//! regex over the URL handed to `xdg-open` and/or over the CLI's output,
//! with examples that must match), the loopback callback, which files to
//! capture and how to validate them (JSON keys that must be present), and
//! how to run a prompt. Files are validated on load; every error names the
//! file and the field. The repo's three files are also embedded in the
//! binary ([`Providers::builtin`]) so a bare `polydev up` has them.

pub mod terminal;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use regex::Regex;
use serde::Deserialize;

/// Errors loading provider definitions.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The file or directory could not be read.
    #[error("provider definitions {path}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML or not the schema (unknown/missing field, wrong type).
    #[error("provider file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (with line and column).
        message: String,
    },
    /// Parsed, but a value is not acceptable.
    #[error("provider file {path}: `{field}` {problem}")]
    Invalid {
        /// The file.
        path: String,
        /// Dotted field name.
        field: String,
        /// What is wrong and what is expected.
        problem: String,
    },
    /// Two files define the same id.
    #[error("provider id {id:?} is defined twice: {first} and {second}")]
    Duplicate {
        /// The id.
        id: String,
        /// First file.
        first: String,
        /// Second file.
        second: String,
    },
}

/// Why a set of captured files does not (yet) hold a valid credential.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CaptureError {
    /// A required file was not captured.
    #[error("required file ~/{0} is missing")]
    Missing(String),
    /// A file is not JSON (its content is never echoed: it is a secret).
    #[error("~/{path} is not valid JSON (at line {line})")]
    NotJson {
        /// The file.
        path: String,
        /// Where parsing stopped.
        line: usize,
    },
    /// A required key is absent, null or empty.
    #[error("~/{path} lacks `{key}`")]
    MissingKey {
        /// The file.
        path: String,
        /// The dotted key.
        key: String,
    },
}

/// Where the auth URL is looked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub enum UrlSource {
    /// The URL the CLI passes to `xdg-open` (the guest's xdg-open reports it).
    #[serde(rename = "xdg-open")]
    XdgOpen,
    /// The CLI's terminal output.
    #[serde(rename = "output")]
    Output,
}

/// Format of a prompt run's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PromptOutput {
    /// Plain text.
    Text,
    /// One JSON document.
    Json,
    /// One JSON object per line.
    Jsonl,
    /// The CLI's streaming JSON events (one per line).
    StreamJson,
}

/// The callback port: fixed or chosen by the CLI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallbackPort {
    /// The CLI picks a free port.
    Random,
    /// Always this port.
    Fixed(u16),
}

/// One provider, validated.
#[derive(Clone, Debug)]
pub struct Provider {
    /// Stable id (`claude-code`); equals the file name's stem.
    pub id: String,
    /// Display name.
    pub name: String,
    /// The npm package that provides the CLI.
    pub npm_package: String,
    /// Login command (argv; no shell).
    pub login_command: Vec<String>,
    /// Extra environment for the login (never proxy variables).
    pub login_env: BTreeMap<String, String>,
    /// Files written into the home directory before the login starts.
    pub login_write: Vec<WriteFile>,
    /// Answers typed into the login when its output shows a question.
    pub login_respond: Vec<Respond>,
    /// Whether the login needs a terminal.
    pub login_tty: bool,
    /// How long the login may take.
    pub login_timeout_secs: u64,
    /// Where to look for the auth URL.
    pub auth_url_sources: BTreeSet<UrlSource>,
    /// Recognises the auth URL.
    pub auth_url: Regex,
    /// Loopback callback host.
    pub callback_host: String,
    /// Callback port.
    pub callback_port: CallbackPort,
    /// Callback path.
    pub callback_path: String,
    /// Files to capture (paths relative to the home directory).
    pub capture: Vec<CaptureFile>,
    /// Whether each refresh rotates the refresh token (then exactly one
    /// holder may use the credential at a time).
    pub rotates_refresh_token: bool,
    /// Prompt command; exactly one element is `{prompt}`.
    pub prompt_command: Vec<String>,
    /// Extra environment of a prompt run (e.g. which of its sign-in
    /// methods the CLI uses, since its own settings file is not
    /// delivered).
    pub prompt_env: BTreeMap<String, String>,
    /// Output format of a prompt run.
    pub prompt_output: PromptOutput,
    /// A cheap use of a delivered credential, run in the CLI VM as its
    /// user: exit 0 means the provider accepted it (`None`: no check; the
    /// JSON keys of the capture decide alone).
    pub check: Option<Check>,
}

/// How a delivered credential is tried (`[check]`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// Command (argv; no shell), run in the home directory.
    pub command: Vec<String>,
    /// How long it may take.
    #[serde(default = "default_check_timeout")]
    pub timeout_secs: u64,
}

fn default_check_timeout() -> u64 {
    120
}

/// A file to write before login.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFile {
    /// Relative to the home directory.
    pub path: String,
    /// Exact content.
    pub content: String,
}

/// An answer to a question the login asks before it reaches its auth URL
/// (`[[login.respond]]`): a CLI that draws a dialog ("Do you want to
/// continue?") waits for a key nobody would otherwise press.
#[derive(Clone, Debug)]
pub struct Respond {
    /// Recognises the question in the login's output (terminal codes
    /// removed).
    pub when: Regex,
    /// What is typed, once, the first time `when` matches (`"\r"` is Enter
    /// on a terminal).
    pub send: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRespond {
    when: String,
    send: String,
}

/// A file to capture after login.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureFile {
    /// Relative to the home directory.
    pub path: String,
    /// Whether the credential is incomplete without it.
    pub required: bool,
    /// Dotted JSON keys that must be present and non-empty.
    #[serde(default)]
    pub json_keys: Vec<String>,
    /// The credential's fields (dotted JSON keys): only these are sealed
    /// and delivered, merged into the CLI VM's own file (see
    /// `driver::fields`). Empty: the file is a credential as a whole.
    #[serde(default)]
    pub deliver_keys: Vec<String>,
}

// ---- the file schema --------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    id: String,
    name: String,
    npm_package: String,
    login: RawLogin,
    capture: Vec<CaptureFile>,
    refresh: RawRefresh,
    prompt: RawPrompt,
    #[serde(default)]
    check: Option<Check>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogin {
    command: Vec<String>,
    #[serde(default)]
    tty: bool,
    timeout_secs: u64,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    write: Vec<WriteFile>,
    #[serde(default)]
    respond: Vec<RawRespond>,
    auth_url: RawAuthUrl,
    callback: RawCallback,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthUrl {
    sources: Vec<UrlSource>,
    pattern: String,
    examples: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCallback {
    host: String,
    port: RawPort,
    path: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPort {
    Number(i64),
    Word(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRefresh {
    rotates_refresh_token: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrompt {
    command: Vec<String>,
    output: PromptOutput,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

/// Check an environment table: valid names, none the platform sets
/// itself, no NUL. The problem, if any.
fn valid_env(env: &BTreeMap<String, String>) -> Result<(), String> {
    for (k, v) in env {
        let name_ok = !k.is_empty()
            && !k.as_bytes()[0].is_ascii_digit()
            && k.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
        if !name_ok {
            return Err(format!("{k:?} is not a valid variable name"));
        }
        if RESERVED_ENV.contains(&k.to_ascii_uppercase().as_str()) {
            return Err(format!("{k} is set by the platform (egress goes through the per-user proxy) and must not be overridden"));
        }
        if v.contains('\0') {
            return Err(format!("{k} contains NUL"));
        }
    }
    Ok(())
}

/// Variables the platform sets itself (the in-VM egress shim); a provider
/// setting them would bypass the per-user upstream.
const RESERVED_ENV: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "HOME",
    "PATH",
];

fn valid_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// A path under the home directory: relative, no `..`, no `~`, no empty parts.
fn valid_home_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('~')
        && !p.contains('\0')
        && !p.ends_with('/')
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

fn valid_argv(argv: &[String]) -> Result<(), String> {
    let Some(prog) = argv.first() else {
        return Err("must name a program".into());
    };
    if prog.is_empty() || prog.contains(char::is_whitespace) {
        return Err(format!(
            "program {prog:?} must be one word (argv, not a shell line)"
        ));
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err("arguments must not contain NUL".into());
    }
    Ok(())
}

impl Provider {
    /// Parse and validate one provider file's text. `origin` names it in errors;
    /// `expected_id` (the file stem) must equal the `id` field when given.
    pub fn parse(
        text: &str,
        origin: &str,
        expected_id: Option<&str>,
    ) -> Result<Self, ProviderError> {
        let raw: RawProvider = toml::from_str(text).map_err(|e| ProviderError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        let bad = |field: &str, problem: String| ProviderError::Invalid {
            path: origin.to_string(),
            field: field.to_string(),
            problem,
        };
        if !valid_id(&raw.id) {
            return Err(bad(
                "id",
                format!(
                    "{:?} must be 1-32 characters of [a-z0-9-], starting with a letter",
                    raw.id
                ),
            ));
        }
        if let Some(stem) = expected_id {
            if stem != raw.id {
                return Err(bad(
                    "id",
                    format!("{:?} must equal the file name {stem:?}.toml", raw.id),
                ));
            }
        }
        if raw.name.trim().is_empty() {
            return Err(bad("name", "must not be empty".into()));
        }
        if raw.npm_package.trim().is_empty() {
            return Err(bad("npm_package", "must not be empty".into()));
        }
        let l = raw.login;
        valid_argv(&l.command).map_err(|p| bad("login.command", p))?;
        if !(30..=3600).contains(&l.timeout_secs) {
            return Err(bad(
                "login.timeout_secs",
                format!("{} must be between 30 and 3600", l.timeout_secs),
            ));
        }
        valid_env(&l.env).map_err(|e| bad("login.env", e))?;
        for w in &l.write {
            if !valid_home_path(&w.path) {
                return Err(bad(
                    "login.write.path",
                    format!("{:?} must be a relative path under the home directory (no `..`, `~` or leading `/`)", w.path),
                ));
            }
        }
        let mut respond = Vec::with_capacity(l.respond.len());
        for r in &l.respond {
            let when = Regex::new(&r.when).map_err(|e| {
                bad(
                    "login.respond.when",
                    format!("{:?} is not a valid regex: {e}", r.when),
                )
            })?;
            if r.send.is_empty() || r.send.len() > 256 {
                return Err(bad(
                    "login.respond.send",
                    "must be 1-256 bytes (what a person would type, e.g. \"\\r\" for Enter)".into(),
                ));
            }
            respond.push(Respond {
                when,
                send: r.send.clone(),
            });
        }
        let sources: BTreeSet<UrlSource> = l.auth_url.sources.iter().copied().collect();
        if sources.is_empty() {
            return Err(bad(
                "login.auth_url.sources",
                "must list \"xdg-open\" and/or \"output\"".into(),
            ));
        }
        let pat = l.auth_url.pattern.trim_start_matches('^');
        if !pat.starts_with("https://") {
            return Err(bad(
                "login.auth_url.pattern",
                "must start with https:// (an auth URL is never plain HTTP)".into(),
            ));
        }
        let auth_url = Regex::new(&l.auth_url.pattern).map_err(|e| {
            bad(
                "login.auth_url.pattern",
                format!("is not a valid regex: {e}"),
            )
        })?;
        if l.auth_url.examples.is_empty() {
            return Err(bad(
                "login.auth_url.examples",
                "must give at least one URL the pattern recognises".into(),
            ));
        }
        for ex in &l.auth_url.examples {
            if auth_url.find(ex).map(|m| m.as_str()) != Some(ex.as_str()) {
                return Err(bad(
                    "login.auth_url.examples",
                    format!("{ex:?} is not matched in full by the pattern"),
                ));
            }
        }
        let c = l.callback;
        if !matches!(c.host.as_str(), "127.0.0.1" | "localhost" | "::1") {
            return Err(bad(
                "login.callback.host",
                format!("{:?} must be a loopback address", c.host),
            ));
        }
        let callback_port = match c.port {
            RawPort::Word(w) if w == "random" => CallbackPort::Random,
            RawPort::Number(n) if (1..=65535).contains(&n) => {
                CallbackPort::Fixed(u16::try_from(n).unwrap_or(0))
            }
            RawPort::Word(w) => {
                return Err(bad(
                    "login.callback.port",
                    format!("{w:?} must be \"random\" or a port number 1-65535"),
                ))
            }
            RawPort::Number(n) => {
                return Err(bad(
                    "login.callback.port",
                    format!("{n} must be \"random\" or a port number 1-65535"),
                ))
            }
        };
        if !c.path.starts_with('/') {
            return Err(bad(
                "login.callback.path",
                format!("{:?} must start with /", c.path),
            ));
        }
        if !raw.capture.iter().any(|f| f.required) {
            return Err(bad(
                "capture",
                "must list at least one file with required = true".into(),
            ));
        }
        let mut seen = BTreeSet::new();
        for f in &raw.capture {
            if !valid_home_path(&f.path) {
                return Err(bad(
                    "capture.path",
                    format!("{:?} must be a relative path under the home directory (no `..`, `~` or leading `/`)", f.path),
                ));
            }
            if !seen.insert(f.path.as_str()) {
                return Err(bad("capture.path", format!("{:?} is listed twice", f.path)));
            }
            if f.required && f.json_keys.is_empty() {
                return Err(bad(
                    "capture.json_keys",
                    format!("required file {:?} must name the JSON keys that prove it holds a credential", f.path),
                ));
            }
            for k in f.json_keys.iter().chain(&f.deliver_keys) {
                if k.split('.').any(str::is_empty) {
                    return Err(bad(
                        "capture.json_keys",
                        format!("{k:?} must be dotted names like \"tokens.refresh_token\""),
                    ));
                }
            }
            // What proves the file a credential must be delivered.
            let covered = |k: &str| {
                f.deliver_keys
                    .iter()
                    .any(|d| k == d || k.starts_with(&format!("{d}.")))
            };
            if let Some(k) = f
                .json_keys
                .iter()
                .find(|k| !f.deliver_keys.is_empty() && !covered(k))
            {
                return Err(bad(
                    "capture.deliver_keys",
                    format!(
                        "must include {k:?} (or a parent of it): it is one of the file's json_keys"
                    ),
                ));
            }
        }
        let p = raw.prompt;
        valid_argv(&p.command).map_err(|e| bad("prompt.command", e))?;
        valid_env(&p.env).map_err(|e| bad("prompt.env", e))?;
        let slots = p.command.iter().filter(|a| *a == "{prompt}").count();
        let embedded = p
            .command
            .iter()
            .any(|a| a != "{prompt}" && a.contains("{prompt}"));
        if slots != 1 || embedded {
            return Err(bad(
                "prompt.command",
                "must contain exactly one argument that is exactly \"{prompt}\" (the prompt is passed as one argv element, never spliced into text)".into(),
            ));
        }
        if let Some(c) = &raw.check {
            valid_argv(&c.command).map_err(|e| bad("check.command", e))?;
            if c.timeout_secs == 0 || c.timeout_secs > 3600 {
                return Err(bad(
                    "check.timeout_secs",
                    format!("{} must be 1-3600 seconds", c.timeout_secs),
                ));
            }
        }
        Ok(Provider {
            id: raw.id,
            name: raw.name,
            npm_package: raw.npm_package,
            login_command: l.command,
            login_env: l.env,
            login_write: l.write,
            login_respond: respond,
            login_tty: l.tty,
            login_timeout_secs: l.timeout_secs,
            auth_url_sources: sources,
            auth_url,
            callback_host: c.host,
            callback_port,
            callback_path: c.path,
            capture: raw.capture,
            rotates_refresh_token: raw.refresh.rotates_refresh_token,
            prompt_command: p.command,
            prompt_env: p.env,
            prompt_output: p.output,
            check: raw.check,
        })
    }

    /// The first auth URL in `text` (a URL given to xdg-open, or CLI output).
    pub fn find_auth_url(&self, text: &str) -> Option<String> {
        // A URL never holds a control character, but a pattern like `\S+`
        // matches NULs and BELs; without the split, terminal output could
        // carry them into the URL handed to the browser (found by the
        // auth_url fuzz target).
        text.split(char::is_control)
            .find_map(|piece| self.auth_url.find(piece))
            .map(|m| m.as_str().to_string())
    }

    /// The prompt argv with `prompt` as one argument.
    pub fn prompt_argv(&self, prompt: &str) -> Vec<String> {
        self.prompt_command
            .iter()
            .map(|a| {
                if a == "{prompt}" {
                    prompt.to_string()
                } else {
                    a.clone()
                }
            })
            .collect()
    }

    /// Check captured files (path relative to home → content): every required
    /// file is present, and every listed file present is JSON with its keys.
    pub fn validate_capture(&self, files: &BTreeMap<String, Vec<u8>>) -> Result<(), CaptureError> {
        for f in &self.capture {
            let Some(bytes) = files.get(&f.path) else {
                if f.required {
                    return Err(CaptureError::Missing(f.path.clone()));
                }
                continue;
            };
            let v: serde_json::Value =
                serde_json::from_slice(bytes).map_err(|e| CaptureError::NotJson {
                    path: f.path.clone(),
                    line: e.line(),
                })?;
            for k in &f.json_keys {
                let found = k.split('.').try_fold(&v, |v, part| v.get(part));
                let present = match found {
                    None | Some(serde_json::Value::Null) => false,
                    Some(serde_json::Value::String(s)) => !s.is_empty(),
                    Some(_) => true,
                };
                if !present {
                    return Err(CaptureError::MissingKey {
                        path: f.path.clone(),
                        key: k.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// All providers by id.
#[derive(Clone, Debug, Default)]
pub struct Providers {
    by_id: BTreeMap<String, Provider>,
}

const BUILTIN: &[(&str, &str)] = &[
    (
        "claude-code",
        include_str!("../../../providers/claude-code.toml"),
    ),
    ("codex", include_str!("../../../providers/codex.toml")),
    (
        "gemini-cli",
        include_str!("../../../providers/gemini-cli.toml"),
    ),
];

impl Providers {
    /// The definitions shipped in the binary (copies of the repo's `providers/`).
    pub fn builtin() -> Result<Self, ProviderError> {
        let mut set = Providers::default();
        for (id, text) in BUILTIN {
            let origin = format!("builtin providers/{id}.toml");
            set.insert(Provider::parse(text, &origin, Some(id))?, &origin)?;
        }
        Ok(set)
    }

    /// Load every `*.toml` in `dir`; any invalid file fails the whole load.
    pub fn load_dir(dir: &Path) -> Result<Self, ProviderError> {
        let io = |source| ProviderError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(io)?
            .into_iter()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        paths.sort();
        let mut set = Providers::default();
        for p in paths {
            let text = std::fs::read_to_string(&p).map_err(|source| ProviderError::Io {
                path: p.clone(),
                source,
            })?;
            let origin = p.display().to_string();
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            set.insert(Provider::parse(&text, &origin, Some(stem))?, &origin)?;
        }
        Ok(set)
    }

    fn insert(&mut self, p: Provider, origin: &str) -> Result<(), ProviderError> {
        if self.by_id.contains_key(&p.id) {
            return Err(ProviderError::Duplicate {
                id: p.id.clone(),
                first: "an earlier file".into(),
                second: origin.to_string(),
            });
        }
        self.by_id.insert(p.id.clone(), p);
        Ok(())
    }

    /// A provider by id.
    pub fn get(&self, id: &str) -> Option<&Provider> {
        self.by_id.get(id)
    }

    /// All providers, ordered by id.
    pub fn iter(&self) -> impl Iterator<Item = &Provider> {
        self.by_id.values()
    }

    /// Number of providers.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CODEX: &str = include_str!("../../../providers/codex.toml");

    fn err(text: &str) -> String {
        Provider::parse(text, "t.toml", Some("codex"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn repo_files_load_and_match_builtin() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../providers");
        let set = Providers::load_dir(&dir).unwrap();
        let ids: Vec<_> = set.iter().map(|p| p.id.as_str()).collect();
        // The test CLI's definition lives beside the real ones but is not
        // built in: production has no test CLI.
        assert_eq!(ids, ["claude-code", "codex", "gemini-cli", "testcli"]);
        assert_eq!(Providers::builtin().unwrap().len(), 3);
        let t = set.get("testcli").unwrap();
        let check = t.check.as_ref().unwrap();
        assert_eq!(check.command, ["polydev-testcli", "whoami"]);
        assert!(Providers::builtin().unwrap().get("testcli").is_none());
        let codex = set.get("codex").unwrap();
        assert_eq!(codex.callback_port, CallbackPort::Fixed(1455));
        assert!(set.get("claude-code").unwrap().rotates_refresh_token);
        assert!(!set.get("gemini-cli").unwrap().rotates_refresh_token);
    }

    /// A control character ends a URL (the auth_url fuzz target's crash:
    /// NULs inside a printed URL came out as part of it).
    #[test]
    fn an_auth_url_ends_at_a_control_character() {
        let set = Providers::builtin().unwrap();
        let claude = set.get("claude-code").unwrap();
        let out = "\u{1b}]8;;https://claude.ai/oauth/authorize?code=true\0\0&client_id=9d1c&state=xyz\u{7}";
        let found = claude.find_auth_url(out).unwrap_or_default();
        assert!(!found.chars().any(char::is_control), "{found:?}");
        let codex = set.get("codex").unwrap();
        let out = "https://auth.openai.com/oauth/authorize?response_type=code\u{7}&client_id=x";
        assert_eq!(
            codex.find_auth_url(out).as_deref(),
            Some("https://auth.openai.com/oauth/authorize?response_type=code")
        );
    }

    #[test]
    fn finds_auth_url_in_output() {
        let set = Providers::builtin().unwrap();
        let out = "Starting local login server on http://localhost:1455.\nIf your browser did not open, navigate to this URL to authenticate:\n\nhttps://auth.openai.com/oauth/authorize?response_type=code&client_id=x&state=y\n";
        assert_eq!(
            set.get("codex").unwrap().find_auth_url(out).as_deref(),
            Some("https://auth.openai.com/oauth/authorize?response_type=code&client_id=x&state=y")
        );
        // A look-alike host is not an auth URL.
        assert_eq!(
            set.get("codex")
                .unwrap()
                .find_auth_url("https://auth.openai.com.evil.example/oauth/authorize?x=1"),
            None
        );
        let g = set.get("gemini-cli").unwrap();
        // Its two questions are answered with Enter.
        assert_eq!(g.login_respond.len(), 2);
        assert!(g.login_respond.iter().all(|r| r.send == "\r"));
        assert!(g.login_respond[1]
            .when
            .is_match("Opening authentication page in your browser. Do you want to continue?"));
        assert!(g
            .find_auth_url(
                "xdg-open 'https://accounts.google.com/o/oauth2/v2/auth?client_id=1&state=2'"
            )
            .is_some_and(|u| u.ends_with("state=2")));
    }

    #[test]
    fn prompt_is_one_argument() {
        let set = Providers::builtin().unwrap();
        let argv = set
            .get("claude-code")
            .unwrap()
            .prompt_argv("hi; rm -rf / $(x)");
        assert!(argv.contains(&"hi; rm -rf / $(x)".to_string()));
        assert_eq!(argv[0], "claude");
    }

    #[test]
    fn capture_validation() {
        let set = Providers::builtin().unwrap();
        let c = set.get("claude-code").unwrap();
        let mut files = BTreeMap::new();
        assert_eq!(
            c.validate_capture(&files),
            Err(CaptureError::Missing(".claude/.credentials.json".into()))
        );
        files.insert(
            ".claude/.credentials.json".to_string(),
            b"{not json SECRET".to_vec(),
        );
        let e = c.validate_capture(&files).unwrap_err();
        assert!(!e.to_string().contains("SECRET"), "{e}");
        files.insert(
            ".claude/.credentials.json".to_string(),
            br#"{"claudeAiOauth":{"accessToken":"a","refreshToken":""}}"#.to_vec(),
        );
        assert_eq!(
            c.validate_capture(&files),
            Err(CaptureError::MissingKey {
                path: ".claude/.credentials.json".into(),
                key: "claudeAiOauth.refreshToken".into()
            })
        );
        files.insert(
            ".claude/.credentials.json".to_string(),
            br#"{"claudeAiOauth":{"accessToken":"a","refreshToken":"r","expiresAt":1}}"#.to_vec(),
        );
        assert_eq!(c.validate_capture(&files), Ok(()));
        // An optional file, when present, must still be valid.
        files.insert(".claude.json".to_string(), b"{}".to_vec());
        assert!(matches!(
            c.validate_capture(&files),
            Err(CaptureError::MissingKey { .. })
        ));
    }

    #[test]
    fn bad_files_get_clear_errors() {
        let cases: &[(&str, &str, &str)] = &[
            ("id = \"codex\"", "id = \"Codex\"", "[a-z0-9-]"),
            ("id = \"codex\"", "id = \"codex2\"", "file name"),
            ("name = \"Codex\"", "name = \" \"", "`name` must not be empty"),
            ("command = [\"codex\", \"login\"]", "command = []", "login.command"),
            ("command = [\"codex\", \"login\"]", "command = [\"codex login\"]", "one word"),
            ("timeout_secs = 900", "timeout_secs = 5", "between 30 and 3600"),
            ("tty = false", "tty = false\nenv = { HTTPS_PROXY = \"http://x\" }", "set by the platform"),
            ("tty = false", "tty = false\nenv = { \"1X\" = \"y\" }", "not a valid variable name"),
            ("sources = [\"xdg-open\", \"output\"]", "sources = []", "xdg-open"),
            ("sources = [\"xdg-open\", \"output\"]", "sources = [\"browser\"]", "unknown variant"),
            ("pattern = '''https://auth", "pattern = '''http://auth", "https://"),
            (r#"oauth/authorize\?[^\s"']+'''"#, r#"oauth/authorize\?[^\s"']+('''"#, "not a valid regex"),
            ("examples = [\n  \"https://auth.openai.com/oauth/authorize?", "examples = [\n  \"https://elsewhere.example/?", "not matched in full"),
            ("host = \"127.0.0.1\"", "host = \"0.0.0.0\"", "loopback"),
            ("port = 1455", "port = 70000", "1-65535"),
            ("port = 1455", "port = \"any\"", "\"random\""),
            ("path = \"/auth/callback\"", "path = \"auth/callback\"", "start with /"),
            ("path = \".codex/auth.json\"", "path = \"../.codex/auth.json\"", "relative path"),
            ("path = \".codex/auth.json\"", "path = \"/root/.codex/auth.json\"", "relative path"),
            ("path = \".codex/auth.json\"", "path = \"~/.codex/auth.json\"", "relative path"),
            ("required = true", "required = false", "required = true"),
            ("json_keys = [\"tokens.access_token\", \"tokens.refresh_token\", \"tokens.id_token\"]", "json_keys = []", "JSON keys"),
            ("json_keys = [\"tokens.access_token\",", "json_keys = [\"tokens..access_token\",", "dotted"),
            ("\"--skip-git-repo-check\", \"{prompt}\"]", "\"--skip-git-repo-check\"]", "{prompt}"),
            ("\"--skip-git-repo-check\", \"{prompt}\"]", "\"--skip-git-repo-check\", \"say {prompt}\"]", "{prompt}"),
            ("output = \"jsonl\"", "output = \"jsonl\"\n[[login.respond]]\nwhen = '('\nsend = \"y\"", "login.respond.when"),
            ("output = \"jsonl\"", "output = \"jsonl\"\n[[login.respond]]\nwhen = 'continue'\nsend = \"\"", "login.respond.send"),
            ("deliver_keys = [\"auth_mode\", \"OPENAI_API_KEY\", \"tokens\", \"last_refresh\"]", "deliver_keys = [\"auth_mode\"]", "must include \"tokens.access_token\""),
            ("deliver_keys = [\"auth_mode\", \"OPENAI_API_KEY\", \"tokens\", \"last_refresh\"]", "deliver_keys = [\"tokens.\"]", "dotted"),
            ("output = \"jsonl\"", "output = \"xml\"", "unknown variant"),
            ("output = \"jsonl\"", "output = \"jsonl\"\nenv = { NO_PROXY = \"*\" }", "prompt.env"),
            ("output = \"jsonl\"", "output = \"jsonl\"\nenv = { \"A-B\" = \"1\" }", "not a valid variable name"),
            ("output = \"jsonl\"", "output = \"jsonl\"\nshell = true", "unknown field"),
            ("rotates_refresh_token = true", "", "missing field `rotates_refresh_token`"),
        ];
        for (from, to, want) in cases {
            assert!(CODEX.contains(from), "fixture lacks {from:?}");
            let e = err(&CODEX.replacen(from, to, 1));
            assert!(e.contains(want), "{from:?} -> {to:?}: {e}");
            assert!(e.contains("t.toml"), "{e}");
        }
        assert!(err("not toml ===").contains("t.toml"));
    }

    #[test]
    fn load_dir_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("codex.toml"), CODEX).unwrap();
        std::fs::write(dir.path().join("README.md"), "ignored").unwrap();
        assert_eq!(Providers::load_dir(dir.path()).unwrap().len(), 1);
        std::fs::write(dir.path().join("other.toml"), CODEX).unwrap();
        let e = Providers::load_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("other.toml") && e.contains("file name"), "{e}");
        let e = Providers::load_dir(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
    }
}
