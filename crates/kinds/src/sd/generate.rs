//! The `generate` stage: class images for prior preservation. Image `i` is txt2img with seed
//! `seed + i`, identical to `dreampipe sample --seed <seed+i>` with the same fields, whatever
//! `batch_size` is (each sample's initial noise is drawn from its own seeded generator).
//!
//! Incremental: every image is memoized in `<cache>/shared/generate/<memo key>.png`, keyed by
//! everything that decides its pixels and PNG text (stage id, model content digest, prompt,
//! negative prompt, its seed, steps, guidance, scheduler, size, dtype, device type). Raising
//! `count` changes the stage key, but the images already made are copied from the memo.
use super::sample_grid::MAX_LORA_SCALE;
use super::{
    DEFAULT_GUIDANCE, DEFAULT_STEPS, Dtype, MAX_GUIDANCE, MAX_INFERENCE_STEPS, MAX_SEED, MAX_SIZE,
    MIN_SIZE, SchedulerName,
};
use dreampipe_core::field;
use dreampipe_core::stages::params::{Input, List, Params};
use dreampipe_core::stages::{FieldView, Stage};
use serde::{Deserialize, Serialize};

/// Largest `count`: 100k class images is far beyond DreamBooth's usual 200–1000.
const MAX_COUNT: f64 = 100_000.0;
/// Largest `batch_size`: bounded by memory long before this.
const MAX_BATCH: f64 = 256.0;

pub struct GenerateKind;

/// The kind's name.
pub const GENERATE: &str = "generate";

/// A `generate` stage's fields (its table is derived: [`Params`]); the inputs are resolved by
/// the runner (`ctx.inputs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct GenerateParams {
    /// diffusers model folder, or the stage that produced one
    #[param(model_folder)]
    pub model: Input,
    /// LoRAs applied to the model: `dreambooth_lora` stages or LoRA .safetensors files
    /// (diffusers, PEFT or kohya layout); several add up
    #[param(ty = PathOrStageRefList, default = [], keyed_when_set)]
    pub loras: Input,
    /// the weight of each entry of `loras`, in order; empty: 1 each
    #[param(default = [], range(0.0, MAX_LORA_SCALE), keyed_when_set)]
    pub lora_scales: List<f64>,
    /// the class prompt
    pub prompt: String,
    /// negative prompt
    #[param(default = "")]
    pub negative_prompt: String,
    /// number of images
    #[param(range(1.0, MAX_COUNT))]
    pub count: u64,
    /// the sampler; unset: the model's own
    #[param(default = null)]
    pub scheduler: Option<SchedulerName>,
    /// denoising steps
    #[param(default = DEFAULT_STEPS, range(1.0, MAX_INFERENCE_STEPS))]
    pub steps: usize,
    /// classifier-free guidance scale (≤ 1 disables it)
    #[param(default = DEFAULT_GUIDANCE, range(0.0, MAX_GUIDANCE))]
    pub guidance: f64,
    /// image width (a multiple of 8); unset: the model's default
    #[param(default = null, range(MIN_SIZE, MAX_SIZE), multiple_of = 8)]
    pub width: Option<i64>,
    /// image height (a multiple of 8); unset: the model's default
    #[param(default = null, range(MIN_SIZE, MAX_SIZE), multiple_of = 8)]
    pub height: Option<i64>,
    /// seed of image 0
    #[param(default = 0, range(0.0, MAX_SEED))]
    pub seed: u64,
    /// images per forward pass (same noise per seed; only float rounding may differ)
    #[param(default = 1, range(1.0, MAX_BATCH), not_in_key)]
    pub batch_size: usize,
    /// weights' precision
    #[param(default = "f32")]
    pub dtype: Dtype,
}

impl Stage for GenerateKind {
    super::torch_kind_methods!(GenerateParams);
    fn kind(&self) -> &'static str {
        GENERATE
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "Generates `count` class images with txt2img (image i uses seed `seed + i`, identical to `dreampipe sample --seed <seed+i>`). Output: `images/0000.png`… (A1111 parameters + stage id) and `manifest.json` (file, seed, prompt per image)."
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
        let lora_scales = field!(GenerateParams, lora_scales);
        let (loras, scales) = (count(field!(GenerateParams, loras)), count(lora_scales));
        if scales == 0 || scales == loras {
            return Vec::new();
        }
        vec![(
            lora_scales,
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
