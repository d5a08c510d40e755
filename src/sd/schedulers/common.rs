//! What all schedulers share: the training noise schedule (betas, alphas_cumprod) built exactly
//! as diffusers builds it (torch float32 ops), the option enums, and the numpy helpers
//! (`linspace`, `arange`, `interp`, round-half-even) the timestep spacings are made of.
use super::SchedulerError;
use super::config::SchedulerConfig;
use tch::{Device, Kind, Tensor};

/// diffusers' defaults for the training schedule (every scheduler's `__init__` signature).
const DEFAULT_NUM_TRAIN_TIMESTEPS: usize = 1000;
const DEFAULT_BETA_START: f64 = 0.0001;
const DEFAULT_BETA_END: f64 = 0.02;
const DEFAULT_BETA_SCHEDULE: &str = "linear";
/// `betas_for_alpha_bar`'s cap on each beta (diffusers `max_beta=0.999`).
const MAX_BETA: f64 = 0.999;
/// Euler/EulerA/DPM set the last alphas_cumprod to 2**-24 under zero-terminal-SNR rescaling.
const ZERO_SNR_LAST_ALPHA_CUMPROD: f64 = 1.0 / 16_777_216.0;
/// diffusers' default `prediction_type` and `steps_offset` (every scheduler's `__init__`).
const DEFAULT_PREDICTION_TYPE: &str = "epsilon";
const DEFAULT_STEPS_OFFSET: i64 = 0;
/// diffusers DDPM/DDIM defaults for `clip_sample` / `clip_sample_range`.
const DEFAULT_CLIP_SAMPLE: bool = true;
const DEFAULT_CLIP_SAMPLE_RANGE: f64 = 1.0;

/// What the model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

/// How inference timesteps are spread over the training range (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Linspace,
    Trailing,
}

pub(crate) const PREDICTION_TYPES: &[(&str, PredictionType)] = &[
    ("epsilon", PredictionType::Epsilon),
    ("v_prediction", PredictionType::VPrediction),
    ("sample", PredictionType::Sample),
];

pub(crate) const SPACINGS: &[(&str, TimestepSpacing)] = &[
    ("leading", TimestepSpacing::Leading),
    ("linspace", TimestepSpacing::Linspace),
    ("trailing", TimestepSpacing::Trailing),
];

#[derive(Debug, Clone, Copy)]
enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCosCapV2,
}

const BETA_SCHEDULES: &[(&str, BetaSchedule)] = &[
    ("linear", BetaSchedule::Linear),
    ("scaled_linear", BetaSchedule::ScaledLinear),
    ("squaredcos_cap_v2", BetaSchedule::SquaredCosCapV2),
];

/// Whether a scheduler class knows `rescale_betas_zero_snr`, and what it does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroSnr {
    /// The class has no such option (PNDM, LMS): the key is ignored.
    NotAnOption,
    /// Rescale the betas (DDPM, DDIM).
    RescaleBetas,
    /// Rescale, then set the last alphas_cumprod to 2**-24 (Euler, EulerA, DPM-Solver).
    RescaleAndFloorLast,
}

/// The training noise schedule: betas and their cumulative alpha product (float32, CPU).
pub(crate) struct TrainSchedule {
    pub num_train_timesteps: usize,
    pub betas: Tensor,
    pub alphas_cumprod: Tensor,
    /// `alphas_cumprod` as numbers, for the per-step scalar math.
    pub alphas_cumprod_values: Vec<f32>,
}

impl TrainSchedule {
    pub fn new(
        config: &SchedulerConfig,
        scheduler: &'static str,
        zero_snr: ZeroSnr,
    ) -> Result<Self, SchedulerError> {
        let num_train_timesteps = config
            .num_train_timesteps
            .unwrap_or(DEFAULT_NUM_TRAIN_TIMESTEPS);
        if num_train_timesteps < 2 {
            return Err(config.unsupported(scheduler, "num_train_timesteps", num_train_timesteps));
        }
        let mut betas = match &config.trained_betas {
            Some(values) => trained_betas(config, scheduler, values, num_train_timesteps)?,
            None => schedule_betas(config, scheduler, num_train_timesteps)?,
        };
        let rescale = config.rescale_betas_zero_snr == Some(true);
        if rescale && zero_snr != ZeroSnr::NotAnOption {
            betas = rescale_zero_terminal_snr(&betas)?;
        }
        let alphas = betas.f_neg()?.f_add_scalar(1.0)?;
        let alphas_cumprod = alphas.f_cumprod(0, Kind::Float)?;
        if rescale && zero_snr == ZeroSnr::RescaleAndFloorLast {
            let _last_filled = alphas_cumprod
                .f_get(num_train_timesteps as i64 - 1)?
                .f_fill_(ZERO_SNR_LAST_ALPHA_CUMPROD)?;
        }
        let alphas_cumprod_values = Vec::<f32>::try_from(&alphas_cumprod)?;
        Ok(Self {
            num_train_timesteps,
            betas,
            alphas_cumprod,
            alphas_cumprod_values,
        })
    }

    /// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32 (the Karras-style sigmas of
    /// every training timestep, index = timestep).
    pub fn train_sigmas(&self) -> Result<Vec<f32>, SchedulerError> {
        let one_minus = self.alphas_cumprod.f_neg()?.f_add_scalar(1.0)?;
        let sigmas = one_minus.f_div(&self.alphas_cumprod)?.f_sqrt()?;
        Ok(Vec::<f32>::try_from(&sigmas)?)
    }

    /// alphas_cumprod[t] as float32.
    pub fn alpha_cumprod(&self, timestep: i64) -> f32 {
        self.alphas_cumprod_values[timestep as usize]
    }

    /// DDIM/PNDM's alphas_cumprod "before" timestep 0 (`set_alpha_to_one`): 1.0 or
    /// alphas_cumprod[0].
    pub fn final_alpha_cumprod(&self, set_alpha_to_one: bool) -> f32 {
        if set_alpha_to_one {
            1.0
        } else {
            self.alpha_cumprod(0)
        }
    }

    /// alphas_cumprod[t], or `final_alpha_cumprod` for a timestep before 0.
    pub fn alpha_cumprod_or_final(&self, timestep: i64, final_alpha_cumprod: f32) -> f32 {
        if timestep >= 0 {
            self.alpha_cumprod(timestep)
        } else {
            final_alpha_cumprod
        }
    }
}

/// The options every scheduler reads alike: the training schedule, `prediction_type`,
/// `timestep_spacing` (whose default differs per class) and `steps_offset`.
pub(crate) struct CommonConfig {
    pub train: TrainSchedule,
    pub prediction: PredictionType,
    pub spacing: TimestepSpacing,
    pub steps_offset: i64,
}

impl CommonConfig {
    /// Reads them in diffusers' order (betas first), allowing `prediction_types`.
    pub fn read(
        config: &SchedulerConfig,
        scheduler: &'static str,
        zero_snr: ZeroSnr,
        prediction_types: &[(&str, PredictionType)],
        default_spacing: &str,
    ) -> Result<Self, SchedulerError> {
        let train = TrainSchedule::new(config, scheduler, zero_snr)?;
        let prediction = config.choice(
            scheduler,
            "prediction_type",
            config.prediction_type.as_deref(),
            DEFAULT_PREDICTION_TYPE,
            prediction_types,
        )?;
        let spacing = config.choice(
            scheduler,
            "timestep_spacing",
            config.timestep_spacing.as_deref(),
            default_spacing,
            SPACINGS,
        )?;
        Ok(Self {
            train,
            prediction,
            spacing,
            steps_offset: config.steps_offset.unwrap_or(DEFAULT_STEPS_OFFSET),
        })
    }

    /// DDPM/DDIM `set_timesteps`: checks the step count, then the integer timesteps, descending.
    pub fn checked_integer_timesteps(
        &self,
        scheduler: &'static str,
        num_inference_steps: usize,
    ) -> Result<Vec<i64>, SchedulerError> {
        let n = self.train.num_train_timesteps;
        check_steps(scheduler, num_inference_steps, n)?;
        Ok(integer_timesteps(
            self.spacing,
            n,
            num_inference_steps,
            self.steps_offset,
        ))
    }
}

/// DDPM/DDIM's `clip_sample` / `clip_sample_range`: the x0 clamp range, `None` when off.
pub(crate) fn clip_range(config: &SchedulerConfig) -> Option<f64> {
    let clip = config.clip_sample.unwrap_or(DEFAULT_CLIP_SAMPLE);
    let range = config
        .clip_sample_range
        .unwrap_or(DEFAULT_CLIP_SAMPLE_RANGE);
    clip.then_some(range)
}

/// `x0.clamp(-range, range)` where clipping is on.
pub(crate) fn clip_sample(x0: Tensor, range: Option<f64>) -> Result<Tensor, SchedulerError> {
    Ok(match range {
        Some(range) => x0.f_clamp(-range, range)?,
        None => x0,
    })
}

/// The clean-sample estimate x0 from the model output, where `sample = alpha * x0 + sigma * eps`
/// (DDPM/DDIM: alpha = sqrt(acp), sigma = sqrt(1 - acp); DPM-Solver: its alpha_t, sigma_t).
pub(crate) fn predict_original(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha: f64,
    sigma: f64,
) -> Result<Tensor, SchedulerError> {
    Ok(match prediction {
        PredictionType::Epsilon => sample
            .f_sub(&model_output.f_mul_scalar(sigma)?)?
            .f_div_scalar(alpha)?,
        PredictionType::Sample => model_output.shallow_clone(),
        PredictionType::VPrediction => sample
            .f_mul_scalar(alpha)?
            .f_sub(&model_output.f_mul_scalar(sigma)?)?,
    })
}

/// The noise estimate eps from the model output, with `alpha`, `sigma` as in `predict_original`.
pub(crate) fn predict_epsilon(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha: f64,
    sigma: f64,
) -> Result<Tensor, SchedulerError> {
    Ok(match prediction {
        PredictionType::Epsilon => model_output.shallow_clone(),
        PredictionType::Sample => sample
            .f_sub(&model_output.f_mul_scalar(alpha)?)?
            .f_div_scalar(sigma)?,
        PredictionType::VPrediction => model_output
            .f_mul_scalar(alpha)?
            .f_add(&sample.f_mul_scalar(sigma)?)?,
    })
}

/// Appends the final sigma and narrows the schedule to float32 (as diffusers' `np.concatenate`
/// then `astype(np.float32)`).
pub(crate) fn with_final_sigma(sigmas: Vec<f64>, final_sigma: f64) -> Vec<f32> {
    sigmas
        .into_iter()
        .chain(std::iter::once(final_sigma))
        .map(|sigma| sigma as f32)
        .collect()
}

fn trained_betas(
    config: &SchedulerConfig,
    scheduler: &'static str,
    values: &[f64],
    num_train_timesteps: usize,
) -> Result<Tensor, SchedulerError> {
    if values.len() != num_train_timesteps {
        return Err(config.unsupported(
            scheduler,
            "trained_betas",
            format!(
                "a list of {} values (num_train_timesteps is {num_train_timesteps})",
                values.len()
            ),
        ));
    }
    Ok(Tensor::from_slice(values).f_to_kind(Kind::Float)?)
}

fn schedule_betas(
    config: &SchedulerConfig,
    scheduler: &'static str,
    num_train_timesteps: usize,
) -> Result<Tensor, SchedulerError> {
    let schedule = config.choice(
        scheduler,
        "beta_schedule",
        config.beta_schedule.as_deref(),
        DEFAULT_BETA_SCHEDULE,
        BETA_SCHEDULES,
    )?;
    let start = config.beta_start.unwrap_or(DEFAULT_BETA_START);
    let end = config.beta_end.unwrap_or(DEFAULT_BETA_END);
    let steps = num_train_timesteps as i64;
    let options = (Kind::Float, Device::Cpu);
    Ok(match schedule {
        BetaSchedule::Linear => Tensor::f_linspace(start, end, steps, options)?,
        BetaSchedule::ScaledLinear => {
            Tensor::f_linspace(start.sqrt(), end.sqrt(), steps, options)?.f_pow_tensor_scalar(2)?
        }
        BetaSchedule::SquaredCosCapV2 => {
            Tensor::from_slice(&cosine_betas(num_train_timesteps)).f_to_kind(Kind::Float)?
        }
    })
}

/// diffusers `betas_for_alpha_bar(n)` with the cosine alpha_bar (Python float64 math).
fn cosine_betas(num_train_timesteps: usize) -> Vec<f64> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..num_train_timesteps)
        .map(|i| {
            let t1 = i as f64 / num_train_timesteps as f64;
            let t2 = (i + 1) as f64 / num_train_timesteps as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(MAX_BETA)
        })
        .collect()
}

/// diffusers `rescale_zero_terminal_snr` (float32 tensor ops).
fn rescale_zero_terminal_snr(betas: &Tensor) -> Result<Tensor, SchedulerError> {
    let alphas = betas.f_neg()?.f_add_scalar(1.0)?;
    let sqrt_cumprod = alphas.f_cumprod(0, Kind::Float)?.f_sqrt()?;
    let first = sqrt_cumprod.f_get(0)?.f_detach_copy()?;
    let last = sqrt_cumprod.f_get(-1)?.f_detach_copy()?;
    let scale = first.f_div(&first.f_sub(&last)?)?;
    let shifted = sqrt_cumprod.f_sub(&last)?.f_mul(&scale)?;
    let alphas_bar = shifted.f_pow_tensor_scalar(2)?;
    let n = alphas_bar.size()[0];
    let ratios = alphas_bar
        .f_narrow(0, 1, n - 1)?
        .f_div(&alphas_bar.f_narrow(0, 0, n - 1)?)?;
    let alphas = Tensor::f_cat(&[alphas_bar.f_narrow(0, 0, 1)?, ratios], 0)?;
    Ok(alphas.f_neg()?.f_add_scalar(1.0)?)
}

/// `np.linspace(start, stop, num)` (float64, endpoint included).
pub(crate) fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if let Some(last) = values.last_mut() {
        *last = stop;
    }
    values
}

/// `np.arange(start, stop, step)` for a float step (numpy fills `start + i * delta`, with
/// `delta = (start + step) - start`).
pub(crate) fn numpy_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, arange(len(table)), table)` in float64.
pub(crate) fn numpy_interp(x: f64, table: &[f32]) -> f64 {
    let last = table.len() - 1;
    if x <= 0.0 {
        return f64::from(table[0]);
    }
    if x >= last as f64 {
        return f64::from(table[last]);
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return f64::from(table[j]);
    }
    let slope = f64::from(table[j + 1]) - f64::from(table[j]);
    slope * (x - j as f64) + f64::from(table[j])
}

/// The inference timesteps for `timestep_spacing`, descending, before the scheduler's cast
/// (only `linspace` yields fractions; the others are whole numbers).
fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: i64,
) -> Vec<f64> {
    let train = num_train_timesteps as f64;
    match spacing {
        TimestepSpacing::Linspace => numpy_linspace(0.0, train - 1.0, num_inference_steps)
            .into_iter()
            .rev()
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = (num_train_timesteps / num_inference_steps) as i64;
            (0..num_inference_steps as i64)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            numpy_arange(train, 0.0, -(train / num_inference_steps as f64))
                .into_iter()
                .map(|t| t.round_ties_even() - 1.0)
                .collect()
        }
    }
}

/// Integer timesteps of DDPM/DDIM/PNDM (`set_timesteps` without custom timesteps), descending;
/// linspace rounds half to even like numpy.
pub(crate) fn integer_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: i64,
) -> Vec<i64> {
    spaced_timesteps(
        spacing,
        num_train_timesteps,
        num_inference_steps,
        steps_offset,
    )
    .into_iter()
    .map(|t| t.round_ties_even() as i64)
    .collect()
}

/// Float timesteps of LMS/Euler/EulerAncestral (numpy float32), descending.
pub(crate) fn float_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: i64,
) -> Vec<f32> {
    spaced_timesteps(
        spacing,
        num_train_timesteps,
        num_inference_steps,
        steps_offset,
    )
    .into_iter()
    .map(|t| t as f32)
    .collect()
}

/// diffusers' `_convert_to_karras` exponent (rho = 7, "the value used in the paper").
const KARRAS_RHO: f64 = 7.0;
/// `_sigma_to_t` floors sigma at this before taking its log.
const MIN_SIGMA_FOR_LOG: f64 = 1e-10;

/// How the inference sigmas are spaced (`use_karras_sigmas` / `use_exponential_sigmas`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SigmaSpacing {
    /// The training sigmas at the spaced timesteps.
    Interpolated,
    /// Karras et al. (2022) rho-spacing between sigma_max and sigma_min.
    Karras,
    /// Log-linear spacing between sigma_max and sigma_min.
    Exponential,
}

impl SigmaSpacing {
    /// Reads the `use_*_sigmas` flags; `use_beta_sigmas` (scipy's beta ppf) is not ported and
    /// setting more than one flag is an error, as in diffusers.
    pub(crate) fn from_config(
        config: &SchedulerConfig,
        scheduler: &'static str,
    ) -> Result<Self, SchedulerError> {
        config.reject_true(scheduler, &[("use_beta_sigmas", config.use_beta_sigmas)])?;
        let karras = config.use_karras_sigmas == Some(true);
        let exponential = config.use_exponential_sigmas == Some(true);
        match (karras, exponential) {
            (true, true) => Err(config.unsupported(
                scheduler,
                "use_exponential_sigmas",
                "true together with use_karras_sigmas (diffusers allows only one)",
            )),
            (true, false) => Ok(Self::Karras),
            (false, true) => Ok(Self::Exponential),
            (false, false) => Ok(Self::Interpolated),
        }
    }

    /// Respaces descending `in_sigmas` into `n` sigmas (float64), with optional bounds
    /// (`sigma_min`/`sigma_max`, which only Euler's config carries).
    pub(crate) fn respace(
        self,
        in_sigmas: &[f64],
        n: usize,
        bounds: (Option<f64>, Option<f64>),
    ) -> Vec<f64> {
        let sigma_min = bounds.0.unwrap_or(in_sigmas[in_sigmas.len() - 1]);
        let sigma_max = bounds.1.unwrap_or(in_sigmas[0]);
        match self {
            Self::Interpolated => in_sigmas.to_vec(),
            Self::Karras => {
                let min_inv_rho = sigma_min.powf(1.0 / KARRAS_RHO);
                let max_inv_rho = sigma_max.powf(1.0 / KARRAS_RHO);
                numpy_linspace(0.0, 1.0, n)
                    .into_iter()
                    .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(KARRAS_RHO))
                    .collect()
            }
            Self::Exponential => numpy_linspace(sigma_max.ln(), sigma_min.ln(), n)
                .into_iter()
                .map(f64::exp)
                .collect(),
        }
    }
}

/// diffusers `_sigma_to_t`: the fractional training timestep whose sigma is `sigma`, by linear
/// interpolation in log-sigma (`log_sigmas` = float32 `np.log` of the training sigmas).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(MIN_SIGMA_FOR_LOG).ln();
    // argmax of cumsum(dists >= 0): the first index where the running count peaks.
    let (mut count, mut best, mut low_idx) = (0usize, 0usize, 0usize);
    for (i, &log) in log_sigmas.iter().enumerate() {
        if log_sigma - f64::from(log) >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            low_idx = i;
        }
    }
    let low_idx = low_idx.min(log_sigmas.len() - 2);
    let (low, high) = (log_sigmas[low_idx], log_sigmas[low_idx + 1]);
    let w = ((f64::from(low) - log_sigma) / f64::from(low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * (low_idx + 1) as f64
}

/// float32 natural logs of the training sigmas (numpy `np.log` on a float32 array).
pub(crate) fn log_sigmas(train_sigmas: &[f32]) -> Vec<f32> {
    train_sigmas.iter().map(|s| s.ln()).collect()
}

/// `sigmas.max()` for linspace/trailing, `(max**2 + 1) ** 0.5` for leading (float32).
pub(crate) fn sigma_init_noise(sigmas: &[f32], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Leading => f64::from((max * max + 1.0).sqrt()),
        _ => f64::from(max),
    }
}

/// Checks `1 <= n <= num_train_timesteps`.
pub(crate) fn check_steps(
    scheduler: &'static str,
    num_inference_steps: usize,
    num_train_timesteps: usize,
) -> Result<(), SchedulerError> {
    if num_inference_steps == 0 || num_inference_steps > num_train_timesteps {
        return Err(SchedulerError::InvalidSteps {
            scheduler,
            steps: num_inference_steps,
            max: num_train_timesteps,
        });
    }
    Ok(())
}

/// Standard normal noise like diffusers' `randn_tensor(shape, generator=cpu_generator)`: drawn
/// on the CPU from the thread's seeded generator (`sd::rng::seeded`; outside a scope, tch's
/// global one), then moved to `like`'s device.
pub(crate) fn cpu_noise_like(like: &Tensor) -> Result<Tensor, SchedulerError> {
    let noise = crate::sd::rng::randn(&like.size(), Kind::Float, Device::Cpu);
    Ok(noise.f_to_device(like.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_round_is_half_to_even() {
        // np.linspace(0, 999, 5) = [0, 249.75, 499.5, 749.25, 999] -> round -> 500 at the tie.
        assert_eq!(
            integer_timesteps(TimestepSpacing::Linspace, 1000, 5, 1),
            vec![999, 749, 500, 250, 0]
        );
    }

    #[test]
    fn interp_hits_table_points_and_midpoints() {
        let table = [1.0f32, 3.0, 7.0];
        assert_eq!(numpy_interp(1.0, &table), 3.0);
        assert_eq!(numpy_interp(1.5, &table), 5.0);
        assert_eq!(numpy_interp(9.0, &table), 7.0);
    }
}
