//! `polydev upstream …`: view and manage users' upstream proxy ports
//! directly on the store (the operator's tool; works with the controller
//! running or not — every change is a transaction with its event).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use polydev_controller::store::{Assignment, Store};
use polydev_controller::upstream::UpstreamConfig;

/// Where the store and the upstream config are.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// Database URL (`sqlite://…` or `postgres://…`); default: the SQLite
    /// file `controller.db` in the data directory.
    #[arg(long, env = "POLYDEV_DATABASE")]
    pub database: Option<String>,
}

impl StoreArgs {
    /// Open the store.
    pub async fn open(&self, data_dir: &Path) -> anyhow::Result<Store> {
        let store = match &self.database {
            Some(url) => Store::open(url).await?,
            None => {
                std::fs::create_dir_all(data_dir).with_context(|| {
                    format!("cannot create data directory {}", data_dir.display())
                })?;
                Store::open_in_dir(data_dir).await?
            }
        };
        Ok(store)
    }
}

/// `polydev upstream`.
#[derive(Args, Debug)]
pub struct UpstreamArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Upstream provider config (default: `upstreams.toml` in the data directory).
    #[arg(long, env = "POLYDEV_UPSTREAMS")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: UpstreamCmd,
}

/// What to do.
#[derive(Subcommand, Debug)]
pub enum UpstreamCmd {
    /// Every user's port, and each provider's occupancy.
    Ls,
    /// One user's port (USER: name or id).
    Show {
        /// User name or id.
        user: String,
    },
    /// Give USER exactly PORT (refused if another user holds it or it is in
    /// quarantine); the user's previous port goes into quarantine.
    Pin {
        /// User name or id.
        user: String,
        /// The port.
        port: u16,
        /// Provider (default: the first configured).
        #[arg(long)]
        provider: Option<String>,
    },
    /// Take USER's port away; it stays in quarantine before anyone else gets it.
    Release {
        /// User name or id.
        user: String,
    },
    /// Give USER a new port; the old one goes into quarantine.
    Rotate {
        /// User name or id.
        user: String,
    },
}

/// A user id from a name or an id.
pub async fn user_id(store: &Store, who: &str) -> anyhow::Result<String> {
    let row: Option<(String,)> = sqlx::query_as("SELECT id FROM users WHERE id = $1 OR name = $1")
        .bind(who)
        .fetch_optional(store.pool())
        .await?;
    row.map(|r| r.0)
        .ok_or_else(|| anyhow::anyhow!("no user with name or id {who:?}"))
}

fn line(a: &Assignment) -> String {
    format!(
        "{}\t{}\t{}{}",
        a.user_id,
        a.provider,
        a.port,
        if a.pinned { "\tpinned" } else { "" }
    )
}

pub async fn run(data_dir: PathBuf, a: UpstreamArgs) -> anyhow::Result<i32> {
    let path = a
        .config
        .clone()
        .unwrap_or_else(|| polydev_controller::driver::paths::upstreams(&data_dir));
    let cfg = UpstreamConfig::load_optional(&path)?;
    let store = a.store.open(&data_dir).await?;
    let needs_cfg = !matches!(a.cmd, UpstreamCmd::Ls | UpstreamCmd::Show { .. });
    if needs_cfg && cfg.is_empty() {
        anyhow::bail!(
            "no upstream providers configured in {}: add a [[provider]] (name, host, ports, username, password_env or password_file)",
            path.display()
        );
    }
    match a.cmd {
        UpstreamCmd::Ls => {
            for s in store.upstream_stats(&cfg).await? {
                println!(
                    "# provider {}: {} ports, {} assigned, {} in quarantine, {} free, exhausted {} time(s)",
                    s.provider, s.size, s.assigned, s.quarantined, s.free, s.exhausted_total
                );
            }
            println!("USER\tPROVIDER\tPORT");
            for x in store.list_upstream_assignments().await? {
                println!("{}", line(&x));
            }
            for q in store.upstream_quarantine().await? {
                println!(
                    "# quarantined: {} {} (released by {}) until {}",
                    q.provider, q.port, q.user_id, q.until_at
                );
            }
        }
        UpstreamCmd::Show { user } => {
            let id = user_id(&store, &user).await?;
            match store.upstream_assignment(&id).await? {
                Some(x) => println!("{}", line(&x)),
                None => {
                    println!("{id}\t(no upstream port yet: one is assigned at the user's first VM)")
                }
            }
        }
        UpstreamCmd::Pin {
            user,
            port,
            provider,
        } => {
            let id = user_id(&store, &user).await?;
            let x = store
                .pin_upstream_port(&id, provider.as_deref(), port, &cfg)
                .await?;
            println!("pinned: {}", line(&x));
        }
        UpstreamCmd::Release { user } => {
            let id = user_id(&store, &user).await?;
            let x = store.release_upstream_port(&id, &cfg).await?;
            println!("released (now in quarantine): {}", line(&x));
        }
        UpstreamCmd::Rotate { user } => {
            let id = user_id(&store, &user).await?;
            let x = store.rotate_upstream_port(&id, &cfg).await?;
            println!("rotated: {}", line(&x));
        }
    }
    store.close().await;
    Ok(0)
}
