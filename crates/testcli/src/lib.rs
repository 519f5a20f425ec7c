//! `polydev-testcli`: a small command-line program that signs in the way
//! AI coding CLIs such as Codex and Gemini CLI do, so that Polydev's tests
//! can exercise a browser login inside a VM without a real vendor account.
//!
//! * `login` runs OpenID Connect discovery on the issuer, listens on a
//!   loopback port, prints (and hands to `$BROWSER` or `xdg-open`) an
//!   authorization URL with PKCE S256, `state` and `nonce`, waits for the
//!   browser's redirect, exchanges the code and stores the tokens in
//!   `~/.testcli/auth.json` (directory 0700, file 0600, atomic replace).
//! * `whoami` calls userinfo with the access token; `refresh` rotates the
//!   tokens with the refresh token grant; `prompt` prints a canned stream of
//!   JSON lines, as a coding CLI answering a prompt would.
//!
//! All HTTP goes over HTTPS through the `HTTPS_PROXY` CONNECT proxy (the
//! VM's egress shim) and trusts only the certificates in `SSL_CERT_FILE` or
//! the system bundle. The counterpart server is `tests/oidc/signin.js`.
//!
//! Exit codes: 0 success, 1 login or other failure, 2 network, TLS or
//! protocol trouble, 3 credential rejected by the server, 4 no usable
//! `auth.json`.

#![deny(missing_docs)]

pub mod authorize;
pub mod commands;
pub mod error;
pub mod http;
pub mod pkce;
pub mod redirect;
pub mod store;

pub use error::Error;

/// The issuer `login` uses when none is given.
pub const DEFAULT_ISSUER: &str = "https://auth.polydev.test";
/// The OAuth client this program is registered as (a public native client).
pub const CLIENT_ID: &str = "polydev-testcli";
/// The scopes `login` asks for; `offline_access` yields a refresh token.
pub const SCOPES: &str = "openid profile offline_access";
