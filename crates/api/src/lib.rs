//! Wire types shared by the host agent, the guest agent and the CLI.
//!
//! Nothing in this crate does I/O beyond encoding and decoding: it is the
//! contract between tiers, so every other crate depends on it and it depends
//! on none of them.

pub mod agent;
pub mod problem;
pub mod pty;
pub mod vm;

pub use problem::Problem;
