//! User accounts: creation, passwords, password login.

use serde_json::json;

use super::passwords::{needs_rehash, validate_name, validate_password, MAX_PASSWORD_BYTES};
use super::{event, Auth, AuthError, AuthMethod, LoginSession, Principal, Role, User};
use crate::store::StoreError;
use crate::util::now_ms;

impl Auth {
    /// Create an account. `password` may be `None` (the account can then only
    /// log in through a login link or an external identity).
    pub async fn create_user(
        &self,
        name: &str,
        role: Role,
        password: Option<&str>,
    ) -> Result<User, AuthError> {
        validate_name(name)?;
        let hash = match password {
            Some(p) => {
                validate_password(p)?;
                Some(self.hasher.hash(p).await?)
            }
            None => None,
        };
        self.insert_user(name, role, hash, json!({})).await
    }

    /// Insert a user row and its `created` event in one transaction
    /// ([`crate::store::Store`]'s insert, with a taken name made actionable).
    pub(crate) async fn insert_user(
        &self,
        name: &str,
        role: Role,
        password_hash: Option<String>,
        detail: serde_json::Value,
    ) -> Result<User, AuthError> {
        self.store
            .insert_user(name, role.as_str(), password_hash, detail)
            .await
            .map_err(|e| match e {
                StoreError::Duplicate { .. } => {
                    AuthError::Conflict(format!("user name {name:?} is taken: choose another"))
                }
                e => e.into(),
            })
    }

    /// Whether the account has a password (else it logs in only through a
    /// login link or an external identity).
    pub async fn has_password(&self, user_id: &str) -> Result<bool, AuthError> {
        let row: Option<(Option<String>,)> =
            sqlx::query_as("SELECT password_hash FROM users WHERE id = $1")
                .bind(user_id)
                .fetch_optional(self.store.pool())
                .await?;
        match row {
            Some((h,)) => Ok(h.is_some()),
            None => Err(AuthError::NotFound),
        }
    }

    /// Set (or replace) a user's password. Ends all of that user's login
    /// sessions: whoever knew the old password is logged out.
    pub async fn set_password(&self, user_id: &str, password: &str) -> Result<(), AuthError> {
        validate_password(password)?;
        let hash = self.hasher.hash(password).await?;
        let now = now_ms();
        let mut tx = self.store.begin_write().await?;
        let done = sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
            .bind(hash)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() != 1 {
            return Err(AuthError::NotFound);
        }
        let ended = sqlx::query("DELETE FROM login_sessions WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        event(
            &mut tx,
            now,
            "user",
            user_id,
            Some(user_id),
            "password_set",
            json!({ "sessions_ended": ended }),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Change a user's role. Demoting the last admin is refused (nobody
    /// could administer the installation any more).
    pub async fn set_role(&self, user_id: &str, role: Role) -> Result<(), AuthError> {
        let now = now_ms();
        let mut tx = self.store.begin_write().await?;
        // Role changes are serialized so two concurrent demotions cannot
        // both see another admin left: SQLite's single writer does it (the
        // UPDATE comes first, so the write lock is taken at once); on
        // PostgreSQL a transaction-scoped advisory lock.
        if self.store.dialect() == crate::store::Dialect::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock(7305832)")
                .execute(&mut *tx)
                .await?;
        }
        let done = sqlx::query("UPDATE users SET role = $1 WHERE id = $2")
            .bind(role.as_str())
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() != 1 {
            return Err(AuthError::NotFound);
        }
        let (admins,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM users WHERE role = 'admin'")
            .fetch_one(&mut *tx)
            .await?;
        if admins == 0 {
            return Err(AuthError::Conflict(
                "this is the last admin account: make another user admin first".into(),
            ));
        }
        event(
            &mut tx,
            now,
            "user",
            user_id,
            Some(user_id),
            "role_set",
            json!({ "role": role.as_str() }),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every account, oldest first.
    pub async fn list_users(&self) -> Result<Vec<User>, AuthError> {
        let rows: Vec<(String, String, String, i64)> =
            sqlx::query_as("SELECT id, name, role, created_at FROM users ORDER BY created_at, id")
                .fetch_all(self.store.pool())
                .await?;
        Ok(rows
            .into_iter()
            .map(|(id, name, role, created_at)| User {
                id,
                name,
                role,
                created_at,
            })
            .collect())
    }

    /// One account by id ([`AuthError::NotFound`] if none).
    pub async fn user(&self, user_id: &str) -> Result<User, AuthError> {
        self.store.user(user_id).await.map_err(|e| match e {
            StoreError::NotFound { .. } => AuthError::NotFound,
            e => e.into(),
        })
    }

    /// Password login for the dashboard: a new login session on success,
    /// [`AuthError::Unauthenticated`] otherwise (same answer and about the
    /// same time for an unknown name, a wrong password, or an account
    /// without a password), [`AuthError::Backoff`] while the name is
    /// closed after failed logins (see [`super::backoff`]).
    pub async fn login(
        &self,
        name: &str,
        password: &str,
    ) -> Result<(Principal, LoginSession), AuthError> {
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(AuthError::Unauthenticated);
        }
        self.take_login_attempt(name).await?;
        let row: Option<(String, String, String, Option<String>)> =
            sqlx::query_as("SELECT id, name, role, password_hash FROM users WHERE name = $1")
                .bind(name)
                .fetch_optional(self.store.pool())
                .await?;
        let phc = row.as_ref().and_then(|r| r.3.clone());
        let ok = self.hasher.verify(password, phc).await?;
        let Some((id, name, role, phc)) = row.filter(|_| ok) else {
            tracing::debug!("password login rejected");
            return Err(AuthError::Unauthenticated);
        };
        if let Some(old) = phc.filter(|p| needs_rehash(p)) {
            // Parameters were raised since this hash was made: upgrade it now
            // that we know the password (only if nobody changed it meanwhile).
            let new = self.hasher.hash(password).await?;
            self.store
                .write_one(
                    sqlx::query(
                        "UPDATE users SET password_hash = $1 WHERE id = $2 AND password_hash = $3",
                    )
                    .bind(new)
                    .bind(&id)
                    .bind(old),
                )
                .await?;
            tracing::info!(user_id = %id, "re-hashed a password with the current argon2id parameters");
        }
        self.clear_login_failures(&name).await?;
        let p = Principal::from_row(id, name, &role, None, AuthMethod::Cookie)?;
        let s = self.create_login_session(&p.user_id, false).await?;
        Ok((p, s))
    }
}

#[cfg(test)]
mod tests {
    use super::super::AuthConfig;
    use super::*;
    use crate::store::Store;

    const PW: &str = "correct horse battery staple";

    async fn auth() -> (Auth, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in_dir(dir.path()).await.unwrap();
        (Auth::new(store, AuthConfig::default()).unwrap(), dir)
    }

    /// Every password login costs exactly one argon2 verification, whether
    /// the name exists, has a password, or the password is right.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn logins_do_constant_work() {
        let (a, _dir) = auth().await;
        a.create_user("alice", Role::User, Some(PW)).await.unwrap();
        a.create_user("nopass", Role::User, None).await.unwrap();
        for (name, pw, ok) in [
            ("nobody", PW, false),
            ("nopass", PW, false),
            ("alice", "wrong password, long enough", false),
            ("alice", PW, true),
        ] {
            let before = a.hasher.verifications();
            assert_eq!(a.login(name, pw).await.is_ok(), ok, "{name}");
            assert_eq!(a.hasher.verifications() - before, 1, "{name}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn old_parameters_are_upgraded_on_login() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let (a, _dir) = auth().await;
        let u = a.create_user("alice", Role::User, None).await.unwrap();
        let weak = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon2::Params::new(8192, 1, 1, None).unwrap(),
        )
        .hash_password(PW.as_bytes(), &SaltString::encode_b64(&[9u8; 16]).unwrap())
        .unwrap()
        .to_string();
        sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
            .bind(&weak)
            .bind(&u.id)
            .execute(a.store.pool())
            .await
            .unwrap();
        a.login("alice", PW).await.unwrap();
        let (now,): (String,) = sqlx::query_as("SELECT password_hash FROM users WHERE id = $1")
            .bind(&u.id)
            .fetch_one(a.store.pool())
            .await
            .unwrap();
        assert!(now.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{now}");
        a.login("alice", PW).await.unwrap();
    }
}
