//! Euler ancestral (diffusers `EulerAncestralDiscreteScheduler`): an Euler step down to
//! sigma_down, then fresh noise of size sigma_up (drawn from tch's global CPU generator at every
//! step, the last one included, like diffusers).
use super::common::SigmaSpacing;
use super::common::{
    PredictionType, SPACINGS, TimestepSpacing, TrainSchedule, ZeroSnr, check_steps, cpu_noise_like,
    sigma_init_noise,
};
use super::lms::{SigmaOptions, sigma_pred_original, sigma_scale_input, sigma_schedule};
use super::{Scheduler, SchedulerConfig, SchedulerError, SchedulerKind, StepOutput, at};
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
    train: TrainSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    sigma_values: Vec<f32>,
    sigmas: Tensor,
    timesteps: Tensor,
}

impl EulerAncestralScheduler {
    /// `EulerAncestralDiscreteScheduler.from_config(config)`.
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        let train = TrainSchedule::new(config, NAME, ZeroSnr::RescaleAndFloorLast)?;
        let pred = config.prediction_type.as_deref();
        let prediction = config.choice(
            NAME,
            "prediction_type",
            pred,
            "epsilon",
            EULER_A_PREDICTION_TYPES,
        )?;
        let spacing = config.timestep_spacing.as_deref();
        let spacing =
            config.choice(NAME, "timestep_spacing", spacing, DEFAULT_SPACING, SPACINGS)?;
        let mut scheduler = Self {
            train,
            prediction,
            spacing,
            steps_offset: config.steps_offset.unwrap_or(0),
            sigma_values: Vec::new(),
            sigmas: Tensor::from_slice::<f32>(&[]),
            timesteps: Tensor::from_slice::<f32>(&[]),
        };
        let n = scheduler.train.num_train_timesteps;
        scheduler.set_timesteps(n)?;
        Ok(scheduler)
    }
}

impl Scheduler for EulerAncestralScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        check_steps(NAME, num_inference_steps, self.train.num_train_timesteps)?;
        let (timesteps, sigmas) = sigma_schedule(
            &self.train,
            self.spacing,
            self.steps_offset,
            num_inference_steps,
            &SigmaOptions {
                spacing: SigmaSpacing::Interpolated,
                bounds: (None, None),
                final_sigma: 0.0,
            },
        )?;
        self.timesteps = Tensor::from_slice(&timesteps);
        self.sigmas = Tensor::from_slice(&sigmas);
        self.sigma_values = sigmas;
        Ok(())
    }

    fn timesteps(&self) -> &Tensor {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&Tensor> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        sigma_init_noise(&self.sigma_values, self.spacing)
    }

    fn scale_model_input(
        &self,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, SchedulerError> {
        sigma_scale_input(sample, at(&self.sigma_values, step_index, NAME)?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<StepOutput, SchedulerError> {
        let sigma = at(&self.sigma_values, step_index, NAME)?;
        let sigma_to = at(&self.sigma_values, step_index + 1, NAME)?;
        let pred_original = sigma_pred_original(self.prediction, model_output, sample, sigma)?;
        let (from_sq, to_sq) = (sigma * sigma, sigma_to * sigma_to);
        let sigma_up = (to_sq * (from_sq - to_sq) / from_sq).sqrt();
        let sigma_down = (to_sq - sigma_up * sigma_up).sqrt();
        let derivative = sample
            .f_sub(&pred_original)?
            .f_div_scalar(f64::from(sigma))?;
        let dt = sigma_down - sigma;
        let deterministic = sample.f_add(&derivative.f_mul_scalar(f64::from(dt))?)?;
        let noise = cpu_noise_like(model_output)?.f_to_kind(model_output.kind())?;
        let prev_sample = deterministic.f_add(&noise.f_mul_scalar(f64::from(sigma_up))?)?;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(pred_original),
        })
    }
}
