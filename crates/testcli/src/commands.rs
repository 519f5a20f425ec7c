//! The subcommands.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use crate::authorize::AuthorizeRequest;
use crate::http::{Http, TokenResponse};
use crate::pkce::{challenge_s256, new_verifier, random_token};
use crate::redirect::RedirectListener;
use crate::store::{self, Credentials};
use crate::{Error, CLIENT_ID};

/// Options of `login`.
#[derive(Debug, Clone)]
pub struct LoginOptions {
    /// The OpenID provider.
    pub issuer: String,
    /// The loopback port (0 = any free one).
    pub port: u16,
    /// How long to wait for the browser.
    pub timeout: Duration,
}

fn say(line: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(Error::Stdout)
}

fn now() -> u64 {
    // A clock before 1970 is broken; 0 only makes the token look expired.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `login`: the browser flow; writes `~/.testcli/auth.json`.
pub async fn login(opts: &LoginOptions) -> Result<(), Error> {
    let path = store::default_path()?;
    let http = Http::from_env()?;
    let discovery = http.discover(&opts.issuer).await?;
    let listener = RedirectListener::bind(opts.port).await?;
    let redirect_uri = listener.redirect_uri();

    let verifier = new_verifier()?;
    let state = random_token(16)?;
    let nonce = random_token(16)?;
    let url = AuthorizeRequest {
        endpoint: &discovery.authorization_endpoint,
        redirect_uri: &redirect_uri,
        state: &state,
        nonce: &nonce,
        code_challenge: &challenge_s256(&verifier),
    }
    .url()?;

    say(&format!("Open this URL to sign in: {url}"))?;
    open_browser(url.as_str());

    let arrival = listener.wait(opts.timeout).await?;
    let cb = arrival.callback.clone();
    // The state check comes first: an error redirect with a foreign state
    // is not this login's error.
    if cb.state.as_deref() != Some(state.as_str()) {
        arrival
            .respond(
                false,
                "This sign-in does not match the one the CLI started.",
            )
            .await;
        return Err(Error::StateMismatch);
    }
    // RFC 9207: an `iss` naming another issuer is a mix-up attack.
    if let Some(iss) = cb.iss.as_deref().filter(|iss| *iss != opts.issuer) {
        arrival
            .respond(false, "The sign-in came from another issuer.")
            .await;
        return Err(Error::IssuerMismatch {
            url: redirect_uri,
            found: iss.to_owned(),
            expected: opts.issuer.clone(),
        });
    }
    if let Some(error) = cb.error {
        let description = cb.error_description.unwrap_or_default();
        arrival
            .respond(false, &format!("{error}: {description}"))
            .await;
        return Err(Error::Authorization { error, description });
    }
    let Some(code) = cb.code else {
        arrival
            .respond(false, "The redirect carries no code.")
            .await;
        return Err(Error::NoCode);
    };

    let result = async {
        let tokens = http
            .exchange_code(&discovery.token_endpoint, &code, &redirect_uri, &verifier)
            .await?;
        let id_token = tokens
            .id_token
            .clone()
            .ok_or(Error::MissingToken("id_token"))?;
        check_id_token(&id_token, &opts.issuer, &nonce)?;
        let refresh_token = tokens
            .refresh_token
            .clone()
            .ok_or(Error::MissingToken("refresh_token"))?;
        let creds = credentials(&opts.issuer, tokens, refresh_token, id_token);
        store::save(&path, &creds)
    }
    .await;
    // The browser learns the outcome only once the tokens are stored.
    match &result {
        Ok(()) => {
            arrival
                .respond(true, "Signed in, you can close this window.")
                .await
        }
        Err(e) => arrival.respond(false, &e.to_string()).await,
    }
    result?;
    say("signed in")
}

fn credentials(
    issuer: &str,
    tokens: TokenResponse,
    refresh_token: String,
    id_token: String,
) -> Credentials {
    Credentials {
        issuer: issuer.to_owned(),
        client_id: CLIENT_ID.to_owned(),
        access_token: tokens.access_token,
        refresh_token,
        id_token,
        token_type: tokens.token_type,
        expires_at: now().saturating_add(tokens.expires_in.unwrap_or(0)),
    }
}

/// Checks the ID token's `iss`, `aud` and `nonce`. Its signature is not
/// checked: it came straight from the token endpoint over verified TLS,
/// which OIDC Core §3.1.3.7 accepts in place of the signature.
pub fn check_id_token(id_token: &str, issuer: &str, nonce: &str) -> Result<(), Error> {
    let payload = id_token
        .split('.')
        .nth(1)
        .ok_or_else(|| Error::IdToken("is not a JWT".into()))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|e| Error::IdToken(format!("payload is not base64url: {e}")))?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::IdToken(format!("payload is not JSON: {e}")))?;
    if claims["iss"] != issuer {
        return Err(Error::IdToken(format!("names issuer {}", claims["iss"])));
    }
    let aud_ok = match &claims["aud"] {
        serde_json::Value::String(a) => a == CLIENT_ID,
        serde_json::Value::Array(a) => a.iter().any(|v| v == CLIENT_ID),
        _ => false,
    };
    if !aud_ok {
        return Err(Error::IdToken(format!("is for audience {}", claims["aud"])));
    }
    if claims["nonce"] != nonce {
        return Err(Error::IdToken("nonce does not match this login".into()));
    }
    Ok(())
}

/// Hands the URL to `$BROWSER` (its first `:`-separated entry) or
/// `xdg-open`. Not waited for: a browser may run for as long as it likes,
/// and failing to start one is only a warning since the URL was printed.
fn open_browser(url: &str) {
    let browser = std::env::var("BROWSER").ok();
    let program = browser
        .as_deref()
        .and_then(|b| b.split(':').find(|p| !p.is_empty()))
        .unwrap_or("xdg-open");
    match Command::new(program)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
    {
        Ok(mut child) => {
            // Reaped in the background so it never lingers as a zombie.
            std::thread::spawn(move || child.wait());
        }
        Err(e) => {
            eprintln!("warning: cannot start {program} to open the URL ({e}); open it by hand")
        }
    }
}

/// `whoami`: prints who the stored access token belongs to.
pub async fn whoami() -> Result<(), Error> {
    let creds = store::load(&store::default_path()?)?;
    let http = Http::from_env()?;
    let discovery = http.discover(&creds.issuer).await?;
    let info = http
        .userinfo(&discovery.userinfo_endpoint, &creds.access_token)
        .await?;
    let name = info
        .preferred_username
        .as_deref()
        .or(info.name.as_deref())
        .unwrap_or(&info.sub);
    say(&format!("signed in as {name} (sub {})", info.sub))
}

/// `refresh`: trades the refresh token for new tokens and stores them. On
/// refusal the file is left as it was.
pub async fn refresh() -> Result<(), Error> {
    let path = store::default_path()?;
    let creds = store::load(&path)?;
    let http = Http::from_env()?;
    let discovery = http.discover(&creds.issuer).await?;
    let tokens = http
        .refresh(&discovery.token_endpoint, &creds.refresh_token)
        .await?;
    // Without rotation the old refresh and ID tokens stay valid (RFC 6749 §6).
    let refresh_token = tokens
        .refresh_token
        .clone()
        .unwrap_or_else(|| creds.refresh_token.clone());
    let id_token = tokens
        .id_token
        .clone()
        .unwrap_or_else(|| creds.id_token.clone());
    store::save(
        &path,
        &credentials(&creds.issuer, tokens, refresh_token, id_token),
    )?;
    say("refreshed")
}

/// `prompt TEXT`: a canned answer streamed as JSON lines, as coding CLIs do
/// in their non-interactive modes. Needs credentials, no network. A prompt
/// `/slow N` answers like a model that takes its time: one `delta` a
/// second for N seconds (at most an hour), so tests can follow, cancel or
/// interrupt a run that is still going.
pub fn prompt(text: &str) -> Result<(), Error> {
    store::load(&store::default_path()?)?;
    if let Some(n) = slow_seconds(text) {
        say(&serde_json::json!({"type": "start", "prompt": text}).to_string())?;
        for i in 0..n {
            std::thread::sleep(std::time::Duration::from_secs(1));
            say(&serde_json::json!({"type": "delta", "text": format!("tick {i}. ")}).to_string())?;
        }
        return say(&serde_json::json!({"type": "result", "text": "done", "exit": 0}).to_string());
    }
    for line in prompt_lines(text) {
        say(&line)?;
    }
    Ok(())
}

/// The N of a `/slow N` prompt (1-3600).
pub fn slow_seconds(text: &str) -> Option<u64> {
    let n: u64 = text.strip_prefix("/slow ")?.trim().parse().ok()?;
    (1..=3600).contains(&n).then_some(n)
}

/// The JSON lines `prompt` prints.
pub fn prompt_lines(text: &str) -> Vec<String> {
    let parts = ["Thinking about it. ", "Here is the answer: ", "42."];
    let mut lines = vec![serde_json::json!({"type": "start", "prompt": text}).to_string()];
    lines.extend(
        parts
            .iter()
            .map(|p| serde_json::json!({"type": "delta", "text": p}).to_string()),
    );
    lines
        .push(serde_json::json!({"type": "result", "text": parts.concat(), "exit": 0}).to_string());
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: serde_json::Value) -> String {
        format!(
            "e30.{}.sig",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap())
        )
    }

    #[test]
    fn id_token_checks() {
        let iss = "https://auth.polydev.test";
        let good = jwt(serde_json::json!({"iss": iss, "aud": CLIENT_ID, "nonce": "n"}));
        check_id_token(&good, iss, "n").unwrap();
        assert!(check_id_token(&good, iss, "other").is_err());
        assert!(check_id_token(&good, "https://evil.test", "n").is_err());
        let wrong_aud = jwt(serde_json::json!({"iss": iss, "aud": ["x"], "nonce": "n"}));
        assert!(check_id_token(&wrong_aud, iss, "n").is_err());
        assert!(check_id_token("garbage", iss, "n").is_err());
    }

    #[test]
    fn slow_prompts_are_recognised() {
        assert_eq!(slow_seconds("/slow 5"), Some(5));
        assert_eq!(slow_seconds("/slow 0"), None);
        assert_eq!(slow_seconds("/slow 9999"), None);
        assert_eq!(slow_seconds("slow 5"), None);
    }

    #[test]
    fn prompt_lines_are_a_json_stream() {
        let lines = prompt_lines("say \"hi\"");
        let values: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(values[0]["type"], "start");
        assert_eq!(values[0]["prompt"], "say \"hi\"");
        assert!(values[1..values.len() - 1]
            .iter()
            .all(|v| v["type"] == "delta"));
        let last = &values[values.len() - 1];
        assert_eq!(last["type"], "result");
        assert_eq!(last["exit"], 0);
        let joined: String = values[1..values.len() - 1]
            .iter()
            .map(|v| v["text"].as_str().unwrap())
            .collect();
        assert_eq!(last["text"], joined);
    }
}
