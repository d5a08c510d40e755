//! Command-line verbs. Each verb lives in its own file; this module holds the global flags and
//! dispatches. Global flags: `--device`, `--cache`.
use crate::device::{self, CudaBackend, DeviceRequest};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod bench;
mod bench_cache;
mod bench_sd;
mod cache;
mod common;
mod dag;
mod doctor;
mod explain;
mod init;
mod model;
mod plan;
mod report;
mod run;
pub mod sample;
mod show;
mod validate;

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
    /// Run a pipeline: only stages whose inputs changed.
    Run(run::RunArgs),
    /// What a run would do with each stage, and why.
    Plan(plan::PlanArgs),
    /// Why a stage will rerun, field by field.
    Explain(explain::ExplainArgs),
    /// The stage graph as mermaid or Graphviz dot.
    Dag(dag::DagArgs),
    /// Check a pipeline file and report every error.
    Validate(validate::ValidateArgs),
    /// Inspect and maintain the cache.
    Cache(cache::CacheArgs),
    /// Write a starter DreamBooth pipeline (DIR/dreampipe.yaml) for a folder of photos.
    Init(init::InitArgs),
    /// Write the HTML report of a pipeline's latest run.
    Report(report::ReportArgs),
    /// Print the output folder of a stage's current result.
    Show(show::ShowArgs),
    /// Benchmark hashing, planning and no-op reruns (figures for the docs).
    #[command(hide = true)]
    BenchCache(bench_cache::BenchArgs),
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
        Command::Run(args) => run::run(&context, &args),
        Command::Plan(args) => plan::run(&context, &args),
        Command::Explain(args) => explain::run(&context, &args),
        Command::Dag(args) => dag::run(&context, &args),
        Command::Validate(args) => validate::run(&context, &args),
        Command::Cache(args) => cache::run(&context, &args),
        Command::Init(args) => init::run(&context, &args),
        Command::Report(args) => report::run(&context, &args),
        Command::Show(args) => show::run(&context, &args),
        Command::BenchCache(args) => bench_cache::run(&context, &args),
        Command::Model(command) => model::run(command, &context),
        Command::Bench(command) => bench::run(command, &context),
    }
}
