//! `dreampipe model ...`: model-folder utilities. `model init` writes a diffusers folder with
//! seeded random weights in a known architecture (for benchmarks and tests without checkpoints);
//! `model import` / `model export` turn a single-file checkpoint into a diffusers folder and back
//! (`sd::single_file`).
use super::TorchContext;
use crate::embed::init::{EmbedArchitecture, write_folder};
use crate::sd::init::{self, Architecture, InitOptions, WeightDtype};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Debug, clap::Subcommand)]
pub enum ModelCommand {
    /// Write a complete diffusers folder (configs, tokenizer, random weights) in an architecture.
    Init(InitArgs),
    /// Turn a single-file SD 1.x/2.x `.safetensors` checkpoint into a diffusers folder.
    Import(ImportArgs),
    /// Write a diffusers folder as one single-file `.safetensors` (A1111 / ComfyUI layout).
    Export(ExportArgs),
}

/// Arguments of `dreampipe model import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The single file (`.safetensors`; `.ckpt` pickles are refused).
    pub file: PathBuf,
    /// Output folder (replaced if it exists).
    #[arg(long)]
    pub out: PathBuf,
    /// A diffusers folder whose configs and tokenizer (no weights needed) describe the model;
    /// needed for shapes other than the standard SD 1.x / 2.x ones.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// `epsilon` or `v_prediction` (SD 2.x 768 models); the file cannot say.
    #[arg(long, value_parser = ["epsilon", "v_prediction", "sample"])]
    pub prediction_type: Option<String>,
}

/// Arguments of `dreampipe model export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The diffusers folder.
    pub folder: PathBuf,
    /// The single file to write (`.safetensors`).
    #[arg(long)]
    pub out: PathBuf,
    /// Precision of the written tensors.
    #[arg(long, value_parser = ["f32", "f16", "bf16"], default_value = "f16")]
    pub dtype: String,
}

/// Arguments of `dreampipe model init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Architecture whose real configs are written: tiny (models/tiny-sd), sd15, sd21, sdxl
    /// (diffusers folders; sdxl needs ~11 GB of memory and 7 GB of disk with --dtype f16); clip-l14, clip-b32 (transformers CLIPModel) and dino-s16 (ViTModel) for the
    /// `evaluate` stage, and their tiny test versions clip-tiny, dino-tiny.
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
    Sdxl,
    ClipL14,
    ClipB32,
    DinoS16,
    ClipTiny,
    DinoTiny,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
}

pub fn run(command: ModelCommand, _context: &TorchContext) -> anyhow::Result<ExitCode> {
    match command {
        ModelCommand::Init(args) => run_init(&args),
        ModelCommand::Import(args) => run_import(&args),
        ModelCommand::Export(args) => run_export(&args),
    }
}

fn run_import(args: &ImportArgs) -> anyhow::Result<ExitCode> {
    let options = crate::sd::single_file::ImportOptions {
        config: args.config.clone(),
        prediction_type: args.prediction_type.clone(),
    };
    let started = Instant::now();
    crate::sd::single_file::import(&args.file, &options, &args.out)?;
    println!(
        "wrote {} from {} in {:.1}s",
        args.out.display(),
        args.file.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn run_export(args: &ExportArgs) -> anyhow::Result<ExitCode> {
    let kind = match args.dtype.as_str() {
        "f32" => tch::Kind::Float,
        "bf16" => tch::Kind::BFloat16,
        _ => tch::Kind::Half,
    };
    let started = Instant::now();
    crate::sd::single_file::export(&args.folder, &args.out, kind)?;
    println!(
        "wrote {} ({} bytes) in {:.1}s",
        args.out.display(),
        std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn run_init(args: &InitArgs) -> anyhow::Result<ExitCode> {
    let dtype = match args.dtype {
        DtypeArg::F32 => WeightDtype::F32,
        DtypeArg::F16 => WeightDtype::F16,
    };
    let architecture = match args.like {
        LikeArg::Tiny => Architecture::Tiny,
        LikeArg::Sd15 => Architecture::Sd15,
        LikeArg::Sd21 => Architecture::Sd21,
        LikeArg::Sdxl => Architecture::Sdxl,
        LikeArg::ClipL14 => return run_embed_init(args, EmbedArchitecture::ClipL14, dtype),
        LikeArg::ClipB32 => return run_embed_init(args, EmbedArchitecture::ClipB32, dtype),
        LikeArg::DinoS16 => return run_embed_init(args, EmbedArchitecture::DinoS16, dtype),
        LikeArg::ClipTiny => return run_embed_init(args, EmbedArchitecture::ClipTiny, dtype),
        LikeArg::DinoTiny => return run_embed_init(args, EmbedArchitecture::DinoTiny, dtype),
    };
    let options = InitOptions {
        architecture,
        seed: args.seed,
        dtype,
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

/// `model init --like clip-l14|clip-b32|dino-s16`: a transformers folder for `evaluate`.
fn run_embed_init(
    args: &InitArgs,
    architecture: EmbedArchitecture,
    dtype: WeightDtype,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let report = write_folder(&args.out, architecture, args.seed, dtype)?;
    println!(
        "wrote {} (like {}, seed {}, {:?}): {} parameters in {} in {:.1}s; random weights: scores made with it mean nothing",
        args.out.display(),
        architecture.name(),
        args.seed,
        args.dtype,
        report.parameters,
        report.file.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
