//! The `vae` stage: diffusers' train_autoencoderkl.py (reconstruction + KL, no LPIPS or
//! discriminator) on `images` (a folder, or a stage that makes one), training `model`'s VAE.
//! Output: the model with the new VAE as a diffusers folder, `metrics.jsonl`,
//! `validation/step-N.png` and `report.json`; checkpoints live in the work folder (resumed after
//! a crash).
use super::training::{self, RunSettings};
use super::{StageContext, StageError};
use crate::sd::train::vae::{self, VaeTrainConfig};
use dreampipe_core::field;
use dreampipe_kinds::sd::training::TrainingParams;
use dreampipe_kinds::sd::vae::VaeParams;

/// Runs a `vae` stage (its schema: `dreampipe_kinds::sd::vae`).
pub fn run(ctx: &StageContext<'_>) -> Result<(), StageError> {
    let params: VaeParams = ctx.typed()?;
    training::check_precision(ctx, &params.training)?;
    let model = training::resolve_model(
        ctx,
        training::single_resolved(ctx, field!(TrainingParams, model))?,
    )?;
    let images = training::checked_image_dir(ctx, field!(VaeParams, images))?;
    let config = VaeTrainConfig {
        training: params.training.clone(),
        rec_loss: params.rec_loss,
        kl_scale: params.kl_scale,
        max_grad_norm: params.max_grad_norm,
        fit_scaling_factor: params.fit_scaling_factor,
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
    let settings = RunSettings {
        training: &params.training,
        export: &params.output.export,
    };
    training::run_method(ctx, &settings, "vae", |callbacks| {
        vae::train(&config, callbacks)
    })
}
