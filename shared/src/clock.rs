//! The fleet's clock: the database's. Leases, heartbeats, claims and
//! periods are times one process writes and another compares with its own
//! "now"; on machines whose clocks disagree (a node whose time service
//! broke, a virtual machine resumed from a pause) a clock a minute fast
//! took live attempts' leases, and a slow one had its own taken. Every
//! such time is [`now`]: this process's clock corrected by its offset from
//! the database's, measured when it connects and at every heartbeat
//! (`db::sync_clock`). Times shown to the outside world (signatures,
//! presigned URLs, webhook timestamps) stay on the machine's clock.
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Duration, Utc};

/// The database's clock minus this machine's, in microseconds.
static OFFSET_MICROS: AtomicI64 = AtomicI64::new(0);

/// The time on the database's clock, as near as this process knows it.
pub fn now() -> DateTime<Utc> {
    Utc::now() + offset()
}

/// How far the database's clock is ahead of this machine's.
pub fn offset() -> Duration {
    Duration::microseconds(OFFSET_MICROS.load(Ordering::Relaxed))
}

/// Records a new measure of [`offset`].
pub fn set_offset(offset: Duration) {
    let micros = offset.num_microseconds().unwrap_or(0);
    OFFSET_MICROS.store(micros, Ordering::Relaxed);
}
