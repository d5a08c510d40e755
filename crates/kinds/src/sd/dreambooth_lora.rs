//! The `dreambooth_lora` stage: diffusers' train_dreambooth_lora.py — DreamBooth's fields
//! (prior preservation, text-encoder training, the memory options) plus `rank` and
//! `lora_alpha`, with the base model frozen and low-rank adapters trained on the attention
//! projections. Output: `pytorch_lora_weights.safetensors` (what diffusers'
//! `load_lora_weights` reads), `lora_kohya.safetensors` (what A1111 and ComfyUI read),
//! `metrics.jsonl`, `validation/step-N.png` and `report.json`. Use it through `loras:` of
//! `generate` / `sample_grid`.
use super::Dtype;
use super::dreambooth::{DreamBoothFields, UnetTuning, prior_preservation_problems};
use super::training::{ScriptDefaults, TrainingParams};
use dreampipe_core::field;
use dreampipe_core::stages::params::{Params, spec_mut};
use dreampipe_core::stages::{FieldView, ParamSpec, Stage};
use serde::{Deserialize, Serialize};
use serde_json::json;

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

/// The kind's name.
pub const DREAMBOOTH_LORA: &str = "dreambooth_lora";

/// train_dreambooth_lora.py's defaults among the shared training fields.
const SCRIPT: ScriptDefaults = ScriptDefaults {
    learning_rate: DEFAULT_LEARNING_RATE,
    train_batch_size: DEFAULT_BATCH,
    max_train_steps: None,
    num_train_epochs: 1,
};

/// A `dreambooth_lora` stage's fields (its table is derived: [`Params`]): DreamBooth's and the
/// shared training fields (without `export`; `save_dtype` is the LoRA files'), plus the
/// adapters' rank and alpha.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct DreamBoothLoraParams {
    #[serde(flatten)]
    pub dreambooth: DreamBoothFields,
    #[serde(flatten)]
    pub unet: UnetTuning,
    /// rank of the LoRA update matrices
    #[param(default = DEFAULT_RANK, range(1.0, MAX_RANK))]
    pub rank: u32,
    /// LoRA alpha: updates are scaled by lora_alpha / rank; unset: = rank (the script's choice)
    #[param(default = null, range(0.0, MAX_ALPHA))]
    pub lora_alpha: Option<f64>,
    #[serde(flatten)]
    #[param(table = lora_training_table())]
    pub training: TrainingParams,
}

impl Stage for DreamBoothLoraKind {
    super::training_kind_methods!(DreamBoothLoraParams);
    fn kind(&self) -> &'static str {
        DREAMBOOTH_LORA
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "LoRA DreamBooth as diffusers' train_dreambooth_lora.py (dreambooth's fields plus `rank` and `lora_alpha`; UNet attention adapters, and the text encoder's with `train_text_encoder`). Output: `pytorch_lora_weights.safetensors` (diffusers), `lora_kohya.safetensors` (A1111 / ComfyUI), `metrics.jsonl`, `validation/step-N.png` and `report.json`."
    }
    fn check_fields(&self, fields: &FieldView<'_>) -> Vec<(&'static str, String)> {
        prior_preservation_problems(fields)
    }
}

/// The shared training fields as a LoRA run has them: `save_dtype` is the precision of the
/// LoRA files, f32 by default as the script saves them.
fn lora_training_table() -> Vec<ParamSpec> {
    let mut specs = SCRIPT.table();
    let save_dtype = spec_mut(&mut specs, field!(TrainingParams, save_dtype));
    save_dtype.default = Some(json!(Dtype::F32));
    save_dtype.doc = "precision of the LoRA files (f32, f16, bf16)";
    specs
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
