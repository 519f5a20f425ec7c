//! `polydev vault rotate`: a new master key, every credential re-wrapped
//! under it while the controller keeps running, then the old keys retired.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use polydev_controller::vault::{Keyring, Vault, KEYS_ENV};

use crate::upstream::StoreArgs;

/// `polydev vault`.
#[derive(Args, Debug)]
pub struct VaultArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Master key file (default: `vault-keys.toml` in the data directory).
    #[arg(long)]
    keys: Option<PathBuf>,
    #[command(subcommand)]
    cmd: VaultCmd,
}

/// What to do.
#[derive(Subcommand, Debug)]
pub enum VaultCmd {
    /// Add a new master key and make it active, re-wrap every record under
    /// it (online), then retire the old keys.
    Rotate,
}

pub async fn run(data_dir: PathBuf, a: VaultArgs) -> anyhow::Result<i32> {
    let VaultCmd::Rotate = a.cmd;
    if std::env::var_os(KEYS_ENV).is_some() {
        anyhow::bail!(
            "{KEYS_ENV} is set, so the keys come from the environment and this command cannot change them: \
             put a new key first in {KEYS_ENV} (id:base64 of 32 random bytes), restart, re-run with the key file, \
             or unset {KEYS_ENV} to use the key file"
        );
    }
    let path = a
        .keys
        .clone()
        .unwrap_or_else(|| polydev_controller::driver::paths::vault_keys(&data_dir));
    let store = a.store.open(&data_dir).await?;
    let mut ring = Keyring::load(&path)
        .with_context(|| format!("loading the vault key file {}", path.display()))?;
    let old: Vec<String> = ring.ids();
    // Kept until the end: if a record still turns up under an old key after
    // it was retired, the operator can restore from it.
    let backup = path.with_extension("pre-rotate");
    let _ = std::fs::remove_file(&backup);
    std::fs::copy(&path, &backup)
        .with_context(|| format!("backing up {} to {}", path.display(), backup.display()))?;
    let new = ring.add_active()?;
    // Saved first: a running controller reads the file for every seal, so
    // from here on new records are sealed under the new key.
    ring.save(&path)?;
    let mut vault = Vault::new(ring);
    let mut rewrapped = 0;
    let mut retired = Vec::new();
    for _ in 0..10 {
        rewrapped += vault.rotate_records(&store).await?;
        let in_use = store.credential_key_ids().await?;
        for id in &old {
            if vault.keyring().ids().contains(id) && vault.keyring_mut().retire(id, &in_use).is_ok()
            {
                retired.push(id.clone());
            }
        }
        if vault.keyring().ids() == vec![new.clone()] {
            break;
        }
    }
    vault.keyring().save(&path)?;
    let in_use = store.credential_key_ids().await?;
    if let Some(stale) = in_use.iter().find(|k| **k != new) {
        anyhow::bail!(
            "a record is still wrapped by retired key {stale} (sealed concurrently by a controller with an old key file): \
             restore {} over {} and run `polydev vault rotate` again",
            backup.display(),
            path.display()
        );
    }
    let _ = std::fs::remove_file(&backup);
    let (total,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM credentials")
        .fetch_one(store.pool())
        .await?;
    println!("new active key: {new}");
    println!("records re-wrapped: {rewrapped} (of {total})");
    println!(
        "old keys retired: {} ({})",
        retired.len(),
        retired.join(", ")
    );
    store.close().await;
    Ok(0)
}
