//! `dreampipe model ...`: model-folder utilities. `model init` writes a diffusers folder with
//! seeded random weights in a known architecture (for benchmarks and tests without checkpoints).
use super::Context;
use crate::sd::init::{self, Architecture, InitOptions, WeightDtype};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Debug, clap::Subcommand)]
pub enum ModelCommand {
    /// Write a complete diffusers folder (configs, tokenizer, random weights) in an architecture.
    Init(InitArgs),
}

/// Arguments of `dreampipe model init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Architecture whose real configs are written: tiny (models/tiny-sd), sd15, sd21.
    #[arg(long, value_enum)]
    pub like: LikeArg,
    /// Seed of the random weights; the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Precision of the weight files (plain file names either way).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// Output folder; must not exist or be empty.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LikeArg {
    Tiny,
    Sd15,
    Sd21,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
}

pub fn run(command: ModelCommand, _context: &Context) -> anyhow::Result<ExitCode> {
    match command {
        ModelCommand::Init(args) => run_init(&args),
    }
}

fn run_init(args: &InitArgs) -> anyhow::Result<ExitCode> {
    let options = InitOptions {
        architecture: match args.like {
            LikeArg::Tiny => Architecture::Tiny,
            LikeArg::Sd15 => Architecture::Sd15,
            LikeArg::Sd21 => Architecture::Sd21,
        },
        seed: args.seed,
        dtype: match args.dtype {
            DtypeArg::F32 => WeightDtype::F32,
            DtypeArg::F16 => WeightDtype::F16,
        },
    };
    let started = Instant::now();
    let reports = init::write_model_folder(&args.out, &options)?;
    for report in &reports {
        println!(
            "{:<12} {:>13} parameters  {:>14} bytes  {}",
            report.component.folder(),
            report.parameters,
            report.bytes,
            report.file.display()
        );
    }
    println!(
        "wrote {} (like {}, seed {}, {:?}) in {:.1}s",
        args.out.display(),
        options.architecture.name(),
        options.seed,
        args.dtype,
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
