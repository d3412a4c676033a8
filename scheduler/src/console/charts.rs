//! Bar charts drawn on the server as SVG (no script, no library): one bar
//! per time bucket, labelled for screen readers by a summary.
use maud::{Markup, html};

/// Width and height of the drawing, in SVG units (it scales to the page).
const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 110.0;

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
    use chrono::{DateTime, Duration, Utc};
    use labelsync::db::entities::sync_run;

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
