//! The `sample_grid` stage: samples every model × scheduler × steps × guidance × prompt × seed
//! and composes one labeled grid per prompt (rows: models, × schedulers / steps / guidance
//! when several are given; columns: seeds). Each sample equals
//! `dreampipe sample --seed <that seed>` with the same fields.
//!
//! `models` mixes stage names and folders. It gathers: a swept upstream contributes every
//! variant as its own row, labelled with the variant id (`db[learning_rate=2e-6]`), in one grid
//! stage.
use super::dreambooth_lora::DREAMBOOTH_LORA;
use super::{
    DEFAULT_GUIDANCE, DEFAULT_STEPS, Dtype, MAX_GUIDANCE, MAX_INFERENCE_STEPS, MAX_SEED, MAX_SIZE,
    MIN_SIZE, SchedulerName,
};
use dreampipe_core::field;
use dreampipe_core::stages::params::{Input, List, Params};
use dreampipe_core::stages::{FieldView, Stage};
use serde::{Deserialize, Serialize};

/// Largest LoRA weight accepted (A1111 allows up to 2 in its UI; beyond 10 is a typo).
pub const MAX_LORA_SCALE: f64 = 10.0;
/// Default columns: four seeds, as A1111's default batch count of 4 shows.
const DEFAULT_SEEDS: [u64; 4] = [0, 1, 2, 3];

pub struct SampleGridKind;

/// A `sample_grid` stage's fields (its table is derived: [`Params`]); the inputs are resolved
/// by the runner (`ctx.inputs`; `models` one entry per variant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct SampleGridParams {
    /// stages producing models and/or diffusers model folders; every variant of a swept stage
    /// is a row; a `dreambooth_lora` stage or LoRA file samples `base_model` with the adapter
    /// (one row per `lora_scales`)
    #[param(ty = PathOrStageRefList, model_folder, gathers)]
    pub models: Input,
    /// the model the LoRA entries of `models` sample on (required when `models` lists a
    /// `dreambooth_lora` stage or a LoRA file)
    #[param(default = null, keyed_when_set)]
    pub base_model: Option<Input>,
    /// adapter weights of the LoRA rows: each LoRA entry gets one row per scale (`name ×0.5`)
    #[param(default = [1.0], range(0.0, MAX_LORA_SCALE), keyed_when_set)]
    pub lora_scales: List<f64>,
    /// LoRAs applied to every row (a style on every model): `dreambooth_lora` stages or LoRA
    /// files; several add up
    #[param(ty = PathOrStageRefList, default = [], keyed_when_set)]
    pub loras: Input,
    /// the weight of each entry of `loras`, in order; empty: 1 each
    #[param(default = [], range(0.0, MAX_LORA_SCALE), keyed_when_set)]
    pub lora_weights: List<f64>,
    /// one grid per prompt
    pub prompts: List<String>,
    /// negative prompt
    #[param(default = "")]
    pub negative_prompt: String,
    /// columns: one seed each (at most 64, no repeats)
    #[param(default = DEFAULT_SEEDS, range(0.0, MAX_SEED))]
    pub seeds: List<u64>,
    /// schedulers to compare; empty: the model's own
    #[param(default = [])]
    pub schedulers: List<SchedulerName>,
    /// denoising steps (a list compares several)
    #[param(default = DEFAULT_STEPS, range(1.0, MAX_INFERENCE_STEPS))]
    pub steps: List<usize>,
    /// classifier-free guidance scale (a list compares several)
    #[param(default = DEFAULT_GUIDANCE, range(0.0, MAX_GUIDANCE))]
    pub guidance: List<f64>,
    /// image width (a multiple of 8); unset: the model's default
    #[param(default = null, range(MIN_SIZE, MAX_SIZE), multiple_of = 8)]
    pub width: Option<i64>,
    /// image height (a multiple of 8); unset: the model's default
    #[param(default = null, range(MIN_SIZE, MAX_SIZE), multiple_of = 8)]
    pub height: Option<i64>,
    /// weights' precision
    #[param(default = "f32")]
    pub dtype: Dtype,
}

impl Stage for SampleGridKind {
    super::torch_kind_methods!(SampleGridParams);
    fn kind(&self) -> &'static str {
        "sample_grid"
    }
    /// 3: pictures under 96 px are drawn enlarged in the grid.
    fn version(&self) -> u32 {
        3
    }
    fn summary(&self) -> &'static str {
        "Samples every model × scheduler × steps × guidance × prompt × seed. Output: `samples/<model>/<prompt-index>/<seed>[-<scheduler>][-s<steps>][-g<guidance>].png` (A1111 parameters + stage id), `grid-<prompt-index>.png` (rows: models × schedulers × steps × guidance, columns: seeds; pictures under 96 px drawn enlarged, each pixel a block) and `manifest.json`."
    }
    /// A `dreambooth_lora` stage among `models` samples on `base_model`, which must be set.
    fn check_fields(&self, fields: &FieldView<'_>) -> Vec<(&'static str, String)> {
        let models = fields.upstream.get(field!(SampleGridParams, models));
        let lora = (models.into_iter().flatten())
            .filter(|stage| stage.kind == DREAMBOOTH_LORA)
            .map(|stage| stage.name)
            .next();
        let list_len = |name: &str| {
            (fields.params.get(name))
                .and_then(|v| v.as_array())
                .map(Vec::len)
        };
        let lora_weights = field!(SampleGridParams, lora_weights);
        let loras = list_len(field!(SampleGridParams, loras)).unwrap_or(0);
        let weights = list_len(lora_weights).unwrap_or(0);
        if weights != 0 && weights != loras {
            return vec![(
                lora_weights,
                format!(
                    "has {weights} weights for {loras} LoRAs; give one per entry of `loras` (or none: 1 each)"
                ),
            )];
        }
        let lora_scales = field!(SampleGridParams, lora_scales);
        let base_model = field!(SampleGridParams, base_model);
        match lora {
            Some(_) if list_len(lora_scales) == Some(0) => vec![(
                lora_scales,
                "is empty: `models` lists a LoRA stage, which gets one row per weight; give at least one (e.g. [1.0])".to_string(),
            )],
            Some(name) if !fields.is_set(base_model) => vec![(
                base_model,
                format!(
                    "is required: `models` lists the LoRA stage `{name}`, whose rows sample the base model with its adapter"
                ),
            )],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_the_fields_of_the_struct() {
        dreampipe_core::stages::params::check_table::<SampleGridParams>(&SampleGridKind.schema())
            .unwrap();
    }
}
