//! DDPM (diffusers `DDPMScheduler`): ancestral sampling with fixed variances, plus the
//! training-time helpers `add_noise` (forward diffusion) and `get_velocity` (v-prediction target).
use super::common::{
    CommonConfig, PREDICTION_TYPES, ZeroSnr, clip_range, clip_sample, cpu_noise_like,
    predict_original,
};
use super::{Scheduler, SchedulerConfig, SchedulerError, SchedulerKind, StepOutput, at};
use tch::Tensor;

const NAME: &str = "DDPMScheduler";
/// diffusers DDPMScheduler defaults.
const DEFAULT_SPACING: &str = "leading";
const DEFAULT_VARIANCE_TYPE: &str = "fixed_small";
/// `_get_variance` clamps the posterior variance to at least this.
const MIN_VARIANCE: f32 = 1e-20;

/// The posterior variance choices this port implements (`variance_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VarianceType {
    Small,
    SmallLog,
    Large,
}

const VARIANCE_TYPES: &[(&str, VarianceType)] = &[
    ("fixed_small", VarianceType::Small),
    ("fixed_small_log", VarianceType::SmallLog),
    ("fixed_large", VarianceType::Large),
];

/// diffusers `DDPMScheduler`.
pub struct DdpmScheduler {
    common: CommonConfig,
    clip_range: Option<f64>,
    variance: VarianceType,
    timestep_values: Vec<i64>,
    timesteps: Tensor,
}

impl DdpmScheduler {
    /// `DDPMScheduler.from_config(config)` (timesteps = all training timesteps until
    /// `set_timesteps`).
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        config.reject_true(NAME, &[("thresholding", config.thresholding)])?;
        let common = CommonConfig::read(
            config,
            NAME,
            ZeroSnr::RescaleBetas,
            PREDICTION_TYPES,
            DEFAULT_SPACING,
        )?;
        let variance = config.variance_type.as_deref();
        let variance = config.choice(
            NAME,
            "variance_type",
            variance,
            DEFAULT_VARIANCE_TYPE,
            VARIANCE_TYPES,
        )?;
        let timestep_values: Vec<i64> =
            (0..common.train.num_train_timesteps as i64).rev().collect();
        Ok(Self {
            timesteps: Tensor::from_slice(&timestep_values),
            timestep_values,
            common,
            clip_range: clip_range(config),
            variance,
        })
    }

    /// The training betas (float32, length num_train_timesteps).
    pub fn betas(&self) -> &Tensor {
        &self.common.train.betas
    }

    /// Cumulative products of (1 - beta) (float32, length num_train_timesteps).
    pub fn alphas_cumprod(&self) -> &Tensor {
        &self.common.train.alphas_cumprod
    }

    /// Number of training timesteps (valid timesteps are `0..n`).
    pub fn num_train_timesteps(&self) -> usize {
        self.common.train.num_train_timesteps
    }

    /// Forward diffusion: `sqrt(acp[t]) * original + sqrt(1 - acp[t]) * noise`, one timestep
    /// (int64 tensor) per batch item.
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timesteps: &Tensor,
    ) -> Result<Tensor, SchedulerError> {
        let (sqrt_alpha, sqrt_one_minus_alpha) = self.batch_coefficients(original, timesteps)?;
        Ok(original
            .f_mul(&sqrt_alpha)?
            .f_add(&noise.f_mul(&sqrt_one_minus_alpha)?)?)
    }

    /// The v-prediction target: `sqrt(acp[t]) * noise - sqrt(1 - acp[t]) * sample`.
    pub fn get_velocity(
        &self,
        sample: &Tensor,
        noise: &Tensor,
        timesteps: &Tensor,
    ) -> Result<Tensor, SchedulerError> {
        let (sqrt_alpha, sqrt_one_minus_alpha) = self.batch_coefficients(sample, timesteps)?;
        Ok(noise
            .f_mul(&sqrt_alpha)?
            .f_sub(&sample.f_mul(&sqrt_one_minus_alpha)?)?)
    }

    /// (sqrt(acp[t]), sqrt(1 - acp[t])) shaped [batch, 1, 1, ...] to broadcast over `like`.
    fn batch_coefficients(
        &self,
        like: &Tensor,
        timesteps: &Tensor,
    ) -> Result<(Tensor, Tensor), SchedulerError> {
        let alphas = self
            .common
            .train
            .alphas_cumprod
            .f_to_device(like.device())?
            .f_to_kind(like.kind())?;
        let picked = alphas.f_index_select(0, &timesteps.f_to_device(like.device())?)?;
        let mut shape = vec![-1i64];
        shape.resize(like.dim().max(1), 1);
        let sqrt_alpha = picked.f_sqrt()?.f_reshape(&shape)?;
        let one_minus = picked.f_neg()?.f_add_scalar(1.0)?;
        let sqrt_one_minus_alpha = one_minus.f_sqrt()?.f_reshape(&shape)?;
        Ok((sqrt_alpha, sqrt_one_minus_alpha))
    }

    /// alphas_cumprod at the step after `step_index` (1.0 after the last step).
    fn previous_alpha_cumprod(&self, step_index: usize) -> f32 {
        match self.timestep_values.get(step_index + 1) {
            Some(&prev) if prev >= 0 => self.common.train.alpha_cumprod(prev),
            _ => 1.0,
        }
    }

    /// The noise scale for this step (`_get_variance`, then the variance type's transform).
    fn noise_scale(&self, alpha_prod_t: f32, alpha_prod_prev: f32) -> f32 {
        let current_beta = 1.0 - alpha_prod_t / alpha_prod_prev;
        let variance =
            ((1.0 - alpha_prod_prev) / (1.0 - alpha_prod_t) * current_beta).max(MIN_VARIANCE);
        match self.variance {
            VarianceType::Small => variance.sqrt(),
            VarianceType::SmallLog => (0.5 * variance.ln()).exp(),
            VarianceType::Large => current_beta.sqrt(),
        }
    }
}

impl Scheduler for DdpmScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddpm
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        self.timestep_values = self
            .common
            .checked_integer_timesteps(NAME, num_inference_steps)?;
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
        let alpha_prod_prev = self.previous_alpha_cumprod(step_index);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_prev = 1.0 - alpha_prod_prev;
        let current_alpha = alpha_prod_t / alpha_prod_prev;
        let current_beta = 1.0 - current_alpha;
        let (alpha, sigma) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        let pred_original = predict_original(
            self.common.prediction,
            model_output,
            sample,
            f64::from(alpha),
            f64::from(sigma),
        )?;
        let pred_original = clip_sample(pred_original, self.clip_range)?;
        let original_coeff = alpha_prod_prev.sqrt() * current_beta / beta_prod_t;
        let sample_coeff = current_alpha.sqrt() * beta_prod_prev / beta_prod_t;
        let mut prev_sample = pred_original
            .f_mul_scalar(f64::from(original_coeff))?
            .f_add(&sample.f_mul_scalar(f64::from(sample_coeff))?)?;
        if t > 0 {
            let noise = cpu_noise_like(model_output)?.f_to_kind(model_output.kind())?;
            let scale = self.noise_scale(alpha_prod_t, alpha_prod_prev);
            prev_sample = prev_sample.f_add(&noise.f_mul_scalar(f64::from(scale))?)?;
        }
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(pred_original),
        })
    }
}
