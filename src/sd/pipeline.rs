//! txt2img as diffusers' `StableDiffusionPipeline.__call__` computes it: prompt encoding with
//! classifier-free guidance, seeded initial latents, the scheduler loop, VAE decode.
//! On CPU the latents and image equal diffusers' for the same weights, prompt, seed and scheduler.
use crate::sd::clip::ClipTextModel;
use crate::sd::folder::ModelFolder;
use crate::sd::schedulers::{self, SchedulerConfig, SchedulerKind};
use crate::sd::tokenizer::ClipTokenizer;
use crate::sd::unet::UNet2DConditionModel;
use crate::sd::vae::AutoencoderKL;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor, nn::VarStore};

/// diffusers StableDiffusionPipeline defaults.
pub const DEFAULT_STEPS: usize = 50;
pub const DEFAULT_GUIDANCE: f64 = 7.5;
/// diffusers' fallback latent size when the UNet config has no `sample_size`.
const DEFAULT_SAMPLE_SIZE: i64 = 128;

/// A loaded Stable Diffusion model: every component of a diffusers folder.
pub struct StableDiffusion {
    pub dir: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    pub device: Device,
    pub kind: Kind,
    /// The variable stores own the weights; the modules hold views into them.
    pub stores: Vec<VarStore>,
}

/// One txt2img request (diffusers' pipeline arguments).
#[derive(Debug, Clone)]
pub struct Txt2Img {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    /// None: the model's own scheduler (`_class_name` of scheduler_config.json).
    pub scheduler: Option<SchedulerKind>,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub batch: i64,
}

/// What a txt2img run produced.
pub struct Txt2ImgOutput {
    /// Final latents before `/ scaling_factor`, [batch, 4, h/f, w/f].
    pub latents: Tensor,
    /// Decoded images in [-1, 1], [batch, 3, h, w].
    pub images: Tensor,
    pub width: i64,
    pub height: i64,
    pub scheduler: SchedulerKind,
}

/// Why sampling could not run.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{0}")]
    Model(String),
    #[error("--{field} {value}: must be a positive multiple of {multiple} for this model (VAE factor {vae_factor} × UNet downsampling {unet_factor})")]
    BadSize { field: &'static str, value: i64, multiple: i64, vae_factor: i64, unet_factor: i64 },
    #[error("--batch {0}: must be at least 1")]
    BadBatch(i64),
    #[error("--steps {0}: must be at least 1")]
    BadSteps(usize),
}

fn model_error(error: impl std::fmt::Display) -> PipelineError {
    PipelineError::Model(error.to_string())
}

impl StableDiffusion {
    /// Loads every component of a diffusers folder in `kind` on `device`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self, PipelineError> {
        let folder = ModelFolder::open(dir).map_err(model_error)?;
        let variant = preferred_variant(&folder, kind);
        let tokenizer = ClipTokenizer::from_dir(&folder.tokenizer_dir()).map_err(model_error)?;
        let (te_store, text_encoder) =
            ClipTextModel::load(&folder.text_encoder_dir(), device, kind, variant).map_err(model_error)?;
        let (unet_store, unet) =
            UNet2DConditionModel::load(&folder.unet_dir(), device, kind, variant).map_err(model_error)?;
        let (vae_store, vae) =
            AutoencoderKL::load(&folder.vae_dir(), device, vae_kind(kind, device), variant).map_err(model_error)?;
        let scheduler_config =
            SchedulerConfig::from_file(&folder.scheduler_dir().join("scheduler_config.json")).map_err(model_error)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            device,
            kind,
            stores: vec![te_store, unet_store, vae_store],
        })
    }

    /// The image size diffusers uses when none is given: unet.sample_size × VAE factor.
    pub fn default_size(&self) -> i64 {
        self.unet.config().sample_size.unwrap_or(DEFAULT_SAMPLE_SIZE) * self.vae_scale_factor()
    }

    /// 2^(number of VAE blocks − 1), as diffusers computes `vae_scale_factor`.
    pub fn vae_scale_factor(&self) -> i64 {
        1 << (self.vae.config().block_out_channels.len() as i64 - 1)
    }

    /// The latent size must survive the UNet's downsamplers and come back the same.
    fn unet_downsampling(&self) -> i64 {
        1 << (self.unet.config().block_out_channels.len() as i64 - 1)
    }

    /// Encodes prompts to `last_hidden_state` as diffusers' `encode_prompt` does (padded to
    /// max length, no attention mask), repeated for the batch.
    pub fn encode_prompt(&self, text: &str, batch: i64) -> Result<Tensor, PipelineError> {
        let encoding = self.tokenizer.encode(text);
        let ids = Tensor::from_slice(&encoding.ids).unsqueeze(0).to_device(self.device);
        let hidden = self.text_encoder.forward(&ids).map_err(model_error)?.last_hidden_state; // [1, 77, dim]
        Ok(hidden.to_kind(self.kind).repeat([batch, 1, 1]))
    }

    /// Runs txt2img; `on_step(done, total, latents)` is called after each scheduler step.
    pub fn txt2img(&self, request: &Txt2Img, on_step: &mut dyn FnMut(usize, usize, &Tensor)) -> Result<Txt2ImgOutput, PipelineError> {
        let _no_grad = tch::no_grad_guard();
        let (width, height) = self.checked_size(request)?;
        if request.batch < 1 {
            return Err(PipelineError::BadBatch(request.batch));
        }
        if request.steps < 1 {
            return Err(PipelineError::BadSteps(request.steps));
        }
        let kind = match request.scheduler {
            Some(kind) => kind,
            None => SchedulerKind::of_config(&self.scheduler_config).map_err(model_error)?,
        };
        let mut scheduler = schedulers::build(kind, &self.scheduler_config).map_err(model_error)?;
        let guided = request.guidance > 1.0;
        let cond = self.encode_prompt(&request.prompt, request.batch)?;
        let context = if guided {
            Tensor::cat(&[self.encode_prompt(&request.negative_prompt, request.batch)?, cond], 0)
        } else {
            cond
        };
        scheduler.set_timesteps(request.steps).map_err(model_error)?;
        let factor = self.vae_scale_factor();
        let latent_shape = [request.batch, self.unet.config().in_channels, height / factor, width / factor];
        tch::manual_seed(request.seed as i64);
        // diffusers draws the initial noise on the CPU generator, then moves it.
        let noise = Tensor::randn(latent_shape, (Kind::Float, Device::Cpu));
        let mut latents = (noise * scheduler.init_noise_sigma()).to_device(self.device).to_kind(self.kind);
        let timesteps = scheduler.timesteps().shallow_clone();
        let total = timesteps.size()[0] as usize;
        for index in 0..total {
            let t = timesteps.get(index as i64);
            let model_input = if guided { Tensor::cat(&[&latents, &latents], 0) } else { latents.shallow_clone() };
            let model_input = scheduler.scale_model_input(&model_input, index).map_err(model_error)?;
            let prediction = self.unet.forward(&model_input, &t.to_device(self.device), &context);
            let prediction = if guided {
                let halves = prediction.chunk(2, 0);
                &halves[0] + (&halves[1] - &halves[0]) * request.guidance
            } else {
                prediction
            };
            latents = scheduler.step(&prediction, index, &latents).map_err(model_error)?.prev_sample;
            on_step(index + 1, total, &latents);
        }
        let images = self.decode(&latents);
        Ok(Txt2ImgOutput { latents, images, width, height, scheduler: kind })
    }

    /// VAE decode of `latents / scaling_factor` (float32 where diffusers upcasts the VAE).
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        let scaled = latents / self.vae.scaling_factor();
        let vae_kind = self.vae_dtype();
        self.vae.decode(&scaled.to_kind(vae_kind)).to_kind(Kind::Float)
    }

    fn vae_dtype(&self) -> Kind {
        vae_kind(self.kind, self.device)
    }

    fn checked_size(&self, request: &Txt2Img) -> Result<(i64, i64), PipelineError> {
        let default = self.default_size();
        let width = request.width.unwrap_or(default);
        let height = request.height.unwrap_or(default);
        let vae_factor = self.vae_scale_factor();
        let unet_factor = self.unet_downsampling();
        let multiple = vae_factor * unet_factor;
        for (field, value) in [("width", width), ("height", height)] {
            if value <= 0 || value % multiple != 0 {
                return Err(PipelineError::BadSize { field, value, multiple, vae_factor, unet_factor });
            }
        }
        Ok((width, height))
    }
}

/// diffusers runs an fp16 VAE in float32 when `force_upcast` is set (SD 1.x/2.x VAEs overflow in
/// fp16); bf16 has the range, so only fp16 is upcast.
fn vae_kind(kind: Kind, _device: Device) -> Kind {
    if kind == Kind::Half { Kind::Float } else { kind }
}

/// Loads the `fp16` weight variant when running in half precision and the folder has one.
fn preferred_variant(folder: &ModelFolder, kind: Kind) -> Option<&'static str> {
    (kind == Kind::Half && folder.has_variant("fp16")).then_some("fp16")
}
