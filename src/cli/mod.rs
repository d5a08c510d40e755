//! Command-line verbs. Each verb lives in its own file; this module holds the global flags and
//! dispatches. Global flags: `--device`, `--cache`.
use crate::device::{self, CudaBackend, DeviceRequest};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod bench;
mod bench_sd;
mod doctor;
pub mod sample;
mod model;

/// Global options every verb sees.
#[derive(Debug, Parser)]
#[command(
    name = "dreampipe",
    version,
    about = "Stable Diffusion fine-tuning experiments as cached YAML pipelines"
)]
pub struct Cli {
    /// Where computations run: auto (CUDA when usable), cpu, cuda, cuda:N.
    #[arg(long, global = true, default_value = "auto", env = "DREAMPIPE_DEVICE")]
    pub device: DeviceRequest,
    /// Cache root (content-addressed store of stage outputs).
    #[arg(long, global = true, default_value = "cache", env = "DREAMPIPE_CACHE")]
    pub cache: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print libtorch's version and location, CUDA availability and devices, the cache root.
    Doctor,
    /// Generate images from a prompt (txt2img) with a diffusers model folder.
    Sample(sample::SampleArgs),
    /// Model-folder utilities (`model init`: random-weight folders in a known architecture).
    #[command(subcommand)]
    Model(model::ModelCommand),
    #[command(subcommand, hide = true)]
    Bench(bench::BenchCommand),
}

/// Everything a verb needs from the global flags, resolved once.
pub struct Context {
    pub device: tch::Device,
    pub cuda: CudaBackend,
    pub cache_root: PathBuf,
}

/// Runs the verb; the returned exit code is success unless the verb says otherwise.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let cuda = match cli.device {
        DeviceRequest::Cpu => CudaBackend::Missing("--device cpu".to_string()),
        _ => device::load_cuda_backend(),
    };
    let resolved = device::resolve(cli.device, &cuda).map_err(anyhow::Error::msg)?;
    let context = Context {
        device: resolved,
        cuda,
        cache_root: cli.cache,
    };
    match cli.command {
        Command::Doctor => doctor::run(&context),
        Command::Sample(args) => sample::run(&context, &args),
        Command::Model(command) => model::run(command, &context),
        Command::Bench(command) => bench::run(command, &context),
    }
}
