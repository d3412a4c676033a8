//! Queue wiring: apalis-redis for the fleet, apalis-sqlite for the embedded
//! single-process mode. Both run the same handler ([`super::execute`]).
//!
//! Settings that work around apalis-redis 1.0 (see docs/DECISIONS.md, "The
//! job queue: apalis 1.0 / apalis-redis 1.0"):
//! - an interval poll: without it an idle worker only sees new jobs at its
//!   next heartbeat (~30 s); beside it, a wake message on every push
//!   ([`super::wake`]), so an idle worker does not wait out the interval;
//! - a worker fetches one job at a time, and only when it has a free slot:
//!   a fetch of several would park jobs behind a busy worker's slots while
//!   other workers idle (the tail of every fan-out);
//! - heartbeat 5 s x 3 missed: a killed worker's jobs come back after ~15 s,
//!   not 300 s;
//! - a random suffix on every worker name: a restarted pod reusing a name is
//!   refused until the old name is declared dead;
//! - `persist_results` stays on (off, completed ids linger in the inflight set
//!   and run again when that worker is declared dead);
//! - `lock_tasks` off: the lock is a second script per job in the worker's
//!   fetch loop (with a backlog-long `LREM` in it), and nothing reads it
//!   (depth and dead workers go by the inflight sets);
//! - a 30 s Redis response timeout instead of redis-rs' 500 ms, which ends the
//!   worker stream silently on any Redis stall; and if the worker stream ends
//!   anyway, [`Queue::run_worker`] returns an error so the process exits non-zero.
use std::{future::Future, sync::Arc, time::Duration};

use apalis::prelude::*;
use apalis_core::backend::ext::poll_strategy::Strategy;
use apalis_redis::{ConnectionManager, RedisStorage};
use apalis_sqlite::SqliteStorage;
use rand::Rng;
use sea_orm::DatabaseConnection;
use tracing::Instrument;

use super::{JobContext, RunJob};
use crate::{
    Error, Result,
    config::Settings,
    db,
    ingest::ended::{Ended, Endings},
};

/// The job queue: Redis (the fleet) or the embedded SQLite queue (one
/// process). Jobs pushed are delivered at least once; handlers are
/// idempotent. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Queue {
    Redis {
        storage: RedisStorage<RunJob>,
        conn: ConnectionManager,
        /// For the workers' wake subscriptions (see [`super::wake`]).
        client: Arc<apalis_redis::Client>,
        /// See `Settings::queue_backlog_limit`.
        backlog_limit: u64,
        /// This process's watchers of runs (see [`crate::ingest::ended`]),
        /// woken by the ends the workers announce on Redis.
        endings: Endings,
        /// The key whose absence says Redis forgot the namespace's jobs
        /// (see [`Queue::memory`]).
        memory_key: String,
        /// The key that names the loss the fleet is recovering from, for
        /// a while after one was found (see [`Queue::memory`]).
        recovering_key: String,
    },
    /// The queue, this process's watchers of runs, woken by the ends its
    /// own jobs announce, and the wake signal of its worker, raised by
    /// every push (a job is taken at once, not at the next poll).
    Embedded(SqliteStorage<RunJob>, Endings, super::wake::Signal),
}

impl Queue {
    /// Redis when `REDIS_URL` is set, else the embedded SQLite queue (in the
    /// database file itself when the database is SQLite).
    pub async fn open(settings: &Settings, db: &DatabaseConnection) -> Result<Self> {
        let queue_name = format!("{}:runs", settings.queue_namespace);
        let w = &settings.worker;
        match &settings.redis_url {
            Some(url) => {
                let client = apalis_redis::Client::open(url.as_str()).map_err(|e| {
                    Error::invalid("invalid_setting", None, format!("REDIS_URL: {e}"))
                })?;
                let conn_config = redis::aio::ConnectionManagerConfig::new()
                    .set_response_timeout(Some(Duration::from_secs(30)))
                    .set_connection_timeout(Some(Duration::from_secs(10)))
                    .set_number_of_retries(6);
                let conn = client
                    .get_connection_manager_with_config(conn_config)
                    .await
                    .map_err(|e| Error::Transient(format!("cannot connect to Redis: {e}")))?;
                // One job per fetch: see the module's documentation.
                let config = apalis_redis::Config::default()
                    .queue(&queue_name)
                    .batch_size(1)
                    .heartbeat_interval(w.heartbeat)
                    .missed_heartbeats(w.missed_heartbeats)
                    .persist_results(true)
                    .lock_tasks(false)
                    .idempotency_ttl(Some(Duration::from_secs(3600)));
                let storage = RedisStorage::new(conn.clone()).with_config(config);
                Ok(Queue::Redis {
                    storage,
                    conn,
                    client: Arc::new(client),
                    backlog_limit: settings.queue_backlog_limit,
                    endings: Endings::default(),
                    memory_key: format!("{}:memory", settings.queue_namespace),
                    recovering_key: format!("{}:recovering", settings.queue_namespace),
                })
            }
            None => {
                let pool = if db::is_sqlite(db) {
                    db.get_sqlite_connection_pool().clone()
                } else {
                    let url = format!(
                        "sqlite://{}?mode=rwc",
                        settings.embedded_queue_path.display()
                    );
                    apalis_sqlite::SqlitePool::connect(&url)
                        .await
                        .map_err(|e| Error::Internal(format!("embedded queue {url}: {e}")))?
                };
                SqliteStorage::setup(&pool)
                    .await
                    .map_err(|e| Error::Internal(format!("embedded queue setup: {e}")))?;
                let config = apalis_sqlite::Config::default()
                    .queue(&queue_name)
                    .batch_size(w.concurrency.max(1))
                    .heartbeat_interval(w.heartbeat)
                    .missed_heartbeats(w.missed_heartbeats);
                Ok(Queue::Embedded(
                    SqliteStorage::new(&pool).with_config(config),
                    Endings::default(),
                    super::wake::Signal::default(),
                ))
            }
        }
    }

    /// Whether Redis still holds a job pushed under one of `dedups` to run:
    /// waiting, running, or failed with a try to come (not dead). Redis
    /// keeps a push's key for an hour; a job pushed longer ago, or one
    /// Redis lost, is not found. Always false for the embedded queue.
    pub async fn holds_job_of(&self, dedups: &[String]) -> Result<bool> {
        let Queue::Redis { storage, conn, .. } = self else {
            return Ok(false);
        };
        let config = storage.get_config();
        let failed = |e: redis::RedisError| Error::Transient(format!("queue job lookup: {e}"));
        let mut conn = conn.clone();
        let keys: Vec<String> = dedups
            .iter()
            .map(|dedup| format!("{}:{dedup}", config.idempotency_key_set()))
            .collect();
        let tasks: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .map_err(failed)?;
        // Every job found asked about at once: one more round trip.
        let found: Vec<String> = tasks.into_iter().flatten().collect();
        if found.is_empty() {
            return Ok(false);
        }
        let mut asked = redis::pipe();
        for task in &found {
            asked
                .cmd("HGET")
                .arg(format!("{}:{task}", config.job_meta_hash()))
                .arg("status")
                .cmd("SISMEMBER")
                .arg(config.dead_jobs_set())
                .arg(task);
        }
        let answers: Vec<(Option<String>, bool)> =
            asked.query_async(&mut conn).await.map_err(failed)?;
        Ok(answers.iter().any(|(status, dead)| {
            let to_run = matches!(
                status.as_deref(),
                Some("Pending" | "Queued" | "Running" | "Failed")
            );
            to_run && !dead
        }))
    }

    /// Enqueues a job. `dedup` is an idempotency key: Redis drops a second push
    /// with the same key within an hour (the handlers are idempotent anyway).
    /// [`Pushed::Full`] when the Redis backlog is at its limit: nothing was
    /// pushed, and the caller leaves its run `queued` for the scheduler's
    /// sweep to enqueue later.
    pub async fn push(&self, mut job: RunJob, dedup: &str) -> Result<Pushed> {
        let run_id = job.run_id.clone();
        if job.trace.is_empty() {
            job.trace = crate::telemetry::current_context();
        }
        let task = TaskBuilder::new(job).idempotency_key(dedup).build();
        let failed = |e: String| Error::Transient(format!("cannot enqueue run {run_id}: {e}"));
        match self {
            Queue::Redis {
                storage,
                conn,
                backlog_limit,
                ..
            } => {
                if *backlog_limit > 0 {
                    // Every push lands in the scheduled set first; that set,
                    // once due, is what the fetch script unpacks in one call.
                    let waiting: u64 = redis::cmd("ZCARD")
                        .arg(storage.get_config().scheduled_jobs_set())
                        .query_async(&mut conn.clone())
                        .await
                        .map_err(|e| failed(e.to_string()))?;
                    if waiting >= *backlog_limit {
                        return Ok(Pushed::Full);
                    }
                }
                storage
                    .clone()
                    .push_task(task)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                let channel = super::wake::channel(storage.get_config().queue.as_ref());
                super::wake::publish(&mut conn.clone(), &channel, "1").await;
            }
            Queue::Embedded(storage, _, woken) => {
                storage
                    .clone()
                    .push_task(task)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                woken.wake();
            }
        }
        Ok(Pushed::Queued)
    }

    /// Announces that a `what` job of run `run_id` ended, so its watchers,
    /// in whichever process they run, look at once (see
    /// [`crate::ingest::ended`]). Best effort, like the wake on a push.
    pub async fn announce_end(&self, what: Ended, run_id: &str) {
        let message = crate::ingest::ended::message(what, run_id);
        match self {
            Queue::Redis { storage, conn, .. } => {
                let channel = super::wake::ended_channel(storage.get_config().queue.as_ref());
                super::wake::publish(&mut conn.clone(), &channel, &message).await;
            }
            Queue::Embedded(_, endings, _) => endings.announce(&message),
        }
    }

    /// This process's watchers of runs.
    pub fn endings(&self) -> &Endings {
        match self {
            Queue::Redis { endings, .. } | Queue::Embedded(_, endings, _) => endings,
        }
    }

    /// How many jobs wait, run and died, read from the backend's own keys or
    /// tables (apalis-redis 1.0's metrics calls fail: see docs/DECISIONS.md
    /// (Queue depth read from Redis)).
    pub async fn depth(&self) -> Result<QueueDepth> {
        match self {
            Queue::Redis { storage, conn, .. } => redis_depth(storage, conn.clone()).await,
            Queue::Embedded(storage, ..) => embedded_depth(storage).await,
        }
    }

    /// What the queue remembers of its jobs: whether it forgot them (Redis
    /// restarted without persistence, failed over to an empty replica, or
    /// was flushed), and which loss the fleet is recovering from. A key of
    /// the namespace's own is set when missing, in one round trip with a
    /// look at apalis' job data and at the recovery key: the key gone and
    /// no job data at all is a Redis that holds none of the namespace's
    /// jobs. A Redis that never had the key but has jobs (this version's
    /// first start on a Redis in use) is not one; a replica that lags keeps
    /// the key and is not told apart. The process whose set takes is told
    /// `forgot`, and names the loss for `recovery` in Redis, where every
    /// replica reads it. Nothing for the embedded queue.
    pub async fn memory(&self, recovery: Duration) -> Result<Memory> {
        let Queue::Redis {
            storage,
            conn,
            memory_key,
            recovering_key,
            ..
        } = self
        else {
            return Ok(Memory::default());
        };
        let failed = |e: redis::RedisError| Error::Transient(format!("queue memory key: {e}"));
        let (set, jobs, recovering): (Option<String>, bool, Option<String>) = redis::pipe()
            .cmd("SET")
            .arg(memory_key)
            .arg(crate::clock::now().to_rfc3339())
            .arg("NX")
            .cmd("EXISTS")
            .arg(storage.get_config().job_data_hash())
            .cmd("GET")
            .arg(recovering_key)
            .query_async(&mut conn.clone())
            .await
            .map_err(failed)?;
        if set.is_none() || jobs {
            return Ok(Memory {
                forgot: false,
                recovering,
            });
        }
        let loss = crate::clock::now().timestamp_millis().to_string();
        let millis = u64::try_from(recovery.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let named = redis::cmd("SET")
            .arg(recovering_key)
            .arg(&loss)
            .arg("PX")
            .arg(millis)
            .query_async::<()>(&mut conn.clone())
            .await;
        if let Err(err) = named {
            // Unnamed, the loss would be recovered from by no one: the
            // next process to ask is told again.
            let _ = redis::cmd("DEL")
                .arg(memory_key)
                .query_async::<i64>(&mut conn.clone())
                .await;
            return Err(failed(err));
        }
        Ok(Memory {
            forgot: true,
            recovering: Some(loss),
        })
    }

    /// True when the queue's server answers (for `/readyz`).
    pub async fn ping(&self) -> bool {
        match self {
            Queue::Redis { conn, .. } => {
                let mut conn = conn.clone();
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            }
            Queue::Embedded(storage, ..) => sea_orm::sqlx::query("SELECT 1")
                .execute(storage.pool())
                .await
                .is_ok(),
        }
    }

    /// Subscribes this worker to the Redis queue's wake and end messages
    /// (see [`super::wake`]): the wake signal its poll strategy follows, and
    /// the subscription's task, stopped when dropped. Nothing on the
    /// embedded queue, where jobs announce their ends in the process.
    fn subscribe(&self) -> (super::wake::Signal, Option<super::AbortOnDrop<()>>) {
        let woken = super::wake::Signal::default();
        let Queue::Redis {
            storage,
            client,
            endings,
            ..
        } = self
        else {
            return (woken, None);
        };
        let listening = tokio::spawn(super::wake::listen(
            (**client).clone(),
            storage.get_config().queue.to_string(),
            woken.clone(),
            endings.clone(),
        ));
        (woken, Some(super::AbortOnDrop(listening)))
    }

    /// Runs one worker until `shutdown` resolves, then lets in-flight jobs
    /// finish. An `Err` means the worker stopped on its own: exit non-zero.
    pub async fn run_worker<F>(&self, ctx: Arc<JobContext>, shutdown: F) -> Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let w = &ctx.settings.worker;
        let name = format!(
            "{}-{:06x}",
            w.name_prefix,
            rand::rng().random::<u32>() & 0xff_ffff
        );
        let (concurrency, poll) = (w.concurrency.max(1), w.poll_interval);
        tracing::info!(worker = %name, concurrency, "worker starting");
        crate::metrics::metrics()
            .worker_slots
            .record(concurrency as u64, &[]);
        let me = super::registry::Identity::new(&name, concurrency);
        super::registry::beat(&ctx.db, &me, &ctx.current).await;
        // Registered: from here the worker's /readyz may say 200.
        (ctx.taking_jobs).store(true, std::sync::atomic::Ordering::Release);
        let registration = super::AbortOnDrop(tokio::spawn(super::registry::keep_registered(
            ctx.db.clone(),
            me,
            ctx.current.clone(),
            w.heartbeat,
        )));
        let db = ctx.db.clone();
        let (stopped, stop) = tokio::sync::oneshot::channel::<()>();
        let stopping = ctx.clone();
        let signal = async move {
            shutdown.await;
            // Running imports give their runs back at the next page, so the
            // drain below is quick and another worker resumes them.
            stopping
                .stopping
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = stopped.send(());
            Ok::<(), WorkerError>(())
        };
        // The same builder chain over two backend types: a generic helper
        // would have to restate apalis' builder bounds, longer than the copy.
        let result = match self {
            Queue::Redis { storage, .. } => {
                let (woken, _listening) = self.subscribe();
                let strategy = Strategy::new().stream(woken).interval(poll);
                WorkerBuilder::new(name.as_str())
                    .backend(storage.clone().poll_with_strategy(strategy))
                    .data(ctx)
                    .concurrency(concurrency)
                    .build(handle)
                    .run_until(signal)
                    .await
            }
            Queue::Embedded(storage, _, woken) => {
                let strategy = Strategy::new().stream(woken.clone()).interval(poll);
                WorkerBuilder::new(name.as_str())
                    .backend(storage.clone().poll_with_strategy(strategy))
                    .data(ctx)
                    .concurrency(concurrency)
                    .build(handle)
                    .run_until(signal)
                    .await
            }
        };
        drop(registration);
        super::registry::deregister(&db, &name).await;
        result.map_err(|e| Error::Transient(format!("worker {name} failed: {e}")))?;
        if stop.await.is_err() {
            return Err(Error::Transient(format!(
                "worker {name} stopped unexpectedly"
            )));
        }
        tracing::info!(worker = %name, "worker stopped");
        Ok(())
    }
}

/// What the queue remembers of its jobs (see [`Queue::memory`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Memory {
    /// It forgot them: this process's look found it just now.
    pub forgot: bool,
    /// The loss the fleet is recovering from, found within the recovery
    /// time (by any process): its id.
    pub recovering: Option<String>,
}

/// What [`Queue::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The backlog is at `LABELSYNC_QUEUE_BACKLOG_LIMIT`; nothing was pushed.
    Full,
}

/// Seconds since the Unix epoch (the queues' time unit).
pub(super) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Redis: due jobs are the scheduled set's entries up to now plus the
/// active list; jobs in flight are the live workers' in-flight sets.
async fn redis_depth(
    storage: &RedisStorage<RunJob>,
    mut conn: ConnectionManager,
) -> Result<QueueDepth> {
    let config = storage.get_config();
    let now = now_secs();
    let redis_err = |e: redis::RedisError| Error::Transient(format!("queue depth: {e}"));
    let (due, later, active, dead, workers): (u64, u64, u64, u64, Vec<String>) = redis::pipe()
        .cmd("ZCOUNT")
        .arg(config.scheduled_jobs_set())
        .arg("-inf")
        .arg(now)
        .cmd("ZCOUNT")
        .arg(config.scheduled_jobs_set())
        .arg(format!("({now}"))
        .arg("+inf")
        .cmd("LLEN")
        .arg(config.active_jobs_list())
        .cmd("SCARD")
        .arg(config.dead_jobs_set())
        .cmd("ZRANGE")
        .arg(config.workers_set())
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .map_err(redis_err)?;
    let mut running = 0u64;
    if !workers.is_empty() {
        let mut pipe = redis::pipe();
        for worker in &workers {
            pipe.cmd("SCARD")
                .arg(format!("{}:{worker}", config.inflight_jobs_set()));
        }
        let counts: Vec<u64> = pipe.query_async(&mut conn).await.map_err(redis_err)?;
        running = counts.iter().sum();
    }
    Ok(QueueDepth {
        queue: config.queue.to_string(),
        pending: due + active,
        scheduled: later,
        running,
        dead,
    })
}

/// The embedded queue: its `Jobs` rows by status, and by whether their
/// `run_at` is still to come.
async fn embedded_depth(storage: &SqliteStorage<RunJob>) -> Result<QueueDepth> {
    let name = apalis_core::backend::BackendConfig::config(storage)
        .queue
        .to_string();
    let rows: Vec<(String, bool, i64)> = sea_orm::sqlx::query_as(
        "SELECT status, run_at > ?2, COUNT(*) FROM Jobs WHERE job_type = ?1 \
         GROUP BY status, run_at > ?2",
    )
    .bind(&name)
    .bind(now_secs() as i64)
    .fetch_all(storage.pool())
    .await
    .map_err(|e| Error::Transient(format!("queue depth: {e}")))?;
    let count = |states: &[&str], later: bool| -> u64 {
        rows.iter()
            .filter(|(s, l, _)| states.contains(&s.as_str()) && *l == later)
            .map(|(_, _, n)| *n as u64)
            .sum()
    };
    let any = |states: &[&str]| count(states, false) + count(states, true);
    // apalis-sqlite: `Queued` rows are taken by a worker (locked to it),
    // `Failed` ones wait for their retry at `run_at`, `Killed` ones are dead.
    Ok(QueueDepth {
        queue: name,
        pending: count(&["Pending", "Failed"], false),
        scheduled: count(&["Pending", "Failed"], true),
        running: any(&["Queued", "Running"]),
        dead: any(&["Killed"]),
    })
}

/// One queue's backlog, as `GET /api/v1/queues` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueDepth {
    pub queue: String,
    /// Jobs due and not yet taken by a worker.
    pub pending: u64,
    /// Jobs waiting for a later time (not yet due).
    pub scheduled: u64,
    /// Jobs a live worker holds.
    pub running: u64,
    /// Jobs given up on by the queue.
    pub dead: u64,
}

async fn handle(
    job: RunJob,
    ctx: Data<Arc<JobContext>>,
    worker: WorkerContext,
    task_id: Option<TaskId>,
) -> Result<(), BoxDynError> {
    // The job's span: a child of the trace that enqueued it. The run's
    // storage, backend and kind are recorded once the run is read.
    let span = tracing::info_span!(
        "job",
        otel.kind = "consumer",
        job_id = %task_id.map(|id| id.to_string()).unwrap_or_default(),
        run_id = %job.run_id,
        batch_id = job.batch,
        partition_id = job.partition,
        webhook_id = job.webhook,
        worker = worker.name(),
        storage_id = tracing::field::Empty,
        backend = tracing::field::Empty,
        kind = tracing::field::Empty,
    );
    crate::telemetry::set_parent(&span, &crate::telemetry::Carried(&job.trace));
    let _running = ctx.current.enter(&job.run_id);
    // Spawned, not run inline: apalis polls every job of a worker inside the
    // worker's one task, which runs on the thread that awaits the worker
    // (the process's main thread), so all of a worker's slots shared one
    // core. Aborted when apalis drops this future, as the inline one was.
    let ctx = Arc::clone(&ctx);
    let name = worker.name().to_owned();
    let mut running = crate::attempt::AbortOnDrop(tokio::spawn(
        async move {
            match (job.webhook, job.batch, job.partition) {
                (Some(webhook), _, _) => super::execute_webhook(&ctx, webhook).await,
                (None, Some(batch), _) => {
                    let ended = super::execute_batch(&ctx, &job.run_id, batch, &name).await;
                    announce_end(&ctx, Ended::Batch, &job.run_id, &ended).await;
                    ended
                }
                (None, None, Some(part)) => {
                    let ended = super::execute_partition(&ctx, &job.run_id, part, &name).await;
                    announce_end(&ctx, Ended::Partition, &job.run_id, &ended).await;
                    ended
                }
                (None, None, None) => super::execute(&ctx, &job.run_id).await,
            }
        }
        .instrument(span),
    ));
    let result = (&mut running.0).await.unwrap_or_else(|err| {
        // A panic: the job fails (and is offered again) instead of taking
        // the worker and its other jobs down with it.
        tracing::error!(error = %err, "job panicked");
        Err(super::RetryLater(Error::Internal(format!(
            "the job panicked: {err}"
        ))))
    });
    if result.is_err() {
        // apalis-sqlite offers a failed job again at the next poll; a pause
        // keeps a passing outage from using up every attempt in a second.
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    result.map_err(Into::into)
}

const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// A batch or partition job of `run_id` that ended (not one to retry)
/// tells its run's waiters to look (see [`crate::ingest::ended`]).
async fn announce_end(
    ctx: &JobContext,
    what: Ended,
    run_id: &str,
    ended: &Result<(), super::RetryLater>,
) {
    if let (Ok(()), Some(queue)) = (ended, &ctx.queue) {
        queue.announce_end(what, run_id).await;
    }
}
