//! The `textual_inversion` stage: diffusers' textual_inversion.py on `instance_images` (its
//! `train_data_dir`: a folder, or an `images` stage). Field names and defaults are the script's
//! arguments. Output: `learned_embeds.safetensors` (diffusers), `<token>.safetensors` (A1111 /
//! ComfyUI), `model/` (a diffusers folder with the new token: a `dreambooth` or other stage
//! whose `model:` names this stage uses it), `metrics.jsonl`, `validation/step-N.png` and
//! `report.json`. Checkpoints live in the work folder (resumed after a crash).
use super::training;
use super::{StageContext, StageError};
use crate::sd::train::textual_inversion::{self, LearnableProperty, TextualInversionConfig};

/// Runs a `textual_inversion` stage (its schema: `dreampipe_core::stages::sd_kinds::textual_inversion`).
pub fn run(ctx: &StageContext<'_>) -> Result<(), StageError> {
    let config = config_from(ctx)?;
    training::run_method(ctx, "textual_inversion", |callbacks| {
        textual_inversion::train(&config, callbacks)
    })
}

/// The library config of the stage's fields.
fn config_from(ctx: &StageContext<'_>) -> Result<TextualInversionConfig, StageError> {
    use training::{flag, int, number};
    let (lr_scheduler, optimizer, mixed_precision) = training::enum_fields(ctx)?;
    let property =
        LearnableProperty::parse(ctx.str_param("learnable_property")?).map_err(|_| {
            super::sd_common::field_error(
                ctx,
                "learnable_property",
                format!(
                    "\"{}\" is not one of object, style",
                    ctx.str_param("learnable_property").unwrap_or_default()
                ),
            )
        })?;
    if training::flag(ctx, "gradient_checkpointing") {
        return Err(super::sd_common::field_error(
            ctx,
            "gradient_checkpointing",
            dreampipe_core::stages::sd_kinds::textual_inversion::NO_CHECKPOINTING,
        ));
    }
    let model = training::resolve_model(ctx, training::single_resolved(ctx, "model")?)?;
    let images = training::checked_image_dir(ctx, "instance_images")?;
    let mut config = TextualInversionConfig::new(
        model,
        images,
        ctx.str_param("placeholder_token")?,
        ctx.str_param("initializer_token")?,
        training::staged_output(ctx),
        ctx.work_dir.to_path_buf(),
    );
    config.num_vectors = int(ctx, "num_vectors")? as usize;
    config.learnable_property = property;
    config.repeats = int(ctx, "repeats")? as usize;
    config.resume_from_checkpoint = true;
    config.keep_final_checkpoint = training::keeps_final_state(ctx);
    config.seed = int(ctx, "seed")?;
    config.resolution = int(ctx, "resolution")? as u32;
    config.center_crop = flag(ctx, "center_crop");
    config.train_batch_size = int(ctx, "train_batch_size")? as usize;
    config.num_train_epochs = int(ctx, "num_train_epochs")?;
    config.max_train_steps = ctx.i64_param("max_train_steps").map(|v| v as u64);
    config.gradient_accumulation_steps = int(ctx, "gradient_accumulation_steps")?;
    config.learning_rate = number(ctx, "learning_rate")?;
    config.scale_lr = flag(ctx, "scale_lr");
    config.lr_scheduler = lr_scheduler;
    config.lr_warmup_steps = int(ctx, "lr_warmup_steps")?;
    config.lr_num_cycles = int(ctx, "lr_num_cycles")? as u32;
    config.lr_power = number(ctx, "lr_power")?;
    config.optimizer = optimizer;
    config.adam_beta1 = number(ctx, "adam_beta1")?;
    config.adam_beta2 = number(ctx, "adam_beta2")?;
    config.adam_weight_decay = number(ctx, "adam_weight_decay")?;
    config.adam_epsilon = number(ctx, "adam_epsilon")?;
    config.mixed_precision = mixed_precision;
    config.checkpointing_steps = int(ctx, "checkpointing_steps")?;
    config.checkpoints_total_limit = ctx.i64_param("checkpoints_total_limit").map(|v| v as usize);
    config.device = crate::device::to_tch(ctx.device);
    config
        .validate()
        .map_err(|e| training::stage_error(ctx, e))?;
    Ok(config)
}
