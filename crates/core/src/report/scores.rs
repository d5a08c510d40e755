//! The report's "Scores" section for stages that write `scores.json` (`evaluate`, `world_score`):
//! a table ranking the variants by the first metric (then the third; for `evaluate` DINO, then
//! CLIP-T) with the swept parameters as columns, and one chart per metric — against the swept
//! parameter when the variants differ in exactly one numeric parameter, else against the
//! variants' rank. The metrics are `scores.json`'s `metrics` list (`[key, display name]` pairs),
//! else the DreamBooth paper's four, which also get the paper's Table 1 rows beneath the table
//! and its values as labelled reference lines.
use std::path::Path;

use maud::{Markup, html};
use serde_json::Value;

use super::svg::{ChartSpec, ReferenceLine, line_chart_with_references};

/// The file an `evaluate` stage writes.
pub const SCORES_FILE: &str = "scores.json";
/// Size of each metric chart in CSS pixels.
const CHART_SIZE: (u32, u32) = (420, 260);
/// The metrics as `scores.json` names them, with their display names.
const METRICS: [(&str, &str); 4] = [
    ("dino", "DINO"),
    ("clip_i", "CLIP-I"),
    ("clip_t", "CLIP-T"),
    ("pres", "PRES"),
];
/// Ruiz et al., DreamBooth (CVPR 2023), Table 1: (row, DINO, CLIP-I, CLIP-T).
const PAPER_TABLE_1: [(&str, f64, f64, Option<f64>); 3] = [
    ("Real images", 0.774, 0.885, None),
    ("DreamBooth (Stable Diffusion)", 0.668, 0.803, Some(0.305)),
    (
        "Textual Inversion (Stable Diffusion)",
        0.569,
        0.780,
        Some(0.255),
    ),
];

/// Reads a `scores.json` for the report; the warning names the file.
pub fn read_scores(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let scores: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: invalid JSON: {e}", path.display()))?;
    match scores.get("overall").and_then(Value::as_array) {
        Some(_) => Ok(scores),
        None => Err(format!(
            "{}: no `overall` list; not an evaluate output",
            path.display()
        )),
    }
}

/// The metrics of a `scores.json` as (key, display name): its `metrics` list, else the DreamBooth
/// paper's four.
fn metrics_of(scores: &Value) -> Vec<(String, String)> {
    let listed: Option<Vec<(String, String)>> = (scores.get("metrics").and_then(Value::as_array))
        .map(|pairs| {
            (pairs.iter())
                .filter_map(|pair| {
                    let key = pair.get(0)?.as_str()?;
                    let name = pair.get(1)?.as_str()?;
                    Some((key.to_string(), name.to_string()))
                })
                .collect()
        });
    match listed {
        Some(metrics) if !metrics.is_empty() => metrics,
        _ => (METRICS.iter())
            .map(|(key, name)| (key.to_string(), name.to_string()))
            .collect(),
    }
}

/// Whether `metrics` are the DreamBooth paper's (then its Table 1 is shown beside them).
fn are_the_papers(metrics: &[(String, String)]) -> bool {
    metrics.len() == METRICS.len() && (metrics.iter().zip(METRICS)).all(|((k, _), (m, _))| k == m)
}

/// One variant's row of the ranking.
struct Variant<'a> {
    entry: &'a Value,
    label: &'a str,
    params: Vec<(String, String)>,
}

impl Variant<'_> {
    fn mean(&self, metric: &str) -> Option<f64> {
        self.entry.get(metric)?.get("mean")?.as_f64()
    }
}

/// `db[learning_rate=2e-6,with_prior=true]` → [("learning_rate", "2e-6"), ("with_prior", "true")].
pub fn swept_params(label: &str) -> Vec<(String, String)> {
    let bracket = label.find('[').zip(label.rfind(']'));
    let Some(inner) = bracket
        .filter(|(a, b)| a < b)
        .map(|(a, b)| &label[a + 1..b])
    else {
        return Vec::new();
    };
    inner
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The variants, best first: the first metric's mean descending, then the third's (DINO, then
/// CLIP-T); missing values last.
fn ranked<'a>(scores: &'a Value, metrics: &[(String, String)]) -> Vec<Variant<'a>> {
    let mut variants: Vec<Variant> = scores["overall"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|entry| {
            let label = entry["model"].as_str().unwrap_or("?");
            Variant {
                entry,
                label,
                params: swept_params(label),
            }
        })
        .collect();
    let by = |index: usize| {
        metrics
            .get(index)
            .or(metrics.first())
            .map(|(k, _)| k.as_str())
    };
    let (first, then) = (by(0), by(2));
    let mean = |v: &Variant, metric: Option<&str>| {
        metric.and_then(|m| v.mean(m)).unwrap_or(f64::NEG_INFINITY)
    };
    let key = |v: &Variant| (mean(v, first), mean(v, then));
    variants.sort_by(|a, b| {
        key(b)
            .partial_cmp(&key(a))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    variants
}

/// The section for every stage with scores, given as (stage id, `scores.json`) (empty without
/// any).
pub fn render_scores(scored: &[(&str, &Value)]) -> Markup {
    html! {
        @if !scored.is_empty() {
            h2 { "Scores" }
            @for &(id, scores) in scored {
                @let metrics = metrics_of(scores);
                @let variants = ranked(scores, &metrics);
                h3 { (id) }
                @if scores.get("random_weights").and_then(Value::as_bool) == Some(true) {
                    p class="missing" {
                        "The CLIP / DINO folders have random weights (made by "
                        code { "dreampipe model init" } "): these numbers mean nothing."
                    }
                }
                (ranking_table(&variants, &metrics))
                (charts(id, &variants, &metrics))
            }
        }
    }
}

fn columns(variants: &[Variant]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (name, _) in variants.iter().flat_map(|v| &v.params) {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

fn cell(value: Option<f64>) -> String {
    value.map_or("—".to_string(), |v| format!("{v:.3}"))
}

fn ranking_table(variants: &[Variant], metrics: &[(String, String)]) -> Markup {
    let params = columns(variants);
    let paper = are_the_papers(metrics);
    html! {
        table class="scores" {
            tr {
                th { "rank" } th { "variant" }
                @for name in &params { th { (name) } }
                th { "n" }
                @for (_, name) in metrics { th { (name) } }
            }
            @for (rank, variant) in variants.iter().enumerate() {
                (variant_row(rank + 1, variant, &params, metrics))
            }
            @for (row, dino, clip_i, clip_t) in PAPER_TABLE_1.iter().filter(|_| paper) {
                tr class="paper" {
                    td { "paper" }
                    th { (row) " (Table 1)" }
                    // The swept parameters' columns and `n` stay blank.
                    @for _ in 0..=params.len() { td {} }
                    td { (cell(Some(*dino))) } td { (cell(Some(*clip_i))) }
                    td { (cell(*clip_t)) } td { "—" }
                }
            }
        }
    }
}

/// One variant's row: rank, label, swept values, sample count and the metrics' means.
fn variant_row(
    rank: usize,
    variant: &Variant,
    params: &[String],
    metrics: &[(String, String)],
) -> Markup {
    let value = |name: &String| {
        variant
            .params
            .iter()
            .find(|(k, _)| k == name)
            .map_or("—", |(_, v)| v.as_str())
    };
    html! {
        tr {
            td { (rank) }
            th { (variant.label) }
            @for name in params { td { (value(name)) } }
            td { (variant.entry["n"].as_u64().unwrap_or(0)) }
            @for (metric, _) in metrics { td { (cell(variant.mean(metric))) } }
        }
    }
}

/// Table 1's values of `metric` as reference lines.
fn references(metric: &str) -> Vec<ReferenceLine> {
    PAPER_TABLE_1
        .iter()
        .filter_map(|(row, dino, clip_i, clip_t)| {
            let value = match metric {
                "dino" => Some(*dino),
                "clip_i" => Some(*clip_i),
                "clip_t" => *clip_t,
                _ => None,
            }?;
            Some(ReferenceLine {
                label: format!("paper: {row} {value:.3}"),
                value,
            })
        })
        .collect()
}

/// The one parameter every variant sets to a number, with distinct values; `None` otherwise.
fn single_numeric_sweep(variants: &[Variant]) -> Option<(String, Vec<f64>)> {
    let names = columns(variants);
    let [name] = names.as_slice() else {
        return None;
    };
    let values: Option<Vec<f64>> = variants
        .iter()
        .map(|v| {
            v.params
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, x)| x.parse().ok())
        })
        .collect();
    let values = values?;
    let mut distinct = values.clone();
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    (distinct.len() >= 2).then(|| (name.clone(), values))
}

fn charts(stage: &str, variants: &[Variant], metrics: &[(String, String)]) -> Markup {
    let paper = are_the_papers(metrics);
    let sweep = single_numeric_sweep(variants);
    let (x_label, xs): (String, Vec<f64>) = match &sweep {
        Some((name, values)) => (name.clone(), values.clone()),
        None => (
            "variant (rank in the table)".to_string(),
            (1..=variants.len()).map(|r| r as f64).collect(),
        ),
    };
    let charts = metrics.iter().filter_map(|(metric, name)| {
        let mut points: Vec<(f64, f64)> = xs
            .iter()
            .zip(variants)
            .filter_map(|(x, v)| v.mean(metric).map(|y| (*x, y)))
            .collect();
        if points.is_empty() {
            return None;
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let spec = ChartSpec {
            title: format!("{stage} — {name}"),
            x_label: x_label.clone(),
            y_label: name.to_string(),
            width: CHART_SIZE.0,
            height: CHART_SIZE.1,
        };
        let lines = if paper {
            references(metric)
        } else {
            Vec::new()
        };
        Some(line_chart_with_references(&points, &lines, &spec))
    });
    html! { div class="charts" { @for chart in charts { (chart) } } }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_labels_give_their_swept_parameters() {
        assert_eq!(
            swept_params("db[learning_rate=2e-6,with_prior=true]"),
            [
                ("learning_rate".to_string(), "2e-6".to_string()),
                ("with_prior".to_string(), "true".to_string())
            ]
        );
        assert!(swept_params("tiny-sd").is_empty());
        // A grid row label: the variant, then the compared sampler settings.
        assert_eq!(
            swept_params("db[learning_rate=2e-6] · ddim"),
            [("learning_rate".to_string(), "2e-6".to_string())]
        );
    }
}
