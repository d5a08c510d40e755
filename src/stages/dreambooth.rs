//! The `dreambooth` stage: diffusers' train_dreambooth.py on `instance_images` (a folder, or an
//! `images` stage) with `instance_prompt`; prior preservation when `class_images` is given (a
//! folder, or a `generate` / `images` stage) with `class_prompt`. Field names and defaults are
//! the script's arguments. Output: a diffusers folder (`model_index.json`, `unet/`, …),
//! `metrics.jsonl`, `validation/step-N.png` and `report.json`. Checkpoints live in the work
//! folder, so a crashed run resumes from its last checkpoint on the next `dreampipe run`.
use super::sd_common::field_error;
use super::training;
use super::{StageContext, StageError};
use crate::sd::train::dreambooth::{self, DreamBoothConfig};
use crate::sd::train::lora::LoraSettings;

/// Runs a `dreambooth` stage (its schema: `dreampipe_core::stages::sd_kinds::dreambooth`).
pub fn run(ctx: &StageContext<'_>) -> Result<(), StageError> {
    let config = config_from(ctx)?;
    training::run_method(ctx, "dreambooth", |callbacks| {
        dreambooth::train(&config, callbacks)
    })
}

/// Runs a `dreambooth_lora` stage (its schema: `dreampipe_core::stages::sd_kinds::dreambooth_lora`).
pub fn run_lora(ctx: &StageContext<'_>) -> Result<(), StageError> {
    let mut config = config_from(ctx)?;
    let rank = training::int(ctx, "rank")? as i64;
    config.lora = Some(LoraSettings {
        rank,
        alpha: ctx.f64_param("lora_alpha").unwrap_or(rank as f64),
    });
    config.lora_save_kind = training::save_kind(ctx);
    training::run_method(ctx, "dreambooth_lora", |callbacks| {
        dreambooth::train(&config, callbacks)
    })
}

/// The library config of the stage's fields.
fn config_from(ctx: &StageContext<'_>) -> Result<DreamBoothConfig, StageError> {
    use training::{flag, int, number, text};
    let (lr_scheduler, optimizer, mixed_precision) = training::enum_fields(ctx)?;
    let model = training::resolve_model(ctx, training::single_resolved(ctx, "model")?)?;
    let instances = training::checked_image_dir(ctx, "instance_images")?;
    let mut config = DreamBoothConfig::new(
        model,
        instances,
        ctx.str_param("instance_prompt")?,
        training::staged_output(ctx),
        ctx.work_dir.to_path_buf(),
    );
    let has_class_images = !ctx.input_paths("class_images").is_empty();
    if flag(ctx, "with_prior_preservation") && !has_class_images {
        return Err(field_error(
            ctx,
            "class_images",
            dreampipe_core::stages::sd_kinds::dreambooth::CLASS_IMAGES_REQUIRED,
        ));
    }
    if has_class_images {
        let class_prompt = text(ctx, "class_prompt").ok_or_else(|| {
            use dreampipe_core::stages::sd_kinds::dreambooth::CLASS_PROMPT_REQUIRED;
            field_error(ctx, "class_prompt", CLASS_PROMPT_REQUIRED)
        })?;
        let dir = training::checked_image_dir(ctx, "class_images")?;
        let wanted = int(ctx, "num_class_images")? as usize;
        let (dir, found) = training::first_images(ctx, &dir, wanted, "class_images")?;
        if found < wanted {
            return Err(field_error(
                ctx,
                "class_images",
                format!(
                    "holds {found} images but num_class_images is {wanted}; generate more (a `generate` stage's count) or lower num_class_images"
                ),
            ));
        }
        config.class_data_dir = Some(dir);
        config.class_prompt = Some(class_prompt.to_string());
        config.with_prior_preservation = true;
    }
    config.prior_loss_weight = number(ctx, "prior_loss_weight")?;
    config.resume_from_checkpoint = true;
    config.keep_final_checkpoint = training::keeps_final_state(ctx);
    config.seed = int(ctx, "seed")?;
    config.resolution = int(ctx, "resolution")? as u32;
    config.center_crop = flag(ctx, "center_crop");
    config.random_flip = flag(ctx, "random_flip");
    config.train_text_encoder = flag(ctx, "train_text_encoder");
    config.train_batch_size = int(ctx, "train_batch_size")? as usize;
    config.num_train_epochs = int(ctx, "num_train_epochs")?;
    config.max_train_steps = ctx.i64_param("max_train_steps").map(|v| v as u64);
    config.checkpointing_steps = int(ctx, "checkpointing_steps")?;
    config.checkpoints_total_limit = ctx.i64_param("checkpoints_total_limit").map(|v| v as usize);
    config.gradient_accumulation_steps = int(ctx, "gradient_accumulation_steps")?;
    config.gradient_checkpointing = flag(ctx, "gradient_checkpointing");
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
    config.max_grad_norm = number(ctx, "max_grad_norm")?;
    config.mixed_precision = mixed_precision;
    config.offset_noise = flag(ctx, "offset_noise");
    config.snr_gamma = ctx.f64_param("snr_gamma");
    config.device = crate::device::to_tch(ctx.device);
    config
        .validate()
        .map_err(|e| training::stage_error(ctx, e))?;
    Ok(config)
}
