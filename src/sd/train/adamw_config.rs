//! AdamW's hyperparameters ([`AdamWConfig`], torch's defaults): shared by the optimizer
//! (`optim`), torch's update kernels (`aten_adamw`) and the saved state (`state_io`), so none of
//! them needs another for it.
use std::collections::HashMap;

/// `torch.optim.AdamW` default learning rate.
pub const TORCH_DEFAULT_LR: f64 = 1e-3;
/// `torch.optim.AdamW` default betas.
pub const TORCH_DEFAULT_BETAS: (f64, f64) = (0.9, 0.999);
/// `torch.optim.AdamW` default epsilon.
pub const TORCH_DEFAULT_EPS: f64 = 1e-8;
/// `torch.optim.AdamW` default (decoupled) weight decay.
pub const TORCH_DEFAULT_WEIGHT_DECAY: f64 = 1e-2;

/// AdamW hyperparameters (one parameter group).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: TORCH_DEFAULT_LR,
            beta1: TORCH_DEFAULT_BETAS.0,
            beta2: TORCH_DEFAULT_BETAS.1,
            eps: TORCH_DEFAULT_EPS,
            weight_decay: TORCH_DEFAULT_WEIGHT_DECAY,
        }
    }
}

impl AdamWConfig {
    pub(crate) const FIELD_NAMES: [&'static str; 5] =
        ["lr", "beta1", "beta2", "eps", "weight_decay"];

    pub(crate) fn to_array(self) -> [f64; 5] {
        [self.lr, self.beta1, self.beta2, self.eps, self.weight_decay]
    }

    pub(crate) fn from_slice(values: &[f64]) -> Self {
        Self {
            lr: values[0],
            beta1: values[1],
            beta2: values[2],
            eps: values[3],
            weight_decay: values[4],
        }
    }

    pub(crate) fn to_map(self) -> HashMap<String, f64> {
        Self::FIELD_NAMES
            .iter()
            .zip(self.to_array())
            .map(|(name, value)| (name.to_string(), value))
            .collect()
    }
}
