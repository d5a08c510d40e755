//! CUDA for the torch worker: making libtorch's CUDA backend available at start-up (a plain
//! tch build never links `libtorch_cuda.so`, so it is loaded with `dlopen` before the first CUDA
//! query; any earlier query disables CUDA for the process), asking libtorch what it sees, and
//! converting the core's [`Device`] to tch's. The requests and their resolution are the core's
//! (re-exported).
pub use dreampipe_core::device::*;
use std::ffi::CString;
use std::path::PathBuf;

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

/// libtorch's answer for this process: the backend loaded (or why not) and its device count.
pub fn probe(backend: &CudaBackend) -> CudaProbe {
    match backend {
        CudaBackend::Loaded(library) => CudaProbe::Loaded {
            library: library.clone(),
            count: tch::Cuda::device_count().max(0) as usize,
        },
        CudaBackend::Missing(reason) => CudaProbe::Missing {
            reason: reason.clone(),
        },
    }
}

/// The tch device of a core device.
pub fn to_tch(device: Device) -> tch::Device {
    match device {
        Device::Cpu => tch::Device::Cpu,
        Device::Cuda(index) => tch::Device::Cuda(index),
    }
}
