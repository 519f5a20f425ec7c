//! The Polydev controller: the system of record.
//!
//! * [`auth`]: accounts, login sessions, API tokens, JWTs, stream tickets.
//! * [`store`]: SQLite (embedded default, WAL) or PostgreSQL through one
//!   migration set; every lifecycle change is one transaction with its event.
//! * [`state`]: the VM and connect-session state machines (transition tables,
//!   timeouts, retry budgets, failure reasons).
//! * [`vault`]: envelope encryption of captured credentials.
//! * [`providers`]: the provider definitions (`providers/*.toml`).
//! * [`driver`]: the loop that advances VM and session records through the host agent.
//! * [`upstream`]: the operator's upstream proxy providers (per-user ports: `store`).
//! * [`pgtemp`]: a throwaway PostgreSQL server (tests and `polydev bench api`).
#![warn(missing_docs)]

pub mod auth;
pub mod driver;
pub mod http;
pub mod metrics;
pub mod pgtemp;
/// Provider definitions: the `polydev-providers` crate.
pub use polydev_providers as providers;
pub mod recovery;
pub mod state;
pub mod store;
pub mod upstream;
pub mod util;
pub mod vault;
