//! The byte budgets of a worker process: memory for parsing large rows and
//! files, memory for rows parsed and not committed yet, and disk for copies
//! of Parquet objects.
//!
//! **Parsing.** Parsing one row costs far more memory than its text while
//! it is parsed (a JSONL line of `[],[],...` becomes about 11 times its
//! size as a `serde_json::Value` before the row check can refuse it, and
//! one of `0,0,...` up to 32 times: a `Value` is 32 bytes for two of text,
//! and a vector may hold twice its length), and a worker parses up to
//! `LABELSYNC_WORKER_CONCURRENCY` x `LABELSYNC_FETCH_CONCURRENCY` objects at
//! once (`super::reads`). Every parse of a large row or file reserves what
//! it may cost from one budget per process (`LABELSYNC_PARSE_BUDGET_BYTES`)
//! and waits while the budget is spent, so the sum of these spikes is
//! bounded by the setting, not by the input. A reservation is held while
//! one row (JSONL) or one file (JSON) is parsed and its rows are handed on
//! (a JSONL row keeps what it takes once parsed, or its whole reservation
//! when it takes more, while it may wait for room in the rows in flight),
//! or while a Parquet child reads one row group. A
//! reservation larger than the whole budget is cut to it: that parse runs
//! alone (a row, whose size `LABELSYNC_MAX_TASK_BYTES` bounds; a Parquet
//! row group that needs more than the budget is refused before it is read,
//! see `parse::parse_parquet`).
//!
//! **Rows in flight.** Parsed rows wait for their transaction in chunks
//! (`super::task_files`): one being filled per object, two in its channel,
//! two being committed, up to 8 MiB each. At 64 objects read at once that
//! was gigabytes of legitimate large rows that no setting bounded. Each
//! chunk now holds its rows' memory (as the row check measures it) from a
//! second budget (`LABELSYNC_ROWS_IN_FLIGHT_BYTES`) until its transaction
//! ends; a parse whose next row does not fit hands its chunk on to be
//! committed and waits for room for that row.
//!
//! Small objects' rows wait for a transaction shared with other small
//! objects (`super::ImportJob::import_objects`), holding their share too
//! (their own size, not the megabyte steps their chunk took it in): a job
//! whose database lagged held a page's worth of them outside the budget.
//! Such rows are committed a chunk's worth at a time, so a job commits
//! what it holds, whole chunk or not, as soon as a parse waits for room
//! ([`ByteBudget::waits_begin`]).
//!
//! **Disk.** Parquet is read from a local copy of the object (random
//! access), and up to 64 objects are read at once: a bucket of large
//! Parquet files filled the worker's disk (a pod's `/tmp` is 8 GiB) and
//! had it evicted, on every retry. Each copy reserves its object's listed
//! size (the object size limit when none was listed) from
//! `LABELSYNC_SPOOL_BYTES` before it is downloaded and holds it until the
//! file is read; a larger object is its error. A copy waits for its room
//! holding nothing, and for one of the process's reads holding only its
//! room; a holder of a read never waits for room (a copy past its room
//! takes more only where it is free at once).
//!
//! **Why waiting cannot deadlock.** Every wait is for memory that is freed
//! without anyone waiting on a budget in turn:
//! - rows in flight are waited for only by a parse that holds none of them
//!   but chunks it has handed on, which their transactions let go (it may
//!   hold a parse reservation: a JSONL row's, a JSON file's, a Parquet row
//!   group's), and small objects' rows, which their job commits once
//!   someone waits;
//! - the parse budget is waited for only by a parse that holds none of it
//!   (a Parquet parent lets its row group's go while it waits for a long
//!   line's), and that has handed its chunk on first
//!   (`parse::RowEvent::WillWait`): a chunk held while its parse waited
//!   for the parse budget could keep a Parquet parent, which waits for
//!   rows in flight while holding a row group's reservation, waiting for
//!   ever.
use std::sync::{
    OnceLock,
    atomic::{AtomicUsize, Ordering},
};

use tokio::sync::{Notify, Semaphore, SemaphorePermit, futures::Notified};

/// Text smaller than this is parsed without a reservation (nearly every
/// row): the budget is for the few rows that could hurt.
pub const SMALL: usize = 64 << 10;
/// How many times its text a row may take in memory while it is parsed
/// (12 counted `[],[]` but not an array of short numbers).
pub const EXPANSION: usize = 32;

/// Bytes that one process's parses, its rows in flight, or its copies of
/// Parquet objects may take at once. A reservation waits while the budget
/// is spent; one larger than the whole budget is cut to it and runs alone.
#[derive(Debug)]
pub struct ByteBudget {
    kib: Semaphore,
    total_kib: u32,
    /// Blocking takes waiting now ([`Self::take`]), and their start told.
    waiting: AtomicUsize,
    wait_begins: Notify,
}

/// One blocking take waiting, until it drops.
struct Waiting<'a>(&'a ByteBudget);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ByteBudget {
    pub fn new(bytes: usize) -> Self {
        let total_kib = u32::try_from(bytes >> 10).unwrap_or(u32::MAX).max(1);
        ByteBudget {
            kib: Semaphore::new(total_kib as usize),
            total_kib,
            waiting: AtomicUsize::new(0),
            wait_begins: Notify::new(),
        }
    }

    /// The whole budget, in bytes.
    pub fn bytes(&self) -> u64 {
        u64::from(self.total_kib) << 10
    }

    /// A parse's reservation: waits (blocking the calling thread: parsers
    /// run on blocking threads) until `bytes` of the budget are free and
    /// holds them until the permit drops, calling `will_wait` first when it
    /// must wait (the parse hands its rows on, see the module's
    /// documentation). `None` for small amounts, which are not counted.
    pub fn reserve(
        &self,
        bytes: usize,
        will_wait: &mut dyn FnMut(),
    ) -> Option<SemaphorePermit<'_>> {
        if bytes < SMALL * EXPANSION {
            return None;
        }
        self.try_take(bytes).or_else(|| {
            will_wait();
            self.take(bytes)
        })
    }

    /// `bytes` of the budget, waiting for them (blocking the calling
    /// thread), however few they are. A wait is told to those who watch
    /// for it ([`Self::waits_begin`]).
    pub fn take(&self, bytes: usize) -> Option<SemaphorePermit<'_>> {
        let kib = self.kib_of(bytes);
        if let Ok(permit) = self.kib.try_acquire_many(kib) {
            return Some(permit);
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(self);
        self.wait_begins.notify_waiters();
        futures::executor::block_on(self.kib.acquire_many(kib)).ok()
    }

    /// The bytes of the budget no one holds now.
    #[cfg(test)]
    pub(crate) fn free_bytes(&self) -> u64 {
        (self.kib.available_permits() as u64) << 10
    }

    /// Whether a blocking take waits for room now.
    pub fn someone_waits(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0
    }

    /// Ends when a blocking take starts to wait for room: one that started
    /// before this future was made is not told (check
    /// [`Self::someone_waits`] after making it).
    pub fn waits_begin(&self) -> Notified<'_> {
        self.wait_begins.notified()
    }

    /// `bytes` of the budget, waiting for them on the async runtime (cut to
    /// the whole budget, as `take`).
    pub async fn acquire(&self, bytes: usize) -> Option<SemaphorePermit<'_>> {
        self.kib.acquire_many(self.kib_of(bytes)).await.ok()
    }

    /// `bytes` of the budget if they are free now.
    pub fn try_take(&self, bytes: usize) -> Option<SemaphorePermit<'_>> {
        self.kib.try_acquire_many(self.kib_of(bytes)).ok()
    }

    /// `bytes` in the budget's units, cut to the whole budget.
    fn kib_of(&self, bytes: usize) -> u32 {
        u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .min(self.total_kib)
    }
}

/// Cuts `permit` to what `bytes` take (a budget counts kibibytes), and lets
/// the rest of it go.
pub fn shrink(permit: &mut SemaphorePermit<'_>, bytes: usize) {
    let excess = permit.num_permits().saturating_sub(bytes.div_ceil(1024));
    drop(permit.split(excess));
}

/// The process's parse budget, sized by the first caller's setting (every
/// run of a process has the same settings).
pub fn process_budget(bytes: usize) -> &'static ByteBudget {
    static BUDGET: OnceLock<ByteBudget> = OnceLock::new();
    BUDGET.get_or_init(|| ByteBudget::new(bytes))
}

/// The process's budget of rows in flight, sized as `process_budget` is.
pub fn rows_in_flight(bytes: usize) -> &'static ByteBudget {
    static BUDGET: OnceLock<ByteBudget> = OnceLock::new();
    BUDGET.get_or_init(|| ByteBudget::new(bytes))
}

/// The process's disk for copies of Parquet objects
/// (`LABELSYNC_SPOOL_BYTES`), sized as `process_budget` is.
pub fn spool(bytes: u64) -> &'static ByteBudget {
    static BUDGET: OnceLock<ByteBudget> = OnceLock::new();
    BUDGET.get_or_init(|| ByteBudget::new(usize::try_from(bytes).unwrap_or(usize::MAX)))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A blocking take that has to wait is told to those watching
    /// (`waits_begin`, made before it), and counted until it gets its room;
    /// one that finds room at once tells nobody.
    #[tokio::test]
    async fn a_take_that_waits_for_room_is_told() {
        let budget: &'static ByteBudget = Box::leak(Box::new(ByteBudget::new(1 << 20)));
        let everything = budget.try_take(1 << 20).expect("the whole budget");
        let told = budget.waits_begin();
        assert!(!budget.someone_waits());
        let waiter = tokio::task::spawn_blocking(|| budget.take(1024).map(|p| p.num_permits()));
        tokio::time::timeout(Duration::from_secs(10), told)
            .await
            .expect("told of the wait");
        assert!(budget.someone_waits());
        drop(everything);
        assert_eq!(waiter.await.expect("the waiter"), Some(1));
        assert!(!budget.someone_waits());
        let told = budget.waits_begin();
        let _room = budget.take(1024).expect("room");
        let quiet = tokio::time::timeout(Duration::from_millis(50), told).await;
        assert!(quiet.is_err(), "a take that did not wait was told");
    }

    #[test]
    fn reservations_wait_for_the_budget_and_big_ones_are_cut_to_it() {
        let budget = ByteBudget::new(10 << 20);
        let mut waits = 0;
        let mut will_wait = || waits += 1;
        assert!(budget.reserve(1000, &mut will_wait).is_none());
        let big = budget
            .reserve(100 << 20, &mut will_wait)
            .expect("a reservation");
        assert_eq!(budget.kib.available_permits(), 0);
        drop(big);
        let a = budget
            .reserve(6 << 20, &mut will_wait)
            .expect("a reservation");
        assert_eq!(budget.kib.available_permits(), 4 << 10);
        assert!(budget.kib.try_acquire_many(5 << 10).is_err());
        drop(a);
        assert_eq!(budget.kib.available_permits(), 10 << 10);
    }
}
