//! `polydev bench api`: throughput and latency of the controller's HTTP API
//! under concurrent load, on SQLite and on PostgreSQL.
//!
//! Per database it starts the real API (`polydev_controller::http::serve`,
//! rate limits off, no VM driver: the API and the store are measured, not
//! VMs) on a loopback port over a fresh store (SQLite in a temp dir, or a
//! throwaway PostgreSQL from [`polydev_controller::pgtemp`]), creates one
//! user with a `sessions:read sessions:write` token, and runs two phases of
//! `--concurrency` workers, each with one keep-alive HTTP/1.1 connection:
//!
//! 1. session create: `POST /api/v1/sessions {"provider":"codex"}`;
//! 2. session read: `GET /api/v1/sessions/{id}` over the ids phase 1 made.
//!
//! Each phase warms up for `--warmup-s` (not counted), then counts for
//! `--duration-s`: requests, requests per second, p50/p99/max latency and
//! errors (non-2xx answers and transport failures). Client and server share
//! this process and its machine, so the figures are a lower bound of what
//! a dedicated controller does. Numbers only; nothing passes or fails.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use polydev_controller::auth::{Auth, AuthConfig, Role, Scope};
use polydev_controller::http::{self, AppState, HttpConfig};
use polydev_controller::pgtemp::{PgTemp, PgTempError};
use polydev_controller::store::Store;
use tokio::net::{TcpListener, TcpStream};

/// Which database(s) to benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DbChoice {
    /// SQLite in a temp dir (the embedded default).
    Sqlite,
    /// A throwaway PostgreSQL server (needs Debian's `postgresql`).
    Postgres,
    /// SQLite, then PostgreSQL.
    Both,
}

/// Options of `polydev bench api`.
#[derive(Args, Clone, Debug)]
pub struct ApiBenchArgs {
    /// Database(s) to run against.
    #[arg(long, value_enum, default_value = "both")]
    pub database: DbChoice,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    /// Concurrent workers (one keep-alive connection each).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Warm-up seconds before each phase's measurement (not counted).
    #[arg(long, default_value_t = 1)]
    pub warmup_s: u64,
}

/// A request taking longer than this counts as a transport error (and the
/// worker reconnects), so a phase always ends.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The body of every create.
const CREATE_BODY: &[u8] = br#"{"provider":"codex"}"#;

/// What one worker measured in one phase.
#[derive(Default)]
struct WorkerResult {
    /// Latencies of the counted requests, microseconds (errors included).
    lat_us: Vec<u64>,
    /// Counted failures by kind: an HTTP status or "transport".
    errors: BTreeMap<String, u64>,
    /// The first failure's detail (status and body, or transport error).
    first_error: Option<String>,
    /// Session ids created (warm-up included), for the read phase.
    ids: Vec<String>,
    /// When the worker's last counted request finished.
    last_done: Option<Instant>,
}

/// One benchmark phase.
#[derive(Clone, Copy)]
enum Phase {
    Create,
    Read,
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Create => "session create  POST /api/v1/sessions",
            Phase::Read => "session read    GET /api/v1/sessions/{id}",
        }
    }
}

/// One keep-alive HTTP/1.1 connection to the API.
async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection task ends when the sender is dropped or the server
    // closes; its error then shows up on the next send.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Send one request; `Ok((status, body))` for any HTTP answer.
async fn send(
    conn: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> anyhow::Result<(u16, Bytes)> {
    let fut = async {
        conn.ready().await?;
        let resp = conn.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, fut)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {REQUEST_TIMEOUT:?}"))?
}

fn request(phase: Phase, token: &str, id: Option<&str>) -> anyhow::Result<Request<Full<Bytes>>> {
    let b = Request::builder()
        .header(HOST, "127.0.0.1")
        .header(AUTHORIZATION, format!("Bearer {token}"));
    Ok(match (phase, id) {
        (Phase::Create, _) => b
            .method("POST")
            .uri("/api/v1/sessions")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(CREATE_BODY)))?,
        (Phase::Read, Some(id)) => b
            .method("GET")
            .uri(format!("/api/v1/sessions/{id}"))
            .body(Full::new(Bytes::new()))?,
        (Phase::Read, None) => anyhow::bail!("read phase without an id"),
    })
}

/// Run one worker until `end`; requests started before `measure_from` are
/// warm-up and not counted.
#[allow(clippy::too_many_arguments)]
async fn worker(
    addr: SocketAddr,
    token: Arc<str>,
    phase: Phase,
    ids: Arc<Vec<String>>,
    first: usize,
    stride: usize,
    measure_from: Instant,
    end: Instant,
) -> WorkerResult {
    let mut out = WorkerResult::default();
    let mut conn = None;
    let mut next = first;
    while Instant::now() < end {
        let id = match phase {
            Phase::Create => None,
            Phase::Read => {
                let id = ids.get(next % ids.len().max(1)).map(String::as_str);
                next = next.wrapping_add(stride);
                id
            }
        };
        let req = match request(phase, &token, id) {
            Ok(r) => r,
            Err(e) => {
                out.first_error.get_or_insert_with(|| e.to_string());
                break;
            }
        };
        let t = Instant::now();
        let counted = t >= measure_from;
        let res = match conn.as_mut() {
            Some(c) => send(c, req).await,
            None => match connect(addr).await {
                Ok(c) => send(conn.insert(c), req).await,
                Err(e) => Err(e),
            },
        };
        let done = Instant::now();
        let failure = match res {
            Ok((status, body)) if (200..300).contains(&status) => {
                if let Phase::Create = phase {
                    if let Some(id) = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v.get("id")?.as_str().map(str::to_owned))
                    {
                        out.ids.push(id);
                    }
                }
                None
            }
            Ok((status, body)) => Some((
                status.to_string(),
                format!("HTTP {status}: {}", String::from_utf8_lossy(&body)),
            )),
            Err(e) => {
                // A broken connection is replaced for the next request.
                conn = None;
                Some(("transport".to_string(), format!("{e:#}")))
            }
        };
        if !counted {
            continue;
        }
        out.lat_us
            .push(u64::try_from(done.duration_since(t).as_micros()).unwrap_or(u64::MAX));
        out.last_done = Some(done);
        if let Some((kind, detail)) = failure {
            *out.errors.entry(kind).or_default() += 1;
            out.first_error.get_or_insert(detail);
        }
    }
    out
}

/// Percentile `p` of sorted `v` (microseconds) in milliseconds.
fn pct_ms(v: &[u64], p: f64) -> f64 {
    crate::bench::percentile(v, p).map_or(0.0, |us| us as f64 / 1000.0)
}

/// Run one phase and print its line; returns the session ids created.
async fn phase(
    db: &str,
    addr: SocketAddr,
    token: &Arc<str>,
    phase: Phase,
    ids: Arc<Vec<String>>,
    a: &ApiBenchArgs,
) -> anyhow::Result<Vec<String>> {
    if let Phase::Read = phase {
        if ids.is_empty() {
            println!("{db:<9}{:<42} no sessions to read", phase.label());
            return Ok(Vec::new());
        }
    }
    let workers = a.concurrency.max(1);
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(a.warmup_s);
    let end = measure_from + Duration::from_secs(a.duration_s.max(1));
    let handles: Vec<_> = (0..workers)
        .map(|i| {
            tokio::spawn(worker(
                addr,
                token.clone(),
                phase,
                ids.clone(),
                i,
                workers,
                measure_from,
                end,
            ))
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut first_error = None;
    let mut created = Vec::new();
    let mut last_done = measure_from;
    for h in handles {
        let r = h.await.context("benchmark worker panicked")?;
        lat.extend(r.lat_us);
        for (k, n) in r.errors {
            *errors.entry(k).or_default() += n;
        }
        if first_error.is_none() {
            first_error = r.first_error;
        }
        created.extend(r.ids);
        if let Some(t) = r.last_done {
            last_done = last_done.max(t);
        }
    }
    lat.sort_unstable();
    let secs = last_done.duration_since(measure_from).as_secs_f64();
    let n = lat.len();
    let rps = if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let n_err: u64 = errors.values().sum();
    println!(
        "{db:<9}{:<42} requests {n:>7}  {rps:>8.1} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  errors {n_err}",
        phase.label(),
        pct_ms(&lat, 50.0),
        pct_ms(&lat, 99.0),
        lat.last().map_or(0.0, |m| *m as f64 / 1000.0),
    );
    if n_err > 0 {
        let kinds: Vec<String> = errors.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        println!("{:<9}  errors by kind: {}", "", kinds.join(", "));
    }
    if let Some(e) = first_error {
        let e: String = e.chars().take(300).collect();
        println!("{:<9}  first error: {e}", "");
    }
    Ok(created)
}

/// Serve the API over `store` on loopback, run both phases, stop the server.
async fn run_db(db: &str, store: Store, a: &ApiBenchArgs) -> anyhow::Result<()> {
    let auth = Auth::new(store, AuthConfig::default())?;
    let user = auth.create_user("bench", Role::User, None).await?;
    let (_, token) = auth
        .create_token(
            &user.id,
            "bench",
            &[Scope::SessionsRead, Scope::SessionsWrite],
            None,
        )
        .await?;
    let token: Arc<str> = token.into();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // One user creates every session: no rate limit, no per-user quota.
    let cfg = HttpConfig::unlimited();
    let state = AppState::new(auth, None, cfg, stop_rx)?;
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(http::serve(listener, state));

    let result = async {
        let ids = phase(db, addr, &token, Phase::Create, Arc::default(), a).await?;
        phase(db, addr, &token, Phase::Read, Arc::new(ids), a).await?;
        anyhow::Ok(())
    }
    .await;

    // Workers have dropped their connections, so graceful shutdown is quick;
    // bounded anyway so the benchmark always ends.
    let _ = stop_tx.send(true);
    match tokio::time::timeout(Duration::from_secs(10), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => eprintln!("{db}: server ended with an error: {e}"),
        Ok(Err(e)) => eprintln!("{db}: server task failed: {e}"),
        Err(_) => eprintln!("{db}: server did not stop within 10 s"),
    }
    result
}

async fn run_sqlite(a: &ApiBenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("pdbench-api").tempdir()?;
    let store = Store::open_in_dir(dir.path()).await?;
    run_db("sqlite", store, a).await
}

async fn run_postgres(a: &ApiBenchArgs) -> anyhow::Result<()> {
    let pg = match tokio::task::spawn_blocking(PgTemp::start).await? {
        Ok(pg) => pg,
        Err(PgTempError::NotInstalled) => {
            println!(
                "{:<9}skipped: initdb not found, install postgresql \
                 (`./polydev.sh setup` or `apt-get install postgresql`)",
                "postgres"
            );
            return Ok(());
        }
        Err(e) => return Err(e).context("starting a throwaway PostgreSQL"),
    };
    let url = pg.create_database().await?;
    let store = Store::open(&url).await?;
    // `pg` outlives the store (dropped in reverse order): it stops the
    // server and removes its temp dir.
    run_db("postgres", store, a).await
}

/// `polydev bench api`.
pub async fn run(a: ApiBenchArgs) -> anyhow::Result<i32> {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "polydev bench api: {} workers x 1 keep-alive HTTP/1.1 connection, {} s per phase \
         after {} s warm-up; client and server in this process on 127.0.0.1, {cpus} CPUs; \
         rate limits off, no VM driver; the per-request access log is off (POLYDEV_LOG=info \
         turns it on)",
        a.concurrency.max(1),
        a.duration_s.max(1),
        a.warmup_s
    );
    if matches!(a.database, DbChoice::Sqlite | DbChoice::Both) {
        run_sqlite(&a).await?;
    }
    if matches!(a.database, DbChoice::Postgres | DbChoice::Both) {
        run_postgres(&a).await?;
    }
    Ok(0)
}
