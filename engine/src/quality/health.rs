//! The quality report of a sink over a time range, from its commit log (counts, violations,
//! drift metrics and anomaly episodes ride in every entry) and its newest profile file: per
//! column the current value of each metric next to its baseline, violations per expectation,
//! and the anomaly episodes. [`to_html`] renders it as one self-contained page (inline SVG
//! charts, no script, no network).

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::error::Result;
use crate::log::commit::CommitLog;
use crate::store::TableStore;
use crate::quality::drift::median;
use crate::quality::report::{ColumnSummary, figure, spread, summarize_rows};

/// One committed epoch, as the report charts it.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// The epoch.
    pub epoch: u64,
    /// Commit time, ms since the Unix epoch.
    pub at_ms: i64,
    /// Rows written.
    pub rows: u64,
    /// Records dead-lettered.
    pub dead_lettered: u64,
    /// Rows dropped by expectations.
    pub dropped: u64,
    /// Drift metrics by `column.metric`.
    pub metrics: BTreeMap<String, f64>,
    /// Violations by expectation.
    pub violations: BTreeMap<String, u64>,
}

/// An anomaly episode: opened by one epoch, closed by a later one (or still open).
#[derive(Debug, Clone, Serialize)]
pub struct Episode {
    /// Column (`*` for volume).
    pub column: String,
    /// Metric.
    pub metric: String,
    /// Epoch and time it started.
    pub started_epoch: u64,
    /// Start time, ms.
    pub started_ms: i64,
    /// Epoch and time it ended, if it did.
    pub ended_epoch: Option<u64>,
    /// End time, ms.
    pub ended_ms: Option<i64>,
    /// The value that opened it.
    pub value: f64,
    /// The baseline median then.
    pub baseline: f64,
    /// Its score then.
    pub score: f64,
}

/// One metric of one column: now and its baseline over the report's range.
#[derive(Debug, Clone, Serialize)]
pub struct MetricNow {
    /// Column (`*` for volume).
    pub column: String,
    /// Metric.
    pub metric: String,
    /// The newest epoch's value.
    pub current: f64,
    /// Median over the range.
    pub baseline: f64,
    /// Median absolute deviation over the range.
    pub mad: f64,
}

/// An expectation's violations over the range.
#[derive(Debug, Clone, Serialize)]
pub struct ExpectationTotal {
    /// Its action.
    pub action: String,
    /// `row` or `batch`.
    pub level: String,
    /// Violations summed over the range.
    pub violations: u64,
}

/// The quality report of one sink over a range.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The sink's location.
    pub sink: String,
    /// Epochs in the range, oldest first.
    pub points: Vec<Point>,
    /// Current value and baseline per metric.
    pub metrics: Vec<MetricNow>,
    /// Violations per expectation.
    pub expectations: BTreeMap<String, ExpectationTotal>,
    /// Anomaly episodes that overlap the range.
    pub anomalies: Vec<Episode>,
    /// The newest profile in the range, per column (both sides).
    pub latest: Vec<ColumnSummary>,
    /// When the range starts before the oldest commit the log still holds (older entries were
    /// expired by `vacuum --log-retention`): that commit's time (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub past_retention_before: Option<String>,
}

/// Builds the report of `table` for commits in `[since_ms, until_ms)` (either open).
pub async fn build(table: &TableStore, since_ms: Option<i64>, until_ms: Option<i64>) -> Result<Report> {
    let log = CommitLog::new(table.clone(), "sluice-quality-reader");
    let mut points = Vec::new();
    let mut expectations: BTreeMap<String, ExpectationTotal> = BTreeMap::new();
    let mut episodes: Vec<Episode> = Vec::new();
    let mut latest_profile = None;
    let entries = log.entries().await?;
    // Entries before the oldest left were expired by the log retention: a range reaching
    // before it is reported as such.
    let past_retention_before = entries
        .first()
        .filter(|e| e.epoch > 1)
        .filter(|e| {
            let at_ms = chrono::DateTime::parse_from_rfc3339(&e.committed_at).map_or(0, |t| t.timestamp_millis());
            since_ms.is_none_or(|since| since < at_ms)
        })
        .map(|e| e.committed_at.clone());
    for e in entries {
        let at_ms = chrono::DateTime::parse_from_rfc3339(&e.committed_at).map_or(0, |t| t.timestamp_millis());
        let q = e.quality.clone().unwrap_or_default();
        // Episodes are followed from their start, even one that started before the range.
        for a in &q.anomalies {
            if a.event == "start" {
                episodes.push(Episode {
                    column: a.column.clone(),
                    metric: a.metric.clone(),
                    started_epoch: e.epoch,
                    started_ms: at_ms,
                    ended_epoch: None,
                    ended_ms: None,
                    value: a.value,
                    baseline: a.baseline,
                    score: a.score,
                });
            } else if let Some(ep) = episodes
                .iter_mut()
                .rev()
                .find(|ep| ep.ended_epoch.is_none() && ep.column == a.column && ep.metric == a.metric)
            {
                ep.ended_epoch = Some(e.epoch);
                ep.ended_ms = Some(at_ms);
            }
        }
        if since_ms.is_some_and(|s| at_ms < s) || until_ms.is_some_and(|u| at_ms >= u) {
            continue;
        }
        for (name, v) in &q.expectations {
            let t = expectations.entry(name.clone()).or_insert_with(|| ExpectationTotal {
                action: v.action.clone(),
                level: v.level.clone(),
                violations: 0,
            });
            t.violations += v.violations;
        }
        if let Some(p) = &q.profile {
            latest_profile = Some(p.clone());
        }
        points.push(Point {
            epoch: e.epoch,
            at_ms,
            rows: e.counts.output,
            dead_lettered: e.counts.dead_lettered,
            dropped: e.counts.dropped,
            metrics: q.metrics,
            violations: q.expectations.into_iter().map(|(k, v)| (k, v.violations)).collect(),
        });
    }
    let (first, last) = (points.first().map(|p| p.at_ms), points.last().map(|p| p.at_ms));
    episodes.retain(|ep| {
        let (Some(first), Some(last)) = (first, last) else { return false };
        ep.started_ms <= last && ep.ended_ms.is_none_or(|end| end >= first)
    });
    let mut metrics = Vec::new();
    if let Some(newest) = points.last() {
        for (key, &current) in &newest.metrics {
            let mut vals: Vec<f64> = points.iter().filter_map(|p| p.metrics.get(key).copied()).collect();
            let m = median(&mut vals);
            let mut dev: Vec<f64> = vals.iter().map(|v| (v - m).abs()).collect();
            let (column, metric) = key.rsplit_once('.').unwrap_or(("*", key));
            metrics.push(MetricNow {
                column: column.to_string(),
                metric: metric.to_string(),
                current,
                baseline: m,
                mad: median(&mut dev),
            });
        }
    }
    let latest = match latest_profile {
        Some(path) => summarize_rows(table, &path).await?,
        None => Vec::new(),
    };
    Ok(Report {
        sink: table.location.clone(),
        points,
        metrics,
        expectations,
        anomalies: episodes,
        latest,
        past_retention_before,
    })
}

/// The report as text, for a terminal.
pub fn to_text(r: &Report) -> String {
    let mut out = String::new();
    let rows: u64 = r.points.iter().map(|p| p.rows).sum();
    let dead: u64 = r.points.iter().map(|p| p.dead_lettered).sum();
    let dropped: u64 = r.points.iter().map(|p| p.dropped).sum();
    let when = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339()).unwrap_or_default();
    let _ = writeln!(
        out,
        "{}: {} epochs{}, {rows} rows written, {dead} dead-lettered, {dropped} dropped",
        r.sink,
        r.points.len(),
        match (r.points.first(), r.points.last()) {
            (Some(a), Some(b)) => format!(" from {} to {}", when(a.at_ms), when(b.at_ms)),
            _ => String::new(),
        }
    );
    if let Some(t) = &r.past_retention_before {
        let _ = writeln!(
            out,
            "note: commits before {t} are past the log retention (expired by `sluice vacuum --log-retention`): the range starts there"
        );
    }
    let _ = writeln!(out, "\nmetric (sink)                    current        baseline (median ± MAD)");
    for m in &r.metrics {
        let ty = metric_type(r, &m.column, &m.metric);
        let _ = writeln!(
            out,
            "{:<32} {:<14} {} ± {}",
            format!("{}.{}", m.column, m.metric),
            figure(ty, m.current),
            figure(ty, m.baseline),
            spread(ty, m.mad)
        );
    }
    let _ = writeln!(out, "\nexpectation                      action       level  violations");
    if r.expectations.is_empty() {
        let _ = writeln!(out, "(none)");
    }
    for (name, t) in &r.expectations {
        let _ = writeln!(out, "{name:<32} {:<12} {:<6} {}", t.action, t.level, t.violations);
    }
    let _ = writeln!(out, "\nanomalies");
    if r.anomalies.is_empty() {
        let _ = writeln!(out, "(none)");
    }
    for a in &r.anomalies {
        let _ = writeln!(
            out,
            "{}.{}: {} from epoch {} ({}){}; value {} against baseline {} (score {:.1})",
            a.column,
            a.metric,
            if a.ended_epoch.is_some() { "ended" } else { "OPEN" },
            a.started_epoch,
            when(a.started_ms),
            a.ended_epoch.map(|e| format!(" to epoch {e}")).unwrap_or_default(),
            figure(metric_type(r, &a.column, &a.metric), a.value),
            figure(metric_type(r, &a.column, &a.metric), a.baseline),
            a.score
        );
    }
    out
}

/// The type in which a sink metric's value reads: the column's for a mean or quantile (a
/// timestamp column's are instants), none for counts and fractions.
fn metric_type<'a>(r: &'a Report, column: &str, metric: &str) -> &'a str {
    match metric {
        "mean" | "p50" | "p99" => r
            .latest
            .iter()
            .find(|c| c.side == "sink" && c.column == column)
            .map_or("", |c| c.data_type.as_str()),
        _ => "",
    }
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const W: f64 = 560.0;
const H: f64 = 170.0;
const PAD_L: f64 = 64.0;
const PAD_B: f64 = 24.0;
const PAD_T: f64 = 22.0;
const COLORS: [&str; 6] = ["#2563eb", "#16a34a", "#ea580c", "#9333ea", "#0891b2", "#be123c"];

/// One line chart as inline SVG: `series` of (x ms, y) points, an optional shaded band
/// (x, low, high), and anomaly spans (x0, x1) shaded red.
fn chart(title: &str, series: &[(String, Vec<(i64, f64)>)], band: &[(i64, f64, f64)], spans: &[(i64, i64)]) -> String {
    let xs: Vec<i64> = series.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)).chain(band.iter().map(|b| b.0)).collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .chain(band.iter().flat_map(|b| [b.1, b.2]))
        .filter(|v| v.is_finite())
        .collect();
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg class="chart" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{t}"><text x="4" y="14" class="title">{t}</text>"##,
        t = esc(title)
    );
    let (Some(&x0), Some(&x1)) = (xs.iter().min(), xs.iter().max()) else {
        svg.push_str(r##"<text x="200" y="90" class="empty">no data</text></svg>"##);
        return svg;
    };
    let (mut y0, mut y1) = ys.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    if !y0.is_finite() {
        (y0, y1) = (0.0, 1.0);
    }
    if y1 - y0 < 1e-12 {
        let pad = (y0.abs() * 0.1).max(1.0);
        // Counts and fractions never go below zero: neither does their axis.
        (y0, y1) = (if y0 >= 0.0 { (y0 - pad).max(0.0) } else { y0 - pad }, y1 + pad);
    }
    let sx = |x: i64| PAD_L + (W - PAD_L - 8.0) * if x1 > x0 { (x - x0) as f64 / (x1 - x0) as f64 } else { 0.5 };
    let sy = |y: f64| PAD_T + (H - PAD_T - PAD_B) * (1.0 - (y - y0) / (y1 - y0));
    for &(a, b) in spans {
        let (a, b) = (sx(a.max(x0)), sx(b.min(x1)));
        let _ = write!(
            svg,
            r##"<rect class="anomaly" x="{:.1}" y="{PAD_T}" width="{:.1}" height="{:.1}"/>"##,
            a - 3.0,
            (b - a).max(0.0) + 6.0,
            H - PAD_T - PAD_B
        );
    }
    for i in 0..=3 {
        let y = y0 + (y1 - y0) * i as f64 / 3.0;
        let _ = write!(
            svg,
            r##"<line class="grid" x1="{PAD_L}" x2="{}" y1="{:.1}" y2="{:.1}"/><text class="tick" x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - 8.0,
            sy(y),
            sy(y),
            PAD_L - 4.0,
            sy(y) + 4.0,
            esc(&figure("", y))
        );
    }
    let when = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).map(|t| t.format("%m-%d %H:%M:%S").to_string()).unwrap_or_default();
    let _ = write!(
        svg,
        r##"<text class="tick" x="{PAD_L}" y="{}">{}</text><text class="tick" x="{}" y="{}" text-anchor="end">{}</text>"##,
        H - 6.0,
        when(x0),
        W - 8.0,
        H - 6.0,
        when(x1)
    );
    if !band.is_empty() {
        let mut d = String::new();
        for (i, (x, lo, _)) in band.iter().enumerate() {
            let _ = write!(d, "{}{:.1},{:.1} ", if i == 0 { "M" } else { "L" }, sx(*x), sy(*lo));
        }
        for (x, _, hi) in band.iter().rev() {
            let _ = write!(d, "L{:.1},{:.1} ", sx(*x), sy(*hi));
        }
        let _ = write!(svg, r##"<path class="band" d="{d}Z"/>"##);
    }
    for (k, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let d: String = pts
            .iter()
            .filter(|p| p.1.is_finite())
            .enumerate()
            .map(|(i, (x, y))| format!("{}{:.1},{:.1} ", if i == 0 { "M" } else { "L" }, sx(*x), sy(*y)))
            .collect();
        let _ = write!(svg, r##"<path class="line" stroke="{color}" d="{d}"/>"##);
        if pts.len() == 1 {
            let _ = write!(svg, r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"##, sx(pts[0].0), sy(pts[0].1));
        }
        let _ = write!(
            svg,
            r##"<text class="legend" x="{}" y="14" fill="{color}">{}</text>"##,
            W - 8.0 - 110.0 * (series.len() - 1 - k) as f64,
            esc(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The report as one self-contained HTML page.
pub fn to_html(r: &Report) -> String {
    let series = |key: &str| -> Vec<(i64, f64)> {
        r.points.iter().filter_map(|p| p.metrics.get(key).map(|v| (p.at_ms, *v))).collect()
    };
    let spans = |column: &str, metric: Option<&str>| -> Vec<(i64, i64)> {
        let end = r.points.last().map_or(0, |p| p.at_ms);
        r.anomalies
            .iter()
            .filter(|a| a.column == column && metric.is_none_or(|m| a.metric == m))
            .map(|a| (a.started_ms, a.ended_ms.unwrap_or(end)))
            .collect()
    };
    let mut html = String::new();
    html.push_str(
        r##"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Sluice quality report</title><style>
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#111827;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
.sub{color:#6b7280;margin-bottom:12px}.grid2{display:flex;flex-wrap:wrap;gap:12px}
.chart{border:1px solid #e5e7eb;border-radius:6px;background:#fafafa}
.chart .title{font-size:12px;font-weight:600;fill:#111827}.chart .tick{font-size:10px;fill:#6b7280}
.chart .legend{font-size:10px;text-anchor:end}.chart .grid{stroke:#e5e7eb;stroke-width:1}
.chart .line{fill:none;stroke-width:1.8}.chart .band{fill:#93c5fd;opacity:.45}
.chart .anomaly{fill:#fecaca;opacity:.8}.chart .empty{font-size:12px;fill:#9ca3af}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #e5e7eb;padding:4px 8px;text-align:left}
th{background:#f3f4f6}.open{color:#b91c1c;font-weight:600}.ok{color:#15803d}
.kpi{display:inline-block;margin-right:24px}.kpi b{font-size:20px;display:block}
</style></head><body>"##,
    );
    let rows: u64 = r.points.iter().map(|p| p.rows).sum();
    let dead: u64 = r.points.iter().map(|p| p.dead_lettered).sum();
    let dropped: u64 = r.points.iter().map(|p| p.dropped).sum();
    let open = r.anomalies.iter().filter(|a| a.ended_epoch.is_none()).count();
    let when = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339()).unwrap_or_default();
    let _ = write!(
        html,
        r##"<h1>Quality report</h1><div class="sub">{} · {} epochs{}</div>
<div><span class="kpi"><b>{rows}</b>rows written</span><span class="kpi"><b>{dead}</b>dead-lettered</span><span class="kpi"><b>{dropped}</b>dropped</span><span class="kpi"><b class="{}">{open}</b>open anomalies</span><span class="kpi"><b>{}</b>expectations</span></div>"##,
        esc(&r.sink),
        r.points.len(),
        match (r.points.first(), r.points.last()) {
            (Some(a), Some(b)) => format!(" · {} → {}", esc(&when(a.at_ms)), esc(&when(b.at_ms))),
            _ => String::new(),
        },
        if open > 0 { "open" } else { "ok" },
        r.expectations.len()
    );
    html.push_str(r##"<h2>Volume</h2><div class="grid2">"##);
    let volume: Vec<(i64, f64)> = r.points.iter().map(|p| (p.at_ms, p.rows as f64)).collect();
    html.push_str(&chart("rows per batch", &[("rows".into(), volume)], &[], &spans("*", Some("volume"))));
    let dl: Vec<(i64, f64)> = r.points.iter().map(|p| (p.at_ms, (p.dead_lettered + p.dropped) as f64)).collect();
    html.push_str(&chart("dead-lettered + dropped per batch", &[("records".into(), dl)], &[], &[]));
    html.push_str("</div>");
    if !r.expectations.is_empty() {
        html.push_str(r##"<h2>Expectations</h2><div class="grid2">"##);
        let lines: Vec<(String, Vec<(i64, f64)>)> = r
            .expectations
            .keys()
            .map(|name| {
                let pts = r
                    .points
                    .iter()
                    .map(|p| (p.at_ms, p.violations.get(name).copied().unwrap_or(0) as f64))
                    .collect();
                (name.clone(), pts)
            })
            .collect();
        html.push_str(&chart("violations per batch", &lines, &[], &[]));
        html.push_str("</div><table><tr><th>expectation</th><th>action</th><th>level</th><th>violations</th></tr>");
        for (name, t) in &r.expectations {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(name),
                esc(&t.action),
                esc(&t.level),
                t.violations
            );
        }
        html.push_str("</table>");
    }
    let mut columns: Vec<&str> = r.metrics.iter().map(|m| m.column.as_str()).filter(|c| *c != "*").collect();
    columns.dedup();
    for column in columns {
        let _ = write!(html, r##"<h2>Column <code>{}</code></h2><div class="grid2">"##, esc(column));
        html.push_str(&chart(
            "null fraction",
            &[("nulls".into(), series(&format!("{column}.null_fraction")))],
            &[],
            &spans(column, Some("null_fraction")),
        ));
        let mean = series(&format!("{column}.mean"));
        if !mean.is_empty() {
            let p50 = series(&format!("{column}.p50"));
            let p99 = series(&format!("{column}.p99"));
            let band: Vec<(i64, f64, f64)> = p50
                .iter()
                .zip(&p99)
                .filter(|(a, b)| a.0 == b.0)
                .map(|(a, b)| (a.0, a.1, b.1))
                .collect();
            let numeric_spans: Vec<(i64, i64)> = ["mean", "p50", "p99"].iter().flat_map(|m| spans(column, Some(m))).collect();
            html.push_str(&chart(
                "mean (line), p50–p99 (band)",
                &[("mean".into(), mean), ("p50".into(), p50)],
                &band,
                &numeric_spans,
            ));
        }
        html.push_str(&chart(
            "distinct values (approx.)",
            &[("distinct".into(), series(&format!("{column}.distinct")))],
            &[],
            &spans(column, Some("distinct")),
        ));
        html.push_str("</div>");
    }
    html.push_str("<h2>Anomalies</h2>");
    if r.anomalies.is_empty() {
        html.push_str(r##"<p class="ok">No anomaly in this range.</p>"##);
    } else {
        html.push_str("<table><tr><th>column</th><th>metric</th><th>state</th><th>started</th><th>ended</th><th>value</th><th>baseline</th><th>score</th></tr>");
        for a in &r.anomalies {
            let _ = write!(
                html,
                r##"<tr><td>{}</td><td>{}</td><td class="{}">{}</td><td>epoch {} · {}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td></tr>"##,
                esc(&a.column),
                esc(&a.metric),
                if a.ended_epoch.is_some() { "ok" } else { "open" },
                if a.ended_epoch.is_some() { "ended" } else { "open" },
                a.started_epoch,
                esc(&when(a.started_ms)),
                a.ended_epoch.map(|e| format!("epoch {e} · {}", esc(&when(a.ended_ms.unwrap_or(0))))).unwrap_or_default(),
                esc(&figure(metric_type(r, &a.column, &a.metric), a.value)),
                esc(&figure(metric_type(r, &a.column, &a.metric), a.baseline)),
                a.score
            );
        }
        html.push_str("</table>");
    }
    html.push_str("<h2>Latest profile</h2><table><tr><th>side</th><th>column</th><th>type</th><th>rows</th><th>null %</th><th>distinct</th><th>min</th><th>max</th><th>mean</th><th>p50</th><th>p99</th><th>top values</th></tr>");
    for c in &r.latest {
        let opt = |v: Option<f64>| v.map(|v| figure(&c.data_type, v)).unwrap_or_default();
        let top: Vec<String> = c.top_values.iter().take(5).map(|(v, n)| format!("{} ({n})", esc(v))).collect();
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.side),
            esc(&c.column),
            esc(&c.data_type),
            c.rows,
            100.0 * c.null_fraction,
            c.distinct,
            esc(c.min.as_deref().unwrap_or("")),
            esc(c.max.as_deref().unwrap_or("")),
            opt(c.mean),
            opt(c.p50),
            opt(c.p99),
            top.join(", ")
        );
    }
    html.push_str("</table></body></html>\n");
    html
}
