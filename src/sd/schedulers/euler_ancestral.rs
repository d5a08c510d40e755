//! Euler ancestral (diffusers `EulerAncestralDiscreteScheduler`): an Euler step down to
//! sigma_down, then fresh noise of size sigma_up (drawn from the run's seeded CPU generator at
//! every step, the last one included, like diffusers; see `sd::rng`).
use super::common::{CommonConfig, PredictionType, SigmaSpacing, ZeroSnr, cpu_noise_like};
use super::sigma::{SigmaOptions, SigmaSchedule, SigmaScheduler, euler_step};
use super::{SchedulerConfig, SchedulerError, SchedulerKind, StepOutput};
use tch::Tensor;

const NAME: &str = "EulerAncestralDiscreteScheduler";
const DEFAULT_SPACING: &str = "linspace";

/// diffusers raises NotImplementedError for `sample` prediction in this scheduler.
const EULER_A_PREDICTION_TYPES: &[(&str, PredictionType)] = &[
    ("epsilon", PredictionType::Epsilon),
    ("v_prediction", PredictionType::VPrediction),
];

/// diffusers `EulerAncestralDiscreteScheduler`.
pub struct EulerAncestralScheduler {
    schedule: SigmaSchedule,
}

impl EulerAncestralScheduler {
    /// `EulerAncestralDiscreteScheduler.from_config(config)`.
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        let common = CommonConfig::read(
            config,
            NAME,
            ZeroSnr::RescaleAndFloorLast,
            EULER_A_PREDICTION_TYPES,
            DEFAULT_SPACING,
        )?;
        let options = SigmaOptions {
            spacing: SigmaSpacing::Interpolated,
            bounds: (None, None),
            final_sigma: 0.0,
        };
        Ok(Self {
            schedule: SigmaSchedule::new(NAME, common, options)?,
        })
    }
}

impl SigmaScheduler for EulerAncestralScheduler {
    const NAME: &'static str = NAME;
    const KIND: SchedulerKind = SchedulerKind::EulerAncestral;

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
        let sigma_to = self.schedule.sigma(step_index + 1, NAME)?;
        let pred_original = self
            .schedule
            .predict_original(model_output, sample, sigma)?;
        let (from_sq, to_sq) = (sigma * sigma, sigma_to * sigma_to);
        let sigma_up = (to_sq * (from_sq - to_sq) / from_sq).sqrt();
        let sigma_down = (to_sq - sigma_up * sigma_up).sqrt();
        let deterministic = euler_step(sample, &pred_original, sigma, sigma_down)?;
        let noise = cpu_noise_like(model_output)?.f_to_kind(model_output.kind())?;
        let prev_sample = deterministic.f_add(&noise.f_mul_scalar(f64::from(sigma_up))?)?;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(pred_original),
        })
    }
}
