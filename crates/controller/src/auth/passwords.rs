//! Passwords: argon2id hashes (PHC strings) and the input rules for names
//! and passwords.
//!
//! Parameters follow the OWASP Password Storage Cheat Sheet's first argon2id
//! option (m = 19 MiB, t = 2, p = 1). Hashing takes tens of milliseconds of
//! CPU, so it runs on the blocking pool, and a semaphore bounds how many run
//! at once (each holds 19 MiB). A login for an unknown user (or one without a
//! password) verifies against a dummy hash, so the time taken does not tell
//! which names exist.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::{OnceCell, Semaphore};
use zeroize::Zeroizing;

use super::AuthError;
use crate::util::random_bytes;

/// Shortest accepted password (NIST SP 800-63B rev. 4: 15 for single-factor).
pub const MIN_PASSWORD_CHARS: usize = 15;
/// Longest accepted password (bounds the work an attacker can ask for).
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Longest user name.
pub const MAX_NAME_CHARS: usize = 64;

/// OWASP argon2id memory cost (KiB).
const M_COST: u32 = 19 * 1024;
/// OWASP argon2id iterations.
const T_COST: u32 = 2;
/// OWASP argon2id parallelism.
const P_COST: u32 = 1;

fn argon2() -> Result<Argon2<'static>, AuthError> {
    let params = Params::new(M_COST, T_COST, P_COST, None)
        .map_err(|e| AuthError::Internal(format!("argon2 parameters: {e}")))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Check a user name: 1-64 of `a-z 0-9 . _ -`, starting with a letter or
/// digit. Lowercase only, so names cannot differ by case or look alike.
pub fn validate_name(name: &str) -> Result<(), AuthError> {
    let ok_first = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let ok_rest = name.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_' || b == b'-'
    });
    if !ok_first || !ok_rest || name.len() > MAX_NAME_CHARS {
        return Err(AuthError::Invalid(format!(
            "user name {:?} is not allowed: use 1-{MAX_NAME_CHARS} characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit",
            name.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

/// Check a new password's length (characters, not bytes, at the low end).
pub fn validate_password(password: &str) -> Result<(), AuthError> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(AuthError::Invalid(format!(
            "password is too short ({chars} characters): use at least {MIN_PASSWORD_CHARS}; a passphrase of several words is easiest"
        )));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(AuthError::Invalid(format!(
            "password is too long ({} bytes): use at most {MAX_PASSWORD_BYTES}",
            password.len()
        )));
    }
    Ok(())
}

/// Whether a stored hash was made with other than the current algorithm or
/// parameters (then a successful login re-hashes the password).
pub(crate) fn needs_rehash(phc: &str) -> bool {
    let Ok(h) = PasswordHash::new(phc) else {
        return false;
    };
    let current = h.algorithm == argon2::ARGON2ID_IDENT
        && h.version == Some(Version::V0x13.into())
        && Params::try_from(&h)
            .is_ok_and(|p| p.m_cost() == M_COST && p.t_cost() == T_COST && p.p_cost() == P_COST);
    !current
}

/// Runs argon2id off the async threads, a bounded number at a time.
#[derive(Clone)]
pub(crate) struct Hasher {
    permits: Arc<Semaphore>,
    dummy: Arc<OnceCell<String>>,
    /// argon2 verifications done (tests check logins do constant work).
    verifications: Arc<AtomicU64>,
}

impl Hasher {
    pub(crate) fn new() -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let hasher = Hasher {
            permits: Arc::new(Semaphore::new(cpus.max(2))),
            dummy: Arc::new(OnceCell::new()),
            verifications: Arc::new(AtomicU64::new(0)),
        };
        // Make the dummy hash now, so that not even the first login for an
        // unknown name takes longer than one for a known name.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let h = hasher.clone();
            rt.spawn(async move {
                if let Err(e) = h.dummy().await {
                    tracing::warn!("preparing the dummy password hash: {e}");
                }
            });
        }
        hasher
    }

    /// How many argon2 verifications ran.
    #[cfg(test)]
    pub(crate) fn verifications(&self) -> u64 {
        self.verifications.load(Ordering::Relaxed)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, AuthError> + Send + 'static,
    ) -> Result<T, AuthError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|e| AuthError::Internal(format!("hash pool closed: {e}")))?;
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| AuthError::Internal(format!("password hashing task failed: {e}")))?
    }

    /// The PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`) of `password`.
    pub(crate) async fn hash(&self, password: &str) -> Result<String, AuthError> {
        let password = Zeroizing::new(password.to_string());
        let mut salt = [0u8; 16];
        random_bytes(&mut salt)?;
        self.blocking(move || {
            let salt = SaltString::encode_b64(&salt)
                .map_err(|e| AuthError::Internal(format!("salt: {e}")))?;
            let h = argon2()?
                .hash_password(password.as_bytes(), &salt)
                .map_err(|e| AuthError::Internal(format!("argon2: {e}")))?;
            Ok(h.to_string())
        })
        .await
    }

    /// Whether `password` matches `phc`; with `None` (unknown user, or no
    /// password set) it does the same work against a dummy hash and says no.
    pub(crate) async fn verify(
        &self,
        password: &str,
        phc: Option<String>,
    ) -> Result<bool, AuthError> {
        let real = phc.is_some();
        let phc = match phc {
            Some(p) => p,
            None => self.dummy().await?,
        };
        let password = Zeroizing::new(password.to_string());
        self.verifications.fetch_add(1, Ordering::Relaxed);
        let ok = self
            .blocking(move || {
                let parsed = match PasswordHash::new(&phc) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!("stored password hash is unreadable ({e}); the login fails");
                        return Ok(false);
                    }
                };
                // Verification takes the parameters from the hash itself, so
                // hashes made with older parameters keep working.
                Ok(argon2()?
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok())
            })
            .await?;
        Ok(ok && real)
    }

    /// A hash of a random throwaway password with the current parameters.
    async fn dummy(&self) -> Result<String, AuthError> {
        self.dummy
            .get_or_try_init(|| async {
                let mut b = [0u8; 24];
                random_bytes(&mut b)?;
                self.hash(&hex::encode(b)).await
            })
            .await
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["alice", "a", "bob.smith", "x_1-2", "0day"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "Alice", "-a", ".a", "a b", "a/b", "ä", &"a".repeat(65)] {
            let e = validate_name(bad).unwrap_err().to_string();
            assert!(e.contains("a-z"), "{e}");
        }
    }

    #[test]
    fn password_lengths() {
        assert!(validate_password("short")
            .unwrap_err()
            .to_string()
            .contains("at least 15"));
        validate_password("correct horse battery").unwrap();
        // Counted in characters: 15 two-byte characters pass.
        validate_password(&"ä".repeat(15)).unwrap();
        assert!(validate_password(&"a".repeat(1025))
            .unwrap_err()
            .to_string()
            .contains("at most"));
    }

    #[tokio::test]
    async fn hash_and_verify() {
        let h = Hasher::new();
        let phc = h.hash("correct horse battery").await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(!phc.contains("correct horse"));
        assert!(h
            .verify("correct horse battery", Some(phc.clone()))
            .await
            .unwrap());
        assert!(!h
            .verify("correct horse batterz", Some(phc.clone()))
            .await
            .unwrap());
        // Unknown user: same work, always false.
        assert!(!h.verify("correct horse battery", None).await.unwrap());
        // Two hashes of one password differ (random salt).
        assert_ne!(phc, h.hash("correct horse battery").await.unwrap());
        assert!(!h.verify("x", Some("garbage".into())).await.unwrap());
        assert!(!needs_rehash(&phc));
        let weak = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(8192, 1, 1, None).unwrap(),
        )
        .hash_password(b"pw", &SaltString::encode_b64(&[7u8; 16]).unwrap())
        .unwrap()
        .to_string();
        assert!(needs_rehash(&weak));
    }
}
