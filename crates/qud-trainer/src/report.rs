//! `report.html`: a run's loss, learning-rate and accuracy curves and its final ROC plots, one
//! self-contained file (inline SVG) that any browser opens offline.

use qud_eval::{line_chart_svg, roc_svg, SetScore};
use std::collections::BTreeMap;
use std::path::Path;

fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn curve(rows: &[serde_json::Value], y: &str) -> Vec<(f64, f64)> {
    rows.iter()
        .filter_map(|r| Some((r["step"].as_f64()?, r[y].as_f64()?)))
        .collect()
}

/// The report of the run in `out` (its `metrics.jsonl`, `eval.jsonl` and `config.toml`) with ROC
/// plots of `final_eval`.
pub fn render(out: &Path, title: &str, final_eval: &[SetScore]) -> String {
    let metrics = json_lines(&out.join("metrics.jsonl"));
    let evals = json_lines(&out.join("eval.jsonl"));
    let mut accuracy: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for e in &evals {
        if let (Some(set), Some(step), Some(acc)) = (
            e["set"].as_str(),
            e["step"].as_f64(),
            e["accuracy"].as_f64(),
        ) {
            accuracy
                .entry(set.to_string())
                .or_default()
                .push((step, 100.0 * acc));
        }
    }
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
    html += &line_chart_svg("loss", "step", &[("loss", curve(&metrics, "loss"))]);
    html += &line_chart_svg("learning rate", "step", &[("lr", curve(&metrics, "lr"))]);
    let sims = [
        ("positive", curve(&metrics, "positive_similarity")),
        ("mean negative", curve(&metrics, "negative_similarity")),
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
