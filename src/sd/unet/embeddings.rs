//! Timestep conditioning: diffusers' sinusoidal `Timesteps` projection (`get_timestep_embedding`)
//! and the `TimestepEmbedding` MLP (`time_embedding.linear_1`, SiLU, `linear_2`).
use tch::{Kind, Tensor, nn};

use crate::sd::layers::Linear;

/// `max_period` of diffusers' `get_timestep_embedding` (its default, used by the UNet).
const MAX_PERIOD: f64 = 10_000.0;

/// Sinusoidal embedding of `timesteps` (shape `[n]`, any numeric kind) into `[n, dim]` float32,
/// computed in the same order of operations as diffusers so results agree to the last bits.
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: i64,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Tensor {
    let half_dim = dim / 2;
    let device = timesteps.device();
    let exponent = Tensor::arange(half_dim, (Kind::Float, device)) * (-MAX_PERIOD.ln());
    let exponent = exponent / (half_dim as f64 - freq_shift);
    let frequencies = exponent.exp();
    let angles = timesteps.to_kind(Kind::Float).unsqueeze(1) * frequencies.unsqueeze(0);
    let (first, second) = if flip_sin_to_cos {
        (angles.cos(), angles.sin())
    } else {
        (angles.sin(), angles.cos())
    };
    let embedding = Tensor::cat(&[first, second], -1);
    if dim % 2 == 1 {
        embedding.constant_pad_nd([0, 1, 0, 0])
    } else {
        embedding
    }
}

/// diffusers' `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(path: nn::Path, in_dim: i64, embed_dim: i64) -> Self {
        Self {
            linear_1: Linear::new(&path / "linear_1", in_dim, embed_dim, true),
            linear_2: Linear::new(&path / "linear_2", embed_dim, embed_dim, true),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(x).silu())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_widths_are_zero_padded_and_flip_swaps_halves() {
        let timesteps = Tensor::from_slice(&[0i64, 10]);
        let flipped = timestep_embedding(&timesteps, 5, true, 0.0);
        assert_eq!(flipped.size(), vec![2, 5]);
        assert_eq!(flipped.double_value(&[1, 4]), 0.0);
        // t = 0: cos(0) = 1 comes first when flipped, sin(0) = 0 first otherwise.
        assert_eq!(flipped.double_value(&[0, 0]), 1.0);
        let plain = timestep_embedding(&timesteps, 4, false, 1.0);
        assert_eq!(plain.double_value(&[0, 0]), 0.0);
        // freq_shift 1 with half_dim 2: frequencies exp(-ln(1e4) * i / 1) = 1, 1e-4.
        let expected = (10.0f32 * 1e-4).sin() as f64;
        assert!((plain.double_value(&[1, 1]) - expected).abs() < 1e-7);
    }
}
