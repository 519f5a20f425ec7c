//! Small helpers shared by the modules: clock and random identifiers.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch: the one timestamp format in the store
/// (a BIGINT sorts and compares the same on SQLite and PostgreSQL).
pub fn now_ms() -> i64 {
    // A clock before 1970 is a broken host; 0 keeps ordering sane rather than panicking.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The operating system's random source failed.
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random number source failed: {0}")]
pub struct RandomError(pub getrandom::Error);

/// Fill `buf` from the OS CSPRNG.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), RandomError> {
    getrandom::fill(buf).map_err(RandomError)
}

/// A new identifier `<prefix>-<16 hex>` (64 random bits: unguessable enough for
/// resource ids, which are additionally owner-checked).
pub fn new_id(prefix: &str) -> Result<String, RandomError> {
    let mut b = [0u8; 8];
    random_bytes(&mut b)?;
    Ok(format!("{prefix}-{}", hex::encode(b)))
}
