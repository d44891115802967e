//! The console's chart of the last hour, drawn on the server as inline SVG
//! (no script, no build step, nothing fetched: it works offline and in any
//! browser): transfers applied and events published per second by this
//! process, and the backlog (pending transfers and unpublished events, for
//! every replica), over [`SPAN`] with now at the right.

use maud::{html, Markup};

use super::history::{Point, SPAN};

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 150.0;
/// Room for the axis labels.
const LEFT: f64 = 56.0;
const BOTTOM: f64 = 20.0;
const TOP: f64 = 10.0;

/// A series: its name, colour, and values (None: a gap).
struct Series<'a> {
    name: &'a str,
    class: &'a str,
    colour: &'a str,
    values: Vec<(f64, Option<f64>)>,
}

/// Both panels.
pub fn chart(points: &[Point]) -> Markup {
    let rates = [
        Series {
            name: "applied / s",
            class: "applied",
            colour: "#1f6feb",
            values: points.iter().map(|p| (p.ago_s, Some(p.applied_per_s))).collect(),
        },
        Series {
            name: "published / s",
            class: "published",
            colour: "#2da44e",
            values: points.iter().map(|p| (p.ago_s, Some(p.published_per_s))).collect(),
        },
    ];
    let backlog = [Series {
        name: "backlog (pending transfers + unpublished events)",
        class: "backlog",
        colour: "#d4760a",
        values: points.iter().map(|p| (p.ago_s, p.backlog.map(|b| b as f64))).collect(),
    }];
    html! {
        div #chart {
            @if points.is_empty() {
                p.note { "The chart fills in as samples are taken (every 10 s)." }
            }
            (panel("rates", "Applied and published per second (this process)", &rates))
            (panel("backlog", "Backlog (every replica)", &backlog))
        }
    }
}

fn panel(id: &str, title: &str, series: &[Series<'_>]) -> Markup {
    let top = series.iter().flat_map(|s| s.values.iter().filter_map(|(_, v)| *v)).fold(0.0, f64::max);
    let top = nice_ceiling(top);
    let plot_w = WIDTH - LEFT - 8.0;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |ago: f64| LEFT + plot_w * (1.0 - (ago / SPAN.as_secs_f64()).clamp(0.0, 1.0));
    let y = |v: f64| TOP + plot_h * (1.0 - (v / top).clamp(0.0, 1.0));
    html! {
        figure.chart {
            figcaption { (title) }
            svg #(id) xmlns="http://www.w3.org/2000/svg" width=(WIDTH) height=(HEIGHT)
                viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img" aria-label=(title) {
                title { (title) }
                // Axes and grid: quarters of the hour, zero and the top.
                @for q in 0..=4 {
                    @let gx = x(SPAN.as_secs_f64() * f64::from(4 - q) / 4.0);
                    line x1=(gx) y1=(TOP) x2=(gx) y2=(TOP + plot_h) stroke="#e5e5e5" {}
                    @let anchor = match q { 0 => "start", 4 => "end", _ => "middle" };
                    text x=(gx) y=(HEIGHT - 5.0) text-anchor=(anchor) font-size="11" fill="#555" {
                        @if q == 4 { "now" } @else { (format!("−{} min", 15 * (4 - q))) }
                    }
                }
                line x1=(LEFT) y1=(TOP + plot_h) x2=(LEFT + plot_w) y2=(TOP + plot_h) stroke="#999" {}
                line x1=(LEFT) y1=(TOP) x2=(LEFT + plot_w) y2=(TOP) stroke="#e5e5e5" {}
                text x=(LEFT - 6.0) y=(TOP + plot_h) text-anchor="end" font-size="11" fill="#555" { "0" }
                text.top x=(LEFT - 6.0) y=(TOP + 9.0) text-anchor="end" font-size="11" fill="#555" { (label(top)) }
                @for s in series {
                    @for segment in segments(&s.values) {
                        polyline class=(s.class) fill="none" stroke=(s.colour) stroke-width="1.5"
                            points=(segment.iter().map(|(a, v)| format!("{:.1},{:.1}", x(*a), y(*v))).collect::<Vec<_>>().join(" ")) {}
                    }
                }
            }
            div.legend {
                @for s in series {
                    span style=(format!("color:{}", s.colour)) { "■ " }
                    (s.name) " "
                    @if let Some(v) = s.values.last().and_then(|(_, v)| *v) {
                        "(now " b { (label(v)) } ") "
                    }
                }
            }
        }
    }
}

/// Runs of known values (a gap where the database did not answer); a lone
/// point is drawn as a short flat line so it shows.
fn segments(values: &[(f64, Option<f64>)]) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut run = Vec::new();
    for (ago, v) in values {
        match v {
            Some(v) => run.push((*ago, *v)),
            None if !run.is_empty() => out.push(std::mem::take(&mut run)),
            None => {}
        }
    }
    if !run.is_empty() {
        out.push(run);
    }
    for run in &mut out {
        if run.len() == 1 {
            let (ago, v) = run[0];
            run.push(((ago - 10.0).max(0.0), v));
        }
    }
    out
}

/// The smallest of 1, 2, 5 × 10^n at or above `v` (at least 1).
fn nice_ceiling(v: f64) -> f64 {
    if !v.is_finite() || v <= 1.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|c| *c >= v).unwrap_or(10.0 * magnitude)
}

/// A value as the axis and legend show it.
fn label(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_are_round_and_gaps_break_lines() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(170.0), 200.0);
        assert_eq!(nice_ceiling(1_000.0), 1_000.0);
        let values = [(30.0, Some(1.0)), (20.0, None), (10.0, Some(2.0)), (0.0, Some(3.0))];
        let runs = segments(&values);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0], [(30.0, 1.0), (20.0, 1.0)], "a lone point becomes a short line");
        assert_eq!(runs[1], [(10.0, 2.0), (0.0, 3.0)]);
    }

    #[test]
    fn the_chart_is_svg_with_a_line_per_series() {
        let points: Vec<Point> = (0..30)
            .map(|i| Point {
                ago_s: 3_000.0 - 100.0 * f64::from(i),
                applied_per_s: f64::from(i),
                published_per_s: f64::from(i) / 2.0,
                backlog: Some(i64::from(100 - i)),
            })
            .collect();
        let html = chart(&points).into_string();
        for needle in [
            "<svg id=\"rates\"",
            "<svg id=\"backlog\"",
            "class=\"applied\"",
            "class=\"published\"",
            "class=\"backlog\"",
            "now",
        ] {
            assert!(html.contains(needle), "{needle}: {html}");
        }
        assert!(html.contains(">50<"), "the rate axis tops at 50 (29 per second at most): {html}");
        assert!(html.contains("(now <b>29</b>)"), "{html}");
    }
}
