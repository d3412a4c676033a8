//! The Tasks-mode object reads one worker process has in flight: one pool
//! of `LABELSYNC_WORKER_CONCURRENCY` x `LABELSYNC_FETCH_CONCURRENCY`
//! reads, shared by every job of the process.
//!
//! Each job had its own `LABELSYNC_FETCH_CONCURRENCY` reads, so a batch ran
//! its objects in rounds of that many even when it was the only job of its
//! worker: the fleet's last batches took four round trips each while the
//! slots beside them idled. From the pool, a job alone reads as many
//! objects at once as the whole worker may, and jobs running together
//! share it first come, first served (tokio's semaphore is fair), so an
//! earlier batch ends sooner instead of all of them ending together. What
//! one process reads at once, and so the memory those reads may hold, is
//! bounded by the same settings as before.
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::{Error, Result, config::WorkerSettings};

/// The process's pool of object reads (see the module's documentation).
#[derive(Debug)]
pub struct Reads {
    slots: Semaphore,
    size: usize,
}

impl Reads {
    /// A pool of `size` reads (at least one).
    pub fn new(size: usize) -> Self {
        let size = size.max(1);
        Reads {
            slots: Semaphore::new(size),
            size,
        }
    }

    /// The pool a worker with these settings has: a read for each of its
    /// jobs' `fetch_concurrency`.
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
        self.slots
            .acquire()
            .await
            .map_err(|e| Error::Internal(format!("object read pool: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_read_waits_while_the_pool_is_taken() {
        let reads = Reads::new(2);
        let (a, b) = (reads.take().await.unwrap(), reads.take().await.unwrap());
        let third = reads.take();
        tokio::pin!(third);
        assert!(
            futures::poll!(third.as_mut()).is_pending(),
            "a third read was let in"
        );
        drop(a);
        let c = third.await.unwrap();
        assert_eq!(reads.slots.available_permits(), 0);
        drop((b, c));
        assert_eq!(reads.slots.available_permits(), reads.size());
    }
}
