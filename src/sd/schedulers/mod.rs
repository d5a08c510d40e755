//! Diffusion schedulers, ported from diffusers 0.42 to match it numerically: DDPM, DDIM, PNDM
//! (PLMS), LMS, Euler, Euler ancestral and DPM-Solver++ multistep. `build(kind, config)` equals
//! diffusers' `<Class>.from_config(config)`.
//!
//! Steps are addressed by their index into `timesteps()` (not by timestep value, which PNDM
//! repeats). A denoising loop is:
//! `for i in 0..timesteps.len() { x_in = scale_model_input(x, i); eps = unet(x_in, t[i]);
//! x = step(eps, i, x).prev_sample }`, starting from `noise * init_noise_sigma()`.
//! Schedulers that draw noise (DDPM, Euler ancestral) draw from the thread's seeded generator
//! (`sd::rng::seeded`, a CPU generator of the run's own) in the order and shapes diffusers' CPU
//! `generator` would, so a scope seeded with s reproduces `torch.Generator().manual_seed(s)`;
//! outside a scope they use tch's global generator (`tch::manual_seed`).
use std::str::FromStr;
use tch::Tensor;

mod common;
pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod euler;
pub mod euler_ancestral;
pub mod lms;
pub mod pndm;
mod sigma;

pub use common::{PredictionType, TimestepSpacing};
pub use config::SchedulerConfig;
pub use ddpm::DdpmScheduler;

/// Why a scheduler could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("{path}: cannot read scheduler config: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path}: invalid scheduler config: {reason} (expected a diffusers scheduler_config.json)"
    )]
    Parse { path: String, reason: String },
    #[error("{file}: `{key}` = \"{value}\" is not valid for {scheduler}; use one of: {expected}")]
    InvalidValue {
        file: String,
        key: &'static str,
        value: String,
        scheduler: &'static str,
        expected: String,
    },
    #[error(
        "{file}: `{key}` = {value} is not supported by dreampipe's {scheduler}; remove the key or choose another scheduler"
    )]
    Unsupported {
        file: String,
        key: &'static str,
        value: String,
        scheduler: &'static str,
    },
    #[error("unknown scheduler \"{name}\"; use one of: {SCHEDULER_NAMES}")]
    UnknownKind { name: String },
    #[error(
        "{file}: `_class_name` = \"{name}\" is not a scheduler dreampipe implements; pick one explicitly ({SCHEDULER_NAMES})"
    )]
    UnknownClass { file: String, name: String },
    #[error(
        "{scheduler}: num_inference_steps = {steps} is invalid; it must be between 1 and num_train_timesteps ({max})"
    )]
    InvalidSteps {
        scheduler: &'static str,
        steps: usize,
        max: usize,
    },
    #[error(
        "{scheduler}: step index {index} is out of range ({len} timesteps); call set_timesteps first and step through them in order"
    )]
    StepIndex {
        scheduler: &'static str,
        index: usize,
        len: usize,
    },
    #[error("scheduler tensor operation failed: {0}")]
    Tensor(#[from] tch::TchError),
}

/// The accepted spellings of `SchedulerKind`, for messages and `--help`.
pub const SCHEDULER_NAMES: &str = "ddim, pndm, lms, euler, euler-a, dpm++, ddpm";

/// Which scheduler algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Ddim,
    Pndm,
    Lms,
    Euler,
    EulerAncestral,
    DpmSolverMultistep,
    Ddpm,
}

impl SchedulerKind {
    /// All kinds, in a stable order.
    pub const ALL: [SchedulerKind; 7] = [
        SchedulerKind::Ddim,
        SchedulerKind::Pndm,
        SchedulerKind::Lms,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::Ddpm,
    ];

    /// The CLI / YAML name ("euler-a").
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Lms => "lms",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmSolverMultistep => "dpm++",
            SchedulerKind::Ddpm => "ddpm",
        }
    }

    /// The diffusers class name ("EulerAncestralDiscreteScheduler").
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Lms => "LMSDiscreteScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
            SchedulerKind::Ddpm => "DDPMScheduler",
        }
    }

    /// Whether `step` draws noise (DDPM's variance, Euler ancestral), from the run's generator.
    pub fn draws_step_noise(self) -> bool {
        matches!(self, SchedulerKind::Ddpm | SchedulerKind::EulerAncestral)
    }

    /// The kind a config's `_class_name` names (`None` when it is not one we implement).
    pub fn from_class_name(class_name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.class_name() == class_name)
    }

    /// The model's own scheduler: the kind named by the config's `_class_name`.
    pub fn of_config(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        let name = config.class_name.clone().unwrap_or_default();
        Self::from_class_name(&name).ok_or_else(|| SchedulerError::UnknownClass {
            file: config.source_name().to_string(),
            name,
        })
    }
}

impl FromStr for SchedulerKind {
    type Err = SchedulerError;

    /// Parses "ddim", "pndm", "lms", "euler", "euler-a", "dpm++", "ddpm" (also the diffusers
    /// class names).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == text || kind.class_name() == text)
            .ok_or_else(|| SchedulerError::UnknownKind {
                name: text.to_string(),
            })
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The result of one `step`.
#[derive(Debug)]
pub struct StepOutput {
    /// The less noisy sample to feed into the next step.
    pub prev_sample: Tensor,
    /// The scheduler's estimate of the clean sample, where diffusers returns one.
    pub pred_original_sample: Option<Tensor>,
}

/// A diffusion scheduler (one instance per denoising run: multistep schedulers keep history,
/// which `set_timesteps` resets).
pub trait Scheduler: Send {
    /// Which algorithm this is.
    fn kind(&self) -> SchedulerKind;
    /// Prepares the schedule for `num_inference_steps` steps and clears any history.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError>;
    /// The timesteps passed to the UNet, one per step (int64, or float32 for LMS/Euler/EulerA;
    /// N+1 entries for PNDM).
    fn timesteps(&self) -> &Tensor;
    /// The sigma schedule (len = steps + 1) for the sigma-based schedulers, else `None`.
    fn sigmas(&self) -> Option<&Tensor> {
        None
    }
    /// The factor for the initial Gaussian noise (1 unless the scheduler works in sigma space).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// Scales the sample before it goes to the UNet at step `step_index` (by default the
    /// sample unchanged).
    fn scale_model_input(
        &self,
        sample: &Tensor,
        _step_index: usize,
    ) -> Result<Tensor, SchedulerError> {
        Ok(sample.shallow_clone())
    }
    /// Advances from `sample` at step `step_index` given the model output there.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<StepOutput, SchedulerError>;
}

/// Builds scheduler `kind` from a (model's) scheduler config, as `<Class>.from_config(config)`
/// does: keys the class does not know are ignored, absent keys take the class's defaults.
/// Call `set_timesteps` before use.
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(ddim::DdimScheduler::new(config)?),
        SchedulerKind::Pndm => Box::new(pndm::PndmScheduler::new(config)?),
        SchedulerKind::Lms => Box::new(lms::LmsScheduler::new(config)?),
        SchedulerKind::Euler => Box::new(euler::EulerScheduler::new(config)?),
        SchedulerKind::EulerAncestral => {
            Box::new(euler_ancestral::EulerAncestralScheduler::new(config)?)
        }
        SchedulerKind::DpmSolverMultistep => {
            Box::new(dpm_solver::DpmSolverMultistepScheduler::new(config)?)
        }
        SchedulerKind::Ddpm => Box::new(ddpm::DdpmScheduler::new(config)?),
    })
}

/// Returns `values[index]` or a `StepIndex` error.
pub(crate) fn at<T: Copy>(
    values: &[T],
    index: usize,
    scheduler: &'static str,
) -> Result<T, SchedulerError> {
    values.get(index).copied().ok_or(SchedulerError::StepIndex {
        scheduler,
        index,
        len: values.len(),
    })
}
