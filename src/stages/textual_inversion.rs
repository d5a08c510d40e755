//! The `textual_inversion` stage: diffusers' textual_inversion.py on `instance_images` (its
//! `train_data_dir`: a folder, or an `images` stage). Field names and defaults are the script's
//! arguments. Output: `learned_embeds.safetensors` (diffusers), `<token>.safetensors` (A1111 /
//! ComfyUI), `model/` (a diffusers folder with the new token: a `dreambooth` or other stage
//! whose `model:` names this stage uses it), `metrics.jsonl`, `validation/step-N.png` and
//! `report.json`. Checkpoints live in the work folder (resumed after a crash).
use super::training::{self, ScriptDefaults};
use super::{DeviceClass, ParamSpec, ParamType, Stage, StageContext, StageError};
use crate::sd::train::textual_inversion::{self, LearnableProperty, TextualInversionConfig};
use serde_json::json;

/// textual_inversion.py's `--learning_rate` default.
const DEFAULT_LEARNING_RATE: f64 = 1e-4;
/// textual_inversion.py's `--train_batch_size` default.
const DEFAULT_BATCH: u64 = 16;
/// textual_inversion.py's `--max_train_steps` default.
const DEFAULT_MAX_STEPS: u64 = 5000;
/// textual_inversion.py's `--num_train_epochs` default (used when max_train_steps is unset).
const DEFAULT_EPOCHS: u64 = 100;
/// textual_inversion.py's `--repeats` default.
const DEFAULT_REPEATS: u64 = 100;
/// CLIP's context holds 77 tokens (2 specials): more vectors cannot fit a prompt.
const MAX_VECTORS: f64 = 75.0;
/// Largest `repeats` accepted.
const MAX_REPEATS: f64 = 100_000.0;

pub struct TextualInversionStage;

impl Stage for TextualInversionStage {
    fn kind(&self) -> &'static str {
        "textual_inversion"
    }
    fn version(&self) -> u32 {
        1
    }
    fn device_class(&self) -> DeviceClass {
        DeviceClass::Gpu
    }
    fn summary(&self) -> &'static str {
        "Textual inversion as diffusers' textual_inversion.py (field names and defaults are its arguments). Output: `learned_embeds.safetensors`, `<token>.safetensors` (A1111 / ComfyUI), `model/` (diffusers folder with the new token; a stage whose `model:` names this stage uses it), `metrics.jsonl` (step, loss, lr), `validation/step-N.png` and `report.json`."
    }
    fn schema(&self) -> Vec<ParamSpec> {
        let mut schema = vec![
            ParamSpec::required(
                "instance_images",
                ParamType::PathOrStageRef,
                "training images (diffusers' train_data_dir): a folder, or an `images` stage",
            ),
            ParamSpec::required(
                "placeholder_token",
                ParamType::String,
                "the new token, e.g. <cat-toy>",
            ),
            ParamSpec::required(
                "initializer_token",
                ParamType::String,
                "one-token word the new vectors start from",
            ),
            ParamSpec::optional(
                "num_vectors",
                ParamType::Integer,
                json!(1),
                "vectors of the new token",
            )
            .range(1.0, MAX_VECTORS),
            ParamSpec::optional(
                "learnable_property",
                ParamType::String,
                json!("object"),
                "which prompt templates: object or style",
            )
            .one_of(&["object", "style"]),
            ParamSpec::optional(
                "repeats",
                ParamType::Integer,
                json!(DEFAULT_REPEATS),
                "times the images repeat per epoch",
            )
            .range(1.0, MAX_REPEATS),
        ];
        schema.extend(training::common_schema(&ScriptDefaults {
            learning_rate: DEFAULT_LEARNING_RATE,
            train_batch_size: DEFAULT_BATCH,
            max_train_steps: json!(DEFAULT_MAX_STEPS),
            num_train_epochs: DEFAULT_EPOCHS,
        }));
        schema
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let config = config_from(ctx)?;
        let outcome = training::run_training(ctx, |callbacks| {
            textual_inversion::train(&config, callbacks)
        })?;
        if let Some(step) = outcome.resumed_from {
            ctx.log.line(&format!("resumed from step {step}"));
        }
        ctx.log.line(&format!(
            "textual_inversion: {} steps, final loss {:?}",
            outcome.steps, outcome.final_loss
        ));
        Ok(())
    }
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
            "not supported for textual_inversion (its UNet is frozen; only the text encoder would need it); set it to false",
        ));
    }
    let model = training::model_dir(&training::single_input(ctx, "model")?);
    let images = training::image_dir(&training::single_input(ctx, "instance_images")?);
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
    config.device = ctx.device;
    config
        .validate()
        .map_err(|e| training::stage_error(ctx, e))?;
    Ok(config)
}
