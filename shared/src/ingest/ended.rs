//! A run's job waits for its fan-out jobs (batches, partitions) by looking
//! at the database every so often. A fan-out job that ends announces it
//! (through the queue: a Redis message every worker hears, or in the
//! process for the embedded queue), and the run's job, watching here, looks
//! at once: the end of a run no longer waits out a poll after its last
//! batch. An announcement that is lost costs one poll, as before; one that
//! no one watches costs nothing. Batch ends and partition ends are told
//! apart, so that a run's job waiting for partitions is not woken by every
//! batch of its partitions.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{Notify, futures::Notified};

/// Which of a run's fan-out jobs ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Batch,
    Partition,
}

/// The message announcing that a `what` job of run `run_id` ended (its
/// watchers wait under it).
pub fn message(what: Ended, run_id: &str) -> String {
    let kind = match what {
        Ended::Batch => "batch",
        Ended::Partition => "partition",
    };
    format!("{kind}:{run_id}")
}

/// This process's watchers of runs, by [`message`]; clones share them.
#[derive(Debug, Clone, Default)]
pub struct Endings(Arc<Mutex<HashMap<String, Watched>>>);

#[derive(Debug)]
struct Watched {
    watchers: usize,
    notify: Arc<Notify>,
}

impl Endings {
    /// Watches the ends of run `run_id`'s `what` jobs until the watch is
    /// dropped.
    pub fn watch(&self, what: Ended, run_id: &str) -> Watch {
        let key = message(what, run_id);
        let mut runs = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let watched = runs.entry(key.clone()).or_insert_with(|| Watched {
            watchers: 0,
            notify: Arc::default(),
        });
        watched.watchers += 1;
        Watch {
            endings: self.clone(),
            key,
            notify: watched.notify.clone(),
        }
    }

    /// A job ended, as `message` says (see [`message`]): wakes this
    /// process's watchers of its run and kind (nothing when there are none).
    pub fn announce(&self, message: &str) {
        let runs = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(watched) = runs.get(message) {
            watched.notify.notify_waiters();
        }
    }
}

/// A watch on one run (see [`Endings::watch`]).
#[derive(Debug)]
pub struct Watch {
    endings: Endings,
    key: String,
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

/// Waits for `next` (see [`Watch::next`]; none when nothing is watched),
/// at most `poll`: the look after it is the fallback for a lost message.
pub async fn until(next: Option<Notified<'_>>, poll: Duration) {
    match next {
        Some(next) => {
            let _ = tokio::time::timeout(poll, next).await;
        }
        None => tokio::time::sleep(poll).await,
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut runs = self.endings.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(watched) = runs.get_mut(&self.key) {
            watched.watchers -= 1;
            if watched.watchers == 0 {
                runs.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An end announced after `next` was taken wakes it even though the
    /// watcher was busy looking at the database then; another run's end,
    /// or the run's partition's end for a watch on batches, does not; a
    /// dropped watch leaves nothing behind.
    #[tokio::test]
    async fn an_end_announced_after_next_was_taken_wakes_it() {
        let endings = Endings::default();
        let watch = endings.watch(Ended::Batch, "run-a");
        let next = watch.next();
        endings.announce(&message(Ended::Batch, "run-b"));
        endings.announce(&message(Ended::Batch, "run-a"));
        tokio::time::timeout(Duration::from_secs(1), next)
            .await
            .expect("the announced end was missed");

        let next = watch.next();
        endings.announce(&message(Ended::Batch, "run-b"));
        endings.announce(&message(Ended::Partition, "run-a"));
        let woken = tokio::time::timeout(Duration::from_millis(50), next).await;
        assert!(woken.is_err(), "another run's or kind's end woke the watch");

        let second = endings.watch(Ended::Batch, "run-a");
        drop(watch);
        assert_eq!(endings.0.lock().unwrap().len(), 1, "still watched");
        drop(second);
        assert!(endings.0.lock().unwrap().is_empty(), "a watch was left");
    }
}
