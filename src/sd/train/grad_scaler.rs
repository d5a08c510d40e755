//! Dynamic loss scaling for fp16 mixed precision, as `torch.amp.GradScaler` with its defaults
//! and as accelerate drives it in diffusers' training scripts: the loss is multiplied by the
//! scale before `backward`; before gradient clipping the gradients are multiplied by the
//! float32 reciprocal of the scale and checked for inf/NaN; a step with a non-finite gradient
//! skips the optimizer update (and, in accelerate, the lr-schedule step); the scale halves after
//! such a step and doubles after `growth_interval` finite steps in a row.
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// `torch.amp.GradScaler` defaults.
pub const INIT_SCALE: f64 = 65536.0;
pub const GROWTH_FACTOR: f64 = 2.0;
pub const BACKOFF_FACTOR: f64 = 0.5;
pub const GROWTH_INTERVAL: u64 = 2000;

/// The scaler's state; saved in checkpoints so a resumed run scales exactly as before.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradScalerState {
    /// The current scale (a float32 value, as torch keeps it).
    pub scale: f64,
    /// Finite steps since the last growth or backoff.
    pub growth_tracker: u64,
    /// Optimizer steps skipped so far (inf/NaN gradients).
    pub skipped_steps: u64,
}

/// The loss scaler of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct GradScaler {
    state: GradScalerState,
    growth_interval: u64,
}

impl Default for GradScaler {
    fn default() -> Self {
        Self::new(INIT_SCALE, GROWTH_INTERVAL)
    }
}

impl GradScaler {
    /// A scaler starting at `init_scale` that grows after `growth_interval` finite steps.
    pub fn new(init_scale: f64, growth_interval: u64) -> Self {
        Self {
            state: GradScalerState {
                scale: f64::from(init_scale as f32),
                growth_tracker: 0,
                skipped_steps: 0,
            },
            growth_interval: growth_interval.max(1),
        }
    }

    pub fn state(&self) -> GradScalerState {
        self.state
    }

    pub fn restore(&mut self, state: GradScalerState) {
        self.state = state;
    }

    pub fn scale(&self) -> f64 {
        self.state.scale
    }

    /// Optimizer steps skipped so far.
    pub fn skipped_steps(&self) -> u64 {
        self.state.skipped_steps
    }

    /// `loss * scale`.
    pub fn scale_loss(&self, loss: &Tensor) -> Tensor {
        loss * self.state.scale
    }

    /// Multiplies every defined gradient by the float32 reciprocal of the scale (in place) and
    /// returns whether any gradient held an inf or NaN before that. The per-gradient checks stay
    /// on the gradients' device; one read at the end (one GPU sync per step, as torch's).
    pub fn unscale(&self, params: &[Tensor]) -> bool {
        let inverse = f64::from((1.0 / self.state.scale) as f32);
        let mut all_finite: Vec<Tensor> = Vec::new();
        for param in params {
            let mut grad = param.grad();
            if !grad.defined() {
                continue;
            }
            let device = all_finite.first().map_or(grad.device(), Tensor::device);
            all_finite.push(grad.isfinite().all().to_device(device));
            let _ = grad.g_mul_scalar_(inverse);
        }
        !all_finite.is_empty() && Tensor::stack(&all_finite, 0).all().int64_value(&[]) == 0
    }

    /// After a step: backs off on a non-finite gradient (the step was skipped), else counts a
    /// finite step and grows the scale after `growth_interval` of them.
    pub fn update(&mut self, found_inf: bool) {
        let state = &mut self.state;
        if found_inf {
            state.scale = as_f32(state.scale * BACKOFF_FACTOR);
            state.growth_tracker = 0;
            state.skipped_steps += 1;
            return;
        }
        state.growth_tracker += 1;
        if state.growth_tracker == self.growth_interval {
            let grown = as_f32(state.scale * GROWTH_FACTOR);
            if grown.is_finite() {
                state.scale = grown;
            }
            state.growth_tracker = 0;
        }
    }
}

/// Rounds to float32, the precision of torch's scale tensor.
fn as_f32(value: f64) -> f64 {
    f64::from(value as f32)
}
