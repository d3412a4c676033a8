//! A run's job waits for its fan-out jobs (batches, partitions) by looking
//! at the database every so often. A fan-out job that ends announces it
//! (through the queue: a Redis message every worker hears, or in the
//! process for the embedded queue), and the run's job, watching here, looks
//! at once: the end of a run no longer waits out a poll after its last
//! batch. An announcement that is lost costs one poll, as before; one that
//! no one watches costs nothing.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{Notify, futures::Notified};

/// This process's watchers of runs, by run id; clones share them.
#[derive(Debug, Clone, Default)]
pub struct Endings(Arc<Mutex<HashMap<String, Watched>>>);

#[derive(Debug)]
struct Watched {
    watchers: usize,
    notify: Arc<Notify>,
}

impl Endings {
    /// Watches the ends of run `run_id`'s fan-out jobs until the watch is
    /// dropped.
    pub fn watch(&self, run_id: &str) -> Watch {
        let mut runs = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let watched = runs.entry(run_id.to_owned()).or_insert_with(|| Watched {
            watchers: 0,
            notify: Arc::default(),
        });
        watched.watchers += 1;
        Watch {
            endings: self.clone(),
            run_id: run_id.to_owned(),
            notify: watched.notify.clone(),
        }
    }

    /// One of run `run_id`'s fan-out jobs ended: wakes this process's
    /// watchers of the run (nothing when there are none).
    pub fn announce(&self, run_id: &str) {
        let runs = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(watched) = runs.get(run_id) {
            watched.notify.notify_waiters();
        }
    }
}

/// A watch on one run (see [`Endings::watch`]).
#[derive(Debug)]
pub struct Watch {
    endings: Endings,
    run_id: String,
    notify: Arc<Notify>,
}

impl Watch {
    /// Resolves at the first end announced after this call. Take it before
    /// looking at what is pending, then await it: an end announced between
    /// the look and the wait still wakes it.
    pub fn next(&self) -> Notified<'_> {
        self.notify.notified()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut runs = self.endings.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(watched) = runs.get_mut(&self.run_id) {
            watched.watchers -= 1;
            if watched.watchers == 0 {
                runs.remove(&self.run_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An end announced after `next` was taken wakes it even though the
    /// watcher was busy looking at the database then; another run's end
    /// does not; a dropped watch leaves nothing behind.
    #[tokio::test]
    async fn an_end_announced_after_next_was_taken_wakes_it() {
        let endings = Endings::default();
        let watch = endings.watch("run-a");
        let next = watch.next();
        endings.announce("run-b");
        endings.announce("run-a");
        tokio::time::timeout(Duration::from_secs(1), next)
            .await
            .expect("the announced end was missed");

        let next = watch.next();
        endings.announce("run-b");
        let woken = tokio::time::timeout(Duration::from_millis(50), next).await;
        assert!(woken.is_err(), "another run's end woke the watch");

        let second = endings.watch("run-a");
        drop(watch);
        assert_eq!(endings.0.lock().unwrap().len(), 1, "still watched");
        drop(second);
        assert!(endings.0.lock().unwrap().is_empty(), "a watch was left");
    }
}
