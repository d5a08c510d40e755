//! Learning-rate schedules as diffusers' `get_scheduler(name, optimizer, num_warmup_steps,
//! num_training_steps, num_cycles, power)` (diffusers/optimization.py), as a pure function of the
//! optimizer step. diffusers/accelerate call `lr_scheduler.step()` once per optimizer step, so
//! optimizer step `k` (0-based) runs with `lr_at(k) = base_lr * multiplier(k)`.
use super::TrainError;
use std::f64::consts::PI;

/// diffusers `get_polynomial_decay_schedule_with_warmup` default `lr_end`.
pub const POLYNOMIAL_LR_END: f64 = 1e-7;
/// diffusers `get_cosine_schedule_with_warmup` default `num_cycles` (half a cosine wave);
/// `get_scheduler` does not forward its `num_cycles` to this schedule.
pub const COSINE_NUM_CYCLES: f64 = 0.5;
/// The `get_scheduler` names implemented here: the stage schemas' closed set (the front binary
/// validates the name without libtorch; `LrScheduler::from_name` parses one).
pub use dreampipe_kinds::sd::training::LrScheduler;

/// Which curve the multiplier follows after warmup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScheduleKind {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
    CosineWithRestarts { num_cycles: u32 },
    Polynomial { power: f64, lr_end: f64 },
}

/// A learning-rate schedule: `base_lr` times diffusers' multiplier for each step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub num_warmup_steps: u64,
    pub num_training_steps: u64,
}

impl LrSchedule {
    /// Like diffusers `get_scheduler(name, ...)`; `num_cycles` is only used by
    /// `cosine_with_restarts` and `power` only by `polynomial`, as there.
    pub fn new(
        name: LrScheduler,
        base_lr: f64,
        num_warmup_steps: u64,
        num_training_steps: u64,
        num_cycles: u32,
        power: f64,
    ) -> Result<Self, TrainError> {
        let kind = match name {
            LrScheduler::Constant => ScheduleKind::Constant,
            LrScheduler::ConstantWithWarmup => ScheduleKind::ConstantWithWarmup,
            LrScheduler::Linear => ScheduleKind::Linear,
            LrScheduler::Cosine => ScheduleKind::Cosine,
            LrScheduler::CosineWithRestarts => ScheduleKind::CosineWithRestarts { num_cycles },
            LrScheduler::Polynomial => ScheduleKind::Polynomial {
                power,
                lr_end: POLYNOMIAL_LR_END,
            },
        };
        if let ScheduleKind::Polynomial { lr_end, .. } = kind
            && base_lr <= lr_end
        {
            return Err(TrainError::ScheduleArgs {
                name: name.to_string(),
                problem: format!(
                    "lr_end ({lr_end}) must be smaller than the initial lr ({base_lr}); raise learning_rate"
                ),
            });
        }
        Ok(Self {
            kind,
            base_lr,
            num_warmup_steps,
            num_training_steps,
        })
    }

    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        self.base_lr * self.multiplier(step)
    }

    /// diffusers' `lr_lambda(step)`.
    pub fn multiplier(&self, step: u64) -> f64 {
        let warmup = self.num_warmup_steps;
        if self.kind != ScheduleKind::Constant && step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let total = self.num_training_steps;
        let decay_steps = total.saturating_sub(warmup).max(1) as f64;
        let progress = (step as f64 - warmup as f64) / decay_steps;
        match self.kind {
            ScheduleKind::Constant | ScheduleKind::ConstantWithWarmup => 1.0,
            ScheduleKind::Linear => ((total as f64 - step as f64) / decay_steps).max(0.0),
            ScheduleKind::Cosine => {
                (0.5 * (1.0 + (PI * COSINE_NUM_CYCLES * 2.0 * progress).cos())).max(0.0)
            }
            ScheduleKind::CosineWithRestarts { num_cycles } => {
                if progress >= 1.0 {
                    return 0.0;
                }
                let phase = (num_cycles as f64 * progress).rem_euclid(1.0);
                (0.5 * (1.0 + (PI * phase).cos())).max(0.0)
            }
            ScheduleKind::Polynomial { power, lr_end } => {
                self.polynomial_multiplier(step, power, lr_end)
            }
        }
    }

    fn polynomial_multiplier(&self, step: u64, power: f64, lr_end: f64) -> f64 {
        let (warmup, total) = (self.num_warmup_steps, self.num_training_steps);
        if step > total {
            return lr_end / self.base_lr;
        }
        let lr_range = self.base_lr - lr_end;
        // diffusers divides by (total - warmup) unguarded; a zero-length decay is all "remaining".
        let decay_steps = total as f64 - warmup as f64;
        let pct_remaining = if decay_steps == 0.0 {
            1.0
        } else {
            1.0 - (step as f64 - warmup as f64) / decay_steps
        };
        (lr_range * pct_remaining.powf(power) + lr_end) / self.base_lr
    }
}
