//! Accounts and authorization.
//!
//! Who is calling, and what may they do:
//!
//! * users with argon2id passwords ([`passwords`]) and an admin role, with
//!   a per-account backoff after failed password logins ([`backoff`]);
//! * dashboard login sessions carried by the [`SESSION_COOKIE`] cookie
//!   ([`sessions`]): random 256-bit values, stored only as SHA-256, with an
//!   absolute and an idle expiry;
//! * bearer API tokens `pdt_<id>_<secret>` ([`tokens`]): hashed at rest,
//!   scoped, expiring, revocable;
//! * optionally, JWTs issued by an existing identity provider, verified
//!   against its JWKS ([`jwt`]), mapped to (auto-provisioned) users;
//! * short-lived single-use tickets for desktop/terminal WebSocket streams
//!   ([`tickets`]);
//! * the first-start admin account and its one-time login link
//!   ([`bootstrap`]).
//!
//! Secrets never appear in logs or `Debug` output: the types that carry one
//! print `<redacted>` and wipe it on drop.

pub mod backoff;
pub mod bootstrap;
pub mod jwt;
pub mod passwords;
mod secret;
pub mod sessions;
pub mod tickets;
pub mod tokens;
mod users;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::store::{Store, StoreError};
use crate::util::RandomError;

pub use crate::store::User;
pub use backoff::LoginBackoff;
pub use jwt::{JwtConfig, JwtVerifier};

/// Name of the dashboard login-session cookie.
pub const SESSION_COOKIE: &str = "polydev_session";

/// Errors of authentication and account management.
///
/// [`AuthError::Unauthenticated`] deliberately says nothing about *why*
/// (unknown user, wrong password, expired or revoked token look the same to
/// the caller); the reason is logged at debug level without the secret.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No valid credentials (HTTP 401).
    #[error(
        "not authenticated: log in again, or send a valid `Authorization: Bearer` API token or JWT"
    )]
    Unauthenticated,
    /// Authenticated, but the credentials lack a scope or role (HTTP 403).
    #[error("forbidden: this needs the `{scope}` scope; create a token with it, or ask an admin")]
    Forbidden {
        /// The missing scope (or `admin` for the role).
        scope: String,
    },
    /// No such record for this caller (HTTP 404). Another user's record is
    /// reported the same way, so ids of others cannot be probed.
    #[error("not found")]
    NotFound,
    /// The request conflicts with existing data, e.g. a taken user name (HTTP 409).
    #[error("conflict: {0}")]
    Conflict(String),
    /// Invalid input, with what to change (HTTP 422).
    #[error("invalid: {0}")]
    Invalid(String),
    /// Too many failed password logins for this name lately: no password
    /// is checked for it until the backoff ends (HTTP 429, `Retry-After`).
    #[error("too many failed logins for this account: wait {retry_after_secs} s before trying again (other clients' attempts count too)")]
    Backoff {
        /// Seconds until a password is checked again.
        retry_after_secs: u64,
    },
    /// The configured JWKS could not be fetched or used (HTTP 503).
    #[error("JWT keys unavailable: {0}")]
    Jwks(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A blocking task (password hashing) failed to complete.
    #[error("internal error: {0}")]
    Internal(String),
}

impl AuthError {
    /// The HTTP status code this error maps to.
    pub fn http_status(&self) -> u16 {
        match self {
            AuthError::Unauthenticated => 401,
            AuthError::Forbidden { .. } => 403,
            AuthError::NotFound => 404,
            AuthError::Conflict(_) => 409,
            AuthError::Invalid(_) => 422,
            AuthError::Backoff { .. } => 429,
            AuthError::Jwks(_) => 503,
            AuthError::Store(_) | AuthError::Internal(_) => 500,
        }
    }
}

impl From<sqlx::Error> for AuthError {
    fn from(e: sqlx::Error) -> Self {
        AuthError::Store(StoreError::Db(e))
    }
}

impl From<RandomError> for AuthError {
    fn from(e: RandomError) -> Self {
        AuthError::Store(StoreError::Random(e))
    }
}

/// A user's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An ordinary user: owns their sessions, VMs, credentials and streams.
    User,
    /// May manage users and see every resource.
    Admin,
}

impl Role {
    /// Database and API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }

    /// Parse `user` | `admin`.
    pub fn parse(s: &str) -> Result<Self, AuthError> {
        match s {
            "user" => Ok(Role::User),
            "admin" => Ok(Role::Admin),
            other => Err(AuthError::Invalid(format!(
                "unknown role {other:?}: use \"user\" or \"admin\""
            ))),
        }
    }

    /// Every scope an account of this role may hold: all but the
    /// admin-only ones (`admin`, `metrics:read`) for a user, everything for
    /// an admin. Cookie sessions get exactly these.
    pub fn scopes(self) -> Vec<Scope> {
        Scope::ALL
            .iter()
            .copied()
            .filter(|s| self == Role::Admin || !s.admin_only())
            .collect()
    }
}

/// What a credential may do. API tokens carry a chosen subset.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
pub enum Scope {
    /// Read own connect sessions.
    #[serde(rename = "sessions:read")]
    SessionsRead,
    /// Create, cancel own connect sessions.
    #[serde(rename = "sessions:write")]
    SessionsWrite,
    /// Read own VMs.
    #[serde(rename = "vms:read")]
    VmsRead,
    /// Create, stop, destroy own VMs.
    #[serde(rename = "vms:write")]
    VmsWrite,
    /// See own credential metadata.
    #[serde(rename = "credentials:read")]
    CredentialsRead,
    /// Replace, delete own credentials.
    #[serde(rename = "credentials:write")]
    CredentialsWrite,
    /// Obtain desktop/terminal stream tickets.
    #[serde(rename = "streams:connect")]
    StreamsConnect,
    /// Administration (only for admin accounts).
    #[serde(rename = "admin")]
    Admin,
    /// Read the Prometheus `/metrics` (only for admin accounts: the counts
    /// span every user). A token with just this scope is what a scraper
    /// should hold.
    #[serde(rename = "metrics:read")]
    MetricsRead,
}

impl Scope {
    /// Every scope, in a stable order.
    pub const ALL: [Scope; 9] = [
        Scope::SessionsRead,
        Scope::SessionsWrite,
        Scope::VmsRead,
        Scope::VmsWrite,
        Scope::CredentialsRead,
        Scope::CredentialsWrite,
        Scope::StreamsConnect,
        Scope::Admin,
        Scope::MetricsRead,
    ];

    /// Whether only admin accounts may hold this scope.
    pub fn admin_only(self) -> bool {
        matches!(self, Scope::Admin | Scope::MetricsRead)
    }

    /// API and database spelling (`sessions:read`, …, `admin`).
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::SessionsRead => "sessions:read",
            Scope::SessionsWrite => "sessions:write",
            Scope::VmsRead => "vms:read",
            Scope::VmsWrite => "vms:write",
            Scope::CredentialsRead => "credentials:read",
            Scope::CredentialsWrite => "credentials:write",
            Scope::StreamsConnect => "streams:connect",
            Scope::Admin => "admin",
            Scope::MetricsRead => "metrics:read",
        }
    }

    /// Parse one scope.
    pub fn parse(s: &str) -> Result<Self, AuthError> {
        Scope::ALL
            .iter()
            .copied()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
                AuthError::Invalid(format!(
                    "unknown scope {s:?}: use one of {}",
                    known.join(", ")
                ))
            })
    }

    /// Space-separated form (OAuth style), as stored.
    pub(crate) fn join(scopes: &[Scope]) -> String {
        scopes
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Parse the stored form; unknown words are a corrupt row.
    pub(crate) fn split(s: &str) -> Result<Vec<Scope>, AuthError> {
        s.split_ascii_whitespace()
            .map(|w| {
                Scope::parse(w).map_err(|_| {
                    AuthError::Store(StoreError::Corrupt {
                        table: "api_tokens",
                        detail: format!("unknown scope {w:?}"),
                    })
                })
            })
            .collect()
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a [`Principal`] authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    /// The dashboard session cookie.
    Cookie,
    /// A bearer API token (its id, never its secret).
    ApiToken {
        /// `tok-…`.
        token_id: String,
    },
    /// An externally issued JWT.
    Jwt {
        /// Its `iss`.
        issuer: String,
        /// Its `sub`.
        subject: String,
    },
    /// A one-time login link.
    LoginLink,
    /// A stream ticket (only good for the stream it was issued for).
    Ticket {
        /// `desktop`, `terminal`, ….
        kind: String,
        /// The session or VM it is bound to.
        resource_id: String,
    },
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// `usr-…`.
    pub user_id: String,
    /// Login name.
    pub name: String,
    /// Account role.
    pub role: Role,
    /// What this credential may do (never more than the role allows).
    pub scopes: Vec<Scope>,
    /// How it authenticated.
    pub via: AuthMethod,
}

impl Principal {
    /// An admin acting with admin rights: the role *and* the `admin` scope
    /// (an admin's narrowly scoped token is not an admin credential).
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin && self.scopes.contains(&Scope::Admin)
    }

    /// Whether this credential carries `s`.
    pub fn allows(&self, s: Scope) -> bool {
        self.scopes.contains(&s) && (!s.admin_only() || self.role == Role::Admin)
    }

    /// `Ok` if [`Principal::allows`] `s`, else [`AuthError::Forbidden`].
    pub fn require(&self, s: Scope) -> Result<(), AuthError> {
        if self.allows(s) {
            Ok(())
        } else {
            Err(AuthError::Forbidden {
                scope: s.as_str().to_string(),
            })
        }
    }

    pub(crate) fn from_row(
        user_id: String,
        name: String,
        role: &str,
        scopes: Option<Vec<Scope>>,
        via: AuthMethod,
    ) -> Result<Self, AuthError> {
        let role = Role::parse(role).map_err(|_| {
            AuthError::Store(StoreError::Corrupt {
                table: "users",
                detail: format!("unknown role {role:?}"),
            })
        })?;
        let allowed = role.scopes();
        // A credential never exceeds the account's current role (an admin
        // demoted to user keeps no admin power through old tokens).
        let scopes = match scopes {
            Some(s) => s.into_iter().filter(|s| allowed.contains(s)).collect(),
            None => allowed,
        };
        Ok(Principal {
            user_id,
            name,
            role,
            scopes,
            via,
        })
    }
}

/// `Debug` that prints `<redacted>` for the secret field, and a `Drop`
/// that wipes it: the two things every secret-carrying type here needs.
macro_rules! redacted {
    ($ty:ident, $secret:ident, [$($field:ident),*]) => {
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($ty))
                    $(.field(stringify!($field), &self.$field))*
                    .field(stringify!($secret), &"<redacted>")
                    .finish()
            }
        }

        impl Drop for $ty {
            fn drop(&mut self) {
                self.$secret.zeroize();
            }
        }
    };
}

/// A new dashboard login session. `cookie_value` is the secret to set as the
/// [`SESSION_COOKIE`] cookie (HttpOnly, Secure, SameSite=Lax); borrow it, it
/// is wiped when this value is dropped.
#[derive(Clone)]
pub struct LoginSession {
    /// The cookie value (secret).
    pub cookie_value: String,
    /// Absolute expiry (ms); idle expiry may end it earlier.
    pub expires_at: i64,
}

impl LoginSession {
    /// The `Set-Cookie` value that installs this session: HttpOnly (no
    /// script access), SameSite=Lax (not sent on cross-site POSTs), Path=/,
    /// Max-Age until the absolute expiry; `Secure` when served over HTTPS.
    pub fn set_cookie(&self, secure: bool) -> String {
        let max_age = (self.expires_at - crate::util::now_ms()).max(0) / 1000;
        format!(
            "{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{}",
            self.cookie_value,
            if secure { "; Secure" } else { "" }
        )
    }
}

/// The `Set-Cookie` value that removes the session cookie (after logout).
pub fn clear_session_cookie(secure: bool) -> String {
    format!(
        "{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

redacted!(LoginSession, cookie_value, [expires_at]);

/// An API token's metadata (never its secret); also its API form.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[schema(as = TokenView)]
pub struct ApiTokenInfo {
    /// `tok-…`.
    pub id: String,
    /// The owner's label for it.
    pub name: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// Creation time (ms).
    pub created_at: i64,
    /// Expiry (ms), if any.
    pub expires_at: Option<i64>,
    /// When it was revoked (ms).
    pub revoked_at: Option<i64>,
    /// Last successful use (ms, minute resolution).
    pub last_used_at: Option<i64>,
}

/// A stream ticket: pass `value` once, within a short time, to open the
/// stream it was issued for. Wiped on drop.
#[derive(Clone)]
pub struct Ticket {
    /// The ticket (secret).
    pub value: String,
    /// Expiry (ms).
    pub expires_at: i64,
}

redacted!(Ticket, value, [expires_at]);

/// A one-time login link token (first-start admin). Wiped on drop.
#[derive(Clone)]
pub struct LoginLink {
    /// The account it logs in.
    pub user_name: String,
    /// The link token (secret): redeem with [`Auth::redeem_login_link`].
    pub token: String,
    /// Expiry (ms).
    pub expires_at: i64,
}

redacted!(LoginLink, token, [user_name, expires_at]);

/// Settings of [`Auth`].
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// Verify external JWTs against this JWKS (off when `None`).
    pub jwt: Option<JwtConfig>,
    /// Absolute lifetime of a login session.
    pub session_ttl: Duration,
    /// A login session unused this long ends.
    pub session_idle: Duration,
    /// Lifetime of a stream ticket.
    pub ticket_ttl: Duration,
    /// Lifetime of a one-time login link.
    pub login_link_ttl: Duration,
    /// Clock skew tolerated on JWT `exp`/`nbf`.
    pub jwt_leeway: Duration,
    /// An unknown JWT `kid` refetches the JWKS at most this often (so junk
    /// tokens cannot make us hammer the identity provider).
    pub jwks_min_refetch: Duration,
    /// Cached JWKS older than this is refetched before use (picks up removed
    /// keys); if that fetch fails the cached keys keep working.
    pub jwks_max_age: Duration,
    /// How failed password logins slow down the next ones per account.
    pub login_backoff: LoginBackoff,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt: None,
            session_ttl: Duration::from_secs(12 * 3600),
            session_idle: Duration::from_secs(2 * 3600),
            ticket_ttl: Duration::from_secs(60),
            login_link_ttl: Duration::from_secs(24 * 3600),
            jwt_leeway: Duration::from_secs(30),
            jwks_min_refetch: Duration::from_secs(30),
            jwks_max_age: Duration::from_secs(15 * 60),
            login_backoff: LoginBackoff::default(),
        }
    }
}

/// The authentication service: cheap to clone, share it across handlers.
#[derive(Clone)]
pub struct Auth {
    store: Store,
    cfg: Arc<AuthConfig>,
    jwt: Option<Arc<JwtVerifier>>,
    hasher: passwords::Hasher,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("cfg", &self.cfg)
            .field("jwt", &self.jwt.is_some())
            .finish_non_exhaustive()
    }
}

pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Auth {
    /// Build the service; validates the JWT settings (no network access yet:
    /// the JWKS is fetched on the first JWT).
    pub fn new(store: Store, cfg: AuthConfig) -> Result<Self, AuthError> {
        for (what, d) in [
            ("session_ttl", cfg.session_ttl),
            ("session_idle", cfg.session_idle),
            ("ticket_ttl", cfg.ticket_ttl),
            ("login_link_ttl", cfg.login_link_ttl),
        ] {
            if d.is_zero() {
                return Err(AuthError::Invalid(format!("{what} must be positive")));
            }
        }
        let jwt = match &cfg.jwt {
            Some(j) => Some(Arc::new(JwtVerifier::new(
                j.clone(),
                cfg.jwt_leeway,
                cfg.jwks_min_refetch,
                cfg.jwks_max_age,
            )?)),
            None => None,
        };
        Ok(Auth {
            store,
            cfg: Arc::new(cfg),
            jwt,
            hasher: passwords::Hasher::new(),
        })
    }

    /// The store this service works on.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The settings.
    pub fn config(&self) -> &AuthConfig {
        &self.cfg
    }

    /// The JWT verifier, when JWTs are configured.
    pub fn jwt_verifier(&self) -> Option<&JwtVerifier> {
        self.jwt.as_deref()
    }

    /// Who is calling: `Authorization: Bearer <API token | JWT>`, else the
    /// [`SESSION_COOKIE`] cookie. A present `Authorization` header must be
    /// valid by itself (no fallback to the cookie), so a bad token is never
    /// masked by a browser's cookie.
    pub async fn authenticate(&self, headers: &http::HeaderMap) -> Result<Principal, AuthError> {
        let mut auths = headers.get_all(http::header::AUTHORIZATION).iter();
        if let Some(v) = auths.next() {
            if auths.next().is_some() {
                tracing::debug!("rejected: several Authorization headers");
                return Err(AuthError::Unauthenticated);
            }
            let v = v.to_str().map_err(|_| AuthError::Unauthenticated)?;
            let (scheme, cred) = v.split_once(' ').ok_or(AuthError::Unauthenticated)?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                tracing::debug!(scheme, "rejected: Authorization scheme is not Bearer");
                return Err(AuthError::Unauthenticated);
            }
            let cred = cred.trim();
            if cred.starts_with(tokens::PREFIX) {
                return self.authenticate_token(cred).await;
            }
            return match &self.jwt {
                Some(v) if cred.split('.').count() == 3 => {
                    let verified = v.verify(cred).await?;
                    self.jwt_principal(verified).await
                }
                _ => {
                    tracing::debug!(
                        "rejected: bearer credential is neither an API token nor an accepted JWT"
                    );
                    Err(AuthError::Unauthenticated)
                }
            };
        }
        match session_cookie(headers) {
            Some(c) => self.authenticate_cookie(c).await,
            None => Err(AuthError::Unauthenticated),
        }
    }

    /// Delete expired login sessions, stream tickets, login links and
    /// login backoff records that ended long ago; returns how many rows
    /// went. The HTTP server runs it periodically (the checks do not
    /// depend on it).
    pub async fn purge_expired(&self) -> Result<u64, AuthError> {
        let now = crate::util::now_ms();
        let idle = ms(self.cfg.session_idle);
        let mut n = self
            .store
            .write_one(
                sqlx::query(
                    "DELETE FROM login_sessions WHERE expires_at <= $1 OR last_seen_at <= $2",
                )
                .bind(now)
                .bind(now.saturating_sub(idle)),
            )
            .await?
            .rows_affected();
        for table in ["stream_tickets", "login_links"] {
            n += self
                .store
                .write_one(
                    sqlx::query(&format!(
                        "DELETE FROM {table} WHERE expires_at <= $1 OR used_at IS NOT NULL"
                    ))
                    .bind(now),
                )
                .await?
                .rows_affected();
        }
        // A record whose last failure is forgotten counts nothing any more.
        let forget = ms(self.cfg.login_backoff.forget_after);
        n += self
            .store
            .write_one(
                sqlx::query("DELETE FROM login_backoff WHERE until_at <= $1 AND updated_at <= $2")
                    .bind(now)
                    .bind(now.saturating_sub(forget)),
            )
            .await?
            .rows_affected();
        Ok(n)
    }
}

/// The value of the [`SESSION_COOKIE`] cookie among all `Cookie` headers
/// (what a logout handler passes to [`Auth::logout`]).
pub fn session_cookie(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.trim_matches('"'))
}

/// Append an audit event (no state change) inside the caller's
/// transaction: [`Store::append_event`], so both write the same row format.
pub(crate) async fn event(
    conn: &mut sqlx::AnyConnection,
    at: i64,
    subject_kind: &str,
    subject_id: &str,
    user_id: Option<&str>,
    kind: &str,
    detail: serde_json::Value,
) -> Result<(), StoreError> {
    Store::append_event(
        conn,
        at,
        subject_kind,
        subject_id,
        user_id,
        kind,
        None,
        detail,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip() {
        for s in Scope::ALL {
            assert_eq!(Scope::parse(s.as_str()).unwrap(), s);
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
        assert_eq!(
            Scope::split(&Scope::join(&Scope::ALL)).unwrap(),
            Scope::ALL.to_vec()
        );
        let e = Scope::parse("vms:destroy").unwrap_err().to_string();
        assert!(e.contains("vms:write"), "{e}");
    }

    #[test]
    fn roles_and_admin() {
        assert_eq!(Role::parse("admin").unwrap(), Role::Admin);
        assert!(Role::parse("root").is_err());
        assert!(!Role::User.scopes().contains(&Scope::Admin));
        assert!(!Role::User.scopes().contains(&Scope::MetricsRead));
        assert_eq!(Role::Admin.scopes().len(), Scope::ALL.len());
        let p = Principal::from_row(
            "usr-1".into(),
            "a".into(),
            "user",
            Some(vec![Scope::Admin, Scope::VmsRead, Scope::MetricsRead]),
            AuthMethod::Cookie,
        )
        .unwrap();
        // A user's stored admin scope is dropped.
        assert_eq!(p.scopes, vec![Scope::VmsRead]);
        assert!(!p.is_admin());
        assert!(matches!(
            p.require(Scope::VmsWrite),
            Err(AuthError::Forbidden { .. })
        ));
    }

    #[test]
    fn cookie_parsing() {
        let mut h = http::HeaderMap::new();
        h.append(
            http::header::COOKIE,
            "a=b; polydev_session=xyz".parse().unwrap(),
        );
        assert_eq!(session_cookie(&h), Some("xyz"));
        let mut h = http::HeaderMap::new();
        h.append(http::header::COOKIE, "x=1".parse().unwrap());
        h.append(
            http::header::COOKIE,
            "polydev_session=\"q\"".parse().unwrap(),
        );
        assert_eq!(session_cookie(&h), Some("q"));
    }

    #[test]
    fn set_cookie_attributes() {
        let s = LoginSession {
            cookie_value: "v".into(),
            expires_at: crate::util::now_ms() + 3_600_500,
        };
        let c = s.set_cookie(true);
        assert!(
            c.starts_with("polydev_session=v; Path=/; HttpOnly; SameSite=Lax; Max-Age=3600"),
            "{c}"
        );
        assert!(c.ends_with("; Secure"));
        assert!(!s.set_cookie(false).contains("Secure"));
        assert!(clear_session_cookie(false).contains("Max-Age=0"));
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let s = LoginSession {
            cookie_value: "SECRETVALUE".into(),
            expires_at: 1,
        };
        let t = Ticket {
            value: "SECRETVALUE".into(),
            expires_at: 1,
        };
        let l = LoginLink {
            user_name: "admin".into(),
            token: "SECRETVALUE".into(),
            expires_at: 1,
        };
        for d in [format!("{s:?}"), format!("{t:?}"), format!("{l:?}")] {
            assert!(!d.contains("SECRETVALUE"), "{d}");
            assert!(d.contains("redacted"), "{d}");
        }
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug_output() {
        let dbg = [
            format!(
                "{:?}",
                LoginSession {
                    cookie_value: "cookie-s3cret".into(),
                    expires_at: 7
                }
            ),
            format!(
                "{:?}",
                Ticket {
                    value: "pdk_s3cret".into(),
                    expires_at: 7
                }
            ),
            format!(
                "{:?}",
                LoginLink {
                    user_name: "admin".into(),
                    token: "pdl_s3cret".into(),
                    expires_at: 7
                }
            ),
        ];
        for d in &dbg {
            assert!(
                d.contains("<redacted>") && d.contains("expires_at: 7"),
                "{d}"
            );
            assert!(!d.contains("s3cret"), "{d}");
        }
        assert!(dbg[2].contains("\"admin\""));
    }
}
