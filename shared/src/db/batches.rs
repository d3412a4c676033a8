//! Fan-out batches of a Tasks-mode run (see `ingest`): created by the sync job,
//! finished by whichever worker runs them. A batch's objects are stored as
//! JSON of whatever the caller gives (the listing's `storage::ObjectMeta`):
//! this layer does not know storages.
use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter,
    sea_query::{Expr, ExprTrait},
};

use super::entities::sync_batch;
use serde::{Serialize, de::DeserializeOwned};

use crate::{Error, Result};

/// Writes a page's batches of run `run_id` (each its objects), in one
/// statement; their ids, in order.
pub async fn create<T: Serialize>(
    db: &impl ConnectionTrait,
    run_id: &str,
    batches: &[Vec<T>],
) -> Result<Vec<i64>> {
    let now = crate::clock::now();
    let rows = batches
        .iter()
        .map(|objects| {
            let objects = serde_json::to_value(objects)
                .map_err(|e| Error::Internal(format!("batch objects: {e}")))?;
            Ok(sync_batch::ActiveModel {
                run_id: Set(run_id.to_owned()),
                objects: Set(objects),
                done: Set(false),
                attempts: Set(0),
                worker: Set(None),
                created_at: Set(now),
                finished_at: Set(None),
                claimed_at: Set(None),
                ..Default::default()
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // One statement for the page (16 batches of 64 objects at the
    // defaults): it is written before any of the page's batches can start.
    let mut ids = sync_batch::Entity::insert_many(rows)
        .exec_with_returning_keys(db)
        .await?;
    // Ids grow along the VALUES list: in order, whatever order RETURNING
    // gives them in.
    ids.sort_unstable();
    Ok(ids)
}

/// Batches of the run not finished yet.
pub async fn pending(db: &impl ConnectionTrait, run_id: &str) -> Result<u64> {
    Ok(sync_batch::Entity::find()
        .filter(sync_batch::Column::RunId.eq(run_id))
        .filter(sync_batch::Column::Done.eq(false))
        .count(db)
        .await?)
}

/// Claims the run's newest batch that no one has started (attempts = 0),
/// or whose claim by an earlier job of the run went stale (`claimed_at`
/// before `stale_before`: its holder died), by counting an attempt and
/// stamping `claimed_at`; `None` when there is none. The newest: the queue
/// hands batches to workers oldest first, so the two meet at the run's last
/// batches, and a batch claimed here is skipped by its queued job (see
/// [`count_attempt`]).
pub async fn claim_unstarted(
    db: &impl ConnectionTrait,
    run_id: &str,
    stale_before: DateTime<Utc>,
) -> Result<Option<sync_batch::Model>> {
    use sea_orm::{QueryOrder, QuerySelect};
    let claimable = || {
        Condition::any()
            .add(sync_batch::Column::Attempts.eq(0))
            .add(sync_batch::Column::ClaimedAt.lt(stale_before))
    };
    let ids: Vec<i64> = sync_batch::Entity::find()
        .select_only()
        .column(sync_batch::Column::Id)
        .filter(sync_batch::Column::RunId.eq(run_id))
        .filter(sync_batch::Column::Done.eq(false))
        .filter(claimable())
        .order_by_desc(sync_batch::Column::Id)
        .limit(4)
        .into_tuple()
        .all(db)
        .await?;
    for id in ids {
        let claimed = sync_batch::Entity::update_many()
            .col_expr(
                sync_batch::Column::Attempts,
                Expr::col(sync_batch::Column::Attempts).add(1),
            )
            .col_expr(
                sync_batch::Column::ClaimedAt,
                Expr::value(crate::clock::now()),
            )
            .filter(sync_batch::Column::Id.eq(id))
            .filter(sync_batch::Column::Done.eq(false))
            .filter(claimable())
            .exec_with_returning(db)
            .await?;
        if let Some(batch) = claimed.into_iter().next() {
            return Ok(Some(batch));
        }
    }
    Ok(None)
}

/// Records why an attempt of a batch failed and will be tried again, for
/// the message of the batch should it be given up.
pub async fn note_error(db: &impl ConnectionTrait, id: i64, error: &str) -> Result<()> {
    sync_batch::Entity::update_many()
        .col_expr(
            sync_batch::Column::LastError,
            Expr::value(crate::error::storable(error)),
        )
        .filter(sync_batch::Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}

/// Gives back a claim whose holder stopped before the batch was done, so
/// the run's next look takes it at once (instead of after a lease). A
/// claim is its holder's while no one has claimed the batch since: the
/// holder names it by the batch's `attempt` count its claim made, so a
/// holder presumed dead that was only slow cannot give away the claim of
/// the job that took the batch over (which let a third job run it too).
pub async fn release_claim(db: &impl ConnectionTrait, id: i64, attempt: i64) -> Result<()> {
    sync_batch::Entity::update_many()
        .col_expr(
            sync_batch::Column::ClaimedAt,
            Expr::value(DateTime::<Utc>::UNIX_EPOCH),
        )
        .filter(sync_batch::Column::Id.eq(id))
        .filter(sync_batch::Column::Attempts.eq(attempt))
        .filter(sync_batch::Column::ClaimedAt.is_not_null())
        .exec(db)
        .await?;
    Ok(())
}

/// Counts an attempt of a batch by its queued job and claims it (stamps
/// `claimed_at`, which its runner renews: [`renew_claim`]); `None` when it
/// is done (a duplicate job) or, given `stale_before`, when another job
/// holds a claim not yet stale (that job is running it; should it die, the
/// claim goes stale and the run's next look takes the batch again).
/// Without `stale_before`, claims do not hold the batch off. A queued job
/// that died after counting its attempt left the batch unclaimed, which
/// the run's job never took (only batches never started, or claimed and
/// stale): with its job lost too (a Redis that forgot its data), the run
/// waited for it for ever.
pub async fn count_attempt(
    db: &impl ConnectionTrait,
    id: i64,
    stale_before: Option<DateTime<Utc>>,
) -> Result<Option<sync_batch::Model>> {
    let mut update = sync_batch::Entity::update_many()
        .col_expr(
            sync_batch::Column::Attempts,
            Expr::col(sync_batch::Column::Attempts).add(1),
        )
        .col_expr(
            sync_batch::Column::ClaimedAt,
            Expr::value(crate::clock::now()),
        )
        .filter(sync_batch::Column::Id.eq(id))
        .filter(sync_batch::Column::Done.eq(false));
    if let Some(stale_before) = stale_before {
        update = update.filter(
            Condition::any()
                .add(sync_batch::Column::ClaimedAt.is_null())
                .add(sync_batch::Column::ClaimedAt.lt(stale_before)),
        );
    }
    Ok(update.exec_with_returning(db).await?.into_iter().next())
}

/// Renews the claim on a batch being run, so it does not go stale while
/// its runner lives (a batch that takes longer than a lease). Only a claim
/// still held, and the holder's own (`attempt`, as [`release_claim`]): one
/// given back is not taken again by a renewal that arrives late, and one
/// taken over is not kept fresh by the holder it was taken from. On Postgres a row
/// locked by a commit under way (the batch's own, marking it done) is
/// skipped, not waited for: the renewal holds no connection waiting on the
/// work it runs beside.
pub async fn renew_claim(db: &impl ConnectionTrait, id: i64, attempt: i64) -> Result<()> {
    let given_back = DateTime::<Utc>::UNIX_EPOCH;
    if db.get_database_backend() == sea_orm::DbBackend::Postgres {
        db.execute_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "UPDATE sync_batches SET claimed_at = $1 WHERE id = \
             (SELECT id FROM sync_batches WHERE id = $2 AND attempts = $3 AND NOT done \
              AND claimed_at > $4 FOR UPDATE SKIP LOCKED)",
            [
                crate::clock::now().into(),
                id.into(),
                attempt.into(),
                given_back.into(),
            ],
        ))
        .await?;
        return Ok(());
    }
    sync_batch::Entity::update_many()
        .col_expr(
            sync_batch::Column::ClaimedAt,
            Expr::value(crate::clock::now()),
        )
        .filter(sync_batch::Column::Id.eq(id))
        .filter(sync_batch::Column::Attempts.eq(attempt))
        .filter(sync_batch::Column::Done.eq(false))
        .filter(sync_batch::Column::ClaimedAt.gt(given_back))
        .exec(db)
        .await?;
    Ok(())
}

/// Marks a batch done; false when another attempt already did.
pub async fn mark_done(db: &impl ConnectionTrait, id: i64, worker: &str) -> Result<bool> {
    let res = sync_batch::Entity::update_many()
        .col_expr(sync_batch::Column::Done, Expr::value(true))
        .col_expr(sync_batch::Column::Worker, Expr::value(worker))
        .col_expr(
            sync_batch::Column::FinishedAt,
            Expr::value(crate::clock::now()),
        )
        .filter(sync_batch::Column::Id.eq(id))
        .filter(sync_batch::Column::Done.eq(false))
        .exec(db)
        .await?;
    Ok(res.rows_affected == 1)
}

pub fn objects<T: DeserializeOwned>(batch: &sync_batch::Model) -> Result<Vec<T>> {
    serde_json::from_value(batch.objects.clone())
        .map_err(|e| Error::Internal(format!("batch {}: {e}", batch.id)))
}
