//! `dreampipe bench txt2img|dreambooth` (hidden): the dreampipe half of `bench/run.sh`'s
//! comparison with diffusers. Each prints one JSON line (see `crate::bench`).
use super::TorchContext;
use super::sample::DType;
use crate::bench::{self, dreambooth::DreamBoothBench, txt2img::Txt2ImgBench};
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `dreampipe bench txt2img`.
#[derive(Debug, clap::Args)]
pub struct Txt2ImgArgs {
    /// A diffusers folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Name of the model in the report.
    #[arg(long, default_value = "model")]
    pub label: String,
    /// Image side in pixels (default: the model's own size).
    #[arg(long)]
    pub size: Option<i64>,
    #[arg(long, default_value_t = 1)]
    pub batch: i64,
    /// DDIM steps of the timed generation (≥ 2).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// DDIM steps of the untimed warm-up generation (0: none).
    #[arg(long, default_value_t = crate::bench::txt2img::DEFAULT_WARMUP_STEPS)]
    pub warmup_steps: usize,
    /// libtorch intra-op threads.
    #[arg(long, default_value_t = 2)]
    pub threads: i32,
    #[arg(long, default_value = "f32")]
    pub dtype: DType,
}

/// Arguments of `dreampipe bench dreambooth`.
#[derive(Debug, clap::Args)]
pub struct DreamBoothArgs {
    /// A diffusers folder.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = "model")]
    pub label: String,
    /// Training resolution in pixels.
    #[arg(long, default_value_t = 512)]
    pub resolution: i64,
    /// Timed optimizer steps (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Train the text encoder as well as the UNet.
    #[arg(long)]
    pub train_text_encoder: bool,
    /// `bf16`: the trained modules under autocast, frozen ones and latents in bf16 (as
    /// `accelerate --mixed_precision bf16`).
    #[arg(long, value_parser = ["no", "bf16"], default_value = "no")]
    pub mixed_precision: String,
    /// Train LoRA adapters of this rank instead of the full weights (train_dreambooth_lora.py).
    #[arg(long)]
    pub lora_rank: Option<i64>,
    /// libtorch intra-op threads.
    #[arg(long, default_value_t = 2)]
    pub threads: i32,
}

pub fn run_txt2img(context: &TorchContext, args: &Txt2ImgArgs) -> anyhow::Result<ExitCode> {
    bench::pin_threads(args.threads);
    let record = bench::txt2img::run(&Txt2ImgBench {
        model: args.model.clone(),
        label: args.label.clone(),
        size: args.size,
        batch: args.batch,
        steps: args.steps,
        warmup_steps: args.warmup_steps,
        threads: args.threads,
        device: context.device,
        kind: args.dtype.kind(),
    })?;
    println!("{record}");
    Ok(ExitCode::SUCCESS)
}

pub fn run_dreambooth(context: &TorchContext, args: &DreamBoothArgs) -> anyhow::Result<ExitCode> {
    bench::pin_threads(args.threads);
    let record = bench::dreambooth::run(&DreamBoothBench {
        model: args.model.clone(),
        label: args.label.clone(),
        resolution: args.resolution,
        steps: args.steps,
        train_text_encoder: args.train_text_encoder,
        mixed_precision: args.mixed_precision == "bf16",
        lora_rank: args.lora_rank,
        threads: args.threads,
        device: context.device,
    })?;
    println!("{record}");
    Ok(ExitCode::SUCCESS)
}
