//! One micro-batch with every random draw made explicit ([`StepBatch`]), and the draws that make
//! it: the VAE sample of the latents, the noise (optionally offset) and the timesteps.
use super::TrainError;
use super::loss;
use super::streams::seed_step_tensors;
use crate::sd::rng;
use tch::{Kind, Tensor};

/// train_dreambooth.py adds `0.1 * randn(b, c, 1, 1)` with `--offset_noise`.
pub const OFFSET_NOISE_SCALE: f64 = 0.1;

/// One micro-batch with every random draw made explicit: `latents` already multiplied by the
/// VAE scaling factor, `noise` like `latents`, one int64 timestep per sample, token ids [b, 77].
pub struct StepBatch {
    pub latents: Tensor,
    pub noise: Tensor,
    pub timesteps: Tensor,
    pub input_ids: Tensor,
    /// SDXL: the second tokenizer's ids and each sample's micro-conditioning time ids.
    pub xl: Option<XlBatch>,
}

/// What an SDXL micro-batch adds: `input_ids_2` [b, 77] for the second text encoder and
/// `time_ids` [b, 6] (`original_size + crop_top_left + target_size`, as
/// train_dreambooth_lora_sdxl.py's `compute_time_ids`).
pub struct XlBatch {
    pub input_ids_2: Tensor,
    pub time_ids: Tensor,
}

/// One sample's micro-conditioning: the image's original `(height, width)` and where it was
/// cropped, `(top, left)`.
pub(crate) type SizeAndCrop = ((u32, u32), (u32, u32));

/// SDXL's time ids `original_size + crop_top_left + target_size` (the scripts'
/// `compute_time_ids`), one row per sample, as float32 `[n, 6]`.
pub(crate) fn time_ids(samples: &[SizeAndCrop], resolution: u32) -> Tensor {
    let rows: Vec<f32> = (samples.iter())
        .flat_map(|&((height, width), (top, left))| {
            [height, width, top, left, resolution, resolution]
        })
        .map(|value| value as f32)
        .collect();
    Tensor::from_slice(&rows).view([samples.len() as i64, 6])
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

/// Where the draws of one micro-batch come from and what shapes them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LatentDraw {
    pub seed: u64,
    pub step: u64,
    pub micro: u64,
    /// The VAE's latent scaling factor.
    pub scaling_factor: f64,
    /// The dtype the latents (and so the noise) are drawn in: the frozen modules' weight dtype.
    pub weight_kind: Kind,
    pub offset_noise: bool,
    pub num_train_timesteps: usize,
}

/// The micro-batch of VAE posterior moments `(mean, std)` (float32) with `input_ids`: the
/// latents `(mean + std * randn) * scaling_factor` in the weight dtype (as the scripts' VAE
/// sample, and so their noise, are), then the noise and timesteps, all drawn from the
/// micro-batch's own seeded stream.
pub(crate) fn draw_batch(
    (mean, std): (Tensor, Tensor),
    input_ids: Tensor,
    draw: &LatentDraw,
) -> Result<StepBatch, TrainError> {
    let _rng = seed_step_tensors(draw.seed, draw.step, draw.micro);
    let epsilon = rng::randn(&mean.size(), Kind::Float, mean.device());
    let latents = ((&mean + &std * epsilon) * draw.scaling_factor).to_kind(draw.weight_kind);
    let (noise, timesteps) =
        draw_noise_and_timesteps(&latents, draw.offset_noise, draw.num_train_timesteps)?;
    Ok(StepBatch {
        latents,
        noise,
        timesteps,
        input_ids,
        xl: None,
    })
}
