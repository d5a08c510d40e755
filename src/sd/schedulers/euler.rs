//! Euler (diffusers `EulerDiscreteScheduler`), deterministic (`s_churn = 0`, as the SD
//! pipelines call it): one Euler step of the probability-flow ODE in sigma space.
use super::common::SigmaSpacing;
use super::common::{
    PREDICTION_TYPES, PredictionType, SPACINGS, TimestepSpacing, TrainSchedule, ZeroSnr,
    check_steps, sigma_init_noise,
};
use super::lms::{SigmaOptions, sigma_pred_original, sigma_scale_input, sigma_schedule};
use super::{Scheduler, SchedulerConfig, SchedulerError, SchedulerKind, StepOutput, at};
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
    train: TrainSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    final_sigma: FinalSigma,
    sigma_spacing: SigmaSpacing,
    /// `sigma_min` / `sigma_max` config overrides of the Karras/exponential bounds.
    sigma_bounds: (Option<f64>, Option<f64>),
    sigma_values: Vec<f32>,
    sigmas: Tensor,
    timesteps: Tensor,
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
        let train = TrainSchedule::new(config, NAME, ZeroSnr::RescaleAndFloorLast)?;
        let pred = config.prediction_type.as_deref();
        let prediction =
            config.choice(NAME, "prediction_type", pred, "epsilon", PREDICTION_TYPES)?;
        let spacing = config.timestep_spacing.as_deref();
        let spacing =
            config.choice(NAME, "timestep_spacing", spacing, DEFAULT_SPACING, SPACINGS)?;
        let final_sigma = config.final_sigmas_type.as_deref();
        let final_sigma = config.choice(
            NAME,
            "final_sigmas_type",
            final_sigma,
            "zero",
            FINAL_SIGMA_TYPES,
        )?;
        let mut scheduler = Self {
            train,
            prediction,
            spacing,
            steps_offset: config.steps_offset.unwrap_or(0),
            final_sigma,
            sigma_spacing,
            sigma_bounds: (config.sigma_min, config.sigma_max),
            sigma_values: Vec::new(),
            sigmas: Tensor::from_slice::<f32>(&[]),
            timesteps: Tensor::from_slice::<f32>(&[]),
        };
        let n = scheduler.train.num_train_timesteps;
        scheduler.set_timesteps(n)?;
        Ok(scheduler)
    }
}

impl Scheduler for EulerScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Euler
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        check_steps(NAME, num_inference_steps, self.train.num_train_timesteps)?;
        let options = SigmaOptions {
            spacing: self.sigma_spacing,
            bounds: self.sigma_bounds,
            final_sigma: self.final_sigma.value(&self.train),
        };
        let (timesteps, sigmas) = sigma_schedule(
            &self.train,
            self.spacing,
            self.steps_offset,
            num_inference_steps,
            &options,
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
        let sigma_next = at(&self.sigma_values, step_index + 1, NAME)?;
        // gamma = 0 (s_churn = 0): sigma_hat = sigma * (0 + 1) = sigma.
        let sigma_hat = sigma;
        let pred_original = sigma_pred_original(self.prediction, model_output, sample, sigma_hat)?;
        let derivative = sample
            .f_sub(&pred_original)?
            .f_div_scalar(f64::from(sigma_hat))?;
        let dt = sigma_next - sigma_hat;
        let prev_sample = sample.f_add(&derivative.f_mul_scalar(f64::from(dt))?)?;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(pred_original),
        })
    }
}
