//! The `world_score` stage: every generated image of its inputs (with its variant and prompt,
//! read as `evaluate` reads them) through the toy world's classifier, the rates per variant into
//! `scores.json`.
use super::evaluate::inputs::{self, GeneratedImage};
use super::{StageContext, StageError};
use dreampipe_kinds::sd::world_score::{METRICS, WorldScoreParams};
use dreampipe_kinds::toy_world::SUBJECT_CLASS;
use dreampipe_kinds::world_check::{self, Expectation, Reading};
use serde_json::{Value, json};

/// Runs a `world_score` stage (its schema: `dreampipe_kinds::sd::world_score`).
pub fn run(ctx: &StageContext<'_>) -> Result<(), StageError> {
    let params: WorldScoreParams = ctx.typed()?;
    let identifier = Some(params.identifier.as_str()).filter(|id| !id.is_empty());
    let images = inputs::generated_images(ctx, params.prompt.as_deref())?;
    let mut judged = Vec::with_capacity(images.len());
    for (index, image) in images.iter().enumerate() {
        ctx.check_cancelled()?;
        let picture = image::open(&image.path)
            .map_err(|source| StageError::ReadImage {
                path: image.path.clone(),
                source,
            })?
            .to_rgb8();
        let expected = world_check::expectation(&image.prompt, identifier);
        judged.push(Judged::new(image, world_check::read(&picture), expected));
        ctx.progress.step(index as u64 + 1, images.len() as u64);
    }
    let rates = overall(&judged);
    for row in &rates {
        ctx.log.line(&row.to_string());
    }
    let scores = json!({
        "metrics": METRICS,
        "overall": rates,
        "per_image": judged.iter().map(Judged::to_json).collect::<Vec<_>>(),
    });
    let path = ctx
        .out_dir
        .join(dreampipe_core::report::scores::SCORES_FILE);
    let text = serde_json::to_string_pretty(&scores)
        .map_err(|e| StageError::serialize(ctx.stage_id, "scores", e))?;
    std::fs::write(&path, text).map_err(|e| StageError::io("write", &path, e))
}

/// One image: what its prompt asked for, what the classifier saw, and each metric's verdict
/// (None where the metric does not apply to its prompt).
struct Judged<'a> {
    image: &'a GeneratedImage,
    reading: Reading,
    expected: Expectation,
}

impl<'a> Judged<'a> {
    fn new(image: &'a GeneratedImage, reading: Reading, expected: Expectation) -> Self {
        Self {
            image,
            reading,
            expected,
        }
    }

    /// The verdict of `metric` for this image.
    fn verdict(&self, metric: &str) -> Option<bool> {
        let (reading, expected) = (&self.reading, &self.expected);
        let shape = reading.shape.map(|(_, shape)| shape);
        let colour = reading.shape.map(|(colour, _)| colour);
        match metric {
            // The stripes, whatever the outline: the `shape` metric judges the star.
            "subject" => expected.subject.then_some(reading.striped),
            "caption" => (!expected.subject && expected.colour.is_some()).then(|| {
                Some(reading.background) == expected.background
                    && colour == expected.colour
                    && shape == expected.shape
            }),
            // The bare class (`a star`: the subject's shape, no colour): did it keep its look?
            "class" => {
                let bare = !expected.subject && expected.colour.is_none();
                (bare && expected.shape == Some(SUBJECT_CLASS)).then_some(!reading.striped)
            }
            "no_stripes" => (!expected.subject).then_some(!reading.striped),
            "background" => expected.background.map(|b| b == reading.background),
            "shape" => expected.shape.map(|s| shape == Some(s)),
            _ => None,
        }
    }

    fn to_json(&self) -> Value {
        let verdicts: serde_json::Map<String, Value> = (METRICS.iter())
            .filter_map(|(metric, _)| Some((metric.to_string(), json!(self.verdict(metric)?))))
            .collect();
        json!({
            "file": self.image.file,
            "model": self.image.model,
            "prompt": self.image.prompt,
            "seen": {
                "background": self.reading.background,
                "colour": self.reading.shape.map(|(colour, _)| colour),
                "shape": self.reading.shape.map(|(_, shape)| shape),
                "striped": self.reading.striped,
            },
            "verdicts": verdicts,
        })
    }
}

/// Per variant (in order of appearance): `n` and each metric's mean and count.
fn overall(judged: &[Judged]) -> Vec<Value> {
    let mut models: Vec<&str> = Vec::new();
    for j in judged {
        if !models.contains(&j.image.model.as_str()) {
            models.push(&j.image.model);
        }
    }
    (models.into_iter())
        .map(|model| {
            let mine: Vec<&Judged> = judged.iter().filter(|j| j.image.model == model).collect();
            let mut row = json!({"model": model, "n": mine.len()});
            for (metric, _) in METRICS {
                let verdicts: Vec<bool> = mine.iter().filter_map(|j| j.verdict(metric)).collect();
                let mean = (!verdicts.is_empty()).then(|| {
                    verdicts.iter().filter(|v| **v).count() as f64 / verdicts.len() as f64
                });
                row[metric] = json!({"mean": mean, "count": verdicts.len()});
            }
            row
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(prompt: &str, striped: bool) -> Vec<(&'static str, Option<bool>)> {
        let image = GeneratedImage {
            path: "x.png".into(),
            file: "x.png".to_string(),
            model: "db".to_string(),
            prompt: prompt.to_string(),
        };
        let reading = Reading {
            background: "gray",
            shape: Some(("red", "star")),
            striped,
        };
        let judged = Judged::new(
            &image,
            reading,
            world_check::expectation(prompt, Some("sks")),
        );
        (METRICS.iter())
            .map(|(metric, _)| (*metric, judged.verdict(metric)))
            .collect()
    }

    /// `class` judges only the bare class prompt; a striped star there is class drift.
    #[test]
    fn the_class_is_judged_on_the_bare_class_prompt_only() {
        let class = |prompt: &str, striped: bool| {
            verdicts(prompt, striped)
                .into_iter()
                .find(|(m, _)| *m == "class")
                .unwrap()
                .1
        };
        assert_eq!(class("a star", false), Some(true));
        assert_eq!(class("a star", true), Some(false));
        assert_eq!(class("a red star on a gray background", true), None);
        assert_eq!(class("a sks star", true), None);
        assert_eq!(class("a blue circle on a gray background", false), None);
        assert_eq!(
            verdicts("a sks star", true),
            vec![
                ("subject", Some(true)),
                ("caption", None),
                ("class", None),
                ("no_stripes", None),
                ("background", None),
                ("shape", Some(true)),
            ]
        );
    }
}
