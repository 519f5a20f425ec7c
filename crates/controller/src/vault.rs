//! The credential vault: envelope encryption with AES-256-GCM.
//!
//! * A **keyring** of master keys (32 bytes each, named by a random key id)
//!   comes from a key file of mode 0600 (created on first start) or from the
//!   environment (`POLYDEV_VAULT_KEYS`). One key is active; the others only
//!   unwrap older records until rotation has re-wrapped them.
//! * Each record gets a **fresh random data key**. The record is encrypted
//!   with it under associated data = (user id, provider, record version); the
//!   data key is wrapped by the active master key under associated data =
//!   (key id, the same record identity). So a record moved to another user or
//!   provider, replayed under another version, or pointed at another key id
//!   fails authentication instead of decrypting.
//! * Rotation re-wraps only the 60-byte data keys (the ciphertext stays), so
//!   it runs online; afterwards no row names the old key and it can be retired.
//! * Plaintext lives only in [`Zeroizing`] buffers and is never formatted into
//!   errors or logs ([`SealedRecord`]'s `Debug` shows lengths only).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use zeroize::{Zeroize, Zeroizing};

use crate::store::{Store, StoreError};
use crate::util::{random_bytes, RandomError};

/// Environment variable holding the keyring instead of a file:
/// `id:base64key[,id:base64key…]`, the first entry active.
pub const KEYS_ENV: &str = "POLYDEV_VAULT_KEYS";

const NONCE_LEN: usize = 12;
const KEY_LEN: usize = 32;

/// Errors of the vault. None of them carries key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// The key file is readable or writable by others.
    #[error("vault key file {path} has mode {mode:o}; it must not be accessible to group or others: run `chmod 600 {path}`")]
    KeyFilePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Reading or writing the key file failed.
    #[error("vault key file {path}: {source}")]
    KeyFileIo {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The key file or the environment value does not parse.
    #[error("vault keyring from {origin} is malformed: {detail}")]
    Malformed {
        /// File path or the environment variable's name.
        origin: String,
        /// What is wrong (never the key itself).
        detail: String,
    },
    /// A record names a master key the keyring does not have.
    #[error("record {record} is wrapped by master key {key_id}, which is not in the keyring: add the retired key back or restore it from backup")]
    UnknownKeyId {
        /// The record (`user/provider vN`).
        record: String,
        /// The missing key id.
        key_id: String,
    },
    /// Authentication failed: the record or its wrapped key was altered, moved
    /// to another user/provider/version, or the key id points at another key.
    #[error("record {record} failed authentication: it was altered, moved to another owner or version, or wrapped by a different key")]
    Tampered {
        /// The record (`user/provider vN`).
        record: String,
    },
    /// Encryption itself failed (only on absurd sizes).
    #[error("encrypting record {record} failed")]
    Encrypt {
        /// The record.
        record: String,
    },
    /// A key to be retired still wraps records.
    #[error("master key {key_id} still wraps {count} record(s): run rotation first")]
    KeyInUse {
        /// The key.
        key_id: String,
        /// How many records.
        count: usize,
    },
    /// The active key cannot be retired.
    #[error("master key {0} is the active key; rotate to a new key before retiring it")]
    RetireActive(String),
    /// No key with that id.
    #[error("no master key {0} in the keyring")]
    NoSuchKey(String),
    /// Randomness failed.
    #[error(transparent)]
    Random(#[from] RandomError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One encrypted record as stored: everything but the plaintext.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedRecord {
    /// Owner.
    pub user_id: String,
    /// Provider id.
    pub provider: String,
    /// Record version (part of the associated data).
    pub version: i64,
    /// Master key that wraps the data key.
    pub key_id: String,
    /// Nonce ‖ AES-256-GCM(master key, data key).
    pub wrapped_key: Vec<u8>,
    /// Nonce of the record encryption.
    pub nonce: Vec<u8>,
    /// AES-256-GCM(data key, plaintext).
    pub ciphertext: Vec<u8>,
}

impl SealedRecord {
    fn label(&self) -> String {
        format!("{}/{} v{}", self.user_id, self.provider, self.version)
    }
}

impl fmt::Debug for SealedRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedRecord")
            .field("user_id", &self.user_id)
            .field("provider", &self.provider)
            .field("version", &self.version)
            .field("key_id", &self.key_id)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

/// Master keys by id, one of them active. `Debug` shows ids only.
pub struct Keyring {
    active: String,
    keys: BTreeMap<String, Zeroizing<[u8; KEY_LEN]>>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("active", &self.active)
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn new_key() -> Result<(String, Zeroizing<[u8; KEY_LEN]>), RandomError> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    random_bytes(&mut key[..])?;
    Ok((crate::util::new_id("mk")?, key))
}

fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn decode_key(origin: &str, id: &str, b64: &str) -> Result<Zeroizing<[u8; KEY_LEN]>, VaultError> {
    let malformed = |detail: String| VaultError::Malformed {
        origin: origin.to_string(),
        detail,
    };
    if !valid_key_id(id) {
        return Err(malformed(format!(
            "key id {id:?} must be 1-64 characters of [A-Za-z0-9_-]"
        )));
    }
    let raw = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| malformed(format!("key {id} is not base64")))?,
    );
    if raw.len() != KEY_LEN {
        return Err(malformed(format!(
            "key {id} is {} bytes; a master key is {KEY_LEN} bytes",
            raw.len()
        )));
    }
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    key.copy_from_slice(&raw);
    Ok(key)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    active: String,
    keys: BTreeMap<String, String>,
}

impl Keyring {
    /// A keyring with one freshly generated active key.
    pub fn generate() -> Result<Self, VaultError> {
        let (id, key) = new_key()?;
        Ok(Keyring {
            active: id.clone(),
            keys: BTreeMap::from([(id, key)]),
        })
    }

    /// The active key's id.
    pub fn active_id(&self) -> &str {
        &self.active
    }

    /// All key ids.
    pub fn ids(&self) -> Vec<String> {
        self.keys.keys().cloned().collect()
    }

    /// Parse `id:base64[,id:base64…]` (the first entry is active), as held in
    /// [`KEYS_ENV`].
    pub fn from_env_value(value: &str) -> Result<Self, VaultError> {
        let mut keys = BTreeMap::new();
        let mut active = None;
        for entry in value.split(',').filter(|e| !e.trim().is_empty()) {
            let (id, b64) = entry
                .trim()
                .split_once(':')
                .ok_or_else(|| VaultError::Malformed {
                    origin: KEYS_ENV.to_string(),
                    detail: "each entry must be <key id>:<base64 of 32 bytes>".into(),
                })?;
            let key = decode_key(KEYS_ENV, id, b64)?;
            active.get_or_insert_with(|| id.to_string());
            keys.insert(id.to_string(), key);
        }
        let active = active.ok_or_else(|| VaultError::Malformed {
            origin: KEYS_ENV.to_string(),
            detail: "no keys".into(),
        })?;
        Ok(Keyring { active, keys })
    }

    /// The keyring from [`KEYS_ENV`], if set.
    pub fn from_env() -> Result<Option<Self>, VaultError> {
        match std::env::var(KEYS_ENV) {
            Ok(v) => {
                let v = Zeroizing::new(v);
                Self::from_env_value(&v).map(Some)
            }
            Err(_) => Ok(None),
        }
    }

    /// The keyring in force: [`KEYS_ENV`] when set (then the file is not
    /// touched), else the key file, created on first start.
    pub fn from_env_or_file(path: &Path) -> Result<Self, VaultError> {
        match Self::from_env()? {
            Some(ring) => Ok(ring),
            None => Self::load_or_create(path),
        }
    }

    /// Load the key file, or create it with one new key (mode 0600) if it does
    /// not exist. A file that group or others can access is refused.
    pub fn load_or_create(path: &Path) -> Result<Self, VaultError> {
        match std::fs::metadata(path) {
            Ok(_) => Self::load(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let ring = Self::generate()?;
                ring.write_new(path)?;
                tracing::info!(path = %path.display(), key_id = %ring.active, "created vault key file");
                Ok(ring)
            }
            Err(source) => Err(VaultError::KeyFileIo {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Load an existing key file (permissions checked first).
    pub fn load(path: &Path) -> Result<Self, VaultError> {
        let io = |source| VaultError::KeyFileIo {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(VaultError::KeyFilePermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
        let origin = path.display().to_string();
        let mut parsed: KeyFile = toml::from_str(&text).map_err(|e| VaultError::Malformed {
            origin: origin.clone(),
            // toml's message quotes the offending line, which may be a key:
            // report only where it is.
            detail: match e.span() {
                Some(s) => format!("TOML syntax error at byte {}", s.start),
                None => "TOML syntax error".into(),
            },
        })?;
        let mut keys = BTreeMap::new();
        let mut result = Ok(());
        for (id, b64) in parsed.keys.iter_mut() {
            match decode_key(&origin, id, b64) {
                Ok(k) => {
                    keys.insert(id.clone(), k);
                }
                Err(e) => {
                    result = Err(e);
                }
            }
            b64.zeroize();
        }
        result?;
        if !keys.contains_key(&parsed.active) {
            return Err(VaultError::Malformed {
                origin,
                detail: format!("active key {:?} is not among the keys", parsed.active),
            });
        }
        Ok(Keyring {
            active: parsed.active,
            keys,
        })
    }

    fn render(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::from(
            "# Polydev vault master keys. SECRET: keep mode 0600 and back it up apart from the database.\n",
        ));
        s.push_str(&format!("active = \"{}\"\n\n[keys]\n", self.active));
        for (id, k) in &self.keys {
            let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&k[..]));
            s.push_str(&format!("{id} = \"{}\"\n", b64.as_str()));
        }
        s
    }

    fn write_new(&self, path: &Path) -> Result<(), VaultError> {
        let io = |source| VaultError::KeyFileIo {
            path: path.to_path_buf(),
            source,
        };
        // create_new + mode: the file never exists with looser permissions,
        // and an existing file is never clobbered.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        f.write_all(self.render().as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)
    }

    /// Write the keyring to `path` atomically (temp file 0600 + rename).
    pub fn save(&self, path: &Path) -> Result<(), VaultError> {
        let tmp = path.with_extension("tmp");
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(VaultError::KeyFileIo { path: tmp, source }),
        }
        self.write_new(&tmp)?;
        std::fs::rename(&tmp, path).map_err(|source| VaultError::KeyFileIo {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Add a new key and make it active (the first step of rotation).
    pub fn add_active(&mut self) -> Result<String, VaultError> {
        let (id, key) = new_key()?;
        self.keys.insert(id.clone(), key);
        self.active = id.clone();
        Ok(id)
    }

    /// Remove a key that no record uses any more (`in_use`: the store's
    /// [`Store::credential_key_ids`]).
    pub fn retire(&mut self, key_id: &str, in_use: &[String]) -> Result<(), VaultError> {
        if key_id == self.active {
            return Err(VaultError::RetireActive(key_id.to_string()));
        }
        if !self.keys.contains_key(key_id) {
            return Err(VaultError::NoSuchKey(key_id.to_string()));
        }
        let count = in_use.iter().filter(|k| *k == key_id).count();
        if count > 0 {
            return Err(VaultError::KeyInUse {
                key_id: key_id.to_string(),
                count,
            });
        }
        self.keys.remove(key_id);
        Ok(())
    }
}

/// Associated data binding a record to its identity (length-prefixed so no
/// two identities encode the same).
fn record_aad(user_id: &str, provider: &str, version: i64) -> Vec<u8> {
    let mut aad = b"polydev-vault-record-v1".to_vec();
    for part in [user_id.as_bytes(), provider.as_bytes()] {
        aad.extend_from_slice(&(part.len() as u64).to_be_bytes());
        aad.extend_from_slice(part);
    }
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

fn wrap_aad(key_id: &str, record: &[u8]) -> Vec<u8> {
    let mut aad = b"polydev-vault-dek-v1".to_vec();
    aad.extend_from_slice(&(key_id.len() as u64).to_be_bytes());
    aad.extend_from_slice(key_id.as_bytes());
    aad.extend_from_slice(record);
    aad
}

/// Seals and opens records with a [`Keyring`].
#[derive(Debug)]
pub struct Vault {
    ring: Keyring,
}

impl Vault {
    /// A vault over `ring`.
    pub fn new(ring: Keyring) -> Self {
        Vault { ring }
    }

    /// The keyring (to rotate or retire keys).
    pub fn keyring(&self) -> &Keyring {
        &self.ring
    }

    /// Mutable keyring.
    pub fn keyring_mut(&mut self) -> &mut Keyring {
        &mut self.ring
    }

    fn master(&self, key_id: &str, record: &str) -> Result<Aes256Gcm, VaultError> {
        let k = self
            .ring
            .keys
            .get(key_id)
            .ok_or_else(|| VaultError::UnknownKeyId {
                record: record.to_string(),
                key_id: key_id.to_string(),
            })?;
        Ok(Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&k[..])))
    }

    fn wrap(
        &self,
        dek: &[u8; KEY_LEN],
        rec_aad: &[u8],
        label: &str,
    ) -> Result<(String, Vec<u8>), VaultError> {
        let key_id = self.ring.active.clone();
        let cipher = self.master(&key_id, label)?;
        let mut nonce = [0u8; NONCE_LEN];
        random_bytes(&mut nonce)?;
        let ct = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: dek,
                    aad: &wrap_aad(&key_id, rec_aad),
                },
            )
            .map_err(|_| VaultError::Encrypt {
                record: label.to_string(),
            })?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Ok((key_id, out))
    }

    fn unwrap_dek(&self, rec: &SealedRecord) -> Result<Zeroizing<[u8; KEY_LEN]>, VaultError> {
        let label = rec.label();
        let cipher = self.master(&rec.key_id, &label)?;
        let tampered = || VaultError::Tampered {
            record: label.clone(),
        };
        if rec.wrapped_key.len() != NONCE_LEN + KEY_LEN + 16 {
            return Err(tampered());
        }
        let (nonce, ct) = rec.wrapped_key.split_at(NONCE_LEN);
        let aad = wrap_aad(
            &rec.key_id,
            &record_aad(&rec.user_id, &rec.provider, rec.version),
        );
        let raw = Zeroizing::new(
            cipher
                .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
                .map_err(|_| tampered())?,
        );
        let mut dek = Zeroizing::new([0u8; KEY_LEN]);
        dek.copy_from_slice(&raw);
        Ok(dek)
    }

    /// Encrypt `plaintext` as version `version` of (user, provider) under a
    /// fresh data key wrapped by the active master key.
    pub fn seal(
        &self,
        user_id: &str,
        provider: &str,
        version: i64,
        plaintext: &[u8],
    ) -> Result<SealedRecord, VaultError> {
        let label = format!("{user_id}/{provider} v{version}");
        let mut dek = Zeroizing::new([0u8; KEY_LEN]);
        random_bytes(&mut dek[..])?;
        let aad = record_aad(user_id, provider, version);
        let mut nonce = [0u8; NONCE_LEN];
        random_bytes(&mut nonce)?;
        let ciphertext = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&dek[..]))
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| VaultError::Encrypt {
                record: label.clone(),
            })?;
        let (key_id, wrapped_key) = self.wrap(&dek, &aad, &label)?;
        Ok(SealedRecord {
            user_id: user_id.to_string(),
            provider: provider.to_string(),
            version,
            key_id,
            wrapped_key,
            nonce: nonce.to_vec(),
            ciphertext,
        })
    }

    /// Decrypt a record; the plaintext is zeroized when dropped.
    pub fn open(&self, rec: &SealedRecord) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let dek = self.unwrap_dek(rec)?;
        if rec.nonce.len() != NONCE_LEN {
            return Err(VaultError::Tampered {
                record: rec.label(),
            });
        }
        let aad = record_aad(&rec.user_id, &rec.provider, rec.version);
        let pt = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&dek[..]))
            .decrypt(
                Nonce::from_slice(&rec.nonce),
                Payload {
                    msg: &rec.ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| VaultError::Tampered {
                record: rec.label(),
            })?;
        Ok(Zeroizing::new(pt))
    }

    /// The same record with its data key re-wrapped by the active master key
    /// (the ciphertext is untouched).
    pub fn rewrap(&self, rec: &SealedRecord) -> Result<SealedRecord, VaultError> {
        let dek = self.unwrap_dek(rec)?;
        let aad = record_aad(&rec.user_id, &rec.provider, rec.version);
        let (key_id, wrapped_key) = self.wrap(&dek, &aad, &rec.label())?;
        Ok(SealedRecord {
            key_id,
            wrapped_key,
            ..rec.clone()
        })
    }

    /// Seal `plaintext` as the next version of (user, provider) and store it.
    /// Returns the new version.
    pub async fn store(
        &self,
        store: &Store,
        user_id: &str,
        provider: &str,
        plaintext: &[u8],
    ) -> Result<i64, VaultError> {
        let version = match store.credential(user_id, provider).await? {
            Some(r) => r.version + 1,
            None => 1,
        };
        let rec = self.seal(user_id, provider, version, plaintext)?;
        store.put_credential(&rec).await?;
        Ok(version)
    }

    /// Load and open the credential of (user, provider), if stored.
    pub async fn load(
        &self,
        store: &Store,
        user_id: &str,
        provider: &str,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, VaultError> {
        match store.credential(user_id, provider).await? {
            Some(rec) => self.open(&rec).map(Some),
            None => Ok(None),
        }
    }

    /// Re-wrap every record not under the active key. Online: each record is
    /// a compare-and-swap, so a record rewritten meanwhile is simply already
    /// under the active key. Returns how many were re-wrapped.
    pub async fn rotate_records(&self, store: &Store) -> Result<usize, VaultError> {
        let mut n = 0;
        for rec in store.credentials_not_under(&self.ring.active).await? {
            let new = self.rewrap(&rec)?;
            match store.rewrap_credential(&rec, &new).await {
                Ok(()) => n += 1,
                // Rewritten concurrently: the new version was sealed under
                // the active key already.
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vault() -> Vault {
        Vault::new(Keyring::generate().unwrap())
    }

    #[test]
    fn round_trip() {
        let v = vault();
        let rec = v.seal("usr-1", "codex", 1, b"{\"tokens\":1}").unwrap();
        assert_eq!(&v.open(&rec).unwrap()[..], b"{\"tokens\":1}");
        assert!(!format!("{rec:?}").contains("tokens"));
    }

    #[test]
    fn tampering_is_detected() {
        let v = vault();
        let rec = v.seal("usr-1", "codex", 1, b"secret-token").unwrap();
        type Tamper = Box<dyn Fn(&mut SealedRecord)>;
        let cases: Vec<(&str, Tamper)> = vec![
            ("ciphertext", Box::new(|r| r.ciphertext[0] ^= 1)),
            ("tag", Box::new(|r| *r.ciphertext.last_mut().unwrap() ^= 1)),
            ("nonce", Box::new(|r| r.nonce[3] ^= 1)),
            ("wrapped key", Box::new(|r| r.wrapped_key[20] ^= 1)),
            ("wrap nonce", Box::new(|r| r.wrapped_key[0] ^= 1)),
            ("user", Box::new(|r| r.user_id = "usr-2".into())),
            ("provider", Box::new(|r| r.provider = "claude-code".into())),
            ("version", Box::new(|r| r.version = 2)),
            ("truncated", Box::new(|r| r.wrapped_key.truncate(10))),
        ];
        for (what, f) in cases {
            let mut r = rec.clone();
            f(&mut r);
            assert!(
                matches!(v.open(&r), Err(VaultError::Tampered { .. })),
                "{what} not detected"
            );
        }
        // A key id pointing at another (existing) key fails authentication;
        // an unknown one is named.
        let mut v2 = vault();
        let old = v2.keyring().active_id().to_string();
        let rec2 = v2.seal("usr-1", "codex", 1, b"x").unwrap();
        let new = v2.keyring_mut().add_active().unwrap();
        let mut r = rec2.clone();
        r.key_id = new;
        assert!(matches!(v2.open(&r), Err(VaultError::Tampered { .. })));
        r.key_id = "mk-nope".into();
        assert!(matches!(v2.open(&r), Err(VaultError::UnknownKeyId { .. })));
        assert_eq!(rec2.key_id, old);
    }

    #[test]
    fn env_keyring() {
        let k = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let r = Keyring::from_env_value(&format!("a:{k},b:{k}")).unwrap();
        assert_eq!(r.active_id(), "a");
        assert_eq!(r.ids(), vec!["a", "b"]);
        let e = Keyring::from_env_value("a:AAAA").unwrap_err().to_string();
        assert!(e.contains("32 bytes"), "{e}");
        assert!(Keyring::from_env_value("").is_err());
        assert!(Keyring::from_env_value(&format!("bad id:{k}")).is_err());
    }

    #[test]
    fn key_file_created_0600_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vault.key");
        let a = Keyring::load_or_create(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = Keyring::load_or_create(&p).unwrap();
        assert_eq!(a.active_id(), b.active_id());
        // Same key material: a record sealed by one opens with the other.
        let rec = Vault::new(a).seal("u", "p", 1, b"hello").unwrap();
        assert_eq!(&Vault::new(b).open(&rec).unwrap()[..], b"hello");
    }

    #[test]
    fn loose_key_file_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vault.key");
        Keyring::load_or_create(&p).unwrap();
        for mode in [0o640, 0o604, 0o660, 0o644] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = Keyring::load_or_create(&p).unwrap_err();
            assert!(
                matches!(e, VaultError::KeyFilePermissions { .. }),
                "{mode:o}: {e}"
            );
            assert!(e.to_string().contains("chmod 600"));
        }
    }

    #[test]
    fn malformed_key_file_does_not_echo_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vault.key");
        let write = |s: &str| {
            let _ = std::fs::remove_file(&p);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)
                .unwrap()
                .write_all(s.as_bytes())
                .unwrap();
        };
        write("active = \"a\"\n[keys]\na = \"SECRETSECRET\"\n");
        let e = Keyring::load(&p).unwrap_err().to_string();
        assert!(!e.contains("SECRETSECRET"), "{e}");
        write("active = \"a\"\n[keys]\na = SECRETSECRET\n");
        let e = Keyring::load(&p).unwrap_err().to_string();
        assert!(!e.contains("SECRETSECRET"), "{e}");
        let k = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        write(&format!("active = \"b\"\n[keys]\na = \"{k}\"\n"));
        let e = Keyring::load(&p).unwrap_err().to_string();
        assert!(e.contains("active key"), "{e}");
    }

    #[test]
    fn env_wins_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vault.key");
        let k = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
        // Only this test touches the variable.
        std::env::set_var(KEYS_ENV, format!("envkey:{k}"));
        let r = Keyring::from_env_or_file(&p);
        std::env::remove_var(KEYS_ENV);
        assert_eq!(r.unwrap().active_id(), "envkey");
        assert!(
            !p.exists(),
            "no key file is written when the env supplies keys"
        );
        assert_ne!(Keyring::from_env_or_file(&p).unwrap().active_id(), "envkey");
        assert!(p.exists());
    }

    #[test]
    fn retire_rules() {
        let mut r = Keyring::generate().unwrap();
        let old = r.active_id().to_string();
        assert!(matches!(
            r.retire(&old, &[]),
            Err(VaultError::RetireActive(_))
        ));
        r.add_active().unwrap();
        assert!(matches!(
            r.retire(&old, std::slice::from_ref(&old)),
            Err(VaultError::KeyInUse { count: 1, .. })
        ));
        r.retire(&old, &[]).unwrap();
        assert_eq!(r.ids().len(), 1);
        assert!(!format!("{r:?}").contains('='));
    }
}
