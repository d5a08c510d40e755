//! What the sigma-parameterised schedulers (LMS, Euler, Euler ancestral) share: the float32
//! timestep + sigma schedule, `init_noise_sigma`, `scale_model_input`, the x0 estimate in sigma
//! space, and one `Scheduler` implementation that leaves each of them only its `step`.
use super::common::{
    CommonConfig, PredictionType, SigmaSpacing, TimestepSpacing, TrainSchedule, check_steps,
    float_timesteps, log_sigmas, numpy_interp, sigma_init_noise, sigma_to_t, with_final_sigma,
};
use super::{Scheduler, SchedulerError, SchedulerKind, StepOutput, at};
use tch::Tensor;

/// How LMS/Euler/EulerA space their sigmas and end the schedule.
pub(crate) struct SigmaOptions {
    pub spacing: SigmaSpacing,
    /// (`sigma_min`, `sigma_max`) overrides (Euler only).
    pub bounds: (Option<f64>, Option<f64>),
    /// The appended final sigma.
    pub final_sigma: f64,
}

/// The training schedule and options of a sigma scheduler, and its current inference schedule.
pub(crate) struct SigmaSchedule {
    pub train: TrainSchedule,
    pub prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    options: SigmaOptions,
    /// The sigmas (steps + 1, the final one last) as numbers, for the per-step scalar math.
    values: Vec<f32>,
    sigmas: Tensor,
    timesteps: Tensor,
}

impl SigmaSchedule {
    /// The schedule for all training timesteps (diffusers' `__init__` calls
    /// `set_timesteps(num_train_timesteps)`).
    pub fn new(
        scheduler: &'static str,
        common: CommonConfig,
        options: SigmaOptions,
    ) -> Result<Self, SchedulerError> {
        let mut schedule = Self {
            train: common.train,
            prediction: common.prediction,
            spacing: common.spacing,
            steps_offset: common.steps_offset,
            options,
            values: Vec::new(),
            sigmas: Tensor::from_slice::<f32>(&[]),
            timesteps: Tensor::from_slice::<f32>(&[]),
        };
        let all_steps = schedule.train.num_train_timesteps;
        schedule.set(scheduler, all_steps)?;
        Ok(schedule)
    }

    /// `set_timesteps(num_inference_steps)`: float32 timesteps and their sigmas + the final one.
    fn set(
        &mut self,
        scheduler: &'static str,
        num_inference_steps: usize,
    ) -> Result<(), SchedulerError> {
        check_steps(
            scheduler,
            num_inference_steps,
            self.train.num_train_timesteps,
        )?;
        let n = num_inference_steps;
        let timesteps = float_timesteps(
            self.spacing,
            self.train.num_train_timesteps,
            n,
            self.steps_offset,
        );
        let train_sigmas = self.train.train_sigmas()?;
        let interpolated: Vec<f64> = timesteps
            .iter()
            .map(|&t| numpy_interp(f64::from(t), &train_sigmas))
            .collect();
        let (timesteps, sigmas) = match self.options.spacing {
            SigmaSpacing::Interpolated => (timesteps, interpolated),
            respacing => {
                let sigmas = respacing.respace(&interpolated, n, self.options.bounds);
                let logs = log_sigmas(&train_sigmas);
                let timesteps = sigmas
                    .iter()
                    .map(|&s| sigma_to_t(s, &logs) as f32)
                    .collect();
                (timesteps, sigmas)
            }
        };
        self.values = with_final_sigma(sigmas, self.options.final_sigma);
        self.timesteps = Tensor::from_slice(&timesteps);
        self.sigmas = Tensor::from_slice(&self.values);
        Ok(())
    }

    /// The sigmas (steps + 1, the final one last).
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// sigma[index], or a `StepIndex` error.
    pub fn sigma(&self, index: usize, scheduler: &'static str) -> Result<f32, SchedulerError> {
        at(&self.values, index, scheduler)
    }

    /// x0 estimate for the model output at `sigma` (`sample = x0 + sigma * eps`).
    pub fn predict_original(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        sigma: f32,
    ) -> Result<Tensor, SchedulerError> {
        Ok(match self.prediction {
            PredictionType::Epsilon => {
                sample.f_sub(&model_output.f_mul_scalar(f64::from(sigma))?)?
            }
            PredictionType::VPrediction => {
                let scale = -sigma / (sigma * sigma + 1.0).sqrt();
                model_output
                    .f_mul_scalar(f64::from(scale))?
                    .f_add(&sample.f_div_scalar(f64::from(sigma * sigma + 1.0))?)?
            }
            PredictionType::Sample => model_output.shallow_clone(),
        })
    }
}

/// The ODE derivative `(sample - x0) / sigma` of the Karras formulation.
pub(crate) fn ode_derivative(
    sample: &Tensor,
    pred_original: &Tensor,
    sigma: f32,
) -> Result<Tensor, SchedulerError> {
    Ok(sample
        .f_sub(pred_original)?
        .f_div_scalar(f64::from(sigma))?)
}

/// One Euler step from `sigma` to `sigma_to` along the derivative towards `pred_original`.
pub(crate) fn euler_step(
    sample: &Tensor,
    pred_original: &Tensor,
    sigma: f32,
    sigma_to: f32,
) -> Result<Tensor, SchedulerError> {
    let derivative = ode_derivative(sample, pred_original, sigma)?;
    let dt = sigma_to - sigma;
    Ok(sample.f_add(&derivative.f_mul_scalar(f64::from(dt))?)?)
}

/// A scheduler on a `SigmaSchedule`: it says only how to step; the rest of `Scheduler` is shared.
pub(crate) trait SigmaScheduler: Send {
    /// The diffusers class name, for messages.
    const NAME: &'static str;
    const KIND: SchedulerKind;
    fn schedule(&self) -> &SigmaSchedule;
    fn schedule_mut(&mut self) -> &mut SigmaSchedule;
    /// Forgets multistep history (`set_timesteps` starts a new run).
    fn clear_history(&mut self) {}
    /// `Scheduler::step`.
    fn sigma_step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<StepOutput, SchedulerError>;
}

impl<T: SigmaScheduler> Scheduler for T {
    fn kind(&self) -> SchedulerKind {
        T::KIND
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        self.schedule_mut().set(T::NAME, num_inference_steps)?;
        self.clear_history();
        Ok(())
    }

    fn timesteps(&self) -> &Tensor {
        &self.schedule().timesteps
    }

    fn sigmas(&self) -> Option<&Tensor> {
        Some(&self.schedule().sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        sigma_init_noise(&self.schedule().values, self.schedule().spacing)
    }

    /// `sample / sqrt(sigma**2 + 1)`.
    fn scale_model_input(
        &self,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, SchedulerError> {
        let sigma = self.schedule().sigma(step_index, T::NAME)?;
        Ok(sample.f_div_scalar(f64::from((sigma * sigma + 1.0).sqrt()))?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<StepOutput, SchedulerError> {
        self.sigma_step(model_output, step_index, sample)
    }
}
