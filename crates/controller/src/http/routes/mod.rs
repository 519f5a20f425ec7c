//! The handlers, one module per area; [`super::openapi`] lists them.

pub mod admin;
pub mod auth;
pub mod ops;
pub mod runs;
pub mod sessions;
pub mod streams;
pub mod vms;
