//! The options both training methods take the same way: mixed precision, the optimizer kind,
//! the resolution rule, the checks on the loop's sizes, `--scale_lr` and diffusers' step count.
use super::TrainError;
use super::grad_scaler::GradScaler;
use crate::sd::autocast::Autocast;
use tch::{Device, Kind};

/// Training resolutions must be multiples of this (SD's VAE downsamples by 8; 8 also covers
/// the tiny test model's factor 4).
pub const RESOLUTION_MULTIPLE: u32 = 8;

/// `--mixed_precision` as accelerate applies it: the frozen modules run in the lower precision;
/// the trained modules keep float32 weights and run their forward (so their backward) under
/// libtorch's autocast; fp16 also scales the loss ([`GradScaler`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MixedPrecision {
    No,
    Fp16,
    Bf16,
}

impl MixedPrecision {
    /// Parses diffusers' `no | fp16 | bf16`.
    pub fn parse(value: &str) -> Result<Self, TrainError> {
        match value {
            "no" => Ok(Self::No),
            "fp16" => Ok(Self::Fp16),
            "bf16" => Ok(Self::Bf16),
            other => Err(TrainError::Config {
                field: "mixed_precision",
                problem: format!("'{other}' is not one of no, fp16, bf16"),
            }),
        }
    }

    /// The dtype frozen modules run in on `device`. fp16 needs CUDA (libtorch's CPU half
    /// kernels are incomplete and slow); bf16 works on both.
    pub fn weight_kind(self, device: Device) -> Result<Kind, TrainError> {
        match (self, device) {
            (Self::No, _) => Ok(Kind::Float),
            (Self::Bf16, _) => Ok(Kind::BFloat16),
            (Self::Fp16, Device::Cuda(_)) => Ok(Kind::Half),
            (Self::Fp16, _) => Err(TrainError::Config {
                field: "mixed_precision",
                problem: "fp16 needs a CUDA device; on CPU use 'bf16' or 'no'".to_string(),
            }),
        }
    }

    /// The autocast region the trained modules' forward runs in (None without mixed precision).
    pub fn autocast(self, device: Device) -> Result<Option<Autocast>, TrainError> {
        let kind = self.weight_kind(device)?;
        Ok((kind != Kind::Float).then_some(Autocast { device, kind }))
    }

    /// fp16's dynamic loss scaling (torch.amp.GradScaler's defaults); bf16 needs none.
    pub fn grad_scaler(self) -> Option<GradScaler> {
        (self == Self::Fp16).then(GradScaler::default)
    }
}

/// `--use_8bit_adam`: plain AdamW or bitsandbytes-style 8-bit AdamW.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    AdamW,
    AdamW8bit,
}

impl OptimizerKind {
    /// Parses `adamw | adamw8bit`.
    pub fn parse(value: &str) -> Result<Self, TrainError> {
        match value {
            "adamw" => Ok(Self::AdamW),
            "adamw8bit" => Ok(Self::AdamW8bit),
            other => Err(TrainError::Config {
                field: "optimizer",
                problem: format!("'{other}' is not one of adamw, adamw8bit"),
            }),
        }
    }
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
        return fail("train_batch_size", "must be at least 1");
    }
    if gradient_accumulation_steps == 0 {
        return fail("gradient_accumulation_steps", "must be at least 1");
    }
    if checkpointing_steps == 0 {
        return fail("checkpointing_steps", "must be at least 1");
    }
    if resolution == 0 || !resolution.is_multiple_of(RESOLUTION_MULTIPLE) {
        return fail("resolution", "must be a positive multiple of 8");
    }
    Ok(())
}

/// The learning rate after `--scale_lr` (times accumulation and batch size).
pub(crate) fn scaled_learning_rate(
    learning_rate: f64,
    scale_lr: bool,
    gradient_accumulation_steps: u64,
    train_batch_size: usize,
) -> f64 {
    if scale_lr {
        learning_rate * gradient_accumulation_steps as f64 * train_batch_size as f64
    } else {
        learning_rate
    }
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
