//! Bar charts drawn on the server as SVG (no script, no library): one bar
//! per time bucket, labelled for screen readers by a summary.
use chrono::{DateTime, Duration, Utc};
use labelsync::db::entities::sync_run;
use maud::{Markup, html};

/// Width and height of the drawing, in SVG units (it scales to the page).
const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 110.0;

/// Sums `value` of the runs that ended in each of `buckets` spans of
/// `span` ending now (oldest first; the last span ends now).
pub fn per_bucket(
    runs: &[sync_run::Model],
    now: DateTime<Utc>,
    span: Duration,
    buckets: usize,
    value: impl Fn(&sync_run::Model) -> i64,
) -> Vec<i64> {
    let mut sums = vec![0i64; buckets];
    let start = now - span * buckets as i32;
    let span_ms = span.num_milliseconds().max(1);
    for run in runs {
        // Bucket i holds the ends in (start + i span, start + (i + 1) span].
        let Some(ended) = run.finished_at.filter(|at| *at > start && *at <= now) else {
            continue;
        };
        let index = ((ended - start).num_milliseconds() - 1).max(0) / span_ms;
        if let Some(sum) = sums.get_mut((index as usize).min(buckets - 1)) {
            *sum += value(run);
        }
    }
    sums
}

/// A titled bar chart of `values` (oldest first), `what` naming one bar's
/// quantity ("tasks created per minute").
pub fn bars(title: &str, what: &str, values: &[i64]) -> Markup {
    let peak = values.iter().copied().max().unwrap_or(0).max(1);
    let total: i64 = values.iter().sum();
    let step = WIDTH / values.len().max(1) as f64;
    let summary = format!(
        "{what}: {total} in all, at most {} in one bar",
        values.iter().max().unwrap_or(&0)
    );
    html! {
        figure.chart {
            figcaption { (title) " " span.muted { "(" (total) " in all)" } }
            svg viewBox={ "0 0 " (WIDTH) " " (HEIGHT) } role="img" aria-label=(summary) preserveAspectRatio="none" {
                @for (i, value) in values.iter().enumerate() {
                    @let height = HEIGHT * (*value as f64) / (peak as f64);
                    rect.bar x=(format!("{:.1}", i as f64 * step + 0.5)) y=(format!("{:.1}", HEIGHT - height))
                        width=(format!("{:.1}", (step - 1.0).max(0.5))) height=(format!("{height:.1}")) {}
                }
                line.axis x1="0" y1=(HEIGHT) x2=(WIDTH) y2=(HEIGHT) {}
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A run of 1 project, storage 1, that ended `minutes_ago` (also used by
    /// the other console modules' tests).
    pub(in crate::console) fn ended(
        minutes_ago: i64,
        created: i64,
        now: DateTime<Utc>,
    ) -> sync_run::Model {
        let at = now - Duration::minutes(minutes_ago);
        sync_run::Model {
            id: format!("r{minutes_ago}"),
            storage_id: 1,
            kind: "import".into(),
            status: "completed".into(),
            listed: created,
            matched: created,
            created,
            existed: 0,
            failed: 0,
            exported: 0,
            unchanged: 0,
            deleted: 0,
            bytes: 0,
            missing: 0,
            changed: 0,
            kept: 0,
            listing_incomplete: false,
            cursor: None,
            attempts: 1,
            error: None,
            queued_at: at,
            started_at: Some(at),
            heartbeat_at: Some(at),
            finished_at: Some(at),
            lease_owner: None,
            lease_at: None,
            scope: "full".into(),
            project_id: 1,
            admitted_at: Some(at),
            retry_of: None,
            trace_id: None,
        }
    }

    #[test]
    fn runs_land_in_the_bucket_of_their_end() {
        let now = Utc::now();
        let runs = [
            ended(0, 5, now),
            ended(1, 7, now),
            ended(59, 3, now),
            ended(61, 100, now),
        ];
        let sums = per_bucket(&runs, now, Duration::minutes(1), 60, |r| r.created);
        assert_eq!(sums.len(), 60);
        assert_eq!(
            sums.iter().sum::<i64>(),
            15,
            "the one older than the hour is left out"
        );
        assert_eq!(sums[59], 5);
        assert_eq!(sums[58], 7);
        assert_eq!(sums[0], 3);
    }

    #[test]
    fn a_chart_has_one_bar_per_value_and_says_what_it_shows() {
        let html = bars("Tasks created", "tasks created per minute", &[0, 4, 2]).into_string();
        assert_eq!(html.matches("<rect").count(), 3);
        assert!(
            html.contains(
                r#"aria-label="tasks created per minute: 6 in all, at most 4 in one bar""#
            ),
            "{html}"
        );
    }
}
