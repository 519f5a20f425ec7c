//! The authorization request URL and the redirect that answers it.

use reqwest::Url;

use crate::{Error, CLIENT_ID, SCOPES};

/// What one login sends in its authorization request.
#[derive(Debug, Clone)]
pub struct AuthorizeRequest<'a> {
    /// The provider's `authorization_endpoint`.
    pub endpoint: &'a str,
    /// `http://127.0.0.1:<port>/callback`.
    pub redirect_uri: &'a str,
    /// Binds the redirect to this login (CSRF).
    pub state: &'a str,
    /// Binds the ID token to this login (replay).
    pub nonce: &'a str,
    /// The PKCE S256 challenge.
    pub code_challenge: &'a str,
}

impl AuthorizeRequest<'_> {
    /// The URL the browser opens. `prompt=consent` is what makes an OpenID
    /// provider honour `offline_access` (OIDC Core §11), hence a refresh token.
    pub fn url(&self) -> Result<Url, Error> {
        let mut url = Url::parse(self.endpoint).map_err(|e| Error::Url {
            url: self.endpoint.to_owned(),
            detail: e.to_string(),
        })?;
        if url.scheme() != "https" {
            return Err(Error::NotHttps {
                what: "the authorization endpoint",
                url: self.endpoint.to_owned(),
            });
        }
        url.query_pairs_mut()
            .append_pair("client_id", CLIENT_ID)
            .append_pair("response_type", "code")
            .append_pair("redirect_uri", self.redirect_uri)
            .append_pair("scope", SCOPES)
            .append_pair("state", self.state)
            .append_pair("nonce", self.nonce)
            .append_pair("code_challenge", self.code_challenge)
            .append_pair("code_challenge_method", "S256")
            .append_pair("prompt", "consent");
        Ok(url)
    }
}

/// The query of a request to the loopback listener.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Callback {
    /// The authorization code, on success.
    pub code: Option<String>,
    /// The `state` sent back.
    pub state: Option<String>,
    /// The OAuth error code, on failure.
    pub error: Option<String>,
    /// The server's description of the error.
    pub error_description: Option<String>,
    /// The issuer (RFC 9207), when the server sends it.
    pub iss: Option<String>,
}

/// Parses a request target such as `/callback?code=...&state=...`. `None`
/// when the path is not `/callback` (a favicon or a stray request).
pub fn parse_callback(target: &str) -> Option<Callback> {
    // The target is origin-form; a fixed base makes it a URL to parse.
    let url = Url::parse("http://127.0.0.1").ok()?.join(target).ok()?;
    // `//host/callback` would join as another authority: not origin-form.
    if url.path() != "/callback" || !target.starts_with('/') || url.host_str() != Some("127.0.0.1")
    {
        return None;
    }
    let mut cb = Callback::default();
    for (k, v) in url.query_pairs() {
        let slot = match k.as_ref() {
            "code" => &mut cb.code,
            "state" => &mut cb.state,
            "error" => &mut cb.error,
            "error_description" => &mut cb.error_description,
            "iss" => &mut cb.iss,
            _ => continue,
        };
        // A repeated parameter is ambiguous; keep the first, as servers do.
        if slot.is_none() {
            *slot = Some(v.into_owned());
        }
    }
    Some(cb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn authorize_url_has_every_parameter_encoded() {
        let url = AuthorizeRequest {
            endpoint: "https://auth.polydev.test/auth",
            redirect_uri: "http://127.0.0.1:4711/callback",
            state: "st&te",
            nonce: "n0nce",
            code_challenge: "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        }
        .url()
        .unwrap();
        assert_eq!(url.host_str(), Some("auth.polydev.test"));
        assert_eq!(url.path(), "/auth");
        let q: HashMap<String, String> = url.query_pairs().into_owned().collect();
        assert_eq!(q["client_id"], "polydev-testcli");
        assert_eq!(q["response_type"], "code");
        assert_eq!(q["redirect_uri"], "http://127.0.0.1:4711/callback");
        assert_eq!(q["scope"], "openid profile offline_access");
        assert_eq!(q["state"], "st&te");
        assert_eq!(q["nonce"], "n0nce");
        assert_eq!(
            q["code_challenge"],
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        assert_eq!(q["code_challenge_method"], "S256");
        assert_eq!(q["prompt"], "consent");
        assert_eq!(q.len(), 9);
        assert!(url.as_str().contains("state=st%26te"));
    }

    #[test]
    fn authorize_url_refuses_plain_http() {
        let err = AuthorizeRequest {
            endpoint: "http://auth.polydev.test/auth",
            redirect_uri: "http://127.0.0.1:1/callback",
            state: "s",
            nonce: "n",
            code_challenge: "c",
        }
        .url()
        .unwrap_err();
        assert!(matches!(err, Error::NotHttps { .. }), "{err}");
    }

    #[test]
    fn callback_with_code_and_state() {
        let cb =
            parse_callback("/callback?code=abc%2Fd&state=xyz&iss=https%3A%2F%2Fauth.polydev.test")
                .unwrap();
        assert_eq!(cb.code.as_deref(), Some("abc/d"));
        assert_eq!(cb.state.as_deref(), Some("xyz"));
        assert_eq!(cb.iss.as_deref(), Some("https://auth.polydev.test"));
        assert_eq!(cb.error, None);
    }

    #[test]
    fn callback_with_error() {
        let cb = parse_callback(
            "/callback?error=access_denied&error_description=The+user+denied+access&state=s",
        )
        .unwrap();
        assert_eq!(cb.error.as_deref(), Some("access_denied"));
        assert_eq!(
            cb.error_description.as_deref(),
            Some("The user denied access")
        );
        assert_eq!(cb.code, None);
    }

    #[test]
    fn other_paths_are_not_callbacks() {
        assert_eq!(parse_callback("/favicon.ico"), None);
        assert_eq!(parse_callback("/callback/x?code=1"), None);
        assert_eq!(parse_callback("http://evil.test/callback?code=1"), None);
        assert_eq!(parse_callback("//evil.test/callback?code=1"), None);
        assert_eq!(parse_callback("/callback"), Some(Callback::default()));
    }

    #[test]
    fn first_of_repeated_parameters_wins() {
        let cb = parse_callback("/callback?state=a&state=b").unwrap();
        assert_eq!(cb.state.as_deref(), Some("a"));
    }
}
