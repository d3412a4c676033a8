//! Wakes idle workers when a job is pushed: Redis workers through a
//! message, the embedded queue's worker through the [`Signal`] the push
//! raises in the process.
//!
//! apalis-redis 1.0 looks for jobs on its poll interval
//! (`LABELSYNC_QUEUE_POLL_MS`), and its own "available" messages are not
//! sent for our pushes (they land in its scheduled set first). So a job
//! waited up to one interval before a worker took it, once per hop of a run:
//! the sync job, then every wave of fan-out batches. Now the pusher
//! publishes on the queue's wake channel, every worker subscribes, and a
//! message makes an idle worker look at once.
//!
//! The interval poll stays: a lost message (Redis restarting, a worker
//! subscribing after the push) costs one interval, as before, and nothing
//! else. A message carries no job; a worker that finds nothing waits again.
//!
//! The same subscription hears the ends of fan-out jobs (batches,
//! partitions) on a second channel, each message a kind and a run id, and
//! wakes this process's watchers of them (see [`crate::ingest::ended`]).
use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, StreamExt, task::AtomicWaker};

use crate::ingest::ended::Endings;

/// The wake channel of the apalis queue named `queue`.
pub fn channel(queue: &str) -> String {
    format!("{queue}:wake")
}

/// The channel of the queue named `queue` where fan-out jobs announce
/// their ends (a run id per message).
pub fn ended_channel(queue: &str) -> String {
    format!("{queue}:ended")
}

/// Publishes `message` on `channel`: tells the queue's idle workers to look
/// now, or a run's job that a job of its run ended. Best effort: a failure
/// is logged, and the listeners' interval polls find the work anyway.
pub async fn publish(conn: &mut redis::aio::ConnectionManager, channel: &str, message: &str) {
    let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
        .arg(channel)
        .arg(message)
        .query_async(conn)
        .await;
    if let Err(err) = sent {
        tracing::debug!(error = %err, channel, "not published; listeners find the work at their next poll");
    }
}

/// Wake-ups not yet seen by the worker, folded into one: a stream that
/// yields once after any number of [`Signal::wake`] calls.
#[derive(Debug, Clone, Default)]
pub struct Signal(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    waker: AtomicWaker,
    set: AtomicBool,
}

impl Signal {
    pub fn wake(&self) {
        self.0.set.store(true, Ordering::Release);
        self.0.waker.wake();
    }
}

impl Stream for Signal {
    type Item = ();

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<()>> {
        let inner = &self.0;
        // Register first, even when the signal is set: apalis' poll strategy
        // does not poll a stream again in the call that found it ready, so
        // a look that returned Ready without registering left no waker, and
        // every later wake was lost (the worker slept until its heartbeat).
        // Registering before looking also keeps a wake in between.
        inner.waker.register(cx.waker());
        if inner.set.swap(false, Ordering::AcqRel) {
            Poll::Ready(Some(()))
        } else {
            Poll::Pending
        }
    }
}

/// How long a lost subscription waits before connecting again.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// Subscribes to the wake and end channels of the queue named `queue`:
/// wakes `signal` on every wake message, and `endings`' watchers of the
/// run an end message names; until aborted. A dropped connection is made
/// again after [`RESUBSCRIBE_AFTER`] (meanwhile the polls carry on).
pub async fn listen(client: redis::Client, queue: String, signal: Signal, endings: Endings) {
    let channels = [channel(&queue), ended_channel(&queue)];
    loop {
        match follow(&client, &channels, &signal, &endings).await {
            Ok(()) => tracing::debug!(queue, "queue wake subscription ended"),
            Err(err) => tracing::debug!(error = %err, queue, "queue wake subscription failed"),
        }
        tokio::time::sleep(RESUBSCRIBE_AFTER).await;
    }
}

/// One subscription to `[wake, ended]`, until its connection ends.
async fn follow(
    client: &redis::Client,
    [wake, ended]: &[String; 2],
    signal: &Signal,
    endings: &Endings,
) -> redis::RedisResult<()> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(&[wake, ended]).await?;
    // Anything pushed while unsubscribed is found by this look.
    signal.wake();
    let mut messages = pubsub.on_message();
    while let Some(message) = messages.next().await {
        if message.get_channel_name() == ended.as_str() {
            if let Ok(ended) = message.get_payload::<String>() {
                endings.announce(&ended);
            }
        } else {
            signal.wake();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use futures::task::{ArcWake, waker};

    use super::*;

    #[derive(Default)]
    struct Count(AtomicUsize);

    impl ArcWake for Count {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The subscription's first wake may come before the worker first looks
    /// at the signal (it is set as the subscription starts). The look that
    /// finds it set must still leave the worker's waker behind: apalis'
    /// poll strategy does not look again at a strategy that was ready, and
    /// with no waker the worker slept until its next heartbeat (5 s by
    /// default) before it took its first job.
    #[test]
    fn a_signal_found_set_still_wakes_its_poller_on_the_next_wake() {
        let signal = Signal::default();
        signal.wake();
        let count = Arc::new(Count::default());
        let waker = waker(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut stream = signal.clone();
        assert_eq!(stream.poll_next_unpin(&mut cx), Poll::Ready(Some(())));
        signal.wake();
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "the poller was not woken"
        );
        assert_eq!(stream.poll_next_unpin(&mut cx), Poll::Ready(Some(())));
        assert_eq!(stream.poll_next_unpin(&mut cx), Poll::Pending);
    }
}
