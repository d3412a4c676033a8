//! Partitioned listing: a recursive listing that splits by common prefix
//! is listed by the fleet in parallel, one partition per job.
//!
//! The run's job discovers the partitions ([`discover`]) on its first
//! attempt and writes them in one transaction under its lease; together
//! they hold every key under the storage's prefix once (each prefix split
//! into its children keeps a flat partition for the keys directly under
//! it). Each partition is listed under its own lease by whichever worker
//! takes it: its pages commit as a sequential run's do, moving the
//! partition's cursor and the run's counters in one transaction, so a
//! killed attempt resumes the partition from its last page. The run's job
//! lists partitions too (all of them, when no other worker is free),
//! fails the run when one is given up on, and once every partition is done
//! reconciles missing objects as a sequential run does: a key is seen by
//! exactly one partition, so that stays exact.
//!
//! Discovery reads the root's level a page at a time: when the first page
//! holds only keys (no sub-prefix) and the level goes on, the run's job
//! commits that page as a sequential run would (moving the run's cursor;
//! in Tasks mode its batches go out) while it reads on. If the rest
//! splits, its partitions start after that page's last key;
//! if not, the sequence goes on from there; and an attempt killed in
//! between resumes from the run's cursor as a sequence.
//!
//! Keys added under a new prefix after discovery are not listed by this
//! run, as keys added behind a sequential listing's cursor are not: the
//! next sync imports them, and nothing unlisted counts as missing unless an
//! earlier run linked it.
use std::sync::Arc;

use super::{ImportJob, Listed, Part};
use crate::{
    Error, Result,
    attempt::{AbortOnDrop, Outcome},
    db::{
        entities::sync_partition,
        partitions as parts,
        runs::{self, Counters, RunStatus},
    },
    storage::{Children, ObjectMeta, Storage},
};

/// Delimiter-listing pages read per prefix while discovering; a level
/// longer than that (a flat layout of many keys) is not split.
const DISCOVERY_PAGES: usize = 3;
/// How deep discovery splits prefixes.
const DISCOVERY_DEPTH: usize = 3;
/// Prefixes discovery lists at once.
const DISCOVERY_CONCURRENCY: usize = 8;
/// The name the run's job records on partitions it lists itself.
const RUN_JOB: &str = "sync-job";

/// How a run lists its storage.
pub(super) enum Listing {
    /// By partitions, with what came of that.
    Partitioned(Outcome),
    /// As one sequence from the run's cursor, starting with a head
    /// discovery already read.
    Sequence(Option<Head>),
}

impl ImportJob<'_> {
    /// Lists the run by partitions when it has them or its listing splits
    /// now; a sequence instead for a retry run, a run resumed from a
    /// sequential cursor, a flat listing, a backend that cannot split, or
    /// no fleet to share with.
    pub(super) async fn try_partitioned(&self, backend: &Arc<dyn Storage>) -> Result<Listing> {
        let mut written = parts::of_run(self.db, &self.run.id).await?;
        if written.is_empty() {
            if !self.may_partition() {
                return Ok(Listing::Sequence(None));
            }
            let (found, after) = match self.discover_partitions(backend).await? {
                None => return Ok(Listing::Partitioned(Outcome::Stopped)),
                Some(Discovery::Split { parts, after }) => (parts, after),
                Some(Discovery::Sequence(head)) => return Ok(Listing::Sequence(head)),
            };
            if !self.write_partitions(&found, after).await? {
                return Ok(Listing::Partitioned(Outcome::Stopped));
            }
            tracing::info!(partitions = found.len(), "listing split by prefix");
            written = parts::of_run(self.db, &self.run.id).await?;
            // Fewer: the database lost the commit that wrote them.
            if written.len() != found.len() {
                let done = written.iter().filter(|p| p.done).count();
                return Err(super::partitions_lost(written.len(), done, found.len()));
            }
        }
        self.run_partitioned(&written)
            .await
            .map(Listing::Partitioned)
    }

    fn may_partition(&self) -> bool {
        self.fanout.is_some()
            && self.settings.list_partitions > 1
            && self.storage.recursive
            && self.run.cursor.is_none()
            && self.retry_of().is_none()
    }

    /// Discovers how the run's prefix splits. The first page of a flat
    /// level longer than a page is committed (its batches handed out)
    /// while the rest of the level is read, so they start a listing
    /// request sooner; `None` when the run stopped meanwhile.
    async fn discover_partitions(&self, backend: &Arc<dyn Storage>) -> Result<Option<Discovery>> {
        let (root, max) = (&self.storage.prefix, self.settings.list_partitions);
        let FlatPage {
            objects,
            after,
            next,
        } = match discover(&**backend, root, max).await? {
            Start::Found(found) => return Ok(Some(found)),
            Start::FlatPage(page) => page,
        };
        // The page is the listing's first keys: listed as a sequence's head
        // that is all there is, each page moving the run's cursor.
        let head = Head::of(objects, true, None);
        let commit = std::pin::pin!(self.list_pages(backend, head));
        let rest = std::pin::pin!(discover_rest(&**backend, root, &next, after, max));
        // A commit that fails or stops ends discovery too (a SIGTERM need
        // not wait for the rest of the level); discovery's own result waits
        // for the commit, whose failure comes first.
        let rest = match futures::future::select(commit, rest).await {
            futures::future::Either::Left((committed, rest)) => {
                if let Listed::Stopped = committed? {
                    return Ok(None);
                }
                rest.await
            }
            futures::future::Either::Right((rest, commit)) => {
                if let Listed::Stopped = commit.await? {
                    return Ok(None);
                }
                rest
            }
        };
        rest.map(Some)
    }

    /// Writes the partitions under the run's lease, each starting after
    /// `after`, the last key the run committed before (only the root's
    /// flat partition can hold keys up to it; the others list all theirs);
    /// false when the attempt lost it (another attempt wrote them, or the
    /// run stopped). The run's cursor must still be `after`: if the
    /// database lost the commit of discovery's first page, partitions
    /// after it would never list that page (the attempt fails instead,
    /// and the next one lists from the cursor the database has, as a
    /// sequence unless that is the listing's start).
    async fn write_partitions(
        &self,
        found: &[(String, bool)],
        after: Option<String>,
    ) -> Result<bool> {
        let rows: Vec<_> = found
            .iter()
            .map(|(prefix, recursive)| (prefix.clone(), *recursive, after.clone()))
            .collect();
        let txn = crate::db::begin_write(self.db).await?;
        parts::create(&txn, &self.run.id, &rows).await?;
        let stays = runs::CursorMove {
            from: after.as_deref(),
            to: None,
        };
        if !self
            .checkpoint(&txn, &Counters::default(), Some(stays))
            .await?
        {
            txn.rollback().await?;
            return Ok(false);
        }
        txn.commit().await?;
        Ok(true)
    }

    /// The run's job: hands the unfinished partitions to the fleet, lists
    /// those no one holds, and once all are done finishes the listing.
    async fn run_partitioned(&self, written: &[sync_partition::Model]) -> Result<Outcome> {
        self.push_partitions(written).await;
        let max = i64::from(self.settings.max_attempts);
        let watch = (self.fanout).map(|f| f.watch(super::ended::Ended::Partition, &self.run.id));
        loop {
            let ended = watch.as_ref().map(super::ended::Watch::next);
            self.check_stopping()?;
            if runs::get(self.db, &self.run.id).await?.status != RunStatus::Running.as_str() {
                return Ok(Outcome::Stopped);
            }
            let stale = self.settings.stale_before();
            if let Some(lost) = parts::lost(self.db, &self.run.id, stale, max).await? {
                return Err(given_up(&lost));
            }
            if parts::pending(self.db, &self.run.id).await? == 0 {
                break;
            }
            if !self.list_a_free_partition(stale, max).await? {
                super::ended::until(ended, self.settings.poll_interval).await;
            }
        }
        self.finish_listing(super::End::Partitions(written.len()))
            .await
    }

    /// Enqueues a job for each unfinished partition (again on a resumed
    /// run: the jobs of the attempt before may be gone with their worker),
    /// once per attempt (its lease names it: an attempt handed back gives
    /// its count back, so the next one has the same count).
    async fn push_partitions(&self, written: &[sync_partition::Model]) {
        let Some(fanout) = self.fanout else {
            return;
        };
        for part in written {
            if part.done {
                continue;
            }
            match fanout
                .push_partition(&self.run.id, part.id, self.lease.unwrap_or_default())
                .await
            {
                Ok(true) => {}
                Ok(false) => break, // backlog full: this job lists the rest
                Err(err) => {
                    tracing::warn!(partition_id = part.id, error = %err, "partition not enqueued; the sync job will list it");
                }
            }
        }
    }

    /// Takes a partition no live attempt holds and lists it here; false
    /// when there was none. A failed attempt is only logged: the partition
    /// is free again (or given up on, which the caller sees next).
    async fn list_a_free_partition(
        &self,
        stale: chrono::DateTime<chrono::Utc>,
        max: i64,
    ) -> Result<bool> {
        let lease = ulid::Ulid::new().to_string();
        for id in parts::claimable(self.db, &self.run.id, stale, max).await? {
            let Some(part) = parts::claim(self.db, id, &lease, stale, max).await? else {
                continue;
            };
            match self.list_partition(&part, &lease, RUN_JOB).await {
                Ok(_) => {}
                Err(err) if err.is_transient() && self.check_stopping().is_ok() => {
                    tracing::warn!(partition_id = id, error = %err, "partition attempt failed; it will be listed again");
                }
                Err(err) if err.is_transient() => return Err(err),
                Err(err) => tracing::warn!(partition_id = id, error = %err, "partition given up"),
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// Lists partition `part`, claimed with `lease`, renewing the lease
    /// while it works; a failed attempt lets the partition go, and gives it
    /// up when the error is permanent (the run's job then fails the run).
    pub async fn list_partition(
        &self,
        part: &sync_partition::Model,
        lease: &str,
        worker: &str,
    ) -> Result<Outcome> {
        let _heartbeat = AbortOnDrop(tokio::spawn(renew(
            self.db.clone(),
            part.id,
            lease.to_owned(),
            self.settings.heartbeat,
        )));
        let job = ImportJob {
            part: Some(Part { row: part, lease }),
            lease: None,
            ..*self
        };
        let result = job.list_part(part.id, lease, worker).await;
        if let Err(err) = &result {
            let message = err.to_string();
            // Given back only after moving the partition on (see
            // `jobs::moved_on`).
            let handed_back = self.check_stopping().is_err()
                && parts::cursor_of(self.db, part.id, lease)
                    .await
                    .is_ok_and(|now| now.is_some_and(|cursor| cursor != part.cursor));
            let failed = !err.is_transient();
            parts::release(self.db, part.id, lease, &message, failed, handed_back).await?;
        }
        result
    }

    /// Lists this attempt's partition, then marks it done where its last
    /// page left its cursor (a commit the database lost fails the attempt,
    /// [`ImportJob::check_cursor`]).
    async fn list_part(&self, id: i64, lease: &str, worker: &str) -> Result<Outcome> {
        let backend = crate::storage::open_shared(self.storage, self.env).await?;
        let Listed::To { at, .. } = self.list_pages(&backend, None).await? else {
            return Ok(Outcome::Stopped);
        };
        if parts::finish(self.db, id, lease, worker, at.as_deref()).await? {
            return Ok(Outcome::Finished);
        }
        let stays = runs::CursorMove {
            from: at.as_deref(),
            to: None,
        };
        self.check_cursor(self.db, stays).await?;
        Ok(Outcome::Stopped)
    }
}

/// The run's error when partition `part` was given up on.
fn given_up(part: &sync_partition::Model) -> Error {
    let what = if part.recursive {
        format!("the keys under '{}'", part.prefix)
    } else {
        format!("the keys directly under '{}'", part.prefix)
    };
    let why = part
        .error
        .as_deref()
        .unwrap_or("its workers died or were killed");
    Error::Internal(format!(
        "listing {what} failed after {} attempts: {why}",
        part.attempts
    ))
}

/// Renews a partition's lease while its attempt works (a page may take
/// long: a big Tasks-mode object, a wait for batches).
async fn renew(
    db: sea_orm::DatabaseConnection,
    id: i64,
    lease: String,
    every: std::time::Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(err) = parts::checkpoint(&db, id, &lease, None).await {
            tracing::debug!(error = %err, "partition heartbeat failed");
        }
    }
}

/// What discovery found under a storage's prefix.
pub(super) enum Discovery {
    /// At least two partitions that hold every key once, `(prefix,
    /// recursive)` each, but those up to `after`, which the run committed
    /// already: they list only the keys after it.
    Split {
        parts: Vec<(String, bool)>,
        after: Option<String>,
    },
    /// The listing does not split: it is listed as one sequence, which
    /// starts with `Head` when the prefix is flat (no sub-prefix among the
    /// pages discovery read), or when the run committed its first keys.
    Sequence(Option<Head>),
}

/// How discovery starts: with the first page of a long flat level, which
/// the run commits while [`discover_rest`] reads on, or with its finding.
pub(super) enum Start {
    FlatPage(FlatPage),
    Found(Discovery),
}

/// The first page of a flat level longer than a page.
pub(super) struct FlatPage {
    /// Never empty.
    objects: Vec<ObjectMeta>,
    /// The last of `objects`' keys.
    after: String,
    /// Where the level goes on ([`Children::next`]).
    next: String,
}

/// The first keys of a flat listing, which discovery read: the run lists
/// them from here instead of asking the storage for them again.
#[derive(Debug)]
pub(super) struct Head {
    objects: Vec<ObjectMeta>,
    /// The key the listing goes on after; `None`: `objects` are all of it.
    after: Option<String>,
    /// The run's cursor as this attempt committed it before `objects`
    /// (`None`: none committed).
    committed: Option<String>,
}

impl Head {
    /// Its objects, and the key the listing goes on after (`None`: they
    /// are all of it).
    pub(super) fn into_parts(self) -> (Vec<ObjectMeta>, Option<String>) {
        (self.objects, self.after)
    }

    /// The run's cursor as this attempt committed it before the head.
    pub(super) fn committed(&self) -> Option<String> {
        self.committed.clone()
    }

    /// A listing's `objects` read so far, all of it when `complete`, that
    /// started after `after` (keys the run committed; `None`: from the
    /// beginning). `None` when nothing says where it goes on, so never
    /// when `after` is set: a listing after committed keys never starts
    /// again from the beginning.
    fn of(objects: Vec<ObjectMeta>, complete: bool, after: Option<String>) -> Option<Head> {
        let committed = after.clone();
        if complete {
            return Some(Head {
                objects,
                after: None,
                committed,
            });
        }
        let after = objects.last().map(|o| o.key.clone()).or(after);
        after.map(|after| Head {
            objects,
            after: Some(after),
            committed,
        })
    }
}

/// Starts splitting the key tree under `root`: reads its first page, and
/// when that is flat and the level goes on, hands it back to be committed
/// while [`discover_rest`] reads on; otherwise reads the rest of the level
/// discovery looks at (at most [`DISCOVERY_PAGES`] in all) and decides as
/// [`split`] does.
pub(super) async fn discover(backend: &dyn Storage, root: &str, max: usize) -> Result<Start> {
    let Some(first) = backend.list_children(root, None, 1).await? else {
        return Ok(Start::Found(Discovery::Sequence(None)));
    };
    // (A last key that cannot be stored cannot be where the run resumes.)
    let last = first.objects.last().filter(|o| super::storable(&o.key));
    if let (true, Some(last), Some(next)) = (first.prefixes.is_empty(), last, &first.next) {
        let (after, next) = (last.key.clone(), next.clone());
        return Ok(Start::FlatPage(FlatPage {
            objects: first.objects,
            after,
            next,
        }));
    }
    let top = read_more(backend, root, first, DISCOVERY_PAGES - 1).await?;
    split(backend, root, top, max, None).await.map(Start::Found)
}

/// Goes on with a level whose first page was flat, from `next`, the keys
/// up to `after` committed by the run: as [`discover`] would have with
/// the whole level, but a sequence goes on after `after`, and the
/// partitions start there.
pub(super) async fn discover_rest(
    backend: &dyn Storage,
    root: &str,
    next: &str,
    after: String,
    max: usize,
) -> Result<Discovery> {
    match backend
        .list_children(root, Some(next), DISCOVERY_PAGES - 1)
        .await?
    {
        Some(rest) => split(backend, root, rest, max, Some(after)).await,
        None => Ok(Discovery::Sequence(Head::of(
            Vec::new(),
            false,
            Some(after),
        ))),
    }
}

/// `level` with up to `pages` more of its pages read.
async fn read_more(
    backend: &dyn Storage,
    root: &str,
    mut level: Children,
    pages: usize,
) -> Result<Children> {
    let Some(next) = level.next.clone().filter(|_| pages > 0) else {
        return Ok(level);
    };
    let Some(more) = backend.list_children(root, Some(&next), pages).await? else {
        return Ok(level);
    };
    level.objects.extend(more.objects);
    level.push_prefixes(root, more.prefixes.iter().map(String::as_str));
    level.next = more.next;
    Ok(level)
}

/// Splits the key tree under `root`, whose level `top` discovery read
/// (after `after`, the keys the run committed, when set), into at most
/// `max` partitions that hold every key once, splitting level by level (at
/// most [`DISCOVERY_DEPTH`]) while there are fewer than `max / 4`
/// recursive ones.
async fn split(
    backend: &dyn Storage,
    root: &str,
    top: Children,
    max: usize,
    after: Option<String>,
) -> Result<Discovery> {
    if top.prefixes.is_empty() {
        let complete = top.complete();
        return Ok(Discovery::Sequence(Head::of(top.objects, complete, after)));
    }
    // Not split: listed as one sequence, from the keys not committed.
    let sequence = |after: Option<String>| Discovery::Sequence(Head::of(Vec::new(), false, after));
    if !top.complete() {
        return Ok(sequence(after)); // too long a level to split
    }
    let mut found = children_of((root.to_owned(), true), top);
    if found.len() > max {
        return Ok(sequence(after));
    }
    for _ in 1..DISCOVERY_DEPTH {
        let recursive = found.iter().filter(|(_, recursive)| *recursive).count();
        if recursive >= (max / 4).max(2) {
            break;
        }
        let next = split_level(backend, &found).await?;
        if next.len() > max || next == found {
            break;
        }
        found = next;
    }
    Ok(if found.len() >= 2 {
        Discovery::Split {
            parts: found,
            after,
        }
    } else {
        sequence(after)
    })
}

/// What partition `part` becomes given its `level`: its children (and a
/// flat partition for the keys directly under it, when it has any), or
/// itself when the level is incomplete, has no sub-prefix, or has one that
/// cannot be stored (its keys are then listed with the part's, each an
/// object error).
fn children_of(part: (String, bool), level: Children) -> Vec<(String, bool)> {
    let storable = level.prefixes.iter().all(|p| super::storable(p));
    if !level.complete() || level.prefixes.is_empty() || !storable {
        return vec![part];
    }
    let mut next = Vec::with_capacity(level.prefixes.len() + 1);
    if !level.objects.is_empty() {
        next.push((part.0, false));
    }
    next.extend(level.prefixes.into_iter().map(|p| (p, true)));
    next
}

/// Each recursive partition replaced by its children where it has any.
async fn split_level(
    backend: &dyn Storage,
    found: &[(String, bool)],
) -> Result<Vec<(String, bool)>> {
    // Boxed futures joined a chunk at a time: the job's future must be
    // `Send` for any lifetime, which a stream of borrowing closures is not.
    let mut levels = Vec::with_capacity(found.len());
    for chunk in found.chunks(DISCOVERY_CONCURRENCY) {
        let listings = chunk.iter().map(|(prefix, recursive)| {
            let listing: futures::future::BoxFuture<'_, Result<Option<Children>>> = if *recursive {
                backend.list_children(prefix, None, DISCOVERY_PAGES)
            } else {
                Box::pin(async { Ok(None) })
            };
            listing
        });
        levels.extend(futures::future::join_all(listings).await);
    }
    let mut next = Vec::new();
    for (part, level) in found.iter().zip(levels) {
        match level? {
            Some(level) => next.extend(children_of(part.clone(), level)),
            None => next.push(part.clone()),
        }
    }
    Ok(next)
}
