//! The `textual_inversion` stage: diffusers' textual_inversion.py on `instance_images` (its
//! `train_data_dir`: a folder, or an `images` stage). Field names and defaults are the script's
//! arguments. Output: `learned_embeds.safetensors` (diffusers), `<token>.safetensors` (A1111 /
//! ComfyUI), `model/` (a diffusers folder with the new token: a `dreambooth` or other stage
//! whose `model:` names this stage uses it), `metrics.jsonl`, `validation/step-N.png` and
//! `report.json`. Checkpoints live in the work folder (resumed after a crash).
use super::training::{self, RunSettings};
use super::{StageContext, StageError};
use crate::sd::train::textual_inversion::{self, TextualInversionConfig};
use dreampipe_core::field;
use dreampipe_kinds::sd::textual_inversion::InversionFields;
use dreampipe_kinds::sd::textual_inversion::{NO_CHECKPOINTING, TextualInversionParams};
use dreampipe_kinds::sd::training::TrainingParams;

/// Runs a `textual_inversion` stage (its schema: `dreampipe_kinds::sd::textual_inversion`).
pub fn run(ctx: &StageContext<'_>) -> Result<(), StageError> {
    let params: TextualInversionParams = ctx.typed()?;
    let config = config_from(ctx, &params)?;
    let settings = RunSettings {
        training: &params.training,
        export: &params.output.export,
    };
    training::run_method(ctx, &settings, "textual_inversion", |callbacks| {
        textual_inversion::train(&config, callbacks)
    })
}

/// The library config: the stage's typed fields with the inputs resolved.
fn config_from(
    ctx: &StageContext<'_>,
    params: &TextualInversionParams,
) -> Result<TextualInversionConfig, StageError> {
    training::check_precision(ctx, &params.training)?;
    if params.training.gradient_checkpointing {
        let field = field!(TrainingParams, gradient_checkpointing);
        return Err(super::sd_common::field_error(ctx, field, NO_CHECKPOINTING));
    }
    let model = training::resolve_model(
        ctx,
        training::single_resolved(ctx, field!(TrainingParams, model))?,
    )?;
    let images = training::checked_image_dir(ctx, field!(InversionFields, instance_images))?;
    let config = TextualInversionConfig {
        training: params.training.clone(),
        inversion: params.inversion.clone(),
        pretrained_model_name_or_path: model,
        train_data_dir: images,
        output_dir: training::staged_output(ctx),
        work_dir: ctx.work_dir.to_path_buf(),
        keep_final_checkpoint: training::keeps_final_state(&params.training),
        resume_from_checkpoint: true,
        device: crate::device::to_tch(ctx.device),
    };
    config
        .validate()
        .map_err(|e| training::stage_error(ctx, e))?;
    Ok(config)
}
