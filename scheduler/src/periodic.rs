//! Periodic work of the scheduler: syncs whose `sync_interval_seconds` came
//! round, export runs for storages with annotation events waiting in the
//! outbox (`jobs::dispatch_outbox`), held runs let onto the queue round-robin
//! across projects (`jobs::release_held`), the sweep that enqueues stalled
//! runs again (`jobs::requeue_stalled`), delivery jobs for webhook endpoints
//! with due events (`jobs::dispatch_webhooks`), the cleanup of expired
//! rows (webhook events and previous secrets past their time, idempotency
//! keys, audit rows, ended runs, gone workers), and the count of sealed
//! secrets by the key that opens them. Every replica ticks,
//! but each due storage is claimed with
//! one conditional UPDATE of its `next_sync_at`: only the replica whose UPDATE
//! changed the row enqueues, so a period yields one sync however many
//! schedulers run.
use std::time::Duration;

use chrono::Utc;
use labelsync::{
    db::{run_retention::Counted, storages},
    jobs,
    reseal::Mode,
};

use crate::api::AppState;

/// Due storages handled per tick.
const BATCH: u64 = 100;

/// Runs until the process stops.
pub async fn run(state: AppState, tick: Duration) {
    // Its own task: deleting a backlog of old rows must not hold up the
    // syncs that are due. Aborted with this one.
    let _cleanup = labelsync::task::AbortOnDrop(tokio::spawn(clean_up(state.clone())));
    let _count_sealed = labelsync::task::AbortOnDrop(tokio::spawn(count_sealed(state.clone())));
    let mut timer = tokio::time::interval(tick);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        timer.tick().await;
        // Periods, claims and stalled runs are on the database's clock.
        labelsync::db::sync_clock(&state.db).await;
        if let Err(err) = tick_once(&state).await {
            tracing::warn!(error = %err, "periodic sync tick failed");
        }
        match jobs::dispatch_outbox(&state.db, &state.queue, &state.settings).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(runs = n, "started export runs for annotation events"),
            Err(err) => tracing::warn!(error = %err, "outbox dispatch failed"),
        }
        match jobs::release_held(&state.db, &state.queue, &state.settings).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(runs = n, "released held runs"),
            Err(err) => tracing::warn!(error = %err, "releasing held runs failed"),
        }
        match jobs::requeue_stalled(&state.db, &state.queue, &state.settings).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(runs = n, "enqueued stalled runs again"),
            Err(err) => tracing::warn!(error = %err, "requeue sweep failed"),
        }
        if let Err(err) = jobs::dispatch_webhooks(&state.db, &state.queue).await {
            tracing::warn!(error = %err, "webhook dispatch failed");
        }
    }
}

/// Deletes what has outlived its retention at start, then every
/// [`PRUNE_EVERY`] (a pass that takes longer puts the next one off). A
/// full pass ([`prune_all`]) comes first and then every [`FULL_EVERY`],
/// and again at the next pass when one fails; the others apply the runs'
/// count rule to the storages that ended a run lately.
async fn clean_up(state: AppState) {
    let mut timer = tokio::time::interval(PRUNE_EVERY);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut full_due = tokio::time::Instant::now();
    loop {
        timer.tick().await;
        if tokio::time::Instant::now() < full_due {
            prune(&state).await;
        } else if prune_all(&state).await {
            full_due = tokio::time::Instant::now() + FULL_EVERY;
        }
    }
}

/// Counts the sealed secrets by the key that opens them
/// (`labelsync::reseal`, [`Mode::Count`]: nothing written) at start, then
/// every [`COUNT_SEALED_EVERY`], for `labelsync_secrets_sealed` and the
/// log. Sealing them again is the operator's step (`labelsync-scheduler
/// reseal`), taken once every process has the new key: one still without
/// it could not open what a pass here would seal. Nothing to do without a
/// key.
async fn count_sealed(state: AppState) {
    let Some(secrets) = state.settings.secret_box.clone() else {
        return;
    };
    // Not before the database has this binary's migrations (another
    // process may be running them).
    labelsync::lifecycle::wait_for_migrations(&state.db).await;
    let mut timer = tokio::time::interval(COUNT_SEALED_EVERY);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        timer.tick().await;
        match labelsync::reseal::pass(&state.db, &secrets, Mode::Count).await {
            Ok(tally) => report_sealed(&tally, secrets.has_fallbacks()),
            Err(err) => tracing::warn!(error = %err, "counting the sealed secrets failed"),
        }
    }
}

/// How often the scheduler counts the sealed secrets.
const COUNT_SEALED_EVERY: Duration = Duration::from_secs(600);

/// Logs what is left to the operator after a count.
fn report_sealed(tally: &labelsync::reseal::Tally, fallbacks: bool) {
    if tally.fallback > 0 {
        tracing::info!(
            count = tally.fallback,
            "sealed secrets open only under a LABELSYNC_SECRET_KEY_FALLBACKS key: once every scheduler and worker has this LABELSYNC_SECRET_KEY, run `labelsync-scheduler reseal`"
        );
    }
    if tally.unopenable > 0 {
        tracing::warn!(
            count = tally.unopenable,
            among = tally.unopenable_in.join(", "),
            "sealed secrets that neither LABELSYNC_SECRET_KEY nor a fallback key opens: give them again (a storage's secrets by PATCH, a webhook's secret by PATCH; a webhook's previous secret by PATCH keep_previous_secret_seconds 0)"
        );
    }
    if fallbacks && tally.settled() {
        tracing::info!(
            current = tally.current,
            "every sealed secret opens under LABELSYNC_SECRET_KEY alone: no stored secret needs LABELSYNC_SECRET_KEY_FALLBACKS (a next key given there is still needed until every process seals under it)"
        );
    }
}

/// How often a full cleanup pass applies the runs' count rule to every
/// storage.
const FULL_EVERY: Duration = Duration::from_secs(24 * 3600);

/// How often expired webhook events and previous secrets, idempotency
/// keys, audit rows, finished jobs, runs and worker registrations are
/// deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Webhook events (with their delivery log) are kept this long once
/// nothing is pending for them.
const EVENT_RETENTION_DAYS: i64 = 7;

/// Deletes what has outlived its retention: a regular pass, which keeps
/// the newest `LABELSYNC_RUNS_KEPT_PER_STORAGE` runs of the storages that
/// ended a run lately (looked back ten passes, so a slow or missed pass
/// loses none; a storage that ends none is not growing).
pub async fn prune(state: &AppState) {
    let lately = chrono::Duration::from_std(PRUNE_EVERY * 10).unwrap_or_default();
    prune_with(state, Counted::EndedSince(labelsync::clock::now() - lately)).await;
}

/// [`prune`], applying the count rule to every storage: so that a lowered
/// `LABELSYNC_RUNS_KEPT_PER_STORAGE` (a restart) reaches the storages that
/// sync rarely too. One index walk per storage. False when the runs'
/// cleanup failed.
pub async fn prune_all(state: &AppState) -> bool {
    prune_with(state, Counted::Every).await
}

/// Deletes what has outlived its retention, applying the runs' count rule
/// to the storages `counted`; false when the runs' cleanup failed.
async fn prune_with(state: &AppState, counted: Counted) -> bool {
    let cutoff = labelsync::clock::now() - chrono::Duration::days(EVENT_RETENTION_DAYS);
    match labelsync::db::webhooks::prune(&state.db, cutoff).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(events = n, "deleted old webhook events"),
        Err(err) => tracing::warn!(error = %err, "webhook event cleanup failed"),
    }
    let now = labelsync::clock::now();
    match labelsync::db::webhooks::drop_expired_previous_secrets(&state.db, now).await {
        Ok(0) => {}
        Ok(n) => tracing::debug!(
            webhooks = n,
            "forgot previous webhook secrets past their time"
        ),
        Err(err) => tracing::warn!(error = %err, "previous webhook secret cleanup failed"),
    }
    let expired = crate::api::IDEMPOTENCY_KEEP;
    let cutoff = labelsync::clock::now() - chrono::Duration::from_std(expired).unwrap_or_default();
    match labelsync::db::idempotency::prune(&state.db, cutoff).await {
        Ok(0) => {}
        Ok(n) => tracing::debug!(keys = n, "deleted expired idempotency keys"),
        Err(err) => tracing::warn!(error = %err, "idempotency key cleanup failed"),
    }
    let days = i64::from(state.settings.audit_retention_days);
    let cutoff = labelsync::clock::now() - chrono::Duration::days(days);
    match labelsync::db::audit::prune(&state.db, cutoff).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(rows = n, days, "deleted audit rows past their retention"),
        Err(err) => tracing::warn!(error = %err, "audit cleanup failed"),
    }
    let kept = labelsync::jobs::finished::FINISHED_KEPT;
    match state.queue.forget_finished(kept).await {
        Ok(0) => {}
        Ok(n) => tracing::debug!(jobs = n, "forgot finished jobs"),
        Err(err) => tracing::warn!(error = %err, "finished job cleanup failed"),
    }
    let runs_pruned = prune_runs(state, counted).await;
    let cutoff = labelsync::clock::now() - worker_retention(&state.settings);
    match labelsync::db::workers::prune(&state.db, cutoff).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(workers = n, "forgot workers gone for a while"),
        Err(err) => tracing::warn!(error = %err, "worker registration cleanup failed"),
    }
    runs_pruned
}

/// Deletes ended runs past `LABELSYNC_RUN_RETENTION_DAYS`, and those past
/// the newest `LABELSYNC_RUNS_KEPT_PER_STORAGE` of the storages `counted`;
/// false when that failed.
async fn prune_runs(state: &AppState, counted: Counted) -> bool {
    let settings = &state.settings;
    let days = i64::from(settings.run_retention_days);
    let before = labelsync::clock::now() - chrono::Duration::days(days);
    let kept = u64::from(settings.runs_kept_per_storage);
    match labelsync::db::run_retention::prune(&state.db, before, kept, counted).await {
        Ok(pruned) if pruned == Default::default() => true,
        Ok(pruned) => {
            tracing::info!(
                expired = pruned.expired,
                over_count = pruned.over_count,
                days,
                kept,
                "deleted ended runs past their retention"
            );
            true
        }
        Err(err) => {
            tracing::warn!(error = %err, "run cleanup failed");
            false
        }
    }
}

/// How long a gone worker stays listed (as `gone`) before its
/// registration is deleted: ten minutes, or ten times the time it takes to
/// be declared gone when that is longer.
pub fn worker_retention(settings: &labelsync::config::Settings) -> chrono::Duration {
    let gone = crate::api::gone_after(settings) * 10;
    chrono::Duration::from_std(gone)
        .unwrap_or_default()
        .max(chrono::Duration::minutes(10))
}

/// Claims and enqueues every storage whose period has come. A period is
/// claimed for `LABELSYNC_REQUEUE_AFTER_SECS` (or its own length, when
/// shorter), and moved on to the next one once its run is made: a
/// scheduler killed in between (after the claim's commit, before the
/// run's) left the storage a whole period without its sync.
pub async fn tick_once(state: &AppState) -> labelsync::Result<usize> {
    // In whole microseconds, as the database keeps them: a period is moved
    // on, or given back, by the time it was claimed for.
    let now = chrono::SubsecRound::trunc_subsecs(labelsync::clock::now(), 6);
    let hold = chrono::Duration::from_std(state.settings.requeue_after)
        .unwrap_or_else(|_| chrono::Duration::days(7));
    let candidates = storages::due_for_sync(&state.db, now, BATCH).await?;
    let mut enqueued = 0;
    for (id, interval) in candidates {
        let Some(next) = interval
            .and_then(chrono::Duration::try_seconds)
            .and_then(|period| now.checked_add_signed(period))
        else {
            continue;
        };
        let held = now
            .checked_add_signed(hold)
            .map_or(next, |held| held.min(next));
        if !storages::claim_period(&state.db, id, now, held).await? {
            continue; // another replica took this period
        }
        match enqueue_claimed(state, id, (held, now)).await {
            Ok(started) => {
                enqueued += usize::from(started);
                storages::move_period(&state.db, id, held, next).await?;
            }
            Err(err) => {
                // The period goes back: the next tick tries again, not the
                // next period (a database or queue that failed for a moment
                // cost the storage a whole interval).
                tracing::warn!(storage_id = id, error = %err, "periodic sync could not be enqueued; trying again next tick");
                if let Err(err) = storages::move_period(&state.db, id, held, now).await {
                    tracing::warn!(storage_id = id, error = %err, "periodic sync's period could not be given back");
                }
            }
        }
    }
    Ok(enqueued)
}

/// Enqueues the sync of storage `id`, whose period this replica claimed
/// (moved from `now` to `held`): true when a run was enqueued, false when
/// the storage is gone or paused or a run of it is live. A period paused
/// since its claim is given back, so a resume syncs at the next tick as it
/// does for a period that came round while paused; so is one that met a
/// live events export (see below).
async fn enqueue_claimed(
    state: &AppState,
    id: i64,
    (held, now): (chrono::DateTime<Utc>, chrono::DateTime<Utc>),
) -> labelsync::Result<bool> {
    let Some(model) = storages::find(&state.db, id).await? else {
        return Ok(false);
    };
    let enqueued =
        jobs::enqueue_periodic_sync(&state.db, &state.queue, &state.settings, &model).await?;
    let Some((run, live)) = enqueued else {
        tracing::debug!(
            storage_id = id,
            "periodic sync skipped: paused since its period was claimed"
        );
        storages::move_period(&state.db, id, held, now).await?;
        return Ok(false);
    };
    if live && run.scope == labelsync::db::runs::SCOPE_EVENTS {
        // An export draining saved annotations is not the period's full
        // export: the period goes back, and the next tick tries again
        // (annotations saved all day long kept full exports out, period
        // after period). Back to the next tick, not to now: storages that
        // came due meanwhile go first (a hundred targets waiting so would
        // take every tick's batch).
        tracing::debug!(storage_id = id, run_id = %run.id, "periodic export waits for the live events export");
        let tick = chrono::Duration::from_std(state.settings.schedule_tick).unwrap_or_default();
        storages::move_period(&state.db, id, held, now + tick).await?;
        return Ok(false);
    }
    if live {
        tracing::debug!(storage_id = id, run_id = %run.id, "periodic sync skipped: a run is live");
    } else {
        tracing::info!(storage_id = id, run_id = %run.id, "periodic sync enqueued");
    }
    Ok(!live)
}
