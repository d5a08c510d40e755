//! The fields the training kinds share: diffusers' training scripts' common arguments as one
//! struct ([`TrainingParams`], flattened into each kind's struct; its table derived from it,
//! with the defaults that differ between the scripts set by [`ScriptDefaults::table`]),
//! `export` ([`ExportParams`]) and the closed sets among them.
use super::{Dtype, MAX_INFERENCE_STEPS, MAX_SEED};
use dreampipe_core::field;
use dreampipe_core::stages::ParamSpec;
use dreampipe_core::stages::params::{Input, ParamTable, Params, spec_mut};
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
/// struct; their table comes with each script's defaults from [`ScriptDefaults::table`].
/// (`model` is resolved by the runner: `ctx.inputs["model"]`.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Params)]
pub struct TrainingParams {
    /// diffusers folder, or the stage that produced one (a `textual_inversion` stage: its
    /// `model/`)
    #[param(model_folder)]
    pub model: Input,
    /// seed of every random draw (diffusers: unseeded)
    #[param(default = 0, range(0.0, MAX_SEED))]
    pub seed: u64,
    /// training image side (a multiple of 8)
    #[param(default = 512, range(MIN_RESOLUTION, MAX_RESOLUTION), multiple_of = 8)]
    pub resolution: u32,
    /// center crop instead of a random crop
    #[param(default = false)]
    pub center_crop: bool,
    /// images per micro-batch
    #[param(default = 4, range(1.0, MAX_BATCH))]
    pub train_batch_size: usize,
    /// optimizer steps; unset: num_train_epochs over the data
    #[param(default = null, range(1.0, MAX_STEPS))]
    pub max_train_steps: Option<u64>,
    /// epochs when max_train_steps is unset
    #[param(default = 1, range(1.0, MAX_STEPS))]
    pub num_train_epochs: u64,
    /// micro-batches per optimizer step
    #[param(default = 1, range(1.0, MAX_BATCH))]
    pub gradient_accumulation_steps: u64,
    /// recompute UNet blocks in the backward pass to save memory (dreambooth only;
    /// textual_inversion fails)
    #[param(default = false)]
    pub gradient_checkpointing: bool,
    /// AdamW learning rate
    #[param(default = 5e-6, range(0.0, MAX_LEARNING_RATE))]
    pub learning_rate: f64,
    /// multiply learning_rate by batch size × accumulation
    #[param(default = false)]
    pub scale_lr: bool,
    /// learning-rate schedule (diffusers' names)
    #[param(default = "constant")]
    pub lr_scheduler: LrScheduler,
    /// warmup steps of the lr schedule
    #[param(default = 500, range(0.0, MAX_STEPS))]
    pub lr_warmup_steps: u64,
    /// cycles of cosine_with_restarts
    #[param(default = 1, range(1.0, MAX_STEPS))]
    pub lr_num_cycles: u32,
    /// power of the polynomial schedule
    #[param(default = 1.0, range(0.0, 100.0))]
    pub lr_power: f64,
    /// AdamW, or bitsandbytes' 8-bit AdamW (diffusers' --use_8bit_adam)
    #[param(default = "adamw")]
    pub optimizer: OptimizerKind,
    /// AdamW beta1
    #[param(default = 0.9, range(0.0, MAX_BETA))]
    pub adam_beta1: f64,
    /// AdamW beta2
    #[param(default = 0.999, range(0.0, MAX_BETA))]
    pub adam_beta2: f64,
    /// AdamW decoupled weight decay
    #[param(default = 1e-2, range(0.0, 1.0))]
    pub adam_weight_decay: f64,
    /// AdamW epsilon
    #[param(default = 1e-8, range(0.0, 1.0))]
    pub adam_epsilon: f64,
    /// mixed precision as accelerate: trained modules under autocast, frozen ones in this
    /// dtype; fp16 adds loss scaling (CUDA only)
    #[param(default = "no")]
    pub mixed_precision: MixedPrecision,
    /// resume checkpoint every N steps (kept in the work folder)
    #[param(default = 500, range(1.0, MAX_STEPS))]
    pub checkpointing_steps: u64,
    /// keep only the newest N checkpoints; unset: all
    #[param(default = null, range(1.0, MAX_STEPS))]
    pub checkpoints_total_limit: Option<usize>,
    /// sample this prompt every validation_steps (seed `seed`) into validation/step-N.png;
    /// unset: no samples
    #[param(default = null)]
    pub validation_prompt: Option<String>,
    /// steps between validation samples
    #[param(default = DEFAULT_VALIDATION_STEPS, range(1.0, MAX_STEPS))]
    pub validation_steps: u64,
    /// denoising steps of a validation sample
    #[param(default = DEFAULT_VALIDATION_STEPS_INFERENCE, range(1.0, MAX_INFERENCE_STEPS))]
    pub validation_inference_steps: usize,
    /// precision of `model.safetensors` (f32, f16, bf16)
    #[param(default = "f16")]
    pub save_dtype: Dtype,
    /// precision of the validation samples
    #[param(default = "f32")]
    pub dtype: Dtype,
}

/// `export:`, the field of every training kind that writes a whole model (not `dreambooth_lora`,
/// whose output is always its two LoRA files).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Params)]
pub struct ExportParams {
    /// what the trained model is written as: `diffusers` (the folder) and/or `single_file`
    /// (`model.safetensors` in the A1111 / ComfyUI layout, configs in its metadata)
    #[param(default = ["diffusers"])]
    pub export: Vec<ExportFormat>,
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
    let name = field!(ExportParams, export);
    let empty = params
        .get(name)
        .and_then(Value::as_array)
        .is_some_and(|formats| formats.is_empty());
    empty.then(|| {
        (
            name,
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
/// diffusers' validation pipelines run 25 inference steps (textual_inversion.py).
const DEFAULT_VALIDATION_STEPS_INFERENCE: u64 = 25;
/// diffusers' `--validation_steps` default.
const DEFAULT_VALIDATION_STEPS: u64 = 100;

/// The field that sets how many optimizer steps a training kind runs (its `steps_field`).
pub const STEPS_FIELD: &str = field!(TrainingParams, max_train_steps);

/// The defaults that differ between the scripts.
pub struct ScriptDefaults {
    pub learning_rate: f64,
    pub train_batch_size: u64,
    pub max_train_steps: Option<u64>,
    pub num_train_epochs: u64,
}

impl ScriptDefaults {
    /// The shared training fields' table with this script's defaults.
    pub fn table(&self) -> Vec<ParamSpec> {
        let mut specs = TrainingParams::param_specs();
        let mut set = |name: &str, value: Value| spec_mut(&mut specs, name).default = Some(value);
        set(
            field!(TrainingParams, learning_rate),
            json!(self.learning_rate),
        );
        set(
            field!(TrainingParams, train_batch_size),
            json!(self.train_batch_size),
        );
        set(
            field!(TrainingParams, max_train_steps),
            json!(self.max_train_steps),
        );
        set(
            field!(TrainingParams, num_train_epochs),
            json!(self.num_train_epochs),
        );
        specs
    }
}
