//! The Polydev controller: the system of record.
//!
//! * [`store`]: SQLite (embedded default, WAL) or PostgreSQL through one
//!   migration set; every lifecycle change is one transaction with its event.
//! * [`state`]: the VM and connect-session state machines (transition tables,
//!   timeouts, retry budgets, failure reasons).
//! * [`vault`]: envelope encryption of captured credentials.
//! * [`providers`]: the provider definitions (`providers/*.toml`).
#![warn(missing_docs)]

pub mod providers;
pub mod recovery;
pub mod state;
pub mod store;
pub mod util;
pub mod vault;
