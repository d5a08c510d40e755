//! The `dreambooth` stage: diffusers' train_dreambooth.py on `instance_images` (a folder, or an
//! `images` stage) with `instance_prompt`; prior preservation when `class_images` is given (a
//! folder, or a `generate` / `images` stage) with `class_prompt`. Field names and defaults are
//! the script's arguments. Output: a diffusers folder (`model_index.json`, `unet/`, …),
//! `metrics.jsonl`, `validation/step-N.png` and `report.json`. Checkpoints live in the work
//! folder, so a crashed run resumes from its last checkpoint on the next `dreampipe run`.
//! Also `dreambooth_lora` (train_dreambooth_lora.py), the same run training LoRA adapters.
use super::sd_common::{field_error, kind_of};
use super::training::{self, RunSettings};
use super::{StageContext, StageError};
use crate::sd::train::dreambooth::{self, DreamBoothConfig};
use crate::sd::train::lora::LoraSettings;
use dreampipe_core::field;
use dreampipe_kinds::sd::dreambooth::{
    CLASS_IMAGES_REQUIRED, CLASS_PROMPT_REQUIRED, DreamBoothFields, DreamBoothParams, UnetTuning,
};
use dreampipe_kinds::sd::dreambooth_lora::DreamBoothLoraParams;
use dreampipe_kinds::sd::finetune::FinetuneParams;
use dreampipe_kinds::sd::training::TrainingParams;
use std::path::PathBuf;

/// Runs a `dreambooth` stage (its schema: `dreampipe_kinds::sd::dreambooth`).
pub fn run(ctx: &StageContext<'_>) -> Result<(), StageError> {
    let params: DreamBoothParams = ctx.typed()?;
    let config = config_from(ctx, &params.dreambooth, &params.unet, &params.training)?;
    let settings = RunSettings {
        training: &params.training,
        export: &params.output.export,
    };
    training::run_method(ctx, &settings, "dreambooth", |callbacks| {
        dreambooth::train(&config, callbacks)
    })
}

/// Runs a `dreambooth_lora` stage (its schema: `dreampipe_kinds::sd::dreambooth_lora`).
pub fn run_lora(ctx: &StageContext<'_>) -> Result<(), StageError> {
    let params: DreamBoothLoraParams = ctx.typed()?;
    let mut config = config_from(ctx, &params.dreambooth, &params.unet, &params.training)?;
    let rank = i64::from(params.rank);
    config.lora = Some(LoraSettings {
        rank,
        alpha: params.lora_alpha.unwrap_or(rank as f64),
    });
    config.lora_save_kind = kind_of(params.training.save_dtype);
    let settings = RunSettings {
        training: &params.training,
        export: &[],
    };
    training::run_method(ctx, &settings, "dreambooth_lora", |callbacks| {
        dreambooth::train(&config, callbacks)
    })
}

/// Runs a `finetune` stage (its schema: `dreampipe_kinds::sd::finetune`): the
/// DreamBooth loop with a caption per image, no prior preservation, the UNet trained.
pub fn run_finetune(ctx: &StageContext<'_>) -> Result<(), StageError> {
    let params: FinetuneParams = ctx.typed()?;
    training::check_precision(ctx, &params.training)?;
    let model = training::resolve_model(
        ctx,
        training::single_resolved(ctx, field!(TrainingParams, model))?,
    )?;
    let images = training::checked_image_dir(ctx, field!(FinetuneParams, images))?;
    let mut config = DreamBoothConfig::new(
        model,
        images,
        "",
        training::staged_output(ctx),
        ctx.work_dir.to_path_buf(),
    );
    config.training = params.training.clone();
    config.unet = params.unet.clone();
    config.captions = true;
    config.caption_dropout_rate = params.caption_dropout_rate;
    config.keep_final_checkpoint = training::keeps_final_state(&params.training);
    config.resume_from_checkpoint = true;
    config.device = crate::device::to_tch(ctx.device);
    config
        .validate()
        .map_err(|e| training::stage_error(ctx, e))?;
    let settings = RunSettings {
        training: &params.training,
        export: &params.output.export,
    };
    training::run_method(ctx, &settings, "finetune", |callbacks| {
        dreambooth::train(&config, callbacks)
    })
}

/// The library config: the stage's typed fields with the inputs resolved.
fn config_from(
    ctx: &StageContext<'_>,
    fields: &DreamBoothFields,
    unet: &UnetTuning,
    shared: &TrainingParams,
) -> Result<DreamBoothConfig, StageError> {
    training::check_precision(ctx, shared)?;
    let model = training::resolve_model(
        ctx,
        training::single_resolved(ctx, field!(TrainingParams, model))?,
    )?;
    let instances = training::checked_image_dir(ctx, field!(DreamBoothFields, instance_images))?;
    let class_data_dir = class_images(ctx, fields)?;
    let mut dreambooth = fields.clone();
    dreambooth.with_prior_preservation = class_data_dir.is_some();
    let config = DreamBoothConfig {
        training: shared.clone(),
        dreambooth,
        unet: unet.clone(),
        pretrained_model_name_or_path: model,
        instance_data_dir: instances,
        class_data_dir,
        output_dir: training::staged_output(ctx),
        work_dir: ctx.work_dir.to_path_buf(),
        keep_final_checkpoint: training::keeps_final_state(shared),
        resume_from_checkpoint: true,
        device: crate::device::to_tch(ctx.device),
        lora: None,
        lora_save_kind: tch::Kind::Float,
        captions: false,
        caption_dropout_rate: 0.0,
    };
    config
        .validate()
        .map_err(|e| training::stage_error(ctx, e))?;
    Ok(config)
}

/// The folder of the first `num_class_images` class images when `class_images` is given
/// (prior preservation), checked against the prior-preservation rules.
fn class_images(
    ctx: &StageContext<'_>,
    fields: &DreamBoothFields,
) -> Result<Option<PathBuf>, StageError> {
    let given = !ctx
        .input_paths(field!(DreamBoothFields, class_images))
        .is_empty();
    if fields.with_prior_preservation && !given {
        return Err(field_error(
            ctx,
            field!(DreamBoothFields, class_images),
            CLASS_IMAGES_REQUIRED,
        ));
    }
    if !given {
        return Ok(None);
    }
    if fields.class_prompt.is_none() {
        return Err(field_error(
            ctx,
            field!(DreamBoothFields, class_prompt),
            CLASS_PROMPT_REQUIRED,
        ));
    }
    let dir = training::checked_image_dir(ctx, field!(DreamBoothFields, class_images))?;
    let wanted = fields.num_class_images;
    let (dir, found) =
        training::first_images(ctx, &dir, wanted, field!(DreamBoothFields, class_images))?;
    if found < wanted {
        return Err(field_error(
            ctx,
            field!(DreamBoothFields, class_images),
            format!(
                "holds {found} images but num_class_images is {wanted}; generate more (a `generate` stage's count) or lower num_class_images"
            ),
        ));
    }
    Ok(Some(dir))
}
