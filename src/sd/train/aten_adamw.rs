//! Safe Rust side of csrc/adamw.cpp: AdamW updates through libtorch ops that tch 0.24 does not
//! bind (`addcmul_` / `addcdiv_` with a `value` scalar, and the fused kernel `_fused_adamw_`).
//! The C++ side catches every exception; failures come back here as [`AtenError`].
use super::optim::AdamWConfig;
use std::ffi::{c_char, c_int};
use tch::Tensor;
use torch_sys::C_tensor;

/// Bytes reserved for a libtorch error message (longer ones are cut).
const ERROR_BUFFER_LEN: usize = 1024;
/// Status codes of csrc/adamw.cpp (`kOk`, `kRejected`, `kFailed`).
const STATUS_OK: c_int = 0;
const STATUS_REJECTED: c_int = 1;

unsafe extern "C" {
    fn dreampipe_adamw_single_tensor(
        param: *const C_tensor,
        grad: *const C_tensor,
        exp_avg: *const C_tensor,
        exp_avg_sq: *const C_tensor,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;

    fn dreampipe_adamw_fused(
        params: *const *const C_tensor,
        grads: *const *const C_tensor,
        exp_avgs: *const *const C_tensor,
        exp_avg_sqs: *const *const C_tensor,
        steps: *const f64,
        count: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Why a shim call did not update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AtenError {
    /// The tensors were refused before anything was modified.
    Rejected(String),
    /// libtorch failed mid-update: some tensors may already hold new values.
    Failed(String),
}

impl std::fmt::Display for AtenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Rejected(reason) => write!(f, "tensors refused before the update: {reason}"),
            Self::Failed(reason) => write!(f, "libtorch failed during the update: {reason}"),
        }
    }
}

/// One parameter's tensors for an update; `step` counts this update (torch increments first).
#[derive(Clone, Copy)]
pub(crate) struct AdamWTensors<'a> {
    pub param: &'a Tensor,
    pub grad: &'a Tensor,
    pub exp_avg: &'a Tensor,
    pub exp_avg_sq: &'a Tensor,
    pub step: u64,
}

/// torch `_single_tensor_adam(..., decoupled_weight_decay=True)` on one parameter, op for op:
/// `param.mul_(1 - lr*wd)`, `exp_avg.lerp_(grad, 1 - beta1)`,
/// `exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)`,
/// `denom = (exp_avg_sq.sqrt() / sqrt(bias_correction2)).add_(eps)`,
/// `param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)`.
pub(crate) fn single_tensor_update(
    tensors: &AdamWTensors<'_>,
    config: &AdamWConfig,
) -> Result<(), AtenError> {
    let mut err = [0 as c_char; ERROR_BUFFER_LEN];
    // SAFETY: every pointer is a live tch tensor handle (`at::Tensor*`) borrowed for the call;
    // `err` is writable for `ERROR_BUFFER_LEN` bytes and the C++ side never throws.
    let status = unsafe {
        dreampipe_adamw_single_tensor(
            tensors.param.as_ptr(),
            tensors.grad.as_ptr(),
            tensors.exp_avg.as_ptr(),
            tensors.exp_avg_sq.as_ptr(),
            tensors.step as f64,
            config.lr,
            config.beta1,
            config.beta2,
            config.eps,
            config.weight_decay,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    status_to_result(status, &err)
}

/// torch `_fused_adamw_` (what `torch.optim.AdamW(fused=True)` calls) over `batch`, one call:
/// every tensor contiguous, all on one device with one floating dtype.
pub(crate) fn fused_update(
    batch: &[AdamWTensors<'_>],
    config: &AdamWConfig,
) -> Result<(), AtenError> {
    let params: Vec<*const C_tensor> = batch.iter().map(|t| t.param.as_ptr()).collect();
    let grads: Vec<*const C_tensor> = batch.iter().map(|t| t.grad.as_ptr()).collect();
    let exp_avgs: Vec<*const C_tensor> = batch.iter().map(|t| t.exp_avg.as_ptr()).collect();
    let exp_avg_sqs: Vec<*const C_tensor> = batch.iter().map(|t| t.exp_avg_sq.as_ptr()).collect();
    let steps: Vec<f64> = batch.iter().map(|t| t.step as f64).collect();
    let mut err = [0 as c_char; ERROR_BUFFER_LEN];
    // SAFETY: the five arrays hold `batch.len()` live tensor handles / steps, borrowed for the
    // call; `err` is writable for `ERROR_BUFFER_LEN` bytes and the C++ side never throws.
    let status = unsafe {
        dreampipe_adamw_fused(
            params.as_ptr(),
            grads.as_ptr(),
            exp_avgs.as_ptr(),
            exp_avg_sqs.as_ptr(),
            steps.as_ptr(),
            batch.len(),
            config.lr,
            config.beta1,
            config.beta2,
            config.eps,
            config.weight_decay,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    status_to_result(status, &err)
}

fn status_to_result(status: c_int, err: &[c_char]) -> Result<(), AtenError> {
    if status == STATUS_OK {
        return Ok(());
    }
    // snprintf on the C++ side NUL-terminates inside the (zeroed) buffer.
    let bytes: Vec<u8> = err
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    let message = String::from_utf8_lossy(&bytes).into_owned();
    Err(if status == STATUS_REJECTED {
        AtenError::Rejected(message)
    } else {
        AtenError::Failed(message)
    })
}
