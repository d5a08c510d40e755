//! Device selection: `--device auto|cpu|cuda|cuda:N`, and making libtorch's CUDA backend
//! available at start-up (a plain tch build never links `libtorch_cuda.so`, so it is loaded with
//! `dlopen` before the first CUDA query; any earlier query disables CUDA for the process).
use std::ffi::CString;
use std::path::PathBuf;
use std::str::FromStr;

/// What the user asked for with `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    /// CUDA device 0 when usable, else CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device '{other}': use auto, cpu, cuda or cuda:N")),
        }
    }
}

/// The libtorch library folder this binary was linked against (set by build.rs).
pub fn linked_libtorch_dir() -> Option<PathBuf> {
    option_env!("DREAMPIPE_LIBTORCH_LIB").map(PathBuf::from)
}

/// Outcome of trying to load libtorch's CUDA backend.
#[derive(Debug, Clone)]
pub enum CudaBackend {
    Loaded(String),
    Missing(String),
}

/// Loads `libtorch_cuda.so` (RTLD_GLOBAL) so libtorch registers its CUDA backend. Must run
/// before anything asks tch about CUDA. Looks at `$DREAMPIPE_TORCH_CUDA_LIB`, then the linked
/// libtorch folder, then the dynamic loader's search path (LD_LIBRARY_PATH).
pub fn load_cuda_backend() -> CudaBackend {
    let mut candidates: Vec<String> = Vec::new();
    if let Ok(path) = std::env::var("DREAMPIPE_TORCH_CUDA_LIB") {
        candidates.push(path);
    }
    if let Some(dir) = linked_libtorch_dir() {
        candidates.push(dir.join("libtorch_cuda.so").display().to_string());
    }
    candidates.push("libtorch_cuda.so".to_string());
    let mut last_error = String::new();
    for candidate in &candidates {
        match dlopen_global(candidate) {
            Ok(()) => return CudaBackend::Loaded(candidate.clone()),
            Err(error) => last_error = error,
        }
    }
    CudaBackend::Missing(last_error)
}

fn dlopen_global(path: &str) -> Result<(), String> {
    let c_path = CString::new(path).map_err(|_| format!("bad library path {path}"))?;
    // SAFETY: dlopen with a valid C string; the handle is intentionally leaked (the library
    // stays loaded for the life of the process).
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a thread-local C string or null.
        let message = unsafe { libc::dlerror() };
        if message.is_null() {
            return Err(format!("{path}: could not be loaded"));
        }
        let text = unsafe { std::ffi::CStr::from_ptr(message) };
        return Err(text.to_string_lossy().into_owned());
    }
    Ok(())
}

/// Resolves the request to a tch device. `cuda` that cannot work is one clear error line.
pub fn resolve(request: DeviceRequest, backend: &CudaBackend) -> Result<tch::Device, String> {
    match request {
        DeviceRequest::Cpu => Ok(tch::Device::Cpu),
        DeviceRequest::Auto => Ok(if cuda_device_count(backend) > 0 {
            tch::Device::Cuda(0)
        } else {
            tch::Device::Cpu
        }),
        DeviceRequest::Cuda(index) => {
            if let CudaBackend::Missing(why) = backend {
                return Err(format!(
                    "--device cuda: this libtorch has no CUDA backend (libtorch_cuda.so not loadable: {why}); \
                     build against a CUDA libtorch or set DREAMPIPE_TORCH_CUDA_LIB (see README, GPU)"
                ));
            }
            let count = cuda_device_count(backend);
            if count == 0 {
                return Err("--device cuda: libtorch's CUDA backend is loaded but sees no GPU (no NVIDIA driver or device)".to_string());
            }
            if index >= count {
                return Err(format!(
                    "--device cuda:{index}: only {count} CUDA device(s) present (cuda:0..cuda:{})",
                    count - 1
                ));
            }
            Ok(tch::Device::Cuda(index))
        }
    }
}

/// Number of CUDA devices libtorch sees (0 without the backend).
pub fn cuda_device_count(backend: &CudaBackend) -> usize {
    match backend {
        CudaBackend::Loaded(_) => tch::Cuda::device_count().max(0) as usize,
        CudaBackend::Missing(_) => 0,
    }
}
