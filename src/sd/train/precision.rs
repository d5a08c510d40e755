//! Mixed precision inside one training step, shared by both trainers: the trained modules'
//! forward under autocast, the (fp16: scaled) backward, and the unscale / skip / scale-update
//! around the optimizer step, in the order accelerate runs them in diffusers' scripts.
use super::TrainError;
use super::config::{MixedPrecision, MixedPrecisionExt};
use super::grad_scaler::{GradScaler, GradScalerState};
use crate::sd::autocast::{self, Autocast};
use tch::{Device, Tensor};

/// The mixed-precision state of a run.
pub struct Precision {
    autocast: Option<Autocast>,
    scaler: Option<GradScaler>,
}

impl Precision {
    pub fn new(mixed_precision: MixedPrecision, device: Device) -> Result<Self, TrainError> {
        Ok(Self {
            autocast: mixed_precision.autocast(device)?,
            scaler: mixed_precision.grad_scaler(),
        })
    }

    /// The autocast region of the trained modules (None in float32).
    pub fn autocast(&self) -> Option<Autocast> {
        self.autocast
    }

    /// Runs a trained module's forward: under autocast when mixed precision is on, its output
    /// converted to float32 as accelerate's `convert_outputs_to_fp32` does.
    pub fn forward<E: std::fmt::Display>(
        &self,
        f: impl FnOnce() -> Result<Tensor, E>,
    ) -> Result<Tensor, TrainError> {
        let output = autocast::maybe(self.autocast, f)
            .map_err(TrainError::Model)?
            .map_err(TrainError::model)?;
        Ok(match self.autocast {
            Some(_) => output.to_kind(tch::Kind::Float),
            None => output,
        })
    }

    /// [`forward`](Self::forward) of a module with two outputs (SDXL's text encoders: the
    /// penultimate states and the pooled embedding), both converted to float32 under autocast.
    pub fn forward_pair<E: std::fmt::Display>(
        &self,
        f: impl FnOnce() -> Result<(Tensor, Tensor), E>,
    ) -> Result<(Tensor, Tensor), TrainError> {
        let (first, second) = autocast::maybe(self.autocast, f)
            .map_err(TrainError::Model)?
            .map_err(TrainError::model)?;
        Ok(match self.autocast {
            Some(_) => (
                first.to_kind(tch::Kind::Float),
                second.to_kind(tch::Kind::Float),
            ),
            None => (first, second),
        })
    }

    /// `backward(loss / count)`, the loss multiplied by the fp16 scale first.
    pub fn backward(&self, loss: &Tensor, count: f64) {
        self.scaled(loss, count).backward();
    }

    /// `loss / count`, times the fp16 scale (for callers that run their own backward).
    pub fn scaled(&self, loss: &Tensor, count: f64) -> Tensor {
        match &self.scaler {
            Some(scaler) => scaler.scale_loss(loss) / count,
            None => loss / count,
        }
    }

    /// Before clipping: unscales the gradients of `params`; true when one is inf/NaN, so the
    /// optimizer step must be skipped. Always false without loss scaling.
    pub fn unscale(&self, params: &[Tensor]) -> bool {
        self.scaler
            .as_ref()
            .is_some_and(|scaler| scaler.unscale(params))
    }

    /// After the (possibly skipped) step: updates the scale.
    pub fn update(&mut self, found_inf: bool) {
        if let Some(scaler) = &mut self.scaler {
            scaler.update(found_inf);
        }
    }

    /// The lr-schedule position of optimizer step `step`: accelerate does not advance the
    /// schedule on a skipped step.
    pub fn schedule_position(&self, step: u64) -> u64 {
        step.saturating_sub(self.skipped_steps().unwrap_or(0))
    }

    /// Steps skipped so far (None without loss scaling).
    pub fn skipped_steps(&self) -> Option<u64> {
        self.scaler.as_ref().map(GradScaler::skipped_steps)
    }

    /// What a checkpoint keeps (None without loss scaling).
    pub fn scaler_state(&self) -> Option<GradScalerState> {
        self.scaler.as_ref().map(GradScaler::state)
    }

    /// Restores a checkpoint's scaler state (ignored without loss scaling).
    pub fn restore_scaler(&mut self, state: Option<GradScalerState>) {
        if let (Some(scaler), Some(state)) = (&mut self.scaler, state) {
            scaler.restore(state);
        }
    }

    /// Replaces the loss scaler (tests drive a crafted one; fp16 runs get the defaults).
    pub fn set_grad_scaler(&mut self, scaler: GradScaler) {
        self.scaler = Some(scaler);
    }
}
