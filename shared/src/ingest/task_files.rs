//! Tasks mode: one object -> its rows, streamed. The parser runs on a blocking
//! thread and hands rows over a small bounded channel, so a 1 GB file is never
//! in memory (a body that ends within [`INLINE_BYTES`] is parsed where it was
//! read instead); rows are committed in chunks (one transaction each, with the
//! run's `created` counter), deduplicated per row through the link key. An
//! object whose rows all came in one chunk (fewer than one chunk holds, and
//! not cut short by the rows-in-flight budget) hands its rows back instead,
//! and the caller commits several such objects at once.
//!
//! Rows committed before a bad row or a broken file are kept; the error is
//! recorded with the row where it happened. An object committed chunk by
//! chunk is marked partial (`partial_objects`) until its last row is in:
//! a run cancelled, failed or killed half-way through it leaves the mark, and
//! the next run reads the object again and adds the rows that are missing (so
//! does the next sync of a file that broke half-way, big or small, reporting
//! it again; a small one's mark is written with its rows).
//! Otherwise a later sync does not re-read an object that has tasks unless
//! its etag changed and the storage has `reimport_changed` (then its rows
//! update their tasks in place, and new rows are added); one that produced
//! none is read, and fails, again. (Keeping rows is what makes a 1 GB file
//! importable in bounded memory and lets a retry continue a file.)
use std::{
    io::{self, Read},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::{
    sync::{SemaphorePermit, mpsc},
    task::JoinHandle,
};

use super::{
    ImportJob, ObjectError, ToRead,
    budget::ByteBudget,
    parse::{self, Format, RowEvent, TaskInput},
};
use crate::{
    Error, Result,
    db::{links, tasks::NewTask},
    storage::{ObjectMeta, Storage, retry},
};

/// Rows per transaction and per channel message (and the most rows of small
/// objects committed together). Why 4,000: see docs/DECISIONS.md (Chunks of
/// 4,000 rows or 8 MiB).
pub(super) const CHUNK_ROWS: usize = 4000;
/// The most memory (as the row check and [`ROW_BYTES`] count it) one
/// chunk's rows take: a chunk of big rows closes before [`CHUNK_ROWS`].
/// What one object has in flight (the chunk
/// being filled, two in the channel, two being committed) stays near
/// 5 x 8 MiB whatever its rows are like, and what the chunks of all
/// objects of a process hold within `LABELSYNC_ROWS_IN_FLIGHT_BYTES`
/// ([`Chunker`], and small objects' rows handed back to be committed
/// together: [`keep_small`]; small bodies parsed where they were read are
/// outside it).
pub(super) const CHUNK_BYTES: usize = 8 << 20;
/// Chunks of one object committed concurrently.
const PARALLEL_CHUNKS: usize = 2;
/// Row errors kept per object; more are counted but not stored.
const MAX_ERRORS_PER_OBJECT: usize = 100;

pub(super) struct Importer<'a, 'j> {
    pub job: &'a ImportJob<'j>,
    pub backend: Arc<dyn Storage>,
    /// False when no object of this page had links before: the per-chunk
    /// "which rows exist" query is skipped.
    pub may_exist: bool,
    /// Re-reading changed objects (`reimport_changed`): rows that have a
    /// task update it instead of being skipped.
    pub overwrite: bool,
}

#[derive(Debug, Default)]
pub(super) struct ObjectResult {
    pub failed: i64,
    pub errors: Vec<ObjectError>,
    /// The rows of an object that came in one chunk, not committed yet: the
    /// caller commits them together with other small objects' rows
    /// ([`ImportJob::commit_rows`], or with a batch's end), since a
    /// transaction per tiny file made 2,000 one-task files wait on 2,000
    /// commits. With them, their size, their share of the process's
    /// rows in flight, held until they are committed (none for a body
    /// parsed where it was read), and the object's partial mark to set or
    /// clear with them.
    pub deferred: super::SmallChunk,
}

impl ObjectResult {
    /// An object that could not be imported, and why.
    fn failed(key: &str, message: String) -> Self {
        let mut result = Self::default();
        result.error(key, None, message);
        result
    }

    fn error(&mut self, key: &str, row: Option<i64>, message: String) {
        self.failed += 1;
        if self.errors.len() < MAX_ERRORS_PER_OBJECT {
            self.errors.push((key.to_owned(), row, message));
        }
    }
}

impl Importer<'_, '_> {
    /// Imports one object, reading it again (with backoff) when a transient
    /// failure (a download cut off or timed out, a lost connection) stopped
    /// it: one bad request must not fail the other objects of the page or
    /// batch. Rows an earlier try committed are found by their links.
    /// `Ok(None)`: the run stopped (cancelled). Object problems are in the
    /// result; `Err` fails the attempt. `turn`: the object's place in the
    /// process's read pool, reserved with its job's other objects (see
    /// `reads::Reads::turns`).
    pub async fn import(&self, read: ToRead, turn: Option<u64>) -> Result<Option<ObjectResult>> {
        let ToRead { object, marked } = read;
        let format = match self.readable_format(&object) {
            Ok(format) => format,
            Err(message) => return Ok(Some(ObjectResult::failed(&object.key, message))),
        };
        // A local storage's file is opened where it is, found again at each
        // try (a path resolved long before, a read's wait earlier, could
        // have been swapped for a link out of the storage's root).
        let local = crate::storage::BackendKind::parse(&self.job.storage.backend)
            .is_ok_and(|kind| kind == crate::storage::BackendKind::Local);
        let (mut turn, mut attempt, mut copy) = (turn, 1, CopySize::Listed);
        loop {
            let may_exist = self.may_exist || attempt > 1;
            // Disk for a copy first, then one of the process's reads, each
            // held for one try: a copy that waited for disk holding a read
            // kept it from every other object for as long as the copies
            // before it took. The first read in the object's turn, later
            // ones as the newest waiter; none during a pause.
            let opening = match self.opening(&object, format, local, copy).await {
                Ok(opening) => opening,
                Err(message) => return Ok(Some(ObjectResult::failed(&object.key, message))),
            };
            let read = self
                .job
                .reads
                .take_in_turn(self.job.storage.id, turn.take())
                .await;
            let tried = self
                .import_once(&object, format, may_exist, marked, opening)
                .await;
            drop(read);
            match tried {
                Ok(Tried::Read(result)) => return Ok(result),
                Ok(Tried::Outgrew { copied }) => copy = copy.after(copied),
                Err(err) if err.is_transient() && attempt < retry::MAX_ATTEMPTS => {
                    let pause = retry::backoff(attempt);
                    tracing::debug!(key = %object.key, attempt, ?pause, error = %err, "object import failed; reading it again");
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// How the next try opens the object: as a file of a local storage
    /// (`local`), as a copy on the worker's disk within its room (a
    /// Parquet object elsewhere, which is read with random access: the
    /// room is waited for here), or as a stream. `Err`: the object's error.
    async fn opening(
        &self,
        object: &ObjectMeta,
        format: Format,
        local: bool,
        copy: CopySize,
    ) -> std::result::Result<Opening, String> {
        Ok(match (local, format) {
            (true, _) => Opening::Local,
            (false, Format::Parquet) => match self.spool_room(object, copy).await {
                Ok(room) => Opening::Copy(room),
                Err(err) => return Err(unreadable(&err)),
            },
            (false, _) => Opening::Stream,
        })
    }

    /// One read of an object: open it as `opening` says, stream its rows
    /// from a parser (see [`Self::start_parser`]), keep them (a small
    /// object) or commit them chunk by chunk (a big one), then settle what
    /// the parser said. `may_exist`: some of its rows may have tasks;
    /// `marked`: it may have a partial mark ([`ToRead`]).
    async fn import_once(
        &self,
        object: &ObjectMeta,
        format: Format,
        may_exist: bool,
        marked: bool,
        opening: Opening,
    ) -> Result<Tried> {
        let mut result = ObjectResult::default();
        // Set when the download itself breaks (a reset, a timeout): the parser
        // then sees a read error, which is the network's fault, not the file's.
        let interrupted = Arc::new(AtomicBool::new(false));
        let source = match self
            .open(object, format, opening, interrupted.clone())
            .await
        {
            Ok(Opened::Source(source)) => source,
            Ok(Opened::Outgrew { copied }) => return Ok(Tried::Outgrew { copied }),
            Err(err) if err.is_transient() => return Err(err),
            Err(err) => {
                result.error(&object.key, None, unreadable(&err));
                return Ok(Tried::Read(Some(result)));
            }
        };
        let mut parsing = self.start_parser(object, format, source);
        // A first chunk that is the parser's last is the whole object:
        // unless its rows may update tasks (`overwrite`), they go back to
        // the caller to be committed with other small objects' rows.
        let first = parsing.recv().await;
        let rows = if !self.overwrite && first.as_ref().is_none_or(|c| c.last) {
            keep_small(&mut result, object, first.unwrap_or_default());
            Rows::Deferred { marked }
        } else if self
            .commit_chunks(object, may_exist, first, &mut parsing, &mut result)
            .await?
        {
            Rows::Committed
        } else {
            Rows::Stopped
        };
        let parsed = parsing.outcome().await;
        self.settle(&object.key, parsed, rows, &interrupted, &mut result)
            .await?;
        Ok(Tried::Read((rows != Rows::Stopped).then_some(result)))
    }

    /// The object's format, or why it cannot be imported (a per-object error).
    fn readable_format(&self, object: &ObjectMeta) -> std::result::Result<Format, String> {
        let json_values = crate::storage::BackendKind::parse(&self.job.storage.backend)
            .is_ok_and(|kind| crate::storage::backend(kind).values_are_task_json());
        let Some(format) = Format::of_key(&object.key).or(json_values.then_some(Format::Json))
        else {
            return Err("unsupported file type: Tasks mode reads .json, .jsonl, .ndjson, .parquet and names without an extension (JSON)".into());
        };
        let limit = self.job.settings.max_object_bytes;
        match object.size {
            Some(size) if size as u64 > limit => Err(format!(
                "object is {size} bytes, over the {limit}-byte limit (LABELSYNC_MAX_OBJECT_BYTES)"
            )),
            _ => Ok(format),
        }
    }

    /// Starts the parser of `source`: where it was read when it is a whole
    /// small body (then it is done at once), else on a blocking thread.
    fn start_parser(&self, object: &ObjectMeta, format: Format, source: Source) -> Parsing {
        let settings = self.job.settings;
        let mut reading = Reading {
            limits: parse::Limits {
                max_task_bytes: settings.max_task_bytes,
                budget: Some(super::budget::process_budget(settings.parse_budget_bytes)),
                object_size: object.size.and_then(|s| u64::try_from(s).ok()),
            },
            max_object_bytes: settings.max_object_bytes,
            parquet_parser: settings.parquet_parser.clone(),
            in_flight: Some(super::budget::rows_in_flight(settings.rows_in_flight_bytes)),
            max_rows: settings.max_rows_per_object,
        };
        if let Source::Whole(body) = &source {
            // Not counted in the parse budget, whose reservations block
            // their thread: this one is async, and the body is small.
            reading.limits.object_size = Some(body.len() as u64);
            reading.limits.budget = None;
            reading.in_flight = None;
            let mut chunks = Vec::new();
            let parsed = parse_source(format, source, &reading, &mut |chunk| {
                chunks.push(chunk);
                true
            });
            return Parsing::Done(chunks.into_iter(), parsed);
        }
        let (tx, rx) = mpsc::channel::<Chunk>(2);
        let parser = tokio::task::spawn_blocking(move || {
            parse_source(format, source, &reading, &mut |chunk| {
                tx.blocking_send(chunk).is_ok()
            })
        });
        Parsing::Running(rx, parser)
    }

    /// Commits a big object's chunks as they come, two at a time (one
    /// Postgres backend per chunk keeps both cores busy while the parser
    /// fills the next one). The object is marked partial first, so a run
    /// stopped half-way leaves the mark and the next run reads it again.
    /// False when the run stopped.
    async fn commit_chunks(
        &self,
        object: &ObjectMeta,
        may_exist: bool,
        first: Option<Chunk>,
        rest: &mut Parsing,
        result: &mut ObjectResult,
    ) -> Result<bool> {
        links::mark_partial(self.job.db, self.job.storage.id, &object.key).await?;
        let chunks =
            futures::stream::iter(first).chain(futures::stream::poll_fn(|cx| rest.poll_recv(cx)));
        let mut inserts = chunks
            .map(|chunk| {
                let Chunk { rows, held, .. } = chunk;
                let insert = self.insert(object, split(result, &object.key, rows), may_exist);
                // The rows' share of the rows in flight is let go once
                // their transaction has ended.
                async move {
                    let kept_going = insert.await;
                    drop(held);
                    kept_going
                }
            })
            .buffer_unordered(PARALLEL_CHUNKS);
        while let Some(kept_going) = inserts.try_next().await? {
            if !kept_going {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// What the parser's end means. An object read to its end is imported
    /// (its partial mark goes: now for a big one, with its rows for a small
    /// one that may have been marked); one that broke half-way after some
    /// rows keeps a mark (a small one gets it with its rows), so the next
    /// sync reads it again (adding nothing twice) and reports the error
    /// again, and adds its missing rows once it is fixed. A broken download
    /// is the network's fault: the rows before it are committed, and the
    /// retry adds only those after. One stopped at the row limit is its
    /// error once, and imported like one read to its end: reading it again
    /// would give no more (a retry of the run reads it again, after the
    /// limit is raised).
    async fn settle(
        &self,
        key: &str,
        parsed: std::result::Result<ParseOutcome, tokio::task::JoinError>,
        rows: Rows,
        interrupted: &AtomicBool,
        result: &mut ObjectResult,
    ) -> Result<()> {
        let parsed = parsed.map(|outcome| {
            outcome.map(|end| {
                if let ParseEnd::Capped(row, message) = end {
                    result.error(key, Some(row), message);
                }
            })
        });
        match (parsed, rows) {
            (Ok(Ok(())), Rows::Committed) => {
                links::clear_partial(self.job.db, self.job.storage.id, key).await
            }
            (Ok(Ok(())), Rows::Deferred { marked: true }) => {
                let clear = links::PartialMark::Clear(key.to_owned());
                result.deferred.marks.push(clear);
                Ok(())
            }
            (Ok(Ok(())), _) => Ok(()),
            (Ok(Err(message)), _) if interrupted.load(Ordering::SeqCst) => Err(Error::Transient(
                format!("{key}: download interrupted: {message}"),
            )),
            (Ok(Err(message)), rows) => {
                if matches!(rows, Rows::Deferred { .. }) && !result.deferred.rows.is_empty() {
                    let set = links::PartialMark::Set(key.to_owned());
                    result.deferred.marks.push(set);
                }
                result.error(key, None, message);
                Ok(())
            }
            (Err(join), _) => Err(Error::Internal(format!("parser of {key} failed: {join}"))),
        }
    }

    /// Opens an object for its parser, as `opening` says. A copy's room
    /// was reserved before the object was asked for, so that no response
    /// waits on the budget.
    async fn open(
        &self,
        object: &ObjectMeta,
        format: Format,
        opening: Opening,
        interrupted: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Opened> {
        let key = &object.key;
        match opening {
            Opening::Local => {
                let file = self.backend.local_file(key).unwrap_or_else(|| {
                    Err(Error::NotFound(format!(
                        "{key}: not found under the storage's path"
                    )))
                })?;
                return Ok(Opened::Source(if format == Format::Parquet {
                    Source::File(file, None)
                } else {
                    Source::Reader(Box::new(file))
                }));
            }
            Opening::Copy(room) => {
                let body = self.backend.get(key, None).await?.body;
                let reader = tokio_util::io::StreamReader::new(watched(body, interrupted));
                return spool(key, reader, room).await;
            }
            Opening::Stream => {}
        }
        let mut body = self.backend.get(key, None).await?.body;
        let head = match read_head(&mut body).await {
            Ok(Head::Whole(body)) => return Ok(Opened::Source(Source::Whole(body))),
            Ok(Head::Part(head)) => head,
            Err(e) => {
                return Err(Error::Transient(format!(
                    "{key}: download interrupted: {e}"
                )));
            }
        };
        let body = futures::stream::iter(head.into_iter().map(Ok))
            .chain(body)
            .boxed();
        let reader = tokio_util::io::StreamReader::new(watched(body, interrupted));
        Ok(Opened::Source(Source::Reader(Box::new(
            tokio_util::io::SyncIoBridge::new(reader),
        ))))
    }

    /// Reserves the disk a copy of a Parquet object takes from the
    /// process's spool budget (`LABELSYNC_SPOOL_BYTES`), waiting while it
    /// is spent: as much as `copy` says (its listed size, to start with),
    /// or the object size limit when the listing gave none (cut to the
    /// budget). An object listed larger than the whole budget is refused:
    /// it could never be copied.
    async fn spool_room(&self, object: &ObjectMeta, copy: CopySize) -> Result<SpoolRoom> {
        let settings = self.job.settings;
        let budget = super::budget::spool(settings.spool_bytes);
        let size = match copy {
            CopySize::Listed => object.size.and_then(|s| u64::try_from(s).ok()),
            CopySize::Twice(copied) => Some(copied.saturating_mul(2).min(budget.bytes())),
            CopySize::Limit => None,
        };
        if let Some(size) = size
            && size > budget.bytes()
        {
            return Err(Error::invalid(
                "spool_too_small",
                None,
                format!(
                    "the object is {size} bytes, and a Parquet file is read from a copy on the \
                     worker's disk, of which LABELSYNC_SPOOL_BYTES allows {} bytes",
                    budget.bytes()
                ),
            ));
        }
        let (limit, limited_by) = match settings.max_object_bytes <= budget.bytes() {
            true => (settings.max_object_bytes, "LABELSYNC_MAX_OBJECT_BYTES"),
            false => (budget.bytes(), "LABELSYNC_SPOOL_BYTES"),
        };
        let bytes = size.unwrap_or(limit).min(limit);
        let held = budget
            .acquire(usize::try_from(bytes).unwrap_or(usize::MAX))
            .await;
        Ok(SpoolRoom {
            budget,
            held,
            bytes,
            limit,
            limited_by,
        })
    }

    /// Commits one chunk of an object's rows; false when the run stopped.
    async fn insert(
        &self,
        object: &ObjectMeta,
        rows: Vec<(i64, TaskInput)>,
        may_exist: bool,
    ) -> Result<bool> {
        let (Some(lo), Some(hi)) = (rows.first().map(|r| r.0), rows.last().map(|r| r.0)) else {
            return Ok(true);
        };
        let job = self.job;
        let linked = if may_exist || self.overwrite {
            links::linked_tasks(job.db, job.storage.id, &object.key, lo, hi).await?
        } else {
            Default::default()
        };
        let (rows, updates): (Vec<_>, Vec<_>) = rows
            .into_iter()
            .partition(|(row, _)| !linked.contains_key(row));
        let updates: Vec<(i64, serde_json::Value, Option<serde_json::Value>)> = if self.overwrite {
            updates
                .into_iter()
                .filter_map(|(row, task)| Some((*linked.get(&row)?, task.data, task.meta)))
                .collect()
        } else {
            Vec::new()
        };
        let new: Vec<NewTask> = rows
            .into_iter()
            .map(|(row, task)| new_task(object, row, task))
            .collect();
        self.job.commit_rows(new, updates, Vec::new()).await
    }
}

/// Where one read of an object left its rows, for [`Importer::settle`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rows {
    /// Handed back to be committed with other small objects' rows
    /// ([`keep_small`]); `marked`: a partial mark may be on it (see
    /// [`ToRead`]).
    Deferred { marked: bool },
    /// Committed chunk by chunk under a partial mark.
    Committed,
    /// Not all committed: the run stopped.
    Stopped,
}

/// A small object's rows, handed back to be committed with others'. They
/// keep their share of the rows in flight, cut to their own size (their
/// chunk took it a megabyte at a time): a job commits them a chunk at a
/// time, two at once, and the rest wait meanwhile (see
/// `ImportJob::import_objects`), which, when the database lags, was a
/// page of objects' rows that no budget counted.
fn keep_small(result: &mut ObjectResult, object: &ObjectMeta, chunk: Chunk) {
    let held = chunk.held.map(|mut held| {
        super::budget::shrink(&mut held, chunk.bytes);
        held
    });
    let rows = split(result, &object.key, chunk.rows);
    result.deferred = super::SmallChunk {
        rows: rows
            .into_iter()
            .map(|(row, task)| new_task(object, row, task))
            .collect(),
        bytes: chunk.bytes,
        held: held.into_iter().collect(),
        marks: Vec::new(),
    };
}

/// A chunk's rows; its row errors go into `result`.
fn split(result: &mut ObjectResult, key: &str, events: Vec<RowEvent>) -> Vec<(i64, TaskInput)> {
    let mut rows = Vec::with_capacity(events.len());
    for event in events {
        match event {
            RowEvent::Task(row, task) => rows.push((row, task)),
            RowEvent::Error(row, message) => result.error(key, Some(row), message),
            RowEvent::WillWait => {}
        }
    }
    rows
}

fn new_task(object: &ObjectMeta, row: i64, task: TaskInput) -> NewTask {
    NewTask {
        object_key: object.key.clone(),
        row_index: row,
        data: task.data,
        meta: task.meta,
        annotations: task.annotations,
        predictions: task.predictions,
        etag: object.etag.clone(),
        size: object.size,
        last_modified: object.last_modified,
    }
}

/// Rows of one object on their way to a transaction.
#[derive(Default)]
struct Chunk {
    rows: Vec<RowEvent>,
    /// What its rows take in memory, as the row check measures them.
    bytes: usize,
    /// Its share of the process's rows in flight (`super::budget`).
    held: Option<SemaphorePermit<'static>>,
    /// The parse's last chunk: no rows of the object come after it.
    last: bool,
}

/// What a row takes in memory while it waits for its transaction: its
/// task's values (`TaskInput::approx_bytes`), and this: its place in its
/// chunk as the task it becomes (a `NewTask`), with that task's copies of
/// its object's key and etag (keys of usual lengths).
const ROW_BYTES: usize = std::mem::size_of::<NewTask>() + 128;

/// What the row of `event` takes in memory while it waits (see
/// [`ROW_BYTES`]); nothing for a row's error.
fn row_bytes(event: &RowEvent) -> usize {
    match event {
        RowEvent::Task(_, task) => task.approx_bytes + ROW_BYTES,
        RowEvent::Error(..) | RowEvent::WillWait => 0,
    }
}

impl Chunk {
    /// Adds a row; true when the chunk is full and should be sent.
    fn push(&mut self, event: RowEvent) -> bool {
        self.bytes += row_bytes(&event);
        self.rows.push(event);
        self.rows.len() >= CHUNK_ROWS || self.bytes >= CHUNK_BYTES
    }

    /// The bytes of the rows in flight it holds.
    fn held_bytes(&self) -> usize {
        self.held
            .as_ref()
            .map_or(0, |held| held.num_permits() << 10)
    }

    fn hold(&mut self, permit: SemaphorePermit<'static>) {
        match &mut self.held {
            Some(held) => held.merge(permit),
            None => self.held = Some(permit),
        }
    }
}

/// How much of the rows in flight a chunk takes at a time: a chunk of
/// small rows asks the budget once a megabyte, not once a row.
const IN_FLIGHT_STEP: usize = 1 << 20;

/// Gathers a parse's rows into chunks and hands each on (`send`) when it
/// is full, its rows' memory held from the process's rows in flight as the
/// chunk grows. A row that does not fit waits for room, after the chunk
/// before it was handed on: a parse waits only while it holds no rows
/// (see `super::budget` for why that cannot deadlock).
struct Chunker<'a> {
    chunk: Chunk,
    in_flight: Option<&'static ByteBudget>,
    send: &'a mut dyn FnMut(Chunk) -> bool,
    /// False once `send` said the receiver went away.
    open: bool,
    /// The rows (tasks and row errors) the parse gave so far: one more than
    /// `max_rows` once it gave too many (that row is not kept).
    rows: u64,
    max_rows: u64,
}

impl Chunker<'_> {
    /// Takes one event of the parse; false once no more rows are wanted
    /// (the receiver went away, or the object has too many rows).
    fn push(&mut self, event: RowEvent) -> bool {
        if !self.open {
            return false;
        }
        if matches!(event, RowEvent::WillWait) {
            self.hand_on();
            return self.open;
        }
        let bytes = row_bytes(&event);
        self.rows += 1;
        if self.rows > self.max_rows {
            return false;
        }
        if !self.room_for(bytes) {
            self.hand_on();
            self.wait_for(bytes);
        }
        if self.open && self.chunk.push(event) {
            self.hand_on();
        }
        self.open
    }

    /// Whether the chunk holds, or could take now, room for `bytes` more.
    fn room_for(&mut self, bytes: usize) -> bool {
        let Some(budget) = self.in_flight else {
            return true;
        };
        let short = (self.chunk.bytes + bytes).saturating_sub(self.chunk.held_bytes());
        if short == 0 {
            return true;
        }
        let Some(permit) = budget.try_take(short.next_multiple_of(IN_FLIGHT_STEP)) else {
            return false;
        };
        self.chunk.hold(permit);
        true
    }

    /// Waits for room for a row of `bytes` in an empty chunk (cut to the
    /// whole budget: such a row goes alone).
    fn wait_for(&mut self, bytes: usize) {
        if let Some(budget) = self.in_flight
            && self.open
            && let Some(permit) = budget.take(bytes.next_multiple_of(IN_FLIGHT_STEP))
        {
            self.chunk.hold(permit);
        }
    }

    /// Sends the chunk on, if it has rows.
    fn hand_on(&mut self) {
        if self.open && !self.chunk.rows.is_empty() {
            self.open = (self.send)(std::mem::take(&mut self.chunk));
        }
    }

    /// Sends the last chunk, marked as the last.
    fn finish(mut self) {
        self.chunk.last = true;
        self.hand_on();
    }
}

enum Source {
    Reader(Box<dyn Read + Send>),
    /// A Parquet file: a local one, or a copy of the object holding its
    /// disk from the spool budget until it is read and closed.
    File(std::fs::File, Option<SemaphorePermit<'static>>),
    /// A whole body of at most [`INLINE_BYTES`].
    Whole(Bytes),
}

/// An object's parse: done already (a small body parsed where it was read:
/// its chunks and outcome), or running on a blocking thread that sends its
/// chunks.
enum Parsing {
    Done(std::vec::IntoIter<Chunk>, ParseOutcome),
    Running(mpsc::Receiver<Chunk>, JoinHandle<ParseOutcome>),
}

/// How a parse ended: at its object's end (or stopped at the row limit),
/// or broken, with why.
type ParseOutcome = std::result::Result<ParseEnd, String>;

#[derive(Debug, PartialEq)]
enum ParseEnd {
    Whole,
    /// Stopped at `LABELSYNC_MAX_ROWS_PER_OBJECT`: the error of the first
    /// row not read (a row's error, so the object counts as read: a changed
    /// object kept its old etag for it, and every sync read it again).
    Capped(i64, String),
}

impl Parsing {
    fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Chunk>> {
        match self {
            Parsing::Done(chunks, _) => std::task::Poll::Ready(chunks.next()),
            Parsing::Running(rx, _) => rx.poll_recv(cx),
        }
    }

    async fn recv(&mut self) -> Option<Chunk> {
        futures::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// How the parse ended. A running parser is stopped first (its channel
    /// closed) if it had more to send: the caller wants no more rows.
    async fn outcome(self) -> std::result::Result<ParseOutcome, tokio::task::JoinError> {
        match self {
            Parsing::Done(_, outcome) => Ok(outcome),
            Parsing::Running(rx, parser) => {
                drop(rx);
                parser.await
            }
        }
    }
}

/// What a parse of one object is held to.
struct Reading {
    limits: parse::Limits,
    max_object_bytes: u64,
    /// The binary that reads Parquet in a child process.
    parquet_parser: std::path::PathBuf,
    /// The process's budget of rows in flight (`None`: not counted, for a
    /// small body parsed where it was read).
    in_flight: Option<&'static ByteBudget>,
    /// `LABELSYNC_MAX_ROWS_PER_OBJECT`.
    max_rows: u64,
}

/// Runs the parser over `source`, handing `send` each full chunk (or one
/// cut short when the rows in flight are spent) and then the last one;
/// stops when `send` returns false (the receiver went away).
fn parse_source(
    format: Format,
    source: Source,
    reading: &Reading,
    send: &mut dyn FnMut(Chunk) -> bool,
) -> ParseOutcome {
    let (limits, max_object_bytes) = (reading.limits, reading.max_object_bytes);
    let mut chunker = Chunker {
        chunk: Chunk::default(),
        in_flight: reading.in_flight,
        send,
        open: true,
        rows: 0,
        max_rows: reading.max_rows,
    };
    let mut emit = |event: RowEvent| chunker.push(event);
    let parsed = parse::guarded(|| match source {
        Source::Reader(reader) => {
            let reader = Limited {
                inner: reader,
                left: max_object_bytes,
            };
            parse::parse(format, reader, limits, &mut emit)
        }
        Source::Whole(body) if body.len() as u64 > max_object_bytes => Err(format!(
            "object is {} bytes, over the {max_object_bytes}-byte limit (LABELSYNC_MAX_OBJECT_BYTES)",
            body.len()
        )),
        Source::Whole(body) => parse::parse_buffered(format, &body[..], limits, &mut emit),
        Source::File(file, _spooled) => {
            super::parquet_process::parse(&reading.parquet_parser, file, limits, &mut emit)
        }
    });
    let too_many = chunker.rows > reading.max_rows;
    chunker.finish();
    if too_many {
        let first_unread = i64::try_from(reading.max_rows).unwrap_or(i64::MAX);
        return Ok(ParseEnd::Capped(
            first_unread,
            format!(
                "the object has more than {} rows, the most one object may have \
             (LABELSYNC_MAX_ROWS_PER_OBJECT): its first {0} rows were read, the rest were \
             not (retry the run after raising the limit to read them)",
                reading.max_rows
            ),
        ));
    }
    parsed.map(|()| ParseEnd::Whole)
}

/// The disk reserved for one Parquet object's copy.
struct SpoolRoom {
    budget: &'static ByteBudget,
    held: Option<SemaphorePermit<'static>>,
    /// What `held` holds: the listed size, to start with.
    bytes: u64,
    /// The most a copy may take: the object size limit, or the whole
    /// budget where smaller; and which setting that is.
    limit: u64,
    limited_by: &'static str,
}

impl SpoolRoom {
    /// Makes room for a copy of `copied` bytes: a storage may send more
    /// than it listed (GCS decompresses an object stored gzip-encoded, and
    /// an object may change between its listing and its read). Only what
    /// is free now is taken: a copy that waited for more while holding its
    /// room could wait for another that waits for it.
    fn grow_to(&mut self, copied: u64) -> std::result::Result<(), Outgrown> {
        if copied > self.limit {
            return Err(Outgrown::Limit(format!(
                "the storage sent more than the {}-byte limit ({})",
                self.limit, self.limited_by
            )));
        }
        if copied <= self.bytes {
            return Ok(());
        }
        let more = (copied - self.bytes).next_multiple_of(1 << 20);
        let permit = self
            .budget
            .try_take(usize::try_from(more).unwrap_or(usize::MAX))
            .ok_or(Outgrown::Room)?;
        match &mut self.held {
            Some(held) => held.merge(permit),
            None => self.held = Some(permit),
        }
        self.bytes += more;
        Ok(())
    }
}

/// Why a copy could not go on.
#[derive(Debug, PartialEq)]
enum Outgrown {
    /// Past the most any copy may take: the object's error.
    Limit(String),
    /// Past its room, with none free to grow into.
    Room,
}

/// How an object is opened (see [`Importer::opening`]).
enum Opening {
    Local,
    Copy(SpoolRoom),
    Stream,
}

/// The error of an object that could not be opened.
fn unreadable(err: &Error) -> String {
    format!("cannot read the object: {err}")
}

/// What came of opening an object.
enum Opened {
    Source(Source),
    /// Its copy outgrew its room past `copied` bytes: the copy is gone, and
    /// its room let go.
    Outgrew {
        copied: u64,
    },
}

/// What came of one try at an object.
enum Tried {
    /// It was read: its result, or `None` when the run stopped.
    Read(Option<ObjectResult>),
    /// Its copy outgrew its room ([`Opened::Outgrew`]): it is copied again,
    /// with the room [`CopySize::after`] says.
    Outgrew { copied: u64 },
}

/// How much disk the next copy of a Parquet object reserves. A copy may
/// outgrow its listed size (see [`SpoolRoom::grow_to`]); where the budget
/// has no room free to grow into, it is made again with room for twice
/// what it had copied (waited for, without a read held), and once more
/// with room for the size limit, which no copy outgrows. A retry after a
/// transient failure keeps the size learnt: the object is that large.
#[derive(Debug, Clone, Copy)]
enum CopySize {
    Listed,
    Twice(u64),
    Limit,
}

impl CopySize {
    /// The next size, after a copy in this one outgrew it at `copied` bytes.
    fn after(self, copied: u64) -> Self {
        match self {
            CopySize::Listed => CopySize::Twice(copied),
            CopySize::Twice(_) | CopySize::Limit => CopySize::Limit,
        }
    }
}

/// Copies a Parquet object to a temporary file within `room`, grown as the
/// copy goes past it. The file is unlinked as it is made, so it goes when
/// it is closed, with its room.
async fn spool(
    key: &str,
    mut reader: impl tokio::io::AsyncRead + Unpin,
    mut room: SpoolRoom,
) -> Result<Opened> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let unwritable = |e: io::Error| {
        Error::Transient(format!(
            "{key}: the copy on the worker's disk (TMPDIR) could not be written: {e}"
        ))
    };
    let mut file = tokio::fs::File::from_std(tempfile::tempfile().map_err(unwritable)?);
    let mut buf = vec![0; 64 << 10];
    let mut copied = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|e| Error::Transient(format!("{key}: download failed: {e}")))?;
        if n == 0 {
            break;
        }
        copied += n as u64;
        match room.grow_to(copied) {
            Ok(()) => {}
            Err(Outgrown::Room) => return Ok(Opened::Outgrew { copied }),
            Err(Outgrown::Limit(why)) => {
                return Err(Error::invalid("storage_answer_too_big", None, why));
            }
        }
        file.write_all(&buf[..n]).await.map_err(unwritable)?;
    }
    file.flush().await.map_err(unwritable)?;
    Ok(Opened::Source(Source::File(
        file.into_std().await,
        room.held,
    )))
}

/// `body`, with `interrupted` set when it fails: the parser then sees a
/// read error, which is the network's fault, not the file's.
fn watched(
    body: crate::storage::ByteStream,
    interrupted: Arc<AtomicBool>,
) -> impl futures::Stream<Item = io::Result<Bytes>> + Send + Unpin {
    body.inspect(move |chunk| {
        if chunk.is_err() {
            interrupted.store(true, Ordering::SeqCst);
        }
    })
}

/// A body of at most this many bytes is parsed where it was read, on the
/// async thread, not on a blocking thread fed through a channel: for
/// one-task files the hand-offs cost more than the parse (docs/DECISIONS.md,
/// Small task files parsed where they are read). Small enough that even
/// thousands of tiny rows or row errors keep the thread well under a
/// millisecond, and far under what the parse budget counts (such a parse
/// is not counted).
const INLINE_BYTES: usize = 16 * 1024;

enum Head {
    /// The whole body.
    Whole(Bytes),
    /// The first pieces of a longer body (over [`INLINE_BYTES`] by at most
    /// one network read).
    Part(Vec<Bytes>),
}

/// Reads `body` until it ends or passes [`INLINE_BYTES`].
async fn read_head(body: &mut crate::storage::ByteStream) -> io::Result<Head> {
    let mut pieces: Vec<Bytes> = Vec::new();
    let mut len = 0;
    while len <= INLINE_BYTES {
        let Some(piece) = body.try_next().await? else {
            return Ok(Head::Whole(match pieces.len() {
                0 => Bytes::new(),
                1 => pieces.swap_remove(0),
                _ => pieces.concat().into(),
            }));
        };
        len += piece.len();
        pieces.push(piece);
    }
    Ok(Head::Part(pieces))
}

/// Fails the read once more than `left` bytes came through, so an object
/// whose size was not listed still cannot exceed the limit.
struct Limited<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            io::Error::other("object is over the size limit (LABELSYNC_MAX_OBJECT_BYTES)")
        })?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(pieces: Vec<io::Result<Bytes>>) -> crate::storage::ByteStream {
        futures::stream::iter(pieces).boxed()
    }

    fn piece(len: usize) -> io::Result<Bytes> {
        Ok(Bytes::from(vec![b' '; len]))
    }

    fn row(n: i64, approx_bytes: usize) -> RowEvent {
        RowEvent::Task(
            n,
            TaskInput {
                data: serde_json::json!({ "n": n }),
                meta: None,
                annotations: Vec::new(),
                predictions: Vec::new(),
                approx_bytes,
            },
        )
    }

    /// A chunk holds its rows' memory from the rows in flight as it grows;
    /// a row that does not fit sends the chunk on before it waits (the
    /// receiver here lets each chunk go at once, as a transaction would),
    /// and a parse about to wait for the parse budget sends it on too. Only
    /// the parse's last chunk says so.
    #[test]
    fn a_parse_hands_its_rows_on_before_it_waits_for_room() {
        const KIB: usize = 1 << 10;
        let budget: &'static _ = Box::leak(Box::new(ByteBudget::new(2 << 20)));
        let mut sent = Vec::new();
        let mut send = |chunk: Chunk| {
            sent.push((chunk.rows.len(), chunk.held_bytes(), chunk.last));
            true
        };
        let mut chunker = Chunker {
            chunk: Chunk::default(),
            in_flight: Some(budget),
            send: &mut send,
            open: true,
            rows: 0,
            max_rows: u64::MAX,
        };
        for n in 0..4 {
            assert!(chunker.push(row(n, 600 * KIB)));
        }
        assert!(
            budget.try_take((1 << 20) + 1).is_none(),
            "the fourth row holds a megabyte"
        );
        assert!(chunker.push(RowEvent::WillWait));
        assert!(chunker.push(row(4, 10)));
        chunker.finish();
        assert_eq!(
            sent,
            [(3, 2 << 20, false), (1, 1 << 20, false), (1, 1 << 20, true)]
        );
        assert!(budget.try_take(2 << 20).is_some(), "every chunk let go");
    }

    /// Reads `first`, then waits for word on `gate`, then reads `rest`.
    struct Gated {
        first: io::Cursor<Vec<u8>>,
        gate: Option<std::sync::mpsc::Receiver<()>>,
        rest: io::Cursor<Vec<u8>>,
    }

    impl Read for Gated {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.first.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            if let Some(gate) = self.gate.take() {
                gate.recv().ok();
            }
            self.rest.read(buf)
        }
    }

    /// Parses `source` on a thread of its own, its chunks let go as they
    /// come (as a transaction would); says on `done` how many rows came.
    fn parse_on_a_thread(
        format: Format,
        source: Source,
        reading: Reading,
        done: std::sync::mpsc::Sender<usize>,
    ) {
        std::thread::spawn(move || {
            let mut rows = 0;
            let outcome = parse_source(format, source, &reading, &mut |chunk| {
                rows += chunk.rows.len();
                true
            });
            assert_eq!(outcome, Ok(ParseEnd::Whole));
            done.send(rows).ok();
        });
    }

    fn wait_until_spent(budget: &ByteBudget) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while budget.try_take(1).is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the budget was never spent"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// The order that could wait for ever: a JSONL parse holds all the
    /// rows in flight in its chunk, a JSON parse takes the whole parse
    /// budget (its file's reservation) and waits for rows in flight, then
    /// the JSONL parse's next long line waits for the parse budget. It
    /// hands its chunk on first, so both parses end.
    #[test]
    fn a_parse_never_waits_for_the_parse_budget_holding_rows_in_flight() {
        let parse: &'static _ = Box::leak(Box::new(ByteBudget::new(4 << 20)));
        let in_flight: &'static _ = Box::leak(Box::new(ByteBudget::new(1 << 20)));
        let reading = || Reading {
            limits: parse::Limits {
                budget: Some(parse),
                ..parse::Limits::default()
            },
            max_object_bytes: u64::MAX,
            parquet_parser: "unused".into(),
            in_flight: Some(in_flight),
            max_rows: u64::MAX,
        };
        let line = format!("{{\"t\": \"{}\"}}\n", "x".repeat(70 << 10));
        let (gate, gated) = std::sync::mpsc::channel();
        let jsonl = Gated {
            first: io::Cursor::new(line.clone().into_bytes()),
            gate: Some(gated),
            rest: io::Cursor::new(line.into_bytes()),
        };
        let (done, ended) = std::sync::mpsc::channel();
        parse_on_a_thread(
            Format::Jsonl,
            Source::Reader(Box::new(jsonl)),
            reading(),
            done.clone(),
        );
        wait_until_spent(in_flight);
        let array = br#"[{"t": "a"}, {"t": "b"}]"#.to_vec();
        parse_on_a_thread(
            Format::Json,
            Source::Reader(Box::new(io::Cursor::new(array))),
            reading(),
            done,
        );
        wait_until_spent(parse);
        gate.send(()).expect("the JSONL parse waits at its gate");
        let mut rows = Vec::new();
        for _ in 0..2 {
            let timeout = std::time::Duration::from_secs(10);
            rows.push(ended.recv_timeout(timeout).expect("both parses end"));
        }
        rows.sort();
        assert_eq!(rows, [2, 2]);
    }

    /// A copy that goes past its listed size takes more of the spool budget
    /// only where it is free at once, and never more than the limit.
    #[test]
    fn a_copy_past_its_listed_size_grows_only_into_free_room() {
        let budget: &'static _ = Box::leak(Box::new(ByteBudget::new(4 << 20)));
        let mut room = SpoolRoom {
            budget,
            held: budget.try_take(1 << 20),
            bytes: 1 << 20,
            limit: 3 << 20,
            limited_by: "LABELSYNC_MAX_OBJECT_BYTES",
        };
        assert_eq!(room.grow_to(1 << 20), Ok(()));
        assert_eq!(room.grow_to((1 << 20) + 1), Ok(()));
        assert_eq!(room.bytes, 2 << 20);
        let rest = budget.try_take(2 << 20).expect("the rest of the budget");
        assert_eq!(room.grow_to((2 << 20) + 1), Err(Outgrown::Room));
        drop(rest);
        let Err(Outgrown::Limit(over)) = room.grow_to((3 << 20) + 1) else {
            panic!("over the limit");
        };
        assert!(
            over.contains("3145728-byte limit (LABELSYNC_MAX_OBJECT_BYTES)"),
            "{over}"
        );
        drop(room);
        assert!(budget.try_take(4 << 20).is_some(), "its room let go");
    }

    /// Only a body that ends within INLINE_BYTES is whole (so parsed on the
    /// async thread); one that passes it, even in its last piece, is handed
    /// on with those pieces first; a read error is an error.
    #[tokio::test]
    async fn a_head_is_whole_only_within_the_inline_size() {
        let mut small = body(vec![piece(10), piece(INLINE_BYTES - 10)]);
        let Ok(Head::Whole(whole)) = read_head(&mut small).await else {
            panic!("a body of INLINE_BYTES is whole");
        };
        assert_eq!(whole.len(), INLINE_BYTES);

        let mut one_big = body(vec![piece(INLINE_BYTES + 1)]);
        let Ok(Head::Part(pieces)) = read_head(&mut one_big).await else {
            panic!("one piece over INLINE_BYTES is not whole");
        };
        assert_eq!(pieces.len(), 1);

        let mut long = body(vec![piece(INLINE_BYTES), piece(1), piece(7)]);
        let Ok(Head::Part(pieces)) = read_head(&mut long).await else {
            panic!("a longer body is not whole");
        };
        assert_eq!(pieces.len(), 2, "reading stops once past INLINE_BYTES");
        assert_eq!(long.try_next().await.unwrap().unwrap().len(), 7);

        let mut cut = body(vec![piece(10), Err(io::Error::other("reset"))]);
        assert!(read_head(&mut cut).await.is_err());
    }
}
