//! The `dreambooth` stage: diffusers' train_dreambooth.py on `instance_images` (a folder, or an
//! `images` stage) with `instance_prompt`; prior preservation when `class_images` is given (a
//! folder, or a `generate` / `images` stage) with `class_prompt`. Field names and defaults are
//! the script's arguments. Output: a diffusers folder (`model_index.json`, `unet/`, …),
//! `metrics.jsonl`, `validation/step-N.png` and `report.json`. Checkpoints live in the work
//! folder, so a crashed run resumes from its last checkpoint on the next `dreampipe run`.
use super::generate::{GENERATE, GenerateParams};
use super::training::{self, ExportParams, ScriptDefaults, TrainingParams};
use dreampipe_core::field;
use dreampipe_core::stages::params::{Input, Params};
use dreampipe_core::stages::{FieldView, Stage};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// train_dreambooth.py's `--learning_rate` default.
const DEFAULT_LEARNING_RATE: f64 = 5e-6;
/// train_dreambooth.py's `--train_batch_size` default.
const DEFAULT_BATCH: u64 = 4;
/// train_dreambooth.py's `--num_class_images` default.
const DEFAULT_CLASS_IMAGES: u64 = 100;
/// Largest `num_class_images` (as `generate`'s `count`).
const MAX_CLASS_IMAGES: f64 = 100_000.0;
/// Largest `prior_loss_weight` / `snr_gamma` accepted (the papers use 1 and 5).
pub const MAX_WEIGHT: f64 = 1000.0;
/// Largest `max_grad_norm` accepted.
const MAX_GRAD_NORM: f64 = 1.0e6;

pub struct DreamBoothKind;

/// train_dreambooth.py's defaults among the shared training fields.
const SCRIPT: ScriptDefaults = ScriptDefaults {
    learning_rate: DEFAULT_LEARNING_RATE,
    train_batch_size: DEFAULT_BATCH,
    max_train_steps: None,
    num_train_epochs: 1,
};

/// A `dreambooth` stage's fields (its table is derived: [`Params`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct DreamBoothParams {
    #[serde(flatten)]
    pub dreambooth: DreamBoothFields,
    #[serde(flatten)]
    pub unet: UnetTuning,
    #[serde(flatten)]
    #[param(table = SCRIPT.table())]
    pub training: TrainingParams,
    #[serde(flatten)]
    pub output: ExportParams,
}

/// The fields of train_dreambooth.py beyond the ones all training kinds share (also
/// `dreambooth_lora`'s, whose script has the same arguments). The inputs are resolved by the
/// runner (`ctx.inputs`); `class_images` unset: no prior preservation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Params)]
pub struct DreamBoothFields {
    /// folder of instance images, or an `images` stage
    pub instance_images: Input,
    /// prompt of the instance images
    pub instance_prompt: String,
    /// class images for prior preservation (folder, or a `generate` / `images` stage); unset:
    /// none
    #[param(default = null)]
    pub class_images: Option<Input>,
    /// require class_images (prior preservation is on whenever class_images is set)
    #[param(default = false)]
    pub with_prior_preservation: bool,
    /// prompt of the class images (required with class_images)
    #[param(default = null)]
    pub class_prompt: Option<String>,
    /// class images used (the first N; class_images must hold at least N)
    #[param(default = DEFAULT_CLASS_IMAGES, range(1.0, MAX_CLASS_IMAGES))]
    pub num_class_images: usize,
    /// weight of the prior-preservation loss
    #[param(default = 1.0, range(0.0, MAX_WEIGHT))]
    pub prior_loss_weight: f64,
    /// train the text encoder too
    #[param(default = false)]
    pub train_text_encoder: bool,
    /// add 0.1 × per-channel offset noise
    #[param(default = false)]
    pub offset_noise: bool,
}

/// The fields the scripts that fine-tune the UNet share beyond the common ones
/// (train_dreambooth.py's and train_text_to_image.py's: also `finetune`'s). Flattened beside
/// [`DreamBoothFields`], not inside it: serde refuses fields of a flattened struct within a
/// flattened struct under `deny_unknown_fields`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Params)]
pub struct UnetTuning {
    /// flip images horizontally at random
    #[param(default = false)]
    pub random_flip: bool,
    /// gradient clipping norm
    #[param(default = 1.0, range(0.0, MAX_GRAD_NORM))]
    pub max_grad_norm: f64,
    /// min-SNR-gamma loss weighting (5 recommended); unset: plain MSE
    #[param(default = null, range(0.0, MAX_WEIGHT))]
    pub snr_gamma: Option<f64>,
}

impl Stage for DreamBoothKind {
    super::training_kind_methods!(DreamBoothParams);
    fn kind(&self) -> &'static str {
        "dreambooth"
    }
    /// 2: mixed precision runs the trained modules under autocast with latents and noise in
    /// the weight dtype (fp16: loss scaling); also covers the fused AdamW kernel (8da37a1),
    /// which changed float32 results to rounding under version 1.
    fn version(&self) -> u32 {
        2
    }
    fn summary(&self) -> &'static str {
        "DreamBooth fine-tuning as diffusers' train_dreambooth.py (field names and defaults are its arguments; prior preservation when `class_images` is set). Output: a diffusers folder, `metrics.jsonl` (step, loss, lr, grad_norm), `validation/step-N.png` and `report.json`."
    }
    /// Prior preservation's rules, before anything runs (the stage checks them again).
    fn check_fields(&self, fields: &FieldView<'_>) -> Vec<(&'static str, String)> {
        let mut problems = prior_preservation_problems(fields);
        problems.extend(training::export_problem(fields.params));
        problems
    }
}

/// Prior preservation's rules between fields.
pub fn prior_preservation_problems(fields: &FieldView<'_>) -> Vec<(&'static str, String)> {
    let class_images = field!(DreamBoothFields, class_images);
    let mut problems = Vec::new();
    let has_class_images = fields.is_set(class_images);
    if fields.flag(field!(DreamBoothFields, with_prior_preservation)) && !has_class_images {
        problems.push((class_images, CLASS_IMAGES_REQUIRED.to_string()));
    }
    let class_prompt = field!(DreamBoothFields, class_prompt);
    if has_class_images && !fields.is_set(class_prompt) {
        problems.push((class_prompt, CLASS_PROMPT_REQUIRED.to_string()));
    }
    let preservation = field!(DreamBoothFields, with_prior_preservation);
    let written_false =
        (fields.written(preservation).into_iter()).any(|v| v == &Value::Bool(false));
    if has_class_images && written_false {
        problems.push((preservation, PRIOR_PRESERVATION_ALWAYS_ON.to_string()));
    }
    problems.extend(too_few_generated_class_images(fields));
    problems
}

/// The messages shared with the stage's run-time checks.
pub const CLASS_IMAGES_REQUIRED: &str =
    "is required with with_prior_preservation: give a folder or a `generate` stage";
pub const CLASS_PROMPT_REQUIRED: &str = "is required when class_images is set";
/// An explicit `with_prior_preservation: false` beside `class_images` (it would train with
/// prior preservation all the same).
pub const PRIOR_PRESERVATION_ALWAYS_ON: &str = "is false, but prior preservation is on whenever class_images is set; remove class_images to train without it (to compare both, use two stages: a sweep over this field cannot)";

/// `num_class_images` against the `count` of a `generate` stage named by `class_images`, when
/// that count is not swept.
fn too_few_generated_class_images(fields: &FieldView<'_>) -> Option<(&'static str, String)> {
    let num_class_images = field!(DreamBoothFields, num_class_images);
    let wanted = fields.params.get(num_class_images)?.as_u64()?;
    let upstream = fields
        .upstream
        .get(field!(DreamBoothFields, class_images))?;
    let generate = upstream.iter().find(|stage| stage.kind == GENERATE)?;
    let count = generate
        .params
        .get(field!(GenerateParams, count))?
        .as_u64()?;
    (count < wanted).then(|| {
        let message = format!(
            "is {wanted} but the `generate` stage `{}` makes only {count} images; raise its count or lower num_class_images",
            generate.name
        );
        (num_class_images, message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields of a stage with class images and `with_prior_preservation` as given.
    fn problems_with(preservation: Option<bool>, swept: &[bool]) -> Vec<(&'static str, String)> {
        let mut params = serde_json::Map::new();
        params.insert("class_images".into(), serde_json::json!("class"));
        params.insert("class_prompt".into(), serde_json::json!("a dog"));
        let value = preservation.unwrap_or(false);
        params.insert("with_prior_preservation".into(), Value::Bool(value));
        let mut defaulted = std::collections::BTreeSet::new();
        if preservation.is_none() {
            defaulted.insert("with_prior_preservation".to_string());
        }
        let values = swept.iter().map(|&b| Value::Bool(b)).collect();
        let matrix = if swept.is_empty() {
            Vec::new()
        } else {
            vec![("with_prior_preservation".to_string(), values)]
        };
        let view = FieldView {
            params: &params,
            defaulted: &defaulted,
            matrix: &matrix,
            upstream: Default::default(),
        };
        prior_preservation_problems(&view)
    }

    #[test]
    fn an_explicit_false_beside_class_images_is_refused_naming_the_field() {
        let refused = vec![(
            "with_prior_preservation",
            PRIOR_PRESERVATION_ALWAYS_ON.to_string(),
        )];
        assert_eq!(problems_with(Some(false), &[]), refused);
        assert_eq!(problems_with(None, &[true, false]), refused);
        assert_eq!(
            problems_with(None, &[]),
            vec![],
            "the default is not a choice"
        );
        assert_eq!(problems_with(Some(true), &[]), vec![]);
    }

    #[test]
    fn the_table_names_the_fields_of_the_struct() {
        dreampipe_core::stages::params::check_table::<DreamBoothParams>(&DreamBoothKind.schema())
            .unwrap();
    }
}
