//! The fields `dreambooth`, `dreambooth_lora` and `textual_inversion` share: diffusers'
//! training scripts' common arguments as one struct ([`TrainingParams`], flattened into each
//! kind's struct) and its table ([`common_schema`], with the defaults that differ between the
//! scripts passed in), and the closed sets among them.
use super::{Dtype, MAX_SEED};
use dreampipe_core::stages::params::Input;
use dreampipe_core::stages::{ParamSpec, ParamType};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

dreampipe_core::closed_set! {
    /// `lr_scheduler`: diffusers' `get_scheduler` names that `dreampipe::sd::train::lr_schedule`
    /// implements.
    pub enum LrScheduler {
        Constant = "constant",
        ConstantWithWarmup = "constant_with_warmup",
        Linear = "linear",
        Cosine = "cosine",
        CosineWithRestarts = "cosine_with_restarts",
        Polynomial = "polynomial",
    }
}

impl LrScheduler {
    /// Whether the learning rate at step k does not depend on the total steps: with such a
    /// schedule (and every random draw derived from seed and step), the first k steps of a
    /// longer run are a run of k steps.
    pub fn is_total_free(self) -> bool {
        TOTAL_FREE_SCHEDULES.contains(&self)
    }
}

/// The schedules of [`LrScheduler::is_total_free`].
pub const TOTAL_FREE_SCHEDULES: [LrScheduler; 2] =
    [LrScheduler::Constant, LrScheduler::ConstantWithWarmup];

dreampipe_core::closed_set! {
    /// `optimizer`: AdamW, or bitsandbytes' 8-bit AdamW (diffusers' `--use_8bit_adam`).
    pub enum OptimizerKind { AdamW = "adamw", AdamW8bit = "adamw8bit" }
}

dreampipe_core::closed_set! {
    /// `mixed_precision` as accelerate names it.
    pub enum MixedPrecision { No = "no", Fp16 = "fp16", Bf16 = "bf16" }
}

dreampipe_core::closed_set! {
    /// What `export:` accepts: the diffusers folder and/or one A1111 / ComfyUI file.
    pub enum ExportFormat { Diffusers = "diffusers", SingleFile = "single_file" }
}

/// The fields the training kinds share (diffusers' argument names), flattened into each kind's
/// struct; its table is [`common_schema`] without `export`, which LoRA runs do not have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingParams {
    /// Resolved by the runner: `ctx.inputs["model"]`.
    pub model: Input,
    pub seed: u64,
    pub resolution: u32,
    pub center_crop: bool,
    pub train_batch_size: usize,
    /// `None`: `num_train_epochs` over the data.
    pub max_train_steps: Option<u64>,
    pub num_train_epochs: u64,
    pub gradient_accumulation_steps: u64,
    pub gradient_checkpointing: bool,
    pub learning_rate: f64,
    pub scale_lr: bool,
    pub lr_scheduler: LrScheduler,
    pub lr_warmup_steps: u64,
    pub lr_num_cycles: u32,
    pub lr_power: f64,
    pub optimizer: OptimizerKind,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_weight_decay: f64,
    pub adam_epsilon: f64,
    pub mixed_precision: MixedPrecision,
    pub checkpointing_steps: u64,
    /// `None`: keep every checkpoint.
    pub checkpoints_total_limit: Option<usize>,
    /// `None`: no validation samples.
    pub validation_prompt: Option<String>,
    pub validation_steps: u64,
    pub validation_inference_steps: usize,
    /// Precision of the written single file (a LoRA run: of its LoRA files).
    pub save_dtype: Dtype,
    /// Precision of the validation samples.
    pub dtype: Dtype,
}

impl TrainingParams {
    /// Why a run with these fields is not the prefix of a longer one, if it is not.
    pub fn prefix_problem(&self) -> Option<String> {
        if self.max_train_steps.is_none() {
            return Some("`max_train_steps` is unset (the run counts epochs)".to_string());
        }
        let schedule = self.lr_scheduler;
        (!schedule.is_total_free()).then(|| {
            let names: Vec<&str> = TOTAL_FREE_SCHEDULES.iter().map(|s| s.name()).collect();
            format!(
                "lr_scheduler `{schedule}` depends on the total steps (only {} do not)",
                names.join(" and ")
            )
        })
    }

    /// The learning rate after `scale_lr` (times accumulation and batch size).
    pub fn effective_learning_rate(&self) -> f64 {
        if self.scale_lr {
            self.learning_rate
                * self.gradient_accumulation_steps as f64
                * self.train_batch_size as f64
        } else {
            self.learning_rate
        }
    }
}

/// [`TrainingParams::prefix_problem`] of a training kind's parameter map, parsed as `P`.
pub fn prefix_problem<P>(
    params: &serde_json::Map<String, Value>,
    training: impl Fn(&P) -> &TrainingParams,
) -> Option<String>
where
    P: serde::de::DeserializeOwned,
{
    match dreampipe_core::stages::params::parse::<P>(params) {
        Ok(typed) => training(&typed).prefix_problem(),
        Err(e) => Some(format!("the fields do not parse: {e}")),
    }
}

/// `export:` must name at least one format.
pub fn export_problem(params: &serde_json::Map<String, Value>) -> Option<(&'static str, String)> {
    let empty = params
        .get("export")
        .and_then(Value::as_array)
        .is_some_and(|formats| formats.is_empty());
    empty.then(|| {
        (
            "export",
            "names no format; give `diffusers`, `single_file` or both".to_string(),
        )
    })
}

/// Upper bounds of the step-like fields: far beyond any real run, low enough to catch typos.
const MAX_STEPS: f64 = 10_000_000.0;
/// Largest batch / accumulation accepted (memory bounds it long before).
const MAX_BATCH: f64 = 1024.0;
/// Resolution bounds: the VAE downsamples by 8; 4096 as for `images`.
const MIN_RESOLUTION: f64 = 8.0;
const MAX_RESOLUTION: f64 = 4096.0;
/// Largest learning rate accepted (anything above 1 diverges at once).
const MAX_LEARNING_RATE: f64 = 1.0;
/// AdamW's betas must lie in [0, 1) (PyTorch rejects 1).
const MAX_BETA: f64 = 0.999_999_999;
/// Largest denoising steps of a validation sample (schedulers have 1000 training timesteps).
const MAX_INFERENCE_STEPS: f64 = 1000.0;
/// diffusers' validation pipelines run 25 inference steps (textual_inversion.py).
const DEFAULT_VALIDATION_STEPS_INFERENCE: u64 = 25;
/// diffusers' `--validation_steps` default.
const DEFAULT_VALIDATION_STEPS: u64 = 100;

/// The field that sets how many optimizer steps a training kind runs (its `steps_field`).
pub const STEPS_FIELD: &str = "max_train_steps";

/// The defaults that differ between the two scripts.
pub struct ScriptDefaults {
    pub learning_rate: f64,
    pub train_batch_size: u64,
    pub max_train_steps: Value,
    pub num_train_epochs: u64,
}

/// The fields both scripts have, with their defaults (diffusers' argument names).
pub fn common_schema(defaults: &ScriptDefaults) -> Vec<ParamSpec> {
    use ParamType::{Bool, Integer, Number, String as Text};
    vec![
        ParamSpec::required(
            "model",
            ParamType::PathOrStageRef,
            "diffusers folder, or the stage that produced one (a `textual_inversion` stage: its `model/`)",
        )
        .model_folder(),
        ParamSpec::optional(
            "seed",
            Integer,
            json!(0),
            "seed of every random draw (diffusers: unseeded)",
        )
        .range(0.0, MAX_SEED),
        ParamSpec::optional(
            "resolution",
            Integer,
            json!(512),
            "training image side (a multiple of 8)",
        )
        .range(MIN_RESOLUTION, MAX_RESOLUTION)
        .multiple_of(8),
        ParamSpec::optional(
            "center_crop",
            Bool,
            json!(false),
            "center crop instead of a random crop",
        ),
        ParamSpec::optional(
            "train_batch_size",
            Integer,
            json!(defaults.train_batch_size),
            "images per micro-batch",
        )
        .range(1.0, MAX_BATCH),
        ParamSpec::optional(
            STEPS_FIELD,
            Integer,
            defaults.max_train_steps.clone(),
            "optimizer steps; unset: num_train_epochs over the data",
        )
        .range(1.0, MAX_STEPS),
        ParamSpec::optional(
            "num_train_epochs",
            Integer,
            json!(defaults.num_train_epochs),
            "epochs when max_train_steps is unset",
        )
        .range(1.0, MAX_STEPS),
        ParamSpec::optional(
            "gradient_accumulation_steps",
            Integer,
            json!(1),
            "micro-batches per optimizer step",
        )
        .range(1.0, MAX_BATCH),
        ParamSpec::optional(
            "gradient_checkpointing",
            Bool,
            json!(false),
            "recompute UNet blocks in the backward pass to save memory (dreambooth only; textual_inversion fails)",
        ),
        ParamSpec::optional(
            "learning_rate",
            Number,
            json!(defaults.learning_rate),
            "AdamW learning rate",
        )
        .range(0.0, MAX_LEARNING_RATE),
        ParamSpec::optional(
            "scale_lr",
            Bool,
            json!(false),
            "multiply learning_rate by batch size × accumulation",
        ),
        ParamSpec::optional(
            "lr_scheduler",
            Text,
            json!("constant"),
            "learning-rate schedule (diffusers' names)",
        )
        .one_of(LrScheduler::NAMES),
        ParamSpec::optional(
            "lr_warmup_steps",
            Integer,
            json!(500),
            "warmup steps of the lr schedule",
        )
        .range(0.0, MAX_STEPS),
        ParamSpec::optional(
            "lr_num_cycles",
            Integer,
            json!(1),
            "cycles of cosine_with_restarts",
        )
        .range(1.0, MAX_STEPS),
        ParamSpec::optional(
            "lr_power",
            Number,
            json!(1.0),
            "power of the polynomial schedule",
        )
        .range(0.0, 100.0),
        ParamSpec::optional(
            "optimizer",
            Text,
            json!("adamw"),
            "AdamW, or bitsandbytes' 8-bit AdamW (diffusers' --use_8bit_adam)",
        )
        .one_of(OptimizerKind::NAMES),
        ParamSpec::optional("adam_beta1", Number, json!(0.9), "AdamW beta1").range(0.0, MAX_BETA),
        ParamSpec::optional("adam_beta2", Number, json!(0.999), "AdamW beta2").range(0.0, MAX_BETA),
        ParamSpec::optional(
            "adam_weight_decay",
            Number,
            json!(1e-2),
            "AdamW decoupled weight decay",
        )
        .range(0.0, 1.0),
        ParamSpec::optional("adam_epsilon", Number, json!(1e-8), "AdamW epsilon").range(0.0, 1.0),
        ParamSpec::optional(
            "mixed_precision",
            Text,
            json!("no"),
            "mixed precision as accelerate: trained modules under autocast, frozen ones in this dtype; fp16 adds loss scaling (CUDA only)",
        )
        .one_of(MixedPrecision::NAMES),
        ParamSpec::optional(
            "checkpointing_steps",
            Integer,
            json!(500),
            "resume checkpoint every N steps (kept in the work folder)",
        )
        .range(1.0, MAX_STEPS),
        ParamSpec::optional(
            "checkpoints_total_limit",
            Integer,
            Value::Null,
            "keep only the newest N checkpoints; unset: all",
        )
        .range(1.0, MAX_STEPS),
        ParamSpec::optional(
            "validation_prompt",
            Text,
            Value::Null,
            "sample this prompt every validation_steps (seed `seed`) into validation/step-N.png; unset: no samples",
        ),
        ParamSpec::optional(
            "validation_steps",
            Integer,
            json!(DEFAULT_VALIDATION_STEPS),
            "steps between validation samples",
        )
        .range(1.0, MAX_STEPS),
        ParamSpec::optional(
            "validation_inference_steps",
            Integer,
            json!(DEFAULT_VALIDATION_STEPS_INFERENCE),
            "denoising steps of a validation sample",
        )
        .range(1.0, MAX_INFERENCE_STEPS),
        ParamSpec::optional(
            "export",
            ParamType::StringList,
            json!(["diffusers"]),
            "what the trained model is written as: `diffusers` (the folder) and/or `single_file` (`model.safetensors` in the A1111 / ComfyUI layout, configs in its metadata)",
        )
        .one_of(ExportFormat::NAMES),
        ParamSpec::optional(
            "save_dtype",
            Text,
            json!("f16"),
            "precision of `model.safetensors` (f32, f16, bf16)",
        )
        .one_of(Dtype::NAMES),
        ParamSpec::optional(
            "dtype",
            Text,
            json!("f32"),
            "precision of the validation samples",
        )
        .one_of(Dtype::NAMES),
    ]
}
