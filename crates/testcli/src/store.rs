//! `~/.testcli/auth.json`: the tokens of the signed-in user.
//!
//! The directory is 0700 and the file 0600 from the moment it exists (it is
//! created with that mode, never chmod-ed afterwards), and every write goes
//! to a temporary file in the same directory that is renamed over the old
//! one, so a reader sees either the old or the new credentials, never half.

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::pkce::random_token;
use crate::Error;

/// The stored credentials.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// The issuer the tokens came from.
    pub issuer: String,
    /// The client they were issued to.
    pub client_id: String,
    /// The bearer token for userinfo.
    pub access_token: String,
    /// The token that gets new ones.
    pub refresh_token: String,
    /// The ID token of the login.
    pub id_token: String,
    /// Normally `Bearer`.
    pub token_type: String,
    /// When the access token expires, in Unix seconds.
    pub expires_at: u64,
}

// Tokens never reach logs or panic messages.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("token_type", &self.token_type)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// `$HOME/.testcli/auth.json`.
pub fn default_path() -> Result<PathBuf, Error> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or(Error::NoHome)?;
    Ok(Path::new(&home).join(".testcli").join("auth.json"))
}

/// Reads the credentials at `path`.
pub fn load(path: &Path) -> Result<Credentials, Error> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::NotSignedIn {
                path: path.to_owned(),
            })
        }
        Err(source) => {
            return Err(Error::ReadAuth {
                path: path.to_owned(),
                source,
            })
        }
    };
    serde_json::from_slice(&bytes).map_err(|source| Error::InvalidAuth {
        path: path.to_owned(),
        source,
    })
}

/// Replaces the credentials at `path` atomically (directory 0700, file 0600).
pub fn save(path: &Path, creds: &Credentials) -> Result<(), Error> {
    let write_err = |p: &Path| {
        let p = p.to_owned();
        move |source| Error::WriteAuth { path: p, source }
    };
    let dir = path.parent().ok_or_else(|| Error::WriteAuth {
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "no parent directory"),
    })?;
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        // An existing directory may have been made by hand: tighten it.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::set_permissions(dir, Permissions::from_mode(0o700)).map_err(write_err(dir))?;
        }
        Err(e) => return Err(write_err(dir)(e)),
    }

    let mut body = serde_json::to_vec_pretty(creds).map_err(|e| Error::WriteAuth {
        path: path.to_owned(),
        source: io::Error::other(e),
    })?;
    body.push(b'\n');

    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "auth.json".to_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", random_token(9)?));
    let result = (|| {
        // create_new: never follow or reuse a file someone else placed.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        // The rename itself is durable only once the directory is synced.
        File::open(dir)?.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(write_err(path)(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Credentials {
        Credentials {
            issuer: "https://auth.polydev.test".into(),
            client_id: "polydev-testcli".into(),
            access_token: "at".into(),
            refresh_token: "rt".into(),
            id_token: "it".into(),
            token_type: "Bearer".into(),
            expires_at: 1_700_000_000,
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn save_creates_0700_dir_and_0600_file_and_roundtrips() {
        let home = tempfile::tempdir().unwrap();
        let path = home.path().join(".testcli").join("auth.json");
        save(&path, &sample()).unwrap();
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(load(&path).unwrap(), sample());

        // A rewrite replaces the file and leaves no temporary behind.
        let mut next = sample();
        next.refresh_token = "rt2".into();
        save(&path, &next).unwrap();
        assert_eq!(load(&path).unwrap().refresh_token, "rt2");
        assert_eq!(mode(&path), 0o600);
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("auth.json")]);
    }

    #[test]
    fn save_tightens_an_existing_directory() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join(".testcli");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        save(&dir.join("auth.json"), &sample()).unwrap();
        assert_eq!(mode(&dir), 0o700);
    }

    #[test]
    fn load_tells_missing_from_invalid() {
        let home = tempfile::tempdir().unwrap();
        let path = home.path().join("auth.json");
        assert!(matches!(load(&path), Err(Error::NotSignedIn { .. })));
        fs::write(&path, "{\"issuer\": 1}").unwrap();
        let err = load(&path).unwrap_err();
        assert!(matches!(err, Error::InvalidAuth { .. }), "{err}");
        assert_eq!(err.exit_code(), crate::error::EXIT_NO_CREDENTIALS);
    }

    #[test]
    fn debug_hides_tokens() {
        let shown = format!("{:?}", sample());
        assert!(
            !shown.contains("\"at\"") && !shown.contains("\"rt\""),
            "{shown}"
        );
    }
}
