//! A live run's rate and estimated time left, for its console page.
//!
//! A run does not know its size in advance (it lists as it goes), so the
//! estimate takes the size from the storage's history: a full import is
//! expected to list as many objects as the storage's previous completed
//! full import listed, a full export to handle as many annotations as the
//! previous completed full export did, a retry to read the objects its
//! run failed on. Without such a run there is a rate and no ETA; once a run
//! passes its expected size, the ETA says so rather than going negative.
//! The page's script recomputes both from each live counter update with the
//! same rules (`data-work`: the counters summed, `data-total`, `data-unit`).
use chrono::{DateTime, Utc};
use labelsync::db::{entities::sync_run, runs::Counters};
use maud::{Markup, html};

/// The counter that measures how far a run of `kind` is: objects listed for
/// imports, annotations handled (exported, unchanged or failed) for
/// exports. The script sums the same counters (`data-work`).
pub fn work_counters(kind: &str) -> &'static [&'static str] {
    match kind {
        "export" => &["exported", "unchanged", "failed"],
        _ => &["listed"],
    }
}

/// How much of `counters` is done by that measure.
fn done(kind: &str, counters: &Counters) -> i64 {
    work_counters(kind)
        .iter()
        .map(|name| match *name {
            "exported" => counters.exported,
            "unchanged" => counters.unchanged,
            "failed" => counters.failed,
            _ => counters.listed,
        })
        .sum()
}

/// The size a run is expected to reach: see the module's rules. `previous`
/// is the storage's newest completed run of the same kind and scope before
/// it; `retried` the run a retry reads the failed objects of.
pub fn expected_total(
    run: &sync_run::Model,
    previous: Option<&sync_run::Model>,
    retried: Option<&sync_run::Model>,
) -> Option<i64> {
    match run.scope.as_str() {
        "retry" => retried.map(|r| r.failed),
        "full" => previous.map(|p| done(&p.kind, &Counters::of(p))),
        _ => None,
    }
    .filter(|total| *total > 0)
}

/// Rate (per second since the run started) and seconds left.
#[derive(Debug, PartialEq)]
pub struct Estimate {
    pub done: i64,
    pub rate: Option<f64>,
    /// `Some(0)` once the run has done its expected size.
    pub eta_seconds: Option<i64>,
}

pub fn estimate(run: &sync_run::Model, total: Option<i64>, now: DateTime<Utc>) -> Estimate {
    let done = done(&run.kind, &Counters::of(run));
    let elapsed = run
        .started_at
        .map(|started| (now - started).num_milliseconds() as f64 / 1000.0);
    let rate = elapsed.filter(|s| *s > 0.0).map(|s| done as f64 / s);
    let eta_seconds = match (total, rate) {
        (Some(total), Some(rate)) if rate > 0.0 => {
            Some(((total - done).max(0) as f64 / rate).ceil() as i64)
        }
        _ => None,
    };
    Estimate {
        done,
        rate,
        eta_seconds,
    }
}

/// The rate and ETA lines of a live run's page, with what the script needs
/// to keep them current.
pub fn facts(run: &sync_run::Model, total: Option<i64>) -> Markup {
    let now = labelsync::clock::now();
    let e = estimate(run, total, now);
    let unit = if run.kind == "export" {
        "annotations"
    } else {
        "objects listed"
    };
    html! {
        div.progress data-work=(work_counters(&run.kind).join(",")) data-total=[total] data-unit=(unit) {
            dl.facts {
                dt { "Rate" }
                dd data-rate { (rate_text(e.rate, unit)) }
                dt { "ETA" }
                dd data-eta { (eta_text(&e, total, unit)) }
            }
        }
    }
}

fn rate_text(rate: Option<f64>, unit: &str) -> String {
    match rate {
        Some(rate) => format!("{rate:.1} {unit} per second"),
        None => "not started".to_owned(),
    }
}

fn eta_text(e: &Estimate, total: Option<i64>, unit: &str) -> String {
    match (total, e.eta_seconds) {
        (None, _) => "unknown: no earlier run of this storage to go by".to_owned(),
        (Some(total), _) if e.done >= total => {
            format!("past the {total} {unit} of the run it is estimated from")
        }
        (Some(total), Some(secs)) => format!("about {secs} s (of {total} {unit})"),
        (Some(total), None) => format!("not started ({total} {unit} expected)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kind: &str, scope: &str, started: Option<DateTime<Utc>>) -> sync_run::Model {
        let mut r = super::super::charts::tests::ended(0, 0, labelsync::clock::now());
        r.kind = kind.into();
        r.scope = scope.into();
        r.started_at = started;
        r
    }

    #[test]
    fn the_eta_goes_by_the_previous_run_and_the_rate_so_far() {
        let now = labelsync::clock::now();
        let mut live = run("import", "full", Some(now - chrono::Duration::seconds(10)));
        live.listed = 200;
        let mut before = run("import", "full", Some(now));
        before.listed = 1_000;
        let total = expected_total(&live, Some(&before), None);
        assert_eq!(total, Some(1_000));
        let e = estimate(&live, total, now);
        assert_eq!(e.done, 200);
        assert!((e.rate.expect("started") - 20.0).abs() < 1e-9);
        assert_eq!(e.eta_seconds, Some(40), "800 left at 20 per second");
        assert!(eta_text(&e, total, "objects").starts_with("about 40 s"));

        live.listed = 1_500;
        let past = estimate(&live, total, now);
        assert_eq!(past.eta_seconds, Some(0));
        assert!(eta_text(&past, total, "objects").starts_with("past the 1000"));
    }

    #[test]
    fn without_history_or_start_there_is_no_eta() {
        let now = labelsync::clock::now();
        let queued = run("import", "full", None);
        let e = estimate(&queued, Some(10), now);
        assert_eq!((e.rate, e.eta_seconds), (None, None));
        assert_eq!(rate_text(e.rate, "objects"), "not started");
        let first = run("import", "full", Some(now));
        assert_eq!(expected_total(&first, None, None), None);
        let events = run("export", "events", Some(now));
        assert_eq!(expected_total(&events, Some(&first), None), None);
    }

    #[test]
    fn exports_count_what_they_handled_and_retries_what_failed() {
        let now = labelsync::clock::now();
        let mut before = run("export", "full", Some(now));
        (before.exported, before.unchanged, before.failed) = (5, 3, 2);
        let live = run("export", "full", Some(now));
        assert_eq!(expected_total(&live, Some(&before), None), Some(10));
        let mut failed = run("import", "full", Some(now));
        failed.failed = 7;
        let retry = run("import", "retry", Some(now));
        assert_eq!(expected_total(&retry, None, Some(&failed)), Some(7));
    }
}
