//! Typed settings, read once from the environment. Nothing else in the code
//! base calls `std::env::var`.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use crate::{
    Error, Result,
    security::{
        net::{self, NetPolicy},
        secrets::SecretBox,
    },
};

/// A string that never prints (API tokens, keys).
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Every setting of both binaries, read once from the environment
/// ([`Settings::from_env`]) and checked there: a bad value is an error at
/// start, never later. Secrets in it do not print.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `DATABASE_URL`; defaults to a SQLite file in the working directory.
    pub database_url: String,
    /// `REDIS_URL`; without it the queue is embedded (SQLite) and workers run in-process.
    pub redis_url: Option<String>,
    /// `LABELSYNC_QUEUE_NAMESPACE`: prefix of every queue key, so several
    /// deployments (or tests) can share one Redis.
    pub queue_namespace: String,
    /// `LABELSYNC_EMBEDDED_QUEUE_PATH`: SQLite file of the embedded queue when the
    /// database is not SQLite itself.
    pub embedded_queue_path: PathBuf,
    /// `LABELSYNC_BIND` (default `127.0.0.1:8080`).
    pub bind: SocketAddr,
    /// `LABELSYNC_PROBE_BIND` (default: none): a listener of the
    /// scheduler's own for `/healthz`, `/readyz` and `/metrics`, beside the
    /// API's (which serves them too), with connections of its own: probes
    /// and scrapes are answered when every API connection is busy.
    pub probe_bind: Option<SocketAddr>,
    /// `LABELSYNC_API_TOKENS`, comma-separated.
    pub api_tokens: Vec<Secret>,
    /// `LOCAL_FILES_DOCUMENT_ROOT`: the only directory local storages may read.
    pub document_root: Option<PathBuf>,
    /// `LABELSYNC_RUN_MIGRATIONS` (default true): `serve` migrates on start.
    pub run_migrations: bool,
    /// `LABELSYNC_EMBEDDED_WORKERS`: run workers inside `serve`. Defaults to true
    /// exactly when there is no `REDIS_URL`.
    pub embedded_workers: bool,
    pub worker: WorkerSettings,
    /// `LABELSYNC_QUEUE_BACKLOG_LIMIT` (default 5000): jobs waiting in Redis
    /// beyond which new runs stay `queued` in the database until there is
    /// room (apalis-redis 1.0 crashes its workers at ~8,000 due jobs: see
    /// docs/DECISIONS.md, "Due-job backlog limit"); 0 turns the guard off.
    pub queue_backlog_limit: u64,
    /// `LABELSYNC_REQUEUE_AFTER_SECS` (default 120): a live run with no sign
    /// of life for this long is enqueued again by the scheduler (its job was
    /// lost; runs held because the backlog was full are admitted again by
    /// the tick instead). Sooner when Redis came back without its jobs
    /// (`jobs::requeue_stalled`).
    pub requeue_after: Duration,
    /// `LABELSYNC_MAX_LIVE_RUNS_PER_PROJECT` (default 8; 0: no cap): runs
    /// of one project let onto the queue at once. Its runs beyond it stay
    /// `queued` in the database (*held*) and start oldest first as its runs
    /// end, so one tenant cannot fill the fleet (docs/DESIGN.md, "Admission
    /// and fairness"; the default: docs/DECISIONS.md).
    pub max_live_runs_per_project: u64,
    /// `LABELSYNC_SCHEDULE_TICK_MS` (default 1000): how often the scheduler
    /// looks for storages whose `sync_interval_seconds` has come round.
    pub schedule_tick: Duration,
    /// `LABELSYNC_WEBHOOK_MAX_AGE_SECS` (default 86400, a day): a webhook
    /// endpoint whose every attempt failed for this long is disabled, and the
    /// delivery it failed on is given up.
    pub webhook_max_age: Duration,
    /// `LABELSYNC_MAX_WEBHOOKS_PER_PROJECT` (default 20): the most webhook
    /// endpoints one project may have, and the most of every project.
    pub max_webhooks_per_project: u64,
    /// `LABELSYNC_RATE_LIMIT_PER_MINUTE` (default 0: no limit): API requests
    /// one bearer token may make a minute on one scheduler, in bursts of up
    /// to that many; past it, `429` with `Retry-After`.
    pub rate_limit_per_minute: u32,
    /// How long audit rows are kept (`LABELSYNC_AUDIT_RETENTION_DAYS`,
    /// default 90; at least 1); the scheduler's tick deletes older ones.
    pub audit_retention_days: u32,
    /// How long ended runs are kept (`LABELSYNC_RUN_RETENTION_DAYS`,
    /// default 90; at least 1), and how many a storage keeps at most
    /// (`LABELSYNC_RUNS_KEPT_PER_STORAGE`, default 10,000; at least 1): the
    /// scheduler's cleanup deletes the rest with their object errors
    /// (`db::run_retention`).
    pub run_retention_days: u32,
    pub runs_kept_per_storage: u32,
    /// `LABELSYNC_LOG_FORMAT`: `json` or `text` (default).
    pub log_json: bool,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: a collector (`http://collector:4318`)
    /// that spans and metrics are also exported to over OTLP/HTTP; unset, no
    /// OTLP export (`/metrics` is always served). The exporter reads the other
    /// `OTEL_EXPORTER_OTLP_*` variables itself.
    pub otlp_endpoint: Option<String>,
    /// `LABELSYNC_STORAGE_TIMEOUT_SECS` (default 60): the longest a storage
    /// request waits for the next bytes of its response (S3: also the
    /// longest one request attempt may take) before it fails and is
    /// retried. Without it, a storage server that stops answering would
    /// hold a worker slot forever.
    pub storage_timeout: Duration,
    /// `LABELSYNC_SECRET_KEY`: 32 random bytes, base64; encrypts storage
    /// and webhook secrets at rest. Without it, storages cannot be given
    /// secrets. With `LABELSYNC_SECRET_KEY_FALLBACKS`, the keys that open
    /// what it does not (a rotation's old or next key).
    pub secret_box: Option<Arc<SecretBox>>,
    /// `LABELSYNC_ALLOW_PRIVATE_ENDPOINTS`: `true`, or a CIDR allowlist, to let
    /// storages reach private, loopback or link-local addresses (refused by default).
    pub endpoint_policy: NetPolicy,
    /// `LABELSYNC_WEBHOOK_ALLOW_PRIVATE_ENDPOINTS`: the same for webhook
    /// URLs, apart: a network opened to storages (an internal MinIO, the
    /// metadata service) is not opened to every tenant's webhooks, whose
    /// answers the delivery log shows.
    pub webhook_policy: NetPolicy,
    /// `AZURE_BLOB_ACCOUNT_NAME` / `AZURE_BLOB_ACCOUNT_KEY`: the Azure account
    /// storages fall back to when they name none / give no key.
    pub azure_account_name: Option<String>,
    pub azure_account_key: Option<Secret>,
    /// `RESOLVER_PROXY_MAX_RANGE_SIZE` (default 8 MiB): the most bytes one
    /// proxied range response carries; longer ranges are shortened (the
    /// client sees the real `Content-Range` and asks for the rest).
    pub resolver_max_range: u64,
    /// `LABELSYNC_MAX_PRESIGN_TTL_SECS` (default 7 days, the SigV4 / GCS V4
    /// maximum): caps every storage's `presign_ttl_seconds` for redirects.
    pub max_presign_ttl: Duration,
    /// `LOCAL_FILES_SERVING_ENABLED` (default false): lets `/resolve` serve
    /// local files (under the document root only).
    pub local_files_serving: bool,
    /// `LABELSYNC_RESOLVE_CACHE_SECS` (default 10, at most 300; 0 turns the
    /// cache off): how long `/resolve` may reuse a project's source storages
    /// (and their opened clients) without reading them again. Changes made
    /// anywhere reach every replica within a second anyway (the change
    /// counter). Short, because a cached S3 client keeps its temporary
    /// credentials (an assumed role) until they nearly expire, and URLs it
    /// signs die with them.
    pub resolve_cache_ttl: Duration,
    /// Limits of both HTTP listeners (the API, the worker's probes).
    pub http: HttpLimits,
}

/// What one slow or idle client may hold of an HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// `LABELSYNC_HEADER_TIMEOUT_SECS` (default 10): a request head must be
    /// complete this long after the connection opened, or after its first
    /// byte on a kept-alive connection; else the connection is closed.
    pub header_timeout: Duration,
    /// `LABELSYNC_IDLE_TIMEOUT_SECS` (default 75): a kept-alive connection
    /// with no request for this long is closed. Longer than the ~60 s load
    /// balancers keep idle upstream connections, so they close first.
    pub idle_timeout: Duration,
    /// `LABELSYNC_BODY_TIMEOUT_SECS` (default 30): a request body not fully
    /// received this long after its head is refused with 408.
    pub body_timeout: Duration,
    /// `LABELSYNC_WRITE_TIMEOUT_SECS` (default 300): a response whose
    /// socket takes nothing for this long (the client reads nothing, or
    /// too little to free the socket's buffer) is cut and its connection
    /// closed; at the connection cap, one stalled for 10 s makes room.
    pub write_timeout: Duration,
    /// `LABELSYNC_MAX_CONNECTIONS` (default 1024): open connections per
    /// listener; at the cap, the oldest connection not inside a request is
    /// closed to make room, or the new one waits for a request to end.
    pub max_connections: usize,
}

/// The settings that shape how a worker runs jobs (part of [`Settings`]).
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// `LABELSYNC_WORKER_CONCURRENCY`: jobs one worker process runs at once (default 4).
    pub concurrency: usize,
    /// `LABELSYNC_WORKER_NAME`: prefix of the worker name (default: host name).
    /// A random suffix is always added: apalis-redis refuses a restarted worker
    /// that reuses a name until the old one is declared dead.
    pub name_prefix: String,
    /// `LABELSYNC_QUEUE_POLL_MS` (default 150): how often an idle worker looks
    /// for jobs, and a run's job at its batches and partitions, when no
    /// message told them to look sooner (a push's wake, a job's end).
    pub poll_interval: Duration,
    /// `LABELSYNC_HEARTBEAT_SECS` (default 5) and `LABELSYNC_MISSED_HEARTBEATS`
    /// (default 3): a dead worker's jobs are re-queued after their product.
    pub heartbeat: Duration,
    pub missed_heartbeats: usize,
    /// `LABELSYNC_PAGE_SIZE` (default 1000): objects per listing page, and so per
    /// database transaction.
    pub page_size: usize,
    /// `LABELSYNC_MAX_ATTEMPTS` (default 5): runs failing transiently this many
    /// times are marked failed.
    pub max_attempts: u32,
    /// `LABELSYNC_FETCH_CONCURRENCY` (default 16): Tasks-mode object reads
    /// per job slot. A worker fetches and parses at most `concurrency` x
    /// this many objects at once, from one pool its jobs share
    /// (`ingest::reads`): first come, first served within a storage, equal
    /// parts between storages waiting side by side.
    pub fetch_concurrency: usize,
    /// `LABELSYNC_EXPORT_CONCURRENCY` (default 64): uploads or deletes one
    /// export run has in flight. A run exports at most this many objects
    /// per round trip of the storage: 1,280 a second at 50 ms.
    pub export_concurrency: usize,
    /// `LABELSYNC_METRICS_BIND` (default `0.0.0.0:9464`): the worker's
    /// listener for `/metrics`, `/healthz` and `/readyz`.
    pub metrics_bind: SocketAddr,
    /// `LABELSYNC_MAX_OBJECT_BYTES` (default 4 GiB): larger task files are a
    /// per-object error instead of an import.
    pub max_object_bytes: u64,
    /// `LABELSYNC_MAX_TASK_BYTES` (default 16 MiB): the largest one task (a
    /// JSONL line, a JSON array element, a Parquet row as JSON) may be; a
    /// larger one is that row's error. Bounds what one row costs in memory.
    pub max_task_bytes: usize,
    /// `LABELSYNC_PARSE_BUDGET_BYTES` (default 512 MiB): what the parses of
    /// large rows and files of one worker process may cost in memory at once
    /// (see `ingest::budget`); more waits its turn.
    pub parse_budget_bytes: usize,
    /// `LABELSYNC_ROWS_IN_FLIGHT_BYTES` (default 128 MiB, at least 1 MiB): what rows parsed
    /// and not committed yet may take in memory in one worker process (see
    /// `ingest::budget`); a parse whose next row does not fit hands its rows
    /// on and waits.
    pub rows_in_flight_bytes: usize,
    /// `LABELSYNC_MAX_ROWS_PER_OBJECT` (default 10,000,000): the most rows
    /// (tasks and row errors) one task file may give; the rows after are
    /// not read, and the object has an error saying so. Run-length encoded
    /// Parquet gives two billion rows from a hundred bytes.
    pub max_rows_per_object: u64,
    /// `LABELSYNC_SPOOL_BYTES` (default 4 GiB): the disk one worker process
    /// may fill with copies of Parquet objects at once (Parquet is read
    /// from a local copy); a copy waits for room, and a larger object is
    /// its error.
    pub spool_bytes: u64,
    /// `LABELSYNC_LIST_PARTITIONS` (default 64): the most parts a recursive
    /// listing is split into, by common prefix, for the fleet to list in
    /// parallel (`ingest::partitions`); 0 or 1 lists every storage as one
    /// sequence.
    pub list_partitions: usize,
    /// `LABELSYNC_PARQUET_PARSER` (default: `labelsync-worker` beside the
    /// running binary): the binary that reads each Parquet file in a child
    /// process (`ingest::parquet_process`).
    pub parquet_parser: PathBuf,
}

impl WorkerSettings {
    /// How long a lease (a run's, a partition's, a claim on a batch) holds
    /// without renewal: heartbeat x missed heartbeats.
    pub fn lease_ttl(&self) -> Duration {
        let missed = u32::try_from(self.missed_heartbeats.max(1)).unwrap_or(u32::MAX);
        self.heartbeat.saturating_mul(missed)
    }

    /// Leases (and claims) taken or renewed before this are dead: their
    /// worker missed its heartbeats.
    pub fn stale_before(&self) -> chrono::DateTime<chrono::Utc> {
        crate::clock::now() - chrono::Duration::from_std(self.lease_ttl()).unwrap_or_default()
    }
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Reads settings through `get`, so tests can pass a map instead of the
    /// process environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |key: &str| get(key).filter(|v| !v.trim().is_empty());
        let redis_url = get("REDIS_URL");
        let worker = worker_settings(&get)?;
        Ok(Settings {
            database_url: get("DATABASE_URL")
                .unwrap_or_else(|| "sqlite://labelsync.db?mode=rwc".into()),
            embedded_workers: parse(&get, "LABELSYNC_EMBEDDED_WORKERS", redis_url.is_none())?,
            redis_url,
            queue_namespace: get("LABELSYNC_QUEUE_NAMESPACE").unwrap_or_else(|| "labelsync".into()),
            embedded_queue_path: get("LABELSYNC_EMBEDDED_QUEUE_PATH")
                .unwrap_or_else(|| "labelsync-queue.db".into())
                .into(),
            bind: parse(
                &get,
                "LABELSYNC_BIND",
                SocketAddr::from(([127, 0, 0, 1], 8080)),
            )?,
            probe_bind: parse_optional(&get, "LABELSYNC_PROBE_BIND")?,
            api_tokens: api_tokens(get("LABELSYNC_API_TOKENS")),
            document_root: get("LOCAL_FILES_DOCUMENT_ROOT").map(PathBuf::from),
            run_migrations: parse(&get, "LABELSYNC_RUN_MIGRATIONS", true)?,
            worker,
            queue_backlog_limit: parse(&get, "LABELSYNC_QUEUE_BACKLOG_LIMIT", 5000)?,
            requeue_after: secs_within(&get, "LABELSYNC_REQUEUE_AFTER_SECS", 120, 7 * 86_400)?,
            max_live_runs_per_project: parse(&get, "LABELSYNC_MAX_LIVE_RUNS_PER_PROJECT", 8)?,
            schedule_tick: Duration::from_millis(
                parse(&get, "LABELSYNC_SCHEDULE_TICK_MS", 1000)?.max(50),
            ),
            webhook_max_age: secs_at_least_1(&get, "LABELSYNC_WEBHOOK_MAX_AGE_SECS", 86_400)?,
            max_webhooks_per_project: parse(&get, "LABELSYNC_MAX_WEBHOOKS_PER_PROJECT", 20u64)?,
            rate_limit_per_minute: parse(&get, "LABELSYNC_RATE_LIMIT_PER_MINUTE", 0)?,
            audit_retention_days: days_within(&get, "LABELSYNC_AUDIT_RETENTION_DAYS", 90)?,
            run_retention_days: days_within(&get, "LABELSYNC_RUN_RETENTION_DAYS", 90)?,
            runs_kept_per_storage: at_least_one(&get, "LABELSYNC_RUNS_KEPT_PER_STORAGE", 10_000)?,
            log_json: get("LABELSYNC_LOG_FORMAT").is_some_and(|v| v.eq_ignore_ascii_case("json")),
            otlp_endpoint: get("OTEL_EXPORTER_OTLP_ENDPOINT"),
            storage_timeout: secs_within(&get, "LABELSYNC_STORAGE_TIMEOUT_SECS", 60, 86_400)?,
            secret_box: secret_box(&get)?,
            endpoint_policy: NetPolicy::parse(get(net::STORAGES_SETTING).as_deref())?,
            webhook_policy: NetPolicy::parse_setting(
                net::WEBHOOKS_SETTING,
                get(net::WEBHOOKS_SETTING).as_deref(),
            )?,
            azure_account_name: get("AZURE_BLOB_ACCOUNT_NAME"),
            azure_account_key: get("AZURE_BLOB_ACCOUNT_KEY").map(Secret::new),
            resolver_max_range: parse(&get, "RESOLVER_PROXY_MAX_RANGE_SIZE", 8 << 20)?.max(1),
            max_presign_ttl: Duration::from_secs(
                parse(&get, "LABELSYNC_MAX_PRESIGN_TTL_SECS", 7 * 24 * 3600)?
                    .clamp(1, 7 * 24 * 3600),
            ),
            local_files_serving: parse(&get, "LOCAL_FILES_SERVING_ENABLED", false)?,
            resolve_cache_ttl: Duration::from_secs(
                parse(&get, "LABELSYNC_RESOLVE_CACHE_SECS", 10u64)?.min(300),
            ),
            http: http_limits(&get)?,
        })
    }
}

/// `labelsync-worker` in the running binary's directory (where the
/// scheduler's embedded workers find it too), else found on the `PATH`.
fn worker_beside_this_binary() -> PathBuf {
    const WORKER: &str = "labelsync-worker";
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(WORKER)))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from(WORKER))
}

/// The `LABELSYNC_*` settings of [`WorkerSettings`], read in field order.
fn worker_settings(get: &impl Fn(&str) -> Option<String>) -> Result<WorkerSettings> {
    let worker = WorkerSettings {
        concurrency: parse(get, "LABELSYNC_WORKER_CONCURRENCY", 4)?,
        name_prefix: get("LABELSYNC_WORKER_NAME")
            .or_else(|| get("HOSTNAME"))
            .unwrap_or_else(|| "worker".into()),
        poll_interval: Duration::from_millis(within(
            get,
            "LABELSYNC_QUEUE_POLL_MS",
            150,
            10..=3_600_000,
        )?),
        heartbeat: secs_within(get, "LABELSYNC_HEARTBEAT_SECS", 5, 3_600)?,
        // A lease renewed every heartbeat must outlast a renewal that is
        // late, and an export attempt stops a heartbeat before its lease
        // could be taken (`jobs::heartbeat`); a lease longer than chrono's
        // range was no lease at all.
        missed_heartbeats: within(get, "LABELSYNC_MISSED_HEARTBEATS", 3, 2..=1000)?,
        page_size: within(get, "LABELSYNC_PAGE_SIZE", 1000, 1..=5000)?,
        max_attempts: at_least_one(get, "LABELSYNC_MAX_ATTEMPTS", 5)?,
        fetch_concurrency: parse(get, "LABELSYNC_FETCH_CONCURRENCY", 16)?,
        export_concurrency: parse(get, "LABELSYNC_EXPORT_CONCURRENCY", 64)?,
        metrics_bind: parse(
            get,
            "LABELSYNC_METRICS_BIND",
            SocketAddr::from(([0, 0, 0, 0], 9464)),
        )?,
        // Sizes are in bytes: less than these (a size written in MiB)
        // would make every file or row an error, commit rows one at a time
        // across the whole process or copy no Parquet file.
        max_object_bytes: within(
            get,
            "LABELSYNC_MAX_OBJECT_BYTES",
            4 << 30,
            1 << 10..=u64::MAX,
        )?,
        max_task_bytes: within(
            get,
            "LABELSYNC_MAX_TASK_BYTES",
            16 << 20,
            1 << 10..=usize::MAX,
        )?,
        parse_budget_bytes: within(
            get,
            "LABELSYNC_PARSE_BUDGET_BYTES",
            512 << 20,
            1 << 20..=usize::MAX,
        )?,
        rows_in_flight_bytes: within(
            get,
            "LABELSYNC_ROWS_IN_FLIGHT_BYTES",
            128 << 20,
            1 << 20..=usize::MAX,
        )?,
        max_rows_per_object: within(
            get,
            "LABELSYNC_MAX_ROWS_PER_OBJECT",
            10_000_000,
            1..=u64::MAX,
        )?,
        spool_bytes: within(get, "LABELSYNC_SPOOL_BYTES", 4 << 30, 1 << 20..=u64::MAX)?,
        list_partitions: parse(get, "LABELSYNC_LIST_PARTITIONS", 64)?,
        parquet_parser: get("LABELSYNC_PARQUET_PARSER")
            .map_or_else(worker_beside_this_binary, PathBuf::from),
    };
    Ok(worker)
}

/// The `LABELSYNC_*_TIMEOUT_SECS` and `LABELSYNC_MAX_CONNECTIONS` limits, in
/// field order.
fn http_limits(get: &impl Fn(&str) -> Option<String>) -> Result<HttpLimits> {
    Ok(HttpLimits {
        header_timeout: secs_within(get, "LABELSYNC_HEADER_TIMEOUT_SECS", 10, 86_400)?,
        idle_timeout: secs_within(get, "LABELSYNC_IDLE_TIMEOUT_SECS", 75, 86_400)?,
        body_timeout: secs_within(get, "LABELSYNC_BODY_TIMEOUT_SECS", 30, 86_400)?,
        write_timeout: secs_within(get, "LABELSYNC_WRITE_TIMEOUT_SECS", 300, 86_400)?,
        max_connections: parse(get, "LABELSYNC_MAX_CONNECTIONS", 1024)?.clamp(1, 1 << 20),
    })
}

/// `LABELSYNC_SECRET_KEY` with its `LABELSYNC_SECRET_KEY_FALLBACKS`;
/// fallbacks without a key are refused (nothing would seal under them).
fn secret_box(get: &impl Fn(&str) -> Option<String>) -> Result<Option<Arc<SecretBox>>> {
    let fallbacks = get("LABELSYNC_SECRET_KEY_FALLBACKS").filter(|f| !f.trim().is_empty());
    let Some(key) = get("LABELSYNC_SECRET_KEY") else {
        return match fallbacks {
            None => Ok(None),
            Some(_) => Err(Error::invalid(
                "invalid_setting",
                None,
                "LABELSYNC_SECRET_KEY_FALLBACKS is set without LABELSYNC_SECRET_KEY: fallback keys only open secrets; set the key they are sealed under from now on",
            )),
        };
    };
    let mut secret_box = SecretBox::from_base64(&key)?;
    if let Some(list) = fallbacks {
        secret_box = secret_box.with_fallbacks(&list)?;
    }
    Ok(Some(Arc::new(secret_box)))
}

/// Comma-separated tokens, blanks dropped; none when unset.
fn api_tokens(raw: Option<String>) -> Vec<Secret> {
    raw.map(|v| {
        v.split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(Secret::new)
            .collect()
    })
    .unwrap_or_default()
}

/// A number of seconds (`default` when unset), raised to at least 1.
fn secs_at_least_1(
    get: &impl Fn(&str) -> Option<String>,
    key: &'static str,
    default: u64,
) -> Result<Duration> {
    Ok(Duration::from_secs(parse(get, key, default)?.max(1)))
}

/// The most days a retention setting may say: a hundred years. The cleanup
/// subtracts it from now, and a date past chrono's range panicked the
/// cleanup task for good (nothing was pruned again).
const MAX_RETENTION_DAYS: u32 = 36_500;

/// A number of days (`default` when unset) from 1 to
/// [`MAX_RETENTION_DAYS`]: `0` is refused rather than read as a day, which
/// deleted an audit trail its operator meant to keep.
fn days_within(
    get: &impl Fn(&str) -> Option<String>,
    key: &'static str,
    default: u32,
) -> Result<u32> {
    within(get, key, default, 1..=MAX_RETENTION_DAYS)
}

/// A number (`default` when unset) refused outside `bounds`, the message
/// naming the setting: a size written in MiB where bytes are meant, a zero
/// that makes a loop spin, a huge value that overflows a deadline.
fn within<T>(
    get: &impl Fn(&str) -> Option<String>,
    key: &'static str,
    default: T,
    bounds: std::ops::RangeInclusive<T>,
) -> Result<T>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    let n = parse(get, key, default)?;
    let refused = if n < *bounds.start() {
        format!("{key}={n} is less than {}", bounds.start())
    } else if n > *bounds.end() {
        format!("{key}={n} is more than {}", bounds.end())
    } else {
        return Ok(n);
    };
    Err(Error::invalid("invalid_setting", None, refused))
}

/// A count that must be at least 1 (`default` when unset): `0` attempts
/// failed every run and batch at its first try, "after 0 attempts".
fn at_least_one(
    get: &impl Fn(&str) -> Option<String>,
    key: &'static str,
    default: u32,
) -> Result<u32> {
    within(get, key, default, 1..=u32::MAX)
}

/// A number of seconds (`default` when unset), raised to at least 1 and
/// refused past `max`: these become timers and deadlines, which a zero
/// would make spin (or panic) and a huge value overflow.
fn secs_within(
    get: &impl Fn(&str) -> Option<String>,
    key: &'static str,
    default: u64,
    max: u64,
) -> Result<Duration> {
    Ok(Duration::from_secs(
        within(get, key, default, 0..=max)?.max(1),
    ))
}

fn parse<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    key: &'static str,
    default: T,
) -> Result<T> {
    Ok(parse_optional(get, key)?.unwrap_or(default))
}

/// A setting with no default: `None` when unset.
fn parse_optional<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    key: &'static str,
) -> Result<Option<T>> {
    get(key)
        .map(|raw| {
            raw.trim().parse().map_err(|_| {
                Error::invalid(
                    "invalid_setting",
                    None,
                    format!("{key}={raw:?} is not a valid value"),
                )
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, &str)]) -> Result<Settings> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Settings::from_lookup(move |key| map.get(key).cloned())
    }

    /// Fallback keys need a key to seal under; a bad one fails the start.
    #[test]
    fn secret_key_fallbacks_are_checked_at_start() {
        let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
        let alone = with(&[("LABELSYNC_SECRET_KEY_FALLBACKS", key)]).unwrap_err();
        assert!(
            alone.to_string().contains("without LABELSYNC_SECRET_KEY"),
            "{alone}"
        );
        let bad = with(&[
            ("LABELSYNC_SECRET_KEY", key),
            ("LABELSYNC_SECRET_KEY_FALLBACKS", "short"),
        ])
        .unwrap_err();
        assert!(bad.to_string().contains("key 1 of"), "{bad}");
        let both = with(&[
            ("LABELSYNC_SECRET_KEY", key),
            ("LABELSYNC_SECRET_KEY_FALLBACKS", key),
        ])
        .unwrap();
        assert!(both.secret_box.unwrap().has_fallbacks());
        let blank = with(&[("LABELSYNC_SECRET_KEY_FALLBACKS", " ")]).unwrap();
        assert!(blank.secret_box.is_none());
    }

    /// Timer settings become intervals and deadlines: a zero heartbeat made
    /// `tokio::time::interval` panic, a huge one overflowed the lease, a huge
    /// header or idle timeout overflowed every connection's deadline.
    #[test]
    fn timer_settings_are_held_to_sane_bounds() {
        let zero = with(&[("LABELSYNC_HEARTBEAT_SECS", "0")]).expect("settings");
        assert_eq!(zero.worker.heartbeat, Duration::from_secs(1));
        for key in [
            "LABELSYNC_HEARTBEAT_SECS",
            "LABELSYNC_HEADER_TIMEOUT_SECS",
            "LABELSYNC_IDLE_TIMEOUT_SECS",
        ] {
            let refused = with(&[(key, "18446744073709551615")]);
            assert!(
                matches!(
                    refused,
                    Err(Error::Invalid {
                        code: "invalid_setting",
                        ..
                    })
                ),
                "{key}: {refused:?}"
            );
        }
        let many = with(&[
            ("LABELSYNC_HEARTBEAT_SECS", "3600"),
            ("LABELSYNC_MISSED_HEARTBEATS", "1000"),
        ])
        .expect("settings");
        assert_eq!(many.worker.lease_ttl(), Duration::from_secs(3_600_000));
        // A lease past chrono's range was read as no lease (every lease
        // stale at once).
        assert!(many.worker.stale_before() < crate::clock::now() - chrono::Duration::days(41));
        // A lease of one heartbeat is lost by a renewal that is late.
        for missed in ["0", "1"] {
            let refused = with(&[("LABELSYNC_MISSED_HEARTBEATS", missed)]);
            assert!(
                matches!(refused, Err(Error::Invalid { .. })),
                "{missed}: {refused:?}"
            );
        }
        // Values the scheduler's loops would panic on, or fail every run
        // with: a retention past chrono's dates, a requeue wait that
        // overflows, no attempts at all.
        for (key, value) in [
            ("LABELSYNC_AUDIT_RETENTION_DAYS", "99999999"),
            ("LABELSYNC_RUN_RETENTION_DAYS", "36501"),
            ("LABELSYNC_REQUEUE_AFTER_SECS", "9000000000000000"),
            ("LABELSYNC_MAX_ATTEMPTS", "0"),
        ] {
            let refused = with(&[(key, value)]);
            assert!(
                matches!(&refused, Err(e) if e.to_string().contains(key)),
                "{key}={value}: {refused:?}"
            );
        }
        let kept = with(&[("LABELSYNC_RUN_RETENTION_DAYS", "36500")]).expect("settings");
        assert_eq!(kept.run_retention_days, 36_500);
        // Budgets under a megabyte, and no rows per object, are refused.
        for key in [
            "LABELSYNC_ROWS_IN_FLIGHT_BYTES",
            "LABELSYNC_SPOOL_BYTES",
            "LABELSYNC_MAX_ROWS_PER_OBJECT",
        ] {
            let refused = with(&[(key, "0")]);
            assert!(
                matches!(refused, Err(Error::Invalid { .. })),
                "{key}: {refused:?}"
            );
        }
        // Accepted before: a poll of 0 ms spun, sizes written in MiB made
        // every file or row an error, a retention of 0 deleted a day old
        // audit trail, timeouts near u64::MAX overflowed their deadlines,
        // and so did a lease of u64::MAX heartbeats.
        for (key, value) in [
            ("LABELSYNC_QUEUE_POLL_MS", "0"),
            ("LABELSYNC_PARSE_BUDGET_BYTES", "512"),
            ("LABELSYNC_MAX_TASK_BYTES", "16"),
            ("LABELSYNC_MAX_OBJECT_BYTES", "4"),
            ("LABELSYNC_AUDIT_RETENTION_DAYS", "0"),
            ("LABELSYNC_RUN_RETENTION_DAYS", "0"),
            ("LABELSYNC_RUNS_KEPT_PER_STORAGE", "0"),
            ("LABELSYNC_STORAGE_TIMEOUT_SECS", "18446744073709551615"),
            ("LABELSYNC_BODY_TIMEOUT_SECS", "18446744073709551615"),
            ("LABELSYNC_MISSED_HEARTBEATS", "18446744073709551615"),
        ] {
            let refused = with(&[(key, value)]);
            assert!(
                matches!(&refused, Err(e) if e.to_string().contains(&format!("{key}={value}"))),
                "{key}={value}: {refused:?}"
            );
        }
        let least = with(&[("LABELSYNC_ROWS_IN_FLIGHT_BYTES", "1048576")]).expect("settings");
        assert_eq!(least.worker.rows_in_flight_bytes, 1 << 20);
    }
}
