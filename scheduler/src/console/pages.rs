//! The console's pages: overview, runs, one run, storages. Each reads what
//! the caller's scope and projects allow (as the API would answer) and
//! offers only the actions its scope covers; every list is keyset-paged.
use axum::{
    Extension,
    extract::{Path, Query, State},
    response::Response,
};
use chrono::{Duration, Utc};
use labelsync::db::{
    entities::{storage, sync_run},
    runs::{self, RunFilter, RunKind, RunStatus},
    storages::{self, StorageFilter},
};
use maud::{Markup, html};
use serde::Deserialize;

use super::{Viewer, charts, layout, progress};
use crate::api::{AppState, access::Need};

/// Rows a list page shows.
const PAGE: u64 = 50;

/// A page, or the error page that stands for it.
type Page = Result<Response, Response>;

/// The page of a read the database refused or did not answer: 503, and
/// the log says why. An empty list there ("No runs.") hid an outage.
fn unreadable(err: labelsync::Error) -> Response {
    tracing::warn!(error = %err, "a console page could not read the database");
    layout::error_page(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "The database did not answer this page's reads; try again in a moment.",
    )
}

/// `GET /ui/`: the queue, run counts, the newest runs.
pub async fn overview(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
) -> Response {
    let projects = viewer.caller.projects();
    let hour_ago = labelsync::clock::now() - Duration::hours(1);
    let (depth, age, workers, live, last_hour, recent, ended) = tokio::join!(
        state.queue.depth(),
        state.queue.oldest_waiting_age(),
        labelsync::db::workers::page(&state.db, None, 100),
        runs::count_by_status(&state.db, None, projects),
        runs::count_by_status(&state.db, Some(hour_ago), projects),
        runs::page(
            &state.db,
            RunFilter {
                projects,
                ..RunFilter::default()
            },
            20
        ),
        async {
            let now = labelsync::clock::now();
            tokio::try_join!(
                runs::ended_per_span(&state.db, now, Duration::minutes(1), 60, projects),
                runs::ended_per_span(&state.db, now, Duration::hours(1), 24, projects),
            )
        },
    );
    for failed in [
        workers.as_ref().err(),
        live.as_ref().err(),
        last_hour.as_ref().err(),
    ]
    .into_iter()
    .chain([recent.as_ref().err(), ended.as_ref().err()])
    .flatten()
    {
        tracing::warn!(error = %failed, "the console's overview could not read the database");
    }
    let count = |map: &labelsync::Result<std::collections::HashMap<String, i64>>, status: &str| {
        map.as_ref()
            .ok()
            .and_then(|m| m.get(status).copied())
            .unwrap_or(0)
    };
    let body = html! {
        @if viewer.may(Need::Fleet) {
            (fleet_section(&depth, &age, &workers, crate::api::gone_after(&state.settings)))
        }
        h2 { "Runs" }
        @if live.is_err() || last_hour.is_err() {
            (unread("The run counts"))
        }
        div.cards {
            (card("running", count(&live, "running")))
            (card("queued", count(&live, "queued")))
            (card("completed, last hour", count(&last_hour, "completed")))
            (card("with errors, last hour", count(&last_hour, "completed_with_errors")))
            (card("failed, last hour", count(&last_hour, "failed")))
            (card("cancelled, last hour", count(&last_hour, "cancelled")))
        }
        @match &ended {
            Ok((minutes, hours)) => (throughput(minutes, hours)),
            Err(_) => (unread("The runs' totals")),
        }
        h2 { "Newest runs" }
        @match &recent {
            Ok(recent) => (runs_table(recent)),
            Err(_) => (unread("The newest runs")),
        }
        p { a href="/ui/runs" { "All runs" } }
    };
    layout::page("Overview", &viewer, body)
}

/// The overview's queue and workers (for callers who see the fleet).
fn fleet_section(
    depth: &labelsync::Result<labelsync::jobs::queue::QueueDepth>,
    age: &labelsync::Result<Option<u64>>,
    workers: &labelsync::Result<Vec<labelsync::db::entities::worker::Model>>,
    gone_after: std::time::Duration,
) -> Markup {
    html! {
        h2 { "Queue" }
        @match depth {
            Ok(depth) => div.cards {
                (card("due, waiting for a worker", depth.pending))
                (card("oldest due, seconds", age.as_ref().ok().copied().flatten().map_or_else(|| "-".to_owned(), |a| a.to_string())))
                (card("scheduled for later", depth.scheduled))
                (card("in flight", depth.running))
                (card("dead", depth.dead))
            },
            Err(err) => p.status-failed { "The queue does not answer: " (err) },
        }
        div.actions {
            button data-action="/api/v1/queues/dead/requeue" data-confirm="Put every dead job back in the queue?"
                data-done="Dead jobs requeued." { "Requeue dead jobs" }
            button.danger data-action="/api/v1/queues/dead/discard" data-confirm="Discard every dead job for good?"
                data-done="Dead jobs discarded." { "Discard dead jobs" }
        }
        h2 { "Workers" }
        @match workers {
            Ok(workers) => (workers_table(workers, gone_after)),
            Err(_) => (unread("The workers")),
        }
    }
}

fn workers_table(
    rows: &[labelsync::db::entities::worker::Model],
    gone_after: std::time::Duration,
) -> Markup {
    let now = labelsync::clock::now();
    html! {
        @if rows.is_empty() { p.muted { "No worker has registered." } } @else {
            div.scroll tabindex="0" role="region" aria-label="Workers" { table {
                thead { tr {
                    th scope="col" { "Worker" } th scope="col" { "Host" } th scope="col" { "Version" }
                    th scope="col" { "Slots" } th scope="col" { "Jobs now" } th scope="col" { "Last heartbeat" }
                    th scope="col" { "State" }
                } }
                tbody { @for w in rows {
                    @let silent = (now - w.heartbeat_at).to_std().unwrap_or_default();
                    tr {
                        td { (w.name) } td { (w.host) } td { (w.version) } td { (w.slots) }
                        td { (w.running_jobs) } td { (w.heartbeat_at.format("%H:%M:%S")) }
                        td { @if silent > gone_after { span.status-failed { "gone" } } @else { span.status-completed { "alive" } } }
                    }
                } }
            } }
        }
    }
}

/// Throughput per minute over the last hour (by the minute each run ended)
/// and the share of ended runs that failed, over the last hour and day:
/// `minutes` holds the last hour's 60 minutes, `hours` the last day's 24
/// hours, oldest first (`runs::ended_per_span`).
fn throughput(minutes: &[runs::EndedTotals], hours: &[runs::EndedTotals]) -> Markup {
    let of = |spans: &[runs::EndedTotals], value: fn(&runs::EndedTotals) -> i64| {
        spans.iter().map(value).collect::<Vec<i64>>()
    };
    let rate = |spans: &[runs::EndedTotals]| {
        let bad: i64 = spans.iter().map(|s| s.failed).sum();
        let all: i64 = spans.iter().map(|s| s.ended).sum();
        if all == 0 {
            "-".to_owned()
        } else {
            format!("{:.1} %", 100.0 * bad as f64 / all as f64)
        }
    };
    html! {
        h2 { "Throughput, last hour" }
        div.cards {
            (card("runs failed, last hour", rate(minutes)))
            (card("runs failed, last day", rate(hours)))
        }
        (charts::bars("Objects listed", "objects listed per minute", &of(minutes, |s| s.listed)))
        (charts::bars("Tasks created", "tasks created per minute", &of(minutes, |s| s.created)))
        (charts::bars("Annotations exported", "annotations exported per minute", &of(minutes, |s| s.exported)))
        (charts::bars("Runs failed per minute", "runs failed per minute", &of(minutes, |s| s.failed)))
        (charts::bars("Runs ended per hour, last day", "runs ended per hour", &of(hours, |s| s.ended)))
        (charts::bars("Runs failed per hour, last day", "runs failed per hour", &of(hours, |s| s.failed)))
    }
}

fn card(label: &str, n: impl std::fmt::Display) -> Markup {
    html! { div.card { div.n { (n) } div.l { (label) } } }
}

/// A part of a page whose read failed: said so (an empty list there hid
/// an outage), the why in the log, not on the page.
fn unread(what: &str) -> Markup {
    html! { p.status-failed { (what) " could not be read: the database did not answer (see the scheduler's log)." } }
}

fn runs_table(rows: &[sync_run::Model]) -> Markup {
    html! {
        @if rows.is_empty() {
            p.muted { "No runs." }
        } @else {
            div.scroll tabindex="0" role="region" aria-label="Runs" { table {
                thead { tr {
                    th scope="col" { "Run" } th scope="col" { "Storage" } th scope="col" { "Kind" }
                    th scope="col" { "Status" } th scope="col" { "Listed" } th scope="col" { "Created" }
                    th scope="col" { "Failed" } th scope="col" { "Queued at" }
                } }
                tbody { @for run in rows { tr {
                    td { a href={ "/ui/runs/" (run.id) } { (run.id) } }
                    td { a href={ "/ui/storages/" (run.storage_id) } { (run.storage_id) } }
                    td { (run.kind) }
                    td { span class={ "status-" (run.status) } { (run.status) } }
                    td { (run.listed) } td { (run.created) } td { (run.failed) }
                    td { (run.queued_at.format("%Y-%m-%d %H:%M:%S")) }
                } } }
            } }
        }
    }
}

/// `?project_id=&status=&kind=&before=` of the runs page.
#[derive(Debug, Default, Deserialize)]
pub struct RunsQuery {
    /// Text, not numbers: the filter form sends empty fields.
    project_id: Option<String>,
    storage_id: Option<String>,
    /// `1h`, `1d` or `7d`: runs queued within that long.
    since: Option<String>,
    status: Option<String>,
    kind: Option<String>,
    before: Option<String>,
}

/// `GET /ui/runs`: newest first, filtered, paged by run id.
pub async fn runs(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Query(q): Query<RunsQuery>,
) -> Page {
    let status = q.status.as_deref().and_then(RunStatus::parse);
    let kind = q.kind.as_deref().filter(|k| RunKind::parse(k).is_some());
    let project_id = number(q.project_id.as_deref());
    let storage_id = number(q.storage_id.as_deref());
    let chosen = project_id.map(|p| [p]);
    // A project the caller may not see shows nothing, as in the API.
    let projects = match (&chosen, viewer.caller.projects()) {
        (Some(one), Some(allowed)) if !allowed.contains(&one[0]) => Some(&[][..]),
        (Some(one), _) => Some(&one[..]),
        (None, allowed) => allowed,
    };
    let since = q.since.as_deref().and_then(since_span);
    let filter = RunFilter {
        storage_id,
        status,
        kind,
        before: q.before.as_deref(),
        projects,
        created_after: since.map(|(_, span)| labelsync::clock::now() - span),
        ..RunFilter::default()
    };
    let rows = runs::page(&state.db, filter, PAGE)
        .await
        .map_err(unreadable)?;
    let next = (rows.len() as u64 == PAGE)
        .then(|| rows.last().map(|r| r.id.clone()))
        .flatten();
    let body = html! {
        form.filters method="get" action="/ui/runs" {
            label { "Project id" input type="number" name="project_id" value=[project_id]; }
            label { "Storage id" input type="number" name="storage_id" value=[storage_id]; }
            label { "Status" select name="status" {
                option value="" { "any" }
                @for s in RunStatus::ALL { option value=(s.as_str()) selected[status == Some(s)] { (s.as_str()) } }
            } }
            label { "Kind" select name="kind" {
                option value="" { "any" }
                @for k in ["import", "export", "delete"] { option value=(k) selected[kind == Some(k)] { (k) } }
            } }
            label { "Queued" select name="since" {
                option value="" { "any time" }
                @for (name, label) in SINCE { option value=(name) selected[since.is_some_and(|s| s.0 == *name)] { (label) } }
            } }
            button type="submit" { "Filter" }
        }
        (runs_table(&rows))
        @if let Some(next) = next {
            p { a href=(older_link(&q, &next)) { "Older runs" } }
        }
    };
    Ok(layout::page("Runs", &viewer, body))
}

/// The choices of the runs page's time filter.
const SINCE: &[(&str, &str)] = &[
    ("1h", "in the last hour"),
    ("1d", "in the last day"),
    ("7d", "in the last week"),
];

/// A time filter's name and span, if it is one of [`SINCE`].
fn since_span(name: &str) -> Option<(&'static str, Duration)> {
    let (name, _) = SINCE.iter().find(|(n, _)| *n == name)?;
    let span = match *name {
        "1h" => Duration::hours(1),
        "1d" => Duration::days(1),
        _ => Duration::days(7),
    };
    Some((name, span))
}

/// A form field holding an id, if it holds one.
fn number(field: Option<&str>) -> Option<i64> {
    field.and_then(|f| f.trim().parse().ok())
}

fn older_link(q: &RunsQuery, before: &str) -> String {
    let mut link = format!("/ui/runs?before={before}");
    for (name, value) in [("project_id", &q.project_id), ("storage_id", &q.storage_id)] {
        if let Some(id) = number(value.as_deref()) {
            link.push_str(&format!("&{name}={id}"));
        }
    }
    for (name, value) in [
        ("status", &q.status),
        ("kind", &q.kind),
        ("since", &q.since),
    ] {
        if let Some(v) = value
            .as_deref()
            .filter(|v| v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        {
            link.push_str(&format!("&{name}={v}"));
        }
    }
    link
}

/// `?after=` of a run's error table.
#[derive(Debug, Default, Deserialize)]
pub struct ErrorsQuery {
    after: Option<i64>,
}

/// `GET /ui/runs/{id}`: counters (live while it runs), timings, the error,
/// the per-object errors, and its actions.
pub async fn run(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<String>,
    Query(q): Query<ErrorsQuery>,
) -> Page {
    let run = match runs::get(&state.db, &id).await {
        Ok(run) if viewer.caller.sees(run.project_id) => run,
        Ok(_) | Err(labelsync::Error::NotFound(_)) => {
            return Err(layout::error_page(
                axum::http::StatusCode::NOT_FOUND,
                &format!("Run {id} not found."),
            ));
        }
        Err(err) => return Err(unreadable(err)),
    };
    let errors = runs::errors_page(&state.db, &id, q.after, PAGE)
        .await
        .map_err(unreadable)?;
    let live = RunStatus::parse(&run.status).is_some_and(RunStatus::is_live);
    let progress = match live {
        true => Some(progress::facts(&run, expected_total(&state, &run).await)),
        false => None,
    };
    let counters = serde_json::to_value(runs::Counters::of(&run)).unwrap_or_default();
    let body = html! {
        div data-live-run=[live.then_some(&run.id)] {
            dl.facts {
                dt { "Status" } dd { span data-status class={ "status-" (run.status) } { (run.status) } }
                dt { "Storage" } dd { (run.storage_id) }
                dt { "Kind" } dd { (run.kind) " (" (run.scope) ")" }
                dt { "Attempts" } dd { (run.attempts) }
                dt { "Queued" } dd { (run.queued_at) }
                dt { "Started" } dd { (opt(run.started_at)) }
                dt { "Heartbeat" } dd { (opt(run.heartbeat_at)) }
                dt { "Finished" } dd { (opt(run.finished_at)) }
                @if let Some(trace) = &run.trace_id { dt { "Trace id" } dd { code data-trace { (trace) } } }
                @if let Some(error) = &run.error { dt { "Error" } dd.status-failed { (error) } }
            }
            @if let Some(progress) = progress { (progress) }
            h2 { "Counters" }
            div.cards {
                @if let Some(map) = counters.as_object() {
                    @for (name, value) in map {
                        div.card { div.n data-counter=(name) { (value) } div.l { (name) } }
                    }
                }
            }
        }
        @if live && viewer.may(Need::Act) {
            div.actions {
                button.danger data-action={ "/api/v1/runs/" (run.id) "/cancel" }
                    data-confirm="Cancel this run?" data-done="Cancelled." { "Cancel run" }
            }
        }
        @if !live && run.failed > 0 && run.kind == "import" && viewer.may(Need::Act) {
            div.actions {
                button data-action={ "/api/v1/runs/" (run.id) "/retry" } data-then="run" { "Retry failed objects" }
            }
        }
        h2 { "Objects that failed" }
        (errors_table(&run, &errors))
    };
    Ok(layout::page(&format!("Run {}", run.id), &viewer, body))
}

/// The size a live run is expected to reach (see `progress`), from the
/// storage's history; `None` when there is nothing to go by.
async fn expected_total(state: &AppState, run: &sync_run::Model) -> Option<i64> {
    let previous = runs::previous_completed(&state.db, run)
        .await
        .ok()
        .flatten();
    let retried = match &run.retry_of {
        Some(id) => runs::get(&state.db, id).await.ok(),
        None => None,
    };
    progress::expected_total(run, previous.as_ref(), retried.as_ref())
}

fn opt(at: Option<chrono::DateTime<Utc>>) -> String {
    at.map_or_else(|| "-".to_owned(), |at| at.to_string())
}

fn errors_table(
    run: &sync_run::Model,
    rows: &[labelsync::db::entities::object_error::Model],
) -> Markup {
    html! {
        @if rows.is_empty() {
            p.muted { "None." }
        } @else {
            div.scroll tabindex="0" role="region" aria-label="Objects that failed" { table {
                thead { tr { th scope="col" { "Key" } th scope="col" { "Row" } th scope="col" { "Error" } } }
                tbody { @for e in rows { tr {
                    td.wrap { (e.object_key) }
                    td { (e.row_index.map_or_else(String::new, |r| r.to_string())) }
                    td.wrap { (e.error) }
                } } }
            } }
            @if rows.len() as u64 == PAGE {
                @if let Some(last) = rows.last() {
                    p { a href={ "/ui/runs/" (run.id) "?after=" (last.id) } { "More errors" } }
                }
            }
        }
    }
}

/// `?project_id=&after=` of the storages page.
#[derive(Debug, Default, Deserialize)]
pub struct StoragesQuery {
    project_id: Option<String>,
    after: Option<i64>,
}

/// `GET /ui/storages`: each storage (of one project, or of every project
/// the caller sees) with its newest run, its last validation and actions.
pub async fn storages(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Query(q): Query<StoragesQuery>,
) -> Page {
    let project_id = number(q.project_id.as_deref());
    let filter = StorageFilter {
        project_id,
        after: q.after,
        projects: viewer.caller.projects(),
        ..StorageFilter::default()
    };
    let rows = storages::page(&state.db, filter, PAGE)
        .await
        .map_err(unreadable)?;
    let ids: Vec<i64> = rows.iter().map(|s| s.id).collect();
    let last = runs::newest_of(&state.db, &ids).await.map_err(unreadable)?;
    let mut project_ids: Vec<i64> = rows.iter().map(|s| s.project_id).collect();
    project_ids.sort_unstable();
    project_ids.dedup();
    let titles = labelsync::db::projects::titles(&state.db, &project_ids)
        .await
        .map_err(unreadable)?;
    let more = match (rows.len() as u64 == PAGE, ids.last()) {
        (true, Some(last)) => Some(match project_id {
            Some(p) => format!("/ui/storages?project_id={p}&after={last}"),
            None => format!("/ui/storages?after={last}"),
        }),
        _ => None,
    };
    let body = html! {
        form.filters method="get" action="/ui/storages" {
            label { "Project id" input type="number" name="project_id" value=[project_id]; }
            button type="submit" { "Filter" }
        }
        @if rows.is_empty() { p.muted { "No storages." } } @else {
            div.scroll tabindex="0" role="region" aria-label="Storages" { table {
                thead { tr {
                    th scope="col" { "Storage" } th scope="col" { "Project" } th scope="col" { "Backend" }
                    th scope="col" { "Role" } th scope="col" { "Every" } th scope="col" { "Next sync" }
                    th scope="col" { "Validated" } th scope="col" { "Newest run" } th scope="col" { "Actions" }
                } }
                tbody { @for s in &rows {
                    (storage_row(&viewer, s, titles.get(&s.project_id), last.get(&s.id)))
                } }
            } }
            @if let Some(more) = more { p { a href=(more) { "More storages" } } }
        }
    };
    Ok(layout::page("Storages", &viewer, body))
}

fn storage_row(
    viewer: &Viewer,
    s: &storage::Model,
    project: Option<&String>,
    last: Option<&sync_run::Model>,
) -> Markup {
    let every = match (s.sync_interval_seconds, s.schedule_paused_at) {
        (None, _) => "manual".to_owned(),
        (Some(n), None) => format!("{n} s"),
        (Some(n), Some(_)) => format!("{n} s, paused"),
    };
    html! { tr {
        td { a href={ "/ui/storages/" (s.id) } { (s.id) } @if !s.title.is_empty() { " " span.muted { (s.title) } } }
        td { a href={ "/ui/storages?project_id=" (s.project_id) } {
            (s.project_id) @if let Some(title) = project { " " span.muted { (title) } }
        } }
        td { (s.backend) }
        td { (s.role) }
        td { (every) }
        td { (opt(s.next_sync_at)) }
        td { (validation(s)) }
        td { @match last {
            Some(run) => a href={ "/ui/runs/" (run.id) } { span class={ "status-" (run.status) } { (run.status) } },
            None => span.muted { "never" },
        } }
        td { @if viewer.may(Need::Act) { (storage_actions(s)) } }
    } }
}

/// The storage's last validation: when, and whether it answered as expected.
fn validation(s: &storage::Model) -> Markup {
    html! { @match (s.validated_at, &s.validation_error) {
        (None, _) => span.muted { "never" },
        (Some(at), None) => span.status-completed title=(at) { "ok" },
        (Some(at), Some(_)) => span.status-failed title=(at) { "failed" },
    } }
}

/// `GET /ui/storages/{id}`: its settings (secrets by name only; not for the
/// ops scope, which sees no storage configs), next periodic sync, actions,
/// and its last runs as charts (duration, objects listed) and a table.
pub async fn storage(
    State(state): State<AppState>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<i64>,
) -> Page {
    let found = match storages::find(&state.db, id).await {
        Ok(Some(s)) if viewer.caller.sees(s.project_id) => s,
        Ok(_) => {
            return Err(layout::error_page(
                axum::http::StatusCode::NOT_FOUND,
                &format!("Storage {id} not found."),
            ));
        }
        Err(err) => return Err(unreadable(err)),
    };
    let filter = RunFilter {
        storage_id: Some(id),
        ..RunFilter::default()
    };
    let mut history = runs::page(&state.db, filter, HISTORY)
        .await
        .map_err(unreadable)?;
    history.reverse();
    let seconds: Vec<i64> = history.iter().map(run_seconds).collect();
    let listed: Vec<i64> = history.iter().map(|r| r.listed).collect();
    let newest: Vec<sync_run::Model> = history.iter().rev().cloned().collect();
    let settings = serde_json::to_string_pretty(&labelsync::storage::spec::to_json(&found))
        .unwrap_or_default();
    let body = html! {
        dl.facts {
            dt { "Project" } dd { (found.project_id) }
            dt { "Backend" } dd { (found.backend) " (" (found.role) ")" }
            dt { "Every" } dd { (found.sync_interval_seconds.map_or_else(|| "manual".to_owned(), |n| format!("{n} s"))) }
            dt { "Next sync" } dd { (opt(found.next_sync_at)) }
            dt { "Last validation" } dd data-validation {
                (validation(&found)) @if let Some(at) = found.validated_at { " " (at) }
                @if let Some(error) = &found.validation_error { div.wrap { (error) } }
            }
        }
        @if viewer.may(Need::Act) { div.actions { (storage_actions(&found)) } }
        @if viewer.may(Need::Read) {
            h2 { "Settings" }
            pre.settings tabindex="0" aria-label="Settings" { (settings) }
        }
        h2 { "Last " (history.len()) " runs, oldest first" }
        (charts::bars("Duration", "seconds per run", &seconds))
        (charts::bars("Objects listed", "objects listed per run", &listed))
        (runs_table(&newest))
    };
    Ok(layout::page(&format!("Storage {id}"), &viewer, body))
}

/// Runs a storage page charts.
const HISTORY: u64 = 50;

/// How long a run took (to now while it runs; 0 before it starts).
fn run_seconds(run: &sync_run::Model) -> i64 {
    match run.started_at {
        Some(started) => (run.finished_at.unwrap_or_else(labelsync::clock::now) - started)
            .num_seconds()
            .max(0),
        None => 0,
    }
}

fn storage_actions(s: &storage::Model) -> Markup {
    html! {
        button data-action={ "/api/v1/storages/" (s.id) "/sync" } data-then="run"
            aria-label={ "Sync now: storage " (s.id) } { "Sync now" }
        " "
        button data-action={ "/api/v1/storages/" (s.id) "/validate" } data-done="The storage answered as expected."
            aria-label={ "Validate: storage " (s.id) } { "Validate" }
        @if s.sync_interval_seconds.is_some() {
            " "
            @if s.schedule_paused_at.is_some() {
                button data-action={ "/api/v1/storages/" (s.id) "/resume" } data-done="Periodic syncs resumed."
                    aria-label={ "Resume schedule: storage " (s.id) } { "Resume schedule" }
            } @else {
                button data-action={ "/api/v1/storages/" (s.id) "/pause" } data-done="Periodic syncs paused."
                    data-confirm="Pause this storage's periodic syncs?"
                    aria-label={ "Pause schedule: storage " (s.id) } { "Pause schedule" }
            }
        }
    }
}
