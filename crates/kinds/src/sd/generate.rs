//! The `generate` stage: class images for prior preservation. Image `i` is txt2img with seed
//! `seed + i`, identical to `dreampipe sample --seed <seed+i>` with the same fields, whatever
//! `batch_size` is (each sample's initial noise is drawn from its own seeded generator).
//!
//! Incremental: every image is memoized in `<cache>/shared/generate/<memo key>.png`, keyed by
//! everything that decides its pixels and PNG text (stage id, model content digest, prompt,
//! negative prompt, its seed, steps, guidance, scheduler, size, dtype, device type). Raising
//! `count` changes the stage key, but the images already made are copied from the memo.
use super::{
    Dtype, MAX_SEED, SCHEDULER_CHOICES, SchedulerName, dtype_spec, guidance_spec,
    negative_prompt_spec, size_specs, steps_spec,
};
use dreampipe_core::stages::params::{Input, List};
use dreampipe_core::stages::{FieldView, ParamSpec, ParamType, Stage};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Largest `count`: 100k class images is far beyond DreamBooth's usual 200–1000.
const MAX_COUNT: f64 = 100_000.0;
/// Largest `batch_size`: bounded by memory long before this.
const MAX_BATCH: f64 = 256.0;

pub struct GenerateKind;

/// A `generate` stage's fields (its table: [`GenerateKind::schema`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateParams {
    /// Resolved by the runner: `ctx.inputs["model"]`.
    pub model: Input,
    /// Resolved by the runner: `ctx.inputs["loras"]`.
    pub loras: Input,
    pub lora_scales: List<f64>,
    pub prompt: String,
    pub negative_prompt: String,
    pub count: u64,
    /// `None`: the model's own.
    pub scheduler: Option<SchedulerName>,
    pub steps: usize,
    pub guidance: f64,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub seed: u64,
    pub batch_size: usize,
    pub dtype: Dtype,
}

impl Stage for GenerateKind {
    super::torch_kind_methods!();
    fn kind(&self) -> &'static str {
        "generate"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "Generates `count` class images with txt2img (image i uses seed `seed + i`, identical to `dreampipe sample --seed <seed+i>`). Output: `images/0000.png`… (A1111 parameters + stage id) and `manifest.json` (file, seed, prompt per image)."
    }
    fn schema(&self) -> Vec<ParamSpec> {
        let [width, height] = size_specs();
        vec![
            ParamSpec::required(
                "model",
                ParamType::PathOrStageRef,
                "diffusers model folder, or the stage that produced one",
            )
            .model_folder(),
            ParamSpec::optional(
                "loras",
                ParamType::PathOrStageRefList,
                json!([]),
                "LoRAs applied to the model: `dreambooth_lora` stages or LoRA .safetensors files (diffusers, PEFT or kohya layout); several add up",
            )
            .keyed_when_set(),
            ParamSpec::optional(
                "lora_scales",
                ParamType::NumberList,
                json!([]),
                "the weight of each entry of `loras`, in order; empty: 1 each",
            )
            .range(0.0, super::sample_grid::MAX_LORA_SCALE)
            .keyed_when_set(),
            ParamSpec::required("prompt", ParamType::String, "the class prompt"),
            negative_prompt_spec(),
            ParamSpec::required("count", ParamType::Integer, "number of images")
                .range(1.0, MAX_COUNT),
            ParamSpec::optional(
                "scheduler",
                ParamType::String,
                Value::Null,
                "the sampler; unset: the model's own",
            )
            .one_of(SCHEDULER_CHOICES),
            steps_spec(ParamType::Integer, "denoising steps"),
            guidance_spec(
                ParamType::Number,
                "classifier-free guidance scale (≤ 1 disables it)",
            ),
            width,
            height,
            ParamSpec::optional("seed", ParamType::Integer, json!(0), "seed of image 0")
                .range(0.0, MAX_SEED),
            ParamSpec::optional(
                "batch_size",
                ParamType::Integer,
                json!(1),
                "images per forward pass (same noise per seed; only float rounding may differ)",
            )
            .range(1.0, MAX_BATCH)
            .not_in_key(),
            dtype_spec(),
        ]
    }
    /// `lora_scales`, when given, has one weight per LoRA.
    fn check_fields(&self, fields: &FieldView<'_>) -> Vec<(&'static str, String)> {
        let count = |name: &str| {
            fields
                .params
                .get(name)
                .and_then(|v| v.as_array())
                .map_or(0, Vec::len)
        };
        let (loras, scales) = (count("loras"), count("lora_scales"));
        if scales == 0 || scales == loras {
            return Vec::new();
        }
        vec![(
            "lora_scales",
            format!(
                "has {scales} weights for {loras} LoRAs; give one per entry of `loras` (or none: 1 each)"
            ),
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_the_fields_of_the_struct() {
        dreampipe_core::stages::params::check_table::<GenerateParams>(&GenerateKind.schema())
            .unwrap();
    }
}
