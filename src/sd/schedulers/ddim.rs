//! DDIM (diffusers `DDIMScheduler`), deterministic (eta = 0, as the SD pipelines call it).
use super::common::{
    PREDICTION_TYPES, PredictionType, SPACINGS, TimestepSpacing, TrainSchedule, ZeroSnr,
    check_steps, integer_timesteps,
};
use super::{Scheduler, SchedulerConfig, SchedulerError, SchedulerKind, StepOutput, at};
use tch::Tensor;

const NAME: &str = "DDIMScheduler";
/// diffusers DDIMScheduler defaults.
const DEFAULT_CLIP_SAMPLE: bool = true;
const DEFAULT_CLIP_SAMPLE_RANGE: f64 = 1.0;
const DEFAULT_SET_ALPHA_TO_ONE: bool = true;
const DEFAULT_SPACING: &str = "leading";

/// diffusers `DDIMScheduler` with eta = 0.
pub struct DdimScheduler {
    train: TrainSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    clip_range: Option<f64>,
    /// alphas_cumprod "before" timestep 0: 1.0 or alphas_cumprod[0] (`set_alpha_to_one`).
    final_alpha_cumprod: f32,
    /// `num_train_timesteps // num_inference_steps`: DDIM's previous-timestep distance.
    step_ratio: i64,
    timestep_values: Vec<i64>,
    timesteps: Tensor,
}

impl DdimScheduler {
    /// `DDIMScheduler.from_config(config)`.
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        config.reject_true(NAME, &[("thresholding", config.thresholding)])?;
        let train = TrainSchedule::new(config, NAME, ZeroSnr::RescaleBetas)?;
        let pred = config.prediction_type.as_deref();
        let prediction =
            config.choice(NAME, "prediction_type", pred, "epsilon", PREDICTION_TYPES)?;
        let spacing = config.timestep_spacing.as_deref();
        let spacing =
            config.choice(NAME, "timestep_spacing", spacing, DEFAULT_SPACING, SPACINGS)?;
        let clip = config.clip_sample.unwrap_or(DEFAULT_CLIP_SAMPLE);
        let range = config
            .clip_sample_range
            .unwrap_or(DEFAULT_CLIP_SAMPLE_RANGE);
        let set_alpha_to_one = config.set_alpha_to_one.unwrap_or(DEFAULT_SET_ALPHA_TO_ONE);
        let final_alpha_cumprod = if set_alpha_to_one {
            1.0
        } else {
            train.alpha_cumprod(0)
        };
        Ok(Self {
            train,
            prediction,
            spacing,
            steps_offset: config.steps_offset.unwrap_or(0),
            clip_range: clip.then_some(range),
            final_alpha_cumprod,
            step_ratio: 1,
            timestep_values: Vec::new(),
            timesteps: Tensor::from_slice::<i64>(&[]),
        })
    }

    fn alpha_cumprod_or_final(&self, timestep: i64) -> f32 {
        if timestep >= 0 {
            self.train.alpha_cumprod(timestep)
        } else {
            self.final_alpha_cumprod
        }
    }
}

impl Scheduler for DdimScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        let n = self.train.num_train_timesteps;
        check_steps(NAME, num_inference_steps, n)?;
        self.step_ratio = (n / num_inference_steps) as i64;
        self.timestep_values =
            integer_timesteps(self.spacing, n, num_inference_steps, self.steps_offset);
        self.timesteps = Tensor::from_slice(&self.timestep_values);
        Ok(())
    }

    fn timesteps(&self) -> &Tensor {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _: usize) -> Result<Tensor, SchedulerError> {
        Ok(sample.shallow_clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<StepOutput, SchedulerError> {
        let t = at(&self.timestep_values, step_index, NAME)?;
        let alpha_prod_t = self.train.alpha_cumprod(t);
        let alpha_prod_prev = self.alpha_cumprod_or_final(t - self.step_ratio);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sqrt_alpha, sqrt_beta) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        let (mut pred_original, pred_epsilon) = match self.prediction {
            PredictionType::Epsilon => (
                sample
                    .f_sub(&model_output.f_mul_scalar(f64::from(sqrt_beta))?)?
                    .f_div_scalar(f64::from(sqrt_alpha))?,
                model_output.shallow_clone(),
            ),
            PredictionType::Sample => (
                model_output.shallow_clone(),
                sample
                    .f_sub(&model_output.f_mul_scalar(f64::from(sqrt_alpha))?)?
                    .f_div_scalar(f64::from(sqrt_beta))?,
            ),
            PredictionType::VPrediction => (
                sample
                    .f_mul_scalar(f64::from(sqrt_alpha))?
                    .f_sub(&model_output.f_mul_scalar(f64::from(sqrt_beta))?)?,
                model_output
                    .f_mul_scalar(f64::from(sqrt_alpha))?
                    .f_add(&sample.f_mul_scalar(f64::from(sqrt_beta))?)?,
            ),
        };
        if let Some(range) = self.clip_range {
            pred_original = pred_original.f_clamp(-range, range)?;
        }
        // eta = 0: std_dev_t = 0, so the direction coefficient is sqrt(1 - alpha_prod_prev).
        let direction_coeff = (1.0 - alpha_prod_prev - 0.0f32).sqrt();
        let prev_sample = pred_original
            .f_mul_scalar(f64::from(alpha_prod_prev.sqrt()))?
            .f_add(&pred_epsilon.f_mul_scalar(f64::from(direction_coeff))?)?;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(pred_original),
        })
    }
}
