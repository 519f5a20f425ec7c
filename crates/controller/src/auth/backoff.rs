//! Per-account backoff after failed password logins.
//!
//! The per-address rate limit does not protect an account from an attacker
//! who rotates addresses, so failures are also counted per submitted name
//! (in the database, so every API replica sees them): after
//! [`LoginBackoff::free_failures`] failures in a row, each further one
//! closes the name for an exponentially growing delay, capped at
//! [`LoginBackoff::max`]. While closed, no password is checked at all (a
//! right guess would otherwise show), and the answer is 429 with
//! `Retry-After`. A successful login clears the count, and failures older
//! than [`LoginBackoff::forget_after`] are forgotten, so an account is
//! never locked for longer than the cap. Unknown names are counted the
//! same way, so the answers do not tell which names exist.
//!
//! An attempt is counted *before* its password is checked, in one
//! transaction that also checks the name is open: concurrent guesses
//! cannot all slip through while the first ones are being verified.

use std::time::Duration;

use super::{ms, Auth, AuthError};
use crate::store::Dialect;
use crate::util::now_ms;

/// How failed password logins slow down the next ones for that name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginBackoff {
    /// Failures in a row that cost nothing (typos).
    pub free_failures: u32,
    /// The delay after the first failure beyond the free ones; it doubles
    /// with each further failure.
    pub base: Duration,
    /// The longest delay.
    pub max: Duration,
    /// A count whose last failure is this old starts again from zero.
    pub forget_after: Duration,
}

impl Default for LoginBackoff {
    fn default() -> Self {
        LoginBackoff {
            free_failures: 5,
            base: Duration::from_secs(1),
            max: Duration::from_secs(15 * 60),
            forget_after: Duration::from_secs(3600),
        }
    }
}

impl LoginBackoff {
    /// The delay after the `failures`-th failure in a row: none for the
    /// free ones, then `base`, doubling, never more than `max`.
    pub fn delay(&self, failures: u32) -> Duration {
        let Some(beyond) = failures.checked_sub(self.free_failures.saturating_add(1)) else {
            return Duration::ZERO;
        };
        let factor = 1u32.checked_shl(beyond).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

impl Auth {
    /// Count a password attempt for `name` before its password is checked;
    /// [`AuthError::Backoff`] (without counting) while the name is closed.
    pub(crate) async fn take_login_attempt(&self, name: &str) -> Result<(), AuthError> {
        let cfg = self.cfg.login_backoff;
        let now = now_ms();
        let mut tx = self.store.begin_write().await?;
        sqlx::query(
            "INSERT INTO login_backoff (name, failures, until_at, updated_at) VALUES ($1, 0, 0, $2)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        // SQLite holds its write lock already; PostgreSQL locks the row, so
        // concurrent attempts for one name count one after the other.
        let lock = match self.store.dialect() {
            Dialect::Postgres => " FOR UPDATE",
            Dialect::Sqlite => "",
        };
        let (failures, until_at, updated_at): (i64, i64, i64) = sqlx::query_as(&format!(
            "SELECT failures, until_at, updated_at FROM login_backoff WHERE name = $1{lock}"
        ))
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
        if until_at > now {
            let secs = u64::try_from((until_at - now + 999) / 1000).unwrap_or(1);
            tracing::info!(
                retry_after_secs = secs,
                failures,
                "password login refused: the account is backing off after failed logins"
            );
            return Err(AuthError::Backoff {
                retry_after_secs: secs.max(1),
            });
        }
        let failures = if now.saturating_sub(updated_at) > ms(cfg.forget_after) {
            0
        } else {
            u32::try_from(failures).unwrap_or(u32::MAX)
        };
        let counted = failures.saturating_add(1);
        let until = now.saturating_add(ms(cfg.delay(counted)));
        sqlx::query(
            "UPDATE login_backoff SET failures = $1, until_at = $2, updated_at = $3 WHERE name = $4",
        )
        .bind(i64::from(counted))
        .bind(until)
        .bind(now)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A successful login: the name starts again with its free failures.
    pub(crate) async fn clear_login_failures(&self, name: &str) -> Result<(), AuthError> {
        self.store
            .write_one(sqlx::query("DELETE FROM login_backoff WHERE name = $1").bind(name))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_grows_exponentially_and_is_bounded() {
        let b = LoginBackoff {
            free_failures: 3,
            base: Duration::from_secs(2),
            max: Duration::from_secs(60),
            forget_after: Duration::from_secs(600),
        };
        let secs: Vec<u64> = (0..=9).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(secs, [0, 0, 0, 0, 2, 4, 8, 16, 32, 60]);
        // Never beyond the cap, however many failures (no permanent lock,
        // no overflow).
        for n in [10, 31, 32, 33, 1000, u32::MAX] {
            assert_eq!(b.delay(n), Duration::from_secs(60), "{n}");
        }
        let d = LoginBackoff::default();
        assert_eq!(d.delay(5), Duration::ZERO);
        assert_eq!(d.delay(6), Duration::from_secs(1));
        assert_eq!(d.delay(u32::MAX), d.max);
    }
}
