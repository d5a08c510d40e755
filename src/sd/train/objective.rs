//! The training objective of one batch as train_dreambooth.py / textual_inversion.py compute
//! it: noise the latents, run the UNet, compare its prediction with epsilon or v in float32,
//! split instance / prior halves and optionally weight by min-SNR.
use super::TrainError;
use super::batch::StepBatch;
use super::loss::{self, PredictionType};
use crate::sd::autocast::{self, Autocast};
use crate::sd::schedulers::{DdpmScheduler, SchedulerConfig};
use crate::sd::unet::{AddedConditions, UNet2DConditionModel};
use tch::{Kind, Tensor};

/// How the per-sample squared errors become the loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossSpec {
    /// Prior preservation: the batch is [instance..., class...] and the loss is
    /// `instance + weight * prior`.
    pub prior_loss_weight: Option<f64>,
    /// Min-SNR-gamma weighting of the instance half.
    pub snr_gamma: Option<f64>,
}

/// `prediction_type` of the scheduler config: epsilon (default) or v_prediction.
pub fn prediction_type(config: &SchedulerConfig) -> Result<PredictionType, TrainError> {
    match config.prediction_type.as_deref().unwrap_or("epsilon") {
        "epsilon" => Ok(PredictionType::Epsilon),
        "v_prediction" => Ok(PredictionType::VPrediction),
        other => Err(TrainError::Model(format!(
            "{}: prediction_type '{other}' cannot be trained here; supported: epsilon, v_prediction",
            config.source
        ))),
    }
}

/// The modules a diffusion loss runs through.
pub struct DiffusionModel<'a> {
    pub unet: &'a UNet2DConditionModel,
    /// The dtype of the UNet's weights (inputs are cast to it).
    pub unet_kind: Kind,
    /// Autocast for the UNet's forward when it is trained under mixed precision.
    pub autocast: Option<Autocast>,
    pub scheduler: &'a DdpmScheduler,
    pub prediction: PredictionType,
}

/// The training loss of one batch (train_dreambooth.py / textual_inversion.py): add noise,
/// predict, compare with epsilon or v in float32, split instance / prior halves, optional
/// min-SNR weighting of the instance half.
/// `conditioning` is the UNet's `encoder_hidden_states` and, for SDXL, its added conditions.
pub fn diffusion_loss(
    model: &DiffusionModel,
    batch: &StepBatch,
    (encoder_hidden_states, added): (&Tensor, Option<&AddedConditions>),
    spec: &LossSpec,
) -> Result<Tensor, TrainError> {
    let (noisy, timesteps) = noisy_latents(model, batch)?;
    let kind = model.unet_kind;
    let pred = autocast::maybe(model.autocast, || {
        model.unet.forward_added(
            &noisy.to_kind(kind),
            &timesteps,
            &encoder_hidden_states.to_kind(kind),
            added,
        )
    })
    .map_err(TrainError::Model)?;
    loss_from_prediction(model, batch, &pred, &timesteps).and_then(|parts| parts.combine(spec))
}

/// The noisy latents the UNet sees and the timesteps, on the latents' device.
pub fn noisy_latents(
    model: &DiffusionModel,
    batch: &StepBatch,
) -> Result<(Tensor, Tensor), TrainError> {
    let device = batch.latents.device();
    let timesteps = batch.timesteps.to_device(device);
    let noisy = model
        .scheduler
        .add_noise(&batch.latents, &batch.noise, &timesteps)
        .map_err(TrainError::model)?;
    Ok((noisy, timesteps))
}

/// A prediction and what it is compared with (before the loss spec applies).
pub struct PredictionParts<'a> {
    model: &'a DiffusionModel<'a>,
    pred: Tensor,
    target: Tensor,
    timesteps: Tensor,
}

/// Pairs the UNet's prediction (any kind) with its target, both float32.
pub fn loss_from_prediction<'a>(
    model: &'a DiffusionModel<'a>,
    batch: &StepBatch,
    pred: &Tensor,
    timesteps: &Tensor,
) -> Result<PredictionParts<'a>, TrainError> {
    let target = match model.prediction {
        PredictionType::Epsilon => batch.noise.shallow_clone(),
        PredictionType::VPrediction => model
            .scheduler
            .get_velocity(&batch.latents, &batch.noise, timesteps)
            .map_err(TrainError::model)?,
    }
    .to_kind(Kind::Float);
    Ok(PredictionParts {
        model,
        pred: pred.to_kind(Kind::Float),
        target,
        timesteps: timesteps.shallow_clone(),
    })
}

impl PredictionParts<'_> {
    /// The loss: MSE (or min-SNR weighted) of the instance half plus the weighted prior half.
    pub fn combine(self, spec: &LossSpec) -> Result<Tensor, TrainError> {
        let model = self.model;
        let (pred, target, timesteps) = (self.pred, self.target, self.timesteps);
        let (pred, target, timesteps, prior) = match spec.prior_loss_weight {
            Some(weight) => {
                let (pred, pred_prior) = loss::split_instance_prior(&pred)?;
                let (target, target_prior) = loss::split_instance_prior(&target)?;
                let (t, _) = loss::split_instance_prior(&timesteps)?;
                let prior = loss::mse(&pred_prior, &target_prior)? * weight;
                (pred, target, t, Some(prior))
            }
            None => (pred, target, timesteps, None),
        };
        let instance = match spec.snr_gamma {
            None => loss::mse(&pred, &target)?,
            Some(gamma) => min_snr_instance_loss(model, &pred, &target, &timesteps, gamma)?,
        };
        Ok(match prior {
            Some(prior) => instance + prior,
            None => instance,
        })
    }
}

/// train_dreambooth.py's min-SNR weighting: `min(snr, gamma) / snr`, plus 1 for v-prediction
/// ("floored to an SNR weight of one"), times the per-sample MSE, averaged over the batch.
fn min_snr_instance_loss(
    model: &DiffusionModel,
    pred: &Tensor,
    target: &Tensor,
    timesteps: &Tensor,
    gamma: f64,
) -> Result<Tensor, TrainError> {
    let acp = model.scheduler.alphas_cumprod();
    let base = loss::min_snr_weights(acp, timesteps, gamma, PredictionType::Epsilon)?;
    let weights = match model.prediction {
        PredictionType::Epsilon => base,
        PredictionType::VPrediction => base + 1.0,
    };
    let squared = (pred - target).square();
    let dims: Vec<i64> = (1..squared.dim() as i64).collect();
    let per_sample = squared.mean_dim(dims.as_slice(), false, Kind::Float);
    Ok((per_sample * weights.to_device(pred.device())).mean(Kind::Float))
}
