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
//! see `parse::parse_parquet`), but for the parse of a long line that is
//! the oldest grower (below), which takes past the budget instead.
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
//!   line's), or by a growing reservation ([`Growing`]) that is not the
//!   oldest, and only after the parse has handed its chunk on
//!   (`parse::RowEvent::WillWait`): a chunk held while its parse waited
//!   for the parse budget could keep a Parquet parent, which waits for
//!   rows in flight while holding a row group's reservation, waiting for
//!   ever;
//! - growing reservations wait holding what they took so far, so two of
//!   them could each hold half the budget and wait for the rest; the
//!   oldest of them never waits (it takes what the budget lacks past it),
//!   and each one becomes the oldest once those before it end (the oldest
//!   ends once its row is handed on, or a JSON file served longer than
//!   listed once it is parsed, which wait only for rows in flight and the
//!   object's reads), so none waits for ever; a grower may wait holding a
//!   plain reservation besides (that JSON file), which the oldest's never
//!   waiting covers as well. One grower at a time takes past the budget,
//!   at most the budget again (a reservation is cut to it): the parses'
//!   reservations come to at most twice the setting, whatever the number
//!   of lines read at once. That is the usual state when many long lines
//!   wait (their text fills the budget, and each parse in turn takes past
//!   it); a reservation counts what the worst shape of its text may take
//!   (32 times a line of `0,0,...`), so what parses take is far less for
//!   most text (a string takes about its text).
//!
//! **Long lines.** A JSONL line, and a Parquet child's message, is read
//! whole before it is parsed, and long ones are parsed few at a time (a
//! line's parse reserves 32 times its text): the others waited holding
//! their text outside every budget, up to 64 lines of up to
//! `LABELSYNC_MAX_TASK_BYTES` (64 files of one 15 MiB line peaked a worker
//! at 1.3 GB, past its 1 GiB in `deploy/k8s/base/worker.yaml`). A line's
//! text past [`SMALL`] is taken from the parse budget as it is read, before
//! it grows, and then its parse, in one [`Growing`] reservation.
use std::{
    collections::BTreeSet,
    pin::pin,
    sync::{
        Mutex, MutexGuard, OnceLock, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
};

use futures::future::{Either, select};

use tokio::sync::{Notify, Semaphore, SemaphorePermit, futures::Notified};

/// Text smaller than this is parsed without a reservation (nearly every
/// row): the budget is for the few rows that could hurt.
pub const SMALL: usize = 64 << 10;
/// How many times its text a row may take in memory while it is parsed
/// (12 counted `[],[]` but not an array of short numbers).
pub const EXPANSION: usize = 32;

/// Bytes that one process's parses, its rows in flight, or its copies of
/// Parquet objects may take at once. A reservation waits while the budget
/// is spent; one larger than the whole budget is cut to it and runs alone
/// (but beside the oldest [`Growing`] one, which does not wait).
#[derive(Debug)]
pub struct ByteBudget {
    kib: Semaphore,
    total_kib: u32,
    /// Blocking takes waiting now ([`Self::take`]), and their start told.
    waiting: AtomicUsize,
    wait_begins: Notify,
    /// The growing reservations ([`Growing`]).
    growers: Mutex<Growers>,
    /// Told when the oldest growing reservation ends.
    oldest_ends: Notify,
}

/// The growing reservations of a budget, by ticket: the first is the
/// oldest.
#[derive(Debug, Default)]
struct Growers {
    live: BTreeSet<u64>,
    next: u64,
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
            growers: Mutex::new(Growers::default()),
            oldest_ends: Notify::new(),
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
        let _waiting = self.wait_begins_now();
        futures::executor::block_on(self.kib.acquire_many(kib)).ok()
    }

    /// Counts a blocking take as waiting until the guard drops, and tells
    /// those who watch for it.
    fn wait_begins_now(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.wait_begins.notify_waiters();
        Waiting(self)
    }

    /// A reservation of nothing yet, which grows as its line is read and
    /// parsed ([`Growing::grow_to`]); it is younger than every one made
    /// before it.
    pub fn grower(&self) -> Growing<'_> {
        let ticket = {
            // Taken and entered at once: a ticket entered late could
            // make a second oldest while the first one borrows.
            let mut growers = self.growers();
            let ticket = growers.next;
            growers.next += 1;
            growers.live.insert(ticket);
            ticket
        };
        Growing {
            budget: self,
            ticket,
            held: None,
            borrowed_kib: 0,
        }
    }

    fn growers(&self) -> MutexGuard<'_, Growers> {
        self.growers.lock().unwrap_or_else(PoisonError::into_inner)
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

/// A reservation that grows, as a long line's text is read and then as it
/// is parsed (or as a JSON file's text passes its listed size,
/// `parse::Overrun`), and shrinks to what its row keeps: it holds what it took
/// until it drops. It waits for what it lacks unless it is the oldest one
/// of its budget, which takes what the budget lacks past it instead (see
/// the module's documentation: growers wait holding what they took, and
/// without this two of them could wait for each other for ever).
pub struct Growing<'a> {
    budget: &'a ByteBudget,
    ticket: u64,
    held: Option<SemaphorePermit<'a>>,
    /// What it took past the budget as the oldest, in the budget's units.
    borrowed_kib: u32,
}

impl<'a> Growing<'a> {
    /// Holds `bytes` in all (cut to the whole budget), waiting for what it
    /// lacks (blocking the calling thread) unless it is the oldest grower,
    /// and calling `will_wait` first when it must wait.
    pub fn grow_to(&mut self, bytes: usize, will_wait: &mut dyn FnMut()) {
        let budget = self.budget;
        let lacking = budget.kib_of(bytes).saturating_sub(self.kib());
        if lacking == 0 {
            return;
        }
        if let Ok(more) = budget.kib.try_acquire_many(lacking) {
            return self.add(more);
        }
        if self.wait_unless_oldest(lacking, will_wait) {
            self.take_as_oldest(lacking);
        }
    }

    /// Waits for `lacking` of the budget, or until this is the oldest
    /// grower: whether it is (and got nothing). The wait keeps its place in
    /// the budget's queue while older growers end.
    fn wait_unless_oldest(&mut self, lacking: u32, will_wait: &mut dyn FnMut()) -> bool {
        let budget = self.budget;
        let mut waiting = None;
        let mut room = pin!(budget.kib.acquire_many(lacking));
        loop {
            let mut oldest_ends = pin!(budget.oldest_ends.notified());
            oldest_ends.as_mut().enable();
            if self.is_oldest() {
                return true;
            }
            if waiting.is_none() {
                will_wait();
                waiting = Some(budget.wait_begins_now());
            }
            match futures::executor::block_on(select(room.as_mut(), oldest_ends)) {
                Either::Left((Ok(more), _)) => {
                    self.add(more);
                    return false;
                }
                // The budget's semaphore is never closed.
                Either::Left((Err(_), _)) => return false,
                Either::Right(_) => {}
            }
        }
    }

    /// The oldest grower's way past a spent budget: what is free of
    /// `lacking` now, the rest past the budget.
    fn take_as_oldest(&mut self, mut lacking: u32) {
        let budget = self.budget;
        let free = u32::try_from(budget.kib.available_permits()).unwrap_or(u32::MAX);
        let free = free.min(lacking);
        if free > 0
            && let Ok(more) = budget.kib.try_acquire_many(free)
        {
            self.add(more);
            lacking -= free;
        }
        self.borrowed_kib = self.borrowed_kib.saturating_add(lacking);
    }

    /// Lets go of what it holds past what `bytes` take, what it took past
    /// the budget first.
    pub fn shrink(&mut self, bytes: usize) {
        let keep = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        let mut excess = self.kib().saturating_sub(keep);
        let repaid = excess.min(self.borrowed_kib);
        self.borrowed_kib -= repaid;
        excess -= repaid;
        if let Some(held) = self.held.as_mut() {
            drop(held.split(excess as usize));
        }
    }

    /// What it holds, in the budget's units.
    fn kib(&self) -> u32 {
        let held = self.held.as_ref().map_or(0, |held| held.num_permits());
        u32::try_from(held)
            .unwrap_or(u32::MAX)
            .saturating_add(self.borrowed_kib)
    }

    fn add(&mut self, more: SemaphorePermit<'a>) {
        match self.held.as_mut() {
            Some(held) => held.merge(more),
            None => self.held = Some(more),
        }
    }

    fn is_oldest(&self) -> bool {
        self.budget.growers().live.first() == Some(&self.ticket)
    }
}

impl Drop for Growing<'_> {
    /// Lets go of what it holds, and tells the next oldest grower when it
    /// was the oldest.
    fn drop(&mut self) {
        self.held = None;
        let was_oldest = {
            let mut growers = self.budget.growers();
            let was_oldest = growers.live.first() == Some(&self.ticket);
            growers.live.remove(&self.ticket);
            was_oldest
        };
        if was_oldest {
            self.budget.oldest_ends.notify_waiters();
        }
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

    /// Two growers holding half of the budget each, both growing to the
    /// whole: the younger waits, the oldest takes what the budget lacks
    /// instead of waiting for it (they would wait for each other for
    /// ever), and the younger gets its room once the oldest ends.
    #[tokio::test]
    async fn growers_never_wait_for_each_other() {
        let budget: &'static ByteBudget = Box::leak(Box::new(ByteBudget::new(1 << 20)));
        let mut oldest = budget.grower();
        let mut younger = budget.grower();
        oldest.grow_to(512 << 10, &mut || panic!("there was room"));
        younger.grow_to(512 << 10, &mut || panic!("there was room"));
        let told = budget.waits_begin();
        let younger = tokio::task::spawn_blocking(move || {
            let mut waited = false;
            younger.grow_to(1 << 20, &mut || waited = true);
            (waited, younger.kib())
        });
        tokio::time::timeout(Duration::from_secs(10), told)
            .await
            .expect("the younger waits");
        let oldest = tokio::task::spawn_blocking(move || {
            oldest.grow_to(2 << 20, &mut || panic!("the oldest never waits"));
            oldest
        });
        let mut oldest = tokio::time::timeout(Duration::from_secs(10), oldest)
            .await
            .expect("the oldest did not wait")
            .expect("the oldest");
        assert_eq!(
            (oldest.kib(), oldest.borrowed_kib),
            (1024, 512),
            "cut to the budget"
        );
        oldest.shrink(256 << 10);
        assert_eq!(
            (oldest.kib(), oldest.borrowed_kib),
            (256, 0),
            "what it borrowed goes first"
        );
        assert!(budget.someone_waits());
        drop(oldest);
        let (waited, kib) = tokio::time::timeout(Duration::from_secs(10), younger)
            .await
            .expect("the younger got its room")
            .expect("the younger");
        assert_eq!((waited, kib), (true, 1024));
        assert!(!budget.someone_waits());
        assert_eq!(budget.free_bytes(), 1 << 20, "all let go");
    }

    /// The oldest grower takes what is free of what it lacks, and only the
    /// rest past the budget.
    #[test]
    fn the_oldest_takes_what_is_free_before_it_borrows() {
        let budget = ByteBudget::new(1 << 20);
        let _most = budget.try_take(768 << 10).expect("room");
        let mut oldest = budget.grower();
        oldest.grow_to(512 << 10, &mut || panic!("the oldest never waits"));
        assert_eq!((oldest.kib(), oldest.borrowed_kib), (512, 256));
        assert_eq!(budget.free_bytes(), 0);
        oldest.shrink(0);
        assert_eq!(budget.free_bytes(), 256 << 10);
    }

    /// A grower waiting for room that becomes the oldest stops waiting:
    /// the room it waited for may be held by a parse that waits for it.
    #[tokio::test]
    async fn a_waiting_grower_that_becomes_the_oldest_stops_waiting() {
        let budget: &'static ByteBudget = Box::leak(Box::new(ByteBudget::new(1 << 20)));
        let everything = budget.try_take(1 << 20).expect("the whole budget");
        let oldest = budget.grower();
        let mut younger = budget.grower();
        let told = budget.waits_begin();
        let younger = tokio::task::spawn_blocking(move || {
            younger.grow_to(512 << 10, &mut || {});
            (younger.kib(), younger.borrowed_kib)
        });
        tokio::time::timeout(Duration::from_secs(10), told)
            .await
            .expect("the younger waits");
        drop(oldest);
        let held = tokio::time::timeout(Duration::from_secs(10), younger)
            .await
            .expect("the younger stopped waiting")
            .expect("the younger");
        assert_eq!(held, (512, 512), "taken past the budget");
        assert_eq!(budget.free_bytes(), 0);
        drop(everything);
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
