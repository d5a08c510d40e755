//! The torch worker's command line: the core's verbs (`dreampipe_core::cli`) with the Stable
//! Diffusion stages running in this process, plus the verbs that need libtorch (`doctor`,
//! `sample`, `model`, `bench`: `dreampipe_kinds::worker_verbs`), whose real arguments replace
//! the stubs the core declares for them. The front
//! binary re-executes commands here with the same arguments, so both parse alike.
use crate::device::{self, CudaBackend, CudaProbe, DeviceRequest};
use clap::{Args, FromArgMatches, Subcommand};
use dreampipe_core::cli::{Backend, Cli, GlobalArgs};
use dreampipe_kinds::worker_verbs::WORKER_VERBS;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod bench;
mod bench_sd;
mod doctor;
mod model;
pub mod sample;

/// What the torch verbs need from the global flags, resolved once (the core verbs get
/// `dreampipe_core::cli::Context`).
pub struct TorchContext {
    pub device: tch::Device,
    pub cuda: CudaBackend,
    pub probe: CudaProbe,
    pub cache_root: PathBuf,
}

/// The whole command line: the core's, with the torch verbs' arguments filled in.
pub fn command() -> clap::Command {
    dreampipe_core::cli::command(WORKER_VERBS)
        .mut_subcommand("doctor", |stub| real_verb("doctor", &stub, |verb| verb))
        .mut_subcommand("sample", |stub| {
            real_verb("sample", &stub, sample::SampleArgs::augment_args)
        })
        .mut_subcommand("model", |stub| {
            real_verb("model", &stub, model::ModelCommand::augment_subcommands)
                .subcommand_required(true)
        })
        .mut_subcommand("bench", |stub| {
            real_verb("bench", &stub, bench::BenchCommand::augment_subcommands)
                .subcommand_required(true)
        })
}

/// The verb `name` with the arguments `add` gives it instead of the stub's catch-all, keeping
/// the stub's description and visibility.
fn real_verb(
    name: &'static str,
    stub: &clap::Command,
    add: impl FnOnce(clap::Command) -> clap::Command,
) -> clap::Command {
    let mut verb = add(clap::Command::new(name)).hide(stub.is_hide_set());
    if let Some(about) = stub.get_about() {
        verb = verb.about(about.clone());
    }
    verb
}

/// Parses the process's arguments and runs the verb.
pub fn run_from_env() -> anyhow::Result<ExitCode> {
    let matches = command().get_matches();
    let global = GlobalArgs::from_arg_matches(&matches)?;
    let cuda = match global.device {
        DeviceRequest::Cpu => CudaBackend::Missing("--device cpu".to_string()),
        _ => device::load_cuda_backend(),
    };
    let probe = device::probe(&cuda);
    let outcome = run_verb(&matches, &global, cuda, &probe);
    remember_probe(&global, &probe);
    outcome
}

fn run_verb(
    matches: &clap::ArgMatches,
    global: &GlobalArgs,
    cuda: CudaBackend,
    probe: &CudaProbe,
) -> anyhow::Result<ExitCode> {
    let torch_context = || -> anyhow::Result<TorchContext> {
        let resolved = device::resolve(global.device, probe).map_err(anyhow::Error::msg)?;
        Ok(TorchContext {
            device: device::to_tch(resolved),
            cuda: cuda.clone(),
            probe: probe.clone(),
            cache_root: global.cache.clone(),
        })
    };
    match matches.subcommand() {
        Some(("doctor", _)) => doctor::run(&torch_context()?),
        Some(("sample", sub)) => sample::run(
            &torch_context()?,
            &sample::SampleArgs::from_arg_matches(sub)?,
        ),
        Some(("model", sub)) => model::run(
            model::ModelCommand::from_arg_matches(sub)?,
            &torch_context()?,
        ),
        Some(("bench", sub)) => bench::run(
            bench::BenchCommand::from_arg_matches(sub)?,
            &torch_context()?,
        ),
        _ => {
            let cli = Cli::from_arg_matches(matches)?;
            let backend = Backend {
                registry: crate::stages::registry(),
                probe: Some(probe.clone()),
                torch_in_process: true,
            };
            dreampipe_core::cli::run(cli, backend)
        }
    }
}

/// Memoizes libtorch's CUDA answer for the front binary, in a cache root that exists (a verb
/// that never touched the cache does not create one for it).
fn remember_probe(global: &GlobalArgs, probe: &CudaProbe) {
    if global.device != DeviceRequest::Cpu && Path::new(&global.cache).is_dir() {
        device::write_probe(&global.cache, probe);
    }
}
