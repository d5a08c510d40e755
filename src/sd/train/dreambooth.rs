//! DreamBooth fine-tuning as diffusers' examples/dreambooth/train_dreambooth.py: the UNet (and
//! optionally the text encoder) trained on instance images with an instance prompt, optionally
//! with prior preservation on class images. [`DreamBoothTrainer::train_step`] runs one optimizer
//! step on explicit latents / noise / timesteps (what the golden tests drive); [`train`] is the
//! whole run with data loading, resume, checkpoints, metrics and the output folder.
//!
//! Deviations from diffusers, by design:
//! * every random draw is derived from `(seed, step)` (see `streams::seed_step_tensors`) instead
//!   of one generator stream, so a resumed run is identical to an uninterrupted one;
//! * `seed` defaults to 0 (diffusers: unseeded);
//! * class images must already exist in `class_data_dir` (generate them with txt2img first);
//! * fp16 mixed precision needs CUDA (accelerate on a CPU does not autocast fp16 either);
//! * `gradient_checkpointing` recomputes each UNet block in a second phase (see
//!   `sd::unet::checkpointed`); the text encoder is not checkpointed;
//! * min-SNR weighting uses the instance half's timesteps (diffusers would broadcast the full
//!   batch's weights against the instance half).
use super::TrainError;
use super::base_model::{BaseModel, ModuleKinds};
use super::batch::{self, SizeAndCrop, StepBatch, XlBatch};
use super::config::{self, MixedPrecisionExt};
use super::data::{self, Transform};
use super::driver::{self, DriverSettings, TrainingMethod};
use super::lora::{self, LoraSettings};
use super::objective::{self, DiffusionModel, LossSpec};
use super::output::{self, NewWeights};
use super::precision::Precision;
use super::progress::{Callbacks, StepReport, TrainOutcome};
use super::streams::{self, SampleRng};
use super::trainer_core::{CoreSettings, FinishBackward, MicroBatchLoss, StepMethod, TrainerCore};
use crate::sd::folder::ModelFolder;
use crate::sd::tokenizer::ClipTokenizer;
use crate::sd::unet::AddedConditions;
use crate::sd::vae::AutoencoderKL;
use dreampipe_core::field;
use dreampipe_kinds::sd::dreambooth::{
    DreamBoothFields, DreamBoothKind, DreamBoothParams, UnetTuning,
};
use dreampipe_kinds::sd::dreambooth_lora::DreamBoothLoraParams;
use dreampipe_kinds::sd::training::TrainingParams;
use image::RgbImage;
use std::ops::Range;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor, nn::VarStore};

/// Name recorded in checkpoints.
pub const METHOD: &str = "dreambooth";
/// Prefixes of the trainable tensors in checkpoints.
const UNET_PREFIX: &str = "unet.";
const TEXT_ENCODER_PREFIX: &str = "text_encoder.";
const TEXT_ENCODER_2_PREFIX: &str = "text_encoder_2.";

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
    /// Augmentation, clipping and loss weighting of the UNet's training.
    pub unet: UnetTuning,
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
    /// Each instance image has its own caption, `name.txt` beside `name.png`
    /// (train_text_to_image.py's captioned fine-tuning); `instance_prompt` is then unused.
    pub captions: bool,
    /// Captioned fine-tuning: the share of samples trained on the empty caption instead of
    /// theirs (kohya's `caption_dropout_rate`), so classifier-free guidance has an
    /// unconditional prediction to work with; 0 in train_text_to_image.py.
    pub caption_dropout_rate: f64,
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
            (field!(TrainingParams, model)): pretrained_model_name_or_path.to_string_lossy(),
            (field!(DreamBoothFields, instance_images)): instance_data_dir.to_string_lossy(),
            (field!(DreamBoothFields, instance_prompt)): instance_prompt,
        });
        let schema = dreampipe_core::stages::Stage::schema(&DreamBoothKind);
        let params: DreamBoothParams = config::schema_defaults(&schema, given);
        Self {
            training: params.training,
            dreambooth: params.dreambooth,
            unet: params.unet,
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
            captions: false,
            caption_dropout_rate: 0.0,
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
            return fail(
                field!(DreamBoothFields, class_prompt),
                "required with with_prior_preservation",
            );
        }
        config::validate_training(&self.training, self.device)?;
        if self.lora.is_some_and(|lora| lora.rank < 1) {
            return fail(field!(DreamBoothLoraParams, rank), "must be at least 1");
        }
        Ok(())
    }

    /// The optimizer, lr schedule and mixed precision of the step core; DreamBooth clips.
    fn core_settings(&self, total_steps: u64) -> CoreSettings<'_> {
        CoreSettings {
            training: &self.training,
            total_steps,
            device: self.device,
            max_grad_norm: Some(self.unet.max_grad_norm),
        }
    }
}

/// The models, optimizer and schedule of a DreamBooth run, one optimizer step at a time: the
/// shared `TrainerCore` runs the step, `DreamBoothModel` supplies the loss.
pub struct DreamBoothTrainer {
    model: DreamBoothModel,
    core: TrainerCore,
}

/// What DreamBooth supplies to the shared step: its modules and the loss of a micro-batch
/// (UNet in float32 under autocast, text encoder trained or not, prior preservation, min-SNR,
/// optionally with the UNet gradient-checkpointed).
struct DreamBoothModel {
    base: BaseModel,
    train_text_encoder: bool,
    gradient_checkpointing: bool,
    loss_spec: LossSpec,
}

impl DreamBoothTrainer {
    /// Loads the base model and sets up the optimizer and lr schedule for `total_steps`.
    pub fn new(config: &DreamBoothConfig, total_steps: u64) -> Result<Self, TrainError> {
        config.validate()?;
        let weight_kind = config.training.mixed_precision.weight_kind(config.device)?;
        let kinds = ModuleKinds {
            weight: weight_kind,
            text_encoder: if config.dreambooth.train_text_encoder {
                Kind::Float
            } else {
                weight_kind
            },
            unet: Kind::Float,
        };
        let mut base =
            BaseModel::load(&config.pretrained_model_name_or_path, config.device, kinds)?;
        if !config.dreambooth.train_text_encoder || config.lora.is_some() {
            base.text_encoder_store.freeze();
            if let Some(xl) = base.xl.as_mut() {
                xl.text_encoder_2_store.freeze();
            }
        }
        let trainables = trainables(config, &mut base);
        let core = TrainerCore::new(trainables, &config.core_settings(total_steps))?;
        let model = DreamBoothModel {
            base,
            train_text_encoder: config.dreambooth.train_text_encoder,
            gradient_checkpointing: config.training.gradient_checkpointing,
            loss_spec: LossSpec {
                prior_loss_weight: config
                    .dreambooth
                    .with_prior_preservation
                    .then_some(config.dreambooth.prior_loss_weight),
                snr_gamma: config.unet.snr_gamma,
            },
        };
        Ok(Self { model, core })
    }

    /// Mixed precision: autocast of the trained modules and fp16 loss scaling.
    pub fn precision_mut(&mut self) -> &mut Precision {
        self.core.precision_mut()
    }

    /// Optimizer steps done.
    pub fn step(&self) -> u64 {
        self.core.step()
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.model.base.tokenizer
    }

    pub fn unet_store(&self) -> &VarStore {
        &self.model.base.unet_store
    }

    pub fn text_encoder_store(&self) -> &VarStore {
        &self.model.base.text_encoder_store
    }

    pub fn vae(&self) -> &AutoencoderKL {
        &self.model.base.vae
    }

    /// The trainable tensors by name (checkpoint names: `unet.<variable>`, or for LoRA
    /// PEFT's `unet.<module>.lora_A.weight`).
    pub fn trainables(&self) -> &[(String, Tensor)] {
        self.core.trainables()
    }

    /// Token ids `[1, 77]` of a prompt (padded, truncated).
    pub fn tokenize(&self, prompt: &str) -> Tensor {
        self.model.base.tokenize(prompt)
    }

    /// One optimizer step over `micro_batches` (one per gradient-accumulation step):
    /// [`accumulate_gradients`](Self::accumulate_gradients) then
    /// [`apply_gradients`](Self::apply_gradients) with this step's learning rate.
    pub fn train_step(&mut self, micro_batches: &[StepBatch]) -> Result<StepReport, TrainError> {
        self.core.train_step(&self.model, micro_batches)
    }

    /// Loss of each micro-batch and `backward(loss / n)`; returns the mean loss. A NaN/inf
    /// loss zeroes the grads and fails before any update.
    pub fn accumulate_gradients(&mut self, micro_batches: &[StepBatch]) -> Result<f64, TrainError> {
        self.core.accumulate_gradients(&self.model, micro_batches)
    }

    /// Unscales fp16 gradients, clips the global grad norm over the trainable parameters to
    /// `max_grad_norm`, takes an AdamW step with `lr` (skipped when fp16 scaling found an
    /// inf/NaN gradient), zeroes the grads. Returns the norm before clipping.
    pub fn apply_gradients(&mut self, lr: f64) -> Result<f64, TrainError> {
        let norm = self.core.apply_gradients(&self.model, lr)?;
        // DreamBooth always clips (`max_grad_norm` is set in `core_settings`).
        Ok(norm.unwrap_or_default())
    }

    /// The loss of one batch (graph attached when something is trainable).
    pub fn batch_loss(&self, batch: &StepBatch) -> Result<Tensor, TrainError> {
        self.model.batch_loss(batch, self.core.precision())
    }
}

impl StepMethod for DreamBoothModel {
    type Batch = StepBatch;

    fn micro_batch_loss<'a>(
        &'a self,
        batch: &StepBatch,
        precision: &'a Precision,
    ) -> Result<MicroBatchLoss<'a>, TrainError> {
        if self.gradient_checkpointing {
            self.checkpointed_loss(batch, precision)
        } else {
            self.batch_loss(batch, precision).map(MicroBatchLoss::from)
        }
    }
}

impl DreamBoothModel {
    /// The loss of one batch (graph attached when something is trainable).
    fn batch_loss(&self, batch: &StepBatch, precision: &Precision) -> Result<Tensor, TrainError> {
        let (hidden, added) = self.conditioning(batch, precision)?;
        objective::diffusion_loss(
            &self.diffusion_model(precision),
            batch,
            (&hidden, added.as_ref()),
            &self.loss_spec,
        )
    }

    /// The UNet's conditioning: the text encoder's states, and for SDXL both encoders'
    /// penultimate states side by side with the second's pooled `text_embeds` and the batch's
    /// time ids (as train_dreambooth_lora_sdxl.py's `encode_prompt`).
    fn conditioning(
        &self,
        batch: &StepBatch,
        precision: &Precision,
    ) -> Result<(Tensor, Option<AddedConditions>), TrainError> {
        let (Some(xl), Some(extra)) = (&self.base.xl, &batch.xl) else {
            return Ok((self.encoder_hidden_states(batch, precision)?, None));
        };
        let device = batch.latents.device();
        let (first, _) = self.encode_xl(&self.base.text_encoder, &batch.input_ids, precision)?;
        let (second, pooled) = self.encode_xl(&xl.text_encoder_2, &extra.input_ids_2, precision)?;
        let added = AddedConditions {
            text_embeds: pooled,
            time_ids: extra.time_ids.to_device(device),
        };
        Ok((Tensor::cat(&[first, second], -1), Some(added)))
    }

    /// One SDXL text encoder's penultimate hidden states and pooled output (`text_embeds` when
    /// it has a projection), with a graph when the text encoders train (float32 outputs under
    /// autocast, as accelerate returns them).
    fn encode_xl(
        &self,
        encoder: &crate::sd::clip::ClipTextModel,
        ids: &Tensor,
        precision: &Precision,
    ) -> Result<(Tensor, Tensor), TrainError> {
        let ids = ids.to_device(self.base.unet_store.device());
        let run = || {
            encoder
                .forward(&ids)
                .map(crate::sd::clip::ClipTextOutput::into_sdxl_parts)
        };
        if !self.train_text_encoder {
            return tch::no_grad(run).map_err(TrainError::model);
        }
        precision.forward_pair(run)
    }

    /// The same loss and gradients as [`batch_loss`](Self::batch_loss) with the UNet run
    /// grad-free: the loss's backward stops at the prediction, and the continuation
    /// recomputes the UNet block by block to carry it on.
    fn checkpointed_loss<'a>(
        &'a self,
        batch: &StepBatch,
        precision: &Precision,
    ) -> Result<MicroBatchLoss<'a>, TrainError> {
        let (hidden, added) = self.conditioning(batch, precision)?;
        let model = self.diffusion_model(precision);
        let (noisy, timesteps) = objective::noisy_latents(&model, batch)?;
        let autocast = precision.autocast();
        let unet = &self.base.unet;
        let run = crate::sd::autocast::maybe(autocast, || {
            unet.forward_checkpointed(&noisy, &timesteps, &hidden, added.as_ref())
        })
        .map_err(TrainError::Model)?;
        let pred = run.output().detach().set_requires_grad(true);
        let loss = objective::loss_from_prediction(&model, batch, &pred, &timesteps)?
            .combine(&self.loss_spec)?;
        let finish: FinishBackward<'a> = Box::new(move || {
            let text_embeds = added.as_ref().map(|a| &a.text_embeds);
            run.backward(unet, &pred.grad(), (&hidden, text_embeds), autocast)
                .map_err(TrainError::Model)
        });
        Ok(MicroBatchLoss {
            loss,
            finish_backward: Some(finish),
        })
    }

    /// The text encoder's output for the batch's tokens (graph attached when it trains).
    fn encoder_hidden_states(
        &self,
        batch: &StepBatch,
        precision: &Precision,
    ) -> Result<Tensor, TrainError> {
        let ids = batch.input_ids.to_device(batch.latents.device());
        let text_encoder = &self.base.text_encoder;
        if !self.train_text_encoder {
            let output = tch::no_grad(|| text_encoder.forward(&ids));
            return Ok(output.map_err(TrainError::model)?.last_hidden_state);
        }
        precision.forward(|| (text_encoder.forward(&ids)).map(|output| output.last_hidden_state))
    }

    fn diffusion_model(&self, precision: &Precision) -> DiffusionModel<'_> {
        DiffusionModel {
            unet: &self.base.unet,
            unet_kind: Kind::Float,
            autocast: precision.autocast(),
            scheduler: &self.base.scheduler,
            prediction: self.base.prediction,
        }
    }
}

/// The trained tensors: LoRA adapters on the frozen UNet (and text encoder), or the UNet's
/// (and text encoder's) own variables.
fn trainables(config: &DreamBoothConfig, base: &mut BaseModel) -> Vec<(String, Tensor)> {
    match config.lora {
        Some(settings) => {
            base.unet_store.freeze();
            let train_text = config.dreambooth.train_text_encoder;
            let texts = lora::TextEncoders {
                first: train_text.then_some(&mut base.text_encoder),
                second: (base.xl.as_mut())
                    .filter(|_| train_text)
                    .map(|xl| &mut xl.text_encoder_2),
            };
            lora::add_trainable_adapters(
                &mut base.unet,
                texts,
                settings,
                config.training.seed,
                config.device,
            )
        }
        None => {
            let train_text = config.dreambooth.train_text_encoder;
            let mut named = named_trainables(
                &base.unet_store,
                train_text.then_some(&base.text_encoder_store),
            );
            if let Some(xl) = base.xl.as_ref().filter(|_| train_text) {
                named.extend(
                    super::base_model::trainable_sorted(&xl.text_encoder_2_store)
                        .into_iter()
                        .map(|(name, t)| (format!("{TEXT_ENCODER_2_PREFIX}{name}"), t)),
                );
            }
            named
        }
    }
}

fn named_trainables(unet: &VarStore, text_encoder: Option<&VarStore>) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = super::base_model::trainable_sorted(unet)
        .into_iter()
        .map(|(name, t)| (format!("{UNET_PREFIX}{name}"), t))
        .collect();
    if let Some(vs) = text_encoder {
        named.extend(
            super::base_model::trainable_sorted(vs)
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
    /// SDXL: the second tokenizer's instance (and class) ids.
    xl_ids: Option<(Tensor, Option<Tensor>)>,
    /// SDXL: each instance image's crop `(top, left)` when the transform is fixed.
    instance_crops: Vec<(u32, u32)>,
    /// Captioned fine-tuning: each instance image's caption ids (and SDXL's second ids).
    captions: Option<Vec<(Tensor, Option<Tensor>)>>,
    /// Captioned fine-tuning with caption dropout: the empty caption's ids and the rate.
    dropout: Option<((Tensor, Option<Tensor>), f64)>,
}

/// The class prompt, when prior preservation uses one.
fn class_prompt(config: &DreamBoothConfig) -> Option<&str> {
    (config.dreambooth.class_prompt.as_deref())
        .filter(|_| config.dreambooth.with_prior_preservation)
}

/// SDXL: the second tokenizer's instance (and class) prompt ids.
fn xl_prompt_ids(config: &DreamBoothConfig, base: &BaseModel) -> Option<(Tensor, Option<Tensor>)> {
    base.tokenize_2(&config.dreambooth.instance_prompt)
        .map(|ids| {
            (
                ids,
                class_prompt(config).and_then(|prompt| base.tokenize_2(prompt)),
            )
        })
}

impl DreamBoothData {
    fn load(config: &DreamBoothConfig, base: &BaseModel) -> Result<Self, TrainError> {
        let instances = data::load_folder(&config.instance_data_dir, "instance_data_dir")?;
        let classes = match (
            &config.class_data_dir,
            config.dreambooth.with_prior_preservation,
        ) {
            (Some(dir), true) => data::load_folder(dir, "class_data_dir")?,
            _ => Vec::new(),
        };
        let transform = Transform::DreamBooth {
            resolution: config.training.resolution,
            center_crop: config.training.center_crop,
            random_flip: config.unet.random_flip,
        };
        let mut loaded = Self {
            instance_ids: base.tokenize(&config.dreambooth.instance_prompt),
            instances,
            classes,
            class_ids: class_prompt(config).map(|prompt| base.tokenize(prompt)),
            transform,
            cache: None,
            xl_ids: xl_prompt_ids(config, base),
            instance_crops: Vec::new(),
            captions: match config.captions {
                true => Some(caption_ids(&config.instance_data_dir, base)?),
                false => None,
            },
            dropout: (config.captions && config.caption_dropout_rate > 0.0).then(|| {
                (
                    (base.tokenize(""), base.tokenize_2("")),
                    config.caption_dropout_rate,
                )
            }),
        };
        if !transform.is_random() {
            loaded.cache_fixed_transform(base, config.device);
        }
        Ok(loaded)
    }

    /// With a fixed transform: each instance image's crop, and every image's VAE moments
    /// encoded once.
    fn cache_fixed_transform(&mut self, base: &BaseModel, device: Device) {
        let transform = self.transform;
        self.instance_crops = (self.instances.iter())
            .map(|image| {
                transform
                    .apply_with_crop(image, &mut SampleRng::for_sample(0, 0))
                    .1
            })
            .collect();
        self.cache = Some((
            self.encode_all(&self.instances, base, device),
            self.encode_all(&self.classes, base, device),
        ));
    }

    fn encode_all(&self, images: &[RgbImage], base: &BaseModel, device: Device) -> Vec<Moments> {
        images
            .iter()
            .map(|image| {
                let pixels = self
                    .transform
                    .apply(image, &mut SampleRng::for_sample(0, 0));
                base.encode_moments(&pixels.unsqueeze(0).to_device(device))
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
        base: &BaseModel,
        config: &DreamBoothConfig,
        step: u64,
        micro: u64,
    ) -> Result<StepBatch, TrainError> {
        let size = config.training.train_batch_size as u64;
        let first = (step * config.training.gradient_accumulation_steps + micro) * size;
        let samples = first..first + size;
        let seed = config.training.seed;
        let (moments, crops) = match &self.cache {
            Some(cache) => {
                let crops = samples
                    .clone()
                    .map(|s| self.size_and_crop(self.entries(seed, s).0, None))
                    .collect();
                (self.cached_moments(cache, seed, samples), crops)
            }
            None => self.encoded_moments(base, config, samples),
        };
        let input_ids = match &self.captions {
            Some(captions) => self.captioned(captions, seed, first..first + size, |c| &c.0),
            None => self.repeated(&self.instance_ids, self.class_ids.as_ref(), size),
        };
        let mut batch = base.draw_batch(
            moments,
            input_ids.to_device(config.device),
            (seed, step, micro),
            config.dreambooth.offset_noise,
        )?;
        if let Some((instance_2, class_2)) = &self.xl_ids {
            let input_ids_2 = match &self.captions {
                Some(captions) => self.captioned(captions, seed, first..first + size, |c| {
                    c.1.as_ref().unwrap_or(&c.0)
                }),
                None => self.repeated(instance_2, class_2.as_ref(), size),
            };
            batch.xl = Some(XlBatch {
                input_ids_2,
                time_ids: self.time_ids(&crops, config.training.resolution),
            });
        }
        Ok(batch)
    }

    /// The caption ids of each sample's instance image (the empty caption's for a sample caption
    /// dropout drew), stacked (captioned fine-tuning has no class half).
    fn captioned(
        &self,
        captions: &[(Tensor, Option<Tensor>)],
        seed: u64,
        samples: Range<u64>,
        pick: impl Fn(&(Tensor, Option<Tensor>)) -> &Tensor,
    ) -> Tensor {
        let rows: Vec<&Tensor> = samples
            .map(|sample| {
                let caption = &captions[self.entries(seed, sample).0];
                pick(match &self.dropout {
                    Some((empty, rate)) if SampleRng::for_caption(seed, sample).unit() < *rate => {
                        empty
                    }
                    _ => caption,
                })
            })
            .collect();
        Tensor::cat(&rows, 0)
    }

    /// `size` rows of the instance ids, then as many of the class ids (prior preservation).
    fn repeated(&self, instance: &Tensor, class: Option<&Tensor>, size: u64) -> Tensor {
        let mut ids = vec![instance.repeat([size as i64, 1])];
        ids.extend(class.map(|class| class.repeat([size as i64, 1])));
        Tensor::cat(&ids, 0)
    }

    /// The original size of instance `instance` and its crop (the fixed transform's, unless
    /// `crop` gives the one drawn).
    fn size_and_crop(&self, instance: usize, crop: Option<(u32, u32)>) -> SizeAndCrop {
        let image = &self.instances[instance];
        let crop = crop.unwrap_or_else(|| self.instance_crops[instance]);
        ((image.height(), image.width()), crop)
    }

    /// train_dreambooth_lora_sdxl.py's `compute_time_ids` of the batch's instances, then the
    /// same rows again for the class half (the script gives class images their instance's
    /// sizes).
    fn time_ids(&self, crops: &[SizeAndCrop], resolution: u32) -> Tensor {
        let mut rows = crops.to_vec();
        if self.class_ids.is_some() {
            rows.extend_from_within(..);
        }
        batch::time_ids(&rows, resolution)
    }

    /// The instance (and class) image of run-wide sample number `sample`.
    fn entries(&self, seed: u64, sample: u64) -> (usize, Option<usize>) {
        let index = streams::dataset_index(seed, self.len(), sample);
        let class = (!self.classes.is_empty()).then(|| index % self.classes.len());
        (index % self.instances.len(), class)
    }

    /// The cached moments of `samples`: [instances..., classes...].
    fn cached_moments(
        &self,
        (instances, classes): &(Vec<Moments>, Vec<Moments>),
        seed: u64,
        samples: Range<u64>,
    ) -> Moments {
        let mut instance_moments = Vec::new();
        let mut class_moments = Vec::new();
        for sample in samples {
            let (instance, class) = self.entries(seed, sample);
            instance_moments.push(&instances[instance]);
            class_moments.extend(class.map(|c| &classes[c]));
        }
        let all: Vec<&Moments> = instance_moments.into_iter().chain(class_moments).collect();
        let means: Vec<&Tensor> = all.iter().map(|(m, _)| m).collect();
        let stds: Vec<&Tensor> = all.iter().map(|(_, s)| s).collect();
        (Tensor::cat(&means, 0), Tensor::cat(&stds, 0))
    }

    /// The moments of `samples` transformed afresh (random crop or flip): [instances...,
    /// classes...], one data stream per sample for its instance and class image.
    fn encoded_moments(
        &self,
        base: &BaseModel,
        config: &DreamBoothConfig,
        samples: Range<u64>,
    ) -> (Moments, Vec<SizeAndCrop>) {
        let mut instance_pixels = Vec::new();
        let mut class_pixels = Vec::new();
        let mut crops = Vec::new();
        for sample in samples {
            let (instance, class) = self.entries(config.training.seed, sample);
            let mut rng = SampleRng::for_sample(config.training.seed, sample);
            let (pixels, crop) =
                (self.transform).apply_with_crop(&self.instances[instance], &mut rng);
            instance_pixels.push(pixels);
            crops.push(self.size_and_crop(instance, Some(crop)));
            class_pixels.extend(class.map(|c| self.transform.apply(&self.classes[c], &mut rng)));
        }
        let pixels: Vec<Tensor> = instance_pixels.into_iter().chain(class_pixels).collect();
        let moments = base.encode_moments(&Tensor::stack(&pixels, 0).to_device(config.device));
        (moments, crops)
    }
}

/// The caption of every image of `dir` (in `data::list_images` order), tokenized for the
/// text encoder (and SDXL's second): `name.txt` beside `name.png`, required for each image.
fn caption_ids(dir: &Path, base: &BaseModel) -> Result<Vec<(Tensor, Option<Tensor>)>, TrainError> {
    let images = data::list_images(dir, "instance_data_dir")?;
    let mut ids = Vec::with_capacity(images.len());
    for image in images {
        let caption = data::read_caption(&image)?;
        ids.push((base.tokenize(&caption), base.tokenize_2(&caption)));
    }
    Ok(ids)
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

    fn core(&self) -> &TrainerCore {
        &self.trainer.core
    }

    fn core_mut(&mut self) -> &mut TrainerCore {
        &mut self.trainer.core
    }

    fn write_model(&self, dir: &Path) -> Result<(), TrainError> {
        write_trained_folder(self.config, &self.trainer, dir)
    }

    fn write_outputs(&self, dir: &Path) -> Result<(), TrainError> {
        write_trained_folder(self.config, &self.trainer, dir)
    }

    fn next_step(&mut self) -> Result<StepReport, TrainError> {
        let step = self.trainer.step();
        let base = &self.trainer.model.base;
        let batches = (0..self.config.training.gradient_accumulation_steps)
            .map(|micro| self.data.batch(base, self.config, step, micro))
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
    let total = config::total_steps(
        config.training.max_train_steps,
        config.training.num_train_epochs,
        instance_count.max(class_count),
        config.training.train_batch_size,
        config.training.gradient_accumulation_steps,
    );
    let trainer = DreamBoothTrainer::new(config, total)?;
    let data = DreamBoothData::load(config, &trainer.model.base)?;
    let settings = DriverSettings {
        work_dir: &config.work_dir,
        output_dir: &config.output_dir,
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
    driver::run(&mut run, &settings, callbacks)
}

/// The base model with the trained UNet (and text encoder) as a diffusers folder at `dir`;
/// for LoRA, the adapters as `pytorch_lora_weights.safetensors` and `lora_kohya.safetensors`.
fn write_trained_folder(
    config: &DreamBoothConfig,
    trainer: &DreamBoothTrainer,
    dir: &Path,
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
            unet: Some(trainer.unet_store()),
            text_encoder: config
                .dreambooth
                .train_text_encoder
                .then_some(trainer.text_encoder_store()),
            text_encoder_2: (trainer.model.base.xl.as_ref())
                .filter(|_| config.dreambooth.train_text_encoder)
                .map(|xl| &xl.text_encoder_2_store),
            added_tokens: &[],
            added_tokens_2: &[],
            ..NewWeights::default()
        },
    )
}

/// The trained adapters in both layouts (see `sd::lora::files`).
fn write_lora_files(
    config: &DreamBoothConfig,
    trainer: &DreamBoothTrainer,
    settings: LoraSettings,
    dir: &Path,
) -> Result<(), TrainError> {
    use crate::sd::lora::files::{self, DIFFUSERS_FILE, KOHYA_FILE};
    std::fs::create_dir_all(dir).map_err(|e| super::io_error(dir, "create", e))?;
    let weights = lora::trained_weights(trainer.trainables(), settings, dir);
    let kind = config.lora_save_kind;
    files::write_diffusers(&weights, &dir.join(DIFFUSERS_FILE), kind)
        .and_then(|()| files::write_kohya(&weights, &dir.join(KOHYA_FILE), kind))
        .map_err(|e| TrainError::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which of 64 samples of a run with `rate` train on the empty caption, through the data
    /// of a captioned run on the tiny model (two images, two captions).
    fn dropped_samples(rate: f64) -> Vec<bool> {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, caption) in [("a", "a red star"), ("b", "a blue circle")] {
            let image = image::RgbImage::from_pixel(32, 32, image::Rgb([90, 20, 200]));
            image
                .save(dir.path().join(format!("{name}.png")))
                .expect("png");
            std::fs::write(dir.path().join(format!("{name}.txt")), caption).expect("txt");
        }
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-sd");
        let mut config = DreamBoothConfig::new(
            model,
            dir.path().to_path_buf(),
            "",
            dir.path().join("out"),
            dir.path().join("work"),
        );
        (config.captions, config.caption_dropout_rate) = (true, rate);
        config.training.resolution = 32;
        let kinds = ModuleKinds {
            weight: Kind::Float,
            text_encoder: Kind::Float,
            unet: Kind::Float,
        };
        let base = BaseModel::load(&config.pretrained_model_name_or_path, Device::Cpu, kinds)
            .expect("tiny model");
        let data = DreamBoothData::load(&config, &base).expect("data");
        let captions = data.captions.as_ref().expect("captions");
        let empty = base.tokenize("");
        let ids = data.captioned(captions, config.training.seed, 0..64, |c| &c.0);
        (0..64)
            .map(|row| ids.get(row).unsqueeze(0).equal(&empty))
            .collect()
    }

    #[test]
    fn caption_dropout_trains_that_share_of_samples_on_the_empty_caption() {
        assert_eq!(dropped_samples(0.0), vec![false; 64]);
        let dropped = dropped_samples(0.25);
        let count = dropped.iter().filter(|d| **d).count();
        assert!((6..=26).contains(&count), "{count} of 64 dropped at 0.25");
        assert_eq!(dropped, dropped_samples(0.25), "the draws are seeded");
        assert_eq!(dropped_samples(1.0), vec![true; 64]);
    }
}
