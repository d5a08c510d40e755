//! One micro-batch with every random draw made explicit ([`StepBatch`]), and the draws that make
//! it: the VAE sample of the latents, the noise (optionally offset) and the timesteps.
use super::TrainError;
use super::loss;
use crate::sd::rng;
use tch::Tensor;

/// train_dreambooth.py adds `0.1 * randn(b, c, 1, 1)` with `--offset_noise`.
pub const OFFSET_NOISE_SCALE: f64 = 0.1;

/// One micro-batch with every random draw made explicit: `latents` already multiplied by the
/// VAE scaling factor, `noise` like `latents`, one int64 timestep per sample, token ids [b, 77].
pub struct StepBatch {
    pub latents: Tensor,
    pub noise: Tensor,
    pub timesteps: Tensor,
    pub input_ids: Tensor,
}

/// The noise and timesteps of a batch of latents, drawn after the latents from the thread's
/// seeded generator: `randn_like`, the optional offset noise, then `randint(0, T, (b,))`.
pub fn draw_noise_and_timesteps(
    latents: &Tensor,
    offset_noise: bool,
    num_train_timesteps: usize,
) -> Result<(Tensor, Tensor), TrainError> {
    let noise = rng::randn(&latents.size(), latents.kind(), latents.device());
    let noise = if offset_noise {
        loss::offset_noise(&noise, OFFSET_NOISE_SCALE)?
    } else {
        noise
    };
    let batch = latents.size()[0];
    let timesteps = rng::randint(0, num_train_timesteps as i64, &[batch], latents.device());
    Ok((noise, timesteps))
}
