//! Textual inversion as diffusers' examples/textual_inversion/textual_inversion.py: new
//! placeholder tokens (`<tok>`, `<tok>_1`, ...) initialised from a one-token initializer word;
//! the whole token-embedding matrix goes to AdamW and every other row is restored after each
//! step, so only the placeholder rows learn. Prompts come from the imagenet templates of the
//! script. [`TextualInversionTrainer::train_step`] runs one step on explicit latents / noise /
//! timesteps (the golden tests); [`train`] is the whole run.
//!
//! Outputs in `output_dir`: `learned_embeds.safetensors` (diffusers), `<token>.safetensors`
//! (A1111 / ComfyUI, key `emb_params`), `metrics.jsonl`, and `model/`, a complete diffusers
//! folder with the extended tokenizer and text encoder (usable as a DreamBooth base).
//!
//! Deviations as in DreamBooth: random draws derived from `(seed, step)`, seed default 0,
//! mixed precision on CPU only as bf16, gradient checkpointing rejected. The default
//! learning rate is 5e-4 (the README's recipe; the script's argparse default is 1e-4).
use super::TrainError;
use super::common::{
    self, Callbacks, DiffusionModel, LossSpec, MixedPrecisionExt, Optimizer, SampleRng, StepBatch,
    StepReport, TrainOutcome,
};
use super::data::{self, Transform};
use super::driver::{self, DriverSettings, TrainingMethod};
use super::loss::PredictionType;
use super::lr_schedule::LrSchedule;
use super::optim::AdamWConfig;
use super::output::{self, NewWeights};
use super::precision::Precision;
use crate::sd::clip::ClipTextModel;
use crate::sd::folder::ModelFolder;
use crate::sd::schedulers::{DdpmScheduler, SchedulerConfig};
use crate::sd::tokenizer::ClipTokenizer;
use crate::sd::unet::UNet2DConditionModel;
use crate::sd::vae::AutoencoderKL;
use dreampipe_core::stages::sd_kinds::textual_inversion::{
    InversionFields, TextualInversionKind, TextualInversionParams,
};
use dreampipe_core::stages::sd_kinds::training::TrainingParams;
use image::RgbImage;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor, nn::VarStore};

/// Name recorded in checkpoints.
pub const METHOD: &str = "textual_inversion";
/// Subfolder of `output_dir` holding the full diffusers model.
pub const MODEL_SUBDIR: &str = "model";
/// Checkpoint name of the embedding matrix.
const EMBEDDING_KEY: &str = "text_encoder.text_model.embeddings.token_embedding.weight";

/// `imagenet_templates_small` of textual_inversion.py (learnable_property = object).
pub const OBJECT_TEMPLATES: [&str; 27] = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
];

/// `imagenet_style_templates_small` of textual_inversion.py (learnable_property = style).
pub const STYLE_TEMPLATES: [&str; 19] = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
];

/// `--learnable_property` (the stage schema's closed set) and its prompt templates.
pub use dreampipe_core::stages::sd_kinds::textual_inversion::LearnableProperty;

/// The prompt templates of `property` (textual_inversion.py's).
pub fn templates(property: LearnableProperty) -> &'static [&'static str] {
    match property {
        LearnableProperty::Object => &OBJECT_TEMPLATES,
        LearnableProperty::Style => &STYLE_TEMPLATES,
    }
}

/// textual_inversion.py's arguments: the `textual_inversion` stage's typed fields (names and
/// defaults as the script's) plus the resolved paths.
#[derive(Debug, Clone, PartialEq)]
pub struct TextualInversionConfig {
    /// The hyperparameters every training kind shares (the input fields in it are not read:
    /// the paths below are). `gradient_checkpointing` is not supported (rejected).
    pub training: TrainingParams,
    /// The tokens, vectors, templates and repeats.
    pub inversion: InversionFields,
    pub pretrained_model_name_or_path: PathBuf,
    pub train_data_dir: PathBuf,
    pub output_dir: PathBuf,
    pub work_dir: PathBuf,
    /// Write a checkpoint at the last step even when it is not a multiple of
    /// `checkpointing_steps` (the stage keeps it so a longer run can continue from it).
    pub keep_final_checkpoint: bool,
    pub resume_from_checkpoint: bool,
    pub device: Device,
}

impl TextualInversionConfig {
    /// A config with the `textual_inversion` stage's defaults for everything but the required
    /// fields.
    pub fn new(
        pretrained_model_name_or_path: PathBuf,
        train_data_dir: PathBuf,
        placeholder_token: &str,
        initializer_token: &str,
        output_dir: PathBuf,
        work_dir: PathBuf,
    ) -> Self {
        let given = serde_json::json!({
            "model": pretrained_model_name_or_path.to_string_lossy(),
            "instance_images": train_data_dir.to_string_lossy(),
            "placeholder_token": placeholder_token,
            "initializer_token": initializer_token,
        });
        let schema = dreampipe_core::stages::Stage::schema(&TextualInversionKind);
        let params: TextualInversionParams = common::schema_defaults(&schema, given);
        Self {
            training: params.training,
            inversion: params.inversion,
            pretrained_model_name_or_path,
            train_data_dir,
            output_dir,
            work_dir,
            keep_final_checkpoint: false,
            resume_from_checkpoint: false,
            device: Device::Cpu,
        }
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        if self.training.gradient_checkpointing {
            return Err(TrainError::Config {
                field: "gradient_checkpointing",
                problem: "not yet supported for the UNet; train without it (lower train_batch_size or resolution to save memory)".to_string(),
            });
        }
        if self.inversion.num_vectors == 0 {
            return Err(TrainError::Config {
                field: "num_vectors",
                problem: "must be at least 1".to_string(),
            });
        }
        common::validate_training(&self.training, self.device)
    }

    /// `<tok>`, `<tok>_1`, ... `<tok>_{n-1}`.
    pub fn placeholder_tokens(&self) -> Vec<String> {
        let token = &self.inversion.placeholder_token;
        std::iter::once(token.clone())
            .chain((1..self.inversion.num_vectors).map(|i| format!("{token}_{i}")))
            .collect()
    }
}

/// The models and optimizer of a textual-inversion run.
pub struct TextualInversionTrainer {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    text_encoder_store: VarStore,
    unet: UNet2DConditionModel,
    _unet_store: VarStore,
    vae: AutoencoderKL,
    _vae_store: VarStore,
    scheduler: DdpmScheduler,
    prediction: PredictionType,
    weight_kind: Kind,
    placeholder_tokens: Vec<String>,
    /// Id of the first placeholder; the placeholders are the last rows of the embedding.
    first_placeholder_id: i64,
    original_embeddings: Tensor,
    optimizer: Optimizer,
    schedule: LrSchedule,
    precision: Precision,
    step: u64,
}

impl TextualInversionTrainer {
    /// Loads the base model, adds the placeholder tokens (initialised from the initializer
    /// token's row) and sets up the optimizer over the whole embedding matrix.
    pub fn new(config: &TextualInversionConfig, total_steps: u64) -> Result<Self, TrainError> {
        config.validate()?;
        let device = config.device;
        let weight_kind = config.training.mixed_precision.weight_kind(device)?;
        let folder =
            ModelFolder::open(&config.pretrained_model_name_or_path).map_err(TrainError::model)?;
        let mut tokenizer =
            ClipTokenizer::from_dir(&folder.tokenizer_dir()).map_err(TrainError::model)?;
        let initializer_id = single_token_id(&tokenizer, &config.inversion.initializer_token)?;
        let placeholder_tokens = config.placeholder_tokens();
        let mut ids = Vec::with_capacity(placeholder_tokens.len());
        for token in &placeholder_tokens {
            ids.push(tokenizer.add_token(token).map_err(|e| TrainError::Config {
                field: "placeholder_token",
                problem: e.to_string(),
            })?);
        }
        let (mut text_encoder_store, mut text_encoder) =
            ClipTextModel::load(&folder.text_encoder_dir(), device, Kind::Float, None)
                .map_err(TrainError::model)?;
        let initial_rows = text_encoder
            .token_embedding()
            .get(initializer_id)
            .detach()
            .unsqueeze(0)
            .repeat([ids.len() as i64, 1]);
        text_encoder
            .append_token_embeddings(&initial_rows)
            .map_err(TrainError::model)?;
        text_encoder_store.freeze();
        let embedding = text_encoder.token_embedding().set_requires_grad(true);
        let (mut unet_store, unet) =
            UNet2DConditionModel::load(&folder.unet_dir(), device, weight_kind, None)
                .map_err(TrainError::model)?;
        let (mut vae_store, vae) =
            AutoencoderKL::load(&folder.vae_dir(), device, weight_kind, None)
                .map_err(TrainError::model)?;
        unet_store.freeze();
        vae_store.freeze();
        let scheduler_config =
            SchedulerConfig::from_file(&folder.scheduler_dir().join("scheduler_config.json"))
                .map_err(TrainError::model)?;
        let prediction = common::prediction_type(&scheduler_config)?;
        let scheduler = DdpmScheduler::new(&scheduler_config).map_err(TrainError::model)?;
        let lr = config.training.effective_learning_rate();
        let optimizer = Optimizer::new(
            config.training.optimizer,
            &[embedding.shallow_clone()],
            AdamWConfig {
                lr,
                beta1: config.training.adam_beta1,
                beta2: config.training.adam_beta2,
                eps: config.training.adam_epsilon,
                weight_decay: config.training.adam_weight_decay,
            },
        );
        let schedule = LrSchedule::new(
            config.training.lr_scheduler,
            lr,
            config.training.lr_warmup_steps,
            total_steps,
            config.training.lr_num_cycles,
            config.training.lr_power,
        )?;
        Ok(Self {
            original_embeddings: embedding.detach().copy(),
            first_placeholder_id: ids[0],
            tokenizer,
            text_encoder,
            text_encoder_store,
            unet,
            _unet_store: unet_store,
            vae,
            _vae_store: vae_store,
            scheduler,
            prediction,
            weight_kind,
            placeholder_tokens,
            optimizer,
            schedule,
            precision: Precision::new(config.training.mixed_precision, device)?,
            step: 0,
        })
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    pub fn text_encoder(&self) -> &ClipTextModel {
        &self.text_encoder
    }

    pub fn text_encoder_store(&self) -> &VarStore {
        &self.text_encoder_store
    }

    pub fn placeholder_tokens(&self) -> &[String] {
        &self.placeholder_tokens
    }

    /// (token, id) of every placeholder, in id order.
    pub fn placeholder_ids(&self) -> Vec<(String, i64)> {
        self.placeholder_tokens
            .iter()
            .enumerate()
            .map(|(i, token)| (token.clone(), self.first_placeholder_id + i as i64))
            .collect()
    }

    /// The learned rows `[num_vectors, dim]`.
    pub fn learned_embeddings(&self) -> Tensor {
        self.text_encoder
            .token_embedding()
            .narrow(
                0,
                self.first_placeholder_id,
                self.placeholder_tokens.len() as i64,
            )
            .detach()
            .copy()
    }

    /// One optimizer step over `micro_batches`: loss, `backward(loss / n)` (fp16: scaled),
    /// AdamW over the embedding matrix (no clipping, as the script; skipped when fp16 scaling
    /// found an inf/NaN gradient), zero grads, restore every non-placeholder row bit for bit.
    pub fn train_step(&mut self, micro_batches: &[StepBatch]) -> Result<StepReport, TrainError> {
        let lr = self
            .schedule
            .lr_at(self.precision.schedule_position(self.step));
        self.optimizer.set_lr(lr);
        let count = micro_batches.len().max(1) as f64;
        let mut total = 0.0;
        for batch in micro_batches {
            let loss = self.batch_loss(batch)?;
            let value = loss.double_value(&[]);
            if let Err(error) = common::check_finite(value, self.step + 1) {
                self.optimizer.zero_grad();
                return Err(error);
            }
            self.precision.backward(&loss, count);
            total += value;
        }
        let embedding = self.text_encoder.token_embedding().shallow_clone();
        let found_inf = self.precision.unscale(&[embedding]);
        if !found_inf {
            self.optimizer.step()?;
        }
        self.precision.update(found_inf);
        self.optimizer.zero_grad();
        self.restore_other_rows();
        self.step += 1;
        Ok(StepReport {
            loss: total / count,
            grad_norm: None,
            lr,
            skipped_steps: self.precision.skipped_steps(),
        })
    }

    /// Mixed precision: autocast of the text encoder and fp16 loss scaling.
    pub fn precision_mut(&mut self) -> &mut Precision {
        &mut self.precision
    }

    /// The loss of one batch (textual_inversion.py: text encoder with float32 weights, under
    /// autocast with mixed precision; UNet in the weight dtype; loss in float32).
    pub fn batch_loss(&self, batch: &StepBatch) -> Result<Tensor, TrainError> {
        let ids = batch.input_ids.to_device(batch.latents.device());
        let hidden = self
            .precision
            .forward(|| (self.text_encoder.forward(&ids)).map(|output| output.last_hidden_state))?;
        let model = DiffusionModel {
            unet: &self.unet,
            unet_kind: self.weight_kind,
            autocast: None,
            scheduler: &self.scheduler,
            prediction: self.prediction,
        };
        let spec = LossSpec {
            prior_loss_weight: None,
            snr_gamma: None,
        };
        common::diffusion_loss(&model, batch, &hidden, &spec)
    }

    fn restore_other_rows(&self) {
        let _guard = tch::no_grad_guard();
        let keep = self.first_placeholder_id;
        let mut rows = self.text_encoder.token_embedding().narrow(0, 0, keep);
        rows.copy_(&self.original_embeddings.narrow(0, 0, keep));
    }

    fn encode_moments(&self, pixels: &Tensor) -> (Tensor, Tensor) {
        tch::no_grad(|| {
            let posterior = self.vae.encode(&pixels.to_kind(self.weight_kind));
            (
                posterior.mean.to_kind(Kind::Float),
                posterior.std.to_kind(Kind::Float),
            )
        })
    }
}

/// The id of `word` when it encodes to exactly one token.
fn single_token_id(tokenizer: &ClipTokenizer, word: &str) -> Result<i64, TrainError> {
    let ids = tokenizer.encode_without_specials(word);
    match ids.as_slice() {
        [id] => Ok(*id),
        _ => Err(TrainError::Config {
            field: "initializer_token",
            problem: format!(
                "'{word}' encodes to {} tokens; it must be exactly one token (pick a single common word)",
                ids.len()
            ),
        }),
    }
}

/// The run's images and tokenised template prompts.
struct TiData {
    images: Vec<RgbImage>,
    transform: Transform,
    /// Token ids `[1, 77]` of each template with the placeholder string filled in.
    template_ids: Vec<Tensor>,
    repeats: usize,
}

impl TiData {
    fn load(
        config: &TextualInversionConfig,
        trainer: &TextualInversionTrainer,
    ) -> Result<Self, TrainError> {
        let images = data::load_folder(&config.train_data_dir, "train_data_dir")?;
        let placeholder_string = trainer.placeholder_tokens.join(" ");
        let template_ids = templates(config.inversion.learnable_property)
            .iter()
            .map(|template| {
                let text = template.replace("{}", &placeholder_string);
                Tensor::from_slice(&trainer.tokenizer.encode(&text).ids).unsqueeze(0)
            })
            .collect();
        Ok(Self {
            images,
            transform: Transform::TextualInversion {
                resolution: config.training.resolution,
                center_crop: config.training.center_crop,
            },
            template_ids,
            repeats: config.inversion.repeats.max(1),
        })
    }

    fn len(&self) -> usize {
        self.images.len() * self.repeats
    }

    fn batch(
        &self,
        trainer: &TextualInversionTrainer,
        config: &TextualInversionConfig,
        step: u64,
        micro: u64,
    ) -> Result<StepBatch, TrainError> {
        let size = config.training.train_batch_size as u64;
        let first = (step * config.training.gradient_accumulation_steps + micro) * size;
        let mut pixels = Vec::new();
        let mut ids = Vec::new();
        for sample in first..first + size {
            let index =
                common::dataset_index(config.training.seed, self.len(), sample) % self.images.len();
            let mut rng = SampleRng::for_sample(config.training.seed, sample);
            let template = rng.below(self.template_ids.len() as u64) as usize;
            ids.push(self.template_ids[template].shallow_clone());
            pixels.push(self.transform.apply(&self.images[index], &mut rng));
        }
        let (mean, std) =
            trainer.encode_moments(&Tensor::stack(&pixels, 0).to_device(config.device));
        let _rng = common::seed_step_tensors(config.training.seed, step, micro);
        let epsilon = crate::sd::rng::randn(&mean.size(), Kind::Float, mean.device());
        // In the weight dtype, as the script's VAE sample (and so its noise) is.
        let latents =
            ((&mean + &std * epsilon) * trainer.vae.scaling_factor()).to_kind(trainer.weight_kind);
        let (noise, timesteps) = common::draw_noise_and_timesteps(
            &latents,
            false,
            trainer.scheduler.num_train_timesteps(),
        )?;
        Ok(StepBatch {
            latents,
            noise,
            timesteps,
            input_ids: Tensor::cat(&ids, 0).to_device(config.device),
        })
    }
}

struct TextualInversionRun<'a> {
    trainer: TextualInversionTrainer,
    data: TiData,
    config: &'a TextualInversionConfig,
}

impl TrainingMethod for TextualInversionRun<'_> {
    fn method(&self) -> &'static str {
        METHOD
    }

    fn step(&self) -> u64 {
        self.trainer.step
    }

    fn set_step(&mut self, step: u64) {
        self.trainer.step = step;
    }

    fn checkpoint_tensors(&self) -> Vec<(String, Tensor)> {
        vec![(
            EMBEDDING_KEY.to_string(),
            self.trainer.text_encoder.token_embedding().shallow_clone(),
        )]
    }

    fn optimizer(&self) -> &Optimizer {
        &self.trainer.optimizer
    }

    fn optimizer_mut(&mut self) -> &mut Optimizer {
        &mut self.trainer.optimizer
    }

    fn precision(&self) -> &Precision {
        &self.trainer.precision
    }

    fn precision_mut(&mut self) -> &mut Precision {
        &mut self.trainer.precision
    }

    fn write_model(&self, dir: &std::path::Path) -> Result<(), TrainError> {
        write_model_with_placeholders(self.config, &self.trainer, dir)
    }

    fn write_outputs(&self, dir: &std::path::Path) -> Result<(), TrainError> {
        write_outputs_into(self.config, &self.trainer, dir)
    }

    fn next_step(&mut self) -> Result<StepReport, TrainError> {
        let step = self.trainer.step;
        let batches = (0..self.config.training.gradient_accumulation_steps)
            .map(|micro| self.data.batch(&self.trainer, self.config, step, micro))
            .collect::<Result<Vec<_>, _>>()?;
        self.trainer.train_step(&batches)
    }
}

/// Runs textual inversion and writes the embedding files and the full model folder.
pub fn train(
    config: &TextualInversionConfig,
    callbacks: &mut Callbacks,
) -> Result<TrainOutcome, TrainError> {
    config.validate()?;
    let image_count = data::list_images(&config.train_data_dir, "train_data_dir")?.len();
    let total = common::total_steps(
        config.training.max_train_steps,
        config.training.num_train_epochs,
        image_count * config.inversion.repeats.max(1),
        config.training.train_batch_size,
        config.training.gradient_accumulation_steps,
    );
    let trainer = TextualInversionTrainer::new(config, total)?;
    let data = TiData::load(config, &trainer)?;
    let settings = DriverSettings {
        work_dir: &config.work_dir,
        metrics_dir: &config.output_dir,
        total_steps: total,
        checkpointing_steps: config.training.checkpointing_steps,
        checkpoints_total_limit: config.training.checkpoints_total_limit,
        resume: config.resume_from_checkpoint,
        save_final: config.keep_final_checkpoint,
        seed: config.training.seed,
        dataset_sizes: vec![data.images.len()],
    };
    let mut run = TextualInversionRun {
        trainer,
        data,
        config,
    };
    let result = driver::run(&mut run, &settings, callbacks)?;
    write_outputs(config, &run.trainer)?;
    Ok(TrainOutcome {
        steps: run.trainer.step,
        resumed_from: result.resumed_from,
        final_loss: result.final_loss,
        output_dir: config.output_dir.clone(),
    })
}

/// The embedding files and the full diffusers folder of a trained placeholder.
pub fn write_outputs(
    config: &TextualInversionConfig,
    trainer: &TextualInversionTrainer,
) -> Result<(), TrainError> {
    write_outputs_into(config, trainer, &config.output_dir)
}

/// [`write_outputs`] into `out` instead of the configured output folder.
fn write_outputs_into(
    config: &TextualInversionConfig,
    trainer: &TextualInversionTrainer,
    out: &std::path::Path,
) -> Result<(), TrainError> {
    std::fs::create_dir_all(out).map_err(|e| common::io_error(out, "create the directory", e))?;
    let embeds = trainer.learned_embeddings();
    output::write_learned_embeds(
        &out.join(output::LEARNED_EMBEDS_FILE),
        &config.inversion.placeholder_token,
        &embeds,
    )?;
    let a1111_name = format!(
        "{}.safetensors",
        file_stem_for(&config.inversion.placeholder_token)
    );
    output::write_a1111_embedding(&out.join(a1111_name), &embeds)?;
    write_model_with_placeholders(config, trainer, &out.join(MODEL_SUBDIR))
}

/// The base model with the extended tokenizer and text encoder as a diffusers folder at `dir`.
fn write_model_with_placeholders(
    config: &TextualInversionConfig,
    trainer: &TextualInversionTrainer,
    dir: &std::path::Path,
) -> Result<(), TrainError> {
    let base =
        ModelFolder::open(&config.pretrained_model_name_or_path).map_err(TrainError::model)?;
    output::write_model_folder(
        &base,
        dir,
        &NewWeights {
            unet: None,
            text_encoder: Some(&trainer.text_encoder_store),
            added_tokens: &trainer.placeholder_ids(),
        },
    )
}

/// The placeholder without characters that are unsafe in file names (`<sks>` -> `sks`).
pub fn file_stem_for(token: &str) -> String {
    let stem: String = token
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if stem.is_empty() {
        "embedding".to_string()
    } else {
        stem
    }
}
