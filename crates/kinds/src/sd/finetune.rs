//! The `finetune` stage: captioned fine-tuning as diffusers' train_text_to_image.py — the UNet
//! learns a folder of images, each with its own caption (`name.txt` beside `name.png`, as
//! kohya, OneTrainer and EveryDream2 read them; a `toy_world` stage's images qualify), with the
//! memory options, resume and validation of the other training kinds. Output: a diffusers
//! folder, `metrics.jsonl`, `validation/step-N.png` and `report.json`.
use super::dreambooth::UnetTuning;
use super::training::{self, ExportParams, ScriptDefaults, TrainingParams};
use dreampipe_core::stages::params::{Input, Params};
use dreampipe_core::stages::{FieldView, Stage};
use serde::{Deserialize, Serialize};

/// train_text_to_image.py's `--learning_rate` default.
const DEFAULT_LEARNING_RATE: f64 = 1e-4;
/// train_text_to_image.py's `--train_batch_size` default.
const DEFAULT_BATCH: u64 = 16;
/// train_text_to_image.py's `--num_train_epochs` default.
const DEFAULT_EPOCHS: u64 = 100;

pub struct FinetuneKind;

/// train_text_to_image.py's defaults among the shared training fields.
const SCRIPT: ScriptDefaults = ScriptDefaults {
    learning_rate: DEFAULT_LEARNING_RATE,
    train_batch_size: DEFAULT_BATCH,
    max_train_steps: None,
    num_train_epochs: DEFAULT_EPOCHS,
};

/// A `finetune` stage's fields (its table is derived: [`Params`]; `images` is resolved by the
/// runner: `ctx.inputs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct FinetuneParams {
    /// folder of images with a caption file each (`name.txt`), or a stage making one
    pub images: Input,
    #[serde(flatten)]
    pub unet: UnetTuning,
    /// share of samples trained on the empty caption (kohya's caption_dropout_rate; 0.1 lets
    /// classifier-free guidance work on a model trained from scratch)
    #[param(default = 0.0, range(0.0, 1.0), keyed_when_set)]
    pub caption_dropout_rate: f64,
    #[serde(flatten)]
    #[param(table = SCRIPT.table())]
    pub training: TrainingParams,
    #[serde(flatten)]
    pub output: ExportParams,
}

impl Stage for FinetuneKind {
    super::training_kind_methods!(FinetuneParams);
    fn kind(&self) -> &'static str {
        "finetune"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "Captioned fine-tuning as diffusers' train_text_to_image.py: the UNet learns images with a caption each (`name.txt` beside `name.png`; a folder, or an `images` / `toy_world` stage). Output: a diffusers folder, `metrics.jsonl`, `validation/step-N.png` and `report.json`."
    }
    fn check_fields(&self, fields: &FieldView<'_>) -> Vec<(&'static str, String)> {
        training::export_problem(fields.params)
            .into_iter()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_the_fields_of_the_struct() {
        dreampipe_core::stages::params::check_table::<FinetuneParams>(&FinetuneKind.schema())
            .unwrap();
    }
}
