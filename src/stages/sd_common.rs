//! What the Stable Diffusion stage kinds (`generate`, `sample_grid`) share: the torch side of
//! the dtype and scheduler fields, loading models from the pool, and writing samples as PNGs that
//! carry their A1111 parameters plus the dreampipe stage id.
use super::{ResolvedInput, StageContext, StageError};
use crate::sd::pipeline::Txt2ImgOutput;
use crate::sd::png::{
    GenerationParameters, a1111_sampler_name, short_weights_hash, tensor_to_rgb_bytes,
    write_rgb_png,
};
use crate::sd::pool::{self, SharedModel};
use crate::sd::schedulers::SchedulerKind;
use dreampipe_core::field;
use dreampipe_kinds::sd::generate::GenerateParams;
use std::path::Path;
use tch::Kind;

pub use dreampipe_kinds::sd::{
    DTYPE_CHOICES, Dtype, KEY_FIELD, PIPELINE_FIELD, SCHEDULER_CHOICES, STAGE_FIELD, SchedulerName,
    field_error,
};

/// The libtorch kind of a `dtype` / `save_dtype` value.
pub fn kind_of(dtype: Dtype) -> Kind {
    match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::Bf16 => Kind::BFloat16,
    }
}

/// The sampler a scheduler field names.
pub fn scheduler_kind(name: SchedulerName) -> SchedulerKind {
    match name {
        SchedulerName::Ddim => SchedulerKind::Ddim,
        SchedulerName::Pndm => SchedulerKind::Pndm,
        SchedulerName::Lms => SchedulerKind::Lms,
        SchedulerName::Euler => SchedulerKind::Euler,
        SchedulerName::EulerAncestral => SchedulerKind::EulerAncestral,
        SchedulerName::DpmSolver => SchedulerKind::DpmSolverMultistep,
        SchedulerName::Ddpm => SchedulerKind::Ddpm,
    }
}

/// The model from the pool (loaded once per process, device and kind).
pub fn load_model(
    ctx: &StageContext<'_>,
    field: &str,
    dir: &Path,
    kind: Kind,
) -> Result<SharedModel, StageError> {
    pool::get(dir, crate::device::to_tch(ctx.device), kind).map_err(|e| field_error(ctx, field, e))
}

/// [`StableDiffusion::with_loras`] for a stage: a LoRA that does not fit the model is an
/// error of `field`.
pub fn with_loras<T>(
    ctx: &StageContext<'_>,
    field: &str,
    model: &mut crate::sd::pipeline::StableDiffusion,
    loras: &[crate::sd::lora::ScaledLora<'_>],
    work: impl FnOnce(&crate::sd::pipeline::StableDiffusion) -> Result<T, StageError>,
) -> Result<T, StageError> {
    /// A stage error, or the LoRA error attaching failed with.
    enum Failure {
        Stage(StageError),
        Lora(crate::sd::lora::LoraError),
    }
    impl From<crate::sd::lora::LoraError> for Failure {
        fn from(error: crate::sd::lora::LoraError) -> Self {
            Failure::Lora(error)
        }
    }
    let result = model.with_loras(loras, |model| work(model).map_err(Failure::Stage));
    result.map_err(|failure| match failure {
        Failure::Stage(error) => error,
        Failure::Lora(error) => field_error(ctx, field, error),
    })
}

/// One entry of a stage's `loras` field: the LoRA file it names, its input and its scale.
pub struct LoraInput<'a> {
    pub file: std::path::PathBuf,
    pub input: &'a ResolvedInput,
    pub scale: f64,
}

/// The `loras` field's entries with their `scales` (1 each when absent); an entry that is not
/// a LoRA (neither a `dreambooth_lora` output nor a LoRA .safetensors file) is an error of
/// `loras`.
pub fn lora_inputs<'a>(
    ctx: &'a StageContext<'_>,
    scales: &[f64],
) -> Result<Vec<LoraInput<'a>>, StageError> {
    let inputs = ctx
        .inputs
        .get(field!(GenerateParams, loras))
        .map(Vec::as_slice)
        .unwrap_or_default();
    let entry = |(index, input): (usize, &'a ResolvedInput)| {
        let file = crate::sd::lora::files::lora_file_of(&input.path).ok_or_else(|| {
            let message = format!(
                "`{}` is not a LoRA: give a `dreambooth_lora` stage or a LoRA .safetensors file",
                input.path.display()
            );
            field_error(ctx, field!(GenerateParams, loras), message)
        })?;
        let scale = scales.get(index).copied().unwrap_or(1.0);
        Ok(LoraInput { file, input, scale })
    };
    inputs.iter().enumerate().map(entry).collect()
}

/// How a model input is named in labels and PNG parameters: the upstream stage's full id
/// (`db[learning_rate=2e-6]` for a sweep variant), or the folder's name.
pub fn model_label(input: &ResolvedInput) -> String {
    input.label()
}

/// What one sample was made from, for its PNG parameters.
pub struct SampleInfo<'a> {
    pub prompt: &'a str,
    pub negative_prompt: &'a str,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
    pub model_hash: &'a str,
    pub model_name: &'a str,
}

/// Writes image `index` of `output` to `path` with its A1111 parameters and the stage id.
pub fn write_sample(
    ctx: &StageContext<'_>,
    path: &Path,
    output: &Txt2ImgOutput,
    index: i64,
    info: &SampleInfo<'_>,
) -> Result<(), StageError> {
    write_sample_as(ctx, path, output, index, info, provenance(ctx))
}

/// [`write_sample`] naming another stage (`provenance`: its id, key and pipeline), for the
/// samples a longer run writes for the shorter variants it serves.
pub fn write_sample_as(
    ctx: &StageContext<'_>,
    path: &Path,
    output: &Txt2ImgOutput,
    index: i64,
    info: &SampleInfo<'_>,
    provenance: Vec<(String, String)>,
) -> Result<(), StageError> {
    let parameters = GenerationParameters {
        prompt: info.prompt.to_string(),
        negative_prompt: info.negative_prompt.to_string(),
        steps: info.steps,
        sampler: a1111_sampler_name(output.scheduler).to_string(),
        guidance: info.guidance,
        seed: info.seed,
        width: output.width,
        height: output.height,
        model_hash: info.model_hash.to_string(),
        model_name: info.model_name.to_string(),
        extra: provenance,
    };
    let rgb = tensor_to_rgb_bytes(&output.images.get(index));
    let (width, height) = (output.width as u32, output.height as u32);
    write_rgb_png(path, &rgb, width, height, Some(&parameters))
        .map_err(|e| StageError::library(ctx.stage_id, e))
}

/// dreampipe's fields at the end of the A1111 settings line: stage id, stage key, pipeline.
pub fn provenance(ctx: &StageContext<'_>) -> Vec<(String, String)> {
    provenance_of(ctx.stage_id, ctx.key, ctx.pipeline)
}

/// The dreampipe fields for stage `stage_id` with `key` in `pipeline`.
pub fn provenance_of(stage_id: &str, key: &str, pipeline: &str) -> Vec<(String, String)> {
    vec![
        (STAGE_FIELD.to_string(), stage_id.to_string()),
        (KEY_FIELD.to_string(), key.to_string()),
        (PIPELINE_FIELD.to_string(), pipeline.to_string()),
    ]
}

/// Rewrites the dreampipe fields of a PNG made by an earlier run (a memoized image) so it names
/// this run's stage key and pipeline; pixels and the other parameters are kept.
pub fn restamp_sample(ctx: &StageContext<'_>, path: &Path) -> Result<(), StageError> {
    stamp_from(ctx, path, path, &[])
}

/// Rewrites a sample another stage (`other_id`) made so that it names this stage: its `Model:`
/// field and dreampipe fields; pixels and the other parameters are kept (the bytes are what
/// this stage would have written for the same image).
pub fn restamp_as_this_stage(
    ctx: &StageContext<'_>,
    path: &Path,
    other_id: &str,
) -> Result<(), StageError> {
    let failed = |e| StageError::library(ctx.stage_id, e);
    let text = crate::sd::png::read_parameters_text(path)
        .map_err(failed)?
        .unwrap_or_default();
    let marker = format!(", {STAGE_FIELD}: ");
    let base = text.split(&marker).next().unwrap_or_default().replace(
        &format!("Model: {other_id}"),
        &format!("Model: {}", ctx.stage_id),
    );
    let fields: Vec<String> = (provenance(ctx).iter())
        .map(|(k, v)| crate::sd::png::settings_field(k, v))
        .collect();
    let stamped = format!("{base}, {}", fields.join(", "));
    crate::sd::png::replace_parameters_text(path, &stamped).map_err(failed)
}

/// Writes into `target`'s parameters chunk the generation parameters of `source` (an image
/// this stage wrote) with this stage's dreampipe fields and `extra` ones (a grid's rows and
/// columns) in place of the dreampipe fields `source` had; `target`'s pixels are kept.
pub fn stamp_from(
    ctx: &StageContext<'_>,
    source: &Path,
    target: &Path,
    extra: &[(String, String)],
) -> Result<(), StageError> {
    let failed = |e| StageError::library(ctx.stage_id, e);
    let text = crate::sd::png::read_parameters_text(source)
        .map_err(failed)?
        .unwrap_or_default();
    let marker = format!(", {STAGE_FIELD}: ");
    let base = text.split(&marker).next().unwrap_or_default();
    let fields: Vec<String> = (provenance(ctx).iter().chain(extra))
        .map(|(k, v)| crate::sd::png::settings_field(k, v))
        .collect();
    let stamped = format!("{base}, {}", fields.join(", "));
    crate::sd::png::replace_parameters_text(target, &stamped).map_err(failed)
}

/// A1111's short model hash of the folder's UNet weights (as `dreampipe sample` writes it).
pub fn model_hash(dir: &Path) -> String {
    short_weights_hash(dir)
}

/// Writes `manifest.json` into the output folder.
pub fn write_manifest(
    ctx: &StageContext<'_>,
    manifest: &serde_json::Value,
) -> Result<(), StageError> {
    let path = ctx.out_dir.join("manifest.json");
    let text = serde_json::to_string_pretty(manifest)
        .map_err(|e| StageError::serialize(ctx.stage_id, "manifest", e))?;
    std::fs::write(&path, text).map_err(|e| StageError::io("write", &path, e))
}

/// Creates `dir` (and its parents).
pub fn create_dir(dir: &Path) -> Result<(), StageError> {
    std::fs::create_dir_all(dir).map_err(|e| StageError::io("create", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_sets_match_the_torch_side() {
        let names: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(SCHEDULER_CHOICES, names.as_slice());
        for name in SchedulerName::ALL {
            assert_eq!(scheduler_kind(*name).name(), name.name());
        }
        let kinds: Vec<Kind> = Dtype::ALL.iter().map(|d| kind_of(*d)).collect();
        assert_eq!(kinds, [Kind::Float, Kind::Half, Kind::BFloat16]);
        assert_eq!(DTYPE_CHOICES, ["f32", "f16", "bf16"]);
    }

    /// The kinds crate's schemas state these without libtorch; the implementation must agree.
    #[test]
    fn schema_defaults_match_the_implementation() {
        use dreampipe_kinds::sd as kinds;
        assert_eq!(kinds::DEFAULT_STEPS, crate::sd::pipeline::DEFAULT_STEPS);
        assert_eq!(
            kinds::DEFAULT_GUIDANCE,
            crate::sd::pipeline::DEFAULT_GUIDANCE
        );
    }
}
