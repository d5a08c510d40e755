//! The `textual_inversion` stage: diffusers' textual_inversion.py on `instance_images` (its
//! `train_data_dir`: a folder, or an `images` stage). Field names and defaults are the script's
//! arguments. Output: `learned_embeds.safetensors` (diffusers), `<token>.safetensors` (A1111 /
//! ComfyUI), `model/` (a diffusers folder with the new token: a `dreambooth` or other stage
//! whose `model:` names this stage uses it), `metrics.jsonl`, `validation/step-N.png` and
//! `report.json`. Checkpoints live in the work folder (resumed after a crash).
use super::training::{self, ExportParams, ScriptDefaults, TrainingParams};
use dreampipe_core::field;
use dreampipe_core::stages::params::{Input, Params};
use dreampipe_core::stages::{FieldView, Stage};
use serde::{Deserialize, Serialize};

/// textual_inversion.py's `--learning_rate` default.
const DEFAULT_LEARNING_RATE: f64 = 1e-4;
/// textual_inversion.py's `--train_batch_size` default.
const DEFAULT_BATCH: u64 = 16;
/// textual_inversion.py's `--max_train_steps` default.
const DEFAULT_MAX_STEPS: u64 = 5000;
/// textual_inversion.py's `--num_train_epochs` default (used when max_train_steps is unset).
const DEFAULT_EPOCHS: u64 = 100;
/// textual_inversion.py's `--repeats` default.
const DEFAULT_REPEATS: u64 = 100;
/// CLIP's context holds 77 tokens (2 specials): more vectors cannot fit a prompt.
const MAX_VECTORS: f64 = 75.0;
/// Largest `repeats` accepted.
const MAX_REPEATS: f64 = 100_000.0;

pub struct TextualInversionKind;

dreampipe_core::closed_set! {
    /// `learnable_property`: which prompt templates (textual_inversion.py's).
    pub enum LearnableProperty { Object = "object", Style = "style" }
}

/// textual_inversion.py's defaults among the shared training fields.
const SCRIPT: ScriptDefaults = ScriptDefaults {
    learning_rate: DEFAULT_LEARNING_RATE,
    train_batch_size: DEFAULT_BATCH,
    max_train_steps: Some(DEFAULT_MAX_STEPS),
    num_train_epochs: DEFAULT_EPOCHS,
};

/// A `textual_inversion` stage's fields (its table is derived: [`Params`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct TextualInversionParams {
    #[serde(flatten)]
    pub inversion: InversionFields,
    #[serde(flatten)]
    #[param(table = SCRIPT.table())]
    pub training: TrainingParams,
    #[serde(flatten)]
    pub output: ExportParams,
}

/// The fields of textual_inversion.py beyond the ones the training kinds share
/// (`instance_images` is resolved by the runner: `ctx.inputs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Params)]
pub struct InversionFields {
    /// training images (diffusers' train_data_dir): a folder, or an `images` stage
    pub instance_images: Input,
    /// the new token, e.g. <cat-toy>
    pub placeholder_token: String,
    /// one-token word the new vectors start from
    pub initializer_token: String,
    /// vectors of the new token
    #[param(default = 1, range(1.0, MAX_VECTORS))]
    pub num_vectors: usize,
    /// which prompt templates: object or style
    #[param(default = "object")]
    pub learnable_property: LearnableProperty,
    /// times the images repeat per epoch
    #[param(default = DEFAULT_REPEATS, range(1.0, MAX_REPEATS))]
    pub repeats: usize,
}

impl Stage for TextualInversionKind {
    super::training_kind_methods!(TextualInversionParams);
    fn kind(&self) -> &'static str {
        "textual_inversion"
    }
    /// 2: mixed precision runs the trained modules under autocast with latents and noise in
    /// the weight dtype (fp16: loss scaling); also covers the fused AdamW kernel (8da37a1),
    /// which changed float32 results to rounding under version 1.
    fn version(&self) -> u32 {
        2
    }
    fn summary(&self) -> &'static str {
        "Textual inversion as diffusers' textual_inversion.py (field names and defaults are its arguments). Output: `learned_embeds.safetensors`, `<token>.safetensors` (A1111 / ComfyUI), `model/` (diffusers folder with the new token; a stage whose `model:` names this stage uses it), `metrics.jsonl` (step, loss, lr), `validation/step-N.png` and `report.json`."
    }
    fn check_fields(&self, fields: &FieldView<'_>) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        let checkpointing = field!(TrainingParams, gradient_checkpointing);
        if fields.flag(checkpointing) {
            problems.push((checkpointing, NO_CHECKPOINTING.to_string()));
        }
        problems.extend(training::export_problem(fields.params));
        problems
    }
}

/// Shared with the stage's run-time check.
pub const NO_CHECKPOINTING: &str = "not supported for textual_inversion (its UNet is frozen; only the text encoder would need it); set it to false";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_the_fields_of_the_struct() {
        let schema = TextualInversionKind.schema();
        dreampipe_core::stages::params::check_table::<TextualInversionParams>(&schema).unwrap();
    }
}
