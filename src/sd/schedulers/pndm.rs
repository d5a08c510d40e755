//! PNDM (diffusers `PNDMScheduler`): pseudo linear multistep (PLMS). With `skip_prk_steps`
//! (the SD configs) the second timestep is repeated, so a run of N steps makes N+1 model calls;
//! without it, 12 Runge-Kutta warm-up calls (PRK) come first.
use super::common::{
    CommonConfig, PredictionType, ZeroSnr, check_steps, integer_timesteps, predict_epsilon,
};
use super::{Scheduler, SchedulerConfig, SchedulerError, SchedulerKind, StepOutput, at};
use tch::Tensor;

const NAME: &str = "PNDMScheduler";
/// diffusers PNDMScheduler defaults.
const DEFAULT_SKIP_PRK_STEPS: bool = false;
const DEFAULT_SET_ALPHA_TO_ONE: bool = false;
const DEFAULT_SPACING: &str = "leading";
/// diffusers `pndm_order`: PRK warms up on the last 4 timesteps, PLMS keeps 4 model outputs.
const PNDM_ORDER: usize = 4;
/// PRK calls per Runge-Kutta step.
const PRK_CALLS_PER_STEP: usize = 4;

const PNDM_PREDICTION_TYPES: &[(&str, PredictionType)] = &[
    ("epsilon", PredictionType::Epsilon),
    ("v_prediction", PredictionType::VPrediction),
];

/// diffusers `PNDMScheduler`.
pub struct PndmScheduler {
    common: CommonConfig,
    skip_prk_steps: bool,
    final_alpha_cumprod: f32,
    /// `num_train_timesteps // num_inference_steps`.
    step_ratio: i64,
    /// Number of leading PRK entries in `timestep_values` (0 with `skip_prk_steps`).
    prk_len: usize,
    timestep_values: Vec<i64>,
    timesteps: Tensor,
    /// Past model outputs (PLMS history; at most 4 are used).
    ets: Vec<Tensor>,
    cur_sample: Option<Tensor>,
    cur_model_output: Option<Tensor>,
}

impl PndmScheduler {
    /// `PNDMScheduler.from_config(config)`.
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        let common = CommonConfig::read(
            config,
            NAME,
            ZeroSnr::NotAnOption,
            PNDM_PREDICTION_TYPES,
            DEFAULT_SPACING,
        )?;
        let set_alpha_to_one = config.set_alpha_to_one.unwrap_or(DEFAULT_SET_ALPHA_TO_ONE);
        Ok(Self {
            final_alpha_cumprod: common.train.final_alpha_cumprod(set_alpha_to_one),
            common,
            skip_prk_steps: config.skip_prk_steps.unwrap_or(DEFAULT_SKIP_PRK_STEPS),
            step_ratio: 1,
            prk_len: 0,
            timestep_values: Vec::new(),
            timesteps: Tensor::from_slice::<i64>(&[]),
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
        })
    }

    /// PNDM's `_timesteps`: the inference timesteps in ASCENDING order.
    fn ascending_timesteps(&self, num_inference_steps: usize) -> Vec<i64> {
        let n = self.common.train.num_train_timesteps;
        let mut timesteps = integer_timesteps(
            self.common.spacing,
            n,
            num_inference_steps,
            self.common.steps_offset,
        );
        timesteps.reverse();
        timesteps
    }

    /// PRK timesteps (descending; each of the last 4 timesteps and its half-step, repeated).
    fn prk_timesteps(&self, ascending: &[i64]) -> Vec<i64> {
        let half = self.step_ratio / 2;
        let tail = &ascending[ascending.len() - PNDM_ORDER..];
        let pairs: Vec<i64> = tail.iter().flat_map(|&t| [t, t + half]).collect();
        let repeated: Vec<i64> = pairs[..pairs.len() - 1]
            .iter()
            .flat_map(|&t| [t, t])
            .collect();
        repeated[1..repeated.len() - 1]
            .iter()
            .rev()
            .copied()
            .collect()
    }

    /// diffusers `_get_prev_sample`: one PNDM transfer from `timestep` to `prev_timestep`.
    fn prev_sample(
        &self,
        sample: &Tensor,
        timestep: i64,
        prev_timestep: i64,
        model_output: &Tensor,
    ) -> Result<Tensor, SchedulerError> {
        let alpha_prod_t = self.common.train.alpha_cumprod(timestep);
        let alpha_prod_prev = self
            .common
            .train
            .alpha_cumprod_or_final(prev_timestep, self.final_alpha_cumprod);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_prev = 1.0 - alpha_prod_prev;
        // PNDM works on epsilon (its prediction types are epsilon and v).
        let model_output = predict_epsilon(
            self.common.prediction,
            model_output,
            sample,
            f64::from(alpha_prod_t.sqrt()),
            f64::from(beta_prod_t.sqrt()),
        )?;
        let sample_coeff = (alpha_prod_prev / alpha_prod_t).sqrt();
        let denominator = alpha_prod_t * beta_prod_prev.sqrt()
            + (alpha_prod_t * beta_prod_t * alpha_prod_prev).sqrt();
        let update = model_output
            .f_mul_scalar(f64::from(alpha_prod_prev - alpha_prod_t))?
            .f_div_scalar(f64::from(denominator))?;
        Ok(sample
            .f_mul_scalar(f64::from(sample_coeff))?
            .f_sub(&update)?)
    }

    /// diffusers `step_prk` (Runge-Kutta warm-up call number `counter`).
    fn step_prk(
        &mut self,
        model_output: &Tensor,
        counter: usize,
        timestep: i64,
        sample: &Tensor,
    ) -> Result<Tensor, SchedulerError> {
        let diff_to_prev = if counter % 2 == 1 {
            0
        } else {
            self.step_ratio / 2
        };
        let prev_timestep = timestep - diff_to_prev;
        let rk_timestep = self.timestep_values[counter / PRK_CALLS_PER_STEP * PRK_CALLS_PER_STEP];
        let mut model_output = model_output.shallow_clone();
        match counter % PRK_CALLS_PER_STEP {
            0 => {
                self.accumulate(&model_output, 1.0 / 6.0)?;
                self.ets.push(model_output.shallow_clone());
                self.cur_sample = Some(sample.shallow_clone());
            }
            1 | 2 => self.accumulate(&model_output, 1.0 / 3.0)?,
            _ => {
                let weighted = model_output.f_mul_scalar(1.0 / 6.0)?;
                model_output = match self.cur_model_output.take() {
                    Some(sum) => sum.f_add(&weighted)?,
                    None => weighted,
                };
            }
        }
        let cur_sample = self.cur_sample.as_ref().unwrap_or(sample).shallow_clone();
        self.prev_sample(&cur_sample, rk_timestep, prev_timestep, &model_output)
    }

    /// `cur_model_output += weight * model_output`.
    fn accumulate(&mut self, model_output: &Tensor, weight: f64) -> Result<(), SchedulerError> {
        let weighted = model_output.f_mul_scalar(weight)?;
        self.cur_model_output = Some(match self.cur_model_output.take() {
            Some(sum) => sum.f_add(&weighted)?,
            None => weighted,
        });
        Ok(())
    }

    /// diffusers `step_plms` (PLMS call number `counter`).
    fn step_plms(
        &mut self,
        model_output: &Tensor,
        counter: usize,
        mut timestep: i64,
        sample: &Tensor,
    ) -> Result<Tensor, SchedulerError> {
        let mut prev_timestep = timestep - self.step_ratio;
        if counter != 1 {
            let keep_from = self.ets.len().saturating_sub(PNDM_ORDER - 1);
            self.ets.drain(..keep_from);
            self.ets.push(model_output.shallow_clone());
        } else {
            prev_timestep = timestep;
            timestep += self.step_ratio;
        }
        let mut sample = sample.shallow_clone();
        let e = &self.ets;
        let n = e.len();
        let combined = if n == 1 && counter == 0 {
            self.cur_sample = Some(sample.shallow_clone());
            model_output.shallow_clone()
        } else if n == 1 && counter == 1 {
            if let Some(cur) = self.cur_sample.take() {
                sample = cur;
            }
            model_output.f_add(&e[0])?.f_div_scalar(2.0)?
        } else if n == 2 {
            e[1].f_mul_scalar(3.0)?.f_sub(&e[0])?.f_div_scalar(2.0)?
        } else if n == 3 {
            e[2].f_mul_scalar(23.0)?
                .f_sub(&e[1].f_mul_scalar(16.0)?)?
                .f_add(&e[0].f_mul_scalar(5.0)?)?
                .f_div_scalar(12.0)?
        } else {
            e[n - 1]
                .f_mul_scalar(55.0)?
                .f_sub(&e[n - 2].f_mul_scalar(59.0)?)?
                .f_add(&e[n - 3].f_mul_scalar(37.0)?)?
                .f_sub(&e[n - 4].f_mul_scalar(9.0)?)?
                .f_mul_scalar(1.0 / 24.0)?
        };
        self.prev_sample(&sample, timestep, prev_timestep, &combined)
    }
}

impl Scheduler for PndmScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Pndm
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        let n = self.common.train.num_train_timesteps;
        check_steps(NAME, num_inference_steps, n)?;
        if !self.skip_prk_steps && num_inference_steps < PNDM_ORDER {
            // diffusers fails here too (its PRK schedule needs the last 4 timesteps).
            return Err(SchedulerError::InvalidSteps {
                scheduler: "PNDMScheduler (skip_prk_steps = false needs at least 4 steps)",
                steps: num_inference_steps,
                max: n,
            });
        }
        self.step_ratio = (n / num_inference_steps) as i64;
        let ascending = self.ascending_timesteps(num_inference_steps);
        let (prk, plms): (Vec<i64>, Vec<i64>) = if self.skip_prk_steps {
            // _timesteps[:-1], then the second-to-last again, then the last; reversed.
            let last_two = &ascending[ascending.len().saturating_sub(2)..];
            let mut plms: Vec<i64> = ascending[..ascending.len() - 1].to_vec();
            plms.extend_from_slice(&last_two[..last_two.len() - 1]);
            plms.push(ascending[ascending.len() - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            let plms = ascending[..ascending.len() - 3]
                .iter()
                .rev()
                .copied()
                .collect();
            (self.prk_timesteps(&ascending), plms)
        };
        self.prk_len = prk.len();
        self.timestep_values = prk.into_iter().chain(plms).collect();
        self.timesteps = Tensor::from_slice(&self.timestep_values);
        self.ets.clear();
        self.cur_sample = None;
        self.cur_model_output = None;
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
        let timestep = at(&self.timestep_values, step_index, NAME)?;
        let prev_sample = if step_index < self.prk_len {
            self.step_prk(model_output, step_index, timestep, sample)?
        } else {
            self.step_plms(model_output, step_index, timestep, sample)?
        };
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: None,
        })
    }
}
