//! Externally issued JWTs (so an existing frontend can call us with the
//! access tokens of its identity provider).
//!
//! A token is accepted when its header names an allowed algorithm (RS256 or
//! ES256 only: no `none`, no HMAC, so a public key can never be used as an
//! HMAC secret) and a `kid` in the provider's JWKS, its signature verifies
//! with that key, `iss` and `aud` equal the configured values, `exp` is in
//! the future and `nbf` (if present) in the past, both within a small leeway,
//! and `sub` is present. The JWKS is cached; an unknown `kid` (the provider
//! rotated its keys) refetches it, at most once per `jwks_min_refetch`, and a
//! cache older than `jwks_max_age` is refreshed before use.
//!
//! The JWKS is fetched from the configured URL only: no system proxy, no
//! redirects, a timeout and a size limit.
//!
//! (issuer, subject) maps to a user through `external_identities`; the first
//! valid token of a new subject provisions a `user`-role account.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::json;

use super::secret::hash;
use super::{Auth, AuthError, AuthMethod, Principal, Role, Scope};

/// Where and what to verify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtConfig {
    /// The provider's JWKS (`http://` or `https://`).
    pub jwks_url: String,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of the token's audiences).
    pub audience: String,
}

/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// Smallest RSA modulus accepted (bytes): 2048 bits.
const MIN_RSA_MODULUS_BYTES: usize = 256;

/// Why a JWT was refused (for logs and tests; callers see
/// [`AuthError::Unauthenticated`] for all but [`JwtError::Jwks`]).
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// Not a decodable JWT.
    #[error("not a well-formed JWT")]
    Malformed,
    /// The header's `alg` is not RS256 or ES256.
    #[error("algorithm {0} is not allowed (RS256, ES256 only)")]
    AlgorithmNotAllowed(String),
    /// The header has no `kid`.
    #[error("the token header has no kid")]
    MissingKid,
    /// The `kid` is not in the JWKS (even after a refetch, if one was allowed).
    #[error("no signing key {kid:?} in the JWKS")]
    UnknownKey {
        /// The token's `kid`.
        kid: String,
    },
    /// The key's algorithm differs from the header's.
    #[error("key {kid:?} is for {key:?}, the token says {token:?}")]
    KeyAlgorithmMismatch {
        /// The token's `kid`.
        kid: String,
        /// The key's algorithm.
        key: Algorithm,
        /// The header's algorithm.
        token: Algorithm,
    },
    /// Signature, issuer, audience, expiry, not-before or a required claim failed.
    #[error("token rejected: {0:?}")]
    Rejected(jsonwebtoken::errors::ErrorKind),
    /// The JWKS could not be fetched or used.
    #[error("{0}")]
    Jwks(String),
}

/// The verified facts of a JWT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedJwt {
    /// `iss`.
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// Words of the `scope` claim (or the `scp` array), if any.
    pub scopes: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    #[serde(default)]
    scope: Option<serde_json::Value>,
    #[serde(default)]
    scp: Option<serde_json::Value>,
}

fn words(v: &serde_json::Value) -> Vec<String> {
    match v {
        serde_json::Value::String(s) => s.split_ascii_whitespace().map(String::from).collect(),
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

#[derive(Clone)]
struct Key {
    alg: Algorithm,
    key: Arc<DecodingKey>,
}

#[derive(Default)]
struct Cache {
    keys: HashMap<String, Key>,
    /// Last successful fetch.
    fetched_at: Option<Instant>,
    /// Last fetch attempt (successful or not): the rate limit counts from here.
    attempted_at: Option<Instant>,
}

/// Verifies JWTs against a JWKS; shared by all requests.
pub struct JwtVerifier {
    cfg: JwtConfig,
    leeway: Duration,
    min_refetch: Duration,
    max_age: Duration,
    client: reqwest::Client,
    cache: tokio::sync::Mutex<Cache>,
    fetches: AtomicU64,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("cfg", &self.cfg)
            .field("fetches", &self.fetches())
            .finish_non_exhaustive()
    }
}

/// The signing algorithm a JWK is usable for, if it is one we accept.
fn usable(jwk: &Jwk) -> Option<(String, Key)> {
    let kid = jwk.common.key_id.clone()?;
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return None;
    }
    let alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            let n = base64::Engine::decode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                p.n.trim_end_matches('='),
            )
            .ok()?;
            let len = n.iter().skip_while(|b| **b == 0).count();
            if len < MIN_RSA_MODULUS_BYTES {
                return None;
            }
            Algorithm::RS256
        }
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        _ => return None,
    };
    match (jwk.common.key_algorithm, alg) {
        (None, _) | (Some(KeyAlgorithm::RS256), Algorithm::RS256) => {}
        (Some(KeyAlgorithm::ES256), Algorithm::ES256) => {}
        _ => return None,
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some((
        kid,
        Key {
            alg,
            key: Arc::new(key),
        },
    ))
}

impl JwtVerifier {
    /// A verifier for `cfg`. Checks the settings; fetches nothing yet.
    pub fn new(
        cfg: JwtConfig,
        leeway: Duration,
        min_refetch: Duration,
        max_age: Duration,
    ) -> Result<Self, AuthError> {
        let url = reqwest::Url::parse(&cfg.jwks_url).map_err(|e| {
            AuthError::Invalid(format!("JWKS URL {:?} is not a URL: {e}", cfg.jwks_url))
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(AuthError::Invalid(format!(
                "JWKS URL {:?} must be http(s)://host/…",
                cfg.jwks_url
            )));
        }
        if cfg.issuer.trim().is_empty() || cfg.audience.trim().is_empty() {
            return Err(AuthError::Invalid(
                "JWT issuer and audience must both be set (they are checked on every token)".into(),
            ));
        }
        let client = reqwest::Client::builder()
            // The configured URL and nothing else: no proxy from the
            // environment, no redirects.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            // Fetches are rare (rate-limited); a fresh connection each time
            // never trips over one the provider closed since.
            .pool_max_idle_per_host(0)
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| AuthError::Internal(format!("HTTP client for the JWKS: {e}")))?;
        Ok(JwtVerifier {
            cfg,
            leeway,
            min_refetch,
            max_age,
            client,
            cache: tokio::sync::Mutex::new(Cache::default()),
            fetches: AtomicU64::new(0),
        })
    }

    /// The settings.
    pub fn config(&self) -> &JwtConfig {
        &self.cfg
    }

    /// How many times the JWKS has been fetched (metrics; tests of the
    /// refetch rate limit).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Verify `token`; on any failure [`AuthError::Unauthenticated`], except
    /// an unreachable JWKS, which is [`AuthError::Jwks`].
    pub async fn verify(&self, token: &str) -> Result<VerifiedJwt, AuthError> {
        self.check(token).await.map_err(|e| match e {
            JwtError::Jwks(m) => {
                tracing::warn!(url = %self.cfg.jwks_url, "JWKS unavailable: {m}");
                AuthError::Jwks(m)
            }
            e => {
                tracing::debug!("JWT rejected: {e}");
                AuthError::Unauthenticated
            }
        })
    }

    /// Verify `token`, saying why it failed.
    pub async fn check(&self, token: &str) -> Result<VerifiedJwt, JwtError> {
        let header = decode_header(token).map_err(|_| JwtError::Malformed)?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(JwtError::AlgorithmNotAllowed(format!("{:?}", header.alg)));
        }
        let kid = header.kid.ok_or(JwtError::MissingKid)?;
        let key = self.key(&kid).await?;
        if key.alg != header.alg {
            return Err(JwtError::KeyAlgorithmMismatch {
                kid,
                key: key.alg,
                token: header.alg,
            });
        }
        let mut v = Validation::new(key.alg);
        v.set_issuer(&[&self.cfg.issuer]);
        v.set_audience(&[&self.cfg.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.validate_exp = true;
        v.validate_nbf = true;
        v.leeway = self.leeway.as_secs();
        let data =
            decode::<Claims>(token, &key.key, &v).map_err(|e| JwtError::Rejected(e.into_kind()))?;
        let c = data.claims;
        if c.sub.is_empty() {
            return Err(JwtError::Rejected(
                jsonwebtoken::errors::ErrorKind::InvalidSubject,
            ));
        }
        let scopes = c.scope.as_ref().or(c.scp.as_ref()).map(words);
        Ok(VerifiedJwt {
            issuer: c.iss,
            subject: c.sub,
            scopes,
        })
    }

    /// The key `kid`, refetching the JWKS when it is unknown (rate-limited)
    /// or the cache is too old.
    async fn key(&self, kid: &str) -> Result<Key, JwtError> {
        let mut cache = self.cache.lock().await;
        let stale = cache.fetched_at.is_none_or(|t| t.elapsed() >= self.max_age);
        let known = cache.keys.get(kid).cloned();
        let may_fetch = cache
            .attempted_at
            .is_none_or(|t| t.elapsed() >= self.min_refetch);
        if (known.is_none() || stale) && may_fetch {
            cache.attempted_at = Some(Instant::now());
            match self.fetch().await {
                Ok(keys) => {
                    cache.keys = keys;
                    cache.fetched_at = Some(Instant::now());
                }
                // A refresh that fails keeps the keys we have (the provider
                // may be briefly down); with none at all, say so.
                Err(e) if cache.keys.is_empty() => return Err(e),
                Err(e) => {
                    tracing::warn!(url = %self.cfg.jwks_url, "JWKS refresh failed, keeping cached keys: {e}")
                }
            }
        }
        if cache.keys.is_empty() {
            // The last fetch failed and the next is not due yet: the keys
            // are unavailable (503), not the token invalid (401).
            return Err(JwtError::Jwks(format!(
                "JWKS {}: no keys fetched yet; the last attempt failed, retrying within {:?}",
                self.cfg.jwks_url, self.min_refetch
            )));
        }
        cache
            .keys
            .get(kid)
            .cloned()
            .ok_or_else(|| JwtError::UnknownKey {
                kid: kid.chars().take(100).collect(),
            })
    }

    async fn fetch(&self) -> Result<HashMap<String, Key>, JwtError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let url = &self.cfg.jwks_url;
        let fail = |what: String| JwtError::Jwks(format!("JWKS {url}: {what}"));
        let mut resp = self
            .client
            .get(url)
            .header(
                reqwest::header::ACCEPT,
                "application/json, application/jwk-set+json",
            )
            .send()
            .await
            .map_err(|e| fail(format!("request failed: {}", e.without_url())))?;
        if !resp.status().is_success() {
            return Err(fail(format!(
                "HTTP {} (expected 200; redirects are not followed)",
                resp.status()
            )));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| fail(format!("reading the body: {}", e.without_url())))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(fail(format!("larger than {MAX_JWKS_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        let doc: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| fail(format!("not JSON: {e}")))?;
        let keys = doc
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or_else(|| fail("no \"keys\" array".into()))?;
        // Keys we cannot use (encryption keys, other algorithms) are skipped,
        // not fatal: a provider may publish several kinds.
        let usable: HashMap<String, Key> = keys
            .iter()
            .filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok())
            .filter_map(|k| usable(&k))
            .collect();
        if usable.is_empty() {
            return Err(fail(format!(
                "none of its {} keys is an RS256 (RSA >= 2048 bits) or ES256 (P-256) signing key with a kid",
                keys.len()
            )));
        }
        tracing::debug!(url, keys = usable.len(), "fetched JWKS");
        Ok(usable)
    }
}

impl Auth {
    /// The principal of a verified JWT, provisioning its account on first use.
    pub(crate) async fn jwt_principal(&self, v: VerifiedJwt) -> Result<Principal, AuthError> {
        let (user_id, name, role) = self.external_user(&v.issuer, &v.subject).await?;
        // A `scope` claim narrows the account's scopes when it names any of
        // ours; identity-provider scopes (`openid`, …) alone leave the role's.
        let scopes = v.scopes.as_ref().and_then(|w| {
            let ours: Vec<Scope> = w.iter().filter_map(|s| Scope::parse(s).ok()).collect();
            (!ours.is_empty()).then_some(ours)
        });
        Principal::from_row(
            user_id,
            name,
            &role,
            scopes,
            AuthMethod::Jwt {
                issuer: v.issuer,
                subject: v.subject,
            },
        )
    }

    /// (id, name, role) of the account of (issuer, subject), created on first use.
    async fn external_user(
        &self,
        issuer: &str,
        subject: &str,
    ) -> Result<(String, String, String), AuthError> {
        let find = || async {
            let row: Option<(String, String, String)> = sqlx::query_as(
                "SELECT u.id, u.name, u.role FROM external_identities e JOIN users u ON u.id = e.user_id
                 WHERE e.issuer = $1 AND e.subject = $2",
            )
            .bind(issuer)
            .bind(subject)
            .fetch_optional(self.store.pool())
            .await?;
            Ok::<_, AuthError>(row)
        };
        if let Some(r) = find().await? {
            return Ok(r);
        }
        // A stable, valid, collision-resistant name: `ext-` + 64 bits of
        // SHA-256(issuer, subject). The subject itself may be anything.
        let name = format!("ext-{}", &hash(&format!("{issuer}\n{subject}"))[..16]);
        let now = crate::util::now_ms();
        let id = crate::util::new_id("usr")?;
        let mut tx = self.store.begin_write().await?;
        let ins = sqlx::query(
            "INSERT INTO users (id, name, role, password_hash, created_at) VALUES ($1, $2, 'user', NULL, $3)",
        )
        .bind(&id)
        .bind(&name)
        .bind(now)
        .execute(&mut *tx)
        .await;
        let ins = match ins {
            Ok(_) => {
                sqlx::query(
                    "INSERT INTO external_identities (issuer, subject, user_id, created_at) VALUES ($1, $2, $3, $4)",
                )
                .bind(issuer)
                .bind(subject)
                .bind(&id)
                .bind(now)
                .execute(&mut *tx)
                .await
            }
            Err(e) => Err(e),
        };
        match ins {
            Ok(_) => {}
            // A concurrent first request provisioned it: use that account.
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                drop(tx);
                return find().await?.ok_or_else(|| {
                    AuthError::Conflict(format!(
                        "user name {name:?} is taken by an account not linked to this identity"
                    ))
                });
            }
            Err(e) => return Err(e.into()),
        }
        super::event(
            &mut tx,
            now,
            "user",
            &id,
            Some(&id),
            "created",
            json!({ "name": name, "role": Role::User.as_str(), "issuer": issuer }),
        )
        .await?;
        tx.commit().await?;
        tracing::info!(user_id = %id, issuer, "provisioned an account for an external identity");
        Ok((id, name, Role::User.as_str().to_string()))
    }
}
