//! Spawned tasks tied to their owner. At the bottom of the crate: the
//! storage layer's listing task uses it as the job layer's heartbeats do.

/// A spawned task (a lease's heartbeat, a worker's job, a listing read
/// ahead) aborted when this is dropped, so it never outlives what it works
/// for.
pub struct AbortOnDrop<T = ()>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
