//! The one error type of the crate, and the exit code each error maps to.

use std::io;
use std::path::PathBuf;

/// Exit code: login failed or another local failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: network, TLS or protocol trouble talking to the server.
pub const EXIT_NETWORK: u8 = 2;
/// Exit code: the server rejected the stored credential.
pub const EXIT_REJECTED: u8 = 3;
/// Exit code: `auth.json` is missing or unusable.
pub const EXIT_NO_CREDENTIALS: u8 = 4;

/// Everything that can go wrong; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `$HOME` is unset, so `~/.testcli` cannot be found.
    #[error("HOME is not set; it locates ~/.testcli/auth.json")]
    NoHome,
    /// No credential file yet.
    #[error("not signed in: {path} does not exist; run `polydev-testcli login` first")]
    NotSignedIn {
        /// The missing file.
        path: PathBuf,
    },
    /// The credential file exists but cannot be read.
    #[error("cannot read {path}: {source}")]
    ReadAuth {
        /// The unreadable file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The credential file is not what `login` writes.
    #[error("{path} is not a valid credential file ({source}); run `polydev-testcli login` again")]
    InvalidAuth {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// Writing the credential file (or its directory) failed.
    #[error("cannot write {path}: {source}")]
    WriteAuth {
        /// The file or directory being written.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// No readable CA bundle.
    #[error(
        "cannot read the CA certificates in {path} ({source}); set SSL_CERT_FILE to a PEM bundle"
    )]
    CaBundle {
        /// `$SSL_CERT_FILE` or the system bundle.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The CA bundle holds nothing usable.
    #[error("{path} holds no usable PEM certificates{detail}; set SSL_CERT_FILE to a PEM bundle")]
    CaParse {
        /// The bundle.
        path: PathBuf,
        /// The parser's complaint, with a leading ": ", or empty.
        detail: String,
    },
    /// `HTTPS_PROXY` is not a usable proxy URL.
    #[error("HTTPS_PROXY={value:?} is not a usable proxy URL: {detail}")]
    Proxy {
        /// The variable's value.
        value: String,
        /// Why.
        detail: String,
    },
    /// The HTTP client could not be built.
    #[error("cannot set up HTTPS: {0}")]
    Client(String),
    /// An issuer or endpoint that is not HTTPS.
    #[error("{what} must be an https URL, not {url:?}")]
    NotHttps {
        /// Which URL.
        what: &'static str,
        /// The URL.
        url: String,
    },
    /// A malformed URL.
    #[error("invalid URL {url:?}: {detail}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        detail: String,
    },
    /// The request did not get an answer (DNS, connect, proxy, TLS, timeout).
    #[error("request to {url} failed: {detail}; check HTTPS_PROXY, SSL_CERT_FILE and the network")]
    Http {
        /// The URL requested.
        url: String,
        /// The error chain.
        detail: String,
    },
    /// The answer exceeded the size limit.
    #[error("{url} answered more than {limit} bytes; refusing to read further")]
    TooLarge {
        /// The URL requested.
        url: String,
        /// The limit.
        limit: usize,
    },
    /// An HTTP status the protocol step does not expect.
    #[error("{url} answered HTTP {status}: {body}")]
    Status {
        /// The URL requested.
        url: String,
        /// The status code.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// The answer is not the JSON the protocol step expects.
    #[error("{url} answered unexpected JSON: {detail}")]
    BadJson {
        /// The URL requested.
        url: String,
        /// Why.
        detail: String,
    },
    /// Discovery names a different issuer (a mix-up or a wrong URL).
    #[error("{url} names issuer {found:?}, expected {expected:?}; check --issuer")]
    IssuerMismatch {
        /// The discovery URL or redirect.
        url: String,
        /// The issuer named.
        found: String,
        /// The issuer expected.
        expected: String,
    },
    /// The loopback listener for the redirect could not be bound.
    #[error("cannot listen on 127.0.0.1:{port} for the browser's redirect ({source}); pick another --port")]
    Bind {
        /// The port asked for.
        port: u16,
        /// Why.
        source: io::Error,
    },
    /// The browser never came back.
    #[error("no redirect arrived within {0} s; run `polydev-testcli login` again")]
    LoginTimeout(u64),
    /// The redirect's `state` is not this login's.
    #[error("the redirect's state does not match this login (stale or forged); run `polydev-testcli login` again")]
    StateMismatch,
    /// The authorization server ended the flow with an error.
    #[error("login failed: {error}: {description}")]
    Authorization {
        /// The OAuth error code, e.g. `access_denied`.
        error: String,
        /// The server's `error_description`.
        description: String,
    },
    /// A redirect with neither `code` nor `error`.
    #[error("login failed: the redirect carries neither a code nor an error")]
    NoCode,
    /// The ID token does not belong to this login.
    #[error("login failed: the ID token {0}")]
    IdToken(String),
    /// The token endpoint left out a token this program needs.
    #[error("the token endpoint issued no {0}; is offline_access allowed for this client?")]
    MissingToken(&'static str),
    /// The server refused the stored credential.
    #[error(
        "credential rejected by {url}: {error}: {description}; run `polydev-testcli login` again"
    )]
    Rejected {
        /// The endpoint that refused.
        url: String,
        /// The OAuth error code, e.g. `invalid_grant`.
        error: String,
        /// The server's `error_description`.
        description: String,
    },
    /// The server answered with an OAuth error other than a rejection.
    #[error("{url} refused the request: {error}: {description}")]
    OAuth {
        /// The endpoint.
        url: String,
        /// The OAuth error code.
        error: String,
        /// The server's `error_description`.
        description: String,
    },
    /// The operating system's random number generator failed.
    #[error("cannot read random bytes: {0}")]
    Random(String),
    /// Writing to stdout failed (e.g. a closed pipe).
    #[error("cannot write to stdout: {0}")]
    Stdout(io::Error),
}

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::NoHome
            | Error::NotSignedIn { .. }
            | Error::ReadAuth { .. }
            | Error::InvalidAuth { .. } => EXIT_NO_CREDENTIALS,
            Error::Rejected { .. } => EXIT_REJECTED,
            Error::CaBundle { .. }
            | Error::CaParse { .. }
            | Error::Proxy { .. }
            | Error::Client(_)
            | Error::NotHttps { .. }
            | Error::Url { .. }
            | Error::Http { .. }
            | Error::TooLarge { .. }
            | Error::Status { .. }
            | Error::BadJson { .. }
            | Error::IssuerMismatch { .. } => EXIT_NETWORK,
            Error::WriteAuth { .. }
            | Error::Bind { .. }
            | Error::LoginTimeout(_)
            | Error::StateMismatch
            | Error::Authorization { .. }
            | Error::NoCode
            | Error::IdToken(_)
            | Error::MissingToken(_)
            | Error::OAuth { .. }
            | Error::Random(_)
            | Error::Stdout(_) => EXIT_FAILURE,
        }
    }
}

/// Renders an error with its whole `source()` chain, since reqwest's own
/// message ("error sending request") hides the useful part (TLS, proxy).
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        out.push_str(": ");
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}
