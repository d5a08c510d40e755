//! Command-line verbs. Each verb lives in its own file; this module holds the global flags and
//! dispatches. Global flags: `--device`, `--cache`.
//!
//! Two binaries share this CLI. The front `dreampipe` has no libtorch: the verbs that need
//! tensors are registered by the binaries as [`ExternalVerb`]s (this crate names none); the
//! front lists them and hands them off ([`Handoff`], also for a `run` with a torch stage left to
//! compute) by re-executing the command in `dreampipe-torch`, which gives them their real
//! arguments and runs it whole (docs/startup.md).
use crate::device::{self, CudaProbe, Device, DeviceRequest};
use crate::stages::Registry;
use clap::{Args, CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod bench_cache;
mod cache;
mod common;
mod dag;
mod explain;
mod init;
mod job;
mod plan;
mod report;
mod run;
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
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// The flags every verb accepts, anywhere on the command line.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Where computations run: auto (CUDA when usable), cpu, cuda, cuda:N.
    #[arg(long, global = true, default_value = "auto", env = "DREAMPIPE_DEVICE")]
    pub device: DeviceRequest,
    /// Cache root (content-addressed store of stage outputs).
    #[arg(long, global = true, default_value = "cache", env = "DREAMPIPE_CACHE")]
    pub cache: PathBuf,
}

/// Arguments of an [`ExternalVerb`] as this crate declares it: anything, passed on unparsed (the
/// torch worker replaces the stub with the real arguments; see `dreampipe::cli`).
#[derive(Debug, Args)]
#[command(disable_help_flag = true)]
pub struct WorkerArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub args: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
    /// Run one stage from a job file (what a Slurm job runs; docs/cluster.md).
    #[command(hide = true)]
    Job(job::JobArgs),
}

/// A verb that another process implements (the torch worker's), registered by the binaries:
/// [`command`] lists it as a stub taking any arguments ([`WorkerArgs`]).
#[derive(Debug, Clone, Copy)]
pub struct ExternalVerb {
    pub name: &'static str,
    /// Its line in `--help`.
    pub about: Option<&'static str>,
    pub hidden: bool,
    /// The core verb it is listed before in `--help` (`None`: after the core's verbs).
    pub before: Option<&'static str>,
}

/// The whole command line: the core's verbs ([`Cli`]) and `external`, in the `--help` order
/// the verbs' `before` give.
pub fn command(external: &[ExternalVerb]) -> clap::Command {
    let mut command = Cli::command();
    let mut order: Vec<String> = (command.get_subcommands())
        .map(|verb| verb.get_name().to_string())
        .collect();
    for verb in external {
        let at = (verb.before)
            .and_then(|before| order.iter().position(|name| name == before))
            .unwrap_or(order.len());
        order.insert(at, verb.name.to_string());
        let mut stub = WorkerArgs::augment_args(clap::Command::new(verb.name)).hide(verb.hidden);
        if let Some(about) = verb.about {
            stub = stub.about(about);
        }
        command = command.subcommand(stub);
    }
    for (position, name) in order.iter().enumerate() {
        command = command.mut_subcommand(name, |verb| verb.display_order(position));
    }
    command
}

/// What the command line asks for: a core verb, or one of the registered external verbs.
pub enum Parsed {
    Core(Cli),
    External(String),
}

/// Reads `matches` (from [`command`] with `external`) into a [`Parsed`].
pub fn parse(matches: &clap::ArgMatches, external: &[ExternalVerb]) -> clap::error::Result<Parsed> {
    use clap::FromArgMatches;
    if let Some(name) = matches.subcommand_name()
        && external.iter().any(|verb| verb.name == name)
    {
        return Ok(Parsed::External(name.to_string()));
    }
    Cli::from_arg_matches(matches).map(Parsed::Core)
}

/// This command needs libtorch, which this process does not have: run it in `dreampipe-torch`.
#[derive(Debug, thiserror::Error)]
#[error("this command needs the torch worker (dreampipe-torch)")]
pub struct Handoff;

/// What the process running the verbs can do.
pub struct Backend {
    /// The stage kinds (the worker's have the Stable Diffusion implementations).
    pub registry: Registry,
    /// libtorch's CUDA answer when this process has it (the worker); the front reads the memo.
    pub probe: Option<CudaProbe>,
    /// Whether torch stage kinds run in this process.
    pub torch_in_process: bool,
}

impl Backend {
    /// The front binary's: `registry` (kinds that need libtorch as schemas only), the CUDA
    /// answer from `<cache>/devices.json`.
    pub fn front(cache_root: &std::path::Path, registry: Registry) -> Self {
        Self {
            registry,
            probe: device::read_probe(cache_root),
            torch_in_process: false,
        }
    }
}

/// Everything a verb needs from the global flags, resolved once.
pub struct Context {
    pub device: Device,
    /// What `--device` asked for (`auto` also spreads GPU stages over every GPU).
    pub device_request: DeviceRequest,
    pub cache_root: PathBuf,
    pub registry: Registry,
    pub probe: Option<CudaProbe>,
    pub torch_in_process: bool,
}

impl Context {
    /// Resolves a `--device`-style request ([`Handoff`] when only libtorch can answer).
    pub fn resolve(&self, request: DeviceRequest) -> anyhow::Result<Device> {
        if request == DeviceRequest::Cpu {
            return Ok(Device::Cpu);
        }
        let probe = self.probe.as_ref().ok_or(Handoff)?;
        device::resolve(request, probe).map_err(anyhow::Error::msg)
    }

    /// Every device `auto` can use: each visible GPU, else the CPU.
    pub fn every_device(&self) -> anyhow::Result<Vec<Device>> {
        let probe = self.probe.as_ref().ok_or(Handoff)?;
        Ok(device::every_device(probe))
    }
}

/// Runs the verb; the returned exit code is success unless the verb says otherwise.
pub fn run(cli: Cli, backend: Backend) -> anyhow::Result<ExitCode> {
    let mut context = Context {
        device: Device::Cpu,
        device_request: cli.global.device,
        cache_root: cli.global.cache,
        registry: backend.registry,
        probe: backend.probe,
        torch_in_process: backend.torch_in_process,
    };
    context.device = context.resolve(cli.global.device)?;
    match cli.command {
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
        Command::Job(args) => job::run(&context, &args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXTERNAL: &[ExternalVerb] = &[
        ExternalVerb {
            name: "first",
            about: Some("Listed before run"),
            hidden: false,
            before: Some("run"),
        },
        ExternalVerb {
            name: "last",
            about: None,
            hidden: false,
            before: None,
        },
    ];

    /// External verbs take any arguments, parse as [`Parsed::External`] and sit in `--help`
    /// where `before` puts them; the core's verbs parse as before.
    #[test]
    fn external_verbs_are_listed_in_order_and_handed_back_unparsed() {
        let help = command(EXTERNAL).render_help().to_string();
        let at = |verb: &str| help.find(&format!("\n  {verb} ")).expect(verb);
        assert!(at("first") < at("run") && at("run") < at("show") && at("show") < at("last"));
        let matches = command(EXTERNAL)
            .try_get_matches_from(["dreampipe", "first", "--anything", "x"])
            .expect("parses");
        assert!(matches!(parse(&matches, EXTERNAL), Ok(Parsed::External(name)) if name == "first"));
        let matches = command(EXTERNAL)
            .try_get_matches_from(["dreampipe", "validate", "p.yaml"])
            .expect("parses");
        let Ok(Parsed::Core(cli)) = parse(&matches, EXTERNAL) else {
            panic!("validate is a core verb")
        };
        assert!(matches!(cli.command, Command::Validate(_)));
    }
}
