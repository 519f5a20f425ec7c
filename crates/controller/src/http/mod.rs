//! The controller's HTTP API (axum): versioned REST + JSON under `/api/v1`,
//! plus `/healthz`, `/readyz` and `/metrics`, and the dashboard at `/`
//! ([`web`]).
//!
//! A request passes, outermost first: the request id ([`layers::request_id`]:
//! taken from a well-formed `X-Request-Id` or generated, echoed, and put on
//! every problem body),
//! the client's address ([`layers::client_addr`]: the TCP peer, or what a
//! trusted reverse proxy says, see [`client_addr`]), the access log and
//! counters ([`layers::observe`]), authentication and rate limits
//! ([`layers::authenticate`]: the principal or the reason there is none
//! goes into the request; buckets per credential, per user and per client
//! address), the body limit, then the route. Handlers take the principal with the [`Caller`] extractor, check
//! the scope, and look records up *by owner* — another user's record is
//! answered exactly like a missing one (404). Every rejection, axum's own
//! included, is an RFC 7807 problem ([`error`]).
//!
//! Per-user quotas: active connect sessions ([`HttpConfig::max_sessions_per_user`],
//! counted by the store in the creating transaction), open event streams
//! and WebSockets ([`limits::StreamSlots`]). [`serve`] also purges expired
//! login sessions, stream tickets, login links and login backoff records
//! every [`HttpConfig::purge_interval`].
//!
//! The OpenAPI document is derived from the handlers' annotations
//! ([`openapi`]), served at `/api/v1/openapi.json`, and checked in as
//! `docs/openapi.json` (a test compares them).

pub mod client_addr;
pub mod error;
pub mod layers;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod openapi;
mod routes;
pub mod web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::Router;
use tokio::sync::watch;

use crate::auth::{Auth, AuthError, Principal};
use crate::driver::Driver;
use crate::providers::Providers;
use crate::store::Store;
use crate::upstream::UpstreamConfig;
pub use client_addr::{Cidr, ForwardedHeader, ProxyConfig};
pub use error::{ApiError, ApiJson, ApiPath, ApiQuery};
pub use limits::{Rate, RateLimits, StreamClass};

/// Settings of the HTTP API.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Largest request body accepted (bytes).
    pub body_limit: usize,
    /// Rate limits.
    pub rate: RateLimits,
    /// Mark the session cookie `Secure` (served behind HTTPS).
    pub secure_cookies: bool,
    /// How often a session event stream looks for new events.
    pub sse_poll: Duration,
    /// Connect sessions one user may have that are not final (on top of
    /// the driver's global admission limit, so one user cannot fill it).
    pub max_sessions_per_user: usize,
    /// Event streams (SSE) one user may have open at once.
    pub max_event_streams_per_user: usize,
    /// Desktop and terminal WebSockets one user may have open at once.
    pub max_websockets_per_user: usize,
    /// How often expired login sessions, stream tickets, login links and
    /// login backoff records are deleted.
    pub purge_interval: Duration,
    /// Reverse proxies whose forwarding header names the client.
    pub proxies: ProxyConfig,
    /// Prompt runs one user may have queued or running at once.
    pub max_runs_per_user: usize,
    /// Finished prompt runs (with their events) are deleted this long
    /// after they finished, by the periodic purge.
    pub run_retention: Duration,
    /// Finished prompt runs kept per user; older ones are purged.
    pub max_runs_kept_per_user: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            body_limit: 64 * 1024,
            rate: RateLimits::default(),
            secure_cookies: false,
            sse_poll: Duration::from_millis(250),
            max_sessions_per_user: 1,
            // A dashboard tab follows one session; a few tabs and a CLI.
            max_event_streams_per_user: 8,
            // A desktop and a terminal, in a few tabs.
            max_websockets_per_user: 8,
            purge_interval: Duration::from_secs(600),
            proxies: ProxyConfig::default(),
            // Each run is a CLI process in the user's one small VM.
            max_runs_per_user: 2,
            run_retention: Duration::from_secs(30 * 24 * 3600),
            max_runs_kept_per_user: 200,
        }
    }
}

impl HttpConfig {
    /// Quotas high enough to never bind (benchmarks, and tests that are
    /// not about quotas), with the rate limits off.
    pub fn unlimited() -> Self {
        HttpConfig {
            rate: RateLimits::unlimited(),
            max_sessions_per_user: usize::MAX,
            max_event_streams_per_user: usize::MAX,
            max_websockets_per_user: usize::MAX,
            max_runs_per_user: usize::MAX,
            ..HttpConfig::default()
        }
    }
}

/// Everything a handler may use; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<AppInner>,
}

/// The shared parts of [`AppState`].
pub struct AppInner {
    /// Authentication and accounts.
    pub auth: Auth,
    /// The store.
    pub store: Store,
    /// Provider definitions in force.
    pub providers: Providers,
    /// Upstream proxy providers in force.
    pub upstreams: UpstreamConfig,
    /// The driver to wake when a record changes (absent: nobody drives).
    pub driver: Option<Driver>,
    /// The host agent desktop streams go through (the driver's).
    pub host: Option<std::sync::Arc<dyn crate::driver::HostApi>>,
    /// Settings.
    pub cfg: HttpConfig,
    /// Rate-limit buckets.
    pub limiter: limits::Limiter,
    /// Open streams per user.
    pub streams: limits::StreamSlots,
    /// Request counters.
    pub metrics: metrics::HttpMetrics,
    /// Becomes true when the server shuts down (ends event streams).
    pub shutdown: watch::Receiver<bool>,
}

impl std::ops::Deref for AppState {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.inner
    }
}

impl AppState {
    /// The state of an API over `auth`'s store. `driver`, when given, is
    /// woken after every change and supplies the providers and upstreams;
    /// without it the built-in providers and no upstreams are used.
    pub fn new(
        auth: Auth,
        driver: Option<Driver>,
        cfg: HttpConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, crate::providers::ProviderError> {
        let (providers, upstreams) = match &driver {
            Some(d) => (d.providers().clone(), d.upstreams().clone()),
            None => (Providers::builtin()?, UpstreamConfig::none()),
        };
        Ok(AppState {
            inner: Arc::new(AppInner {
                store: auth.store().clone(),
                auth,
                providers,
                upstreams,
                host: driver.as_ref().map(Driver::host),
                driver,
                cfg,
                limiter: limits::Limiter::default(),
                streams: limits::StreamSlots::default(),
                metrics: metrics::HttpMetrics::default(),
                shutdown,
            }),
        })
    }

    /// Hold one of `user`'s `class` stream slots for as long as the stream
    /// is open; a 429 problem when they are all taken.
    pub fn open_stream(
        &self,
        user: &str,
        class: StreamClass,
    ) -> Result<limits::StreamSlot, ApiError> {
        let max = match class {
            StreamClass::EventStream => self.cfg.max_event_streams_per_user,
            StreamClass::WebSocket => self.cfg.max_websockets_per_user,
        };
        self.streams.try_open(user, class, max).map_err(|open| {
            self.metrics.rate_limited(match class {
                StreamClass::EventStream => "event_streams",
                StreamClass::WebSocket => "websockets",
            });
            ApiError::new(
                429,
                "too-many-streams",
                "Too many open streams",
                format!(
                    "you have {open} {} open, the most one user may have at once: close one (another tab or window) and retry",
                    class.noun()
                ),
            )
        })
    }

    /// Wake the driver (a record changed).
    pub fn notify(&self) {
        if let Some(d) = &self.driver {
            d.notify();
        }
    }
}

/// What authentication said about a request (put there by
/// [`layers::authenticate`]).
#[derive(Clone)]
pub(crate) struct Authn(pub Result<Principal, Arc<AuthError>>);

/// The authenticated caller; rejects with 401 (or 503 when the identity
/// provider's keys cannot be fetched) before the handler runs.
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, ApiError> {
        match parts.extensions.get::<Authn>() {
            Some(Authn(Ok(p))) => Ok(Caller(p.clone())),
            Some(Authn(Err(e))) => Err(match &**e {
                AuthError::Jwks(m) => AuthError::Jwks(m.clone()).into(),
                AuthError::Store(_) | AuthError::Internal(_) => ApiError::internal(e),
                _ => AuthError::Unauthenticated.into(),
            }),
            None => Err(AuthError::Unauthenticated.into()),
        }
    }
}

/// The application: every route with its layers, and the OpenAPI document.
pub fn app(state: AppState) -> Router {
    let (api, _) = openapi::router_and_document();
    layers::wrap(api.merge(web::routes()), state)
}

/// Serve `state` on `listener` until `shutdown` becomes true, then stop
/// accepting and finish the requests in flight (event streams end at
/// shutdown, so they do not hold it up).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
) -> Result<(), std::io::Error> {
    let mut shutdown = state.shutdown.clone();
    tokio::spawn(purge_expired(state.clone()));
    let app = app(state);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = shutdown.wait_for(|s| *s).await;
    })
    .await
}

/// Delete expired login sessions, stream tickets, login links, login
/// backoff records and finished prompt runs past their retention
/// ([`HttpConfig::run_retention`], [`HttpConfig::max_runs_kept_per_user`])
/// every `purge_interval` until shutdown (the checks never
/// depend on it: this only keeps the tables from growing).
async fn purge_expired(st: AppState) {
    let mut shutdown = st.shutdown.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(st.cfg.purge_interval) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        match st.auth.purge_expired().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(rows = n, "purged expired logins, tickets and links"),
            Err(e) => {
                tracing::warn!(error = %e, "purging expired logins, tickets and links failed; retrying at the next interval")
            }
        }
        let keep = i64::try_from(st.cfg.max_runs_kept_per_user).unwrap_or(i64::MAX);
        let age = i64::try_from(st.cfg.run_retention.as_millis()).unwrap_or(i64::MAX);
        match st
            .store
            .purge_runs(crate::util::now_ms().saturating_sub(age), keep)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::debug!(runs = n, "purged finished prompt runs past retention"),
            Err(e) => {
                tracing::warn!(error = %e, "purging finished prompt runs failed; retrying at the next interval")
            }
        }
    }
}
