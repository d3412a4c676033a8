//! Finished jobs forgotten. The queues keep every job that ended well
//! (apalis-redis: its data, a metadata hash and its id in the done set;
//! apalis-sqlite: its row) and never delete one, so Redis grew with every
//! run, batch, partition and webhook job for as long as the fleet ran,
//! until it reached `maxmemory` and refused pushes. The scheduler's
//! cleanup forgets those that ended longer ago than
//! [`FINISHED_KEPT`].
//!
//! Only jobs that ended well: a dead job stays for `/api/v1/queues` to
//! requeue or discard (see [`super::dead`]); a waiting, scheduled or
//! running one is in none of the sets read here.
use std::time::Duration;

use crate::{Error, Result};

use super::{Queue, queue::now_secs};

/// How long a finished job is kept: as long as the queue's deduplication
/// keys, which do not read the job.
pub const FINISHED_KEPT: Duration = Duration::from_secs(3600);

/// Ids the Redis script reads per call (one `SSCAN` page), so that no
/// call holds Redis for long; and the most calls per cleanup.
const PAGE: u64 = 1000;
const PAGES: usize = 500;

/// One page of the done set (KEYS[1]) from cursor ARGV[1]: each job that
/// ended at or before ARGV[3] (Unix seconds; its metadata hash's
/// `done_at`, or at once when that hash is gone) leaves the set, the data
/// hash (KEYS[2]) and its metadata (KEYS[3] .. ':' .. id). Returns the
/// next cursor and how many it forgot.
const REDIS_FORGET: &str = r"
local page = redis.call('SSCAN', KEYS[1], ARGV[1], 'COUNT', tonumber(ARGV[2]))
local forgot = 0
for _, id in ipairs(page[2]) do
  local meta = KEYS[3] .. ':' .. id
  local done_at = tonumber(redis.call('HGET', meta, 'done_at'))
  if done_at == nil or done_at <= tonumber(ARGV[3]) then
    redis.call('SREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
    redis.call('DEL', meta)
    forgot = forgot + 1
  end
end
return {page[1], forgot}
";

impl Queue {
    /// Forgets the jobs that ended well more than `kept` ago; how many.
    pub async fn forget_finished(&self, kept: Duration) -> Result<u64> {
        let cutoff = now_secs().saturating_sub(kept.as_secs());
        match self {
            Queue::Redis { storage, conn, .. } => {
                let config = storage.get_config();
                let script = redis::Script::new(REDIS_FORGET);
                let (mut cursor, mut forgot) = ("0".to_owned(), 0u64);
                for _ in 0..PAGES {
                    let (next, n): (String, u64) = script
                        .key(config.done_jobs_set())
                        .key(config.job_data_hash())
                        .key(config.job_meta_hash())
                        .arg(&cursor)
                        .arg(PAGE)
                        .arg(cutoff)
                        .invoke_async(&mut conn.clone())
                        .await
                        .map_err(|e| Error::Transient(format!("finished jobs: {e}")))?;
                    forgot += n;
                    if next == "0" {
                        break;
                    }
                    cursor = next;
                }
                Ok(forgot)
            }
            Queue::Embedded(storage, ..) => {
                // Pages too: the Jobs table shares the single-process
                // database, whose one writer must not be held for long.
                let name = apalis_core::backend::BackendConfig::config(storage)
                    .queue
                    .to_string();
                let mut forgot = 0;
                for _ in 0..PAGES {
                    let done = sea_orm::sqlx::query(
                        "DELETE FROM Jobs WHERE ROWID IN (SELECT ROWID FROM Jobs \
                         WHERE job_type = ?1 AND status = 'Done' AND done_at <= ?2 LIMIT ?3)",
                    )
                    .bind(&name)
                    .bind(i64::try_from(cutoff).unwrap_or(i64::MAX))
                    .bind(PAGE as i64)
                    .execute(storage.pool())
                    .await
                    .map_err(|e| Error::Transient(format!("finished jobs: {e}")))?;
                    forgot += done.rows_affected();
                    if done.rows_affected() < PAGE {
                        break;
                    }
                }
                Ok(forgot)
            }
        }
    }
}
