//! Dead jobs (given up on by the queue: 25 failed attempts) put back or
//! thrown away, and the age of the oldest waiting job, for
//! `/api/v1/queues`. Read and written in the backends' own keys and tables
//! (see [`Queue::depth`] for why).
use crate::{Error, Result};

use super::{Queue, queue::now_secs};

/// What to do with dead jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadAction {
    /// Back on the queue, due now, attempts from zero.
    Requeue,
    /// Deleted with their data.
    Discard,
}

/// Takes up to ARGV[1] ids of the dead set; requeues (ARGV[3] = requeue)
/// each whose data is still there into the scheduled set due at ARGV[2],
/// or deletes it with its data and metadata. Returns how many it took.
const REDIS_DEAD: &str = r"
local ids = redis.call('SRANDMEMBER', KEYS[1], tonumber(ARGV[1]))
for _, id in ipairs(ids) do
  redis.call('SREM', KEYS[1], id)
  if ARGV[3] == 'requeue' and redis.call('HEXISTS', KEYS[3], id) == 1 then
    redis.call('HSET', KEYS[4] .. ':' .. id, 'status', 'Pending', 'attempts', 0)
    redis.call('ZADD', KEYS[2], tonumber(ARGV[2]), id)
  else
    redis.call('HDEL', KEYS[3], id)
    redis.call('DEL', KEYS[4] .. ':' .. id)
  end
end
return #ids
";

impl Queue {
    /// Requeues or discards up to `limit` dead jobs; how many.
    pub async fn dead_jobs(&self, action: DeadAction, limit: u64) -> Result<u64> {
        let failed = |e: String| Error::Transient(format!("dead jobs: {e}"));
        match self {
            Queue::Redis { storage, conn, .. } => {
                let config = storage.get_config();
                let verb = match action {
                    DeadAction::Requeue => "requeue",
                    DeadAction::Discard => "discard",
                };
                redis::Script::new(REDIS_DEAD)
                    .key(config.dead_jobs_set())
                    .key(config.scheduled_jobs_set())
                    .key(config.job_data_hash())
                    .key(config.job_meta_hash())
                    .arg(limit)
                    .arg(now_secs())
                    .arg(verb)
                    .invoke_async(&mut conn.clone())
                    .await
                    .map_err(|e| failed(e.to_string()))
            }
            Queue::Embedded(storage, ..) => {
                let name = apalis_core::backend::BackendConfig::config(storage)
                    .queue
                    .to_string();
                let limit = i64::try_from(limit).unwrap_or(i64::MAX);
                let query = match action {
                    DeadAction::Requeue => sea_orm::sqlx::query(
                        "UPDATE Jobs SET status = 'Pending', attempts = 0, run_at = ?3, \
                         lock_by = NULL, lock_at = NULL, done_at = NULL \
                         WHERE ROWID IN (SELECT ROWID FROM Jobs \
                         WHERE job_type = ?1 AND status = 'Killed' LIMIT ?2)",
                    )
                    .bind(name)
                    .bind(limit)
                    .bind(now_secs() as i64),
                    DeadAction::Discard => sea_orm::sqlx::query(
                        "DELETE FROM Jobs WHERE ROWID IN (SELECT ROWID FROM Jobs \
                         WHERE job_type = ?1 AND status = 'Killed' LIMIT ?2)",
                    )
                    .bind(name)
                    .bind(limit),
                };
                let done = query
                    .execute(storage.pool())
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                Ok(done.rows_affected())
            }
        }
    }

    /// Seconds since the oldest job waiting for a worker was enqueued
    /// (`None`: nothing waits). Redis: the older of the head of the active
    /// list and the first due entry of the scheduled set, aged by the time
    /// in its id (a ULID); embedded: the earliest `run_at` due.
    pub async fn oldest_waiting_age(&self) -> Result<Option<u64>> {
        let failed = |e: String| Error::Transient(format!("queue age: {e}"));
        let now = now_secs();
        match self {
            Queue::Redis { storage, conn, .. } => {
                let config = storage.get_config();
                let (head, due): (Option<String>, Vec<String>) = redis::pipe()
                    .cmd("LINDEX")
                    .arg(config.active_jobs_list())
                    .arg(0)
                    .cmd("ZRANGEBYSCORE")
                    .arg(config.scheduled_jobs_set())
                    .arg("-inf")
                    .arg(now)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(1)
                    .query_async(&mut conn.clone())
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                let born = head
                    .iter()
                    .chain(due.iter())
                    .filter_map(|id| ulid::Ulid::from_string(id).ok())
                    .map(|id| id.timestamp_ms() / 1000)
                    .min();
                Ok(born.map(|at| now.saturating_sub(at)))
            }
            Queue::Embedded(storage, ..) => {
                let name = apalis_core::backend::BackendConfig::config(storage)
                    .queue
                    .to_string();
                let oldest: Option<i64> = sea_orm::sqlx::query_scalar(
                    "SELECT MIN(run_at) FROM Jobs WHERE job_type = ?1 \
                     AND status IN ('Pending', 'Failed') AND run_at <= ?2",
                )
                .bind(&name)
                .bind(now as i64)
                .fetch_one(storage.pool())
                .await
                .map_err(|e| failed(e.to_string()))?;
                Ok(oldest.map(|at| now.saturating_sub(at.max(0) as u64)))
            }
        }
    }
}
