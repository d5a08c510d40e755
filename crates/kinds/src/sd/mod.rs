//! The Stable Diffusion stage kinds as the front binary knows them: each kind's schema,
//! version, device class and summary (plain data), so `validate`, `plan`, `explain` and cached
//! runs need no libtorch. Running one takes the torch worker (`dreampipe-torch`), which pairs
//! each kind with its implementation through [`dreampipe_core::stages::Registry::implement`]. Also the field
//! specs the kinds share.
pub mod dreambooth;
pub mod dreambooth_lora;
pub mod embed;
pub mod evaluate;
pub mod finetune;
pub mod generate;
pub mod sample_grid;
pub mod textual_inversion;
pub mod training;

pub use dreampipe_core::stages::field_error;
use dreampipe_core::stages::{ParamSpec, ParamType};
use serde_json::{Value, json};

/// diffusers' `StableDiffusionPipeline.__call__` defaults (`num_inference_steps`,
/// `guidance_scale`); `sd::pipeline` uses the same values.
pub const DEFAULT_STEPS: usize = 50;
pub const DEFAULT_GUIDANCE: f64 = 7.5;
/// Largest seed: JSON integers are exact up to 2^53 − 1.
pub const MAX_SEED: f64 = 9_007_199_254_740_991.0;

dreampipe_core::closed_set! {
    /// A precision of weights or of written files: `dtype`, `save_dtype` (those of
    /// `dreampipe sample --dtype`).
    pub enum Dtype { F32 = "f32", F16 = "f16", Bf16 = "bf16" }
}

dreampipe_core::closed_set! {
    /// A sampler: every `SchedulerKind::name()` of the torch side (a test keeps them in sync).
    pub enum SchedulerName {
        Ddim = "ddim",
        Pndm = "pndm",
        Lms = "lms",
        Euler = "euler",
        EulerAncestral = "euler-a",
        DpmSolver = "dpm++",
        Ddpm = "ddpm",
    }
}

/// The accepted `dtype` values, for [`ParamSpec::one_of`].
pub const DTYPE_CHOICES: &[&str] = Dtype::NAMES;
/// The accepted scheduler names, for [`ParamSpec::one_of`].
pub const SCHEDULER_CHOICES: &[&str] = SchedulerName::NAMES;
pub use crate::png::{KEY_FIELD, PIPELINE_FIELD, STAGE_FIELD};

/// Largest `steps` (diffusers schedulers use ≤ 1000 training timesteps).
const MAX_STEPS: f64 = 1000.0;
/// Largest guidance scale accepted (A1111's slider ends at 30; 100 leaves room).
const MAX_GUIDANCE: f64 = 100.0;
/// Image side limits: the VAE downsamples by 8; 4096 as for `images`.
const MIN_SIZE: f64 = 8.0;
const MAX_SIZE: f64 = 4096.0;

/// The `negative_prompt` field (default empty).
pub fn negative_prompt_spec() -> ParamSpec {
    ParamSpec::optional(
        "negative_prompt",
        ParamType::String,
        json!(""),
        "negative prompt",
    )
}

/// The `steps` field (`Integer`, or `IntegerList` to compare several), 1 to 1000.
pub fn steps_spec(kind: ParamType, doc: &'static str) -> ParamSpec {
    ParamSpec::optional("steps", kind, json!(DEFAULT_STEPS), doc).range(1.0, MAX_STEPS)
}

/// The `guidance` field (`Number`, or `NumberList` to compare several), 0 to 100.
pub fn guidance_spec(kind: ParamType, doc: &'static str) -> ParamSpec {
    ParamSpec::optional("guidance", kind, json!(DEFAULT_GUIDANCE), doc).range(0.0, MAX_GUIDANCE)
}

/// The `width` and `height` fields (unset: the model's default size).
pub fn size_specs() -> [ParamSpec; 2] {
    let side = |name: &'static str, doc: &'static str| {
        ParamSpec::optional(name, ParamType::Integer, Value::Null, doc)
            .range(MIN_SIZE, MAX_SIZE)
            .multiple_of(8)
    };
    [
        side(
            "width",
            "image width (a multiple of 8); unset: the model's default",
        ),
        side(
            "height",
            "image height (a multiple of 8); unset: the model's default",
        ),
    ]
}

/// The `dtype` field (default f32).
pub fn dtype_spec() -> ParamSpec {
    ParamSpec::optional(
        "dtype",
        ParamType::String,
        json!("f32"),
        "weights' precision",
    )
    .one_of(DTYPE_CHOICES)
}
