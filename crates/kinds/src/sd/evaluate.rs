//! The `evaluate` stage: the DreamBooth paper's metrics (Ruiz et al. 2023, section 4.1) for
//! generated images against the subject's real images — DINO (ViT-S/16 [CLS] cosine), CLIP-I
//! (CLIP image-embedding cosine), CLIP-T (prompt-to-image CLIP cosine, the identifier removed
//! from the prompt) and PRES (DINO of class-prompt images against the subject) — per image, per
//! (variant, prompt) and per variant, into `scores.json`.
use dreampipe_core::stages::params::Input;
use dreampipe_core::stages::{FieldView, ParamSpec, ParamType, Stage};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Default images per forward pass: ViT-L/14 at 224 px holds ~0.3 GB of activations per 16.
pub const DEFAULT_BATCH: i64 = 16;
/// Largest `batch_size`.
const MAX_BATCH: f64 = 1024.0;

pub struct EvaluateKind;

/// An `evaluate` stage's fields (its table: [`EvaluateKind::schema`]); the inputs are
/// resolved by the runner (`ctx.inputs`; `generated` one entry per variant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateParams {
    pub generated: Input,
    pub real: Input,
    pub clip_model: Input,
    pub dino_model: Input,
    /// The prompt of images whose input records none.
    pub prompt: Option<String>,
    pub identifier: String,
    pub class_prompt: String,
    pub batch_size: usize,
}

impl Stage for EvaluateKind {
    super::torch_kind_methods!();
    fn kind(&self) -> &'static str {
        "evaluate"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "Scores generated images with the DreamBooth paper's metrics: DINO and CLIP-I (mean cosine similarity of ViT-S/16 [CLS] / CLIP image embeddings between each generated image and every real image), CLIP-T (cosine between the CLIP embeddings of the prompt, identifier removed, and the image) and PRES (DINO of the class-prompt images). Output: `scores.json` (`per_image`, `groups` per variant and prompt, `overall` per variant: n, mean and std of each metric)."
    }
    fn schema(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::required(
                "generated",
                ParamType::PathOrStageRefList,
                "sample_grid or generate stages (variants and prompts from their manifest.json), or images stages / folders (with `prompt`); every variant of a swept stage is scored",
            )
            .gathers(),
            ParamSpec::required(
                "real",
                ParamType::PathOrStageRef,
                "the subject's real images: an images stage or a folder of images, or an embed stage (their embeddings, made with the same models)",
            ),
            ParamSpec::required(
                "clip_model",
                ParamType::PathOrStageRef,
                "transformers CLIPModel folder (config.json, model.safetensors, preprocessor_config.json, vocab.json, merges.txt), e.g. openai/clip-vit-large-patch14, or the stage that wrote one",
            ),
            ParamSpec::required(
                "dino_model",
                ParamType::PathOrStageRef,
                "transformers ViTModel folder (config.json, model.safetensors, preprocessor_config.json), e.g. facebook/dino-vits16, or the stage that wrote one",
            ),
            ParamSpec::optional(
                "prompt",
                ParamType::String,
                Value::Null,
                "the prompt of generated images whose input has none (an images stage or a folder)",
            ),
            ParamSpec::optional(
                "identifier",
                ParamType::String,
                json!(""),
                "the rare-token identifier (e.g. `sks`): removed from prompts for CLIP-T (\"a sks dog\" is scored as \"a dog\")",
            ),
            ParamSpec::optional(
                "class_prompt",
                ParamType::String,
                json!(""),
                "the class prompt (e.g. \"a photo of dog\"): its images give PRES and are left out of DINO / CLIP-I / CLIP-T",
            ),
            ParamSpec::optional(
                "batch_size",
                ParamType::Integer,
                json!(DEFAULT_BATCH),
                "images per forward pass (bounds memory; only float rounding may differ)",
            )
            .range(1.0, MAX_BATCH)
            .not_in_key(),
        ]
    }
    fn check_fields(&self, fields: &FieldView<'_>) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        let identifier = fields
            .params
            .get("identifier")
            .and_then(Value::as_str)
            .unwrap_or("");
        if identifier.split_whitespace().count() > 1 {
            problems.push((
                "identifier",
                format!("`{identifier}` is several words; give the one rare token (e.g. `sks`)"),
            ));
        }
        for upstream in fields.upstream.get("real").into_iter().flatten() {
            if upstream.kind != "embed" {
                continue;
            }
            for field in ["clip_model", "dino_model"] {
                let (ours, theirs) = (fields.params.get(field), upstream.params.get(field));
                if let (Some(ours), Some(theirs)) = (ours, theirs)
                    && ours != theirs
                {
                    problems.push((
                        "real",
                        format!(
                            "embed stage `{}` uses {field} {theirs}, this stage {ours}; give both the same {field}",
                            upstream.name
                        ),
                    ));
                }
            }
        }
        let prompt_set = fields.is_set("prompt");
        for upstream in fields.upstream.get("generated").into_iter().flatten() {
            if !PROMPTED_KINDS.contains(&upstream.kind) && !prompt_set {
                problems.push((
                    "generated",
                    format!(
                        "stage `{}` ({}) records no prompts; set `prompt:` to the prompt its images were generated with, or score a sample_grid or generate stage",
                        upstream.name, upstream.kind
                    ),
                ));
            }
        }
        problems
    }
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
