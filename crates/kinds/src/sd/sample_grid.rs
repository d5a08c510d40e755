//! The `sample_grid` stage: samples every model × scheduler × steps × guidance × prompt × seed
//! and composes one labeled grid per prompt (rows: models, × schedulers / steps / guidance
//! when several are given; columns: seeds). Each sample equals
//! `dreampipe sample --seed <that seed>` with the same fields.
//!
//! `models` mixes stage names and folders. It gathers: a swept upstream contributes every
//! variant as its own row, labelled with the variant id (`db[learning_rate=2e-6]`), in one grid
//! stage.
use super::{
    Dtype, MAX_SEED, SCHEDULER_CHOICES, SchedulerName, dtype_spec, guidance_spec,
    negative_prompt_spec, size_specs, steps_spec,
};
use dreampipe_core::stages::params::{Input, List};
use dreampipe_core::stages::{FieldView, ParamSpec, ParamType, Stage};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Largest LoRA weight accepted (A1111 allows up to 2 in its UI; beyond 10 is a typo).
pub const MAX_LORA_SCALE: f64 = 10.0;
/// Default columns: four seeds, as A1111's default batch count of 4 shows.
const DEFAULT_SEEDS: [u64; 4] = [0, 1, 2, 3];

pub struct SampleGridKind;

/// A `sample_grid` stage's fields (its table: [`SampleGridKind::schema`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleGridParams {
    /// Resolved by the runner: `ctx.inputs["models"]`, one entry per variant.
    pub models: Input,
    /// Resolved by the runner: `ctx.inputs["base_model"]`.
    pub base_model: Option<Input>,
    pub lora_scales: List<f64>,
    /// Resolved by the runner: `ctx.inputs["loras"]`.
    pub loras: Input,
    pub lora_weights: List<f64>,
    pub prompts: List<String>,
    pub negative_prompt: String,
    pub seeds: List<u64>,
    /// Empty: the model's own.
    pub schedulers: List<SchedulerName>,
    pub steps: List<usize>,
    pub guidance: List<f64>,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub dtype: Dtype,
}

impl Stage for SampleGridKind {
    super::torch_kind_methods!();
    fn kind(&self) -> &'static str {
        "sample_grid"
    }
    fn version(&self) -> u32 {
        2
    }
    fn summary(&self) -> &'static str {
        "Samples every model × scheduler × steps × guidance × prompt × seed. Output: `samples/<model>/<prompt-index>/<seed>[-<scheduler>][-s<steps>][-g<guidance>].png` (A1111 parameters + stage id), `grid-<prompt-index>.png` (rows: models × schedulers × steps × guidance, columns: seeds) and `manifest.json`."
    }
    fn schema(&self) -> Vec<ParamSpec> {
        let [width, height] = size_specs();
        vec![
            ParamSpec::required(
                "models",
                ParamType::PathOrStageRefList,
                "stages producing models and/or diffusers model folders; every variant of a swept stage is a row; a `dreambooth_lora` stage or LoRA file samples `base_model` with the adapter (one row per `lora_scales`)",
            )
            .model_folder()
            .gathers(),
            ParamSpec::optional(
                "base_model",
                ParamType::PathOrStageRef,
                serde_json::Value::Null,
                "the model the LoRA entries of `models` sample on (required when `models` lists a `dreambooth_lora` stage or a LoRA file)",
            )
            .keyed_when_set(),
            ParamSpec::optional(
                "lora_scales",
                ParamType::NumberList,
                json!([1.0]),
                "adapter weights of the LoRA rows: each LoRA entry gets one row per scale (`name ×0.5`)",
            )
            .range(0.0, MAX_LORA_SCALE)
            .keyed_when_set(),
            ParamSpec::optional(
                "loras",
                ParamType::PathOrStageRefList,
                json!([]),
                "LoRAs applied to every row (a style on every model): `dreambooth_lora` stages or LoRA files; several add up",
            )
            .keyed_when_set(),
            ParamSpec::optional(
                "lora_weights",
                ParamType::NumberList,
                json!([]),
                "the weight of each entry of `loras`, in order; empty: 1 each",
            )
            .range(0.0, MAX_LORA_SCALE)
            .keyed_when_set(),
            ParamSpec::required("prompts", ParamType::StringList, "one grid per prompt"),
            negative_prompt_spec(),
            ParamSpec::optional(
                "seeds",
                ParamType::IntegerList,
                json!(DEFAULT_SEEDS),
                "columns: one seed each (at most 64, no repeats)",
            )
            .range(0.0, MAX_SEED),
            ParamSpec::optional(
                "schedulers",
                ParamType::StringList,
                json!([]),
                "schedulers to compare; empty: the model's own",
            )
            .one_of(SCHEDULER_CHOICES),
            steps_spec(
                ParamType::IntegerList,
                "denoising steps (a list compares several)",
            ),
            guidance_spec(
                ParamType::NumberList,
                "classifier-free guidance scale (a list compares several)",
            ),
            width,
            height,
            dtype_spec(),
        ]
    }
    /// A `dreambooth_lora` stage among `models` samples on `base_model`, which must be set.
    fn check_fields(&self, fields: &FieldView<'_>) -> Vec<(&'static str, String)> {
        let loras = fields.upstream.get("models").into_iter().flatten();
        let lora = loras
            .filter(|stage| stage.kind == "dreambooth_lora")
            .map(|stage| stage.name)
            .next();
        let no_scales = (fields.params.get("lora_scales"))
            .and_then(|v| v.as_array())
            .is_some_and(Vec::is_empty);
        let count = |name: &str| {
            (fields.params.get(name))
                .and_then(|v| v.as_array())
                .map_or(0, Vec::len)
        };
        let (loras, weights) = (count("loras"), count("lora_weights"));
        if weights != 0 && weights != loras {
            return vec![(
                "lora_weights",
                format!(
                    "has {weights} weights for {loras} LoRAs; give one per entry of `loras` (or none: 1 each)"
                ),
            )];
        }
        match lora {
            Some(_) if no_scales => vec![(
                "lora_scales",
                "is empty: `models` lists a LoRA stage, which gets one row per weight; give at least one (e.g. [1.0])".to_string(),
            )],
            Some(name) if !fields.is_set("base_model") => vec![(
                "base_model",
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
