//! libtorch's automatic mixed precision (`torch.autocast(device_type, dtype)`) through
//! csrc/autocast.cpp: inside a region, libtorch's own op-level policy runs matmuls and
//! convolutions in the lower precision and keeps precision-sensitive ops in float32. The state
//! is thread-local, so a region affects only the thread that entered it.
use std::ffi::{CStr, c_char, c_int};
use std::marker::PhantomData;
use tch::{Device, Kind};

/// Codes of csrc/autocast.cpp.
const DEVICE_CPU: c_int = 0;
const DEVICE_CUDA: c_int = 1;
const DTYPE_BFLOAT16: c_int = 0;
const DTYPE_HALF: c_int = 1;
/// Bytes reserved for libtorch's error message.
const ERROR_BUFFER_LEN: usize = 512;

unsafe extern "C" {
    fn dreampipe_autocast_enter(
        device: c_int,
        dtype: c_int,
        previous_enabled: *mut c_int,
        previous_dtype: *mut c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn dreampipe_autocast_exit(device: c_int, previous_enabled: c_int, previous_dtype: c_int);
}

/// Mixed precision for the trained modules: autocast to `kind` on `device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autocast {
    pub device: Device,
    pub kind: Kind,
}

impl Autocast {
    /// Runs `f` inside an autocast region (as `with torch.autocast(...)`).
    pub fn run<T>(self, f: impl FnOnce() -> T) -> Result<T, String> {
        let _region = AutocastRegion::enter(self)?;
        Ok(f())
    }
}

/// Runs `f` under `autocast` when it is set, else as is.
pub fn maybe<T>(autocast: Option<Autocast>, f: impl FnOnce() -> T) -> Result<T, String> {
    match autocast {
        Some(autocast) => autocast.run(f),
        None => Ok(f()),
    }
}

/// An entered autocast region; leaving it (drop) restores the thread's previous state. Not
/// `Send`: the state it restores belongs to the thread that entered.
pub struct AutocastRegion {
    device: c_int,
    previous_enabled: c_int,
    previous_dtype: c_int,
    _thread_bound: PhantomData<*const ()>,
}

impl AutocastRegion {
    pub fn enter(autocast: Autocast) -> Result<Self, String> {
        let device = match autocast.device {
            Device::Cpu => DEVICE_CPU,
            Device::Cuda(_) => DEVICE_CUDA,
            other => return Err(format!("autocast is not available on {other:?}")),
        };
        let dtype = match autocast.kind {
            Kind::BFloat16 => DTYPE_BFLOAT16,
            Kind::Half => DTYPE_HALF,
            other => return Err(format!("autocast runs in bf16 or fp16, not {other:?}")),
        };
        let (mut previous_enabled, mut previous_dtype) = (0, 0);
        let mut err = [0 as c_char; ERROR_BUFFER_LEN];
        // SAFETY: the out-pointers and the error buffer are valid for the call; the shim
        // catches every exception.
        let status = unsafe {
            dreampipe_autocast_enter(
                device,
                dtype,
                &mut previous_enabled,
                &mut previous_dtype,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if status != 0 {
            // SAFETY: the shim wrote a NUL-terminated message into the buffer.
            let message = unsafe { CStr::from_ptr(err.as_ptr()) };
            return Err(format!("autocast: {}", message.to_string_lossy()));
        }
        Ok(Self {
            device,
            previous_enabled,
            previous_dtype,
            _thread_bound: PhantomData,
        })
    }
}

impl Drop for AutocastRegion {
    fn drop(&mut self) {
        // SAFETY: restores what enter saved, on the thread that entered (the type is !Send).
        unsafe { dreampipe_autocast_exit(self.device, self.previous_enabled, self.previous_dtype) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    fn matmul_kind() -> Kind {
        let a = Tensor::ones([4, 4], (Kind::Float, Device::Cpu));
        a.matmul(&a).kind()
    }

    #[test]
    fn cpu_bf16_region_lowers_matmul_and_restores_float32_after() {
        let bf16 = Autocast {
            device: Device::Cpu,
            kind: Kind::BFloat16,
        };
        assert_eq!(matmul_kind(), Kind::Float);
        assert_eq!(bf16.run(matmul_kind).unwrap(), Kind::BFloat16);
        assert_eq!(matmul_kind(), Kind::Float);
    }

    #[test]
    fn nested_regions_restore_the_outer_dtype() {
        let outer = Autocast {
            device: Device::Cpu,
            kind: Kind::BFloat16,
        };
        let inner = Autocast {
            kind: Kind::Half,
            ..outer
        };
        let kinds = outer
            .run(|| {
                let nested = inner.run(matmul_kind).unwrap();
                (nested, matmul_kind())
            })
            .unwrap();
        assert_eq!(kinds, (Kind::Half, Kind::BFloat16));
    }

    #[test]
    fn float32_is_refused() {
        let error = AutocastRegion::enter(Autocast {
            device: Device::Cpu,
            kind: Kind::Float,
        })
        .err()
        .unwrap();
        assert_eq!(error, "autocast runs in bf16 or fp16, not Float");
    }
}
