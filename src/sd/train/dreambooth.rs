//! DreamBooth fine-tuning as diffusers' examples/dreambooth/train_dreambooth.py: the UNet (and
//! optionally the text encoder) trained on instance images with an instance prompt, optionally
//! with prior preservation on class images. [`DreamBoothTrainer::train_step`] runs one optimizer
//! step on explicit latents / noise / timesteps (what the golden tests drive); [`train`] is the
//! whole run with data loading, resume, checkpoints, metrics and the output folder.
//!
//! Deviations from diffusers, by design:
//! * every random draw is derived from `(seed, step)` (see `common::seed_step_tensors`) instead
//!   of one generator stream, so a resumed run is identical to an uninterrupted one;
//! * `seed` defaults to 0 (diffusers: unseeded);
//! * class images must already exist in `class_data_dir` (generate them with txt2img first);
//! * fp16 mixed precision needs CUDA (accelerate on a CPU does not autocast fp16 either);
//! * `gradient_checkpointing` recomputes each UNet block in a second phase (see
//!   `sd::unet::checkpointed`); the text encoder is not checkpointed;
//! * min-SNR weighting uses the instance half's timesteps (diffusers would broadcast the full
//!   batch's weights against the instance half).
use super::TrainError;
use super::common::{
    self, Callbacks, DiffusionModel, LossSpec, MixedPrecisionExt, Optimizer, SampleRng, StepBatch,
    StepReport, TrainOutcome,
};
use super::data::{self, Transform};
use super::driver::{self, DriverSettings, TrainingMethod};
use super::lora::{self, LoraSettings};
use super::loss::PredictionType;
use super::lr_schedule::LrSchedule;
use super::optim::{AdamWConfig, clip_grad_norm};
use super::output::{self, NewWeights};
use super::precision::Precision;
use crate::sd::clip::ClipTextModel;
use crate::sd::folder::ModelFolder;
use crate::sd::schedulers::{DdpmScheduler, SchedulerConfig};
use crate::sd::tokenizer::ClipTokenizer;
use crate::sd::unet::UNet2DConditionModel;
use crate::sd::vae::AutoencoderKL;
use dreampipe_core::stages::sd_kinds::dreambooth::{
    DreamBoothFields, DreamBoothKind, DreamBoothParams,
};
use dreampipe_core::stages::sd_kinds::training::TrainingParams;
use image::RgbImage;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor, nn::VarStore};

/// Name recorded in checkpoints.
pub const METHOD: &str = "dreambooth";
/// Prefixes of the trainable tensors in checkpoints.
const UNET_PREFIX: &str = "unet.";
const TEXT_ENCODER_PREFIX: &str = "text_encoder.";

/// train_dreambooth.py's arguments: the `dreambooth` stage's typed fields (names and defaults
/// as the script's, except where the stage schema notes otherwise) plus the resolved paths.
#[derive(Debug, Clone, PartialEq)]
pub struct DreamBoothConfig {
    /// The hyperparameters every training kind shares (the input fields in it are not read:
    /// the paths below are).
    pub training: TrainingParams,
    /// DreamBooth's own fields. `with_prior_preservation` switches the prior loss on here
    /// (the stage sets it whenever class images are given).
    pub dreambooth: DreamBoothFields,
    /// A diffusers folder.
    pub pretrained_model_name_or_path: PathBuf,
    pub instance_data_dir: PathBuf,
    pub class_data_dir: Option<PathBuf>,
    /// Where the diffusers folder and metrics.jsonl are written.
    pub output_dir: PathBuf,
    /// Where resume checkpoints live (diffusers keeps them in output_dir).
    pub work_dir: PathBuf,
    /// Write a checkpoint at the last step even when it is not a multiple of
    /// `checkpointing_steps` (the stage keeps it so a longer run can continue from it).
    pub keep_final_checkpoint: bool,
    /// diffusers' `--resume_from_checkpoint latest`.
    pub resume_from_checkpoint: bool,
    pub device: Device,
    /// LoRA instead of full fine-tuning (train_dreambooth_lora.py): the base weights stay
    /// frozen, adapters train, and the output is LoRA files instead of a model folder.
    pub lora: Option<LoraSettings>,
    /// dtype of the written LoRA files (the script writes float32).
    pub lora_save_kind: Kind,
}

impl DreamBoothConfig {
    /// A config with the `dreambooth` stage's defaults for everything but the required paths
    /// and prompt.
    pub fn new(
        pretrained_model_name_or_path: PathBuf,
        instance_data_dir: PathBuf,
        instance_prompt: &str,
        output_dir: PathBuf,
        work_dir: PathBuf,
    ) -> Self {
        let given = serde_json::json!({
            "model": pretrained_model_name_or_path.to_string_lossy(),
            "instance_images": instance_data_dir.to_string_lossy(),
            "instance_prompt": instance_prompt,
        });
        let schema = dreampipe_core::stages::Stage::schema(&DreamBoothKind);
        let params: DreamBoothParams = common::schema_defaults(&schema, given);
        Self {
            training: params.training,
            dreambooth: params.dreambooth,
            pretrained_model_name_or_path,
            instance_data_dir,
            class_data_dir: None,
            output_dir,
            work_dir,
            keep_final_checkpoint: false,
            resume_from_checkpoint: false,
            device: Device::Cpu,
            lora: None,
            lora_save_kind: Kind::Float,
        }
    }

    /// Rejects settings the loop cannot run, naming the option.
    pub fn validate(&self) -> Result<(), TrainError> {
        let fail = |field: &'static str, problem: &str| {
            Err(TrainError::Config {
                field,
                problem: problem.to_string(),
            })
        };
        let prior = self.dreambooth.with_prior_preservation;
        if prior && self.class_data_dir.is_none() {
            return fail("class_data_dir", "required with with_prior_preservation");
        }
        if prior && self.dreambooth.class_prompt.is_none() {
            return fail("class_prompt", "required with with_prior_preservation");
        }
        common::validate_training(&self.training, self.device)?;
        if self.lora.is_some_and(|lora| lora.rank < 1) {
            return fail("rank", "must be at least 1");
        }
        Ok(())
    }
}

/// The models, optimizer and schedule of a DreamBooth run, one optimizer step at a time.
pub struct DreamBoothTrainer {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    text_encoder_store: VarStore,
    unet: UNet2DConditionModel,
    unet_store: VarStore,
    vae: AutoencoderKL,
    _vae_store: VarStore,
    scheduler: DdpmScheduler,
    prediction: PredictionType,
    weight_kind: Kind,
    train_text_encoder: bool,
    gradient_checkpointing: bool,
    loss_spec: LossSpec,
    max_grad_norm: f64,
    trainables: Vec<(String, Tensor)>,
    optimizer: Optimizer,
    schedule: LrSchedule,
    precision: Precision,
    step: u64,
}

impl DreamBoothTrainer {
    /// Loads the base model and sets up the optimizer and lr schedule for `total_steps`.
    pub fn new(config: &DreamBoothConfig, total_steps: u64) -> Result<Self, TrainError> {
        config.validate()?;
        let device = config.device;
        let weight_kind = config.training.mixed_precision.weight_kind(device)?;
        let folder =
            ModelFolder::open(&config.pretrained_model_name_or_path).map_err(TrainError::model)?;
        let tokenizer =
            ClipTokenizer::from_dir(&folder.tokenizer_dir()).map_err(TrainError::model)?;
        let text_kind = if config.dreambooth.train_text_encoder {
            Kind::Float
        } else {
            weight_kind
        };
        let (mut text_encoder_store, mut text_encoder) =
            ClipTextModel::load(&folder.text_encoder_dir(), device, text_kind, None)
                .map_err(TrainError::model)?;
        let (mut unet_store, mut unet) =
            UNet2DConditionModel::load(&folder.unet_dir(), device, Kind::Float, None)
                .map_err(TrainError::model)?;
        let (mut vae_store, vae) =
            AutoencoderKL::load(&folder.vae_dir(), device, weight_kind, None)
                .map_err(TrainError::model)?;
        vae_store.freeze();
        if !config.dreambooth.train_text_encoder || config.lora.is_some() {
            text_encoder_store.freeze();
        }
        let scheduler_config =
            SchedulerConfig::from_file(&folder.scheduler_dir().join("scheduler_config.json"))
                .map_err(TrainError::model)?;
        let prediction = common::prediction_type(&scheduler_config)?;
        let scheduler = DdpmScheduler::new(&scheduler_config).map_err(TrainError::model)?;
        let trainables = match config.lora {
            Some(settings) => {
                unet_store.freeze();
                let text = config
                    .dreambooth
                    .train_text_encoder
                    .then_some(&mut text_encoder);
                lora::add_trainable_adapters(
                    &mut unet,
                    text,
                    settings,
                    config.training.seed,
                    device,
                )
            }
            None => named_trainables(
                &unet_store,
                config
                    .dreambooth
                    .train_text_encoder
                    .then_some(&text_encoder_store),
            ),
        };
        let lr = config.training.effective_learning_rate();
        let params: Vec<Tensor> = trainables.iter().map(|(_, t)| t.shallow_clone()).collect();
        let optimizer = Optimizer::new(
            config.training.optimizer,
            &params,
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
            tokenizer,
            text_encoder,
            text_encoder_store,
            unet,
            unet_store,
            vae,
            _vae_store: vae_store,
            scheduler,
            prediction,
            weight_kind,
            train_text_encoder: config.dreambooth.train_text_encoder,
            gradient_checkpointing: config.training.gradient_checkpointing,
            loss_spec: LossSpec {
                prior_loss_weight: config
                    .dreambooth
                    .with_prior_preservation
                    .then_some(config.dreambooth.prior_loss_weight),
                snr_gamma: config.dreambooth.snr_gamma,
            },
            max_grad_norm: config.dreambooth.max_grad_norm,
            trainables,
            optimizer,
            schedule,
            precision: Precision::new(config.training.mixed_precision, device)?,
            step: 0,
        })
    }

    /// Mixed precision: autocast of the trained modules and fp16 loss scaling.
    pub fn precision_mut(&mut self) -> &mut Precision {
        &mut self.precision
    }

    /// Optimizer steps done.
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    pub fn unet_store(&self) -> &VarStore {
        &self.unet_store
    }

    pub fn text_encoder_store(&self) -> &VarStore {
        &self.text_encoder_store
    }

    pub fn vae(&self) -> &AutoencoderKL {
        &self.vae
    }

    /// The trainable tensors by name (checkpoint names: `unet.<variable>`, or for LoRA
    /// PEFT's `unet.<module>.lora_A.weight`).
    pub fn trainables(&self) -> &[(String, Tensor)] {
        &self.trainables
    }

    /// Token ids `[1, 77]` of a prompt (padded, truncated).
    pub fn tokenize(&self, prompt: &str) -> Tensor {
        Tensor::from_slice(&self.tokenizer.encode(prompt).ids).unsqueeze(0)
    }

    /// One optimizer step over `micro_batches` (one per gradient-accumulation step):
    /// [`accumulate_gradients`](Self::accumulate_gradients) then
    /// [`apply_gradients`](Self::apply_gradients) with this step's learning rate.
    pub fn train_step(&mut self, micro_batches: &[StepBatch]) -> Result<StepReport, TrainError> {
        let lr = self
            .schedule
            .lr_at(self.precision.schedule_position(self.step));
        let loss = self.accumulate_gradients(micro_batches)?;
        let grad_norm = self.apply_gradients(lr)?;
        Ok(StepReport {
            loss,
            grad_norm: Some(grad_norm),
            lr,
            skipped_steps: self.precision.skipped_steps(),
        })
    }

    /// Loss of each micro-batch and `backward(loss / n)`; returns the mean loss. A NaN/inf
    /// loss zeroes the grads and fails before any update.
    pub fn accumulate_gradients(&mut self, micro_batches: &[StepBatch]) -> Result<f64, TrainError> {
        let count = micro_batches.len().max(1) as f64;
        let mut total = 0.0;
        for batch in micro_batches {
            let value = if self.gradient_checkpointing {
                self.checkpointed_backward(batch, count)
            } else {
                self.plain_backward(batch, count)
            };
            match value {
                Ok(value) => total += value,
                Err(error) => {
                    self.optimizer.zero_grad();
                    return Err(error);
                }
            }
        }
        Ok(total / count)
    }

    /// `backward(loss / count)` of one micro-batch; returns its loss.
    fn plain_backward(&self, batch: &StepBatch, count: f64) -> Result<f64, TrainError> {
        let loss = self.batch_loss(batch)?;
        let value = loss.double_value(&[]);
        common::check_finite(value, self.step + 1)?;
        self.precision.backward(&loss, count);
        Ok(value)
    }

    /// The same gradients as [`plain_backward`](Self::plain_backward) with the UNet run
    /// grad-free and recomputed block by block in the backward pass.
    fn checkpointed_backward(&self, batch: &StepBatch, count: f64) -> Result<f64, TrainError> {
        let hidden = self.encoder_hidden_states(batch)?;
        let model = self.diffusion_model();
        let (noisy, timesteps) = common::noisy_latents(&model, batch)?;
        let autocast = self.precision.autocast();
        let run = crate::sd::autocast::maybe(autocast, || {
            self.unet.forward_checkpointed(&noisy, &timesteps, &hidden)
        })
        .map_err(TrainError::Model)?;
        let pred = run.output().detach().set_requires_grad(true);
        let loss = common::loss_from_prediction(&model, batch, &pred, &timesteps)?
            .combine(&self.loss_spec)?;
        let value = loss.double_value(&[]);
        common::check_finite(value, self.step + 1)?;
        self.precision.backward(&loss, count);
        run.backward(&self.unet, &pred.grad(), &hidden, autocast)
            .map_err(TrainError::Model)?;
        Ok(value)
    }

    /// Unscales fp16 gradients, clips the global grad norm over the trainable parameters to
    /// `max_grad_norm`, takes an AdamW step with `lr` (skipped when fp16 scaling found an
    /// inf/NaN gradient), zeroes the grads. Returns the norm before clipping.
    pub fn apply_gradients(&mut self, lr: f64) -> Result<f64, TrainError> {
        let params: Vec<Tensor> = self
            .trainables
            .iter()
            .map(|(_, t)| t.shallow_clone())
            .collect();
        let found_inf = self.precision.unscale(&params);
        let grad_norm = clip_grad_norm(&params, self.max_grad_norm);
        if !found_inf {
            self.optimizer.set_lr(lr);
            self.optimizer.step()?;
        }
        self.precision.update(found_inf);
        self.optimizer.zero_grad();
        self.step += 1;
        Ok(grad_norm)
    }

    /// The loss of one batch (graph attached when something is trainable).
    pub fn batch_loss(&self, batch: &StepBatch) -> Result<Tensor, TrainError> {
        let hidden = self.encoder_hidden_states(batch)?;
        common::diffusion_loss(&self.diffusion_model(), batch, &hidden, &self.loss_spec)
    }

    /// The text encoder's output for the batch's tokens (graph attached when it trains).
    fn encoder_hidden_states(&self, batch: &StepBatch) -> Result<Tensor, TrainError> {
        let ids = batch.input_ids.to_device(batch.latents.device());
        if !self.train_text_encoder {
            let output = tch::no_grad(|| self.text_encoder.forward(&ids));
            return Ok(output.map_err(TrainError::model)?.last_hidden_state);
        }
        self.precision
            .forward(|| (self.text_encoder.forward(&ids)).map(|output| output.last_hidden_state))
    }

    fn diffusion_model(&self) -> DiffusionModel<'_> {
        DiffusionModel {
            unet: &self.unet,
            unet_kind: Kind::Float,
            autocast: self.precision.autocast(),
            scheduler: &self.scheduler,
            prediction: self.prediction,
        }
    }

    /// VAE posterior moments (mean, std) of pixel batches, in float32, without grad.
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

fn named_trainables(unet: &VarStore, text_encoder: Option<&VarStore>) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = common::trainable_sorted(unet)
        .into_iter()
        .map(|(name, t)| (format!("{UNET_PREFIX}{name}"), t))
        .collect();
    if let Some(vs) = text_encoder {
        named.extend(
            common::trainable_sorted(vs)
                .into_iter()
                .map(|(name, t)| (format!("{TEXT_ENCODER_PREFIX}{name}"), t)),
        );
    }
    named
}

/// VAE posterior (mean, std) of one image, float32.
type Moments = (Tensor, Tensor);

/// Decoded images and prompts of a run, with cached VAE moments when augmentation is off.
struct DreamBoothData {
    instances: Vec<RgbImage>,
    classes: Vec<RgbImage>,
    instance_ids: Tensor,
    class_ids: Option<Tensor>,
    transform: Transform,
    /// (mean, std) per instance image, then per class image, when the transform is fixed.
    cache: Option<(Vec<Moments>, Vec<Moments>)>,
}

impl DreamBoothData {
    fn load(config: &DreamBoothConfig, trainer: &DreamBoothTrainer) -> Result<Self, TrainError> {
        let instances = data::load_folder(&config.instance_data_dir, "instance_data_dir")?;
        let classes = match (
            &config.class_data_dir,
            config.dreambooth.with_prior_preservation,
        ) {
            (Some(dir), true) => data::load_folder(dir, "class_data_dir")?,
            _ => Vec::new(),
        };
        let class_ids = config
            .dreambooth
            .class_prompt
            .as_deref()
            .filter(|_| config.dreambooth.with_prior_preservation)
            .map(|prompt| trainer.tokenize(prompt));
        let transform = Transform::DreamBooth {
            resolution: config.training.resolution,
            center_crop: config.training.center_crop,
            random_flip: config.dreambooth.random_flip,
        };
        let mut loaded = Self {
            instance_ids: trainer.tokenize(&config.dreambooth.instance_prompt),
            instances,
            classes,
            class_ids,
            transform,
            cache: None,
        };
        if !transform.is_random() {
            loaded.cache = Some((
                loaded.encode_all(&loaded.instances, trainer, config.device),
                loaded.encode_all(&loaded.classes, trainer, config.device),
            ));
        }
        Ok(loaded)
    }

    fn encode_all(
        &self,
        images: &[RgbImage],
        trainer: &DreamBoothTrainer,
        device: Device,
    ) -> Vec<(Tensor, Tensor)> {
        images
            .iter()
            .map(|image| {
                let pixels = self
                    .transform
                    .apply(image, &mut SampleRng::for_sample(0, 0));
                trainer.encode_moments(&pixels.unsqueeze(0).to_device(device))
            })
            .collect()
    }

    /// diffusers' dataset length: max(instances, classes) with prior preservation.
    fn len(&self) -> usize {
        self.instances.len().max(self.classes.len())
    }

    fn sizes(&self) -> Vec<usize> {
        vec![self.instances.len(), self.classes.len()]
    }

    /// The micro-batch `micro` of optimizer step `step`: [instances..., classes...].
    fn batch(
        &self,
        trainer: &DreamBoothTrainer,
        config: &DreamBoothConfig,
        step: u64,
        micro: u64,
    ) -> Result<StepBatch, TrainError> {
        let size = config.training.train_batch_size as u64;
        let first = (step * config.training.gradient_accumulation_steps + micro) * size;
        let mut instance_moments = Vec::new();
        let mut class_moments = Vec::new();
        let mut instance_pixels = Vec::new();
        let mut class_pixels = Vec::new();
        for sample in first..first + size {
            let index = common::dataset_index(config.training.seed, self.len(), sample);
            let instance = index % self.instances.len();
            let class = (!self.classes.is_empty()).then(|| index % self.classes.len());
            match &self.cache {
                Some((instances, classes)) => {
                    instance_moments.push(&instances[instance]);
                    class_moments.extend(class.map(|c| &classes[c]));
                }
                None => {
                    let mut rng = SampleRng::for_sample(config.training.seed, sample);
                    instance_pixels.push(self.transform.apply(&self.instances[instance], &mut rng));
                    class_pixels
                        .extend(class.map(|c| self.transform.apply(&self.classes[c], &mut rng)));
                }
            }
        }
        let (mean, std) = if self.cache.is_some() {
            let all: Vec<&(Tensor, Tensor)> =
                instance_moments.into_iter().chain(class_moments).collect();
            let means: Vec<&Tensor> = all.iter().map(|(m, _)| m).collect();
            let stds: Vec<&Tensor> = all.iter().map(|(_, s)| s).collect();
            (Tensor::cat(&means, 0), Tensor::cat(&stds, 0))
        } else {
            let pixels: Vec<Tensor> = instance_pixels.into_iter().chain(class_pixels).collect();
            trainer.encode_moments(&Tensor::stack(&pixels, 0).to_device(config.device))
        };
        let _rng = common::seed_step_tensors(config.training.seed, step, micro);
        let epsilon = crate::sd::rng::randn(&mean.size(), Kind::Float, mean.device());
        // In the weight dtype, as the script's VAE sample (and so its noise) is.
        let latents =
            ((&mean + &std * epsilon) * trainer.vae.scaling_factor()).to_kind(trainer.weight_kind);
        let (noise, timesteps) = common::draw_noise_and_timesteps(
            &latents,
            config.dreambooth.offset_noise,
            trainer.scheduler.num_train_timesteps(),
        )?;
        let mut ids = vec![self.instance_ids.repeat([size as i64, 1])];
        if let Some(class_ids) = &self.class_ids {
            ids.push(class_ids.repeat([size as i64, 1]));
        }
        Ok(StepBatch {
            latents,
            noise,
            timesteps,
            input_ids: Tensor::cat(&ids, 0).to_device(config.device),
        })
    }
}

/// The trainer plus its data, as the driver sees it.
struct DreamBoothRun<'a> {
    trainer: DreamBoothTrainer,
    data: DreamBoothData,
    config: &'a DreamBoothConfig,
}

impl TrainingMethod for DreamBoothRun<'_> {
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
        self.trainer
            .trainables
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
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
        write_trained_folder(self.config, &self.trainer, dir)
    }

    fn write_outputs(&self, dir: &std::path::Path) -> Result<(), TrainError> {
        write_trained_folder(self.config, &self.trainer, dir)
    }

    fn next_step(&mut self) -> Result<StepReport, TrainError> {
        let step = self.trainer.step;
        let batches = (0..self.config.training.gradient_accumulation_steps)
            .map(|micro| self.data.batch(&self.trainer, self.config, step, micro))
            .collect::<Result<Vec<_>, _>>()?;
        self.trainer.train_step(&batches)
    }
}

/// Runs DreamBooth training: resumes from the latest checkpoint in `work_dir` when asked,
/// writes `metrics.jsonl` and, at the end, a complete diffusers folder into `output_dir`.
pub fn train(
    config: &DreamBoothConfig,
    callbacks: &mut Callbacks,
) -> Result<TrainOutcome, TrainError> {
    config.validate()?;
    let instance_count = data::list_images(&config.instance_data_dir, "instance_data_dir")?.len();
    let class_count = match (
        &config.class_data_dir,
        config.dreambooth.with_prior_preservation,
    ) {
        (Some(dir), true) => data::list_images(dir, "class_data_dir")?.len(),
        _ => 0,
    };
    let total = common::total_steps(
        config.training.max_train_steps,
        config.training.num_train_epochs,
        instance_count.max(class_count),
        config.training.train_batch_size,
        config.training.gradient_accumulation_steps,
    );
    let trainer = DreamBoothTrainer::new(config, total)?;
    let data = DreamBoothData::load(config, &trainer)?;
    let settings = DriverSettings {
        work_dir: &config.work_dir,
        metrics_dir: &config.output_dir,
        total_steps: total,
        checkpointing_steps: config.training.checkpointing_steps,
        checkpoints_total_limit: config.training.checkpoints_total_limit,
        resume: config.resume_from_checkpoint,
        save_final: config.keep_final_checkpoint,
        seed: config.training.seed,
        dataset_sizes: data.sizes(),
    };
    let mut run = DreamBoothRun {
        trainer,
        data,
        config,
    };
    let result = driver::run(&mut run, &settings, callbacks)?;
    let trainer = &run.trainer;
    write_trained_folder(config, trainer, &config.output_dir)?;
    Ok(TrainOutcome {
        steps: trainer.step,
        resumed_from: result.resumed_from,
        final_loss: result.final_loss,
        output_dir: config.output_dir.clone(),
    })
}

/// The base model with the trained UNet (and text encoder) as a diffusers folder at `dir`;
/// for LoRA, the adapters as `pytorch_lora_weights.safetensors` and `lora_kohya.safetensors`.
fn write_trained_folder(
    config: &DreamBoothConfig,
    trainer: &DreamBoothTrainer,
    dir: &std::path::Path,
) -> Result<(), TrainError> {
    if let Some(settings) = config.lora {
        return write_lora_files(config, trainer, settings, dir);
    }
    let base =
        ModelFolder::open(&config.pretrained_model_name_or_path).map_err(TrainError::model)?;
    output::write_model_folder(
        &base,
        dir,
        &NewWeights {
            unet: Some(&trainer.unet_store),
            text_encoder: config
                .dreambooth
                .train_text_encoder
                .then_some(&trainer.text_encoder_store),
            added_tokens: &[],
        },
    )
}

/// The trained adapters in both layouts (see `sd::lora::files`).
fn write_lora_files(
    config: &DreamBoothConfig,
    trainer: &DreamBoothTrainer,
    settings: LoraSettings,
    dir: &std::path::Path,
) -> Result<(), TrainError> {
    use crate::sd::lora::files::{self, DIFFUSERS_FILE, KOHYA_FILE};
    std::fs::create_dir_all(dir).map_err(|e| common::io_error(dir, "create", e))?;
    let weights = lora::trained_weights(&trainer.trainables, settings, dir);
    let kind = config.lora_save_kind;
    files::write_diffusers(&weights, &dir.join(DIFFUSERS_FILE), kind)
        .and_then(|()| files::write_kohya(&weights, &dir.join(KOHYA_FILE), kind))
        .map_err(|e| TrainError::Write(e.to_string()))
}
