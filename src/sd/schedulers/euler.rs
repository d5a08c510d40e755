//! Euler (diffusers `EulerDiscreteScheduler`), deterministic (`s_churn = 0`, as the SD
//! pipelines call it): one Euler step of the probability-flow ODE in sigma space.
use super::common::{CommonConfig, PREDICTION_TYPES, SigmaSpacing, TrainSchedule, ZeroSnr};
use super::sigma::{SigmaOptions, SigmaSchedule, SigmaScheduler, euler_step};
use super::{SchedulerConfig, SchedulerError, SchedulerKind, StepOutput};
use tch::Tensor;

const NAME: &str = "EulerDiscreteScheduler";
const DEFAULT_SPACING: &str = "linspace";

/// What the sigma schedule ends with (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FinalSigma {
    Zero,
    SigmaMin,
}

pub(crate) const FINAL_SIGMA_TYPES: &[(&str, FinalSigma)] = &[
    ("zero", FinalSigma::Zero),
    ("sigma_min", FinalSigma::SigmaMin),
];

impl FinalSigma {
    /// The appended last sigma: 0, or `((1 - acp[0]) / acp[0]) ** 0.5` (float32).
    pub(crate) fn value(self, train: &TrainSchedule) -> f64 {
        match self {
            FinalSigma::Zero => 0.0,
            FinalSigma::SigmaMin => {
                let alpha = train.alpha_cumprod(0);
                f64::from(((1.0 - alpha) / alpha).sqrt())
            }
        }
    }
}

/// diffusers `EulerDiscreteScheduler` with `s_churn = 0`.
pub struct EulerScheduler {
    schedule: SigmaSchedule,
}

impl EulerScheduler {
    /// `EulerDiscreteScheduler.from_config(config)`.
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        let sigma_spacing = SigmaSpacing::from_config(config, NAME)?;
        let interpolation = config.interpolation_type.as_deref();
        config.choice(
            NAME,
            "interpolation_type",
            interpolation,
            "linear",
            &[("linear", ())],
        )?;
        let timestep_type = config.timestep_type.as_deref();
        config.choice(
            NAME,
            "timestep_type",
            timestep_type,
            "discrete",
            &[("discrete", ())],
        )?;
        let common = CommonConfig::read(
            config,
            NAME,
            ZeroSnr::RescaleAndFloorLast,
            PREDICTION_TYPES,
            DEFAULT_SPACING,
        )?;
        let final_sigma = config.final_sigmas_type.as_deref();
        let final_sigma = config.choice(
            NAME,
            "final_sigmas_type",
            final_sigma,
            "zero",
            FINAL_SIGMA_TYPES,
        )?;
        let options = SigmaOptions {
            spacing: sigma_spacing,
            bounds: (config.sigma_min, config.sigma_max),
            final_sigma: final_sigma.value(&common.train),
        };
        Ok(Self {
            schedule: SigmaSchedule::new(NAME, common, options)?,
        })
    }
}

impl SigmaScheduler for EulerScheduler {
    const NAME: &'static str = NAME;
    const KIND: SchedulerKind = SchedulerKind::Euler;

    fn schedule(&self) -> &SigmaSchedule {
        &self.schedule
    }

    fn schedule_mut(&mut self) -> &mut SigmaSchedule {
        &mut self.schedule
    }

    fn sigma_step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<StepOutput, SchedulerError> {
        let sigma = self.schedule.sigma(step_index, NAME)?;
        let sigma_next = self.schedule.sigma(step_index + 1, NAME)?;
        // gamma = 0 (s_churn = 0): sigma_hat = sigma * (0 + 1) = sigma.
        let sigma_hat = sigma;
        let pred_original = self
            .schedule
            .predict_original(model_output, sample, sigma_hat)?;
        let prev_sample = euler_step(sample, &pred_original, sigma_hat, sigma_next)?;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(pred_original),
        })
    }
}
