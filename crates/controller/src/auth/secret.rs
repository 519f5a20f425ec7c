//! Random bearer secrets and their at-rest form.
//!
//! Every secret the controller hands out (session cookie, API token, stream
//! ticket, login link) is 256 bits from the OS CSPRNG, base64url encoded. The
//! database only ever sees `hex(SHA-256(value))`: with 256 bits of entropy a
//! fast hash cannot be brute-forced, and lookups stay a primary-key hit.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::util::{random_bytes, RandomError};

/// A fresh secret `<prefix><43 base64url chars>` (prefix may be empty).
pub(crate) fn new_secret(prefix: &str) -> Result<Zeroizing<String>, RandomError> {
    let mut raw = Zeroizing::new([0u8; 32]);
    random_bytes(raw.as_mut())?;
    let mut out = Zeroizing::new(String::with_capacity(prefix.len() + 43));
    out.push_str(prefix);
    let mut enc = URL_SAFE_NO_PAD.encode(raw.as_ref());
    out.push_str(&enc);
    enc.zeroize();
    Ok(out)
}

/// The at-rest form of a secret: lowercase hex SHA-256.
pub(crate) fn hash(value: &str) -> String {
    hex::encode(Sha256::digest(value.as_bytes()))
}

/// Whether `s` could be one of our base64url secret bodies (cheap pre-check
/// that keeps junk out of queries and logs).
pub(crate) fn plausible(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_distinct_and_prefixed() {
        let a = new_secret("pdx_").unwrap();
        let b = new_secret("pdx_").unwrap();
        assert_ne!(*a, *b);
        assert!(a.starts_with("pdx_"));
        assert_eq!(a.len(), 4 + 43);
        assert!(plausible(&a));
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(!plausible("a b"));
        assert!(!plausible(""));
    }
}
