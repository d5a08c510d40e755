//! The optimizer of a training run: [`AdamW`] or [`AdamW8bit`] behind one interface (update,
//! learning rate, zeroed gradients, and the one save / load path of their state).
use super::TrainError;
use super::adamw8bit::AdamW8bit;
use super::config::OptimizerKind;
use super::optim::{AdamW, AdamWConfig};
use std::path::Path;
use tch::Tensor;

/// The optimizer of a training run (either kind, one interface).
pub enum Optimizer {
    Full(AdamW),
    EightBit(AdamW8bit),
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, params: &[Tensor], config: AdamWConfig) -> Self {
        match kind {
            OptimizerKind::AdamW => Self::Full(AdamW::new(params, config)),
            OptimizerKind::AdamW8bit => Self::EightBit(AdamW8bit::new(params, config)),
        }
    }

    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Self::Full(o) => o.set_lr(lr),
            Self::EightBit(o) => o.set_lr(lr),
        }
    }

    /// One update; fails only when libtorch refuses the fused kernel's tensors mid-update.
    pub fn step(&mut self) -> Result<(), TrainError> {
        match self {
            Self::Full(o) => o.step(),
            Self::EightBit(o) => {
                o.step();
                Ok(())
            }
        }
    }

    pub fn zero_grad(&mut self) {
        match self {
            Self::Full(o) => o.zero_grad(),
            Self::EightBit(o) => o.zero_grad(),
        }
    }

    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        match self {
            Self::Full(o) => o.save(dir),
            Self::EightBit(o) => o.save(dir),
        }
    }

    pub fn load(&mut self, dir: &Path) -> Result<(), TrainError> {
        match self {
            Self::Full(o) => o.load(dir),
            Self::EightBit(o) => o.load(dir),
        }
    }
}
