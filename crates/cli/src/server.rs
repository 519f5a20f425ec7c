//! `polydev server`: the controller — its HTTP API and the driver that
//! advances records through a host agent (over `<data>/host.sock`, or in
//! process under `polydev up`). On first start it creates the `admin`
//! account and prints a one-time login link.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use polydev_controller::auth::{Auth, AuthConfig, JwtConfig};
use polydev_controller::driver::{Driver, HostApi, RemoteHost, LOCAL_HOST_ID};
use polydev_controller::http::{self, AppState, HttpConfig, RateLimits};
use tokio::sync::watch;

use crate::upstream::StoreArgs;

/// Options of the controller (`polydev server`, and `polydev up`).
#[derive(Args, Debug, Clone)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Address of the HTTP API (port 0: any free port; the chosen address
    /// is printed).
    #[arg(long, default_value = "127.0.0.1:8080", env = "POLYDEV_LISTEN")]
    pub listen: std::net::SocketAddr,
    /// Always mark the session cookie `Secure`. Without it, it is marked
    /// when a `--trusted-proxy` says the client used https
    /// (`X-Forwarded-Proto`, or `proto=` of `Forwarded`).
    #[arg(long)]
    pub secure_cookies: bool,
    /// Accept JWTs verified against this JWKS URL (with --jwt-issuer and
    /// --jwt-audience).
    #[arg(long, env = "POLYDEV_JWT_JWKS_URL", requires_all = ["jwt_issuer", "jwt_audience"])]
    pub jwt_jwks_url: Option<String>,
    /// Required `iss` of accepted JWTs.
    #[arg(long, env = "POLYDEV_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` of accepted JWTs.
    #[arg(long, env = "POLYDEV_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Do not run the driver (serve the API only: records are created but
    /// nothing advances them; for a second API replica or for tests).
    #[arg(long)]
    pub no_driver: bool,
    /// Rate limits off (benchmarks on loopback).
    #[arg(long, hide = true)]
    pub no_rate_limits: bool,
    /// Connect sessions one user may have in progress at once (on top of
    /// the driver's `max_active_sessions` for everyone).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..), env = "POLYDEV_MAX_SESSIONS_PER_USER")]
    pub max_sessions_per_user: u64,
    /// Session event streams (SSE) one user may have open at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..), env = "POLYDEV_MAX_EVENT_STREAMS_PER_USER")]
    pub max_event_streams_per_user: u64,
    /// Desktop and terminal WebSockets one user may have open at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..), env = "POLYDEV_MAX_WEBSOCKETS_PER_USER")]
    pub max_websockets_per_user: u64,
    /// A reverse proxy in front of the API, as an address or network
    /// (repeat, or comma-separate in the variable): only a request from one
    /// of these may name its client in the forwarding header.
    #[arg(
        long = "trusted-proxy",
        value_name = "CIDR",
        env = "POLYDEV_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<http::Cidr>,
    /// The header the trusted proxies append the client's address to:
    /// `x-forwarded-for` or `forwarded` (RFC 7239). Only this one is read.
    #[arg(
        long,
        default_value = "x-forwarded-for",
        env = "POLYDEV_CLIENT_IP_HEADER"
    )]
    pub client_ip_header: http::ForwardedHeader,
    /// Seconds between purges of expired login sessions, stream tickets,
    /// login links and login backoff records.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..), env = "POLYDEV_PURGE_INTERVAL_S")]
    pub purge_interval_s: u64,
    /// Prompt runs one user may have queued or running at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..), env = "POLYDEV_MAX_RUNS_PER_USER")]
    pub max_runs_per_user: u64,
    /// Days a finished prompt run and its output are kept.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..), env = "POLYDEV_RUN_RETENTION_DAYS")]
    pub run_retention_days: u64,
    /// Finished prompt runs kept per user (older ones are purged).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..), env = "POLYDEV_MAX_RUNS_KEPT_PER_USER")]
    pub max_runs_kept_per_user: u64,
}

/// Options of `polydev server`.
#[derive(Args, Debug)]
pub struct ServerArgs {
    #[command(flatten)]
    pub controller: ControllerArgs,
    /// The host agent's socket (default: `host.sock` in the data directory).
    #[arg(long)]
    pub host_socket: Option<PathBuf>,
}

/// A watch channel that turns true on SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        let _ = tx.send(true);
    });
    rx
}

/// Run the controller until `shutdown`: bind, print the address (and the
/// first-start login link), serve, drive. Returns when in-flight requests
/// are done.
pub async fn run_controller(
    data_dir: &Path,
    a: &ControllerArgs,
    host: Arc<dyn HostApi>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let store = a.store.open(data_dir).await?;
    let jwt = match (&a.jwt_jwks_url, &a.jwt_issuer, &a.jwt_audience) {
        (Some(u), Some(i), Some(aud)) => Some(JwtConfig {
            jwks_url: u.clone(),
            issuer: i.clone(),
            audience: aud.clone(),
        }),
        _ => None,
    };
    let auth = Auth::new(
        store.clone(),
        AuthConfig {
            jwt,
            ..AuthConfig::default()
        },
    )?;
    let driver = if a.no_driver {
        None
    } else {
        Some(Driver::from_data_dir(store.clone(), host, data_dir)?)
    };
    let cfg = HttpConfig {
        secure_cookies: a.secure_cookies,
        rate: if a.no_rate_limits {
            RateLimits::unlimited()
        } else {
            RateLimits::default()
        },
        max_sessions_per_user: usize::try_from(a.max_sessions_per_user).unwrap_or(usize::MAX),
        max_event_streams_per_user: usize::try_from(a.max_event_streams_per_user)
            .unwrap_or(usize::MAX),
        max_websockets_per_user: usize::try_from(a.max_websockets_per_user).unwrap_or(usize::MAX),
        purge_interval: std::time::Duration::from_secs(a.purge_interval_s),
        max_runs_per_user: usize::try_from(a.max_runs_per_user).unwrap_or(usize::MAX),
        run_retention: std::time::Duration::from_secs(a.run_retention_days.saturating_mul(86_400)),
        max_runs_kept_per_user: usize::try_from(a.max_runs_kept_per_user).unwrap_or(usize::MAX),
        proxies: http::ProxyConfig {
            trusted: a.trusted_proxies.clone(),
            header: a.client_ip_header,
        },
        ..HttpConfig::default()
    };
    let state = AppState::new(auth.clone(), driver.clone(), cfg, shutdown.clone())?;
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {} for the API", a.listen))?;
    let addr = listener.local_addr()?;
    eprintln!(
        "controller API on http://{addr}/api/v1, dashboard on http://{addr}/ (database: {})",
        store.dialect().name()
    );
    if let Some(link) = auth.bootstrap_admin().await? {
        // The one place the link is shown; it is never logged.
        eprintln!(
            "first start: created the admin account {:?}. Open this link in a browser once, within 24 hours, and set a password there:\n  http://{addr}/#/link/{}\n(without a browser: POST {{\"token\": …}} to /api/v1/auth/link, then PUT /api/v1/me/password)",
            link.user_name, link.token
        );
    }
    let driver_task = driver.map(|d| {
        let rx = shutdown.clone();
        tokio::spawn(async move { d.run(rx).await })
    });
    http::serve(listener, state)
        .await
        .context("serving the API")?;
    if let Some(t) = driver_task {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e).context("the driver stopped"),
            Err(e) => anyhow::bail!("the driver task failed: {e}"),
        }
    }
    store.close().await;
    Ok(())
}

/// `polydev server`.
pub async fn run(data_dir: PathBuf, a: ServerArgs) -> anyhow::Result<i32> {
    let socket = a
        .host_socket
        .clone()
        .unwrap_or_else(|| data_dir.join("host.sock"));
    let host: Arc<dyn HostApi> = Arc::new(RemoteHost::new(LOCAL_HOST_ID, &socket));
    let shutdown = shutdown_on_signals();
    run_controller(&data_dir, &a.controller, host, shutdown).await?;
    eprintln!("controller stopped");
    Ok(0)
}
