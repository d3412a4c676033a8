//! Live progress as Server-Sent Events (docs/API.md, "Live progress").
//!
//! Every stream reads the run rows itself, every [`EVERY`]: the rows are
//! what workers commit their counters to, so any scheduler replica serves
//! any run, whichever worker runs it, with nothing else to deploy (see
//! docs/DECISIONS.md, "Live progress by polling the run rows").
use super::NoQuery;
use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    time::Duration,
};

use axum::{
    Extension,
    extract::State,
    http::HeaderMap,
    response::sse::{Event, KeepAlive, Sse},
};
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use futures::{Stream, StreamExt};
use labelsync::{
    Error,
    db::{
        entities::sync_run,
        runs::{self, Counters, RunStatus},
    },
};
use serde::Deserialize;

use super::{ApiPath, ApiQuery, ApiResult, AppState, Caller};

/// The most often a stream looks (and so the most often it sends).
const EVERY: Duration = Duration::from_millis(500);
/// How long ago a reconnecting project stream's `Last-Event-ID` may be for
/// the stream to start there (see [`resumed_from`]). Longer gaps are
/// `GET /runs`' to fill: a look follows at most [`MAX_RUNS`] runs.
const REPLAY: TimeDelta = TimeDelta::minutes(10);
/// How far ahead of this replica's clock a `Last-Event-ID` (another
/// replica's) may be; it then starts from now.
const CLOCK_SKEW: TimeDelta = TimeDelta::minutes(1);
/// Every look reads the runs that ended since the previous look began,
/// and this much before: a run that ended while it ran is read again
/// (deduplicated by what the stream saw).
const OVERLAP: TimeDelta = TimeDelta::seconds(1);
/// Runs a project-wide stream follows at most.
const MAX_RUNS: u64 = 1000;

/// What makes a run worth sending again (not its heartbeat).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    status: String,
    /// A held run let onto the queue is news to a client waiting for it.
    held: bool,
    counters: Counters,
    attempts: i64,
    error: Option<String>,
}

impl Seen {
    fn is_live(&self) -> bool {
        RunStatus::parse(&self.status).is_some_and(RunStatus::is_live)
    }

    fn of(run: &sync_run::Model) -> Self {
        Seen {
            status: run.status.clone(),
            held: labelsync::db::admission::is_held(run),
            counters: Counters::of(run),
            attempts: run.attempts,
            error: run.error.clone(),
        }
    }
}

fn is_final(run: &sync_run::Model) -> bool {
    RunStatus::parse(&run.status).is_some_and(|s| !s.is_live())
}

fn event(name: &'static str, run: &sync_run::Model) -> Result<Event, Infallible> {
    Ok(Event::default()
        .event(name)
        .data(runs::to_json(run).to_string()))
}

/// How often a stream's token is checked again: a token revoked or
/// expired while it watches ends its streams within this long.
const RECHECK: Duration = Duration::from_secs(10);
/// How long a stream goes on while its token cannot be looked up (the
/// database does not answer): a blip keeps the stream, but a token revoked
/// during a longer outage is not served for as long as it lasts.
const UNCONFIRMED: Duration = Duration::from_secs(30);

/// A stream's caller, when its token was last checked and last found
/// valid, and its place among the open streams (see `super::streams`).
struct Holder {
    caller: Caller,
    checked: tokio::time::Instant,
    confirmed: tokio::time::Instant,
    _slot: super::streams::Slot,
}

impl Holder {
    /// `429` when the caller (or the server) holds the most streams (see
    /// `Streams::events`).
    fn open(state: &AppState, caller: Caller) -> ApiResult<Self> {
        let slot = state.streams.open(&caller)?;
        let now = tokio::time::Instant::now();
        Ok(Holder {
            caller,
            checked: now,
            confirmed: now,
            _slot: slot,
        })
    }

    /// Whether the stream may go on: its token was found valid within
    /// [`UNCONFIRMED`] and is not found revoked or expired now.
    async fn still_valid(&mut self, state: &AppState) -> bool {
        if self.checked.elapsed() < RECHECK {
            return true;
        }
        self.checked = tokio::time::Instant::now();
        match super::access::still_valid(state, &self.caller).await {
            Some(true) => {
                self.confirmed = self.checked;
                true
            }
            Some(false) => false,
            None => self.confirmed.elapsed() < UNCONFIRMED,
        }
    }
}

/// One run's stream: `progress` events while it is live (when something
/// changed), then `finished` with the ended run, then the end of the stream.
struct RunWatch {
    state: AppState,
    holder: Holder,
    id: String,
    last: Option<Seen>,
    first: bool,
    done: bool,
}

/// `GET /api/v1/runs/{id}/events`.
pub async fn run_events(
    State(state): State<AppState>,
    _: NoQuery,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    super::runs::find_for(&state, &caller, &id).await?;
    let holder = Holder::open(&state, caller)?;
    let closed = state.streams.closed();
    let watch = RunWatch {
        state,
        holder,
        id,
        last: None,
        first: true,
        done: false,
    };
    let stream = futures::stream::unfold(watch, next_run_event).take_until(closed);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn next_run_event(mut w: RunWatch) -> Option<(Result<Event, Infallible>, RunWatch)> {
    if w.done {
        return None;
    }
    loop {
        if !std::mem::take(&mut w.first) {
            tokio::time::sleep(EVERY).await;
        }
        if !w.holder.still_valid(&w.state).await {
            return None;
        }
        let run = match runs::get(&w.state.db, &w.id).await {
            Ok(run) => run,
            Err(Error::NotFound(message)) => {
                // Deleted with its storage while watched.
                w.done = true;
                let gone = Event::default()
                    .event("gone")
                    .data(serde_json::json!({ "id": w.id, "message": message }).to_string());
                return Some((Ok(gone), w));
            }
            Err(err) => {
                tracing::debug!(error = %err, "run events: read failed; trying again");
                continue;
            }
        };
        if is_final(&run) {
            w.done = true;
            return Some((event("finished", &run), w));
        }
        let seen = Seen::of(&run);
        if w.last.as_ref() != Some(&seen) {
            w.last = Some(seen);
            return Some((event("progress", &run), w));
        }
    }
}

/// The query of `GET /api/v1/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    project_id: Option<i64>,
}

/// Every run's changes (of one project, or all): a `run` event each time a
/// run is queued, progresses or ends. The stream does not end by itself.
///
/// Each look reads the live runs and the runs that ended in its window
/// (from the previous look's start, less [`OVERLAP`]); a client that
/// reconnects with the window of the last event it had reads from there
/// (see [`resumed_from`]).
struct ProjectWatch {
    state: AppState,
    holder: Holder,
    /// `None`: every project.
    projects: Option<Vec<i64>>,
    /// What the previous look saw of each run, to send only changes.
    seen: HashMap<String, Seen>,
    /// Runs changed since the last send, waiting their turn: all of one
    /// look, whose window began at `window`.
    ready: VecDeque<sync_run::Model>,
    /// The start of the window of the look that filled `ready`: the id of
    /// its events. A client reconnecting with it reads that window again,
    /// so nothing it had not had is skipped (what it had may come twice).
    window: DateTime<Utc>,
    /// Where the next look's window starts.
    since: DateTime<Utc>,
    /// The previous look read a full page of ended runs: the next one goes
    /// on past its last, `(finished_at, id)`, at once.
    page_end: Option<(DateTime<Utc>, String)>,
    /// When the stream last sent an id (see [`MARK_EVERY`]).
    marked: Option<tokio::time::Instant>,
    first: bool,
    /// The previous look's read failed.
    failed: bool,
}

/// A quiet stream sends its window as an id-only message this often, so
/// that a client that reconnects after a long quiet spell has an id of
/// the last [`REPLAY`] (an id-only message moves an EventSource's
/// `lastEventId` and fires no event).
const MARK_EVERY: Duration = Duration::from_secs(30);
/// A resumed stream's first window starts this long before the id it
/// was given, beyond [`OVERLAP`]: for a run whose end was committed a
/// while after its `finished_at` (a write lock waited for), and clocks a
/// little apart.
const RESUME_SLACK: TimeDelta = TimeDelta::seconds(10);

/// `GET /api/v1/events`.
pub async fn project_events(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let projects = match q.project_id {
        Some(project_id) => {
            super::projects::find_for(&state.db, &caller, project_id).await?;
            Some(vec![project_id])
        }
        None => caller.projects().map(<[i64]>::to_vec),
    };
    let holder = Holder::open(&state, caller)?;
    let closed = state.streams.closed();
    let since = resumed_from(&headers).map_or_else(labelsync::clock::now, |at| at - RESUME_SLACK);
    let watch = ProjectWatch {
        state,
        holder,
        projects,
        seen: HashMap::new(),
        ready: VecDeque::new(),
        window: since,
        since,
        page_end: None,
        marked: None,
        first: true,
        failed: false,
    };
    let stream = futures::stream::unfold(watch, next_project_event).take_until(closed);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

async fn next_project_event(
    mut w: ProjectWatch,
) -> Option<(Result<Event, Infallible>, ProjectWatch)> {
    loop {
        if let Some(run) = w.ready.pop_front() {
            let id = w.window_id();
            w.marked = Some(tokio::time::Instant::now());
            return Some((event("run", &run).map(|e| e.id(id)), w));
        }
        let first = std::mem::take(&mut w.first);
        if pause_before_look(first, w.page_end.is_some(), w.failed) {
            tokio::time::sleep(EVERY).await;
        }
        if !w.holder.still_valid(&w.state).await {
            return None;
        }
        look(&mut w).await;
        if w.ready.is_empty() && w.marked.is_none_or(|at| at.elapsed() >= MARK_EVERY) {
            let mark = Event::default().id(w.window_id());
            w.marked = Some(tokio::time::Instant::now());
            return Some((Ok(mark), w));
        }
    }
}

impl ProjectWatch {
    /// The id of the events of the look that filled `ready`.
    fn window_id(&self) -> String {
        self.window.to_rfc3339_opts(SecondsFormat::Millis, true)
    }
}

/// Where a reconnecting client left off: its `Last-Event-ID` (the window
/// of the look whose events it had last), when it reads as one and is no
/// older than [`REPLAY`]; else `None`, and the stream starts now. An id
/// ahead of this replica's clock (another replica's, a little ahead)
/// starts [`CLOCK_SKEW`] back.
fn resumed_from(headers: &HeaderMap) -> Option<DateTime<Utc>> {
    let raw = headers.get("last-event-id")?.to_str().ok()?;
    let at = DateTime::parse_from_rfc3339(raw.trim()).ok()?.to_utc();
    let now = labelsync::clock::now();
    if at > now + CLOCK_SKEW || at < now - REPLAY {
        return None;
    }
    Some(if at > now { now - CLOCK_SKEW } else { at })
}

/// Whether a stream waits [`EVERY`] before its next look: not before its
/// first, nor while it pages through runs that ended (the next page is
/// read at once), unless the last read failed (a failure that repeats at
/// once would keep a core and the database busy for as long).
fn pause_before_look(first: bool, paging: bool, failed: bool) -> bool {
    !first && (!paging || failed)
}

/// Reads the runs of a look and queues those that changed.
async fn look(w: &mut ProjectWatch) {
    let started = labelsync::clock::now();
    let read = read_look(w).await;
    w.failed = read.is_err();
    let (rows, more) = match read {
        Ok(read) => read,
        Err(err) => {
            tracing::debug!(error = %err, "events: read failed; trying again");
            return;
        }
    };
    let mut current = HashMap::with_capacity(rows.len());
    for run in rows {
        let seen = Seen::of(&run);
        if w.seen.get(&run.id) != Some(&seen) {
            w.ready.push_back(run.clone());
        }
        current.insert(run.id.clone(), seen);
    }
    // Only what this look saw is remembered, so the map stays as small as
    // the set of live and just-ended runs.
    w.seen = current;
    w.window = w.since;
    w.since = more.as_ref().map_or(started, |(at, _)| *at);
    w.page_end = more;
}

/// A look's rows, and the last ended run's `(finished_at, id)` when its
/// page of ended runs was full (more wait).
type Looked = (Vec<sync_run::Model>, Option<(DateTime<Utc>, String)>);

/// The runs of one look: the live ones; those that ended in its window, a
/// page of [`MAX_RUNS`] at most; and those the stream saw live and finds
/// in neither (their end committed after the window had moved past their
/// `finished_at`).
async fn read_look(w: &ProjectWatch) -> labelsync::Result<Looked> {
    let (db, projects) = (&w.state.db, w.projects.as_deref());
    let mut rows = runs::live_of(db, projects, MAX_RUNS).await?;
    let ended = match &w.page_end {
        Some((at, id)) => runs::ended_after(db, projects, (*at, id), MAX_RUNS).await?,
        None => runs::ended_since(db, w.since - OVERLAP, projects, MAX_RUNS).await?,
    };
    let full = ended.len() as u64 == MAX_RUNS;
    let more = (ended.last())
        .filter(|_| full)
        .and_then(|r| Some((r.finished_at?, r.id.clone())));
    rows.extend(ended);
    let found: std::collections::HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let lost: Vec<String> = (w.seen.iter())
        .filter(|(id, seen)| seen.is_live() && !found.contains(id.as_str()))
        .map(|(id, _)| id.clone())
        .collect();
    rows.extend(runs::by_ids(db, &lost).await?);
    Ok((rows, more))
}

#[cfg(test)]
mod tests {
    use super::pause_before_look;

    /// A stream paging through ended runs reads the next page at once, but
    /// not after a failed read: before, a read failing at once while paging
    /// was tried again at once, for as long as it failed.
    #[test]
    fn a_failed_read_is_tried_again_after_a_pause_even_while_paging() {
        assert!(!pause_before_look(true, false, false), "the first look");
        assert!(!pause_before_look(false, true, false), "the next page");
        assert!(pause_before_look(false, false, false), "a quiet stream");
        assert!(pause_before_look(false, true, true), "a failed page");
        assert!(pause_before_look(false, false, true), "a failed look");
    }
}
