//! A running HTTP API on a loopback port, for the test files that are not
//! `http.rs` (which has its own, richer harness).

use polydev_controller::auth::{Auth, AuthConfig};
use polydev_controller::http::{self, AppState, HttpConfig};
use polydev_controller::store::Store;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::sync::watch;

use super::TestDb;

/// The API, its state (to look at quotas from the inside) and a client.
pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
    pub auth: Auth,
    pub store: Store,
    pub state: AppState,
    pub stop: watch::Sender<bool>,
}

impl Api {
    pub async fn start(db: &TestDb, cfg: HttpConfig, auth_cfg: AuthConfig) -> Api {
        let auth = Auth::new(db.store.clone(), auth_cfg).unwrap();
        let (stop, rx) = watch::channel(false);
        let state = AppState::new(auth.clone(), None, cfg, rx).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(http::serve(listener, state.clone()));
        Api {
            base,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
            auth,
            store: db.store.clone(),
            state,
            stop,
        }
    }

    /// `method path` with a bearer token (or none), extra headers and a
    /// JSON body: status, headers, body (JSON, or the text as a string).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        call(&self.client, &self.base, method, path, token, headers, body).await
    }
}

/// [`Api::call`] without the `Api` (for spawned tasks).
pub async fn call(
    client: &reqwest::Client,
    base: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut rb = client.request(method, format!("{base}{path}"));
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    if let Some(b) = body {
        rb = rb
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&b).unwrap());
    }
    let r = rb.send().await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let bytes = r.bytes().await.unwrap();
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    (status, headers, v)
}

/// The `name=value` of the cookie an answer sets (what a browser sends back).
pub fn set_cookie(h: &reqwest::header::HeaderMap) -> Option<String> {
    h.get("set-cookie")?
        .to_str()
        .ok()?
        .split(';')
        .next()
        .map(str::to_string)
}

/// A problem answer with `status` and type slug `slug`.
pub fn assert_problem(
    got: (StatusCode, &reqwest::header::HeaderMap, &Value),
    status: u16,
    slug: &str,
    ctx: &str,
) {
    let (st, h, v) = got;
    assert_eq!(st.as_u16(), status, "{ctx}: {v}");
    assert_eq!(
        h.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json"),
        "{ctx}"
    );
    assert_eq!(
        v["type"].as_str().unwrap_or(""),
        format!("https://polydev.dev/problems/{slug}"),
        "{ctx}: {v}"
    );
}

/// Wait until `check` holds, polling every 50 ms, for at most `secs`.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {secs} s: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
