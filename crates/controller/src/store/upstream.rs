//! Per-user upstream proxy ports (issue 4 §3).
//!
//! A port at an upstream provider is a stable outbound IP, so the database
//! guarantees that no two users ever hold the same one: `user_id` is the
//! primary key of `upstream_assignments` and `(provider, port)` is unique. A
//! concurrent assignment that loses a race hits the constraint and looks
//! again. A released (or rotated away) port goes into `upstream_quarantine`
//! and is given to nobody else until its quarantine ends. Exhaustion is an
//! error plus an `exhausted` event per provider (the alert metric counts
//! them), never sharing.

use std::collections::BTreeSet;

use serde_json::json;

use super::{Store, StoreError};
use crate::upstream::{UpstreamConfig, UpstreamProvider};
use crate::util::now_ms;

/// A user's upstream port (also its API form).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[schema(as = AssignmentView)]
pub struct Assignment {
    /// The user.
    pub user_id: String,
    /// Upstream provider name (from the operator's config).
    pub provider: String,
    /// The port (= the user's outbound IP at that provider).
    pub port: u16,
    /// Chosen by an operator (`polydev upstream pin`) rather than assigned.
    pub pinned: bool,
    /// When it was assigned (ms).
    pub assigned_at: i64,
}

/// A port in quarantine after its user released it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantined {
    /// Provider name.
    pub provider: String,
    /// The port.
    pub port: u16,
    /// Its previous user (who may get it back earlier).
    pub user_id: String,
    /// When it was released (ms).
    pub released_at: i64,
    /// When anyone may get it again (ms).
    pub until_at: i64,
}

/// Occupancy of one provider's range (for `/metrics`, the CLI and the API).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[schema(as = UpstreamStatsView)]
pub struct UpstreamStats {
    /// Provider name.
    pub provider: String,
    /// Ports in the range.
    pub size: u32,
    /// Ports of the range held by a user.
    pub assigned: u32,
    /// Unassigned ports of the range still in quarantine.
    pub quarantined: u32,
    /// Ports that can be assigned now.
    pub free: u32,
    /// How many assignments failed because every provider was full (ever).
    pub exhausted_total: u64,
}

/// Errors of upstream assignment.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No provider is configured.
    #[error("no upstream proxy provider is configured: add a [[provider]] to the upstream config (see docs/ARCHITECTURE.md, \"Upstream assignment\")")]
    NoProviders,
    /// Every port of every provider is assigned or in quarantine.
    #[error("every upstream proxy port is assigned or in quarantine ({detail}): widen a port range, add a provider, or release unused ports — ports are never shared")]
    Exhausted {
        /// Per provider: name, range and occupancy.
        detail: String,
    },
    /// The named provider is not in the config.
    #[error("upstream provider {0:?} is not configured")]
    UnknownProvider(String),
    /// The port is not in the provider's range.
    #[error("port {port} is outside provider {provider:?}'s range {first}-{last}")]
    OutOfRange {
        /// Provider.
        provider: String,
        /// Requested port.
        port: u16,
        /// First port.
        first: u16,
        /// Last port.
        last: u16,
    },
    /// Another user holds the port.
    #[error("port {port} of provider {provider:?} is assigned to user {user_id}: release or rotate that user first (ports are never shared)")]
    PortTaken {
        /// Provider.
        provider: String,
        /// Port.
        port: u16,
        /// Its holder.
        user_id: String,
    },
    /// The port is in quarantine for another user.
    #[error("port {port} of provider {provider:?} is in quarantine until {until_at} (ms since epoch) after user {user_id} released it; choose another port")]
    PortQuarantined {
        /// Provider.
        provider: String,
        /// Port.
        port: u16,
        /// Its previous user.
        user_id: String,
        /// End of quarantine (ms).
        until_at: i64,
    },
    /// The user has no port.
    #[error("user {0} has no upstream port")]
    NotAssigned(String),
    /// Kept losing races (only under absurd contention).
    #[error("upstream assignment for user {0} kept conflicting with concurrent changes; retry")]
    Contended(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for UpstreamError {
    fn from(e: sqlx::Error) -> Self {
        UpstreamError::Store(StoreError::Db(e))
    }
}

type Row = (String, String, i64, i64, i64);

fn port_of(p: i64) -> Result<u16, StoreError> {
    u16::try_from(p).map_err(|_| StoreError::Corrupt {
        table: "upstream_assignments",
        detail: format!("port {p} out of range"),
    })
}

fn assignment(r: Row) -> Result<Assignment, StoreError> {
    Ok(Assignment {
        user_id: r.0,
        provider: r.1,
        port: port_of(r.2)?,
        pinned: r.3 != 0,
        assigned_at: r.4,
    })
}

fn is_unique(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

const COLS: &str = "user_id, provider, port, pinned, assigned_at";

impl Store {
    /// The user's upstream port, if any.
    pub async fn upstream_assignment(
        &self,
        user_id: &str,
    ) -> Result<Option<Assignment>, UpstreamError> {
        let r: Option<Row> = sqlx::query_as(&format!(
            "SELECT {COLS} FROM upstream_assignments WHERE user_id = $1"
        ))
        .bind(user_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(r.map(assignment).transpose()?)
    }

    /// Every assignment, by provider and port.
    pub async fn list_upstream_assignments(&self) -> Result<Vec<Assignment>, UpstreamError> {
        let rows: Vec<Row> = sqlx::query_as(&format!(
            "SELECT {COLS} FROM upstream_assignments ORDER BY provider, port"
        ))
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(assignment).collect::<Result<_, _>>()?)
    }

    /// Ports in quarantine now (quarantine over: not listed).
    pub async fn upstream_quarantine(&self) -> Result<Vec<Quarantined>, UpstreamError> {
        let rows: Vec<(String, i64, String, i64, i64)> = sqlx::query_as(
            "SELECT provider, port, user_id, released_at, until_at FROM upstream_quarantine
             WHERE until_at > $1 ORDER BY provider, port",
        )
        .bind(now_ms())
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(Quarantined {
                    provider: r.0,
                    port: port_of(r.1)?,
                    user_id: r.2,
                    released_at: r.3,
                    until_at: r.4,
                })
            })
            .collect()
    }

    /// Ports of `provider` that `user_id` cannot be given now: assigned to
    /// anyone, or in quarantine for someone else.
    async fn blocked_ports(
        &self,
        provider: &str,
        user_id: &str,
        now: i64,
    ) -> Result<BTreeSet<u16>, UpstreamError> {
        let rows: Vec<(i64,)> = sqlx::query_as(
            "SELECT port FROM upstream_assignments WHERE provider = $1
             UNION SELECT port FROM upstream_quarantine WHERE provider = $1 AND until_at > $2 AND user_id <> $3",
        )
        .bind(provider)
        .bind(now)
        .bind(user_id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| u16::try_from(r.0).ok())
            .collect())
    }

    /// The lowest port of some provider (in config order) that `user_id` can
    /// be given now, other than `except`.
    async fn pick_port<'c>(
        &self,
        cfg: &'c UpstreamConfig,
        user_id: &str,
        except: Option<(&str, u16)>,
        now: i64,
    ) -> Result<Option<(&'c UpstreamProvider, u16)>, UpstreamError> {
        for p in &cfg.providers {
            let blocked = self.blocked_ports(&p.name, user_id, now).await?;
            let free = (p.first_port..=p.last_port)
                .find(|port| !blocked.contains(port) && except != Some((p.name.as_str(), *port)));
            if let Some(port) = free {
                return Ok(Some((p, port)));
            }
        }
        Ok(None)
    }

    /// Record an exhaustion (one event per provider, for the alert metric)
    /// and build the error.
    async fn exhausted(&self, cfg: &UpstreamConfig) -> Result<UpstreamError, UpstreamError> {
        let stats = self.upstream_stats(cfg).await?;
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        for s in &stats {
            Self::append_event(
                &mut tx,
                now,
                "upstream",
                &s.provider,
                None,
                "exhausted",
                None,
                json!({ "size": s.size, "assigned": s.assigned, "quarantined": s.quarantined }),
            )
            .await?;
        }
        tx.commit().await?;
        tracing::error!(
            providers = stats.len(),
            "upstream proxy ports exhausted: a user could not get an outbound IP of their own"
        );
        let detail = cfg
            .providers
            .iter()
            .zip(&stats)
            .map(|(p, s)| {
                format!(
                    "{} {}-{}: {} assigned, {} in quarantine",
                    p.name, p.first_port, p.last_port, s.assigned, s.quarantined
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        Ok(UpstreamError::Exhausted { detail })
    }

    /// The user's port, assigning the lowest free one (first provider with
    /// room, in config order) on first use. Stable: an existing assignment is
    /// returned as is.
    pub async fn assign_upstream_port(
        &self,
        user_id: &str,
        cfg: &UpstreamConfig,
    ) -> Result<Assignment, UpstreamError> {
        if cfg.is_empty() {
            return Err(UpstreamError::NoProviders);
        }
        self.user(user_id).await?;
        let budget = cfg.providers.iter().map(|p| p.size()).sum::<u32>() + 16;
        for _ in 0..budget {
            if let Some(a) = self.upstream_assignment(user_id).await? {
                return Ok(a);
            }
            if let Some(a) = self.take_next_port(user_id, cfg, None).await? {
                return Ok(a);
            }
        }
        Err(UpstreamError::Contended(user_id.to_string()))
    }

    /// One attempt to give the user the lowest free port (not `old`'s, which
    /// goes into quarantine in the same transaction). `None`: a concurrent
    /// writer won the port or changed the user's assignment — look again.
    async fn take_next_port(
        &self,
        user_id: &str,
        cfg: &UpstreamConfig,
        old: Option<&Assignment>,
    ) -> Result<Option<Assignment>, UpstreamError> {
        let now = now_ms();
        let except = old.map(|o| (o.provider.as_str(), o.port));
        let Some((p, port)) = self.pick_port(cfg, user_id, except, now).await? else {
            return Err(self.exhausted(cfg).await?);
        };
        match self
            .insert_assignment(user_id, p, port, false, old.map(|o| (o, cfg)), now)
            .await
        {
            Ok(a) => Ok(Some(a)),
            Err(UpstreamError::Store(StoreError::Db(e))) if is_unique(&e) => Ok(None),
            Err(UpstreamError::Store(StoreError::Conflict { .. })) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One transaction: quarantine `old` (if any, only if it is still the
    /// user's), clear any quarantine row of the new port, insert the new
    /// assignment, and append the event.
    async fn insert_assignment(
        &self,
        user_id: &str,
        p: &UpstreamProvider,
        port: u16,
        pinned: bool,
        old: Option<(&Assignment, &UpstreamConfig)>,
        now: i64,
    ) -> Result<Assignment, UpstreamError> {
        let mut tx = self.begin_write().await?;
        if let Some((old, cfg)) = old {
            Self::quarantine_in(&mut tx, old, cfg, now).await?;
        }
        sqlx::query(&format!(
            "INSERT INTO upstream_assignments ({COLS}) VALUES ($1, $2, $3, $4, $5)"
        ))
        .bind(user_id)
        .bind(&p.name)
        .bind(i64::from(port))
        .bind(i64::from(pinned))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM upstream_quarantine WHERE provider = $1 AND port = $2")
            .bind(&p.name)
            .bind(i64::from(port))
            .execute(&mut *tx)
            .await?;
        let (kind, mut detail) = match old {
            None => ("upstream_assigned", json!({})),
            Some((o, _)) => (
                if pinned {
                    "upstream_pinned"
                } else {
                    "upstream_rotated"
                },
                json!({ "from_provider": o.provider, "from_port": o.port }),
            ),
        };
        detail["provider"] = json!(p.name);
        detail["port"] = json!(port);
        detail["pinned"] = json!(pinned);
        let kind = if old.is_none() && pinned {
            "upstream_pinned"
        } else {
            kind
        };
        Self::append_event(
            &mut tx,
            now,
            "user",
            user_id,
            Some(user_id),
            kind,
            None,
            detail,
        )
        .await?;
        tx.commit().await?;
        Ok(Assignment {
            user_id: user_id.to_string(),
            provider: p.name.clone(),
            port,
            pinned,
            assigned_at: now,
        })
    }

    /// Delete `a` (only if unchanged) and put its port into quarantine.
    async fn quarantine_in(
        tx: &mut sqlx::AnyConnection,
        a: &Assignment,
        cfg: &UpstreamConfig,
        now: i64,
    ) -> Result<(), UpstreamError> {
        let gone = sqlx::query(
            "DELETE FROM upstream_assignments WHERE user_id = $1 AND provider = $2 AND port = $3",
        )
        .bind(&a.user_id)
        .bind(&a.provider)
        .bind(i64::from(a.port))
        .execute(&mut *tx)
        .await?;
        if gone.rows_affected() != 1 {
            return Err(UpstreamError::Store(StoreError::Conflict {
                kind: "upstream_assignment",
                id: a.user_id.clone(),
                expected: 0,
            }));
        }
        // A provider removed from the config keeps the default quarantine.
        let q = cfg
            .provider(&a.provider)
            .map(|p| p.quarantine_ms)
            .unwrap_or(crate::upstream::DEFAULT_QUARANTINE_SECS as i64 * 1000);
        sqlx::query("DELETE FROM upstream_quarantine WHERE provider = $1 AND port = $2")
            .bind(&a.provider)
            .bind(i64::from(a.port))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO upstream_quarantine (provider, port, user_id, released_at, until_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&a.provider)
        .bind(i64::from(a.port))
        .bind(&a.user_id)
        .bind(now)
        .bind(now.saturating_add(q))
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// Release the user's port into quarantine; returns what was released.
    pub async fn release_upstream_port(
        &self,
        user_id: &str,
        cfg: &UpstreamConfig,
    ) -> Result<Assignment, UpstreamError> {
        let a = self
            .upstream_assignment(user_id)
            .await?
            .ok_or_else(|| UpstreamError::NotAssigned(user_id.to_string()))?;
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        Self::quarantine_in(&mut tx, &a, cfg, now).await?;
        Self::append_event(
            &mut tx,
            now,
            "user",
            user_id,
            Some(user_id),
            "upstream_released",
            None,
            json!({ "provider": a.provider, "port": a.port }),
        )
        .await?;
        tx.commit().await?;
        Ok(a)
    }

    /// Give the user a new port (the old one goes into quarantine; a pin is
    /// dropped). Without a current port this is a first assignment.
    pub async fn rotate_upstream_port(
        &self,
        user_id: &str,
        cfg: &UpstreamConfig,
    ) -> Result<Assignment, UpstreamError> {
        if cfg.is_empty() {
            return Err(UpstreamError::NoProviders);
        }
        for _ in 0..64 {
            let Some(old) = self.upstream_assignment(user_id).await? else {
                return self.assign_upstream_port(user_id, cfg).await;
            };
            if let Some(a) = self.take_next_port(user_id, cfg, Some(&old)).await? {
                return Ok(a);
            }
        }
        Err(UpstreamError::Contended(user_id.to_string()))
    }

    /// Pin the user to `port` of `provider` (default: the first configured).
    /// Refused when another user holds the port or it is in quarantine for
    /// someone else; the user's previous port goes into quarantine.
    pub async fn pin_upstream_port(
        &self,
        user_id: &str,
        provider: Option<&str>,
        port: u16,
        cfg: &UpstreamConfig,
    ) -> Result<Assignment, UpstreamError> {
        let p = match provider {
            Some(name) => cfg
                .provider(name)
                .ok_or_else(|| UpstreamError::UnknownProvider(name.to_string()))?,
            None => cfg.providers.first().ok_or(UpstreamError::NoProviders)?,
        };
        if !p.contains(port) {
            return Err(UpstreamError::OutOfRange {
                provider: p.name.clone(),
                port,
                first: p.first_port,
                last: p.last_port,
            });
        }
        self.user(user_id).await?;
        let now = now_ms();
        let holder: Option<(String,)> = sqlx::query_as(
            "SELECT user_id FROM upstream_assignments WHERE provider = $1 AND port = $2",
        )
        .bind(&p.name)
        .bind(i64::from(port))
        .fetch_optional(self.pool())
        .await?;
        let old = self.upstream_assignment(user_id).await?;
        match holder {
            Some((h,)) if h != user_id => {
                return Err(UpstreamError::PortTaken {
                    provider: p.name.clone(),
                    port,
                    user_id: h,
                })
            }
            Some(_) => {
                // Already this user's port: just mark it pinned.
                self.write_one(
                    sqlx::query("UPDATE upstream_assignments SET pinned = 1 WHERE user_id = $1")
                        .bind(user_id),
                )
                .await?;
                let mut a = old.ok_or_else(|| UpstreamError::NotAssigned(user_id.into()))?;
                a.pinned = true;
                return Ok(a);
            }
            None => {}
        }
        let q: Option<(String, i64)> = sqlx::query_as(
            "SELECT user_id, until_at FROM upstream_quarantine WHERE provider = $1 AND port = $2 AND until_at > $3 AND user_id <> $4",
        )
        .bind(&p.name)
        .bind(i64::from(port))
        .bind(now)
        .bind(user_id)
        .fetch_optional(self.pool())
        .await?;
        if let Some((prev, until_at)) = q {
            return Err(UpstreamError::PortQuarantined {
                provider: p.name.clone(),
                port,
                user_id: prev,
                until_at,
            });
        }
        let old = old.as_ref().map(|o| (o, cfg));
        match self
            .insert_assignment(user_id, p, port, true, old, now)
            .await
        {
            Err(UpstreamError::Store(StoreError::Db(e))) if is_unique(&e) => {
                Err(UpstreamError::PortTaken {
                    provider: p.name.clone(),
                    port,
                    user_id: "another user (concurrently)".into(),
                })
            }
            r => r,
        }
    }

    /// Occupancy of every configured provider.
    pub async fn upstream_stats(
        &self,
        cfg: &UpstreamConfig,
    ) -> Result<Vec<UpstreamStats>, UpstreamError> {
        let now = now_ms();
        let mut out = Vec::new();
        for p in &cfg.providers {
            let (first, last) = (i64::from(p.first_port), i64::from(p.last_port));
            let (assigned,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM upstream_assignments WHERE provider = $1 AND port >= $2 AND port <= $3",
            )
            .bind(&p.name)
            .bind(first)
            .bind(last)
            .fetch_one(self.pool())
            .await?;
            let (quarantined,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM upstream_quarantine q WHERE q.provider = $1 AND q.port >= $2 AND q.port <= $3 AND q.until_at > $4
                 AND NOT EXISTS (SELECT 1 FROM upstream_assignments a WHERE a.provider = q.provider AND a.port = q.port)",
            )
            .bind(&p.name)
            .bind(first)
            .bind(last)
            .bind(now)
            .fetch_one(self.pool())
            .await?;
            let (exhausted,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM events WHERE subject_kind = 'upstream' AND subject_id = $1 AND kind = 'exhausted'",
            )
            .bind(&p.name)
            .fetch_one(self.pool())
            .await?;
            let assigned = u32::try_from(assigned).unwrap_or(u32::MAX);
            let quarantined = u32::try_from(quarantined).unwrap_or(u32::MAX);
            out.push(UpstreamStats {
                provider: p.name.clone(),
                size: p.size(),
                assigned,
                quarantined,
                free: p
                    .size()
                    .saturating_sub(assigned)
                    .saturating_sub(quarantined),
                exhausted_total: u64::try_from(exhausted).unwrap_or(0),
            });
        }
        Ok(out)
    }
}
