//! The memory budgets of a worker process: one for parsing large rows and
//! files, one for rows parsed and not committed yet.
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
//! one row (JSONL) or one file (JSON) is parsed, or while a Parquet child
//! reads one row group. A reservation larger than the whole budget is cut
//! to it: that parse runs alone (a row, whose size
//! `LABELSYNC_MAX_TASK_BYTES` bounds; a Parquet row group that needs more
//! than the budget is refused before it is read, see `parse::parse_parquet`).
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
//! **Why waiting cannot deadlock.** Every wait is for memory that is freed
//! without anyone waiting on a budget in turn:
//! - rows in flight are waited for only by a parse that holds none of them
//!   but chunks it has handed on, which their transactions let go (it may
//!   hold a parse reservation: a JSON file's, a Parquet row group's);
//! - the parse budget is waited for only by a parse that holds none of it
//!   (a Parquet parent lets its row group's go while it waits for a long
//!   line's), and that has handed its chunk on first
//!   (`parse::RowEvent::WillWait`): a chunk held while its parse waited
//!   for the parse budget could keep a Parquet parent, which waits for
//!   rows in flight while holding a row group's reservation, waiting for
//!   ever.
use std::sync::OnceLock;

use tokio::sync::{Semaphore, SemaphorePermit};

/// Text smaller than this is parsed without a reservation (nearly every
/// row): the budget is for the few rows that could hurt.
pub const SMALL: usize = 64 << 10;
/// How many times its text a row may take in memory while it is parsed
/// (12 counted `[],[]` but not an array of short numbers).
pub const EXPANSION: usize = 32;

/// Memory that one process's parses, or its rows in flight, may take at
/// once. A reservation waits while the budget is spent; one larger than
/// the whole budget is cut to it and runs alone.
#[derive(Debug)]
pub struct MemoryBudget {
    kib: Semaphore,
    total_kib: u32,
}

impl MemoryBudget {
    pub fn new(bytes: usize) -> Self {
        let total_kib = u32::try_from(bytes >> 10).unwrap_or(u32::MAX).max(1);
        MemoryBudget {
            kib: Semaphore::new(total_kib as usize),
            total_kib,
        }
    }

    /// The whole budget, in bytes.
    pub fn bytes(&self) -> u64 {
        u64::from(self.total_kib) << 10
    }

    /// Waits (blocking the calling thread: parsers run on blocking threads)
    /// until `bytes` of the budget are free and holds them until the permit
    /// drops. `None` for small amounts, which are not counted.
    pub fn reserve(&self, bytes: usize) -> Option<SemaphorePermit<'_>> {
        if bytes < SMALL * EXPANSION {
            return None;
        }
        self.take(bytes)
    }

    /// `bytes` of the budget, waiting for them as `reserve` does, however
    /// few they are.
    pub fn take(&self, bytes: usize) -> Option<SemaphorePermit<'_>> {
        futures::executor::block_on(self.kib.acquire_many(self.kib_of(bytes))).ok()
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

/// The process's parse budget, sized by the first caller's setting (every
/// run of a process has the same settings).
pub fn process_budget(bytes: usize) -> &'static MemoryBudget {
    static BUDGET: OnceLock<MemoryBudget> = OnceLock::new();
    BUDGET.get_or_init(|| MemoryBudget::new(bytes))
}

/// The process's budget of rows in flight, sized as `process_budget` is.
pub fn rows_in_flight(bytes: usize) -> &'static MemoryBudget {
    static BUDGET: OnceLock<MemoryBudget> = OnceLock::new();
    BUDGET.get_or_init(|| MemoryBudget::new(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_wait_for_the_budget_and_big_ones_are_cut_to_it() {
        let budget = MemoryBudget::new(10 << 20);
        assert!(budget.reserve(1000).is_none());
        let big = budget.reserve(100 << 20).expect("a reservation");
        assert_eq!(budget.kib.available_permits(), 0);
        drop(big);
        let a = budget.reserve(6 << 20).expect("a reservation");
        assert_eq!(budget.kib.available_permits(), 4 << 10);
        assert!(budget.kib.try_acquire_many(5 << 10).is_err());
        drop(a);
        assert_eq!(budget.kib.available_permits(), 10 << 10);
    }
}
