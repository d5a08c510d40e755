//! Safe Rust side of csrc/adamw.cpp: AdamW updates through libtorch ops that tch 0.24 does not
//! bind (`addcmul_` / `addcdiv_` with a `value` scalar, and the fused kernel `_fused_adamw_`).
//! The C++ side catches every exception; failures come back here as [`AtenError`].
use super::adamw_config::AdamWConfig;
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn floats(shape: &[i64]) -> Tensor {
        Tensor::ones(shape, (Kind::Float, Device::Cpu))
    }

    fn update_of<'a>(
        param: &'a Tensor,
        grad: &'a Tensor,
        m: &'a Tensor,
        v: &'a Tensor,
    ) -> AdamWTensors<'a> {
        AdamWTensors {
            param,
            grad,
            exp_avg: m,
            exp_avg_sq: v,
            step: 1,
        }
    }

    #[test]
    fn single_tensor_update_refuses_a_gradient_of_another_shape_untouched() {
        let (param, grad, m, v) = (floats(&[4]), floats(&[2, 2]), floats(&[4]), floats(&[4]));
        let result =
            single_tensor_update(&update_of(&param, &grad, &m, &v), &AdamWConfig::default());
        assert_eq!(
            result,
            Err(AtenError::Rejected(
                "the gradient has another shape than the parameter".to_string()
            ))
        );
        assert!(param.equal(&floats(&[4])) && m.equal(&floats(&[4])));
    }

    #[test]
    fn fused_update_refuses_non_contiguous_and_mixed_dtype_batches() {
        let (param, m, v) = (floats(&[2, 3]), floats(&[2, 3]), floats(&[2, 3]));
        let transposed = floats(&[3, 2]).tr();
        let result = fused_update(
            &[update_of(&param, &transposed, &m, &v)],
            &AdamWConfig::default(),
        );
        assert_eq!(
            result,
            Err(AtenError::Rejected(
                "parameter 0: the gradient is not contiguous".to_string()
            ))
        );
        let doubles = floats(&[2]).to_kind(Kind::Double);
        let batch = [
            update_of(&param, &param, &m, &v),
            update_of(&doubles, &doubles, &doubles, &doubles),
        ];
        assert_eq!(
            fused_update(&batch, &AdamWConfig::default()),
            Err(AtenError::Rejected(
                "parameter 1: the parameters differ in device or dtype".to_string()
            ))
        );
        assert!(param.equal(&floats(&[2, 3])));
    }

    #[test]
    fn both_kernels_take_one_documented_adamw_step() {
        // Step 1 from zero moments: m = 0.1 g, v = 0.001 g², so the update is lr * g / |g|
        // (eps aside) after the decay param * (1 - lr * wd).
        let config = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            eps: 0.0,
            ..AdamWConfig::default()
        };
        let grad = Tensor::from_slice(&[2.0f32, -3.0]);
        for fused in [false, true] {
            let param = Tensor::from_slice(&[1.0f32, 1.0]);
            let (m, v) = (param.zeros_like(), param.zeros_like());
            let update = update_of(&param, &grad, &m, &v);
            let result = if fused {
                fused_update(&[update], &config)
            } else {
                single_tensor_update(&update, &config)
            };
            assert_eq!(result, Ok(()));
            let values = Vec::<f32>::try_from(&param).unwrap();
            assert!(
                (values[0] - 0.85).abs() < 1e-6 && (values[1] - 1.05).abs() < 1e-6,
                "{values:?}"
            );
        }
    }
}
