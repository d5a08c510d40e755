//! The fields `dreambooth` and `textual_inversion` share: diffusers' two training scripts'
//! common arguments, with the defaults that differ between them passed in.
use super::MAX_SEED;
use crate::stages::{ParamSpec, ParamType};
use serde_json::{Value, json};

/// diffusers' `get_scheduler` names that `dreampipe::sd::train::lr_schedule` implements.
pub const LR_SCHEDULE_NAMES: [&str; 6] = [
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
];
/// Schedules whose learning rate at step k does not depend on the total steps: with them (and
/// every random draw derived from seed and step), the first k steps of a longer run are a run
/// of k steps.
pub const TOTAL_FREE_SCHEDULES: [&str; 2] = ["constant", "constant_with_warmup"];

/// Why a training run with these fields is not the prefix of a longer one, if it is not.
pub fn prefix_problem(params: &serde_json::Map<String, Value>) -> Option<String> {
    if !params.get("max_train_steps").is_some_and(Value::is_u64) {
        return Some("`max_train_steps` is unset (the run counts epochs)".to_string());
    }
    let schedule = params.get("lr_scheduler").and_then(Value::as_str)?;
    (!TOTAL_FREE_SCHEDULES.contains(&schedule)).then(|| {
        format!(
            "lr_scheduler `{schedule}` depends on the total steps (only {} do not)",
            TOTAL_FREE_SCHEDULES.join(" and ")
        )
    })
}

/// What `export:` accepts.
pub const EXPORT_FORMATS: [&str; 2] = ["diffusers", "single_file"];

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
            "max_train_steps",
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
        .one_of(&LR_SCHEDULE_NAMES),
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
        .one_of(&["adamw", "adamw8bit"]),
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
        .one_of(&["no", "fp16", "bf16"]),
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
        .one_of(&EXPORT_FORMATS),
        ParamSpec::optional(
            "save_dtype",
            Text,
            json!("f16"),
            "precision of `model.safetensors` (f32, f16, bf16)",
        )
        .one_of(&["f32", "f16", "bf16"]),
        ParamSpec::optional(
            "dtype",
            Text,
            json!("f32"),
            "precision of the validation samples",
        )
        .one_of(&["f32", "f16", "bf16"]),
    ]
}
