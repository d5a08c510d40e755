//! LMS (diffusers `LMSDiscreteScheduler`): linear multistep on the sigma schedule, order 4,
//! with coefficients integrated exactly (the Lagrange basis polynomials have degree <= 3).
use super::common::{CommonConfig, PREDICTION_TYPES, SigmaSpacing, ZeroSnr};
use super::sigma::{SigmaOptions, SigmaSchedule, SigmaScheduler, ode_derivative};
use super::{SchedulerConfig, SchedulerError, SchedulerKind, StepOutput, at};
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
    schedule: SigmaSchedule,
    derivatives: Vec<Tensor>,
}

impl LmsScheduler {
    /// `LMSDiscreteScheduler.from_config(config)`.
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        let sigma_spacing = SigmaSpacing::from_config(config, NAME)?;
        let common = CommonConfig::read(
            config,
            NAME,
            ZeroSnr::NotAnOption,
            PREDICTION_TYPES,
            DEFAULT_SPACING,
        )?;
        let options = SigmaOptions {
            spacing: sigma_spacing,
            bounds: (None, None),
            final_sigma: 0.0,
        };
        Ok(Self {
            schedule: SigmaSchedule::new(NAME, common, options)?,
            derivatives: Vec::new(),
        })
    }

    /// diffusers `get_lms_coefficient(order, t, current_order)`: the integral over
    /// [sigma_t, sigma_{t+1}] of the Lagrange basis polynomial of point `t - current_order`.
    fn lms_coefficient(&self, order: usize, t: usize, current_order: usize) -> f64 {
        let s = |i: usize| f64::from(self.schedule.values()[i]);
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

impl SigmaScheduler for LmsScheduler {
    const NAME: &'static str = NAME;
    const KIND: SchedulerKind = SchedulerKind::Lms;

    fn schedule(&self) -> &SigmaSchedule {
        &self.schedule
    }

    fn schedule_mut(&mut self) -> &mut SigmaSchedule {
        &mut self.schedule
    }

    fn clear_history(&mut self) {
        self.derivatives.clear();
    }

    fn sigma_step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<StepOutput, SchedulerError> {
        // The last step reads sigma[step_index + 1], the final 0.
        let sigmas = self.schedule.values();
        let sigma = at(&sigmas[..sigmas.len().saturating_sub(1)], step_index, NAME)?;
        let pred_original = self
            .schedule
            .predict_original(model_output, sample, sigma)?;
        let derivative = ode_derivative(sample, &pred_original, sigma)?;
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
