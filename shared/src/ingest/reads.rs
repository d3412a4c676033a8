//! The Tasks-mode object reads one worker process has in flight: one pool
//! of `LABELSYNC_WORKER_CONCURRENCY` x `LABELSYNC_FETCH_CONCURRENCY`
//! reads, shared by every job of the process.
//!
//! Each job had its own `LABELSYNC_FETCH_CONCURRENCY` reads, so a batch ran
//! its objects in rounds of that many even when it was the only job of its
//! worker: the fleet's last batches took four round trips each while the
//! slots beside them idled. From the pool, a job alone reads as many
//! objects at once as the whole worker may, and jobs running together
//! take reads first come, first served (tokio's semaphore is fair): the
//! earlier batch ends sooner, so a slot takes its next job while the
//! others still read, instead of every slot at once with the pool idle.
//! A read is held for one attempt at an object, not across the pause
//! before a retry, so a throttled job does not sit on reads while it
//! waits. What one process reads at once, and so the memory those reads
//! may hold, is bounded by the same settings as before.
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::{Error, Result, config::WorkerSettings};

/// The process's pool of object reads (see the module's documentation).
#[derive(Debug)]
pub struct Reads {
    pool: Semaphore,
    size: usize,
}

impl Reads {
    /// A pool of `size` reads (at least one).
    pub fn new(size: usize) -> Self {
        let size = size.max(1);
        Reads {
            pool: Semaphore::new(size),
            size,
        }
    }

    /// The pool a worker with these settings has: `fetch_concurrency` reads
    /// for each of its job slots.
    pub fn for_worker(settings: &WorkerSettings) -> Self {
        Self::new(
            settings
                .concurrency
                .max(1)
                .saturating_mul(settings.fetch_concurrency.max(1)),
        )
    }

    /// The most reads one job can have in flight: the whole pool.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Waits for a read of the pool, held until the permit drops. Waiters
    /// are served in the order they came.
    pub async fn take(&self) -> Result<SemaphorePermit<'_>> {
        // The semaphore is never closed; the error is for completeness.
        self.pool
            .acquire()
            .await
            .map_err(|e| Error::Internal(format!("object reads: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_wait_while_the_pool_is_taken_and_come_in_turn() {
        let reads = Reads::new(2);
        let (a, b) = (reads.take().await.unwrap(), reads.take().await.unwrap());
        let (first, second) = (reads.take(), reads.take());
        tokio::pin!(first, second);
        assert!(futures::poll!(first.as_mut()).is_pending(), "a third read");
        assert!(
            futures::poll!(second.as_mut()).is_pending(),
            "a fourth read"
        );
        drop(a);
        assert!(
            futures::poll!(second.as_mut()).is_pending(),
            "a later waiter went first"
        );
        let c = first.await.unwrap();
        drop(b);
        let d = second.await.unwrap();
        assert_eq!(reads.pool.available_permits(), 0);
        drop((c, d));
        assert_eq!(reads.pool.available_permits(), reads.size());
    }
}
