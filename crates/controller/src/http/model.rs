//! Request and response bodies of the HTTP API. Requests deny unknown
//! fields (a typo is an error, not a silently ignored option); responses
//! never carry a secret other than the one a call exists to hand out once
//! (a new API token, a stream ticket, a login link).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{ApiTokenInfo, Principal, Role, Scope};
use crate::store::{Assignment, CredentialInfo, Event, Session, UpstreamStats, Vm, VmKind};

/// RFC 7807 problem details: the body of every error answer.
#[derive(Serialize, ToSchema)]
#[schema(as = Problem)]
pub struct ProblemDoc {
    /// A URI naming the problem type.
    #[serde(rename = "type")]
    pub type_: String,
    /// Short summary of the problem type.
    pub title: String,
    /// HTTP status code.
    pub status: u16,
    /// What happened and what to do about it.
    pub detail: String,
    /// The resource this problem concerns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The request id (also in the `X-Request-Id` header).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// Liveness.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// Readiness: the database answers and the server is not shutting down.
#[derive(Serialize, ToSchema)]
pub struct Ready {
    /// `ready`.
    pub status: String,
    /// `sqlite` or `postgres`.
    pub database: String,
    /// Whether a driver advances records in this process.
    pub driver: bool,
}

/// Password login.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// Login name.
    #[schema(min_length = 1, max_length = 64)]
    pub name: String,
    /// Password.
    #[schema(min_length = 1, max_length = 1024)]
    pub password: String,
}

/// Redeem a one-time login link.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkRequest {
    /// The `pdl_…` token of the link.
    #[schema(min_length = 1, max_length = 128)]
    pub token: String,
}

/// Query of `GET /auth/link`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LinkQuery {
    /// The `pdl_…` token of the link.
    pub token: String,
}

/// Set (or change) the caller's password. Every login session and nothing
/// else ends: API tokens stay valid.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    /// The current password; required when the account has one, unless a
    /// one-time login link started this session.
    #[schema(max_length = 1024)]
    pub current_password: Option<String>,
    /// The new password (at least 15 characters).
    #[schema(min_length = 15, max_length = 1024)]
    pub new_password: String,
}

/// How the caller authenticated.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuthVia {
    /// Dashboard cookie.
    Cookie,
    /// API token.
    ApiToken,
    /// External JWT.
    Jwt,
    /// One-time login link.
    LoginLink,
    /// Stream ticket.
    Ticket,
}

/// The caller.
#[derive(Serialize, ToSchema)]
pub struct Me {
    /// `usr-…`.
    pub id: String,
    /// Login name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// What this credential may do.
    pub scopes: Vec<Scope>,
    /// How it authenticated.
    pub via: AuthVia,
}

impl From<&Principal> for Me {
    fn from(p: &Principal) -> Self {
        use crate::auth::AuthMethod as M;
        Me {
            id: p.user_id.clone(),
            name: p.name.clone(),
            role: p.role,
            scopes: p.scopes.clone(),
            via: match p.via {
                M::Cookie => AuthVia::Cookie,
                M::ApiToken { .. } => AuthVia::ApiToken,
                M::Jwt { .. } => AuthVia::Jwt,
                M::LoginLink => AuthVia::LoginLink,
                M::Ticket { .. } => AuthVia::Ticket,
            },
        }
    }
}

/// Create an API token.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    /// A label (1-100 printable characters, not only spaces).
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\x00-\\x1f\\x7f-\\x9f\\s][^\\x00-\\x1f\\x7f-\\x9f]*$"
    )]
    pub name: String,
    /// At least one scope, within the caller's role.
    #[schema(min_items = 1)]
    pub scopes: Vec<Scope>,
    /// Expiry, milliseconds since the epoch; in the future. None: never.
    #[serde(default, deserialize_with = "integral::option_i64")]
    pub expires_at: Option<i64>,
}

/// A new API token: `token` is shown this once.
#[derive(Serialize, ToSchema)]
pub struct TokenCreated {
    /// The bearer token (`pdt_…`): store it now, it cannot be shown again.
    pub token: String,
    /// Its metadata.
    #[serde(flatten)]
    pub info: ApiTokenInfo,
}

/// A provider the user can connect.
#[derive(Serialize, ToSchema)]
pub struct ProviderView {
    /// Id (`claude-code`, `codex`, `gemini-cli`).
    pub id: String,
    /// Display name.
    pub name: String,
    /// The npm package of its CLI.
    pub npm_package: String,
}

/// Why a record failed.
#[derive(Serialize, ToSchema)]
pub struct FailureView {
    /// One of a closed set (`timeout`, `vm_create_failed`, …).
    pub reason: String,
    /// What happened.
    pub detail: String,
}

/// Start connecting a provider.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionCreate {
    /// Provider id (see `GET /api/v1/providers`).
    #[schema(min_length = 1, max_length = 64, pattern = "^[a-z0-9][a-z0-9_-]*$")]
    pub provider: String,
}

/// Text the person types into a session's running login (e.g. the code a
/// provider's page asks them to paste back into the CLI).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionInput {
    /// The text (1-4096 characters, no control characters).
    #[schema(
        min_length = 1,
        max_length = 4096,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$"
    )]
    pub text: String,
    /// Press Enter after the text (default true).
    #[serde(default = "default_true")]
    pub enter: bool,
}

fn default_true() -> bool {
    true
}

/// A connect-provider session.
#[derive(Serialize, ToSchema)]
pub struct SessionView {
    /// `ses-…`.
    pub id: String,
    /// Provider id.
    pub provider: String,
    /// `requested`, `starting_vm`, `starting_login`, `awaiting_user`,
    /// `capturing`, `delivering`, `completed`, `cancelled`, `failed`.
    pub state: String,
    /// Whether the state is final.
    pub done: bool,
    /// When the state was entered (ms).
    pub state_since: i64,
    /// When the state times out (ms).
    pub deadline_at: Option<i64>,
    /// The browser VM of the login, once there is one.
    pub browser_vm_id: Option<String>,
    /// Why it failed.
    pub failure: Option<FailureView>,
    /// Created (ms).
    pub created_at: i64,
}

fn failure_view(f: &Option<crate::state::Failure>) -> Option<FailureView> {
    f.as_ref().map(|f| FailureView {
        reason: f.reason.as_str().to_string(),
        detail: f.detail.clone(),
    })
}

impl From<&Session> for SessionView {
    fn from(s: &Session) -> Self {
        use crate::state::Lifecycle;
        SessionView {
            id: s.id.clone(),
            provider: s.provider.clone(),
            state: s.life.state.as_str().to_string(),
            done: s.life.state.is_final(),
            state_since: s.life.state_since,
            deadline_at: s.life.deadline_at,
            browser_vm_id: s.browser_vm_id.clone(),
            failure: failure_view(&s.life.failure),
            created_at: s.created_at,
        }
    }
}

/// One event of a session's history.
#[derive(Serialize, ToSchema)]
pub struct EventView {
    /// Monotonic id (the SSE `id`).
    pub id: i64,
    /// Time (ms).
    pub at: i64,
    /// `created`, `state`, ….
    pub kind: String,
    /// Previous state (state events).
    pub from_state: Option<String>,
    /// New state (state events).
    pub to_state: Option<String>,
    /// Detail, e.g. the auth URL the login printed.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

impl From<Event> for EventView {
    fn from(e: Event) -> Self {
        EventView {
            id: e.id,
            at: e.at,
            kind: e.kind,
            from_state: e.from_state,
            to_state: e.to_state,
            detail: e.detail,
        }
    }
}

/// Kind of VM a user may ask for.
#[derive(Deserialize, Serialize, ToSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VmKindView {
    /// The user's persistent CLI VM (one per user).
    Cli,
    /// A login's desktop VM (made by sessions, not requested directly).
    Browser,
}

/// Ask for a VM.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmCreate {
    /// Only `cli`: browser VMs belong to connect sessions (documented as
    /// `cli` alone; `browser` is still parsed, to answer with where browser
    /// VMs come from).
    #[schema(value_type = NewVmKind)]
    pub kind: VmKindView,
}

/// The body of a request that takes no options: `{}`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NoOptions {}

/// The kind of VM `POST /api/v1/vms` makes: the caller's CLI VM.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum NewVmKind {
    /// The user's persistent CLI VM (one per user).
    Cli,
}

/// A VM.
#[derive(Serialize, ToSchema)]
pub struct VmView {
    /// `vm-…`.
    pub id: String,
    /// Kind.
    pub kind: VmKindView,
    /// `pending`, `creating`, `running`, `hibernating`, `hibernated`,
    /// `resuming`, `stopping`, `destroyed`, `failed`.
    pub state: String,
    /// Whether the state is final.
    pub done: bool,
    /// When the state was entered (ms).
    pub state_since: i64,
    /// Why it failed.
    pub failure: Option<FailureView>,
    /// Created (ms).
    pub created_at: i64,
}

impl From<&Vm> for VmView {
    fn from(v: &Vm) -> Self {
        use crate::state::Lifecycle;
        VmView {
            id: v.id.clone(),
            kind: match v.kind {
                VmKind::Cli => VmKindView::Cli,
                VmKind::Browser => VmKindView::Browser,
            },
            state: v.life.state.as_str().to_string(),
            done: v.life.state.is_final(),
            state_since: v.life.state_since,
            failure: failure_view(&v.life.failure),
            created_at: v.created_at,
        }
    }
}

/// A stored credential's metadata (never its content).
#[derive(Serialize, ToSchema)]
pub struct CredentialView {
    /// Provider id.
    pub provider: String,
    /// Version (bumps when it is replaced).
    pub version: i64,
    /// First stored (ms).
    pub created_at: i64,
    /// Last changed (ms).
    pub updated_at: i64,
    /// The CLI VM (`vm-…`) this version was delivered to; `null` when it
    /// is in the vault only (not delivered yet, or that VM is gone). The
    /// holder is the only live copy: its refreshes are written back as new
    /// versions.
    pub holder_vm_id: Option<String>,
    /// When its tokens were last obtained: the sign-in, or a refresh in the
    /// holder written back (ms); `null` for credentials older than this
    /// field.
    pub last_refresh_at: Option<i64>,
    /// When the access token expires (ms), when the provider's files say;
    /// `null` when they do not.
    pub expires_at: Option<i64>,
    /// `ok`, or `needs_login` when the credential is known dead (a refresh
    /// was refused, the CLI blanked its tokens): connect the provider again.
    #[schema(example = "ok")]
    pub status: String,
    /// Why it needs a login (`null` when `ok`).
    pub status_reason: Option<String>,
}

impl From<CredentialInfo> for CredentialView {
    fn from(c: CredentialInfo) -> Self {
        CredentialView {
            provider: c.provider,
            version: c.version,
            created_at: c.created_at,
            updated_at: c.updated_at,
            holder_vm_id: c.holder_vm_id,
            last_refresh_at: c.refreshed_at,
            expires_at: c.expires_at,
            status: c.status,
            status_reason: c.status_reason,
        }
    }
}

/// A disconnected provider: its sealed credential is deleted.
#[derive(Serialize, ToSchema)]
pub struct CredentialDeleted {
    /// Provider id.
    pub provider: String,
    /// The CLI VM (`vm-…`) the provider's files were removed from first;
    /// `null` when the user had no running CLI VM (none, or stopped: a
    /// stopped VM keeps the files it was given).
    pub removed_from_vm: Option<String>,
}

/// Kind of stream.
#[derive(Deserialize, Serialize, ToSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    /// A login's desktop (resource: the session): its VNC (RFB) stream over
    /// a WebSocket at `/api/v1/sessions/{id}/desktop`.
    Desktop,
    /// A running CLI VM's terminal (resource: the VM): a login shell over a
    /// WebSocket at `/api/v1/vms/{id}/terminal`.
    Terminal,
}

impl StreamKind {
    /// Spelling in tickets and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Desktop => "desktop",
            StreamKind::Terminal => "terminal",
        }
    }
}

/// Query of a stream URL: the ticket (browsers cannot set headers on a
/// WebSocket).
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// A `pdk_…` ticket from `POST /api/v1/tickets` for this stream.
    pub ticket: String,
}

/// The headers of a WebSocket handshake, documented on the stream
/// operations as what a client must send (the values a WebSocket client
/// sends; `Connection` may also list other tokens). Never extracted: axum's
/// `WebSocketUpgrade` checks them.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct WebSocketHandshake {
    /// WebSocket handshake
    #[param(rename = "connection", pattern = "^Upgrade$")]
    connection: String,
    /// WebSocket handshake
    #[param(rename = "upgrade", pattern = "^websocket$")]
    upgrade: String,
    /// WebSocket handshake
    #[param(rename = "sec-websocket-version", pattern = "^13$")]
    sec_websocket_version: String,
    /// WebSocket handshake: 16 random bytes, base64
    #[param(rename = "sec-websocket-key", pattern = "^[A-Za-z0-9+/]{22}==$")]
    sec_websocket_key: String,
}

/// Query of the terminal URL: the ticket, the kept terminal and the
/// initial window size.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TerminalQuery {
    /// A `pdk_…` ticket from `POST /api/v1/tickets` (kind `terminal`) for
    /// this VM.
    pub ticket: String,
    /// Columns (default 80).
    #[param(minimum = 1, maximum = 1000)]
    pub cols: Option<u16>,
    /// Rows (default 24).
    #[param(minimum = 1, maximum = 1000)]
    pub rows: Option<u16>,
    /// Which kept terminal (default `main`): its shell lives on when the
    /// WebSocket closes, and the next connection with this name attaches
    /// to it with the screen restored. Several names, several shells.
    #[param(pattern = "^[a-z0-9][a-z0-9-]{0,31}$")]
    pub session: Option<String>,
}

/// A control message a terminal client sends as a WebSocket text frame.
#[derive(Deserialize, Serialize, ToSchema, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum TerminalControl {
    /// The window's new size.
    Resize {
        /// Columns (1-1000).
        cols: u16,
        /// Rows (1-1000).
        rows: u16,
    },
    /// End this terminal: its shell is hung up (then `exit` and a 1000
    /// close follow), rather than kept as closing the WebSocket does.
    Close,
}

/// What the server sends as a text frame when the shell ends, just before
/// it closes the WebSocket.
#[derive(Serialize, Deserialize, ToSchema, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TerminalEvent {
    /// The shell exited.
    Exit {
        /// Its exit code, if it exited.
        code: Option<i32>,
        /// The signal that killed it, if one did.
        signal: Option<i32>,
    },
}

/// Ask for a stream ticket.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TicketRequest {
    /// Which stream.
    pub kind: StreamKind,
    /// `desktop`: the session (`ses-…`) whose desktop to open;
    /// `terminal`: the CLI VM (`vm-…`).
    #[schema(min_length = 1, max_length = 80, pattern = "^(ses|vm)-[0-9a-f]{1,64}$")]
    pub resource_id: String,
}

/// A single-use stream ticket.
#[derive(Serialize, ToSchema)]
pub struct TicketView {
    /// The ticket (`pdk_…`): present it once, before it expires.
    pub ticket: String,
    /// Expiry (ms).
    pub expires_at: i64,
    /// Which stream.
    pub kind: StreamKind,
    /// For which resource.
    pub resource_id: String,
}

/// A user account.
#[derive(Serialize, ToSchema)]
pub struct UserView {
    /// `usr-…`.
    pub id: String,
    /// Login name.
    pub name: String,
    /// `user` or `admin`.
    pub role: String,
    /// Created (ms).
    pub created_at: i64,
}

impl From<crate::store::User> for UserView {
    fn from(u: crate::store::User) -> Self {
        UserView {
            id: u.id,
            name: u.name,
            role: u.role,
            created_at: u.created_at,
        }
    }
}

/// Create a user (admin).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserCreate {
    /// Login name: 1-64 of a-z, 0-9, '-', '_', '.', starting with a letter
    /// or digit.
    #[schema(min_length = 1, max_length = 64, pattern = "^[a-z0-9][a-z0-9._-]*$")]
    pub name: String,
    /// Role (default `user`).
    pub role: Option<Role>,
    /// Initial password (at least 15 characters). Without one, hand the
    /// user a login link.
    #[schema(min_length = 15, max_length = 1024)]
    pub password: Option<String>,
}

/// A one-time login link.
#[derive(Serialize, ToSchema)]
pub struct LoginLinkView {
    /// The account it logs in.
    pub user_name: String,
    /// The `pdl_…` token: `POST /api/v1/auth/link` with it, once.
    pub token: String,
    /// Where to open it in a browser (relative to the server's address): the
    /// dashboard, which logs in with it and asks for a new password.
    pub path: String,
    /// Expiry (ms).
    pub expires_at: i64,
}

/// Upstream occupancy and assignments.
#[derive(Serialize, ToSchema)]
pub struct UpstreamsView {
    /// Per provider.
    pub providers: Vec<UpstreamStats>,
    /// Every assignment.
    pub assignments: Vec<Assignment>,
}

/// Pin a user to a port.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PinRequest {
    /// Provider name from the operator's upstream config.
    #[schema(min_length = 1, max_length = 64)]
    pub provider: String,
    /// A port of its range.
    #[schema(minimum = 1, maximum = 65535)]
    #[serde(deserialize_with = "integral::u16")]
    pub port: u16,
}

/// Integers in request bodies as JSON Schema counts them: `1074.0` is the
/// integer 1074 (a client may serialize every number as a float), while
/// `1074.5` and out-of-range values are refused.
mod integral {
    use serde::de::{Deserializer, Error, Unexpected};
    use serde::Deserialize;

    /// The number as an `i64` if it is a whole one that fits (serde's
    /// usual "invalid type"/"invalid value" errors otherwise).
    fn whole<'de, D: Deserializer<'de>>(
        n: serde_json::Number,
        expected: &str,
    ) -> Result<i64, D::Error> {
        if let Some(i) = n.as_i64() {
            return Ok(i);
        }
        if let Some(u) = n.as_u64() {
            return Err(D::Error::invalid_value(Unexpected::Unsigned(u), &expected));
        }
        match n.as_f64() {
            // Inside ±2^63 every whole f64 converts to i64 exactly.
            Some(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => Ok(f as i64),
            Some(f) if f.fract() == 0.0 => {
                Err(D::Error::invalid_value(Unexpected::Float(f), &expected))
            }
            Some(f) => Err(D::Error::invalid_type(Unexpected::Float(f), &expected)),
            None => Err(D::Error::custom(format!("{n}: expected {expected}"))),
        }
    }

    /// A whole number that fits a `u16`.
    pub fn u16<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
        const EXPECTED: &str = "a whole number in 0..=65535";
        let n = whole::<D>(serde_json::Number::deserialize(d)?, EXPECTED)?;
        u16::try_from(n).map_err(|_| D::Error::invalid_value(Unexpected::Signed(n), &EXPECTED))
    }

    /// An optional whole number that fits an `i64` (`null`: none).
    pub fn option_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        Option::<serde_json::Number>::deserialize(d)?
            .map(|n| whole::<D>(n, "a whole number of milliseconds"))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_floats_are_integers_and_fractions_or_overflow_are_not() {
        let pin = |port: &str| {
            serde_json::from_str::<PinRequest>(&format!(r#"{{"provider":"p","port":{port}}}"#))
                .map(|r| r.port)
        };
        assert_eq!(pin("1074").unwrap(), 1074);
        assert_eq!(pin("1074.0").unwrap(), 1074);
        assert_eq!(pin("1e3").unwrap(), 1000);
        for bad in ["1074.5", "65536", "-1", "1e300", "\"80\""] {
            assert!(pin(bad).is_err(), "{bad}");
        }
        let exp = |body: &str| serde_json::from_str::<TokenCreate>(body).map(|t| t.expires_at);
        assert_eq!(exp(r#"{"name":"n","scopes":[]}"#).unwrap(), None);
        assert_eq!(
            exp(r#"{"name":"n","scopes":[],"expires_at":null}"#).unwrap(),
            None
        );
        assert_eq!(
            exp(r#"{"name":"n","scopes":[],"expires_at":1.8e12}"#).unwrap(),
            Some(1_800_000_000_000)
        );
        assert!(exp(r#"{"name":"n","scopes":[],"expires_at":0.5}"#).is_err());
    }
}

/// A VM as an administrator sees it: any user's, with its owner and shape.
#[derive(Serialize, ToSchema)]
pub struct AdminVmView {
    /// The VM as its owner sees it.
    #[serde(flatten)]
    pub vm: VmView,
    /// Owner (`usr-…`).
    pub owner_id: String,
    /// Owner's account name (`None` if the account is gone).
    pub owner_name: Option<String>,
    /// Memory (MiB), while the host has the VM.
    pub memory_mib: Option<u32>,
    /// vCPUs, while the host has the VM.
    pub vcpus: Option<u32>,
}

/// Every user's connect sessions, counted.
#[derive(Serialize, ToSchema)]
pub struct SessionSummary {
    /// Sessions per state (states with none are absent).
    pub by_state: std::collections::BTreeMap<String, i64>,
    /// Failed sessions per failure reason.
    pub failures_by_reason: std::collections::BTreeMap<String, i64>,
}
