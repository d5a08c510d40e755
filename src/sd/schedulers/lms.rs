//! LMS (diffusers `LMSDiscreteScheduler`): linear multistep on the sigma schedule, order 4,
//! with coefficients integrated exactly (the Lagrange basis polynomials have degree <= 3).
use super::common::{
    PREDICTION_TYPES, PredictionType, SPACINGS, SigmaSpacing, TimestepSpacing, TrainSchedule,
    ZeroSnr, check_steps, float_timesteps, log_sigmas, numpy_interp, sigma_init_noise, sigma_to_t,
};
use super::{Scheduler, SchedulerConfig, SchedulerError, SchedulerKind, StepOutput, at};
use tch::Tensor;

const NAME: &str = "LMSDiscreteScheduler";
const DEFAULT_SPACING: &str = "linspace";
/// diffusers `step(order=4)`: the number of past derivatives combined.
const LMS_ORDER: usize = 4;
/// 4-point Gauss-Legendre nodes/weights on [-1, 1]: exact for polynomials up to degree 7.
const GAUSS_NODES: [f64; 4] = [
    -0.861_136_311_594_052_6,
    -0.339_981_043_584_856_3,
    0.339_981_043_584_856_3,
    0.861_136_311_594_052_6,
];
const GAUSS_WEIGHTS: [f64; 4] = [
    0.347_854_845_137_453_85,
    0.652_145_154_862_546_1,
    0.652_145_154_862_546_1,
    0.347_854_845_137_453_85,
];

/// diffusers `LMSDiscreteScheduler`.
pub struct LmsScheduler {
    train: TrainSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    sigma_spacing: SigmaSpacing,
    sigma_values: Vec<f32>,
    sigmas: Tensor,
    timesteps: Tensor,
    derivatives: Vec<Tensor>,
}

impl LmsScheduler {
    /// `LMSDiscreteScheduler.from_config(config)`.
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        let sigma_spacing = SigmaSpacing::from_config(config, NAME)?;
        let train = TrainSchedule::new(config, NAME, ZeroSnr::NotAnOption)?;
        let pred = config.prediction_type.as_deref();
        let prediction =
            config.choice(NAME, "prediction_type", pred, "epsilon", PREDICTION_TYPES)?;
        let spacing = config.timestep_spacing.as_deref();
        let spacing =
            config.choice(NAME, "timestep_spacing", spacing, DEFAULT_SPACING, SPACINGS)?;
        let mut scheduler = Self {
            train,
            prediction,
            spacing,
            steps_offset: config.steps_offset.unwrap_or(0),
            sigma_spacing,
            sigma_values: Vec::new(),
            sigmas: Tensor::from_slice::<f32>(&[]),
            timesteps: Tensor::from_slice::<f32>(&[]),
            derivatives: Vec::new(),
        };
        // diffusers' __init__ calls set_timesteps(num_train_timesteps).
        scheduler.set_timesteps(scheduler.train.num_train_timesteps)?;
        Ok(scheduler)
    }

    /// diffusers `get_lms_coefficient(order, t, current_order)`: the integral over
    /// [sigma_t, sigma_{t+1}] of the Lagrange basis polynomial of point `t - current_order`.
    fn lms_coefficient(&self, order: usize, t: usize, current_order: usize) -> f64 {
        let s = |i: usize| f64::from(self.sigma_values[i]);
        let basis = |tau: f64| {
            (0..order)
                .filter(|&k| k != current_order)
                .map(|k| (tau - s(t - k)) / (s(t - current_order) - s(t - k)))
                .product::<f64>()
        };
        let (a, b) = (s(t), s(t + 1));
        let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
        GAUSS_NODES
            .iter()
            .zip(GAUSS_WEIGHTS)
            .map(|(x, w)| w * basis(mid + half * x))
            .sum::<f64>()
            * half
    }
}

/// x0 estimate of the sigma-parameterised schedulers (LMS, Euler) for prediction type `pred`.
pub(crate) fn sigma_pred_original(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor, SchedulerError> {
    Ok(match prediction {
        PredictionType::Epsilon => sample.f_sub(&model_output.f_mul_scalar(f64::from(sigma))?)?,
        PredictionType::VPrediction => {
            let scale = -sigma / (sigma * sigma + 1.0).sqrt();
            model_output
                .f_mul_scalar(f64::from(scale))?
                .f_add(&sample.f_div_scalar(f64::from(sigma * sigma + 1.0))?)?
        }
        PredictionType::Sample => model_output.shallow_clone(),
    })
}

/// `sample / sqrt(sigma**2 + 1)` (LMS/Euler/EulerA `scale_model_input`).
pub(crate) fn sigma_scale_input(sample: &Tensor, sigma: f32) -> Result<Tensor, SchedulerError> {
    Ok(sample.f_div_scalar(f64::from((sigma * sigma + 1.0).sqrt()))?)
}

/// How LMS/Euler/EulerA space their sigmas and end the schedule.
pub(crate) struct SigmaOptions {
    pub spacing: SigmaSpacing,
    /// (`sigma_min`, `sigma_max`) overrides (Euler only).
    pub bounds: (Option<f64>, Option<f64>),
    /// The appended final sigma.
    pub final_sigma: f64,
}

/// Timesteps and sigmas of LMS/Euler/EulerA for `n` steps: (float32 timesteps, sigmas + final).
pub(crate) fn sigma_schedule(
    train: &TrainSchedule,
    spacing: TimestepSpacing,
    steps_offset: i64,
    num_inference_steps: usize,
    options: &SigmaOptions,
) -> Result<(Vec<f32>, Vec<f32>), SchedulerError> {
    let n = num_inference_steps;
    let timesteps = float_timesteps(spacing, train.num_train_timesteps, n, steps_offset);
    let train_sigmas = train.train_sigmas()?;
    let interpolated: Vec<f64> = timesteps
        .iter()
        .map(|&t| numpy_interp(f64::from(t), &train_sigmas))
        .collect();
    let (timesteps, sigmas) = match options.spacing {
        SigmaSpacing::Interpolated => (timesteps, interpolated),
        respacing => {
            let sigmas = respacing.respace(&interpolated, n, options.bounds);
            let logs = log_sigmas(&train_sigmas);
            let timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &logs) as f32)
                .collect();
            (timesteps, sigmas)
        }
    };
    let sigmas = sigmas
        .into_iter()
        .chain(std::iter::once(options.final_sigma))
        .map(|sigma| sigma as f32)
        .collect();
    Ok((timesteps, sigmas))
}

impl Scheduler for LmsScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Lms
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        check_steps(NAME, num_inference_steps, self.train.num_train_timesteps)?;
        let (timesteps, sigmas) = sigma_schedule(
            &self.train,
            self.spacing,
            self.steps_offset,
            num_inference_steps,
            &SigmaOptions {
                spacing: self.sigma_spacing,
                bounds: (None, None),
                final_sigma: 0.0,
            },
        )?;
        self.timesteps = Tensor::from_slice(&timesteps);
        self.sigmas = Tensor::from_slice(&sigmas);
        self.sigma_values = sigmas;
        self.derivatives.clear();
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
        // The last step reads sigma[step_index + 1], the final 0.
        let steps = self.sigma_values.len().saturating_sub(1);
        let sigma = at(&self.sigma_values[..steps], step_index, NAME)?;
        let pred_original = sigma_pred_original(self.prediction, model_output, sample, sigma)?;
        let derivative = sample
            .f_sub(&pred_original)?
            .f_div_scalar(f64::from(sigma))?;
        self.derivatives.push(derivative);
        if self.derivatives.len() > LMS_ORDER {
            drop(self.derivatives.remove(0));
        }
        let order = (step_index + 1).min(LMS_ORDER);
        let mut update: Option<Tensor> = None;
        for (current_order, derivative) in (0..order).zip(self.derivatives.iter().rev()) {
            let coeff = self.lms_coefficient(order, step_index, current_order);
            let term = derivative.f_mul_scalar(coeff)?;
            update = Some(match update {
                Some(sum) => sum.f_add(&term)?,
                None => term,
            });
        }
        let prev_sample = match update {
            Some(update) => sample.f_add(&update)?,
            None => sample.shallow_clone(),
        };
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(pred_original),
        })
    }
}
