//! Jobs: what goes on the queue and what a worker does with it.
//!
//! A job carries only a run id; the run row holds everything else (kind,
//! cursor, counters, attempts). That keeps jobs tiny and makes them idempotent:
//! a duplicate or replayed job finds its run already ended and does nothing,
//! and a job re-queued after a worker died resumes the run from its cursor.
//!
//! apalis-redis 1.0 retries every failed job on its own schedule, so the
//! attempt limit is ours: `runs.attempts` counts them, and a permanent error
//! ends the run at once and acknowledges the job (see docs/DECISIONS.md,
//! "Our own attempt limit").
pub mod admission;
pub mod dead;
pub mod finished;
pub mod queue;
pub mod registry;
pub mod shares;
mod wake;

use std::{
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use opentelemetry::KeyValue;
use sea_orm::DatabaseConnection;
use serde::{Deserialize, Serialize};

pub use admission::{release_held, release_project};
pub use queue::{Pushed, Queue};

use crate::{
    Error, Result,
    attempt::{AbortOnDrop, Outcome},
    config::Settings,
    db::{
        entities::{project, storage as storage_entity},
        runs::{self, Attempt, Counters, RunStatus},
    },
    export::ExportJob,
    ingest::{ImportJob, ended},
    storage::StorageEnv,
    telemetry::TraceContext,
};

/// The queue payload: a run, one fan-out batch or listing partition of a
/// run, or the due deliveries of one webhook endpoint (`run_id` empty).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunJob {
    pub run_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<i64>,
    /// The W3C trace context of whoever enqueued the job (an API request, the
    /// scheduler's tick, a fanning-out sync), set by [`Queue::push`]; the
    /// job's span continues that trace.
    #[serde(default, skip_serializing_if = "TraceContext::is_empty")]
    pub trace: TraceContext,
}

impl RunJob {
    pub fn for_run(run_id: impl Into<String>) -> Self {
        RunJob {
            run_id: run_id.into(),
            batch: None,
            partition: None,
            webhook: None,
            trace: TraceContext::new(),
        }
    }

    pub fn for_webhook(webhook_id: i64) -> Self {
        RunJob {
            webhook: Some(webhook_id),
            ..RunJob::for_run("")
        }
    }

    pub fn for_batch(run_id: impl Into<String>, batch: i64) -> Self {
        RunJob {
            batch: Some(batch),
            ..RunJob::for_run(run_id)
        }
    }

    pub fn for_partition(run_id: impl Into<String>, partition: i64) -> Self {
        RunJob {
            partition: Some(partition),
            ..RunJob::for_run(run_id)
        }
    }
}

/// Everything a job handler needs; shared by all jobs of a process.
#[derive(Debug)]
pub struct JobContext {
    pub db: DatabaseConnection,
    pub settings: Settings,
    pub storage_env: StorageEnv,
    /// The queue big Tasks-mode runs fan out to; `None` runs everything in
    /// this process (the one-shot CLI).
    pub queue: Option<Queue>,
    /// Set when the process is shutting down: running imports stop at their
    /// next page and hand the run back (see [`execute`]).
    pub stopping: AtomicBool,
    /// The jobs this process is executing now (its worker registration).
    pub current: Arc<registry::Current>,
    /// The object reads its imports share (see [`crate::ingest::reads`]).
    pub reads: crate::ingest::reads::Reads,
    /// Set once [`Queue::run_worker`] has registered the worker: its
    /// `/readyz` is 503 before, and again once `stopping` (see `lifecycle`;
    /// a worker whose `run_worker` returns exits).
    pub taking_jobs: AtomicBool,
    /// The slots webhook jobs may hold at once: half the worker's (at
    /// least one), so receivers that answer slowly cannot take every slot
    /// from runs.
    pub webhook_slots: tokio::sync::Semaphore,
    /// How many of those each project's endpoints hold: at most half (at
    /// least one), so one tenant's slow receivers cannot take every
    /// webhook slot from the others.
    pub webhook_shares: shares::Shares,
}

impl JobContext {
    pub fn new(db: DatabaseConnection, settings: Settings, queue: Option<Queue>) -> Arc<Self> {
        let storage_env = StorageEnv::from_settings(&settings);
        let reads = crate::ingest::reads::Reads::for_worker(&settings.worker);
        let webhook_slots = (settings.worker.concurrency / 2).max(1);
        Arc::new(JobContext {
            db,
            settings,
            storage_env,
            queue,
            stopping: AtomicBool::new(false),
            current: Arc::default(),
            reads,
            taking_jobs: AtomicBool::new(false),
            webhook_slots: tokio::sync::Semaphore::new(webhook_slots),
            webhook_shares: shares::Shares::new(webhook_slots.div_ceil(2)),
        })
    }
}

/// The one way a job fails: try it again later (the run stays `running`
/// and resumes from its cursor). Everything else is recorded on the run by
/// [`execute`], and the job is done.
#[derive(Debug)]
pub struct RetryLater(pub Error);

impl std::fmt::Display for RetryLater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "will retry: {}", self.0)
    }
}

impl std::error::Error for RetryLater {}

/// Runs one attempt of a run. Permanent failures end the run (`failed`) and
/// return `Ok`: the job is done, there is nothing to retry. Runs in the
/// caller's span (the queue's `job` span carries the run id).
pub async fn execute(ctx: &JobContext, run_id: &str) -> Result<(), RetryLater> {
    // A token per attempt: the run's lease, checked by every write it makes.
    let lease = ulid::Ulid::new().to_string();
    let Some(run) = take_lease(ctx, run_id, &lease).await? else {
        return Ok(());
    };
    let max = i64::from(ctx.settings.worker.max_attempts);
    if run.attempts > max {
        let error = crate::attempt::gave_up(max, run.error.as_deref());
        return end(ctx, &run, RunStatus::Failed, Some(error), &lease).await;
    }
    let every = ctx.settings.worker.heartbeat;
    // An attempt that writes to its storage stops a heartbeat before its
    // lease could be taken, when it cannot renew it (the settings make the
    // lease at least two heartbeats).
    let keep = writes_the_storage(&run.kind)
        .then(|| ctx.settings.worker.lease_ttl().saturating_sub(every));
    // Aborted when dropped, so even a panicking attempt stops renewing its lease.
    let mut heartbeat = AbortOnDrop(tokio::spawn(heartbeat(
        ctx.db.clone(),
        run_id.to_owned(),
        lease.clone(),
        every,
        keep,
    )));
    let timer = JobTimer::start(&run.kind);
    // The attempt stops at once when the run ends under it (cancelled):
    // whatever it would still do commits nothing. Dropped mid-way it is as
    // if its worker were killed there, which every write is made to
    // survive.
    let result = tokio::select! {
        result = attempt(ctx, &run, &lease) => result,
        beat = &mut heartbeat.0 => match beat {
            Ok(Beat::Unrenewed(unrenewed)) => Err(Error::Transient(format!(
                "the run's lease could not be renewed for {} s (the database did not answer); the attempt stopped before another could take the run",
                unrenewed.as_secs()
            ))),
            _ => {
                tracing::info!("the run ended under the attempt (cancelled), or another attempt took it over; attempt stopped");
                Ok(Outcome::Stopped)
            }
        }
    };
    drop(heartbeat);
    let finished = matches!(result, Ok(Outcome::Finished));
    let concluded = conclude(ctx, &run, &lease, result, timer).await;
    // The attempt is over, its uploads in flight dropped with it: a run
    // that ended under it (cancelled) no longer holds its storage's next
    // run back (see `runs::begin_attempt`). Left held, the lease does so
    // until it is stale. (A finished attempt holds nothing back: only a
    // cancelled run's lease does.)
    if !finished {
        let _ = runs::let_go(&ctx.db, run_id, &lease).await;
    }
    concluded
}

/// Starts an attempt (see [`runs::begin_attempt`]): the run with its lease
/// taken, or `None` when there is nothing to do (ended, or deleted with its
/// storage); a retry when another live attempt holds it.
async fn take_lease(
    ctx: &JobContext,
    run_id: &str,
    lease: &str,
) -> Result<Option<Box<crate::db::entities::sync_run::Model>>, RetryLater> {
    let lease_ttl = ctx.settings.worker.lease_ttl();
    match runs::begin_attempt(&ctx.db, run_id, lease, lease_ttl).await {
        // Its storage or project was deleted (the run with it): nothing to do.
        Err(Error::NotFound(_)) => Ok(None),
        Err(err) => Err(RetryLater(err)),
        Ok(Attempt::Started(run)) => Ok(Some(run)),
        Ok(Attempt::Ended) => {
            tracing::debug!("run already ended; nothing to do");
            Ok(None)
        }
        // Another attempt is alive; if it dies, its lease goes stale and
        // this retry (or its own re-queued job) takes over.
        Ok(Attempt::Busy) => Err(RetryLater(Error::Transient(format!(
            "run {run_id} is held by another live attempt"
        )))),
    }
}

/// An attempt's job metrics: started when made, finished with an outcome.
struct JobTimer {
    kind: String,
    started: std::time::Instant,
}

impl JobTimer {
    fn start(kind: &str) -> Self {
        crate::metrics::metrics()
            .jobs_started
            .add(1, &[KeyValue::new("kind", kind.to_owned())]);
        JobTimer {
            kind: kind.to_owned(),
            started: std::time::Instant::now(),
        }
    }

    fn finish(self, outcome: &'static str) {
        let m = crate::metrics::metrics();
        let labels = [
            KeyValue::new("kind", self.kind),
            KeyValue::new("outcome", outcome),
        ];
        m.jobs_finished.add(1, &labels);
        m.job_duration
            .record(self.started.elapsed().as_secs_f64(), &labels);
    }
}

/// Ends the run, or hands it back, as the attempt's result says.
async fn conclude(
    ctx: &JobContext,
    run: &crate::db::entities::sync_run::Model,
    lease: &str,
    result: Result<Outcome>,
    timer: JobTimer,
) -> Result<(), RetryLater> {
    let run_id = run.id.as_str();
    match result {
        Ok(Outcome::Finished) => {
            let now = runs::get(&ctx.db, run_id).await.map_err(RetryLater)?;
            finished(ctx, &now, lease, timer).await
        }
        Ok(Outcome::Stopped) => {
            // The heartbeat may see the run ended by this attempt's own last
            // commit (an import's status commits with its listing's end)
            // before the attempt returns: that is a finish, not a stop.
            let ended_here = runs::get(&ctx.db, run_id).await.ok().filter(|now| {
                now.lease_owner.as_deref() == Some(lease)
                    && RunStatus::parse(&now.status).is_some_and(RunStatus::is_completed)
            });
            if let Some(now) = ended_here {
                return finished(ctx, &now, lease, timer).await;
            }
            timer.finish("stopped");
            Ok(())
        }
        Err(err) if err.is_transient() => {
            timer.finish("retry");
            tracing::warn!(error = %err, attempt = run.attempts, "run attempt failed; it will be retried");
            // Kept on the row so ops see why a run is slow, and so the final
            // "gave up" message can name the cause; the lease is let go so the
            // retry need not wait for it to go stale. An attempt stopped
            // by its worker's shutdown after moving the run on does not
            // count against the run.
            let handed_back =
                ctx.stopping.load(std::sync::atomic::Ordering::Relaxed) && moved_on(ctx, run).await;
            let _ = runs::release(&ctx.db, run_id, lease, &err.to_string(), handed_back).await;
            Err(RetryLater(err))
        }
        Err(err) => {
            tracing::warn!(error = %err, "run failed");
            timer.finish("failed");
            end(ctx, run, RunStatus::Failed, Some(err.to_string()), lease).await
        }
    }
}

/// Whether the attempt moved its run on since it began (`began`): its
/// cursor or its counters. Only such an attempt, handed back at its
/// worker's shutdown, gives its attempt back: a run whose attempts bring
/// their worker down before any progress (an eviction for the memory it
/// takes) is still ended by the attempt limit.
async fn moved_on(ctx: &JobContext, began: &crate::db::entities::sync_run::Model) -> bool {
    let Ok(now) = runs::get(&ctx.db, &began.id).await else {
        return false;
    };
    // Every counter: a big task file's rows move only `created` (or
    // `existed`) until its page commits and moves the cursor.
    now.cursor != began.cursor || runs::Counters::of(&now) != runs::Counters::of(began)
}

/// An attempt that did all its work (`run` as read after it): the run
/// ends `completed` or `completed_with_errors` by its counters (an import's
/// listing already ended it so; then [`end`] only does what follows an
/// end).
async fn finished(
    ctx: &JobContext,
    run: &crate::db::entities::sync_run::Model,
    lease: &str,
    timer: JobTimer,
) -> Result<(), RetryLater> {
    let status = RunStatus::completed(run.failed);
    timer.finish(status.as_str());
    record_totals(run);
    end(ctx, run, status, None, lease).await
}

/// A finished run's totals, counted once (on the attempt that ends it).
fn record_totals(run: &crate::db::entities::sync_run::Model) {
    let m = crate::metrics::metrics();
    let kind = [KeyValue::new("kind", run.kind.clone())];
    let add = |counter: &opentelemetry::metrics::Counter<u64>, n: i64| {
        if n > 0 {
            counter.add(n as u64, &kind);
        }
    };
    add(&m.objects_listed, run.listed);
    add(&m.tasks_created, run.created);
    add(&m.annotations_exported, run.exported);
    add(&m.annotations_deleted, run.deleted);
    add(&m.object_errors, run.failed);
}

#[async_trait::async_trait]
impl crate::ingest::FanOut for Queue {
    async fn push_batch(&self, run_id: &str, batch: i64) -> Result<bool> {
        let job = RunJob::for_batch(run_id, batch);
        let pushed = self.push(job, &format!("{run_id}:batch:{batch}")).await?;
        Ok(matches!(pushed, Pushed::Queued))
    }

    async fn push_partition(&self, run_id: &str, partition: i64, round: &str) -> Result<bool> {
        let job = RunJob::for_partition(run_id, partition);
        let dedup = format!("{run_id}:partition:{partition}:{round}");
        Ok(matches!(self.push(job, &dedup).await?, Pushed::Queued))
    }

    fn watch(&self, what: ended::Ended, run_id: &str) -> ended::Watch {
        self.endings().watch(what, run_id)
    }

    async fn announce(&self, what: ended::Ended, run_id: &str) {
        self.announce_end(what, run_id).await;
    }
}

/// The storage and project a run works on.
async fn owners(
    ctx: &JobContext,
    run: &crate::db::entities::sync_run::Model,
) -> Result<(storage_entity::Model, project::Model)> {
    let (storage, project) = runs::owners(&ctx.db, run.storage_id).await?;
    record_owners(run, &storage);
    Ok((storage, project))
}

/// Run `run_id` with its storage and project, read in one statement (a
/// fan-out job's first step, before its first read); `None` when the run
/// or either owner was deleted (the run goes with them).
async fn run_and_owners(
    ctx: &JobContext,
    run_id: &str,
) -> Result<
    Option<(
        crate::db::entities::sync_run::Model,
        storage_entity::Model,
        project::Model,
    )>,
> {
    let (run, owners) = match runs::with_owners(&ctx.db, run_id).await {
        Err(Error::NotFound(_)) => return Ok(None),
        other => other?,
    };
    let Some((storage, project)) = owners else {
        return Ok(None);
    };
    record_owners(&run, &storage);
    Ok(Some((run, storage, project)))
}

/// Names the job's span after what it works on.
fn record_owners(run: &crate::db::entities::sync_run::Model, storage: &storage_entity::Model) {
    let span = tracing::Span::current();
    span.record("storage_id", storage.id);
    span.record("backend", storage.backend.as_str());
    span.record("kind", run.kind.as_str());
}

/// An import of `run` in this process, holding no lease; `fan_out` lets
/// it hand batches and partitions to the queue (when there is one).
fn import_job<'a>(
    ctx: &'a JobContext,
    run: &'a crate::db::entities::sync_run::Model,
    storage: &'a storage_entity::Model,
    project: &'a project::Model,
    fan_out: bool,
) -> ImportJob<'a> {
    ImportJob {
        db: &ctx.db,
        env: &ctx.storage_env,
        run,
        storage,
        project,
        settings: &ctx.settings.worker,
        fanout: ctx
            .queue
            .as_ref()
            .filter(|_| fan_out)
            .map(|q| q as &dyn crate::ingest::FanOut),
        lease: None,
        stopping: Some(&ctx.stopping),
        part: None,
        reads: &ctx.reads,
    }
}

async fn attempt(
    ctx: &JobContext,
    run: &crate::db::entities::sync_run::Model,
    lease: &str,
) -> Result<Outcome> {
    let (storage, project) = owners(ctx, run).await?;
    match runs::RunKind::parse(&run.kind) {
        Some(runs::RunKind::Import) => {
            ImportJob {
                lease: Some(lease),
                ..import_job(ctx, run, &storage, &project, true)
            }
            .run()
            .await
        }
        Some(runs::RunKind::Export) => {
            ExportJob {
                db: &ctx.db,
                env: &ctx.storage_env,
                run,
                storage: &storage,
                project: &project,
                settings: &ctx.settings.worker,
                lease: Some(lease),
                stopping: Some(&ctx.stopping),
            }
            .run()
            .await
        }
        _ => Err(Error::invalid(
            "unsupported_run_kind",
            None,
            format!("{} runs are not available in this build yet", run.kind),
        )),
    }
}

/// Runs one fan-out batch of an import. Like [`execute`], permanent failures
/// are recorded (on the batch's objects that have no task) and the job is
/// acknowledged. A batch whose run ended (cancelled), before it or while it
/// reads, is closed so that nothing waits on it.
pub async fn execute_batch(
    ctx: &JobContext,
    run_id: &str,
    batch_id: i64,
    worker: &str,
) -> Result<(), RetryLater> {
    use crate::db::batches;
    // Two statements before the first read, one after the other: at once,
    // a fresh worker's first batches needed more connections than it keeps
    // warm (db::connect_worker) and opened new ones in the middle of their
    // first reads.
    let Some((run, storage, project)) = run_and_owners(ctx, run_id).await.map_err(RetryLater)?
    else {
        return Ok(()); // deleted with its storage
    };
    // A running run's batch claimed by one of the run's own jobs within a
    // lease is that job's to finish; a stopped run's batch is closed below
    // whoever claimed it.
    let running = run.status == RunStatus::Running.as_str();
    let stale_before = running.then(|| ctx.settings.worker.stale_before());
    let Some(batch) = batches::count_attempt(&ctx.db, batch_id, stale_before)
        .await
        .map_err(RetryLater)?
    else {
        return Ok(()); // already done (a duplicate job), or its run's job runs it
    };
    let job = import_job(ctx, &run, &storage, &project, false);
    if !running {
        return close_batch(&job, batch_id, worker).await;
    }
    if batch.attempts > i64::from(ctx.settings.worker.max_attempts) {
        return job.give_up_batch(&batch, worker).await.map_err(RetryLater);
    }
    let outcome = tokio::select! {
        outcome = job.run_batch(&batch, worker) => outcome,
        () = run_stopped(&ctx.db, run_id, ctx.settings.worker.heartbeat) => {
            tracing::info!(batch_id, "the run ended under the batch (cancelled); batch stopped");
            return close_batch(&job, batch_id, worker).await;
        }
    };
    match outcome {
        Ok(_) => Ok(()),
        Err(err) if err.is_transient() => {
            // Kept for the "gave up" message, as a run's is (`conclude`).
            let _ = batches::note_error(&ctx.db, batch_id, &err.to_string()).await;
            // Given back: the job's retry, or the run's waiting job, takes
            // it again (its attempts bound the retries).
            let _ = batches::release_claim(&ctx.db, batch_id, batch.attempts).await;
            Err(RetryLater(err))
        }
        Err(err) => job
            .give_up_batch_for(&batch, worker, err.to_string())
            .await
            .map_err(RetryLater),
    }
}

/// Closes a batch of a run that is no longer running: nothing is counted
/// or added, and nothing waits on it.
async fn close_batch(
    job: &crate::ingest::ImportJob<'_>,
    batch_id: i64,
    worker: &str,
) -> Result<(), RetryLater> {
    job.finish_batch(batch_id, worker, Default::default())
        .await
        .map_err(RetryLater)?;
    Ok(())
}

/// Lists one partition of an import run (see `ingest::partitions`). A
/// partition that is done, given up on, or held by a live attempt needs
/// nothing; a transient failure retries the job (the partition counts its
/// attempts), and anything else is the run's job's to report.
pub async fn execute_partition(
    ctx: &JobContext,
    run_id: &str,
    partition: i64,
    worker: &str,
) -> Result<(), RetryLater> {
    let Some((run, storage, project)) = run_and_owners(ctx, run_id).await.map_err(RetryLater)?
    else {
        return Ok(()); // deleted with its storage
    };
    if run.status != RunStatus::Running.as_str() {
        return Ok(());
    }
    let job = import_job(ctx, &run, &storage, &project, true);
    let lease = ulid::Ulid::new().to_string();
    let max = i64::from(ctx.settings.worker.max_attempts);
    let claimed = crate::db::partitions::claim(
        &ctx.db,
        partition,
        &lease,
        ctx.settings.worker.stale_before(),
        max,
    )
    .await
    .map_err(RetryLater)?;
    let Some(part) = claimed else {
        return Ok(());
    };
    let result = tokio::select! {
        result = job.list_partition(&part, &lease, worker) => result,
        () = run_stopped(&ctx.db, run_id, ctx.settings.worker.heartbeat) => {
            // Nothing waits on the partition of an ended run.
            tracing::info!(partition, "the run ended under the partition (cancelled); listing stopped");
            return Ok(());
        }
    };
    match result {
        Err(err) if err.is_transient() => Err(RetryLater(err)),
        _ => Ok(()),
    }
}

async fn end(
    ctx: &JobContext,
    run: &crate::db::entities::sync_run::Model,
    status: RunStatus,
    error: Option<String>,
    lease: &str,
) -> Result<(), RetryLater> {
    runs::finish(&ctx.db, &run.id, status, error, Some(lease))
        .await
        .map_err(RetryLater)?;
    if let Some(queue) = &ctx.queue {
        after_end(ctx, queue, run, status).await;
    }
    Ok(())
}

/// What a run's end sets going now rather than at the scheduler's next
/// tick: the export events saved while it was finishing, its project's next
/// held run (its slot under the cap is free), and the run's webhook events.
/// Failures are the tick's to make up for.
async fn after_end(
    ctx: &JobContext,
    queue: &Queue,
    run: &crate::db::entities::sync_run::Model,
    status: RunStatus,
) {
    if let Err(err) = export_late_events(ctx, queue, run, status).await {
        tracing::debug!(error = %err, "late export events not dispatched; the scheduler's tick will");
    }
    if let Err(err) = release_project(&ctx.db, queue, &ctx.settings, run.project_id).await {
        tracing::debug!(error = %err, "releasing held runs failed; the scheduler's tick will");
    }
    if let Err(err) = dispatch_webhooks(&ctx.db, queue).await {
        tracing::debug!(error = %err, "webhook dispatch failed; the scheduler's tick will");
    }
}

/// Starts the next events run of an export run's storage when events wait
/// in its outbox. A save that committed while this run was finishing (after
/// its last, empty page) saw the run live and started none; without this it
/// would wait for the scheduler's tick. Only a completed run does this: one
/// that failed would start the next failure at once, in a loop.
async fn export_late_events(
    ctx: &JobContext,
    queue: &Queue,
    run: &crate::db::entities::sync_run::Model,
    status: RunStatus,
) -> Result<()> {
    if run.kind != runs::RunKind::Export.as_str() || status != RunStatus::Completed {
        return Ok(());
    }
    if crate::db::outbox::any_waiting(&ctx.db, run.storage_id).await? {
        enqueue_events(&ctx.db, queue, &ctx.settings, run.storage_id).await?;
    }
    Ok(())
}

/// Delivers the due events of one webhook endpoint (see
/// [`crate::webhooks::Delivery`]). Failed attempts are the delivery's to
/// retry, so only a database outage retries the job. A job that finds
/// every webhook slot of the worker held, or its project's share of them
/// ([`shares::Shares`]), ends at once: the endpoint's deliveries stay due, and the
/// scheduler's dispatch pushes its next job (within 30 s).
pub async fn execute_webhook(ctx: &JobContext, webhook_id: i64) -> Result<(), RetryLater> {
    let Ok(_slot) = ctx.webhook_slots.try_acquire() else {
        tracing::debug!(
            webhook_id,
            "every webhook slot is held; the next dispatch pushes it again"
        );
        return Ok(());
    };
    let Some(hook) = crate::db::webhooks::find(&ctx.db, webhook_id)
        .await
        .map_err(RetryLater)?
    else {
        return Ok(()); // deleted
    };
    let Some(_share) = ctx.webhook_shares.take(hook.project_id) else {
        tracing::debug!(
            webhook_id,
            "the endpoint's project holds its share of the webhook slots; the next dispatch pushes it again"
        );
        return Ok(());
    };
    let sender = crate::webhooks::Sender::new(&ctx.settings.webhook_policy).map_err(RetryLater)?;
    let delivery = crate::webhooks::Delivery {
        db: &ctx.db,
        secrets: ctx.settings.secret_box.as_deref(),
        sender: &sender,
        max_age: ctx.settings.webhook_max_age,
        stopping: &ctx.stopping,
    };
    match delivery.run(webhook_id).await {
        Err(err) if err.is_transient() => Err(RetryLater(err)),
        Err(err) => {
            tracing::warn!(webhook_id, error = %err, "webhook delivery stopped");
            let until = crate::clock::now() + chrono::Duration::seconds(UNSENDABLE_RETRY_SECS);
            let why = format!("not sent: {err}");
            crate::db::webhooks::postpone_head(&ctx.db, webhook_id, until, &why)
                .await
                .map_err(RetryLater)
        }
        Ok(()) => Ok(()),
    }
}

/// How long a delivery that could not be attempted at all waits before it
/// is tried again (a secret key restored, an endpoint fixed).
const UNSENDABLE_RETRY_SECS: i64 = 3600;

/// Endpoints handled per dispatch.
const WEBHOOKS_PER_DISPATCH: u64 = 1000;
/// A delivery job lost on its way (Redis flushed) is pushed again after
/// this long: the dedup key changes with it.
const WEBHOOK_REPUSH_SECS: i64 = 30;

/// Pushes a delivery job for every endpoint with a due delivery at the
/// head of its queue (the scheduler's tick, and a worker that just ended a
/// run). A job for an endpoint being delivered to is harmless: the
/// endpoint's lease turns it away. Returns how many were pushed.
pub async fn dispatch_webhooks(db: &DatabaseConnection, queue: &Queue) -> Result<usize> {
    let now = crate::clock::now();
    let bucket = now.timestamp() / WEBHOOK_REPUSH_SECS;
    let mut pushed = 0;
    for (webhook_id, delivery_id, attempts) in
        crate::db::webhooks::due(db, now, WEBHOOKS_PER_DISPATCH).await?
    {
        match push_webhook(queue, webhook_id, delivery_id, attempts, bucket).await? {
            Pushed::Queued => pushed += 1,
            Pushed::Full => break,
        }
    }
    Ok(pushed)
}

/// Pushes the job of the endpoint whose delivery `delivery` was just
/// queued again (a redelivery), rather than a dispatch of every due
/// endpoint for each call.
pub async fn dispatch_redelivery(
    queue: &Queue,
    delivery: &crate::db::entities::webhook_delivery::Model,
) -> Result<Pushed> {
    let bucket = crate::clock::now().timestamp() / WEBHOOK_REPUSH_SECS;
    push_webhook(
        queue,
        delivery.webhook_id,
        delivery.id,
        delivery.attempts,
        bucket,
    )
    .await
}

/// One endpoint's job, once per `bucket` of [`WEBHOOK_REPUSH_SECS`] for a
/// delivery and its attempt count.
async fn push_webhook(
    queue: &Queue,
    webhook_id: i64,
    delivery_id: i64,
    attempts: i32,
    bucket: i64,
) -> Result<Pushed> {
    let dedup = format!("webhook:{webhook_id}:{delivery_id}:{attempts}:{bucket}");
    queue.push(RunJob::for_webhook(webhook_id), &dedup).await
}

/// Why a run's heartbeat ended.
enum Beat {
    /// The run ended (cancelled), is gone, or another attempt took it.
    Ended,
    /// The lease went unrenewed for `keep` (the database did not answer),
    /// and the attempt writes to its storage.
    Unrenewed(Duration),
}

/// Beats the run's heart (and renews the attempt's lease) while it works on
/// something slow (a big object), so the run never looks stale while alive.
/// Returns when the run has ended (cancelled) or is gone: until then a
/// cancel was seen only at the attempt's next commit, which a long listing
/// or a big object could put off for minutes.
///
/// With `keep` (an attempt that writes to its storage: an export), it also
/// returns when another attempt took the lease, and once `keep` has passed
/// since the last renewal that succeeded was sent (the lease less a
/// heartbeat: before the lease could be taken), however the database
/// answers meanwhile: an export's uploads would go on beside a new
/// attempt's, and an older body could land after a newer one, under a
/// link that says the newer. An import's attempt does not end then: its
/// own work (a partition, a batch, under leases of their own) still
/// commits, and its next run checkpoint is refused as before.
async fn heartbeat(
    db: DatabaseConnection,
    run_id: String,
    lease: String,
    every: Duration,
    keep: Option<Duration>,
) -> Beat {
    use tokio::time::Instant;
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    // The lease was taken just before this started.
    let mut deadline = keep.map(|keep| Instant::now() + keep);
    let nothing = Counters::default();
    loop {
        match deadline {
            Some(deadline) => tokio::select! {
                _ = tick.tick() => {}
                _ = tokio::time::sleep_until(deadline) => return Beat::Unrenewed(keep.unwrap_or_default()),
            },
            None => {
                tick.tick().await;
            }
        }
        let sent = Instant::now();
        let renewal = runs::checkpoint(&db, &run_id, &nothing, None, Some(&lease));
        let renewed = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.min(sent + every), renewal)
                .await
                .unwrap_or_else(|_| Err(Error::Transient("the lease's renewal timed out".into()))),
            None => renewal.await,
        };
        match renewed {
            Ok(true) => deadline = keep.map(|keep| sent + keep),
            Ok(false) => {
                if keep.is_some() || has_stopped(&db, &run_id).await {
                    return Beat::Ended;
                }
            }
            Err(err) => tracing::debug!(error = %err, "heartbeat failed"),
        }
    }
}

/// Returns once run `run_id` is no longer running (cancelled, ended, or
/// deleted), looking every `every`: what a fan-out job races its work
/// with, so that a cancel stops it within a heartbeat as it stops the
/// run's own job, rather than at its next commit (minutes away for a batch
/// of big objects). Work shorter than `every` costs no query.
async fn run_stopped(db: &DatabaseConnection, run_id: &str, every: Duration) {
    let mut tick = tokio::time::interval(every);
    // A slow database spaces the looks out rather than bunching them.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if has_stopped(db, run_id).await {
            return;
        }
    }
}

/// Whether run `run_id` is no longer running or is gone; false when the
/// database cannot tell (it is asked again at the next look).
async fn has_stopped(db: &DatabaseConnection, run_id: &str) -> bool {
    match runs::get(db, run_id).await {
        Ok(run) => run.status != RunStatus::Running.as_str(),
        Err(Error::NotFound(_)) => true,
        Err(err) => {
            tracing::debug!(error = %err, "looking at the run failed");
            false
        }
    }
}

/// Whether runs of `kind` write to their storage (exports, deletes).
fn writes_the_storage(kind: &str) -> bool {
    runs::RunKind::parse(kind).is_some_and(|k| k != runs::RunKind::Import)
}

/// The kind of run a sync of this storage is: an import for a source, an
/// export for a target.
pub fn run_kind(storage: &storage_entity::Model) -> runs::RunKind {
    match crate::storage::Role::of(storage) {
        crate::storage::Role::Source => runs::RunKind::Import,
        crate::storage::Role::Target => runs::RunKind::Export,
    }
}

/// Starts an `events` export run for a target storage with annotation
/// events in its outbox, unless a run of the storage is live (it drains the
/// outbox before it ends; what arrives after is the next run's). The run
/// goes to the queue as its project's cap allows ([`release_project`]);
/// until then it is held, and the events stay in the outbox until a run
/// drains them.
pub async fn enqueue_events(
    db: &DatabaseConnection,
    queue: &Queue,
    settings: &Settings,
    storage_id: i64,
) -> Result<bool> {
    let (run, live) =
        runs::create_or_get_live_scoped(db, storage_id, runs::RunKind::Export, runs::SCOPE_EVENTS)
            .await?;
    if live {
        return Ok(false);
    }
    release_new(db, queue, settings, &run).await;
    Ok(true)
}

/// Lets the project of a run just created release what it may (the new
/// run, when the project has room and no older held run). A queue error
/// is only logged: the run is in the database, and the scheduler's tick or
/// stalled-run sweep pushes it once the queue answers.
async fn release_new(
    db: &DatabaseConnection,
    queue: &Queue,
    settings: &Settings,
    run: &crate::db::entities::sync_run::Model,
) {
    match release_project(db, queue, settings, run.project_id).await {
        Ok(done) if done.full => {
            tracing::warn!(run_id = %run.id, "queue backlog full; held runs wait for room")
        }
        Ok(_) => {}
        Err(err) => {
            tracing::warn!(run_id = %run.id, error = %err, "run not queued yet; the scheduler will")
        }
    }
}

/// Starts export runs for the storages with annotation events waiting (the
/// scheduler's tick; the API also calls [`enqueue_events`] right away),
/// but for a storage whose last such run failed less than
/// [`EVENTS_PAUSE_AFTER_FAILURE`] ago: its events wait that long (a
/// target down or refusing its credentials failed a run every tick).
/// Returns how many runs were started.
pub async fn dispatch_outbox(
    db: &DatabaseConnection,
    queue: &Queue,
    settings: &Settings,
) -> Result<usize> {
    let mut started = 0;
    let paused_since = crate::clock::now() - EVENTS_PAUSE_AFTER_FAILURE;
    for storage_id in crate::db::outbox::pending_storages(db, 1000).await? {
        if runs::failed_since(db, storage_id, runs::SCOPE_EVENTS, paused_since).await? {
            continue;
        }
        if enqueue_events(db, queue, settings, storage_id).await? {
            started += 1;
        }
    }
    Ok(started)
}

/// How long the events of a storage wait after its last events run failed.
pub const EVENTS_PAUSE_AFTER_FAILURE: chrono::Duration = chrono::Duration::minutes(5);

/// Starts a sync of `storage`: creates a queued run, or returns the
/// storage's live run (`true`). The new run goes to the queue as its
/// project's cap allows ([`release_project`]); until then it is held (see
/// `db::admission`), as it is while the queue's backlog is full. Returns
/// the run as it is after that.
pub async fn enqueue_sync(
    db: &DatabaseConnection,
    queue: &Queue,
    settings: &Settings,
    storage: &storage_entity::Model,
) -> Result<(crate::db::entities::sync_run::Model, bool)> {
    let made = runs::create_or_get_live(db, storage.id, run_kind(storage)).await?;
    started(db, queue, settings, made).await
}

/// A run just made (`false`) let go as its project allows
/// ([`release_new`]) and read back; a live run found (`true`) as it is.
async fn started(
    db: &DatabaseConnection,
    queue: &Queue,
    settings: &Settings,
    (run, live): (crate::db::entities::sync_run::Model, bool),
) -> Result<(crate::db::entities::sync_run::Model, bool)> {
    if live {
        return Ok((run, true));
    }
    release_new(db, queue, settings, &run).await;
    Ok((runs::get(db, &run.id).await?, false))
}

/// [`enqueue_sync`] for the periodic tick, which claimed the storage's
/// period: `None` when the storage has been paused or deleted since (see
/// `runs::create_periodic`).
pub async fn enqueue_periodic_sync(
    db: &DatabaseConnection,
    queue: &Queue,
    settings: &Settings,
    storage: &storage_entity::Model,
) -> Result<Option<(crate::db::entities::sync_run::Model, bool)>> {
    match runs::create_periodic(db, storage.id, run_kind(storage)).await? {
        Some(made) => Ok(Some(started(db, queue, settings, made).await?)),
        None => Ok(None),
    }
}

/// Starts a `retry` run that reads again the objects `of` (an ended import
/// run) failed on, as [`enqueue_sync`] starts a sync; `true` with the
/// storage's live run when it has one (no retry run is made then).
pub async fn enqueue_retry(
    db: &DatabaseConnection,
    queue: &Queue,
    settings: &Settings,
    of: &crate::db::entities::sync_run::Model,
) -> Result<(crate::db::entities::sync_run::Model, bool)> {
    let made = runs::create_retry(db, of).await?;
    started(db, queue, settings, made).await
}

/// Runs one sweep enqueues at most (the backlog limit stops it earlier).
const REQUEUE_PER_TICK: u64 = 1000;

/// Enqueues again admitted live runs that showed no sign of life for
/// `settings.requeue_after`: their job was lost (Redis flushed, a scheduler
/// died between admission and push, a push that failed). One whose job
/// Redis still holds to run (waiting its turn behind a backlog) is only
/// counted alive again ([`Queue::holds_job_of`]). A duplicate of a job
/// that was only slow is harmless: the run's lease turns it away. Held
/// runs are not its business (see [`release_held`]): it never pushes a run
/// its project's cap has not admitted. First, while the fleet recovers from
/// a queue that forgot its jobs, the queued runs it forgot
/// ([`push_forgotten`]) and the running runs it orphaned
/// ([`push_orphaned`]). Returns how many were pushed.
pub async fn requeue_stalled(
    db: &DatabaseConnection,
    queue: &Queue,
    settings: &Settings,
) -> Result<usize> {
    let recovery = settings.worker.lease_ttl() * RECOVERY_LEASES;
    let memory = queue.memory(recovery).await.unwrap_or_else(|err| {
        // Redis down: the regular sweep meets the same error, or not.
        tracing::debug!(error = %err, "could not ask the queue what it remembers");
        Default::default()
    });
    if memory.forgot {
        tracing::warn!("the queue forgot its jobs (Redis came back empty); pushing its runs again");
    }
    let (forgotten, orphaned) = match &memory.recovering {
        Some(loss) => (
            push_forgotten(db, queue, loss).await,
            push_orphaned(db, queue, settings, loss).await,
        ),
        None => (Ok(Vec::new()), Ok(Vec::new())),
    };
    let mut touched = forgotten.as_ref().cloned().unwrap_or_default();
    touched.extend(orphaned.as_ref().cloned().unwrap_or_default());
    let window = Ord::max(settings.requeue_after.as_secs(), 1);
    let now = crate::clock::now();
    let cutoff = now - chrono::Duration::seconds(window as i64);
    let mut stalled = runs::stalled(db, cutoff, REQUEUE_PER_TICK).await?;
    stalled.retain(|id| !touched.contains(id));
    let waiting = runs::queued_among(db, &stalled).await?;
    let mut pushed = touched.len();
    // One push per run per window: the idempotency key changes with it.
    let bucket = now.timestamp() as u64 / window;
    for run_id in stalled {
        // A queued run waiting its turn behind a long backlog still has
        // its job: pushed again every window, it met its duplicates running
        // (each retried as `Busy`) and filled the backlog with them. (A
        // running one is pushed: its job may be one that hangs.)
        let keys = pushes_of(&run_id, bucket, window);
        if waiting.contains(&run_id) && queue.holds_job_of(&keys).await.unwrap_or(false) {
            touched.push(run_id);
            continue;
        }
        let job = RunJob::for_run(&run_id);
        match queue
            .push(job, &format!("{run_id}:requeue:{bucket}"))
            .await?
        {
            Pushed::Queued => {
                pushed += 1;
                touched.push(run_id);
            }
            Pushed::Full => break,
        }
    }
    // A pushed queued run counts as alive for another window, so a run
    // waiting its turn in Redis is not pushed again and again while it
    // waits (a running one is taken over, or turned away, by its lease).
    // A forgotten one is then done with: the next tick pushes the next page.
    runs::mark_alive_if_queued(db, touched, now).await?;
    forgotten?;
    orphaned?;
    Ok(pushed)
}

/// The idempotency keys `run_id`'s jobs were pushed under lately: its
/// admission's and the stalled-run sweep's of the windows (`window`
/// seconds) before `bucket` that Redis still keeps a key of (an hour), at
/// most [`SWEEPS_LOOKED_AT`].
fn pushes_of(run_id: &str, bucket: u64, window: u64) -> Vec<String> {
    let kept = KEY_KEPT_SECS.div_ceil(window.max(1)).min(SWEEPS_LOOKED_AT);
    let sweeps = (1..=kept).filter_map(|back| bucket.checked_sub(back));
    std::iter::once(run_id.to_owned())
        .chain(sweeps.map(|b| format!("{run_id}:requeue:{b}")))
        .collect()
}

/// How long Redis keeps a push's idempotency key (see [`Queue::open`]).
const KEY_KEPT_SECS: u64 = 3600;
/// The most earlier windows' sweep pushes [`pushes_of`] names.
const SWEEPS_LOOKED_AT: u64 = 64;

/// How long after a loss of the queue's jobs the running runs it orphaned
/// are pushed again as soon as their lease is stale, in lease times.
const RECOVERY_LEASES: u32 = 4;

/// While the fleet recovers from the queue's loss `loss` ([`Queue::memory`]),
/// pushes the running runs whose lease went stale (with a heartbeat to
/// spare): their workers exited when Redis went away (a worker does), and
/// Redis has no copy of their jobs to hand out again, so they would wait
/// the whole stalled-run window otherwise. Once per run and loss (the
/// idempotency key names both), whichever replica pushes. The runs pushed.
async fn push_orphaned(
    db: &DatabaseConnection,
    queue: &Queue,
    settings: &Settings,
    loss: &str,
) -> Result<Vec<String>> {
    let heartbeat = chrono::Duration::from_std(settings.worker.heartbeat).unwrap_or_default();
    let stale = settings.worker.stale_before() - heartbeat;
    let mut pushed = Vec::new();
    for run_id in runs::running_with_stale_lease(db, stale, REQUEUE_PER_TICK).await? {
        let dedup = format!("{run_id}:orphaned:{loss}");
        match queue.push(RunJob::for_run(&run_id), &dedup).await? {
            Pushed::Queued => pushed.push(run_id),
            Pushed::Full => break,
        }
    }
    Ok(pushed)
}

/// While the fleet recovers from the queue's loss `loss` ([`Queue::memory`]:
/// Redis came back empty), pushes the admitted queued runs it forgot at
/// once, rather than after the stalled-run window: those admitted before
/// the loss was found and not pushed since, up to [`REQUEUE_PER_TICK`] a
/// tick (the caller marks them alive, so the next tick pushes the next
/// ones), until the backlog is full. Each goes under the key its admission
/// pushed it with, so a job Redis still has is not doubled. The runs
/// pushed.
async fn push_forgotten(db: &DatabaseConnection, queue: &Queue, loss: &str) -> Result<Vec<String>> {
    let Some(found) = loss
        .parse()
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
    else {
        return Ok(Vec::new()); // not a loss this version named
    };
    let mut pushed = Vec::new();
    for run_id in runs::admitted_queued(db, found, REQUEUE_PER_TICK).await? {
        match queue.push(RunJob::for_run(&run_id), &run_id).await? {
            Pushed::Queued => pushed.push(run_id),
            Pushed::Full => break,
        }
    }
    Ok(pushed)
}
