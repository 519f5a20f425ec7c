//! HTTPS to the authorization server: the client (proxy, roots, timeouts,
//! size limit) and the OpenID Connect calls this program makes.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::{Client, Proxy, Response, Url};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::chain;
use crate::{Error, CLIENT_ID};

/// Every request gives up after this long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Answers larger than this are refused (all of ours are a few KiB).
pub const MAX_BODY: usize = 1024 * 1024;
/// The CA bundle used when `SSL_CERT_FILE` is unset (Debian's).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The subset of a discovery document this program uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Discovery {
    /// Must equal the issuer asked for (OIDC Discovery §4.3).
    pub issuer: String,
    /// Where the browser goes.
    pub authorization_endpoint: String,
    /// Where codes and refresh tokens are exchanged.
    pub token_endpoint: String,
    /// Who the access token belongs to.
    pub userinfo_endpoint: String,
}

/// A successful token endpoint answer (RFC 6749 §5.1).
#[derive(Clone, Deserialize)]
pub struct TokenResponse {
    /// The new access token.
    pub access_token: String,
    /// Normally `Bearer`.
    pub token_type: String,
    /// Lifetime of the access token in seconds.
    pub expires_in: Option<u64>,
    /// The new refresh token (rotated on every refresh by our server).
    pub refresh_token: Option<String>,
    /// The ID token.
    pub id_token: Option<String>,
}

/// The claims `whoami` prints.
#[derive(Debug, Clone, Deserialize)]
pub struct UserInfo {
    /// The subject.
    pub sub: String,
    /// The user name.
    pub preferred_username: Option<String>,
    /// The display name.
    pub name: Option<String>,
}

#[derive(Deserialize)]
struct OAuthError {
    error: String,
    error_description: Option<String>,
}

/// The HTTPS client.
#[derive(Debug, Clone)]
pub struct Http {
    client: Client,
}

impl Http {
    /// A client configured from the environment: `HTTPS_PROXY` or
    /// `https_proxy` (with `NO_PROXY`), and the roots in `SSL_CERT_FILE` or
    /// the system bundle. Nothing else is trusted and plain HTTP is refused.
    pub fn from_env() -> Result<Self, Error> {
        let ca_path = std::env::var_os("SSL_CERT_FILE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(SYSTEM_CA_BUNDLE));
        let pem = std::fs::read(&ca_path).map_err(|source| Error::CaBundle {
            path: ca_path.clone(),
            source,
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| Error::CaParse {
            path: ca_path.clone(),
            detail: format!(": {}", chain(&e)),
        })?;
        if certs.is_empty() {
            return Err(Error::CaParse {
                path: ca_path,
                detail: String::new(),
            });
        }

        // The built-in webpki roots and reqwest's own proxy lookup are off:
        // trust and routing come only from the variables documented above.
        let mut builder = Client::builder()
            .no_proxy()
            .https_only(true)
            .tls_built_in_root_certs(false)
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("polydev-testcli/", env!("CARGO_PKG_VERSION")));
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
        if let Some(proxy) = proxy_from_env()? {
            builder = builder.proxy(proxy);
        }
        let client = builder.build().map_err(|e| Error::Client(chain(&e)))?;
        Ok(Http { client })
    }

    /// Fetches and checks the discovery document of `issuer`.
    pub async fn discover(&self, issuer: &str) -> Result<Discovery, Error> {
        let url = discovery_url(issuer)?;
        let resp = self
            .send(self.client.get(url.clone()), url.as_str())
            .await?;
        let status = resp.status().as_u16();
        let body = read_limited(resp, url.as_str()).await?;
        if status != 200 {
            return Err(status_error(url.as_str(), status, &body));
        }
        let d: Discovery = parse_json(url.as_str(), &body)?;
        if d.issuer != issuer {
            return Err(Error::IssuerMismatch {
                url: url.to_string(),
                found: d.issuer,
                expected: issuer.to_owned(),
            });
        }
        for (what, endpoint) in [
            ("the authorization endpoint", &d.authorization_endpoint),
            ("the token endpoint", &d.token_endpoint),
            ("the userinfo endpoint", &d.userinfo_endpoint),
        ] {
            require_https(what, endpoint)?;
        }
        Ok(d)
    }

    /// Exchanges an authorization code (RFC 6749 §4.1.3, RFC 7636 §4.5).
    pub async fn exchange_code(
        &self,
        token_endpoint: &str,
        code: &str,
        redirect_uri: &str,
        verifier: &str,
    ) -> Result<TokenResponse, Error> {
        self.token(
            token_endpoint,
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", redirect_uri),
                ("client_id", CLIENT_ID),
                ("code_verifier", verifier),
            ],
        )
        .await
    }

    /// Uses a refresh token (RFC 6749 §6).
    pub async fn refresh(
        &self,
        token_endpoint: &str,
        refresh_token: &str,
    ) -> Result<TokenResponse, Error> {
        self.token(
            token_endpoint,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
                ("client_id", CLIENT_ID),
            ],
        )
        .await
    }

    async fn token(&self, endpoint: &str, form: &[(&str, &str)]) -> Result<TokenResponse, Error> {
        let url = require_https("the token endpoint", endpoint)?;
        let resp = self
            .send(self.client.post(url).form(form), endpoint)
            .await?;
        let status = resp.status().as_u16();
        let body = read_limited(resp, endpoint).await?;
        if status == 200 {
            return parse_json(endpoint, &body);
        }
        match serde_json::from_slice::<OAuthError>(&body) {
            // invalid_grant: the code or refresh token is expired, used or
            // revoked; only a new login helps.
            Ok(e) if e.error == "invalid_grant" => Err(Error::Rejected {
                url: endpoint.to_owned(),
                error: e.error,
                description: e.error_description.unwrap_or_default(),
            }),
            Ok(e) => Err(Error::OAuth {
                url: endpoint.to_owned(),
                error: e.error,
                description: e.error_description.unwrap_or_default(),
            }),
            Err(_) => Err(status_error(endpoint, status, &body)),
        }
    }

    /// Calls userinfo with the access token.
    pub async fn userinfo(&self, endpoint: &str, access_token: &str) -> Result<UserInfo, Error> {
        let url = require_https("the userinfo endpoint", endpoint)?;
        let resp = self
            .send(self.client.get(url).bearer_auth(access_token), endpoint)
            .await?;
        let status = resp.status().as_u16();
        let body = read_limited(resp, endpoint).await?;
        match status {
            200 => parse_json(endpoint, &body),
            // RFC 6750 §3.1: invalid_token comes back as 401.
            401 => {
                let e = serde_json::from_slice::<OAuthError>(&body).ok();
                Err(Error::Rejected {
                    url: endpoint.to_owned(),
                    error: e
                        .as_ref()
                        .map_or_else(|| "invalid_token".to_owned(), |e| e.error.clone()),
                    description: e.and_then(|e| e.error_description).unwrap_or_default(),
                })
            }
            _ => Err(status_error(endpoint, status, &body)),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder, url: &str) -> Result<Response, Error> {
        req.send().await.map_err(|e| Error::Http {
            url: url.to_owned(),
            detail: chain(&e),
        })
    }
}

/// The proxy from `HTTPS_PROXY` (or `https_proxy`), minus `NO_PROXY` hosts.
fn proxy_from_env() -> Result<Option<Proxy>, Error> {
    let Some(value) = ["HTTPS_PROXY", "https_proxy"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .find(|v| !v.is_empty())
    else {
        return Ok(None);
    };
    let proxy = Proxy::https(&value).map_err(|e| Error::Proxy {
        value: value.clone(),
        detail: chain(&e),
    })?;
    Ok(Some(proxy.no_proxy(reqwest::NoProxy::from_env())))
}

/// `<issuer>/.well-known/openid-configuration` (OIDC Discovery §4.1).
pub fn discovery_url(issuer: &str) -> Result<Url, Error> {
    require_https("the issuer", issuer)?;
    let joined = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    Url::parse(&joined).map_err(|e| Error::Url {
        url: joined,
        detail: e.to_string(),
    })
}

/// Parses `url` and refuses anything but https.
pub fn require_https(what: &'static str, url: &str) -> Result<Url, Error> {
    let parsed = Url::parse(url).map_err(|e| Error::Url {
        url: url.to_owned(),
        detail: e.to_string(),
    })?;
    if parsed.scheme() != "https" {
        return Err(Error::NotHttps {
            what,
            url: url.to_owned(),
        });
    }
    Ok(parsed)
}

async fn read_limited(mut resp: Response, url: &str) -> Result<Vec<u8>, Error> {
    if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(Error::TooLarge {
            url: url.to_owned(),
            limit: MAX_BODY,
        });
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| Error::Http {
        url: url.to_owned(),
        detail: chain(&e),
    })? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(Error::TooLarge {
                url: url.to_owned(),
                limit: MAX_BODY,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn parse_json<T: DeserializeOwned>(url: &str, body: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| Error::BadJson {
        url: url.to_owned(),
        detail: e.to_string(),
    })
}

fn status_error(url: &str, status: u16, body: &[u8]) -> Error {
    let text = String::from_utf8_lossy(body);
    Error::Status {
        url: url.to_owned(),
        status,
        body: text.chars().take(200).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_url_appends_well_known() {
        assert_eq!(
            discovery_url("https://auth.polydev.test").unwrap().as_str(),
            "https://auth.polydev.test/.well-known/openid-configuration"
        );
        assert_eq!(
            discovery_url("https://auth.polydev.test/tenant/")
                .unwrap()
                .as_str(),
            "https://auth.polydev.test/tenant/.well-known/openid-configuration"
        );
        assert!(matches!(
            discovery_url("http://auth.polydev.test"),
            Err(Error::NotHttps { .. })
        ));
    }
}
