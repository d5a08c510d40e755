//! DDIM (diffusers `DDIMScheduler`), deterministic (eta = 0, as the SD pipelines call it).
use super::common::{
    CommonConfig, PREDICTION_TYPES, ZeroSnr, clip_range, clip_sample, predict_epsilon,
    predict_original,
};
use super::{Scheduler, SchedulerConfig, SchedulerError, SchedulerKind, StepOutput, at};
use tch::Tensor;

const NAME: &str = "DDIMScheduler";
/// diffusers DDIMScheduler defaults.
const DEFAULT_SET_ALPHA_TO_ONE: bool = true;
const DEFAULT_SPACING: &str = "leading";

/// diffusers `DDIMScheduler` with eta = 0.
pub struct DdimScheduler {
    common: CommonConfig,
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
        let common = CommonConfig::read(
            config,
            NAME,
            ZeroSnr::RescaleBetas,
            PREDICTION_TYPES,
            DEFAULT_SPACING,
        )?;
        let set_alpha_to_one = config.set_alpha_to_one.unwrap_or(DEFAULT_SET_ALPHA_TO_ONE);
        Ok(Self {
            final_alpha_cumprod: common.train.final_alpha_cumprod(set_alpha_to_one),
            common,
            clip_range: clip_range(config),
            step_ratio: 1,
            timestep_values: Vec::new(),
            timesteps: Tensor::from_slice::<i64>(&[]),
        })
    }
}

impl Scheduler for DdimScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        self.timestep_values = self
            .common
            .checked_integer_timesteps(NAME, num_inference_steps)?;
        let n = self.common.train.num_train_timesteps;
        self.step_ratio = (n / num_inference_steps) as i64;
        self.timesteps = Tensor::from_slice(&self.timestep_values);
        Ok(())
    }

    fn timesteps(&self) -> &Tensor {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<StepOutput, SchedulerError> {
        let t = at(&self.timestep_values, step_index, NAME)?;
        let alpha_prod_t = self.common.train.alpha_cumprod(t);
        let alpha_prod_prev = self
            .common
            .train
            .alpha_cumprod_or_final(t - self.step_ratio, self.final_alpha_cumprod);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sqrt_alpha, sqrt_beta) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        let (alpha, sigma) = (f64::from(sqrt_alpha), f64::from(sqrt_beta));
        let pred_original =
            predict_original(self.common.prediction, model_output, sample, alpha, sigma)?;
        let pred_epsilon =
            predict_epsilon(self.common.prediction, model_output, sample, alpha, sigma)?;
        let pred_original = clip_sample(pred_original, self.clip_range)?;
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
