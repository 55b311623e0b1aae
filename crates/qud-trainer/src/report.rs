//! `report.html`: a run's loss, learning-rate and accuracy curves and its final ROC plots, one
//! self-contained file (inline SVG) that any browser opens offline.

use crate::metrics::{read_rows, EvalRow, StepRow};
use qud_eval::{line_chart_svg, roc_svg, SetScore};
use std::collections::BTreeMap;
use std::path::Path;

/// The report of the run in `out` (its `metrics.jsonl`, `eval.jsonl` and `config.toml`) with ROC
/// plots of `final_eval`.
pub fn render(out: &Path, title: &str, final_eval: &[SetScore]) -> String {
    let metrics: Vec<StepRow> = read_rows(&out.join("metrics.jsonl"));
    let evals: Vec<EvalRow> = read_rows(&out.join("eval.jsonl"));
    let mut accuracy: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for e in &evals {
        accuracy
            .entry(e.set.clone())
            .or_default()
            .push((e.step as f64, 100.0 * e.accuracy));
    }
    let curve = |y: fn(&StepRow) -> Option<f64>| -> Vec<(f64, f64)> {
        metrics
            .iter()
            .filter_map(|r| Some((r.step as f64, y(r)?)))
            .collect()
    };
    let mut html = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{0}</title>\n<style>body{{font-family:sans-serif;max-width:1340px;margin:auto}}svg{{margin:4px}}td,th{{padding:2px 10px;text-align:right}}</style></head><body>\n<h1>{0}</h1>\n",
        escape(title)
    );
    if !final_eval.is_empty() {
        html += "<h2>Final evaluation (10 folds, flip TTA)</h2>\n<table><tr><th>set</th><th>pairs</th><th>accuracy %</th><th>std</th><th>VAL@FAR1e-3</th><th>XNorm</th></tr>\n";
        for s in final_eval {
            html += &format!(
                "<tr><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.4}</td><td>{:.3}</td></tr>\n",
                escape(&s.name),
                s.pairs,
                100.0 * s.scores.accuracy,
                100.0 * s.scores.accuracy_std,
                s.scores.val,
                s.xnorm
            );
        }
        html += "</table>\n";
    }
    html += "<h2>Training</h2>\n";
    html += &line_chart_svg(
        "loss",
        "step",
        &[("loss", curve(|r| Some(f64::from(r.loss))))],
    );
    html += &line_chart_svg("learning rate", "step", &[("lr", curve(|r| Some(r.lr)))]);
    let sims = [
        ("positive", curve(|r| r.positive_similarity.map(f64::from))),
        (
            "mean negative",
            curve(|r| r.negative_similarity.map(f64::from)),
        ),
    ];
    if sims.iter().any(|s| !s.1.is_empty()) {
        html += &line_chart_svg("student-teacher cosine similarity", "step", &sims);
    }
    if !accuracy.is_empty() {
        let series: Vec<(&str, Vec<(f64, f64)>)> = accuracy
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        html += &line_chart_svg("verification accuracy %", "step", &series);
    }
    if !final_eval.is_empty() {
        html += "<h2>ROC</h2>\n";
        for s in final_eval {
            html += &roc_svg(
                &format!("{} ({} pairs)", s.name, s.pairs),
                &[("student", &s.roc)],
            );
        }
    }
    if let Ok(config) = std::fs::read_to_string(out.join("config.toml")) {
        html += &format!("<h2>Config</h2>\n<pre>{}</pre>\n", escape(&config));
    }
    html += "</body></html>\n";
    html
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
