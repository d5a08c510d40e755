//! AdamW as `torch.optim.AdamW` (`amsgrad=False`, `maximize=False`) with torch's own kernels:
//! the fused one (`fused=True`, the default here) or the single-tensor path (`foreach=False`),
//! resumable via [`AdamW::save`] / [`AdamW::load`], and global gradient-norm clipping as
//! `torch.nn.utils.clip_grad_norm_` (norm type 2).
use super::TrainError;
pub use super::adamw_config::{
    AdamWConfig, TORCH_DEFAULT_BETAS, TORCH_DEFAULT_EPS, TORCH_DEFAULT_LR,
    TORCH_DEFAULT_WEIGHT_DECAY,
};
use super::aten_adamw::{self, AdamWTensors, AtenError};
use super::state_io::{self, SavedMoments};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// `clip_grad_norm_` adds this to the total norm before dividing (torch/nn/utils/clip_grad.py).
pub const CLIP_NORM_EPS: f64 = 1e-6;

/// Optimizer name written into saved state by [`AdamW`].
const ADAMW_NAME: &str = "adamw";

/// Which of torch's AdamW implementations [`AdamW::step`] runs (both via csrc/adamw.cpp).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdamWKernel {
    /// `torch._fused_adamw_`, what `torch.optim.AdamW(fused=True)` runs: one pass over each
    /// parameter, no temporaries. Same formula and op order as the single-tensor path; on CPU
    /// the first steps agree with it to float rounding (tests/goldens/train_optim.rs).
    #[default]
    Fused,
    /// torch's `_single_tensor_adam` (decoupled weight decay), what `torch.optim.AdamW()` runs
    /// on CPU by default (`foreach=False`): bit-identical to torch 2.11 on the same CPU and
    /// kernel set; a golden from another CPU is a few ULPs away (tests/goldens/train_optim.rs).
    SingleTensor,
}

/// First and second moment of one parameter, created at its first step (as torch does).
struct Moments {
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// `torch.optim.AdamW` over a list of trainable tensors (shallow handles to the parameters).
/// Parameters whose `.grad()` is undefined are skipped, like torch skips `grad is None`.
pub struct AdamW {
    config: AdamWConfig,
    kernel: AdamWKernel,
    params: Vec<Tensor>,
    moments: Vec<Option<Moments>>,
}

impl AdamW {
    /// An optimizer over `params` (shallow clones are kept; updates are in place).
    pub fn new(params: &[Tensor], config: AdamWConfig) -> Self {
        Self {
            config,
            kernel: AdamWKernel::default(),
            params: params.iter().map(Tensor::shallow_clone).collect(),
            moments: params.iter().map(|_| None).collect(),
        }
    }

    /// The same optimizer running `kernel` (default [`AdamWKernel::Fused`]).
    pub fn with_kernel(mut self, kernel: AdamWKernel) -> Self {
        self.kernel = kernel;
        self
    }

    pub fn kernel(&self) -> AdamWKernel {
        self.kernel
    }

    pub fn config(&self) -> AdamWConfig {
        self.config
    }

    /// Sets the learning rate used from the next [`AdamW::step`] on (what an lr scheduler does).
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// Number of steps taken by parameter `index` (0 before its first update).
    pub fn step_count(&self, index: usize) -> u64 {
        self.moments
            .get(index)
            .and_then(|m| m.as_ref())
            .map_or(0, |m| m.step)
    }

    /// `(exp_avg, exp_avg_sq)` of parameter `index`, if it has taken a step.
    pub fn moments(&self, index: usize) -> Option<(&Tensor, &Tensor)> {
        self.moments
            .get(index)
            .and_then(|m| m.as_ref())
            .map(|m| (&m.exp_avg, &m.exp_avg_sq))
    }

    /// One optimizer step on every parameter that has a gradient. An error means libtorch
    /// refused or failed an update (mismatched tensors, out of memory); the state is then
    /// unspecified.
    pub fn step(&mut self) -> Result<(), TrainError> {
        let config = self.config;
        let kernel = self.kernel;
        tch::no_grad(|| {
            let grads = self.advance_steps();
            let updates: Vec<IndexedUpdate<'_>> = self
                .params
                .iter()
                .zip(&self.moments)
                .zip(&grads)
                .enumerate()
                .filter_map(|(index, ((param, moments), grad))| {
                    let (moments, grad) = (moments.as_ref()?, grad.as_ref()?);
                    Some((index, tensors_of(param, grad, moments)))
                })
                .collect();
            match kernel {
                AdamWKernel::SingleTensor => single_tensor_all(&updates, &config),
                AdamWKernel::Fused => fused_all(updates, &config),
            }
        })
    }

    /// Creates missing moments and counts one more step for every parameter with a gradient
    /// (torch increments `state_steps` before the update); returns the gradients.
    fn advance_steps(&mut self) -> Vec<Option<Tensor>> {
        self.params
            .iter()
            .zip(self.moments.iter_mut())
            .map(|(param, moments)| {
                let grad = param.grad();
                if !grad.defined() {
                    return None;
                }
                let moments = moments.get_or_insert_with(|| Moments {
                    step: 0,
                    exp_avg: param.zeros_like(),
                    exp_avg_sq: param.zeros_like(),
                });
                moments.step += 1;
                Some(grad)
            })
            .collect()
    }

    /// Zeroes every parameter's gradient in place (torch's `zero_grad(set_to_none=False)`).
    pub fn zero_grad(&mut self) {
        zero_grads(&mut self.params);
    }

    /// Bytes held by the optimizer state tensors.
    pub fn state_bytes(&self) -> usize {
        self.moments
            .iter()
            .flatten()
            .map(|m| tensor_bytes(&m.exp_avg) + tensor_bytes(&m.exp_avg_sq))
            .sum()
    }

    /// Writes the state into directory `dir` (`optimizer.safetensors` + `optimizer.json`).
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        state_io::save(dir, ADAMW_NAME, self.config, &self.params, |index| {
            let m = self.moments[index].as_ref()?;
            Some(SavedMoments::f32(m.step, &m.exp_avg, &m.exp_avg_sq))
        })
    }

    /// Restores state written by [`AdamW::save`] (hyperparameters included, as torch's
    /// `load_state_dict` restores the param group); parameters must match in order and shape.
    pub fn load(&mut self, dir: &Path) -> Result<(), TrainError> {
        let (config, moments) = state_io::load(dir, ADAMW_NAME, &self.params, |saved| {
            let (exp_avg, exp_avg_sq) = saved.f32_moments()?;
            Ok(Moments {
                step: saved.meta.step,
                exp_avg,
                exp_avg_sq,
            })
        })?;
        self.config = config;
        self.moments = moments;
        Ok(())
    }
}

fn tensors_of<'a>(param: &'a Tensor, grad: &'a Tensor, moments: &'a Moments) -> AdamWTensors<'a> {
    AdamWTensors {
        param,
        grad,
        exp_avg: &moments.exp_avg,
        exp_avg_sq: &moments.exp_avg_sq,
        step: moments.step,
    }
}

/// A parameter's index in [`AdamW::params`] and its tensors for one update.
type IndexedUpdate<'a> = (usize, AdamWTensors<'a>);

/// The single-tensor update of every `(index, tensors)`, one libtorch call each.
fn single_tensor_all(
    updates: &[IndexedUpdate<'_>],
    config: &AdamWConfig,
) -> Result<(), TrainError> {
    for (index, tensors) in updates {
        aten_adamw::single_tensor_update(tensors, config)
            .map_err(|error| update_error(*index, tensors.param, error))?;
    }
    Ok(())
}

/// The fused update, one libtorch call per (device, dtype) group of contiguous tensors; the
/// rest (and any group the fused kernel refuses untouched) take the single-tensor update.
fn fused_all(updates: Vec<IndexedUpdate<'_>>, config: &AdamWConfig) -> Result<(), TrainError> {
    let mut groups: Vec<((Device, Kind), Vec<IndexedUpdate<'_>>)> = Vec::new();
    let mut unfusable = Vec::new();
    for update in updates {
        if !fusable(&update.1) {
            unfusable.push(update);
            continue;
        }
        let key = (update.1.param.device(), update.1.param.kind());
        match groups.iter_mut().find(|(group_key, _)| *group_key == key) {
            Some((_, group)) => group.push(update),
            None => groups.push((key, vec![update])),
        }
    }
    for (_, group) in groups {
        let batch: Vec<AdamWTensors<'_>> = group.iter().map(|(_, t)| *t).collect();
        match aten_adamw::fused_update(&batch, config) {
            Ok(()) => {}
            Err(AtenError::Rejected(_)) => single_tensor_all(&group, config)?,
            Err(error) => return Err(update_error(group[0].0, group[0].1.param, error)),
        }
    }
    single_tensor_all(&unfusable, config)
}

/// Whether the fused kernel can take these tensors: it walks raw contiguous f32/f64/f16/bf16
/// buffers that all match the parameter's dtype.
fn fusable(tensors: &AdamWTensors<'_>) -> bool {
    let kind = tensors.param.kind();
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    ) && [
        tensors.param,
        tensors.grad,
        tensors.exp_avg,
        tensors.exp_avg_sq,
    ]
    .iter()
    .all(|t| t.is_contiguous() && t.kind() == kind)
}

fn update_error(index: usize, param: &Tensor, error: AtenError) -> TrainError {
    TrainError::Optimizer(format!(
        "AdamW update of parameter {index} (shape {:?}): {error}",
        param.size()
    ))
}

pub(crate) fn zero_grads(params: &mut [Tensor]) {
    for param in params {
        param.zero_grad();
    }
}

pub(crate) fn tensor_bytes(tensor: &Tensor) -> usize {
    tensor.numel() * tensor.kind().elt_size_in_bytes()
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)` with norm type 2: the total norm is the
/// 2-norm of the per-tensor grad norms; every grad is multiplied by
/// `min(max_norm / (total + 1e-6), 1)`. Returns the total norm before clipping.
/// Parameters without a gradient are ignored; with none at all the result is 0.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let mut grads: Vec<Tensor> = params
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor> = grads.iter().map(Tensor::norm).collect();
        let total = Tensor::stack(&norms, 0).norm();
        // torch evaluates `max_norm / t` as `t.reciprocal() * max_norm`.
        let coef = (&total + CLIP_NORM_EPS).reciprocal().g_mul_scalar(max_norm);
        let coef = coef.clamp_max(1.0);
        for grad in &mut grads {
            let _ = grad.g_mul_(&coef);
        }
        total.double_value(&[])
    })
}
