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
}

pub async fn run(data_dir: PathBuf, a: ControllerRunArgs) -> anyhow::Result<i32> {
    let store = a.store.open(&data_dir).await?;
    let socket = a
        .host_socket
        .clone()
        .unwrap_or_else(|| data_dir.join("host.sock"));
    let host = Arc::new(RemoteHost::new(LOCAL_HOST_ID, &socket));
    let driver = Driver::from_data_dir(store, host, &data_dir)?;
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
