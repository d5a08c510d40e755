//! The options both training methods take the same way: mixed precision, the optimizer kind,
//! the resolution rule, the checks on the loop's sizes, `--scale_lr` and diffusers' step count.
use super::TrainError;
use super::grad_scaler::GradScaler;
use crate::sd::autocast::Autocast;
use dreampipe_core::field;
use tch::{Device, Kind};

/// Training resolutions must be multiples of this (SD's VAE downsamples by 8; 8 also covers
/// the tiny test model's factor 4).
pub const RESOLUTION_MULTIPLE: u32 = 8;

use dreampipe_kinds::sd::training::TrainingParams;
/// `--mixed_precision` (`no | fp16 | bf16`) and `--use_8bit_adam` (`adamw | adamw8bit`): the
/// stage schemas' closed sets, parsed where the stage's fields are.
pub use dreampipe_kinds::sd::training::{MixedPrecision, OptimizerKind};

/// `--mixed_precision` as accelerate applies it: the frozen modules run in the lower precision;
/// the trained modules keep float32 weights and run their forward (so their backward) under
/// libtorch's autocast; fp16 also scales the loss ([`GradScaler`]).
pub trait MixedPrecisionExt: Copy {
    /// The dtype frozen modules run in on `device`. fp16 needs CUDA (libtorch's CPU half
    /// kernels are incomplete and slow); bf16 works on both.
    fn weight_kind(self, device: Device) -> Result<Kind, TrainError>;
    /// The autocast region the trained modules' forward runs in (None without mixed
    /// precision).
    fn autocast(self, device: Device) -> Result<Option<Autocast>, TrainError>;
    /// fp16's dynamic loss scaling (torch.amp.GradScaler's defaults); bf16 needs none.
    fn grad_scaler(self) -> Option<GradScaler>;
}

impl MixedPrecisionExt for MixedPrecision {
    fn weight_kind(self, device: Device) -> Result<Kind, TrainError> {
        match (self, device) {
            (Self::No, _) => Ok(Kind::Float),
            (Self::Bf16, _) => Ok(Kind::BFloat16),
            (Self::Fp16, Device::Cuda(_)) => Ok(Kind::Half),
            (Self::Fp16, _) => Err(TrainError::Config {
                field: field!(TrainingParams, mixed_precision),
                problem: "fp16 needs a CUDA device; on CPU use 'bf16' or 'no'".to_string(),
            }),
        }
    }

    fn autocast(self, device: Device) -> Result<Option<Autocast>, TrainError> {
        let kind = self.weight_kind(device)?;
        Ok((kind != Kind::Float).then_some(Autocast { device, kind }))
    }

    fn grad_scaler(self) -> Option<GradScaler> {
        (self == Self::Fp16).then(GradScaler::default)
    }
}

/// A kind's typed fields at its schema's defaults but for `given` (the required ones): the
/// library configs' starting point, so a default is written once, in the stage schema.
pub fn schema_defaults<P: serde::de::DeserializeOwned>(
    schema: &[dreampipe_core::stages::ParamSpec],
    given: serde_json::Value,
) -> P {
    let given = given.as_object().cloned().unwrap_or_default();
    // The kinds' unit tests check that every schema's defaults parse into its struct.
    dreampipe_core::stages::params::with_defaults(schema, given)
        .unwrap_or_else(|e| panic!("a stage schema's defaults do not fit its struct: {e}"))
}

/// Rejects shared settings the training loop cannot run, naming the option (the stage schema
/// refuses them already; library callers build configs by hand).
pub fn validate_training(training: &TrainingParams, device: Device) -> Result<(), TrainError> {
    check_loop_sizes(
        training.train_batch_size,
        training.gradient_accumulation_steps,
        training.checkpointing_steps,
        training.resolution,
    )?;
    training.mixed_precision.weight_kind(device).map(|_| ())
}

/// The checks on the loop's sizes both methods make, in this order, naming the option.
pub(crate) fn check_loop_sizes(
    train_batch_size: usize,
    gradient_accumulation_steps: u64,
    checkpointing_steps: u64,
    resolution: u32,
) -> Result<(), TrainError> {
    let fail = |field: &'static str, problem: &str| {
        Err(TrainError::Config {
            field,
            problem: problem.to_string(),
        })
    };
    if train_batch_size == 0 {
        return fail(
            field!(TrainingParams, train_batch_size),
            "must be at least 1",
        );
    }
    if gradient_accumulation_steps == 0 {
        return fail(
            field!(TrainingParams, gradient_accumulation_steps),
            "must be at least 1",
        );
    }
    if checkpointing_steps == 0 {
        return fail(
            field!(TrainingParams, checkpointing_steps),
            "must be at least 1",
        );
    }
    if resolution == 0 || !resolution.is_multiple_of(RESOLUTION_MULTIPLE) {
        return fail(
            field!(TrainingParams, resolution),
            "must be a positive multiple of 8",
        );
    }
    Ok(())
}

/// `max_train_steps`, or `num_train_epochs * ceil(ceil(len / batch) / accumulation)`.
pub fn total_steps(
    max_train_steps: Option<u64>,
    num_train_epochs: u64,
    dataset_len: usize,
    batch: usize,
    accumulation: u64,
) -> u64 {
    max_train_steps.unwrap_or_else(|| {
        let batches = (dataset_len as u64).div_ceil(batch.max(1) as u64);
        num_train_epochs * batches.div_ceil(accumulation.max(1))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_precision_rejects_fp16_on_cpu() {
        let error = MixedPrecision::Fp16.weight_kind(Device::Cpu).unwrap_err();
        assert_eq!(
            error.to_string(),
            "training option 'mixed_precision': fp16 needs a CUDA device; on CPU use 'bf16' or 'no'"
        );
        assert_eq!(
            MixedPrecision::Bf16.weight_kind(Device::Cpu).unwrap(),
            Kind::BFloat16
        );
    }

    #[test]
    fn total_steps_follow_diffusers_epoch_math() {
        assert_eq!(total_steps(Some(9), 1, 5, 2, 1), 9);
        assert_eq!(total_steps(None, 2, 5, 2, 2), 4);
    }
}
