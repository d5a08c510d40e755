//! `dreampipe doctor`: what this installation runs on.
use super::TorchContext;
use crate::device::{self, CudaBackend};
use std::process::ExitCode;

pub fn run(context: &TorchContext) -> anyhow::Result<ExitCode> {
    println!("dreampipe {}", env!("CARGO_PKG_VERSION"));
    println!("libtorch version: {}", libtorch_version());
    match device::linked_libtorch_dir() {
        Some(dir) => println!("libtorch path: {}", dir.display()),
        None => println!("libtorch path: unknown (not set at build time)"),
    }
    match &context.cuda {
        CudaBackend::Loaded(lib) => {
            let count = context.probe.device_count();
            println!("CUDA backend: loaded from {lib}; {count} device(s)");
            for index in 0..count {
                println!("  cuda:{index}: {}", cuda_device_name(index));
            }
        }
        CudaBackend::Missing(why) => println!("CUDA backend: not available ({why})"),
    }
    println!("selected device: {:?}", context.device);
    println!("threads: {}", tch::get_num_threads());
    println!("cache root: {}", absolute(&context.cache_root).display());
    Ok(ExitCode::SUCCESS)
}

/// libtorch's own version, read from the `build-version` file beside the lib folder.
fn libtorch_version() -> String {
    device::linked_libtorch_dir()
        .and_then(|lib| lib.parent().map(|root| root.join("build-version")))
        .and_then(|file| std::fs::read_to_string(file).ok())
        .map(|text| text.trim().to_string())
        .unwrap_or_else(|| {
            "2.11.0 (expected by tch 0.24.0; build-version file not found)".to_string()
        })
}

fn cuda_device_name(index: usize) -> String {
    // tch has no device-name query; report the index and capability via a tiny tensor op.
    let probe = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cuda(index)));
    format!("{:?}", probe.device())
}

fn absolute(path: &std::path::Path) -> std::path::PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
