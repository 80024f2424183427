//! Results: a two-column summary table on stdout, the same figures (plus every latency
//! histogram's percentiles) as a JSON object in `--json PATH`, and a latency percentile curve
//! (x: percentile on a "nines" scale, y: milliseconds, one line per series) as an SVG in
//! `--plot PATH.svg`. Broken invariants are collected as failures; the process exits non-zero
//! when there is any. Timings are never failures.

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use std::path::Path;
use std::time::Duration;

/// A latency histogram in microseconds, 1 µs .. 10 min, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = (d.as_micros() as u64).clamp(1, 600_000_000);
    let _ = h.record(us);
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

#[derive(Default)]
pub struct Report {
    pub scenario: String,
    rows: Vec<(String, String)>,
    json: Map<String, Value>,
    hists: Vec<(String, Histogram<u64>)>,
    pub failures: Vec<String>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(scenario: &str) -> Self {
        Self {
            scenario: scenario.to_string(),
            ..Default::default()
        }
    }

    /// A figure for the table and the JSON file.
    pub fn row(&mut self, key: &str, value: impl Into<Value>) {
        let v: Value = value.into();
        let shown = match &v {
            Value::Number(n) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap_or_default()),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        self.rows.push((key.to_string(), shown));
        self.json.insert(key.to_string(), v);
    }

    /// A JSON-only value (parameters, time series).
    pub fn data(&mut self, key: &str, value: Value) {
        self.json.insert(key.to_string(), value);
    }

    /// A latency histogram: p50/p99/p999/max rows plus the series for the plot.
    pub fn latency(&mut self, label: &str, h: &Histogram<u64>) {
        if h.is_empty() {
            self.row(&format!("{label} samples"), 0);
            return;
        }
        self.row(&format!("{label} samples"), h.len());
        self.row(&format!("{label} p50 ms"), ms(h.value_at_quantile(0.5)));
        self.row(&format!("{label} p99 ms"), ms(h.value_at_quantile(0.99)));
        self.row(&format!("{label} p999 ms"), ms(h.value_at_quantile(0.999)));
        self.row(&format!("{label} max ms"), ms(h.max()));
        self.hists.push((label.to_string(), h.clone()));
    }

    pub fn fail(&mut self, what: impl Into<String>) {
        self.failures.push(what.into());
    }

    pub fn note(&mut self, what: impl Into<String>) {
        self.notes.push(what.into());
    }

    /// Prints the table, writes `--json` and `--plot`; returns whether all invariants held.
    pub fn finish(mut self, json_path: Option<&Path>, plot_path: Option<&Path>) -> Result<bool> {
        let width = self.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(10);
        println!("\n== {} ==", self.scenario);
        for (k, v) in &self.rows {
            println!("  {k:<width$}  {v}");
        }
        for n in &self.notes {
            println!("  note: {n}");
        }
        if self.failures.is_empty() {
            println!("  RESULT: ok (all invariants held)");
        } else {
            for f in &self.failures {
                println!("  FAILED: {f}");
            }
        }
        self.json.insert("scenario".into(), json!(self.scenario));
        self.json.insert("failures".into(), json!(self.failures));
        self.json.insert("notes".into(), json!(self.notes));
        let curves: Map<String, Value> = self
            .hists
            .iter()
            .map(|(label, h)| (label.clone(), json!(percentile_curve(h))))
            .collect();
        self.json
            .insert("latency_curves_ms".into(), Value::Object(curves));
        if let Some(p) = json_path {
            std::fs::write(
                p,
                serde_json::to_vec_pretty(&Value::Object(self.json.clone()))?,
            )
            .with_context(|| format!("writing {}", p.display()))?;
            println!("  json: {}", p.display());
        }
        if let Some(p) = plot_path {
            match plot(p, &self.scenario, &self.hists) {
                Ok(()) => println!("  plot: {}", p.display()),
                Err(e) => println!("  plot failed: {e:#}"),
            }
        }
        Ok(self.failures.is_empty())
    }
}

/// (nines, ms) points: nines = -log10(1 - q), so 1 = p90, 2 = p99, 3 = p99.9.
fn percentile_curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut pts = Vec::new();
    let mut nines = 0.0f64;
    while nines <= 5.0 {
        let q = 1.0 - 10f64.powf(-nines);
        pts.push((nines, ms(h.value_at_quantile(q))));
        nines += 0.05;
    }
    pts.push((5.0, ms(h.max())));
    pts
}

fn plot(path: &Path, title: &str, hists: &[(String, Histogram<u64>)]) -> Result<()> {
    use plotters::prelude::*;
    let curves: Vec<(String, Vec<(f64, f64)>)> = hists
        .iter()
        .map(|(l, h)| (l.clone(), percentile_curve(h)))
        .collect();
    let ymax = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.1))
        .fold(0.1f64, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("livegate-loadtest {title}: latency by percentile"),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..5f64, 0f64..ymax)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(6)
        .x_label_formatter(&|x| match x.round() as i64 {
            0 => "p0".into(),
            1 => "p90".into(),
            2 => "p99".into(),
            3 => "p99.9".into(),
            4 => "p99.99".into(),
            _ => "max".into(),
        })
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let colors = [&BLUE, &RED, &GREEN, &MAGENTA, &CYAN, &BLACK];
    for (i, (label, pts)) in curves.into_iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curve_is_monotonic_and_ends_at_max() {
        let mut h = histogram();
        for us in 1..=10_000u64 {
            h.record(us).unwrap();
        }
        let c = percentile_curve(&h);
        assert!(c.windows(2).all(|w| w[0].1 <= w[1].1));
        assert!((c.last().unwrap().1 - 10.0).abs() < 0.1);
    }
}
