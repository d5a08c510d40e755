//! DPM-Solver multistep (diffusers `DPMSolverMultistepScheduler`; the default config is
//! DPM-Solver++ 2M: `solver_order` 2, `algorithm_type` dpmsolver++, `solver_type` midpoint,
//! `lower_order_final`). Also the first/second/third-order updates of `dpmsolver`, and the SDE
//! variants (noise from the run's seeded CPU generator, see `sd::rng`).
use super::common::{
    CommonConfig, PREDICTION_TYPES, SigmaSpacing, TimestepSpacing, ZeroSnr, check_steps,
    cpu_noise_like, log_sigmas, numpy_arange, numpy_interp, numpy_linspace, predict_epsilon,
    predict_original, sigma_to_t, with_final_sigma,
};
use super::euler::{FINAL_SIGMA_TYPES, FinalSigma};
use super::{Scheduler, SchedulerConfig, SchedulerError, SchedulerKind, StepOutput, at};
use tch::{Kind, Tensor};

const NAME: &str = "DPMSolverMultistepScheduler";
/// diffusers DPMSolverMultistepScheduler defaults.
const DEFAULT_SOLVER_ORDER: usize = 2;
const DEFAULT_SPACING: &str = "linspace";
const DEFAULT_LOWER_ORDER_FINAL: bool = true;
/// diffusers only lowers the order near the end for schedules shorter than this.
const LOWER_ORDER_FINAL_MAX_STEPS: usize = 15;
const MAX_SOLVER_ORDER: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    DpmSolverPlusPlus,
    DpmSolver,
    SdeDpmSolverPlusPlus,
    SdeDpmSolver,
}

/// `deis` is mapped to dpmsolver++ by diffusers' constructor.
const ALGORITHMS: &[(&str, Algorithm)] = &[
    ("dpmsolver++", Algorithm::DpmSolverPlusPlus),
    ("dpmsolver", Algorithm::DpmSolver),
    ("sde-dpmsolver++", Algorithm::SdeDpmSolverPlusPlus),
    ("sde-dpmsolver", Algorithm::SdeDpmSolver),
    ("deis", Algorithm::DpmSolverPlusPlus),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

/// `logrho`, `bh1`, `bh2` are mapped to midpoint by diffusers' constructor.
const SOLVER_TYPES: &[(&str, SolverType)] = &[
    ("midpoint", SolverType::Midpoint),
    ("heun", SolverType::Heun),
    ("logrho", SolverType::Midpoint),
    ("bh1", SolverType::Midpoint),
    ("bh2", SolverType::Midpoint),
];

impl Algorithm {
    fn is_data_prediction(self) -> bool {
        matches!(
            self,
            Algorithm::DpmSolverPlusPlus | Algorithm::SdeDpmSolverPlusPlus
        )
    }

    fn is_sde(self) -> bool {
        matches!(
            self,
            Algorithm::SdeDpmSolverPlusPlus | Algorithm::SdeDpmSolver
        )
    }
}

/// Per-step (alpha_t, sigma_t, lambda_t) of a sigma, in float32 as diffusers computes them.
#[derive(Debug, Clone, Copy)]
struct Point {
    alpha: f32,
    sigma: f32,
    lambda: f32,
}

impl Point {
    fn of_sigma(sigma: f32) -> Self {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        let sigma_t = sigma * alpha;
        Self {
            alpha,
            sigma: sigma_t,
            lambda: alpha.ln() - sigma_t.ln(),
        }
    }
}

/// Coefficients of `x_t = c_sample * sample + c_d0 * D0 + c_d1 * D1 + c_d2 * D2 + c_noise * noise`.
#[derive(Debug, Default)]
struct Update {
    sample: f32,
    d0: f32,
    d1: f32,
    d2: f32,
    noise: f32,
}

/// diffusers `DPMSolverMultistepScheduler` (without Karras/exponential/beta/flow sigmas).
pub struct DpmSolverMultistepScheduler {
    common: CommonConfig,
    solver_order: usize,
    algorithm: Algorithm,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma: FinalSigma,
    lambda_min_clipped: f64,
    sigma_spacing: SigmaSpacing,
    /// `beta_schedule` is squaredcos_cap_v2: Karras timesteps are then truncated, not rounded.
    cosine_schedule: bool,
    sigma_values: Vec<f32>,
    sigmas: Tensor,
    timesteps: Tensor,
    /// The last `solver_order` converted model outputs, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
}

impl DpmSolverMultistepScheduler {
    /// `DPMSolverMultistepScheduler.from_config(config)`.
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        reject_unsupported(config)?;
        let common = CommonConfig::read(
            config,
            NAME,
            ZeroSnr::RescaleAndFloorLast,
            PREDICTION_TYPES,
            DEFAULT_SPACING,
        )?;
        let algorithm = config.algorithm_type.as_deref();
        let algorithm =
            config.choice(NAME, "algorithm_type", algorithm, "dpmsolver++", ALGORITHMS)?;
        let solver = config.solver_type.as_deref();
        let solver_type = config.choice(NAME, "solver_type", solver, "midpoint", SOLVER_TYPES)?;
        let final_sigma = config.final_sigmas_type.as_deref();
        let final_sigma = config.choice(
            NAME,
            "final_sigmas_type",
            final_sigma,
            "zero",
            FINAL_SIGMA_TYPES,
        )?;
        if !algorithm.is_data_prediction() && final_sigma == FinalSigma::Zero {
            // diffusers raises the same in its constructor.
            return Err(config.unsupported(
                NAME,
                "final_sigmas_type",
                "\"zero\" with algorithm_type dpmsolver/sde-dpmsolver (use \"sigma_min\")",
            ));
        }
        let solver_order = config.solver_order.unwrap_or(DEFAULT_SOLVER_ORDER);
        if !(1..=MAX_SOLVER_ORDER).contains(&solver_order)
            || (solver_order == 3 && algorithm == Algorithm::SdeDpmSolver)
        {
            return Err(config.unsupported(NAME, "solver_order", solver_order));
        }
        Ok(Self {
            common,
            solver_order,
            algorithm,
            solver_type,
            lower_order_final: config
                .lower_order_final
                .unwrap_or(DEFAULT_LOWER_ORDER_FINAL),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            final_sigma,
            lambda_min_clipped: config.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY),
            sigma_spacing: SigmaSpacing::from_config(config, NAME)?,
            cosine_schedule: config.beta_schedule.as_deref() == Some("squaredcos_cap_v2"),
            sigma_values: Vec::new(),
            sigmas: Tensor::from_slice::<f32>(&[]),
            timesteps: Tensor::from_slice::<i64>(&[]),
            model_outputs: (0..solver_order).map(|_| None).collect(),
            lower_order_nums: 0,
        })
    }

    /// `num_train_timesteps - searchsorted(flip(lambda_t), lambda_min_clipped)`.
    fn last_timestep(&self) -> Result<usize, SchedulerError> {
        let alphas = &self.common.train.alphas_cumprod;
        let alpha_t = alphas.f_sqrt()?;
        let sigma_t = alphas.f_neg()?.f_add_scalar(1.0)?.f_sqrt()?;
        let lambda_t = alpha_t.f_log()?.f_sub(&sigma_t.f_log()?)?;
        let lambdas = Vec::<f32>::try_from(&lambda_t)?;
        let clipped = lambdas
            .iter()
            .filter(|&&lambda| f64::from(lambda) < self.lambda_min_clipped)
            .count();
        Ok(self.common.train.num_train_timesteps - clipped)
    }

    fn integer_timesteps(&self, num_inference_steps: usize) -> Result<Vec<i64>, SchedulerError> {
        let last = self.last_timestep()?;
        let n = num_inference_steps;
        Ok(match self.common.spacing {
            TimestepSpacing::Linspace => numpy_linspace(0.0, last as f64 - 1.0, n + 1)
                .into_iter()
                .rev()
                .take(n)
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = (last / (n + 1)) as i64;
                (1..=n as i64)
                    .rev()
                    .map(|i| i * ratio + self.common.steps_offset)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = self.common.train.num_train_timesteps as f64 / n as f64;
                numpy_arange(last as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| t.round_ties_even() as i64 - 1)
                    .collect()
            }
        })
    }

    /// (timesteps, sigmas without the final one) for `n` steps.
    fn schedule(&self, n: usize) -> Result<(Vec<i64>, Vec<f64>), SchedulerError> {
        let train_sigmas = self.common.train.train_sigmas()?;
        if self.sigma_spacing == SigmaSpacing::Interpolated {
            let timesteps = self.integer_timesteps(n)?;
            let sigmas = timesteps
                .iter()
                .map(|&t| numpy_interp(t as f64, &train_sigmas))
                .collect();
            return Ok((timesteps, sigmas));
        }
        let descending: Vec<f64> = train_sigmas.iter().rev().map(|&s| f64::from(s)).collect();
        let sigmas = self.sigma_spacing.respace(&descending, n, (None, None));
        let logs = log_sigmas(&train_sigmas);
        let round = self.sigma_spacing == SigmaSpacing::Karras && !self.cosine_schedule;
        let timesteps = sigmas
            .iter()
            .map(|&sigma| {
                let t = sigma_to_t(sigma, &logs);
                // diffusers rounds Karras timesteps (except for cosine betas); the int64
                // conversion then truncates.
                (if round { t.round_ties_even() } else { t }) as i64
            })
            .collect();
        Ok((timesteps, sigmas))
    }

    /// diffusers `convert_model_output`: x0 (dpmsolver++) or epsilon (dpmsolver).
    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sigma: f32,
        sample: &Tensor,
    ) -> Result<Tensor, SchedulerError> {
        let point = Point::of_sigma(sigma);
        let (alpha, sigma_t) = (f64::from(point.alpha), f64::from(point.sigma));
        if self.algorithm.is_data_prediction() {
            predict_original(self.common.prediction, model_output, sample, alpha, sigma_t)
        } else {
            predict_epsilon(self.common.prediction, model_output, sample, alpha, sigma_t)
        }
    }

    /// Coefficients of the first-order update from `s` to `t`.
    fn first_order(&self, t: Point, s: Point) -> Update {
        let h = t.lambda - s.lambda;
        match self.algorithm {
            Algorithm::DpmSolverPlusPlus => Update {
                sample: t.sigma / s.sigma,
                d0: -(t.alpha * ((-h).exp() - 1.0)),
                ..Update::default()
            },
            Algorithm::DpmSolver => Update {
                sample: t.alpha / s.alpha,
                d0: -(t.sigma * (h.exp() - 1.0)),
                ..Update::default()
            },
            Algorithm::SdeDpmSolverPlusPlus => Update {
                sample: t.sigma / s.sigma * (-h).exp(),
                d0: t.alpha * (1.0 - (-2.0 * h).exp()),
                noise: t.sigma * (1.0 - (-2.0 * h).exp()).sqrt(),
                ..Update::default()
            },
            Algorithm::SdeDpmSolver => Update {
                sample: t.alpha / s.alpha,
                d0: -(2.0 * (t.sigma * (h.exp() - 1.0))),
                noise: t.sigma * ((2.0 * h).exp() - 1.0).sqrt(),
                ..Update::default()
            },
        }
    }

    /// Coefficients of the second-order update (D1 weight; D1 itself is built by the caller).
    fn second_order(&self, t: Point, s0: Point) -> Update {
        let h = t.lambda - s0.lambda;
        let mut update = self.first_order(t, s0);
        let (em1, ep1) = ((-h).exp() - 1.0, h.exp() - 1.0);
        update.d1 = match (self.algorithm, self.solver_type) {
            (Algorithm::DpmSolverPlusPlus, SolverType::Midpoint) => -(0.5 * (t.alpha * em1)),
            (Algorithm::DpmSolverPlusPlus, SolverType::Heun) => t.alpha * (em1 / h + 1.0),
            (Algorithm::DpmSolver, SolverType::Midpoint) => -(0.5 * (t.sigma * ep1)),
            (Algorithm::DpmSolver, SolverType::Heun) => -(t.sigma * (ep1 / h - 1.0)),
            (Algorithm::SdeDpmSolverPlusPlus, SolverType::Midpoint) => {
                0.5 * (t.alpha * (1.0 - (-2.0 * h).exp()))
            }
            (Algorithm::SdeDpmSolverPlusPlus, SolverType::Heun) => {
                t.alpha * ((1.0 - (-2.0 * h).exp()) / (-2.0 * h) + 1.0)
            }
            (Algorithm::SdeDpmSolver, SolverType::Midpoint) => -(t.sigma * ep1),
            (Algorithm::SdeDpmSolver, SolverType::Heun) => -(2.0 * (t.sigma * (ep1 / h - 1.0))),
        };
        update
    }

    /// Coefficients of the third-order update.
    fn third_order(&self, t: Point, s0: Point) -> Update {
        let h = t.lambda - s0.lambda;
        let mut update = self.first_order(t, s0);
        let (em1, ep1) = ((-h).exp() - 1.0, h.exp() - 1.0);
        match self.algorithm {
            Algorithm::DpmSolver => {
                update.d1 = -(t.sigma * (ep1 / h - 1.0));
                update.d2 = -(t.sigma * ((h.exp() - 1.0 - h) / (h * h) - 0.5));
            }
            Algorithm::SdeDpmSolverPlusPlus => {
                let e2 = 1.0 - (-2.0 * h).exp();
                update.d1 = t.alpha * (e2 / (-2.0 * h) + 1.0);
                let two_h = 2.0 * h;
                update.d2 = t.alpha * (((1.0 - (-2.0 * h).exp()) - two_h) / (two_h * two_h) - 0.5);
            }
            _ => {
                update.d1 = t.alpha * (em1 / h + 1.0);
                update.d2 = -(t.alpha * (((-h).exp() - 1.0 + h) / (h * h) - 0.5));
            }
        }
        update
    }

    /// The update's order at `step_index` (diffusers' lower_order_final / warm-up rules).
    fn order_at(&self, step_index: usize, num_steps: usize) -> usize {
        let short = num_steps < LOWER_ORDER_FINAL_MAX_STEPS;
        let final_lower = step_index + 1 == num_steps
            && (self.euler_at_final
                || (self.lower_order_final && short)
                || self.final_sigma == FinalSigma::Zero);
        let second_lower = step_index + 2 == num_steps && self.lower_order_final && short;
        if self.solver_order == 1 || self.lower_order_nums < 1 || final_lower {
            1
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || second_lower {
            2
        } else {
            3
        }
    }

    /// Model output number `back` steps ago (0 = this step).
    fn history(&self, back: usize) -> Result<&Tensor, SchedulerError> {
        let index = self.model_outputs.len().checked_sub(back + 1);
        index
            .and_then(|i| self.model_outputs[i].as_ref())
            .ok_or(SchedulerError::StepIndex {
                scheduler: NAME,
                index: back,
                len: self.model_outputs.len(),
            })
    }

    /// (D0, D1, D2) of diffusers' multistep updates for the given order.
    fn differences(
        &self,
        order: usize,
        step_index: usize,
        h: f32,
        s0: Point,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>), SchedulerError> {
        let m0 = self.history(0)?;
        if order == 1 {
            return Ok((m0.shallow_clone(), None, None));
        }
        let earlier = |back: usize| {
            let index = step_index.checked_sub(back).unwrap_or(usize::MAX);
            at(&self.sigma_values, index, NAME).map(Point::of_sigma)
        };
        let s1 = earlier(1)?;
        let m1 = self.history(1)?;
        let r0 = (s0.lambda - s1.lambda) / h;
        let d1_0 = m0.f_sub(m1)?.f_mul_scalar(f64::from(1.0 / r0))?;
        if order == 2 {
            return Ok((m0.shallow_clone(), Some(d1_0), None));
        }
        let s2 = earlier(2)?;
        let m2 = self.history(2)?;
        let r1 = (s1.lambda - s2.lambda) / h;
        let d1_1 = m1.f_sub(m2)?.f_mul_scalar(f64::from(1.0 / r1))?;
        let diff = d1_0.f_sub(&d1_1)?;
        let d1 = d1_0.f_add(&diff.f_mul_scalar(f64::from(r0 / (r0 + r1)))?)?;
        let d2 = diff.f_mul_scalar(f64::from(1.0 / (r0 + r1)))?;
        Ok((m0.shallow_clone(), Some(d1), Some(d2)))
    }
}

fn reject_unsupported(config: &SchedulerConfig) -> Result<(), SchedulerError> {
    config.reject_true(
        NAME,
        &[
            ("thresholding", config.thresholding),
            ("use_lu_lambdas", config.use_lu_lambdas),
            ("use_flow_sigmas", config.use_flow_sigmas),
            ("use_dynamic_shifting", config.use_dynamic_shifting),
        ],
    )?;
    if let Some(variance_type) = &config.variance_type {
        return Err(config.unsupported(NAME, "variance_type", format!("\"{variance_type}\"")));
    }
    Ok(())
}

/// `sample*c_sample + D0*c_d0 + D1*c_d1 + D2*c_d2 + noise*c_noise`, left to right.
fn combine(
    update: &Update,
    sample: &Tensor,
    d: (&Tensor, Option<&Tensor>, Option<&Tensor>),
    noise: Option<&Tensor>,
) -> Result<Tensor, SchedulerError> {
    let mut x = sample
        .f_mul_scalar(f64::from(update.sample))?
        .f_add(&d.0.f_mul_scalar(f64::from(update.d0))?)?;
    for (term, coeff) in [(d.1, update.d1), (d.2, update.d2), (noise, update.noise)] {
        if let Some(term) = term {
            x = x.f_add(&term.f_mul_scalar(f64::from(coeff))?)?;
        }
    }
    Ok(x)
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::DpmSolverMultistep
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        check_steps(
            NAME,
            num_inference_steps,
            self.common.train.num_train_timesteps,
        )?;
        let (timesteps, sigmas) = self.schedule(num_inference_steps)?;
        let sigmas = with_final_sigma(sigmas, self.final_sigma.value(&self.common.train));
        self.timesteps = Tensor::from_slice(&timesteps).f_to_kind(Kind::Int64)?;
        self.sigmas = Tensor::from_slice(&sigmas);
        self.sigma_values = sigmas;
        self.model_outputs = (0..self.solver_order).map(|_| None).collect();
        self.lower_order_nums = 0;
        Ok(())
    }

    fn timesteps(&self) -> &Tensor {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&Tensor> {
        Some(&self.sigmas)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<StepOutput, SchedulerError> {
        let num_steps = self.sigma_values.len().saturating_sub(1);
        let sigma_s0 = at(&self.sigma_values[..num_steps], step_index, NAME)?;
        let sigma_t = at(&self.sigma_values, step_index + 1, NAME)?;
        let order = self.order_at(step_index, num_steps);
        let converted = self.convert_model_output(model_output, sigma_s0, sample)?;
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(converted));
        let noise = match self.algorithm.is_sde() {
            true => Some(cpu_noise_like(model_output)?),
            false => None,
        };
        let (t, s0) = (Point::of_sigma(sigma_t), Point::of_sigma(sigma_s0));
        let update = match order {
            1 => self.first_order(t, s0),
            2 => self.second_order(t, s0),
            _ => self.third_order(t, s0),
        };
        let (d0, d1, d2) = self.differences(order, step_index, t.lambda - s0.lambda, s0)?;
        let prev_sample = combine(
            &update,
            &sample.f_to_kind(Kind::Float)?,
            (&d0, d1.as_ref(), d2.as_ref()),
            noise.as_ref(),
        )?
        .f_to_kind(model_output.kind())?;
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: None,
        })
    }
}
