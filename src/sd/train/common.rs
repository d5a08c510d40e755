//! What the DreamBooth and textual-inversion loops share, under the names code outside the
//! training modules uses (`sd::train::common::…`). Each piece lives in its own module: options
//! ([`super::config`]), the optimizer ([`super::optimizer`]), progress and callbacks
//! ([`super::progress`]), `metrics.jsonl` ([`super::metrics`]), the random streams
//! ([`super::streams`]), micro-batches ([`super::batch`]) and the loss of a batch
//! ([`super::objective`]).
pub use super::base_model::trainable_sorted;
pub use super::batch::{OFFSET_NOISE_SCALE, StepBatch, XlBatch, draw_noise_and_timesteps};
pub use super::config::{
    MixedPrecision, MixedPrecisionExt, OptimizerKind, RESOLUTION_MULTIPLE, schema_defaults,
    total_steps, validate_training,
};
pub use super::metrics::{METRICS_FILE, MetricsLog};
pub use super::objective::{
    DiffusionModel, LossSpec, PredictionParts, diffusion_loss, loss_from_prediction, noisy_latents,
    prediction_type,
};
pub use super::optimizer::Optimizer;
pub use super::progress::{Callbacks, Progress, Snapshots, StepReport, TrainOutcome, Validation};
pub use super::streams::{SampleRng, dataset_index, seed_step_tensors};
