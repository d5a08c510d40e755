//! The `evaluate` stage: the DreamBooth paper's metrics (Ruiz et al. 2023, section 4.1) for
//! generated images against the subject's real images — DINO (ViT-S/16 [CLS] cosine), CLIP-I
//! (CLIP image-embedding cosine), CLIP-T (prompt-to-image CLIP cosine, the identifier removed
//! from the prompt) and PRES (DINO of class-prompt images against the subject) — per image, per
//! (variant, prompt) and per variant, into `scores.json`.
use super::embed::{EMBED, EmbedParams};
use dreampipe_core::field;
use dreampipe_core::stages::params::{Input, Params};
use dreampipe_core::stages::{FieldView, Stage};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Default images per forward pass: ViT-L/14 at 224 px holds ~0.3 GB of activations per 16.
pub const DEFAULT_BATCH: i64 = 16;
/// Largest `batch_size`.
const MAX_BATCH: f64 = 1024.0;

pub struct EvaluateKind;

/// An `evaluate` stage's fields (its table is derived: [`Params`]); the inputs are resolved by
/// the runner (`ctx.inputs`; `generated` one entry per variant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct EvaluateParams {
    /// sample_grid or generate stages (variants and prompts from their manifest.json), or
    /// images stages / folders (with `prompt`); every variant of a swept stage is scored
    #[param(ty = PathOrStageRefList, gathers)]
    pub generated: Input,
    /// the subject's real images: an images stage or a folder of images, or an embed stage
    /// (their embeddings, made with the same models)
    pub real: Input,
    /// transformers CLIPModel folder (config.json, model.safetensors,
    /// preprocessor_config.json, vocab.json, merges.txt), e.g. openai/clip-vit-large-patch14,
    /// or the stage that wrote one
    pub clip_model: Input,
    /// transformers ViTModel folder (config.json, model.safetensors, preprocessor_config.json),
    /// e.g. facebook/dino-vits16, or the stage that wrote one
    pub dino_model: Input,
    /// the prompt of generated images whose input has none (an images stage or a folder)
    #[param(default = null)]
    pub prompt: Option<String>,
    /// the rare-token identifier (e.g. `sks`): removed from prompts for CLIP-T ("a sks dog" is
    /// scored as "a dog")
    #[param(default = "")]
    pub identifier: String,
    /// the class prompt (e.g. "a photo of dog"): its images give PRES and are left out of DINO
    /// / CLIP-I / CLIP-T
    #[param(default = "")]
    pub class_prompt: String,
    /// images per forward pass (bounds memory; only float rounding may differ)
    #[param(default = DEFAULT_BATCH, range(1.0, MAX_BATCH), not_in_key)]
    pub batch_size: usize,
}

impl Stage for EvaluateKind {
    super::torch_kind_methods!(EvaluateParams);
    fn kind(&self) -> &'static str {
        "evaluate"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "Scores generated images with the DreamBooth paper's metrics: DINO and CLIP-I (mean cosine similarity of ViT-S/16 [CLS] / CLIP image embeddings between each generated image and every real image), CLIP-T (cosine between the CLIP embeddings of the prompt, identifier removed, and the image) and PRES (DINO of the class-prompt images). Output: `scores.json` (`per_image`, `groups` per variant and prompt, `overall` per variant: n, mean and std of each metric)."
    }
    fn check_fields(&self, fields: &FieldView<'_>) -> Vec<(&'static str, String)> {
        let mut problems: Vec<_> = identifier_problems(fields).into_iter().collect();
        problems.extend(embed_model_problems(fields));
        problems.extend(unprompted_input_problems(fields));
        problems
    }
}

/// `identifier` is one word.
fn identifier_problems(fields: &FieldView<'_>) -> Option<(&'static str, String)> {
    let name = field!(EvaluateParams, identifier);
    let identifier = fields
        .params
        .get(name)
        .and_then(Value::as_str)
        .unwrap_or("");
    (identifier.split_whitespace().count() > 1).then(|| {
        let message =
            format!("`{identifier}` is several words; give the one rare token (e.g. `sks`)");
        (name, message)
    })
}

/// An `embed` stage given as `real` used the same CLIP and DINO models as this stage.
fn embed_model_problems(fields: &FieldView<'_>) -> Vec<(&'static str, String)> {
    let real = field!(EvaluateParams, real);
    let mut problems = Vec::new();
    for upstream in fields.upstream.get(real).into_iter().flatten() {
        if upstream.kind != EMBED {
            continue;
        }
        let models = [
            (
                field!(EvaluateParams, clip_model),
                field!(EmbedParams, clip_model),
            ),
            (
                field!(EvaluateParams, dino_model),
                field!(EmbedParams, dino_model),
            ),
        ];
        for (field, theirs_name) in models {
            let (ours, theirs) = (fields.params.get(field), upstream.params.get(theirs_name));
            if let (Some(ours), Some(theirs)) = (ours, theirs)
                && ours != theirs
            {
                problems.push((
                    real,
                    format!(
                        "embed stage `{}` uses {field} {theirs}, this stage {ours}; give both the same {field}",
                        upstream.name
                    ),
                ));
            }
        }
    }
    problems
}

/// Images from a kind that records no prompts need `prompt:`.
fn unprompted_input_problems(fields: &FieldView<'_>) -> Vec<(&'static str, String)> {
    let generated = field!(EvaluateParams, generated);
    if fields.is_set(field!(EvaluateParams, prompt)) {
        return Vec::new();
    }
    let upstream = fields.upstream.get(generated).into_iter().flatten();
    upstream
        .filter(|upstream| !PROMPTED_KINDS.contains(&upstream.kind))
        .map(|upstream| {
            let message = format!(
                "stage `{}` ({}) records no prompts; set `prompt:` to the prompt its images were generated with, or score a sample_grid or generate stage",
                upstream.name, upstream.kind
            );
            (generated, message)
        })
        .collect()
}

/// Kinds whose manifest gives each image its prompt.
const PROMPTED_KINDS: [&str; 2] = ["sample_grid", "generate"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_the_fields_of_the_struct() {
        dreampipe_core::stages::params::check_table::<EvaluateParams>(&EvaluateKind.schema())
            .unwrap();
    }
}
