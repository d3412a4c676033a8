//! Worker registrations (`fleet_workers`): each worker upserts its row with every
//! heartbeat and deletes it when it stops; `GET /api/v1/workers` lists them
//! and the scheduler's tick deletes the rows of workers long silent.
use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, sea_query::OnConflict,
};

use super::entities::worker;
use crate::Result;

/// What a worker says of itself at a heartbeat.
#[derive(Debug, Clone)]
pub struct Beat<'a> {
    pub name: &'a str,
    pub host: &'a str,
    pub version: &'a str,
    pub slots: i32,
    pub running_jobs: i32,
    pub current_runs: Vec<String>,
    pub started_at: DateTime<Utc>,
    pub now: DateTime<Utc>,
}

/// Inserts or refreshes the worker's row.
pub async fn beat(db: &impl ConnectionTrait, beat: Beat<'_>) -> Result<()> {
    use worker::Column as C;
    let row = worker::ActiveModel {
        name: Set(beat.name.to_owned()),
        host: Set(beat.host.to_owned()),
        version: Set(beat.version.to_owned()),
        slots: Set(beat.slots),
        running_jobs: Set(beat.running_jobs),
        current_runs: Set(serde_json::json!(beat.current_runs)),
        started_at: Set(beat.started_at),
        heartbeat_at: Set(beat.now),
    };
    worker::Entity::insert(row)
        .on_conflict(
            OnConflict::column(C::Name)
                .update_columns([C::Host, C::Version, C::Slots, C::RunningJobs])
                .update_columns([C::CurrentRuns, C::HeartbeatAt])
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// Deletes the worker's row (it stopped cleanly).
pub async fn remove(db: &impl ConnectionTrait, name: &str) -> Result<()> {
    worker::Entity::delete_by_id(name.to_owned())
        .exec(db)
        .await?;
    Ok(())
}

/// Up to `limit` registrations with names after `after`, in name order.
pub async fn page(
    db: &impl ConnectionTrait,
    after: Option<&str>,
    limit: u64,
) -> Result<Vec<worker::Model>> {
    let mut query = worker::Entity::find()
        .order_by_asc(worker::Column::Name)
        .limit(limit);
    if let Some(after) = after {
        query = query.filter(worker::Column::Name.gt(after));
    }
    Ok(query.all(db).await?)
}

/// Deletes the rows of workers silent since before `cutoff`; how many.
pub async fn prune(db: &impl ConnectionTrait, cutoff: DateTime<Utc>) -> Result<u64> {
    let res = worker::Entity::delete_many()
        .filter(worker::Column::HeartbeatAt.lt(cutoff))
        .exec(db)
        .await?;
    Ok(res.rows_affected)
}

/// A registration as the API shows it: `status` is `gone` once its last
/// heartbeat is older than `gone_after`.
pub fn to_json(
    row: &worker::Model,
    now: DateTime<Utc>,
    gone_after: std::time::Duration,
) -> serde_json::Value {
    let silent = (now - row.heartbeat_at).to_std().unwrap_or_default();
    serde_json::json!({
        "name": row.name,
        "host": row.host,
        "version": row.version,
        "slots": row.slots,
        "running_jobs": row.running_jobs,
        "current_runs": row.current_runs,
        "started_at": row.started_at,
        "heartbeat_at": row.heartbeat_at,
        "status": if silent > gone_after { "gone" } else { "alive" },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_silent_past_the_limit_is_gone() {
        let now = crate::clock::now();
        let row = |silent: i64| worker::Model {
            name: "w-1".into(),
            host: "h".into(),
            version: "0".into(),
            slots: 4,
            running_jobs: 1,
            current_runs: serde_json::json!(["r"]),
            started_at: now,
            heartbeat_at: now - chrono::Duration::seconds(silent),
        };
        let limit = std::time::Duration::from_secs(15);
        assert_eq!(to_json(&row(3), now, limit)["status"], "alive");
        assert_eq!(to_json(&row(15), now, limit)["status"], "alive");
        assert_eq!(to_json(&row(16), now, limit)["status"], "gone");
        assert_eq!(
            to_json(&row(-2), now, limit)["status"],
            "alive",
            "a clock ahead"
        );
        assert_eq!(
            to_json(&row(3), now, limit)["current_runs"],
            serde_json::json!(["r"])
        );
    }
}
