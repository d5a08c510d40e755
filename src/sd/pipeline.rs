//! txt2img as diffusers' `StableDiffusionPipeline.__call__` computes it: prompt encoding with
//! classifier-free guidance, seeded initial latents, the scheduler loop, VAE decode. SDXL
//! folders run as `StableDiffusionXLPipeline` (two text encoders, pooled embeddings and
//! micro-conditioning time ids; see [`XlOptions`]).
//! On CPU in float32 the latents and image equal diffusers' (within the fixture tolerances) for
//! the same weights, prompt, seed and scheduler; `tests/goldens/sd_pipeline.rs` checks every
//! scheduler.
use crate::sd::clip::{ClipError, ClipTextModel};
use crate::sd::folder::{FolderError, ModelFolder};
use crate::sd::lora::{self, LoraError, LoraTargets, ScaledLora};
use crate::sd::model_config::ModelError;
use crate::sd::rng;
use crate::sd::schedulers::{self, Scheduler, SchedulerConfig, SchedulerError, SchedulerKind};
use crate::sd::tokenizer::{ClipTokenizer, TokenizerError};
use crate::sd::unet::{AddedConditions, UNet2DConditionModel};
use crate::sd::vae::AutoencoderKL;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor, nn::VarStore};

/// diffusers StableDiffusionPipeline defaults (`num_inference_steps`, `guidance_scale`).
pub const DEFAULT_STEPS: usize = 50;
pub const DEFAULT_GUIDANCE: f64 = 7.5;
/// diffusers' fallback latent size when the UNet config has no `sample_size`.
const DEFAULT_SAMPLE_SIZE: i64 = 128;
/// diffusers applies classifier-free guidance only when `guidance_scale > 1`.
const GUIDANCE_THRESHOLD: f64 = 1.0;

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
    /// SDXL's second tokenizer and text encoder.
    pub xl: Option<XlText>,
}

/// SDXL's second text encoder (`CLIPTextModelWithProjection`) and its tokenizer.
pub struct XlText {
    pub tokenizer_2: ClipTokenizer,
    pub text_encoder_2: ClipTextModel,
    /// An empty negative prompt is zero embeddings (model_index.json's
    /// `force_zeros_for_empty_prompt`).
    pub force_zeros_for_empty_prompt: bool,
}

/// `StableDiffusionXLPipeline`'s arguments beyond SD's: the second prompts (unset: the first
/// ones) and the micro-conditioning sizes `(height, width)` / crop `(top, left)` (unset: the
/// image size and (0, 0)); the negative conditioning uses the same sizes.
#[derive(Debug, Clone, Default)]
pub struct XlOptions {
    pub prompt_2: Option<String>,
    pub negative_prompt_2: Option<String>,
    pub original_size: Option<(i64, i64)>,
    pub crops_coords_top_left: (i64, i64),
    pub target_size: Option<(i64, i64)>,
    /// diffusers' `guidance_rescale` (0: off; both pipelines have it): the guided prediction's
    /// spread rescaled toward the conditional one's (Lin et al. 2023, section 3.4).
    pub guidance_rescale: f64,
}

/// What the UNet is conditioned on: `encoder_hidden_states`, and SDXL's added conditions.
struct Conditioning {
    context: Tensor,
    added: Option<AddedConditions>,
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
    /// Images per prompt; their initial noise is ONE draw of shape [batch, ...], as diffusers'.
    pub batch: i64,
}

/// What a txt2img run produced.
pub struct Txt2ImgOutput {
    /// Final latents before `/ scaling_factor`, [batch, 4, h/f, w/f].
    pub latents: Tensor,
    /// Decoded images in [-1, 1], float32, [batch, 3, h, w].
    pub images: Tensor,
    pub width: i64,
    pub height: i64,
    pub scheduler: SchedulerKind,
}

/// What txt2img reports while it runs. The CLI counts steps; tests and debugging read tensors.
pub enum Event<'a> {
    /// The seeded standard-normal draw (float32, CPU) and the initial latents made from it
    /// (`noise * init_noise_sigma`, in the model's kind and device).
    Start {
        noise: &'a Tensor,
        latents: &'a Tensor,
    },
    /// UNet evaluation `call` at `timestep`: its input after `scale_model_input` (with guidance
    /// the batch is [uncond..., cond...]) and its raw output, before guidance.
    UNet {
        call: usize,
        timestep: &'a Tensor,
        input: &'a Tensor,
        output: &'a Tensor,
    },
    /// Scheduler step `done` of `total` finished; `latents` is its result.
    Step {
        done: usize,
        total: usize,
        latents: &'a Tensor,
    },
}

/// Why a model could not be loaded or sampling could not run.
#[derive(Debug, thiserror::Error)]
pub enum Txt2ImgError {
    #[error("{dir}: model folder not found (pass a diffusers folder with model_index.json)")]
    MissingModel { dir: PathBuf },
    #[error(transparent)]
    Folder(#[from] FolderError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    TextEncoder(#[from] ClipError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(
        "{field} {value}: must be a positive multiple of {multiple} (the VAE scale factor of this model)"
    )]
    BadSize {
        field: &'static str,
        value: i64,
        multiple: i64,
    },
    #[error("batch {0}: must be at least 1")]
    BadBatch(i64),
    #[error(transparent)]
    Lora(#[from] LoraError),
    #[error("steps {0}: must be at least 1")]
    BadSteps(usize),
}

impl StableDiffusion {
    /// Runs `work` with `loras` attached to the UNet and text encoder (none: the model as it
    /// is), then removes them again, also when `work` fails: a pooled model never keeps a
    /// stage's adapters.
    pub fn with_loras<T, E: From<LoraError>>(
        &mut self,
        loras: &[ScaledLora<'_>],
        work: impl FnOnce(&Self) -> Result<T, E>,
    ) -> Result<T, E> {
        if loras.is_empty() {
            return work(self);
        }
        let kind = self.kind;
        lora::attach(&mut self.lora_targets(), loras, kind)?;
        let result = work(self);
        lora::detach(&mut self.lora_targets());
        result
    }

    /// The models LoRA adapters attach to: UNet, text encoder(s).
    pub fn lora_targets(&mut self) -> LoraTargets<'_> {
        LoraTargets {
            unet: &mut self.unet,
            text_encoder: &mut self.text_encoder,
            text_encoder_2: self.xl.as_mut().map(|xl| &mut xl.text_encoder_2),
        }
    }

    /// Loads every component of a diffusers folder in `kind` on `device`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self, Txt2ImgError> {
        if !dir.is_dir() {
            return Err(Txt2ImgError::MissingModel {
                dir: dir.to_path_buf(),
            });
        }
        let folder = ModelFolder::open(dir)?;
        let variant = preferred_variant(&folder, kind);
        let tokenizer = ClipTokenizer::from_dir(&folder.tokenizer_dir())?;
        let (te_store, text_encoder) =
            ClipTextModel::load(&folder.text_encoder_dir(), device, kind, variant)?;
        let (unet_store, unet) =
            UNet2DConditionModel::load(&folder.unet_dir(), device, kind, variant)?;
        let (vae_store, vae) =
            AutoencoderKL::load(&folder.vae_dir(), device, vae_kind(kind), variant)?;
        let scheduler_config =
            SchedulerConfig::from_file(&folder.scheduler_dir().join("scheduler_config.json"))?;
        let mut stores = vec![te_store, unet_store, vae_store];
        let xl = match folder.is_xl() {
            true => {
                let (store, text_encoder_2) =
                    ClipTextModel::load(&folder.text_encoder_2_dir(), device, kind, variant)?;
                stores.push(store);
                Some(XlText {
                    tokenizer_2: ClipTokenizer::from_dir(&folder.tokenizer_2_dir())?,
                    text_encoder_2,
                    force_zeros_for_empty_prompt: folder.force_zeros_for_empty_prompt(),
                })
            }
            false => None,
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            device,
            kind,
            stores,
            xl,
        })
    }

    /// The image size diffusers uses when none is given: unet.sample_size × VAE factor.
    pub fn default_size(&self) -> i64 {
        self.unet
            .config()
            .sample_size
            .unwrap_or(DEFAULT_SAMPLE_SIZE)
            * self.vae_scale_factor()
    }

    /// 2^(number of VAE blocks − 1), as diffusers computes `vae_scale_factor`.
    pub fn vae_scale_factor(&self) -> i64 {
        1 << (self.vae.config().block_out_channels.len() as i64 - 1)
    }

    /// Encodes a prompt to `last_hidden_state` as diffusers' `encode_prompt` does (padded to
    /// max length, no attention mask), in the model's kind, repeated `batch` times.
    pub fn encode_prompt(&self, text: &str, batch: i64) -> Result<Tensor, Txt2ImgError> {
        let encoding = self.tokenizer.encode(text);
        let ids = Tensor::from_slice(&encoding.ids)
            .unsqueeze(0)
            .to_device(self.device);
        let hidden = self.text_encoder.forward(&ids)?.last_hidden_state; // [1, 77, dim]
        Ok(hidden.to_kind(self.kind).repeat([batch, 1, 1]))
    }

    /// Runs txt2img. `on_event` sees the initial noise, every UNet call and every finished step.
    /// Draws from a generator of its own seeded with `request.seed` (see [`rng`]): the initial
    /// noise, and the step noise to the last step when the scheduler draws some.
    pub fn txt2img(
        &self,
        request: &Txt2Img,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Txt2ImgOutput, Txt2ImgError> {
        self.txt2img_xl(request, &XlOptions::default(), on_event)
    }

    /// [`txt2img`](Self::txt2img) with SDXL's extra arguments (ignored by SD 1.x/2.x models).
    pub fn txt2img_xl(
        &self,
        request: &Txt2Img,
        xl: &XlOptions,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Txt2ImgOutput, Txt2ImgError> {
        let _no_grad = tch::no_grad_guard();
        let (width, height) = self.checked_request(request)?;
        let mut scheduler = self.scheduler_for(request)?;
        let guidance = (request.guidance > GUIDANCE_THRESHOLD).then_some(request.guidance);
        let context = self.conditioning(request, xl, (width, height), guidance.is_some())?;
        let shape = self.latent_shape(request.batch, width, height);
        let rng_guard = rng::seeded(request.seed);
        let noise = rng::randn(&shape, Kind::Float, Device::Cpu);
        let latents = self.initial_latents(noise, scheduler.as_ref(), on_event);
        let step_noise_guard = scheduler.kind().draws_step_noise().then_some(rng_guard);
        let guided = guidance.map(|scale| (scale, xl.guidance_rescale));
        let latents = self.denoise(scheduler.as_mut(), latents, &context, guided, on_event)?;
        drop(step_noise_guard);
        Ok(self.output(latents, (width, height), scheduler.kind()))
    }

    /// txt2img for a batch whose sample `i` draws its initial noise from its own generator seeded
    /// with `seeds[i]` (`request.seed` and `request.batch` are ignored): sample `i` equals
    /// `txt2img` with `seed: seeds[i], batch: 1` whenever the scheduler draws no step noise.
    /// With DDPM / Euler ancestral the step noise continues the generator of the last seed, so
    /// only a batch of one matches; callers that need equality pass one seed at a time.
    pub fn txt2img_per_sample_seeds(
        &self,
        request: &Txt2Img,
        seeds: &[u64],
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Txt2ImgOutput, Txt2ImgError> {
        let _no_grad = tch::no_grad_guard();
        let request = Txt2Img {
            batch: seeds.len() as i64,
            ..request.clone()
        };
        let (width, height) = self.checked_request(&request)?;
        let mut scheduler = self.scheduler_for(&request)?;
        let guidance = (request.guidance > GUIDANCE_THRESHOLD).then_some(request.guidance);
        let xl = XlOptions::default();
        let context = self.conditioning(&request, &xl, (width, height), guidance.is_some())?;
        let [_, channels, rows, columns] = self.latent_shape(1, width, height);
        let mut draws = Vec::with_capacity(seeds.len());
        let mut last_guard = None;
        for &seed in seeds {
            drop(last_guard.take());
            let guard = rng::seeded(seed);
            draws.push(rng::randn(
                &[1, channels, rows, columns],
                Kind::Float,
                Device::Cpu,
            ));
            last_guard = Some(guard);
        }
        let latents = self.initial_latents(Tensor::cat(&draws, 0), scheduler.as_ref(), on_event);
        if !scheduler.kind().draws_step_noise() {
            drop(last_guard.take());
        }
        let guided = guidance.map(|scale| (scale, 0.0));
        let latents = self.denoise(scheduler.as_mut(), latents, &context, guided, on_event)?;
        drop(last_guard);
        Ok(self.output(latents, (width, height), scheduler.kind()))
    }

    /// The request's scheduler (default: the model's own), ready for `request.steps` steps.
    fn scheduler_for(&self, request: &Txt2Img) -> Result<Box<dyn Scheduler>, Txt2ImgError> {
        let kind = match request.scheduler {
            Some(kind) => kind,
            None => SchedulerKind::of_config(&self.scheduler_config)?,
        };
        let mut scheduler = schedulers::build(kind, &self.scheduler_config)?;
        scheduler.set_timesteps(request.steps)?;
        Ok(scheduler)
    }

    /// `noise * init_noise_sigma`, the noise drawn (like diffusers) from the seeded CPU generator
    /// in float32 and then moved to the model's device and kind.
    fn initial_latents(
        &self,
        noise: Tensor,
        scheduler: &dyn Scheduler,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Tensor {
        let latents = (&noise * scheduler.init_noise_sigma())
            .to_device(self.device)
            .to_kind(self.kind);
        on_event(Event::Start {
            noise: &noise,
            latents: &latents,
        });
        latents
    }

    /// The UNet's conditioning: [negative..., prompt...] with guidance, else the prompt.
    fn conditioning(
        &self,
        request: &Txt2Img,
        xl: &XlOptions,
        size: (i64, i64),
        guided: bool,
    ) -> Result<Conditioning, Txt2ImgError> {
        if let Some(parts) = &self.xl {
            return self.xl_conditioning(parts, request, xl, size, guided);
        }
        let cond = self.encode_prompt(&request.prompt, request.batch)?;
        if !guided {
            return Ok(Conditioning {
                context: cond,
                added: None,
            });
        }
        let uncond = self.encode_prompt(&request.negative_prompt, request.batch)?;
        Ok(Conditioning {
            context: Tensor::cat(&[uncond, cond], 0),
            added: None,
        })
    }

    /// SDXL's conditioning as `StableDiffusionXLPipeline` builds it: both encoders' penultimate
    /// hidden states side by side, the second encoder's projected pooled output, and the time
    /// ids `original_size + crops_coords_top_left + target_size`.
    fn xl_conditioning(
        &self,
        parts: &XlText,
        request: &Txt2Img,
        xl: &XlOptions,
        (width, height): (i64, i64),
        guided: bool,
    ) -> Result<Conditioning, Txt2ImgError> {
        let prompt_2 = xl.prompt_2.as_deref().unwrap_or(&request.prompt);
        let (mut context, mut pooled) = self.encode_prompt_xl(parts, &request.prompt, prompt_2)?;
        let original = xl.original_size.unwrap_or((height, width));
        let target = xl.target_size.unwrap_or((height, width));
        let (top, left) = xl.crops_coords_top_left;
        let ids = [original.0, original.1, top, left, target.0, target.1];
        let one = Tensor::from_slice(&ids.map(|v| v as f64)).unsqueeze(0);
        let mut time_ids = one.shallow_clone();
        if guided {
            let (negative, negative_pooled) = self.negative_xl(parts, request, xl)?;
            context = Tensor::cat(&[negative, context], 0);
            pooled = Tensor::cat(&[negative_pooled, pooled], 0);
            time_ids = Tensor::cat(&[&one, &one], 0);
        }
        let repeat = |t: &Tensor| t.repeat_interleave_self_int(request.batch, 0, None);
        let device_kind = (self.kind, self.device);
        Ok(Conditioning {
            context: repeat(&context),
            added: Some(AddedConditions {
                text_embeds: repeat(&pooled),
                time_ids: repeat(&time_ids)
                    .to_kind(device_kind.0)
                    .to_device(device_kind.1),
            }),
        })
    }

    /// The negative embeddings: zeros for an empty negative prompt when the model says so,
    /// else the negative prompts encoded like the prompts.
    fn negative_xl(
        &self,
        parts: &XlText,
        request: &Txt2Img,
        xl: &XlOptions,
    ) -> Result<(Tensor, Tensor), Txt2ImgError> {
        let negative_2 = xl.negative_prompt_2.as_deref();
        let empty = request.negative_prompt.is_empty() && negative_2.is_none_or(str::is_empty);
        let (context, pooled) = self.encode_prompt_xl(
            parts,
            &request.negative_prompt,
            negative_2.unwrap_or(&request.negative_prompt),
        )?;
        if empty && parts.force_zeros_for_empty_prompt {
            return Ok((context.zeros_like(), pooled.zeros_like()));
        }
        Ok((context, pooled))
    }

    /// One prompt pair through both text encoders: `[1, 77, width_1 + width_2]` (penultimate
    /// hidden states) and the pooled `[1, projection_dim]`, in the model's kind.
    pub fn encode_prompt_xl(
        &self,
        parts: &XlText,
        prompt: &str,
        prompt_2: &str,
    ) -> Result<(Tensor, Tensor), Txt2ImgError> {
        let ids = |tokenizer: &ClipTokenizer, text: &str| {
            Tensor::from_slice(&tokenizer.encode(text).ids)
                .unsqueeze(0)
                .to_device(self.device)
        };
        let (first, _) =
            (self.text_encoder.forward(&ids(&self.tokenizer, prompt))?).into_sdxl_parts();
        let (second, pooled) = (parts.text_encoder_2)
            .forward(&ids(&parts.tokenizer_2, prompt_2))?
            .into_sdxl_parts();
        let context = Tensor::cat(&[first, second], -1);
        Ok((context.to_kind(self.kind), pooled.to_kind(self.kind)))
    }

    fn latent_shape(&self, batch: i64, width: i64, height: i64) -> [i64; 4] {
        let factor = self.vae_scale_factor();
        let channels = self.unet.config().in_channels;
        [batch, channels, height / factor, width / factor]
    }

    /// The scheduler loop: one UNet call per timestep (a doubled batch with guidance, combined
    /// as `uncond + g * (cond - uncond)`), then one scheduler step.
    fn denoise(
        &self,
        scheduler: &mut dyn Scheduler,
        mut latents: Tensor,
        conditioning: &Conditioning,
        guidance: Option<(f64, f64)>,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Tensor, Txt2ImgError> {
        let timesteps = scheduler.timesteps().shallow_clone();
        let total = timesteps.size()[0] as usize;
        for index in 0..total {
            let timestep = timesteps.get(index as i64);
            let batch_input = match guidance {
                Some(_) => Tensor::cat(&[&latents, &latents], 0),
                None => latents.shallow_clone(),
            };
            let input = scheduler.scale_model_input(&batch_input, index)?;
            let output = self.unet.forward_added(
                &input,
                &timestep,
                &conditioning.context,
                conditioning.added.as_ref(),
            );
            on_event(Event::UNet {
                call: index,
                timestep: &timestep,
                input: &input,
                output: &output,
            });
            let prediction = match guidance {
                Some((scale, rescale)) => {
                    let halves = output.chunk(2, 0);
                    let guided = &halves[0] + (&halves[1] - &halves[0]) * scale;
                    rescale_noise_cfg(guided, &halves[1], rescale)
                }
                None => output,
            };
            latents = scheduler.step(&prediction, index, &latents)?.prev_sample;
            on_event(Event::Step {
                done: index + 1,
                total,
                latents: &latents,
            });
        }
        Ok(latents)
    }

    /// The result of a run that ended with `latents` (decoded here).
    fn output(
        &self,
        latents: Tensor,
        (width, height): (i64, i64),
        scheduler: SchedulerKind,
    ) -> Txt2ImgOutput {
        Txt2ImgOutput {
            images: self.decode(&latents),
            latents,
            width,
            height,
            scheduler,
        }
    }

    /// VAE decode of `latents / scaling_factor`, returned as float32.
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        let _no_grad = tch::no_grad_guard();
        let scaled = latents / self.vae.scaling_factor();
        self.vae
            .decode(&scaled.to_kind(vae_kind(self.kind)))
            .to_kind(Kind::Float)
    }

    /// Checks batch and steps, and returns width and height (defaults filled in), each a
    /// positive multiple of the VAE factor (the UNet takes any latent size: its upsamplers follow
    /// the skip connections' sizes).
    fn checked_request(&self, request: &Txt2Img) -> Result<(i64, i64), Txt2ImgError> {
        if request.batch < 1 {
            return Err(Txt2ImgError::BadBatch(request.batch));
        }
        if request.steps < 1 {
            return Err(Txt2ImgError::BadSteps(request.steps));
        }
        let default = self.default_size();
        let width = request.width.unwrap_or(default);
        let height = request.height.unwrap_or(default);
        let multiple = self.vae_scale_factor();
        for (field, value) in [("width", width), ("height", height)] {
            if value <= 0 || value % multiple != 0 {
                return Err(Txt2ImgError::BadSize {
                    field,
                    value,
                    multiple,
                });
            }
        }
        Ok((width, height))
    }
}

/// diffusers' `rescale_noise_cfg`: the guided prediction scaled to the conditional prediction's
/// standard deviation (per sample, over all other dims, unbiased), mixed in with weight
/// `rescale`; `rescale` 0 returns `guided` unchanged.
fn rescale_noise_cfg(guided: Tensor, conditional: &Tensor, rescale: f64) -> Tensor {
    if rescale == 0.0 {
        return guided;
    }
    let dims: Vec<i64> = (1..guided.dim() as i64).collect();
    let std = |t: &Tensor| t.std_dim(dims.as_slice(), true, true);
    let rescaled = &guided * (std(conditional) / std(&guided));
    rescaled * rescale + guided * (1.0 - rescale)
}

/// The VAE's kind: float16 is decoded in float32 (the SD VAEs can overflow in fp16, which is
/// why diffusers' `force_upcast` exists); bfloat16 has float32's range and is kept.
fn vae_kind(kind: Kind) -> Kind {
    if kind == Kind::Half {
        Kind::Float
    } else {
        kind
    }
}

/// Loads the `fp16` weight variant when running in half precision and the folder has one.
fn preferred_variant(folder: &ModelFolder, kind: Kind) -> Option<&'static str> {
    (kind == Kind::Half && folder.has_variant("fp16")).then_some("fp16")
}
