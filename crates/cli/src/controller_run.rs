//! `polydev controller-run` (hidden): the controller's driver alone, against
//! the host agent on `<data>/host.sock` — what the SIGKILL test kills and
//! restarts. `polydev server` runs the same driver next to the HTTP API.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use polydev_controller::driver::{Driver, RemoteHost, LOCAL_HOST_ID};

use crate::upstream::StoreArgs;

/// Options of `polydev controller-run`.
#[derive(Args, Debug)]
pub struct ControllerRunArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The host agent's socket (default: `host.sock` in the data directory).
    #[arg(long)]
    host_socket: Option<PathBuf>,
    /// Serve Prometheus metrics (`GET /metrics`: sessions and VMs by state,
    /// upstream ports and exhaustion) on this address, e.g. 127.0.0.1:9464.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
}

/// Serve `GET /metrics` on `listener` until the process ends.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    store: polydev_controller::store::Store,
    upstreams: polydev_controller::upstream::UpstreamConfig,
) -> anyhow::Result<()> {
    use axum::http::{header, StatusCode};
    let state = Arc::new((store, upstreams));
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(
                |axum::extract::State(s): axum::extract::State<
                    Arc<(
                        polydev_controller::store::Store,
                        polydev_controller::upstream::UpstreamConfig,
                    )>,
                >| async move {
                    match polydev_controller::metrics::render(&s.0, &s.1).await {
                        Ok(text) => (
                            StatusCode::OK,
                            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                            text,
                        ),
                        Err(e) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                            e.to_string(),
                        ),
                    }
                },
            ),
        )
        .with_state(state);
    axum::serve(listener, app).await?;
    Ok(())
}

pub async fn run(data_dir: PathBuf, a: ControllerRunArgs) -> anyhow::Result<i32> {
    let store = a.store.open(&data_dir).await?;
    let socket = a
        .host_socket
        .clone()
        .unwrap_or_else(|| data_dir.join("host.sock"));
    let host = Arc::new(RemoteHost::new(LOCAL_HOST_ID, &socket));
    let driver = Driver::from_data_dir(store.clone(), host, &data_dir)?;
    if let Some(addr) = a.metrics_listen {
        // Bound here, so a taken or bad address stops the command at once.
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for metrics: {e}"))?;
        eprintln!("metrics on http://{}/metrics", listener.local_addr()?);
        let upstreams = driver.upstreams().clone();
        tokio::spawn(async move {
            if let Err(e) = serve_metrics(listener, store, upstreams).await {
                eprintln!("polydev: {e:#}");
            }
        });
    }
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        let _ = tx.send(true);
    });
    eprintln!(
        "controller driver running on {} (host agent {})",
        data_dir.display(),
        socket.display()
    );
    driver.run(rx).await?;
    Ok(0)
}
