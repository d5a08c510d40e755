//! The base model both methods train on: a diffusers folder's tokenizer, text encoder, UNet, VAE
//! (frozen) and DDPM noise scheduler, each loaded in the dtype its method asks for, plus what
//! both do with it outside the step: VAE posterior moments of pixel batches and the drawing of
//! a micro-batch from them.
use super::TrainError;
use super::batch::{self, LatentDraw, StepBatch};
use super::loss::PredictionType;
use super::objective;
use crate::sd::clip::ClipTextModel;
use crate::sd::folder::ModelFolder;
use crate::sd::schedulers::{DdpmScheduler, SchedulerConfig};
use crate::sd::tokenizer::ClipTokenizer;
use crate::sd::unet::UNet2DConditionModel;
use crate::sd::vae::AutoencoderKL;
use std::path::Path;
use tch::{Device, Kind, Tensor, nn::VarStore};

/// The dtypes the modules are loaded in (the VAE always takes the weight dtype).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ModuleKinds {
    /// The frozen modules' dtype (`MixedPrecision::weight_kind`).
    pub weight: Kind,
    pub text_encoder: Kind,
    pub unet: Kind,
}

/// The loaded modules of a base model. Which parameters train is the method's business: every
/// store but the VAE's comes back trainable.
pub(crate) struct BaseModel {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub text_encoder_store: VarStore,
    pub unet: UNet2DConditionModel,
    pub unet_store: VarStore,
    pub vae: AutoencoderKL,
    _vae_store: VarStore,
    pub scheduler: DdpmScheduler,
    pub prediction: PredictionType,
    /// The frozen modules' dtype (the VAE's, the latents').
    pub weight_kind: Kind,
    /// SDXL's second tokenizer and text encoder (loaded in the text encoder's dtype).
    pub xl: Option<XlTextModules>,
}

/// SDXL's second text encoder (`CLIPTextModelWithProjection`), its store and tokenizer.
pub(crate) struct XlTextModules {
    pub tokenizer_2: ClipTokenizer,
    pub text_encoder_2: ClipTextModel,
    pub text_encoder_2_store: VarStore,
}

impl BaseModel {
    /// Loads the diffusers folder at `path` onto `device`; SDXL folders with their second text
    /// encoder.
    pub fn load(path: &Path, device: Device, kinds: ModuleKinds) -> Result<Self, TrainError> {
        Self::load_with(path, device, kinds, |_, _| Ok(())).map(|(model, ())| model)
    }

    /// [`load`](Self::load), with `prepare` run on the tokenizer (and SDXL's second one) before
    /// the large modules load (so what it rejects fails fast); returns what `prepare` returned
    /// too.
    pub fn load_with<R>(
        path: &Path,
        device: Device,
        kinds: ModuleKinds,
        prepare: impl FnOnce(&mut ClipTokenizer, Option<&mut ClipTokenizer>) -> Result<R, TrainError>,
    ) -> Result<(Self, R), TrainError> {
        let folder = ModelFolder::open(path).map_err(TrainError::model)?;
        let mut tokenizer =
            ClipTokenizer::from_dir(&folder.tokenizer_dir()).map_err(TrainError::model)?;
        let mut tokenizer_2 = match folder.is_xl() {
            true => Some(
                ClipTokenizer::from_dir(&folder.tokenizer_2_dir()).map_err(TrainError::model)?,
            ),
            false => None,
        };
        let prepared = prepare(&mut tokenizer, tokenizer_2.as_mut())?;
        let xl = match tokenizer_2 {
            Some(tokenizer_2) => Some(XlTextModules::load(
                &folder,
                tokenizer_2,
                device,
                kinds.text_encoder,
            )?),
            None => None,
        };
        let (text_encoder_store, text_encoder) =
            ClipTextModel::load(&folder.text_encoder_dir(), device, kinds.text_encoder, None)
                .map_err(TrainError::model)?;
        let (unet_store, unet) =
            UNet2DConditionModel::load(&folder.unet_dir(), device, kinds.unet, None)
                .map_err(TrainError::model)?;
        let (mut vae_store, vae) =
            AutoencoderKL::load(&folder.vae_dir(), device, kinds.weight, None)
                .map_err(TrainError::model)?;
        vae_store.freeze();
        let scheduler_config =
            SchedulerConfig::from_file(&folder.scheduler_dir().join("scheduler_config.json"))
                .map_err(TrainError::model)?;
        let prediction = objective::prediction_type(&scheduler_config)?;
        let scheduler = DdpmScheduler::new(&scheduler_config).map_err(TrainError::model)?;
        let model = Self {
            tokenizer,
            text_encoder,
            text_encoder_store,
            unet,
            unet_store,
            vae,
            _vae_store: vae_store,
            scheduler,
            prediction,
            weight_kind: kinds.weight,
            xl,
        };
        Ok((model, prepared))
    }

    /// The second tokenizer's ids `[1, 77]` of a prompt (SDXL), or None.
    pub fn tokenize_2(&self, prompt: &str) -> Option<Tensor> {
        let xl = self.xl.as_ref()?;
        Some(Tensor::from_slice(&xl.tokenizer_2.encode(prompt).ids).unsqueeze(0))
    }

    /// Token ids `[1, 77]` of a prompt (padded, truncated).
    pub fn tokenize(&self, prompt: &str) -> Tensor {
        Tensor::from_slice(&self.tokenizer.encode(prompt).ids).unsqueeze(0)
    }

    /// VAE posterior moments (mean, std) of pixel batches, in float32, without grad.
    pub fn encode_moments(&self, pixels: &Tensor) -> (Tensor, Tensor) {
        tch::no_grad(|| {
            let posterior = self.vae.encode(&pixels.to_kind(self.weight_kind));
            (
                posterior.mean.to_kind(Kind::Float),
                posterior.std.to_kind(Kind::Float),
            )
        })
    }

    /// Micro-batch `micro` of optimizer step `step` from its VAE moments and token ids (see
    /// [`batch::draw_batch`]).
    pub fn draw_batch(
        &self,
        moments: (Tensor, Tensor),
        input_ids: Tensor,
        (seed, step, micro): (u64, u64, u64),
        offset_noise: bool,
    ) -> Result<StepBatch, TrainError> {
        let draw = LatentDraw {
            seed,
            step,
            micro,
            scaling_factor: self.vae.scaling_factor(),
            weight_kind: self.weight_kind,
            offset_noise,
            num_train_timesteps: self.scheduler.num_train_timesteps(),
        };
        batch::draw_batch(moments, input_ids, &draw)
    }
}

/// The variables of `vs` that require grad, sorted by name (a stable optimizer order).
pub fn trainable_sorted(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

impl XlTextModules {
    fn load(
        folder: &ModelFolder,
        tokenizer_2: ClipTokenizer,
        device: Device,
        kind: Kind,
    ) -> Result<Self, TrainError> {
        let (text_encoder_2_store, text_encoder_2) =
            ClipTextModel::load(&folder.text_encoder_2_dir(), device, kind, None)
                .map_err(TrainError::model)?;
        Ok(Self {
            tokenizer_2,
            text_encoder_2,
            text_encoder_2_store,
        })
    }
}
