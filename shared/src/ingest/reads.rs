//! The Tasks-mode object reads one worker process has in flight: one pool
//! of `LABELSYNC_WORKER_CONCURRENCY` x `LABELSYNC_FETCH_CONCURRENCY`
//! reads, shared by every job of the process.
//!
//! Each job had its own `LABELSYNC_FETCH_CONCURRENCY` reads, so a batch ran
//! its objects in rounds of that many even when it was the only job of its
//! worker: the fleet's last batches took four round trips each while the
//! slots beside them idled. From the pool, a job alone reads as many
//! objects at once as the whole worker may, and jobs of one storage take
//! reads first come, first served: the earlier batch ends sooner, so a
//! slot takes its next job while the others still read, instead of every
//! slot at once with the pool idle.
//!
//! A job's objects keep the order they had when the job started: it
//! reserves a turn for each ([`Reads::turns`]) and waits for a read in
//! that turn ([`Reads::take_in_turn`]). A job's waits only join the queue
//! as it polls them, over several polls on a busy runtime (its stream
//! yields now and then), so in order of arrival a job's later objects
//! queued behind the next jobs' and all of a worker's first batches ended
//! together, several round trips late, holding their slots.
//!
//! Between storages the pool is shared fairly: a free read goes to the
//! waiting storage that holds the fewest (the earliest waiter breaks a
//! tie). First come, first served across storages let a slow one take
//! the pool: its reads are held longest, so at each turn of the queue it
//! held more of them, and a fast storage's jobs beside it read a few
//! objects at a time. Now a storage that others wait beside keeps its
//! equal part; alone it may hold the whole pool (nothing is taken from a
//! read in flight: a storage that arrives waits for reads to come back).
//! Fairness is between storages waiting at the same moment: one between
//! two batches waits for nothing, so the reads that come back meanwhile go
//! to the others, and its next batch waits for one of theirs to come back
//! (one of their round trips at most, not their whole queue).
//!
//! A read is held for one attempt at an object, not across the pause
//! before a retry, so a throttled job does not sit on reads while it
//! waits. What one process reads at once, and so the memory those reads
//! may hold, is bounded by the same settings as before.
use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    pin::Pin,
    sync::{Mutex, MutexGuard},
    task::{Context, Poll, Waker},
};

use crate::config::WorkerSettings;

/// The process's pool of object reads (see the module's documentation).
#[derive(Debug)]
pub struct Reads {
    size: usize,
    state: Mutex<State>,
}

/// Who holds and who waits for the pool's reads. Invariant: reads are free
/// only while nobody waits (every change hands them out at once).
#[derive(Debug, Default)]
struct State {
    free: usize,
    /// Numbers the waiters in the order they came.
    next_ticket: u64,
    by_storage: HashMap<i64, Share>,
    /// Waiting tickets and the task to wake when one is handed a read (a
    /// ticket leaves when it is: see [`State::served`]).
    wakers: HashMap<u64, Waker>,
}

/// One storage's part: reads held, and tickets waiting (lowest first).
#[derive(Debug, Default)]
struct Share {
    held: usize,
    waiting: VecDeque<u64>,
}

/// Turns reserved by [`Reads::turns`], one per object, in order.
#[derive(Debug, Clone, Copy)]
pub struct Turns {
    first: u64,
    count: u64,
}

impl Turns {
    /// The `i`th turn (counting from 0); `None` past the reserved ones.
    pub fn nth(&self, i: usize) -> Option<u64> {
        let i = u64::try_from(i).ok().filter(|i| *i < self.count)?;
        Some(self.first + i)
    }
}

impl Reads {
    /// A pool of `size` reads (at least one).
    pub fn new(size: usize) -> Self {
        let size = size.max(1);
        Reads {
            size,
            state: Mutex::new(State {
                free: size,
                ..State::default()
            }),
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

    /// Waits for a read of the pool for an object of `storage`, held until
    /// the [`Read`] drops. Waiters of one storage are served in the order
    /// they came; between storages, see the module's documentation.
    pub fn take(&self, storage: i64) -> Take<'_> {
        self.take_in_turn(storage, None)
    }

    /// Reserves `count` turns in the queue, after every ticket given so far.
    pub fn turns(&self, count: usize) -> Turns {
        let count = u64::try_from(count).unwrap_or(u64::MAX);
        let mut state = self.lock();
        let first = state.next_ticket;
        state.next_ticket = first.saturating_add(count);
        Turns { first, count }
    }

    /// Waits for a read as [`Self::take`] does, queued by `turn` (one of
    /// [`Self::turns`]) rather than by when it is first polled: it goes
    /// before waiters of the storage with a later turn or ticket. With no
    /// turn, it queues as the newest waiter ([`Self::take`]).
    pub fn take_in_turn(&self, storage: i64, turn: Option<u64>) -> Take<'_> {
        Take {
            reads: self,
            storage,
            turn,
            ticket: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Poisoned only by a debug check of a broken count: the counts are
        // used as they are rather than failing every later read.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives back one read of `storage` and hands out what is free.
    fn give_back(&self, storage: i64) {
        let woken = {
            let mut state = self.lock();
            let share = state.by_storage.get_mut(&storage);
            debug_assert!(
                share.as_ref().is_some_and(|s| s.held > 0),
                "a read given back that was not held"
            );
            if let Some(share) = share {
                share.held = share.held.saturating_sub(1);
            }
            state.free += 1;
            state.forget_if_idle(storage);
            state.hand_out()
        };
        woken.into_iter().for_each(Waker::wake);
    }
}

impl State {
    /// Takes a free read for `storage`; false when none is free (others
    /// wait then, and so must it).
    fn take_free(&mut self, storage: i64) -> bool {
        if self.free == 0 {
            return false;
        }
        self.free -= 1;
        self.by_storage.entry(storage).or_default().held += 1;
        true
    }

    /// Queues a waiter for a read of `storage`, woken by `waker`, in
    /// `turn` (else as the newest); its ticket.
    fn queue(&mut self, storage: i64, turn: Option<u64>, waker: &Waker) -> u64 {
        let ticket = turn.unwrap_or_else(|| {
            let next = self.next_ticket;
            self.next_ticket += 1;
            next
        });
        let share = self.by_storage.entry(storage).or_default();
        let at = share.waiting.partition_point(|t| *t < ticket);
        share.waiting.insert(at, ticket);
        self.wakers.insert(ticket, waker.clone());
        ticket
    }

    /// Whether `ticket` was handed a read; if not, `waker` is now the one
    /// its read wakes.
    fn served(&mut self, ticket: u64, waker: &Waker) -> bool {
        let Some(kept) = self.wakers.get_mut(&ticket) else {
            return true;
        };
        if !kept.will_wake(waker) {
            kept.clone_from(waker);
        }
        false
    }

    /// Hands the free reads to waiters, each to the waiting storage that
    /// holds the fewest (the earlier waiter first on a tie); the wakers of
    /// those served.
    fn hand_out(&mut self) -> Vec<Waker> {
        let mut woken = Vec::new();
        while self.free > 0 {
            let next = self
                .by_storage
                .iter()
                .filter_map(|(id, s)| s.waiting.front().map(|t| (s.held, *t, *id)))
                .min();
            let Some((_, _, storage)) = next else { break };
            let share = self
                .by_storage
                .get_mut(&storage)
                .expect("a waiting storage");
            let ticket = share.waiting.pop_front().expect("a waiter");
            share.held += 1;
            self.free -= 1;
            // The ticket leaves `wakers` when served: its `Take` finds
            // itself gone and holds the read.
            let waker = self.wakers.remove(&ticket);
            debug_assert!(waker.is_some(), "a queued ticket without a waker");
            woken.extend(waker);
        }
        woken
    }

    /// Drops `storage`'s entry once it holds and waits for nothing.
    fn forget_if_idle(&mut self, storage: i64) {
        if self
            .by_storage
            .get(&storage)
            .is_some_and(|s| s.held == 0 && s.waiting.is_empty())
        {
            self.by_storage.remove(&storage);
        }
    }
}

/// A read of the pool, given back when dropped.
#[derive(Debug)]
pub struct Read<'a> {
    reads: &'a Reads,
    storage: i64,
}

impl Drop for Read<'_> {
    fn drop(&mut self) {
        self.reads.give_back(self.storage);
    }
}

/// The wait for a read ([`Reads::take`]). Dropped while waiting, it leaves
/// the queue; dropped after it was served but before it was polled, it
/// gives the read back. Like any future, it is not to be polled again once
/// ready (it would take a second read).
#[derive(Debug)]
pub struct Take<'a> {
    reads: &'a Reads,
    storage: i64,
    /// Its place in the queue, if reserved ([`Reads::take_in_turn`]).
    turn: Option<u64>,
    /// Set once queued.
    ticket: Option<u64>,
}

impl<'a> Future for Take<'a> {
    type Output = Read<'a>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Read<'a>> {
        let (reads, storage) = (self.reads, self.storage);
        let mut state = reads.lock();
        let ready = match self.ticket {
            None if state.take_free(storage) => true,
            None => {
                self.ticket = Some(state.queue(storage, self.turn, cx.waker()));
                false
            }
            Some(ticket) => state.served(ticket, cx.waker()),
        };
        drop(state);
        if !ready {
            return Poll::Pending;
        }
        self.ticket = None; // the read is ours: nothing to give back on drop
        Poll::Ready(Read { reads, storage })
    }
}

impl Drop for Take<'_> {
    fn drop(&mut self) {
        let Some(ticket) = self.ticket else { return };
        let mut state = self.reads.lock();
        if state.wakers.remove(&ticket).is_some() {
            // Still waiting: leave the queue.
            if let Some(share) = state.by_storage.get_mut(&self.storage) {
                share.waiting.retain(|t| *t != ticket);
            }
            state.forget_if_idle(self.storage);
            return;
        }
        drop(state);
        // Served but never polled again: the read goes back.
        self.reads.give_back(self.storage);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    fn free(reads: &Reads) -> usize {
        reads.lock().free
    }

    /// The read `take` was handed, failing the test if it waits (reads
    /// are handed out as they come back, never later).
    async fn served<'a>(take: Pin<&mut Take<'a>>) -> Read<'a> {
        match futures::poll!(take) {
            Poll::Ready(read) => read,
            Poll::Pending => panic!("the read was not handed out"),
        }
    }

    #[tokio::test]
    async fn reads_of_one_storage_wait_while_the_pool_is_taken_and_come_in_turn() {
        let reads = Reads::new(2);
        let (a, b) = (reads.take(1).await, reads.take(1).await);
        let (first, second) = (reads.take(1), reads.take(1));
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
        let c = served(first).await;
        drop(b);
        let d = served(second).await;
        assert_eq!(free(&reads), 0);
        drop((c, d));
        assert_eq!(free(&reads), reads.size());
        let state = reads.lock();
        assert!(state.by_storage.is_empty(), "{state:?}");
    }

    /// A storage holds what it took while alone; one that comes to wait
    /// beside it is served before the first storage's earlier waiters
    /// until the two hold equal parts, and on a tie the earlier waiter is
    /// (here the storage with the higher id, so the id breaks no tie).
    #[tokio::test]
    async fn a_free_read_goes_to_the_waiting_storage_that_holds_the_fewest() {
        const SLOW: i64 = 2;
        const FAST: i64 = 1;
        let reads = Reads::new(5);
        let other = reads.take(3).await;
        let mut slow = Vec::new();
        for _ in 0..4 {
            slow.push(reads.take(SLOW).await);
        }
        let (slow_next, fast_a, fast_b, fast_c) = (
            reads.take(SLOW),
            reads.take(FAST),
            reads.take(FAST),
            reads.take(FAST),
        );
        tokio::pin!(slow_next, fast_a, fast_b, fast_c);
        for pending in [
            futures::poll!(slow_next.as_mut()).is_pending(),
            futures::poll!(fast_a.as_mut()).is_pending(),
            futures::poll!(fast_b.as_mut()).is_pending(),
            futures::poll!(fast_c.as_mut()).is_pending(),
        ] {
            assert!(pending, "the pool is taken");
        }
        // The slow storage holds 4, the fast one none: the first two reads
        // back go to the fast one, though the slow one's waiter came first.
        slow.pop();
        let a = served(fast_a).await;
        slow.pop();
        let _b = served(fast_b).await;
        assert!(futures::poll!(slow_next.as_mut()).is_pending());
        // Two each: the tie goes to the earlier waiter, the slow one's.
        drop(other);
        let _next = served(slow_next).await;
        assert!(futures::poll!(fast_c.as_mut()).is_pending());
        // A read back goes to the one waiter left.
        drop(a);
        let _c = served(fast_c).await;
        assert_eq!(free(&reads), 0);
    }

    /// A job's reads wait in the turns it reserved when it started, not in
    /// the order they are first polled: the later job's waiter, queued
    /// first, is served after them; a plain wait queues after every turn
    /// reserved before it.
    #[tokio::test]
    async fn reads_wait_in_the_turns_their_job_reserved() {
        let reads = Reads::new(1);
        let held = reads.take(1).await;
        let (early, late) = (reads.turns(2), reads.turns(1));
        assert_eq!(early.nth(2), None, "past the reserved turns");
        let later_job = reads.take_in_turn(1, late.nth(0));
        let plain = reads.take(1);
        let second = reads.take_in_turn(1, early.nth(1));
        let first = reads.take_in_turn(1, early.nth(0));
        tokio::pin!(later_job, plain, second, first);
        for (name, pending) in [
            ("later job", futures::poll!(later_job.as_mut()).is_pending()),
            ("plain", futures::poll!(plain.as_mut()).is_pending()),
            ("second", futures::poll!(second.as_mut()).is_pending()),
            ("first", futures::poll!(first.as_mut()).is_pending()),
        ] {
            assert!(pending, "{name}: the pool is taken");
        }
        drop(held);
        let read = served(first).await;
        assert!(futures::poll!(later_job.as_mut()).is_pending());
        drop(read);
        let read = served(second).await;
        drop(read);
        let read = served(later_job).await;
        assert!(futures::poll!(plain.as_mut()).is_pending());
        drop(read);
        drop(served(plain).await);
        assert_eq!(free(&reads), 1);
    }

    /// A waiter is woken when a read comes back for it.
    #[test]
    fn a_waiter_is_woken_when_its_read_comes_back() {
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let reads = Reads::new(1);
        let Poll::Ready(held) = Pin::new(&mut reads.take(1)).poll(&mut cx) else {
            panic!("a free read waits");
        };
        let mut waiting = reads.take(2);
        assert!(Pin::new(&mut waiting).poll(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        drop(held);
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "the waiter was not woken"
        );
        assert!(Pin::new(&mut waiting).poll(&mut cx).is_ready());
    }

    /// A waiter dropped in the queue leaves it; one dropped after it was
    /// served gives its read back: no read is lost either way.
    #[tokio::test]
    async fn a_wait_given_up_loses_no_read() {
        let reads = Reads::new(1);
        let held = reads.take(1).await;
        let mut left = Box::pin(reads.take(2));
        let mut handed = Box::pin(reads.take(3));
        let after = reads.take(3);
        tokio::pin!(after);
        assert!(futures::poll!(left.as_mut()).is_pending());
        assert!(futures::poll!(handed.as_mut()).is_pending());
        assert!(futures::poll!(after.as_mut()).is_pending());
        drop(left);
        drop(held); // handed to `handed`, which is never polled again
        let waiting = reads.lock().wakers.len();
        assert_eq!(waiting, 1, "only `after` waits");
        drop(handed);
        drop(served(after).await);
        assert_eq!(free(&reads), 1);
        let state = reads.lock();
        assert!(state.by_storage.is_empty(), "{state:?}");
    }
}
