//! What the DreamBooth and textual-inversion loops share, under the names code outside the
//! training modules uses (`sd::train::common::…`). Each piece lives in its own module: options
//! ([`super::config`]), the optimizer ([`super::optimizer`]), progress and callbacks
//! ([`super::progress`]), `metrics.jsonl` ([`super::metrics`]), the random streams
//! ([`super::streams`]), micro-batches ([`super::batch`]) and the loss of a batch
//! ([`super::objective`]).
use super::TrainError;
pub use super::batch::{OFFSET_NOISE_SCALE, StepBatch, draw_noise_and_timesteps};
pub use super::config::{MixedPrecision, OptimizerKind, RESOLUTION_MULTIPLE, total_steps};
pub(crate) use super::io_error;
pub use super::metrics::{METRICS_FILE, MetricsLog};
pub use super::objective::{
    DiffusionModel, LossSpec, PredictionParts, diffusion_loss, loss_from_prediction, noisy_latents,
    prediction_type,
};
pub use super::optimizer::Optimizer;
pub use super::progress::{Callbacks, Progress, Snapshots, StepReport, TrainOutcome, Validation};
pub use super::streams::{SampleRng, dataset_index, seed_step_tensors};
use tch::{Tensor, nn::VarStore};

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

/// Fails with [`TrainError::NonFiniteLoss`] (checkpoint filled in by the loop) when `loss` is
/// NaN or infinite.
pub(crate) fn check_finite(loss: f64, step: u64) -> Result<(), TrainError> {
    if loss.is_finite() {
        Ok(())
    } else {
        Err(TrainError::NonFiniteLoss {
            step,
            loss,
            checkpoint: None,
        })
    }
}
