//! Webhook endpoints, their events and deliveries.
//!
//! The contract (docs/API.md, "Webhooks"): an event is written by [`record`]
//! in the transaction of the change it reports, with one `pending` delivery
//! per enabled endpoint subscribed to it, so an event exists exactly when its
//! change committed. Deliveries of one endpoint go out oldest first, one at a
//! time: the delivering job holds the endpoint's lease ([`take_lease`]) and
//! works through [`next_pending`] until the head is not due yet.
use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait,
    ActiveValue::{NotSet, Set},
    ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, EntityTrait, IntoActiveModel,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait,
    sea_query::{Expr, ExprTrait, LikeExpr},
};
use serde_json::Value;

use super::entities::{webhook, webhook_attempt, webhook_delivery, webhook_event};
use crate::{Error, Result};

/// Every event type an endpoint can subscribe to.
pub const EVENT_TYPES: [&str; 8] = [
    "run.queued",
    "run.started",
    "run.completed",
    "run.completed_with_errors",
    "run.failed",
    "run.cancelled",
    "storage.objects_missing",
    "export.failed",
];

/// The event `POST /webhooks/{id}/test` sends (to that endpoint only).
pub const TEST_EVENT: &str = "webhook.test";

pub const PENDING: &str = "pending";
pub const DELIVERED: &str = "delivered";
pub const FAILED: &str = "failed";

/// The stored subscription to every event type (`["*"]` in the API).
const ALL_EVENTS: &str = ",*,";

/// The stored form of a subscription, `,a,b,`: one LIKE finds the
/// subscribers of a type on either database.
pub fn encode_events(events: &[String]) -> String {
    format!(",{},", events.join(","))
}

/// The list [`encode_events`] stored.
pub fn decode_events(stored: &str) -> Vec<String> {
    stored
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// What a new endpoint is made of (the caller checked the URL and events).
#[derive(Debug, Clone)]
pub struct NewWebhook {
    pub project_id: Option<i64>,
    pub url: String,
    pub events: String,
}

/// Inserts an endpoint; `seal` turns its id into the sealed secret (the
/// id is the sealing context, so the row is written then completed in one
/// transaction). `too_many_webhooks` when its project (or every project)
/// has `most` already (`LABELSYNC_MAX_WEBHOOKS_PER_PROJECT`): every event
/// is written with one delivery per subscriber in the transaction of its
/// change, so the count bounds what a run's start and end write, and one
/// tenant's endpoints cannot crowd the workers' webhook slots by
/// thousands.
pub async fn create(
    db: &DatabaseConnection,
    new: NewWebhook,
    most: u64,
    seal: impl FnOnce(i64) -> Result<String>,
) -> Result<webhook::Model> {
    let tx = super::begin_write(db).await?;
    check_room(&tx, new.project_id, most).await?;
    let now = crate::clock::now();
    let row = webhook::ActiveModel {
        id: NotSet,
        project_id: Set(new.project_id),
        url: Set(new.url),
        events: Set(new.events),
        secret: Set(String::new()),
        previous_secret: Set(None),
        previous_secret_until: Set(None),
        enabled: Set(true),
        disabled_reason: Set(None),
        failing_since: Set(None),
        lease_owner: Set(None),
        lease_at: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
    }
    .insert(&tx)
    .await?;
    let mut row = row.into_active_model();
    let id = *row.id.as_ref();
    row.secret = Set(seal(id)?);
    let row = row.update(&tx).await?;
    tx.commit().await?;
    Ok(row)
}

/// Refuses a new endpoint of `project_id` when it has `most`. Two
/// creations at once count one after the other: SQLite's write
/// transactions are serial, and on Postgres a transaction-scoped advisory
/// lock serializes them (reads and deliveries do not wait for it); the
/// count that follows the lock sees every creation committed before it
/// (READ COMMITTED, each statement its own snapshot).
async fn check_room(tx: &impl ConnectionTrait, project_id: Option<i64>, most: u64) -> Result<()> {
    if tx.get_database_backend() == sea_orm::DbBackend::Postgres {
        // Any constant of the application's own: "labelsync webhooks".
        tx.execute_unprepared("SELECT pg_advisory_xact_lock(7423617)")
            .await?;
    }
    let scope = match project_id {
        Some(id) => webhook::Column::ProjectId.eq(id),
        None => webhook::Column::ProjectId.is_null(),
    };
    let count = webhook::Entity::find().filter(scope).count(tx).await?;
    if count < most {
        return Ok(());
    }
    let (whose, field) = match project_id {
        Some(id) => (format!("project {id}"), Some("project_id")),
        None => ("every project".to_owned(), None),
    };
    Err(crate::Error::invalid(
        "too_many_webhooks",
        field,
        format!(
            "{whose} has {count} webhook endpoints, the most allowed is {most} \
             (LABELSYNC_MAX_WEBHOOKS_PER_PROJECT): delete one, or subscribe an existing \
             endpoint to more events"
        ),
    ))
}

pub async fn find(db: &impl ConnectionTrait, id: i64) -> Result<Option<webhook::Model>> {
    Ok(webhook::Entity::find_by_id(id).one(db).await?)
}

/// Endpoints with ids above `after`, in id order; of one project when given.
pub async fn page(
    db: &impl ConnectionTrait,
    project_id: Option<i64>,
    only: Option<&[i64]>,
    after: Option<i64>,
    limit: u64,
) -> Result<Vec<webhook::Model>> {
    let mut query = webhook::Entity::find()
        .order_by_asc(webhook::Column::Id)
        .limit(limit);
    if let Some(project_id) = project_id {
        query = query.filter(webhook::Column::ProjectId.eq(project_id));
    }
    // Endpoints of every project (a null project_id) are left out too.
    if let Some(ids) = only {
        query = query.filter(webhook::Column::ProjectId.is_in(ids.iter().copied()));
    }
    if let Some(after) = after {
        query = query.filter(webhook::Column::Id.gt(after));
    }
    Ok(query.all(db).await?)
}

/// Writes a changed endpoint (its `updated_at` set here) over the row as
/// it was read, at `read_updated_at`: a `Conflict` when it changed since
/// (another PATCH, or its disabling after failures: of two rotations at
/// once, the first's new secret would be lost though its caller was told
/// it was saved), `NotFound` when it is gone.
pub async fn save(
    db: &impl ConnectionTrait,
    mut row: webhook::ActiveModel,
    read_updated_at: DateTime<Utc>,
) -> Result<webhook::Model> {
    let id = *row.id.as_ref();
    row.updated_at = Set(crate::clock::now());
    // The columns the request changed (`Set`), not those it read.
    let written = webhook::Entity::update_many()
        .set(row)
        .filter(webhook::Column::Id.eq(id))
        .filter(webhook::Column::UpdatedAt.eq(read_updated_at))
        .exec_with_returning(db)
        .await?;
    if let Some(saved) = written.into_iter().next() {
        return Ok(saved);
    }
    match webhook::Entity::find_by_id(id).one(db).await? {
        Some(_) => Err(Error::Conflict(format!(
            "webhook {id} was changed by another request, or disabled after failures, while this one ran; read it again and send the change again"
        ))),
        None => Err(Error::NotFound(format!("webhook {id} not found"))),
    }
}

/// An endpoint's sealed secrets: `(id, secret, previous_secret,
/// previous_secret_until)`.
pub type Sealed = (i64, String, Option<String>, Option<DateTime<Utc>>);

/// Up to `limit` endpoints' sealed secrets with ids above `after`, in id
/// order.
pub async fn sealed_after(
    db: &impl ConnectionTrait,
    after: i64,
    limit: u64,
) -> Result<Vec<Sealed>> {
    Ok(webhook::Entity::find()
        .select_only()
        .column(webhook::Column::Id)
        .column(webhook::Column::Secret)
        .column(webhook::Column::PreviousSecret)
        .column(webhook::Column::PreviousSecretUntil)
        .filter(webhook::Column::Id.gt(after))
        .order_by_asc(webhook::Column::Id)
        .limit(limit)
        .into_tuple()
        .all(db)
        .await?)
}

/// Replaces endpoint `id`'s sealed secret `old` with `new` (the same
/// secret sealed again); false when it is no longer `old` (a rotation in
/// between). `updated_at` is left: a PATCH that read the row before is
/// not refused for it.
pub async fn swap_secret(db: &impl ConnectionTrait, id: i64, old: &str, new: &str) -> Result<bool> {
    let written = webhook::Entity::update_many()
        .col_expr(webhook::Column::Secret, Expr::value(new))
        .filter(webhook::Column::Id.eq(id))
        .filter(webhook::Column::Secret.eq(old))
        .exec(db)
        .await?;
    Ok(written.rows_affected == 1)
}

/// Replaces endpoint `id`'s sealed previous secret `old` with `new`;
/// false when it is no longer `old`. `updated_at` is left, as
/// [`swap_secret`] leaves it.
pub async fn swap_previous_secret(
    db: &impl ConnectionTrait,
    id: i64,
    old: &str,
    new: &str,
) -> Result<bool> {
    let written = webhook::Entity::update_many()
        .col_expr(webhook::Column::PreviousSecret, Expr::value(new))
        .filter(webhook::Column::Id.eq(id))
        .filter(webhook::Column::PreviousSecret.eq(old))
        .exec(db)
        .await?;
    Ok(written.rows_affected == 1)
}

/// Forgets the previous secrets whose time is up (`previous_secret_until`
/// at or before `now`, or none): they sign nothing, and a sealed secret
/// kept for nothing is one more in every copy of the database. Returns how
/// many. `updated_at` is left, as [`swap_secret`] leaves it.
pub async fn drop_expired_previous_secrets(
    db: &impl ConnectionTrait,
    now: DateTime<Utc>,
) -> Result<u64> {
    let (no_secret, no_time): (Option<String>, Option<DateTime<Utc>>) = (None, None);
    let time_up = Condition::any()
        .add(webhook::Column::PreviousSecretUntil.lte(now))
        .add(webhook::Column::PreviousSecretUntil.is_null());
    let written = webhook::Entity::update_many()
        .col_expr(webhook::Column::PreviousSecret, Expr::value(no_secret))
        .col_expr(webhook::Column::PreviousSecretUntil, Expr::value(no_time))
        .filter(webhook::Column::PreviousSecret.is_not_null())
        .filter(time_up)
        .exec(db)
        .await?;
    Ok(written.rows_affected)
}

/// Deletes an endpoint with its deliveries; false when there was none.
pub async fn delete(db: &impl ConnectionTrait, id: i64) -> Result<bool> {
    Ok(webhook::Entity::delete_by_id(id)
        .exec(db)
        .await?
        .rows_affected
        == 1)
}

/// Records an event of `event_type` for every enabled endpoint subscribed
/// to it (of `project_id`, or of every project); writes nothing when none
/// is. Call it inside the transaction of the change it reports. Returns the
/// number of deliveries made.
pub async fn record(
    db: &impl ConnectionTrait,
    event_type: &str,
    project_id: Option<i64>,
    data: Value,
) -> Result<usize> {
    let subscribers = subscribers(db, event_type, project_id).await?;
    if subscribers.is_empty() {
        return Ok(0);
    }
    let event = insert_event(db, event_type, project_id, data).await?;
    let deliveries = subscribers
        .iter()
        .map(|&webhook_id| webhook_delivery::ActiveModel {
            webhook_id: Set(webhook_id),
            event_id: Set(event.id.clone()),
            status: Set(PENDING.to_owned()),
            attempts: Set(0),
            next_attempt_at: Set(event.created_at),
            created_at: Set(event.created_at),
            ..Default::default()
        });
    // Six parameters a row; endpoints made before the cap may be more.
    let deliveries: Vec<_> = deliveries.collect();
    for chunk in deliveries.chunks(super::MAX_PARAMS / 6) {
        webhook_delivery::Entity::insert_many(chunk.to_vec())
            .exec_without_returning(db)
            .await?;
    }
    Ok(subscribers.len())
}

/// The enabled endpoints that take `event_type` events of `project_id`.
async fn subscribers(
    db: &impl ConnectionTrait,
    event_type: &str,
    project_id: Option<i64>,
) -> Result<Vec<i64>> {
    use webhook::Column as C;
    let escaped = event_type
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    let project = match project_id {
        Some(id) => Condition::any()
            .add(C::ProjectId.is_null())
            .add(C::ProjectId.eq(id)),
        None => Condition::all().add(C::ProjectId.is_null()),
    };
    Ok(webhook::Entity::find()
        .select_only()
        .column(C::Id)
        .filter(C::Enabled.eq(true))
        .filter(project)
        .filter(
            Condition::any()
                .add(C::Events.eq(ALL_EVENTS))
                .add(C::Events.like(LikeExpr::new(format!("%,{escaped},%")).escape('\\'))),
        )
        .order_by_asc(C::Id)
        .into_tuple()
        .all(db)
        .await?)
}

/// Writes the event row; its payload is the body every endpoint receives.
async fn insert_event(
    db: &impl ConnectionTrait,
    event_type: &str,
    project_id: Option<i64>,
    data: Value,
) -> Result<webhook_event::Model> {
    let id = format!("evt_{}", super::new_id());
    let now = crate::clock::now();
    let payload = serde_json::json!({
        "id": id,
        "type": event_type,
        "created_at": now,
        "data": data,
    });
    Ok(webhook_event::ActiveModel {
        id: Set(id),
        event_type: Set(event_type.to_owned()),
        project_id: Set(project_id),
        payload: Set(payload.to_string()),
        created_at: Set(now),
    }
    .insert(db)
    .await?)
}

/// Records the test event for one endpoint and returns its delivery, due
/// only `held` from now: the caller sends it at once, and the deliverer
/// must not send it too meanwhile (it did, when the endpoint was slower
/// than the deliverer's tick). It does if the caller never records the
/// attempt (its process died).
pub async fn record_test(
    db: &DatabaseConnection,
    hook: &webhook::Model,
    held: std::time::Duration,
) -> Result<(webhook_delivery::Model, webhook_event::Model)> {
    let tx = super::begin_write(db).await?;
    let data =
        serde_json::json!({ "webhook_id": hook.id, "message": "a test event from labelsync" });
    let event = insert_event(&tx, TEST_EVENT, hook.project_id, data).await?;
    let delivery = webhook_delivery::ActiveModel {
        webhook_id: Set(hook.id),
        event_id: Set(event.id.clone()),
        status: Set(PENDING.to_owned()),
        attempts: Set(0),
        next_attempt_at: Set(
            event.created_at + chrono::Duration::from_std(held).unwrap_or_default()
        ),
        created_at: Set(event.created_at),
        ..Default::default()
    }
    .insert(&tx)
    .await?;
    tx.commit().await?;
    Ok((delivery, event))
}

/// Takes the endpoint's delivery lease for `owner` unless another owner
/// renewed it within `ttl`. Only the holder delivers, so one endpoint's
/// events go out one at a time, in order.
pub async fn take_lease(
    db: &impl ConnectionTrait,
    id: i64,
    owner: &str,
    ttl: std::time::Duration,
) -> Result<bool> {
    use webhook::Column as C;
    let now = crate::clock::now();
    let stale = now - chrono::Duration::from_std(ttl).unwrap_or_default();
    let res = webhook::Entity::update_many()
        .col_expr(C::LeaseOwner, Expr::value(owner))
        .col_expr(C::LeaseAt, Expr::value(now))
        .filter(C::Id.eq(id))
        .filter(
            Condition::any()
                .add(C::LeaseOwner.is_null())
                .add(C::LeaseOwner.eq(owner))
                .add(C::LeaseAt.lt(stale)),
        )
        .exec(db)
        .await?;
    Ok(res.rows_affected == 1)
}

/// Lets go of the lease (only `owner`'s).
pub async fn release_lease(db: &impl ConnectionTrait, id: i64, owner: &str) -> Result<()> {
    use webhook::Column as C;
    webhook::Entity::update_many()
        .col_expr(C::LeaseOwner, Expr::value(Option::<String>::None))
        .filter(C::Id.eq(id))
        .filter(C::LeaseOwner.eq(owner))
        .exec(db)
        .await?;
    Ok(())
}

/// The oldest pending delivery of an endpoint with its event, due or not.
pub async fn next_pending(
    db: &impl ConnectionTrait,
    webhook_id: i64,
) -> Result<Option<(webhook_delivery::Model, webhook_event::Model)>> {
    use webhook_delivery::Column as C;
    let Some(delivery) = webhook_delivery::Entity::find()
        .filter(C::WebhookId.eq(webhook_id))
        .filter(C::Status.eq(PENDING))
        .order_by_asc(C::Id)
        .one(db)
        .await?
    else {
        return Ok(None);
    };
    let event = webhook_event::Entity::find_by_id(delivery.event_id.clone())
        .one(db)
        .await?
        .ok_or_else(|| crate::Error::Internal(format!("event {} is gone", delivery.event_id)))?;
    Ok(Some((delivery, event)))
}

/// One HTTP attempt, as [`record_attempt`] logs it.
#[derive(Debug, Clone)]
pub struct AttemptLog {
    pub started_at: DateTime<Utc>,
    pub status_code: Option<i32>,
    pub response_body: Option<String>,
    pub error: Option<String>,
    pub duration_ms: i64,
}

/// What becomes of a delivery after an attempt.
#[derive(Debug, Clone)]
pub enum AfterAttempt {
    Delivered,
    RetryAt(DateTime<Utc>),
    /// The last try: the delivery fails; `disable` also disables the
    /// endpoint with that reason and fails its other pending deliveries.
    GiveUp {
        disable: Option<String>,
    },
}

/// Which send an attempt belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// A queued delivery: its outcome is the endpoint's health
    /// (`failing_since`, which times the retries and the disabling).
    Queued,
    /// A `POST /webhooks/{id}/test`: its outcome is only its own (a failed
    /// test must not start the clock that disables a working endpoint, nor
    /// a good one stop the clock of a queue that keeps failing).
    Test,
}

/// Logs an attempt and moves its delivery on, in one transaction. The
/// attempt is counted in the database (`+ 1`: two sends that overlapped
/// both count), and the delivery moves on only as it was read: a
/// redelivery that queued it again while the attempt was in flight
/// stands (the attempt's outcome overwrote it, and the redelivery was
/// never sent).
pub async fn record_attempt(
    db: &DatabaseConnection,
    delivery: &webhook_delivery::Model,
    log: &AttemptLog,
    after: &AfterAttempt,
    sent: Sent,
) -> Result<webhook_delivery::Model> {
    use webhook_delivery::Column as C;
    let tx = super::begin_write(db).await?;
    webhook_attempt::ActiveModel {
        id: NotSet,
        delivery_id: Set(delivery.id),
        started_at: Set(log.started_at),
        status_code: Set(log.status_code),
        response_body: Set(log.response_body.clone()),
        error: Set(log.error.clone()),
        duration_ms: Set(log.duration_ms),
    }
    .insert(&tx)
    .await?;
    webhook_delivery::Entity::update_many()
        .col_expr(C::Attempts, Expr::col(C::Attempts).add(1))
        .col_expr(C::LastStatusCode, Expr::value(log.status_code))
        .col_expr(C::LastError, Expr::value(log.error.clone()))
        .filter(C::Id.eq(delivery.id))
        .exec(&tx)
        .await?;
    if sent == Sent::Queued {
        let failing = !matches!(after, AfterAttempt::Delivered);
        mark_failing(&tx, delivery.webhook_id, failing).await?;
    }
    moved_on(after)
        .filter(C::Id.eq(delivery.id))
        .filter(C::Status.eq(delivery.status.as_str()))
        .filter(C::NextAttemptAt.eq(delivery.next_attempt_at))
        .exec(&tx)
        .await?;
    if let AfterAttempt::GiveUp {
        disable: Some(reason),
    } = after
    {
        disable_endpoint(&tx, delivery.webhook_id, reason).await?;
    }
    let row = webhook_delivery::Entity::find_by_id(delivery.id)
        .one(&tx)
        .await?
        .ok_or_else(|| crate::Error::NotFound(format!("delivery {}", delivery.id)))?;
    tx.commit().await?;
    Ok(row)
}

/// The change an attempt's outcome makes to its delivery.
fn moved_on(after: &AfterAttempt) -> sea_orm::UpdateMany<webhook_delivery::Entity> {
    use webhook_delivery::Column as C;
    let update = webhook_delivery::Entity::update_many();
    match after {
        AfterAttempt::Delivered => update
            .col_expr(C::Status, Expr::value(DELIVERED))
            .col_expr(C::FinishedAt, Expr::value(crate::clock::now())),
        AfterAttempt::RetryAt(at) => update.col_expr(C::NextAttemptAt, Expr::value(*at)),
        AfterAttempt::GiveUp { .. } => update
            .col_expr(C::Status, Expr::value(FAILED))
            .col_expr(C::FinishedAt, Expr::value(crate::clock::now())),
    }
}

/// Sets `failing_since` to now unless set (`failing`), or clears it.
async fn mark_failing(db: &impl ConnectionTrait, webhook_id: i64, failing: bool) -> Result<()> {
    use webhook::Column as C;
    let since = if failing {
        Expr::expr(sea_orm::sea_query::Func::coalesce([
            Expr::col(C::FailingSince),
            Expr::value(crate::clock::now()),
        ]))
    } else {
        Expr::value(Option::<DateTime<Utc>>::None)
    };
    webhook::Entity::update_many()
        .col_expr(C::FailingSince, since)
        .filter(C::Id.eq(webhook_id))
        .exec(db)
        .await?;
    Ok(())
}

/// Disables an endpoint and fails its pending deliveries with `reason`.
async fn disable_endpoint(db: &impl ConnectionTrait, webhook_id: i64, reason: &str) -> Result<()> {
    let now = crate::clock::now();
    webhook::Entity::update_many()
        .col_expr(webhook::Column::Enabled, Expr::value(false))
        .col_expr(webhook::Column::DisabledReason, Expr::value(reason))
        .col_expr(webhook::Column::UpdatedAt, Expr::value(now))
        .filter(webhook::Column::Id.eq(webhook_id))
        .exec(db)
        .await?;
    use webhook_delivery::Column as C;
    webhook_delivery::Entity::update_many()
        .col_expr(C::Status, Expr::value(FAILED))
        .col_expr(C::LastError, Expr::value(format!("not sent: {reason}")))
        .col_expr(C::FinishedAt, Expr::value(now))
        .filter(C::WebhookId.eq(webhook_id))
        .filter(C::Status.eq(PENDING))
        .exec(db)
        .await?;
    Ok(())
}

/// Puts the endpoint's oldest pending delivery off until `until`, saying
/// `why`: one that could not be attempted at all (its endpoint's secret
/// does not open, say) records no attempt, and would otherwise be the
/// longest due at every dispatch, ahead of endpoints that can be served.
pub async fn postpone_head(
    db: &impl ConnectionTrait,
    webhook_id: i64,
    until: DateTime<Utc>,
    why: &str,
) -> Result<()> {
    use webhook_delivery::Column as C;
    let Some((head, _)) = next_pending(db, webhook_id).await? else {
        return Ok(());
    };
    webhook_delivery::Entity::update_many()
        .col_expr(C::NextAttemptAt, Expr::value(until))
        .col_expr(C::LastError, Expr::value(crate::error::storable(why)))
        .filter(C::Id.eq(head.id))
        .filter(C::Status.eq(PENDING))
        .exec(db)
        .await?;
    Ok(())
}

/// Enabled endpoints whose oldest pending delivery is due at `now`:
/// (endpoint id, that delivery's id and attempts), at most `limit`, the
/// longest due first. The limit applies to due heads only: taken over
/// every endpoint's head, the 1,000 lowest endpoints, backing off or
/// disabled, kept every other endpoint from ever being served.
pub async fn due(
    db: &impl ConnectionTrait,
    now: DateTime<Utc>,
    limit: u64,
) -> Result<Vec<(i64, i64, i32)>> {
    use sea_orm::sea_query::Query;
    use webhook_delivery::Column as C;
    let heads = Query::select()
        .expr(C::Id.min())
        .from(webhook_delivery::Entity)
        .and_where(C::Status.eq(PENDING))
        .group_by_col(C::WebhookId)
        .to_owned();
    let enabled = Query::select()
        .column(webhook::Column::Id)
        .from(webhook::Entity)
        .and_where(webhook::Column::Enabled.eq(true))
        .to_owned();
    Ok(webhook_delivery::Entity::find()
        .select_only()
        .columns([C::WebhookId, C::Id, C::Attempts])
        .filter(C::Id.in_subquery(heads))
        .filter(C::WebhookId.in_subquery(enabled))
        .filter(C::NextAttemptAt.lte(now))
        .order_by_asc(C::NextAttemptAt)
        .limit(limit)
        .into_tuple()
        .all(db)
        .await?)
}

/// An endpoint's deliveries older than `before` (a delivery id), newest
/// first, each with its event type.
pub async fn deliveries_page(
    db: &impl ConnectionTrait,
    webhook_id: i64,
    before: Option<i64>,
    limit: u64,
) -> Result<Vec<(webhook_delivery::Model, String)>> {
    use webhook_delivery::Column as C;
    let mut query = webhook_delivery::Entity::find()
        .filter(C::WebhookId.eq(webhook_id))
        .order_by_desc(C::Id)
        .limit(limit);
    if let Some(before) = before {
        query = query.filter(C::Id.lt(before));
    }
    let rows = query.all(db).await?;
    let types: std::collections::HashMap<String, String> = webhook_event::Entity::find()
        .select_only()
        .columns([webhook_event::Column::Id, webhook_event::Column::EventType])
        .filter(webhook_event::Column::Id.is_in(rows.iter().map(|d| d.event_id.clone())))
        .into_tuple::<(String, String)>()
        .all(db)
        .await?
        .into_iter()
        .collect();
    Ok(rows
        .into_iter()
        .map(|d| {
            let event_type = types.get(&d.event_id).cloned().unwrap_or_default();
            (d, event_type)
        })
        .collect())
}

/// One delivery of an endpoint, or `None`.
pub async fn delivery(
    db: &impl ConnectionTrait,
    webhook_id: i64,
    id: i64,
) -> Result<Option<webhook_delivery::Model>> {
    Ok(webhook_delivery::Entity::find_by_id(id)
        .filter(webhook_delivery::Column::WebhookId.eq(webhook_id))
        .one(db)
        .await?)
}

/// The latest `per` attempts of each of these deliveries, oldest first: a
/// list of deliveries holds a bounded number (redeliveries add rounds of
/// attempts without end).
pub async fn latest_attempts_of(
    db: &impl ConnectionTrait,
    delivery_ids: &[i64],
    per: u64,
) -> Result<Vec<webhook_attempt::Model>> {
    if delivery_ids.is_empty() {
        return Ok(Vec::new());
    }
    // Our own integer ids, written into the text: no placeholder list to
    // build in each dialect.
    let ids: Vec<String> = delivery_ids.iter().map(i64::to_string).collect();
    let sql = format!(
        "SELECT * FROM (SELECT a.*, ROW_NUMBER() OVER \
           (PARTITION BY delivery_id ORDER BY id DESC) AS newest \
           FROM webhook_attempts a WHERE delivery_id IN ({})) t \
         WHERE newest <= {per} ORDER BY id",
        ids.join(",")
    );
    let statement = sea_orm::Statement::from_string(db.get_database_backend(), sql);
    Ok(webhook_attempt::Entity::find()
        .from_raw_sql(statement)
        .all(db)
        .await?)
}

/// Queues a delivery again (pending, due now), whatever its state.
pub async fn redeliver(
    db: &impl ConnectionTrait,
    delivery: webhook_delivery::Model,
) -> Result<webhook_delivery::Model> {
    let mut row = delivery.into_active_model();
    row.status = Set(PENDING.to_owned());
    row.next_attempt_at = Set(crate::clock::now());
    row.finished_at = Set(None);
    Ok(row.update(db).await?)
}

/// Deletes events older than `before` with no pending delivery and none
/// that ended at `before` or later (their deliveries and attempts go with
/// them): a delivery log is kept from its last delivery's end, not from
/// its event's making (an event redelivered on its sixth day kept its new
/// log for minutes). Returns how many.
pub async fn prune(db: &impl ConnectionTrait, before: DateTime<Utc>) -> Result<u64> {
    // Event ids are `evt_<ULID>`: id order is time order, and the ULID of
    // `before` with zero randomness sorts before every event of that time.
    let millis = u64::try_from(before.timestamp_millis()).unwrap_or(0);
    let bound = format!("evt_{}", ulid::Ulid::from_parts(millis, 0));
    let pending = webhook_delivery::Entity::find()
        .select_only()
        .column(webhook_delivery::Column::EventId)
        .filter(webhook_delivery::Column::Status.eq(PENDING))
        .into_query();
    let recent = webhook_delivery::Entity::find()
        .select_only()
        .column(webhook_delivery::Column::EventId)
        .filter(webhook_delivery::Column::FinishedAt.gte(before))
        .into_query();
    Ok(webhook_event::Entity::delete_many()
        .filter(webhook_event::Column::Id.lt(bound))
        .filter(webhook_event::Column::Id.not_in_subquery(pending))
        .filter(webhook_event::Column::Id.not_in_subquery(recent))
        .exec(db)
        .await?
        .rows_affected)
}
