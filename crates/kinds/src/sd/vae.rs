//! The `vae` stage: trains a model's VAE (AutoencoderKL) on a folder of images, as diffusers'
//! examples/research_projects/autoencoderkl/train_autoencoderkl.py does without its LPIPS and
//! discriminator terms: reconstruction (L2 or L1, summed per image) plus `kl_scale` times the
//! posterior's KL divergence. Output: the model with the new VAE as a diffusers folder (the
//! other components copied), `metrics.jsonl`, `validation/step-N.png` and `report.json`.
use super::training::{self, ExportParams, ScriptDefaults, TrainingParams};
use dreampipe_core::field;
use dreampipe_core::stages::params::{Input, Params};
use dreampipe_core::stages::{FieldView, Stage};
use serde::{Deserialize, Serialize};

/// train_autoencoderkl.py's `--learning_rate` default (for fine-tuning a trained VAE).
const DEFAULT_LEARNING_RATE: f64 = 4.5e-6;
/// train_autoencoderkl.py's `--train_batch_size` default.
const DEFAULT_BATCH: u64 = 4;
/// train_autoencoderkl.py's `--num_train_epochs` default.
const DEFAULT_EPOCHS: u64 = 1;
/// train_autoencoderkl.py's `--kl_scale` default.
const DEFAULT_KL_SCALE: f64 = 1e-6;
/// Largest `max_grad_norm` / `kl_scale` accepted.
const MAX_GRAD_NORM: f64 = 1.0e6;
const MAX_KL_SCALE: f64 = 1.0e3;

dreampipe_core::closed_set! {
    /// `rec_loss`: the pixel reconstruction loss (train_autoencoderkl.py's names).
    pub enum ReconstructionLoss { L2 = "l2", L1 = "l1" }
}

pub struct VaeKind;

/// train_autoencoderkl.py's defaults among the shared training fields.
const SCRIPT: ScriptDefaults = ScriptDefaults {
    learning_rate: DEFAULT_LEARNING_RATE,
    train_batch_size: DEFAULT_BATCH,
    max_train_steps: None,
    num_train_epochs: DEFAULT_EPOCHS,
};

/// A `vae` stage's fields (its table is derived: [`Params`]; `images` is resolved by the
/// runner: `ctx.inputs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct VaeParams {
    /// folder of training images, or a stage making one (`images`, `generate`, `toy_world`)
    pub images: Input,
    /// reconstruction loss per pixel, summed over each image: l2 or l1
    #[param(default = "l2")]
    pub rec_loss: ReconstructionLoss,
    /// weight of the KL divergence of the latent posterior
    #[param(default = DEFAULT_KL_SCALE, range(0.0, MAX_KL_SCALE))]
    pub kl_scale: f64,
    /// gradient clipping norm
    #[param(default = 1.0, range(0.0, MAX_GRAD_NORM))]
    pub max_grad_norm: f64,
    /// set the VAE's scaling_factor to 1 / std of the training images' latents (for a VAE
    /// trained from scratch); false: keep the model's
    #[param(default = false)]
    pub fit_scaling_factor: bool,
    #[serde(flatten)]
    #[param(table = SCRIPT.table())]
    pub training: TrainingParams,
    #[serde(flatten)]
    pub output: ExportParams,
}

impl Stage for VaeKind {
    super::training_kind_methods!(VaeParams);
    fn kind(&self) -> &'static str {
        "vae"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "Trains a model's VAE on images as diffusers' train_autoencoderkl.py (reconstruction + KL; no LPIPS or discriminator). Output: the model with the new VAE as a diffusers folder, `metrics.jsonl`, `validation/step-N.png` and `report.json`."
    }
    fn check_fields(&self, fields: &FieldView<'_>) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        let checkpointing = field!(TrainingParams, gradient_checkpointing);
        if fields.flag(checkpointing) {
            problems.push((checkpointing, NO_CHECKPOINTING.to_string()));
        }
        problems.extend(training::export_problem(fields.params));
        problems
    }
}

/// Shared with the stage's run-time check.
pub const NO_CHECKPOINTING: &str =
    "not supported for vae (the VAE is small next to a UNet); set it to false";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_the_fields_of_the_struct() {
        dreampipe_core::stages::params::check_table::<VaeParams>(&VaeKind.schema()).unwrap();
    }
}
