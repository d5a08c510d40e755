//! The `dreambooth_lora` stage: diffusers' train_dreambooth_lora.py — DreamBooth's fields
//! (prior preservation, text-encoder training, the memory options) plus `rank` and
//! `lora_alpha`, with the base model frozen and low-rank adapters trained on the attention
//! projections. Output: `pytorch_lora_weights.safetensors` (what diffusers'
//! `load_lora_weights` reads), `lora_kohya.safetensors` (what A1111 and ComfyUI read),
//! `metrics.jsonl`, `validation/step-N.png` and `report.json`. Use it through `loras:` of
//! `generate` / `sample_grid`.
use super::Dtype;
use super::dreambooth::{DreamBoothFields, dreambooth_fields, prior_preservation_problems};
use super::training::{self, ScriptDefaults, TrainingParams};
use dreampipe_core::stages::{FieldView, ParamSpec, ParamType, Stage};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// train_dreambooth_lora.py's `--learning_rate` default.
const DEFAULT_LEARNING_RATE: f64 = 5e-4;
/// train_dreambooth_lora.py's `--train_batch_size` default.
const DEFAULT_BATCH: u64 = 4;
/// train_dreambooth_lora.py's `--rank` default.
const DEFAULT_RANK: u64 = 4;
/// Largest rank accepted (SD's widest attention projection is 1280).
const MAX_RANK: f64 = 1280.0;
/// Largest `lora_alpha` accepted.
const MAX_ALPHA: f64 = 1.0e4;

pub struct DreamBoothLoraKind;

/// A `dreambooth_lora` stage's fields (its table: [`DreamBoothLoraKind::schema`]): DreamBooth's
/// and the shared training fields (without `export`; `save_dtype` is the LoRA files'), plus
/// the adapters' rank and alpha.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DreamBoothLoraParams {
    #[serde(flatten)]
    pub dreambooth: DreamBoothFields,
    pub rank: u32,
    /// `None`: = rank.
    pub lora_alpha: Option<f64>,
    #[serde(flatten)]
    pub training: TrainingParams,
}

impl Stage for DreamBoothLoraKind {
    super::training_kind_methods!(DreamBoothLoraParams);
    fn kind(&self) -> &'static str {
        "dreambooth_lora"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "LoRA DreamBooth as diffusers' train_dreambooth_lora.py (dreambooth's fields plus `rank` and `lora_alpha`; UNet attention adapters, and the text encoder's with `train_text_encoder`). Output: `pytorch_lora_weights.safetensors` (diffusers), `lora_kohya.safetensors` (A1111 / ComfyUI), `metrics.jsonl`, `validation/step-N.png` and `report.json`."
    }
    fn schema(&self) -> Vec<ParamSpec> {
        let mut schema = dreambooth_fields();
        schema.push(
            ParamSpec::optional(
                "rank",
                ParamType::Integer,
                json!(DEFAULT_RANK),
                "rank of the LoRA update matrices",
            )
            .range(1.0, MAX_RANK),
        );
        schema.push(
            ParamSpec::optional(
                "lora_alpha",
                ParamType::Number,
                Value::Null,
                "LoRA alpha: updates are scaled by lora_alpha / rank; unset: = rank (the script's choice)",
            )
            .range(0.0, MAX_ALPHA),
        );
        let common = training::common_schema(&ScriptDefaults {
            learning_rate: DEFAULT_LEARNING_RATE,
            train_batch_size: DEFAULT_BATCH,
            max_train_steps: Value::Null,
            num_train_epochs: 1,
        });
        schema.extend(common.into_iter().filter_map(lora_variant));
        schema
    }
    fn check_fields(&self, fields: &FieldView<'_>) -> Vec<(&'static str, String)> {
        prior_preservation_problems(fields)
    }
}

/// The shared training fields as a LoRA run has them: no `export` (the output is always both
/// LoRA files), `save_dtype` of those files defaulting to f32 as the script saves them.
fn lora_variant(spec: ParamSpec) -> Option<ParamSpec> {
    match spec.name {
        "export" => None,
        "save_dtype" => Some(
            ParamSpec::optional(
                "save_dtype",
                ParamType::String,
                json!("f32"),
                "precision of the LoRA files (f32, f16, bf16)",
            )
            .one_of(Dtype::NAMES),
        ),
        _ => Some(spec),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_the_fields_of_the_struct() {
        let schema = DreamBoothLoraKind.schema();
        dreampipe_core::stages::params::check_table::<DreamBoothLoraParams>(&schema).unwrap();
    }
}
