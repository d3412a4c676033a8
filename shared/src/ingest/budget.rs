//! The parse memory budget of a worker process. Parsing one row costs far
//! more memory than its text while it is parsed (a JSONL line of `[],[],...`
//! becomes about 11 times its size as a `serde_json::Value` before the row
//! check can refuse it, and one of `0,0,...` up to 32 times: a `Value` is 32
//! bytes for two of text, and a vector may hold twice its length), and a
//! worker parses up to
//! `LABELSYNC_WORKER_CONCURRENCY` x `LABELSYNC_FETCH_CONCURRENCY` objects at
//! once (`super::reads`). Every parse of a
//! large row or file reserves what it may cost from one budget per process
//! (`LABELSYNC_PARSE_BUDGET_BYTES`) and waits while the budget is spent, so
//! the sum of these spikes is bounded by the setting, not by the input.
//!
//! A reservation is held only while one row (JSONL) or one file (JSON) is
//! parsed, and the holder never waits for another reservation, so waiting
//! cannot deadlock. A reservation larger than the whole budget is cut to it:
//! that parse runs alone (a row, whose size `LABELSYNC_MAX_TASK_BYTES`
//! bounds; a Parquet row group that needs more than the budget is refused
//! before it is read, see `parse::parse_parquet`).
use std::sync::OnceLock;

use tokio::sync::{Semaphore, SemaphorePermit};

/// Text smaller than this is parsed without a reservation (nearly every
/// row): the budget is for the few rows that could hurt.
pub const SMALL: usize = 64 << 10;
/// How many times its text a row may take in memory while it is parsed
/// (12 counted `[],[]` but not an array of short numbers).
pub const EXPANSION: usize = 32;

/// The memory that large parses of one process may take at once. A
/// reservation waits while the budget is spent; one larger than the whole
/// budget is cut to it and runs alone.
#[derive(Debug)]
pub struct ParseBudget {
    kib: Semaphore,
    total_kib: u32,
}

impl ParseBudget {
    pub fn new(bytes: usize) -> Self {
        let total_kib = u32::try_from(bytes >> 10).unwrap_or(u32::MAX).max(1);
        ParseBudget {
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
        let kib = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .min(self.total_kib);
        futures::executor::block_on(self.kib.acquire_many(kib)).ok()
    }
}

/// The process's budget, sized by the first caller's setting (every run of
/// a process has the same settings).
pub fn process_budget(bytes: usize) -> &'static ParseBudget {
    static BUDGET: OnceLock<ParseBudget> = OnceLock::new();
    BUDGET.get_or_init(|| ParseBudget::new(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_wait_for_the_budget_and_big_ones_are_cut_to_it() {
        let budget = ParseBudget::new(10 << 20);
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
