//! Devices without libtorch: what `--device auto|cpu|cuda|cuda:N` asks for, the device a stage
//! runs on, and the answer to "which CUDA devices does libtorch see", which only the torch
//! worker can compute (it has to load libtorch) and which is memoized in `<cache>/devices.json`
//! so the front binary can resolve `auto` and `cuda:N` without loading libtorch.
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
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

/// Where a stage's tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

/// What libtorch's CUDA backend offers on this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CudaProbe {
    /// `libtorch_cuda.so` loaded from this path; libtorch sees `count` devices.
    Loaded { library: String, count: usize },
    /// The backend could not be loaded (the loader's reason).
    Missing { reason: String },
}

impl CudaProbe {
    pub fn device_count(&self) -> usize {
        match self {
            Self::Loaded { count, .. } => *count,
            Self::Missing { .. } => 0,
        }
    }
}

/// Every device `auto` spreads GPU stages over: each GPU libtorch sees, else the CPU.
pub fn every_device(probe: &CudaProbe) -> Vec<Device> {
    match probe.device_count() {
        0 => vec![Device::Cpu],
        count => (0..count).map(Device::Cuda).collect(),
    }
}

/// Resolves the request against the probe. `cuda` that cannot work is one clear error line.
pub fn resolve(request: DeviceRequest, probe: &CudaProbe) -> Result<Device, String> {
    match request {
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Auto => Ok(if probe.device_count() > 0 {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        DeviceRequest::Cuda(index) => {
            if let CudaProbe::Missing { reason } = probe {
                return Err(format!(
                    "--device cuda: this libtorch has no CUDA backend (libtorch_cuda.so not loadable: {reason}); \
                     build against a CUDA libtorch or set DREAMPIPE_TORCH_CUDA_LIB (see README, GPU)"
                ));
            }
            let count = probe.device_count();
            if count == 0 {
                return Err("--device cuda: libtorch's CUDA backend is loaded but sees no GPU (no NVIDIA driver or device)".to_string());
            }
            if index >= count {
                return Err(format!(
                    "--device cuda:{index}: only {count} CUDA device(s) present (cuda:0..cuda:{})",
                    count - 1
                ));
            }
            Ok(Device::Cuda(index))
        }
    }
}

/// The memo file of the probe under a cache root.
const PROBE_FILE: &str = "devices.json";

/// A probe as stored, with what it is valid for.
#[derive(Serialize, Deserialize)]
struct StoredProbe {
    valid_for: String,
    probe: CudaProbe,
}

/// The torch worker binary: `$DREAMPIPE_TORCH` when set, else `dreampipe-torch` beside the
/// running executable (for the worker itself, that is its own path).
pub fn torch_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("DREAMPIPE_TORCH") {
        return PathBuf::from(path);
    }
    let current = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("dreampipe"));
    current.with_file_name("dreampipe-torch")
}

/// What decides the probe's answer besides the hardware: the boot (drivers, devices), the
/// worker binary (the libtorch it links), and the variables that choose `libtorch_cuda.so`.
fn probe_validity() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let binary = torch_binary();
    let stamp = std::fs::metadata(&binary)
        .ok()
        .map(|m| (m.len(), m.modified().ok()));
    let variables: Vec<String> = [
        "DREAMPIPE_TORCH_CUDA_LIB",
        "LD_LIBRARY_PATH",
        "CUDA_VISIBLE_DEVICES",
    ]
    .iter()
    .map(|name| format!("{name}={}", std::env::var(name).unwrap_or_default()))
    .collect();
    format!(
        "boot {} | worker {} {stamp:?} | {}",
        boot.trim(),
        binary.display(),
        variables.join(" ")
    )
}

/// The memoized probe, when it was made for this boot, worker binary and environment.
pub fn read_probe(cache_root: &Path) -> Option<CudaProbe> {
    let text = std::fs::read_to_string(cache_root.join(PROBE_FILE)).ok()?;
    let stored: StoredProbe = serde_json::from_str(&text).ok()?;
    (stored.valid_for == probe_validity()).then_some(stored.probe)
}

/// Memoizes the worker's probe (best effort: without it the front asks the worker again).
pub fn write_probe(cache_root: &Path, probe: &CudaProbe) {
    let stored = StoredProbe {
        valid_for: probe_validity(),
        probe: probe.clone(),
    };
    let Ok(text) = serde_json::to_string_pretty(&stored) else {
        return;
    };
    if std::fs::create_dir_all(cache_root).is_err() {
        return;
    }
    let Ok(mut file) = tempfile::NamedTempFile::new_in(cache_root) else {
        return;
    };
    if std::io::Write::write_all(&mut file, text.as_bytes()).is_ok() {
        let _ = file.persist(cache_root.join(PROBE_FILE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_resolve() {
        let none = CudaProbe::Missing {
            reason: "libtorch_cuda.so: cannot open shared object file".to_string(),
        };
        let two = CudaProbe::Loaded {
            library: "libtorch_cuda.so".to_string(),
            count: 2,
        };
        let auto: DeviceRequest = "auto".parse().unwrap();
        assert_eq!(resolve(auto, &none), Ok(Device::Cpu));
        assert_eq!(resolve(auto, &two), Ok(Device::Cuda(0)));
        assert_eq!(
            resolve("cuda:1".parse().unwrap(), &two),
            Ok(Device::Cuda(1))
        );
        assert_eq!(
            resolve("cuda:2".parse().unwrap(), &two),
            Err("--device cuda:2: only 2 CUDA device(s) present (cuda:0..cuda:1)".to_string())
        );
        assert!(
            resolve("cuda".parse().unwrap(), &none)
                .unwrap_err()
                .starts_with("--device cuda: this libtorch has no CUDA backend (libtorch_cuda.so not loadable: libtorch_cuda.so: cannot open")
        );
        assert_eq!(
            "gpu".parse::<DeviceRequest>(),
            Err("unknown device 'gpu': use auto, cpu, cuda or cuda:N".to_string())
        );
        assert_eq!(every_device(&two), [Device::Cuda(0), Device::Cuda(1)]);
        assert_eq!(every_device(&none), [Device::Cpu]);
    }

    #[test]
    fn the_probe_memo_round_trips_and_ignores_foreign_entries() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_probe(dir.path()), None);
        let probe = CudaProbe::Loaded {
            library: "/opt/lib/libtorch_cuda.so".to_string(),
            count: 1,
        };
        write_probe(dir.path(), &probe);
        assert_eq!(read_probe(dir.path()), Some(probe));
        let stale = r#"{"valid_for":"another boot","probe":{"Missing":{"reason":"x"}}}"#;
        std::fs::write(dir.path().join(PROBE_FILE), stale).unwrap();
        assert_eq!(read_probe(dir.path()), None);
    }
}
