//! The metrics from embeddings, as the DreamBooth paper defines them, and `scores.json`:
//! per image the mean cosine similarity to every real image (DINO, CLIP-I) and the cosine to
//! its prompt (CLIP-T); per (variant, prompt) and per variant the count, mean and population
//! standard deviation; PRES per variant from its class-prompt images. Cosines are computed in
//! float64 from the float32 embeddings.
use serde_json::{Value, json};

/// One scored generated image.
#[derive(Debug, Clone)]
pub struct Scored {
    pub file: String,
    pub model: String,
    pub prompt: String,
    pub class_prompt: bool,
    pub dino: f64,
    pub clip_i: f64,
    pub clip_t: f64,
}

/// `a·b / (|a| |b|)` in float64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// The mean cosine of `embedding` with each of `reals` (the paper's "average pairwise").
pub fn mean_cosine(embedding: &[f32], reals: &[Vec<f32>]) -> f64 {
    let total: f64 = reals.iter().map(|r| cosine(embedding, r)).sum();
    total / reals.len() as f64
}

/// `{"mean", "std"}` (population std, numpy's default) of `values`; nulls when empty.
fn stats(values: &[f64]) -> Value {
    if values.is_empty() {
        return json!({"mean": null, "std": null});
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    json!({"mean": mean, "std": variance.sqrt()})
}

/// The distinct values of `key` in first-appearance order.
fn distinct<'a>(images: &'a [Scored], key: impl Fn(&'a Scored) -> &'a str) -> Vec<&'a str> {
    let mut seen = Vec::new();
    for image in images {
        let value = key(image);
        if !seen.contains(&value) {
            seen.push(value);
        }
    }
    seen
}

fn metric_stats(rows: &[&Scored]) -> [(&'static str, Value); 3] {
    let column = |f: fn(&Scored) -> f64| rows.iter().map(|r| f(r)).collect::<Vec<f64>>();
    [
        ("dino", stats(&column(|r| r.dino))),
        ("clip_i", stats(&column(|r| r.clip_i))),
        ("clip_t", stats(&column(|r| r.clip_t))),
    ]
}

fn group(model: &str, prompt: &str, rows: &[&Scored]) -> Value {
    let mut entry = json!({
        "model": model,
        "prompt": prompt,
        "n": rows.len(),
        "class_prompt": rows.first().is_some_and(|r| r.class_prompt),
    });
    for (name, value) in metric_stats(rows) {
        entry[name] = value;
    }
    entry
}

fn overall(model: &str, images: &[Scored]) -> Value {
    let of_model = images.iter().filter(|r| r.model == model);
    let subject: Vec<&Scored> = of_model.clone().filter(|r| !r.class_prompt).collect();
    let prior: Vec<f64> = of_model
        .filter(|r| r.class_prompt)
        .map(|r| r.dino)
        .collect();
    let mut entry = json!({"model": model, "n": subject.len()});
    for (name, value) in metric_stats(&subject) {
        entry[name] = value;
    }
    entry["pres"] = match prior.is_empty() {
        true => Value::Null,
        false => {
            let mut pres = stats(&prior);
            pres["n"] = json!(prior.len());
            pres
        }
    };
    entry
}

/// The whole `scores.json` document.
pub fn scores_json(images: &[Scored]) -> Value {
    let per_image: Vec<Value> = images
        .iter()
        .map(|r| {
            json!({
                "file": r.file, "model": r.model, "prompt": r.prompt,
                "class_prompt": r.class_prompt,
                "dino": r.dino, "clip_i": r.clip_i, "clip_t": r.clip_t,
            })
        })
        .collect();
    let models = distinct(images, |r| r.model.as_str());
    let mut groups = Vec::new();
    for model in &models {
        let of_model: Vec<Scored> = images
            .iter()
            .filter(|r| r.model == *model)
            .cloned()
            .collect();
        for prompt in distinct(&of_model, |r| r.prompt.as_str()) {
            let rows: Vec<&Scored> = of_model.iter().filter(|r| r.prompt == prompt).collect();
            groups.push(group(model, prompt, &rows));
        }
    }
    let overall: Vec<Value> = models.iter().map(|m| overall(m, images)).collect();
    json!({"per_image": per_image, "groups": groups, "overall": overall})
}

/// The prompt CLIP-T is computed against: `identifier` removed as a word ("a sks dog" → "a dog").
pub fn without_identifier(prompt: &str, identifier: &str) -> String {
    prompt
        .split_whitespace()
        .filter(|word| identifier.is_empty() || *word != identifier)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_and_stats_follow_their_definitions() {
        assert!((cosine(&[1.0, 0.0], &[1.0, 1.0]) - 0.5f64.sqrt()).abs() < 1e-15);
        let s = stats(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(s["mean"], json!(2.5));
        assert_eq!(s["std"], json!(1.25f64.sqrt()));
        assert_eq!(without_identifier("a  sks dog on sks", "sks"), "a dog on");
        assert_eq!(without_identifier("a sks dog", ""), "a sks dog");
    }
}
