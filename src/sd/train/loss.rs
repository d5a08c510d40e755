//! The diffusion training losses of diffusers' train_dreambooth.py: mean-squared error, the
//! DreamBooth prior-preservation split, min-SNR-gamma weighting (`compute_snr` from
//! diffusers/training_utils.py) and offset noise.
use super::TrainError;
use tch::{Kind, Tensor};

/// What the UNet predicts (the scheduler config's `prediction_type`); min-SNR weighting differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
}

/// `F.mse_loss(pred.float(), target.float(), reduction="mean")`.
pub fn mse(pred: &Tensor, target: &Tensor) -> Result<Tensor, TrainError> {
    check_same_shape(pred, target)?;
    Ok(pred
        .to_kind(Kind::Float)
        .mse_loss(&target.to_kind(Kind::Float), tch::Reduction::Mean))
}

/// DreamBooth with prior preservation: the batch is [instance..., class...]; the loss is
/// `mse(instance half) + prior_loss_weight * mse(class half)` (`torch.chunk(x, 2, dim=0)`).
pub fn prior_preservation_loss(
    pred: &Tensor,
    target: &Tensor,
    prior_loss_weight: f64,
) -> Result<Tensor, TrainError> {
    let (instance_pred, prior_pred) = split_instance_prior(pred)?;
    let (instance_target, prior_target) = split_instance_prior(target)?;
    let instance = mse(&instance_pred, &instance_target)?;
    let prior = mse(&prior_pred, &prior_target)?;
    Ok(instance + prior * prior_loss_weight)
}

/// Splits a batch into its instance and class halves (batch size must be even and > 0).
pub fn split_instance_prior(batch: &Tensor) -> Result<(Tensor, Tensor), TrainError> {
    let size = batch.size().first().copied().unwrap_or(0);
    if size == 0 || size % 2 != 0 {
        return Err(TrainError::Loss(format!(
            "prior preservation needs an even batch [instance..., class...], got batch size {size}"
        )));
    }
    let half = size / 2;
    Ok((batch.narrow(0, 0, half), batch.narrow(0, half, half)))
}

/// diffusers `compute_snr`: `(sqrt(a) / sqrt(1 - a))^2` with `a = alphas_cumprod[timesteps]`
/// (the square roots are taken on the whole table first, in its dtype, then cast to f32).
pub fn compute_snr(alphas_cumprod: &Tensor, timesteps: &Tensor) -> Result<Tensor, TrainError> {
    check_timesteps(alphas_cumprod, timesteps)?;
    let index = timesteps
        .to_kind(Kind::Int64)
        .to_device(alphas_cumprod.device());
    let alpha = alphas_cumprod
        .sqrt()
        .index_select(0, &index)
        .to_kind(Kind::Float);
    let one_minus = alphas_cumprod.ones_like() - alphas_cumprod;
    let sigma = one_minus
        .sqrt()
        .index_select(0, &index)
        .to_kind(Kind::Float);
    Ok((alpha / sigma).square())
}

/// Min-SNR-gamma loss weights (train_dreambooth.py): `min(snr, gamma) / snr` for epsilon,
/// `min(snr, gamma) / (snr + 1)` for v-prediction.
pub fn min_snr_weights(
    alphas_cumprod: &Tensor,
    timesteps: &Tensor,
    gamma: f64,
    prediction: PredictionType,
) -> Result<Tensor, TrainError> {
    let snr = compute_snr(alphas_cumprod, timesteps)?;
    let clipped = snr.clamp_max(gamma);
    let divisor = match prediction {
        PredictionType::Epsilon => snr,
        PredictionType::VPrediction => snr + 1.0,
    };
    Ok(clipped / divisor)
}

/// Min-SNR-gamma weighted MSE: per-sample mean squared error times its weight, then the mean
/// over the batch (train_dreambooth.py with `--snr_gamma`). `timesteps` has one entry per sample.
pub fn min_snr_mse(
    pred: &Tensor,
    target: &Tensor,
    timesteps: &Tensor,
    alphas_cumprod: &Tensor,
    gamma: f64,
    prediction: PredictionType,
) -> Result<Tensor, TrainError> {
    check_same_shape(pred, target)?;
    let batch = pred.size().first().copied().unwrap_or(0);
    if timesteps.size() != [batch] {
        return Err(TrainError::Loss(format!(
            "min-SNR weighting needs one timestep per sample: batch {batch}, timesteps {:?}",
            timesteps.size()
        )));
    }
    let weights = min_snr_weights(alphas_cumprod, timesteps, gamma, prediction)?;
    let squared = (pred.to_kind(Kind::Float) - target.to_kind(Kind::Float)).square();
    let dims: Vec<i64> = (1..squared.dim() as i64).collect();
    let per_sample = squared.mean_dim(dims.as_slice(), false, Kind::Float);
    Ok((per_sample * weights.to_device(pred.device())).mean(Kind::Float))
}

/// Offset noise (train_dreambooth.py `--offset_noise`, there with offset 0.1):
/// `noise + offset * randn(b, c, 1, 1)`, drawn after `noise` from the thread's seeded generator
/// (`sd::rng`; outside a scope, tch's global one).
pub fn offset_noise(noise: &Tensor, offset: f64) -> Result<Tensor, TrainError> {
    let size = noise.size();
    if size.len() != 4 {
        return Err(TrainError::Loss(format!(
            "offset noise needs a 4-d (b, c, h, w) noise tensor, got shape {size:?}"
        )));
    }
    let per_channel =
        crate::sd::rng::randn(&[size[0], size[1], 1, 1], noise.kind(), noise.device());
    Ok(noise + per_channel * offset)
}

fn check_same_shape(pred: &Tensor, target: &Tensor) -> Result<(), TrainError> {
    if pred.size() != target.size() {
        return Err(TrainError::Loss(format!(
            "prediction shape {:?} differs from target shape {:?}",
            pred.size(),
            target.size()
        )));
    }
    Ok(())
}

fn check_timesteps(alphas_cumprod: &Tensor, timesteps: &Tensor) -> Result<(), TrainError> {
    let table = alphas_cumprod.size();
    if table.len() != 1 || timesteps.numel() == 0 {
        return Err(TrainError::Loss(format!(
            "compute_snr needs a 1-d alphas_cumprod table and some timesteps, got {table:?} and {:?}",
            timesteps.size()
        )));
    }
    let max = timesteps.max().int64_value(&[]);
    let min = timesteps.min().int64_value(&[]);
    if min < 0 || max >= table[0] {
        return Err(TrainError::Loss(format!(
            "timesteps must lie in [0, {}) (the scheduler's num_train_timesteps), got {min}..={max}",
            table[0]
        )));
    }
    Ok(())
}
