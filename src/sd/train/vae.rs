//! VAE training as diffusers' examples/research_projects/autoencoderkl/train_autoencoderkl.py
//! with its perceptual (LPIPS, `--perceptual_scale`) and adversarial (discriminator) terms off:
//! each image is encoded, a latent drawn from the posterior (`mean + std * eps`), decoded, and
//! the loss is the reconstruction error summed over the image (L2 or L1) plus `kl_scale` times
//! the posterior's KL divergence from N(0, 1), both averaged over the batch; AdamW over every
//! VAE parameter, the global grad norm clipped. [`VaeTrainer::train_step`] runs one step on
//! explicit pixels and noise (the golden tests); [`train`] is the whole run on the shared
//! driver (resume, checkpoints, metrics, validation samples).
//!
//! Output in `output_dir`: the base model with the new `vae/` as a complete diffusers folder
//! (every other component copied). With `fit_scaling_factor` the VAE's `scaling_factor`
//! becomes 1 / std of the training images' latent means, as Stable Diffusion's 0.18215 was
//! chosen, so a UNet trained on it sees unit-variance latents.
use super::TrainError;
use super::config::{self, MixedPrecisionExt};
use super::data::{self, Transform};
use super::driver::{self, DriverSettings, TrainingMethod};
use super::output::{self, NewWeights};
use super::precision::Precision;
use super::progress::{Callbacks, StepReport, TrainOutcome};
use super::streams::{self, SampleRng, seed_step_tensors};
use super::trainer_core::{CoreSettings, MicroBatchLoss, StepMethod, TrainerCore};
use crate::sd::folder::ModelFolder;
use crate::sd::rng;
use crate::sd::vae::{AutoencoderKL, DiagonalGaussian};
use dreampipe_core::field;
use dreampipe_kinds::sd::training::TrainingParams;
use dreampipe_kinds::sd::vae::{ReconstructionLoss, VaeKind, VaeParams};
use image::RgbImage;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor, nn::VarStore};

/// Name recorded in checkpoints.
pub const METHOD: &str = "vae";
/// Images encoded at once when the scaling factor is fitted.
const FIT_CHUNK: usize = 64;

/// train_autoencoderkl.py's arguments: the `vae` stage's typed fields plus the resolved paths.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeTrainConfig {
    /// The hyperparameters every training kind shares (the input fields in it are not read:
    /// the paths below are). `gradient_checkpointing` is not supported (rejected).
    pub training: TrainingParams,
    pub rec_loss: ReconstructionLoss,
    pub kl_scale: f64,
    pub max_grad_norm: f64,
    pub fit_scaling_factor: bool,
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

impl VaeTrainConfig {
    /// A config with the `vae` stage's defaults for everything but the paths.
    pub fn new(model: PathBuf, images: PathBuf, output_dir: PathBuf, work_dir: PathBuf) -> Self {
        let given = serde_json::json!({
            (field!(TrainingParams, model)): model.to_string_lossy(),
            (field!(VaeParams, images)): images.to_string_lossy(),
        });
        let schema = dreampipe_core::stages::Stage::schema(&VaeKind);
        let params: VaeParams = config::schema_defaults(&schema, given);
        Self {
            training: params.training,
            rec_loss: params.rec_loss,
            kl_scale: params.kl_scale,
            max_grad_norm: params.max_grad_norm,
            fit_scaling_factor: params.fit_scaling_factor,
            pretrained_model_name_or_path: model,
            train_data_dir: images,
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
                field: field!(TrainingParams, gradient_checkpointing),
                problem: dreampipe_kinds::sd::vae::NO_CHECKPOINTING.to_string(),
            });
        }
        config::validate_training(&self.training, self.device)
    }
}

/// One micro-batch with every random draw made explicit: `pixels` `[b, 3, r, r]` in [-1, 1]
/// and `noise`, the posterior draw's standard normal noise, shaped like the latents.
pub struct VaeBatch {
    pub pixels: Tensor,
    pub noise: Tensor,
}

/// The VAE being trained, its optimizer and step count.
pub struct VaeTrainer {
    model: VaeModel,
    core: TrainerCore,
}

/// What VAE training supplies to the shared step: the loss of a micro-batch.
struct VaeModel {
    vae: AutoencoderKL,
    store: VarStore,
    rec_loss: ReconstructionLoss,
    kl_scale: f64,
}

impl VaeTrainer {
    /// Loads the model's VAE in float32, every parameter trainable (sorted by name).
    pub fn new(config: &VaeTrainConfig, total_steps: u64) -> Result<Self, TrainError> {
        config.validate()?;
        config.training.mixed_precision.weight_kind(config.device)?;
        let folder =
            ModelFolder::open(&config.pretrained_model_name_or_path).map_err(TrainError::model)?;
        let (store, vae) = AutoencoderKL::load(&folder.vae_dir(), config.device, Kind::Float, None)
            .map_err(TrainError::model)?;
        let trainables = super::base_model::trainable_sorted(&store);
        let settings = CoreSettings {
            training: &config.training,
            total_steps,
            device: config.device,
            max_grad_norm: Some(config.max_grad_norm),
        };
        let core = TrainerCore::new(trainables, &settings)?;
        let model = VaeModel {
            vae,
            store,
            rec_loss: config.rec_loss,
            kl_scale: config.kl_scale,
        };
        Ok(Self { model, core })
    }

    pub fn step(&self) -> u64 {
        self.core.step()
    }

    pub fn vae(&self) -> &AutoencoderKL {
        &self.model.vae
    }

    pub fn store(&self) -> &VarStore {
        &self.model.store
    }

    /// One optimizer step over `micro_batches`: loss, `backward(loss / n)`, grad-norm clipping,
    /// AdamW, zero grads.
    pub fn train_step(&mut self, micro_batches: &[VaeBatch]) -> Result<StepReport, TrainError> {
        self.core.train_step(&self.model, micro_batches)
    }

    /// The loss of one batch without a step.
    pub fn batch_loss(&self, batch: &VaeBatch) -> Result<Tensor, TrainError> {
        self.model.batch_loss(batch, self.core.precision())
    }

    /// `[latent_channels, downscale]` of the VAE: a latent is `[c, r / f, r / f]`.
    fn latent_shape(&self) -> (i64, i64) {
        let config = self.model.vae.config();
        let blocks = config.block_out_channels.len().max(1) as u32;
        (config.latent_channels, 2i64.pow(blocks - 1))
    }
}

impl StepMethod for VaeModel {
    type Batch = VaeBatch;

    fn micro_batch_loss<'a>(
        &'a self,
        batch: &VaeBatch,
        precision: &'a Precision,
    ) -> Result<MicroBatchLoss<'a>, TrainError> {
        self.batch_loss(batch, precision).map(MicroBatchLoss::from)
    }
}

impl VaeModel {
    /// Encode, draw, decode under the trained modules' autocast; the loss in float32.
    fn batch_loss(&self, batch: &VaeBatch, precision: &Precision) -> Result<Tensor, TrainError> {
        let device = self.store.device();
        let pixels = batch.pixels.to_device(device);
        let noise = batch.noise.to_device(device);
        let (reconstruction, posterior) = precision.forward_pair(|| {
            let posterior = self.vae.encode(&pixels);
            let latents = &posterior.mean + &posterior.std * &noise;
            let moments = Tensor::cat(&[&posterior.mean, &posterior.logvar], 1);
            Ok::<_, std::convert::Infallible>((self.vae.decode(&latents), moments))
        })?;
        let posterior = DiagonalGaussian::from_moments(&posterior);
        Ok(vae_loss(
            &reconstruction,
            &pixels,
            &posterior,
            self.rec_loss,
            self.kl_scale,
        ))
    }
}

/// train_autoencoderkl.py's loss without LPIPS and discriminator: the per-pixel reconstruction
/// error summed and divided by the batch size, plus `kl_scale` times the KL divergence
/// `0.5 * sum(mean^2 + var - 1 - logvar)` likewise (diffusers' `DiagonalGaussianDistribution.kl`).
pub fn vae_loss(
    reconstruction: &Tensor,
    targets: &Tensor,
    posterior: &DiagonalGaussian,
    rec_loss: ReconstructionLoss,
    kl_scale: f64,
) -> Tensor {
    let batch = targets.size()[0] as f64;
    let error = reconstruction.to_kind(Kind::Float) - targets.to_kind(Kind::Float);
    let per_pixel = match rec_loss {
        ReconstructionLoss::L2 => error.square(),
        ReconstructionLoss::L1 => error.abs(),
    };
    let nll = per_pixel.sum(Kind::Float) / batch;
    let (mean, logvar) = (&posterior.mean, &posterior.logvar);
    let kl = (mean.square() + logvar.exp() - 1.0 - logvar).sum(Kind::Float) * 0.5 / batch;
    nll + kl * kl_scale
}

/// The run's images and how each is cropped to the resolution.
struct VaeData {
    images: Vec<RgbImage>,
    transform: Transform,
}

impl VaeData {
    fn load(config: &VaeTrainConfig) -> Result<Self, TrainError> {
        Ok(Self {
            images: data::load_folder(&config.train_data_dir, "images")?,
            transform: Transform::DreamBooth {
                resolution: config.training.resolution,
                center_crop: config.training.center_crop,
                random_flip: false,
            },
        })
    }

    /// The micro-batch `micro` of optimizer step `step`: each sample's image, then the
    /// posterior noise from the micro-batch's seeded stream.
    fn batch(
        &self,
        config: &VaeTrainConfig,
        (channels, downscale): (i64, i64),
        step: u64,
        micro: u64,
    ) -> VaeBatch {
        let training = &config.training;
        let size = training.train_batch_size as u64;
        let first = (step * training.gradient_accumulation_steps + micro) * size;
        let pixels: Vec<Tensor> = (first..first + size)
            .map(|sample| {
                let index = streams::dataset_index(training.seed, self.images.len(), sample);
                let mut rng = SampleRng::for_sample(training.seed, sample);
                self.transform.apply(&self.images[index], &mut rng)
            })
            .collect();
        let pixels = Tensor::stack(&pixels, 0).to_device(config.device);
        let side = i64::from(training.resolution) / downscale;
        let _stream = seed_step_tensors(training.seed, step, micro);
        let shape = [size as i64, channels, side, side];
        let noise = rng::randn(&shape, Kind::Float, config.device);
        VaeBatch { pixels, noise }
    }

    /// 1 / std of the latent means of every image (center-cropped), the scaling factor that
    /// gives the UNet unit-variance latents.
    fn fitted_scaling_factor(&self, vae: &AutoencoderKL, config: &VaeTrainConfig) -> f64 {
        let center = Transform::DreamBooth {
            resolution: config.training.resolution,
            center_crop: true,
            random_flip: false,
        };
        let means: Vec<Tensor> = tch::no_grad(|| {
            (self.images.chunks(FIT_CHUNK))
                .map(|chunk| {
                    let pixels: Vec<Tensor> = (chunk.iter())
                        .map(|image| center.apply(image, &mut SampleRng::for_sample(0, 0)))
                        .collect();
                    let pixels = Tensor::stack(&pixels, 0).to_device(config.device);
                    vae.encode(&pixels).mean.to_kind(Kind::Double)
                })
                .collect()
        });
        1.0 / Tensor::cat(&means, 0).std(true).double_value(&[])
    }
}

struct VaeRun<'a> {
    trainer: VaeTrainer,
    data: VaeData,
    config: &'a VaeTrainConfig,
}

impl TrainingMethod for VaeRun<'_> {
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
        let scaling_factor = (self.config.fit_scaling_factor)
            .then(|| (self.data).fitted_scaling_factor(self.trainer.vae(), self.config));
        write_model(self.config, self.trainer.store(), scaling_factor, dir)
    }

    fn write_outputs(&self, dir: &Path) -> Result<(), TrainError> {
        self.write_model(dir)
    }

    fn next_step(&mut self) -> Result<StepReport, TrainError> {
        let step = self.trainer.step();
        let shape = self.trainer.latent_shape();
        let batches: Vec<VaeBatch> = (0..self.config.training.gradient_accumulation_steps)
            .map(|micro| self.data.batch(self.config, shape, step, micro))
            .collect();
        self.trainer.train_step(&batches)
    }
}

/// The base model with the trained VAE (and, when fitted, its scaling factor) as a diffusers
/// folder at `dir`.
pub fn write_model(
    config: &VaeTrainConfig,
    store: &VarStore,
    scaling_factor: Option<f64>,
    dir: &Path,
) -> Result<(), TrainError> {
    let base =
        ModelFolder::open(&config.pretrained_model_name_or_path).map_err(TrainError::model)?;
    let new = NewWeights {
        vae: Some(store),
        vae_scaling_factor: scaling_factor,
        ..NewWeights::default()
    };
    output::write_model_folder(&base, dir, &new)
}

/// Trains the VAE and writes the model folder into the output folder.
pub fn train(
    config: &VaeTrainConfig,
    callbacks: &mut Callbacks,
) -> Result<TrainOutcome, TrainError> {
    config.validate()?;
    let data = VaeData::load(config)?;
    let total = config::total_steps(
        config.training.max_train_steps,
        config.training.num_train_epochs,
        data.images.len(),
        config.training.train_batch_size,
        config.training.gradient_accumulation_steps,
    );
    let trainer = VaeTrainer::new(config, total)?;
    let settings = DriverSettings {
        work_dir: &config.work_dir,
        output_dir: &config.output_dir,
        total_steps: total,
        checkpointing_steps: config.training.checkpointing_steps,
        checkpoints_total_limit: config.training.checkpoints_total_limit,
        resume: config.resume_from_checkpoint,
        save_final: config.keep_final_checkpoint,
        seed: config.training.seed,
        dataset_sizes: vec![data.images.len()],
    };
    let mut run = VaeRun {
        trainer,
        data,
        config,
    };
    driver::run(&mut run, &settings, callbacks)
}
