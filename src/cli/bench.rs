//! `dreampipe bench ...` (hidden): micro-benchmarks. `bench unet` times the UNet forward of a
//! model folder on latents of a given size, the way one classifier-free-guidance sampling step
//! runs it (batch 2 = unconditional + conditional).
use super::TorchContext;
use crate::sd::unet::UNet2DConditionModel;
use anyhow::Context as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;
use tch::{Kind, Tensor};

/// Pixels per latent cell of the SD VAE (`2 ** (len(block_out_channels) - 1)` = 8).
const VAE_SCALE_FACTOR: i64 = 8;
/// Timestep the benchmark runs at (any value costs the same).
const BENCH_TIMESTEP: i64 = 500;
/// Length of CLIP-encoded prompts (`model_max_length`).
const PROMPT_TOKENS: i64 = 77;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Time one UNet forward (mean and min seconds per step) on random inputs.
    Unet(UnetArgs),
    /// txt2img (DDIM, CFG) step rate and seconds per image, as one JSON line.
    Txt2img(super::bench_sd::Txt2ImgArgs),
    /// One DreamBooth optimizer step: seconds and peak memory, as one JSON line.
    Dreambooth(super::bench_sd::DreamBoothArgs),
}

#[derive(Debug, clap::Args)]
pub struct UnetArgs {
    /// A diffusers folder (its unet/ is loaded).
    #[arg(long)]
    pub model: PathBuf,
    /// Image side in pixels; latents are size/8.
    #[arg(long, default_value_t = 512)]
    pub size: i64,
    /// Batch of the UNet call (2 = one image with classifier-free guidance).
    #[arg(long, default_value_t = 2)]
    pub batch: i64,
    /// Timed forwards (after the warm-up ones); at least 1.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: u64,
    /// Untimed forwards first (allocator and kernel warm-up).
    #[arg(long, default_value_t = 1)]
    pub warmup: u64,
    /// CPU threads for libtorch (intra-op).
    #[arg(long, default_value_t = 2)]
    pub threads: i32,
}

pub fn run(command: BenchCommand, context: &TorchContext) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::Unet(args) => bench_unet(&args, context),
        BenchCommand::Txt2img(args) => super::bench_sd::run_txt2img(context, &args),
        BenchCommand::Dreambooth(args) => super::bench_sd::run_dreambooth(context, &args),
    }
}

fn bench_unet(args: &UnetArgs, context: &TorchContext) -> anyhow::Result<ExitCode> {
    tch::set_num_threads(args.threads);
    let device = context.device;
    let unet_dir = args.model.join("unet");
    let load_started = Instant::now();
    let (_vs, unet) = UNet2DConditionModel::load(&unet_dir, device, Kind::Float, None)
        .with_context(|| format!("loading the UNet of {}", args.model.display()))?;
    let load_seconds = load_started.elapsed().as_secs_f64();
    let config = unet.config();
    let side = args.size / VAE_SCALE_FACTOR;
    let options = (Kind::Float, device);
    let latents = Tensor::randn([args.batch, config.in_channels, side, side], options);
    let context_states = Tensor::randn(
        [args.batch, PROMPT_TOKENS, config.cross_attention_dim],
        options,
    );
    let timestep = Tensor::from(BENCH_TIMESTEP).to_device(device);
    let _guard = tch::no_grad_guard();
    let step = || {
        let (started, cpu_started) = (Instant::now(), process_cpu_seconds());
        let output = unet.forward(&latents, &timestep, &context_states);
        let _ = output.sum(Kind::Float).double_value(&[]);
        let cpu = process_cpu_seconds() - cpu_started;
        (started.elapsed().as_secs_f64(), cpu)
    };
    for _ in 0..args.warmup {
        step();
    }
    let (times, cpu_times): (Vec<f64>, Vec<f64>) = (0..args.steps).map(|_| step()).unzip();
    let (mean, min) = mean_and_min(&times);
    let (cpu_mean, cpu_min) = mean_and_min(&cpu_times);
    println!("unet load: {load_seconds:.1} s");
    println!(
        "unet forward: batch {} at {}x{} latents ({}x{} px), {:?}, {} threads",
        args.batch, side, side, args.size, args.size, device, args.threads
    );
    let listed: Vec<String> = times.iter().map(|t| format!("{t:.2}")).collect();
    println!("steps (s): {}", listed.join(" "));
    println!("mean {mean:.3} s/step, min {min:.3} s/step (wall clock)");
    println!("mean {cpu_mean:.3} s/step, min {cpu_min:.3} s/step (process CPU time, all threads)");
    Ok(ExitCode::SUCCESS)
}

fn mean_and_min(values: &[f64]) -> (f64, f64) {
    let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    (mean, values.iter().copied().fold(f64::INFINITY, f64::min))
}

/// CPU time this process has used so far, all threads (`CLOCK_PROCESS_CPUTIME_ID`); less
/// sensitive than wall time to other processes competing for the cores.
fn process_cpu_seconds() -> f64 {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid, writable timespec for the duration of the call.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut time) };
    if status != 0 {
        return f64::NAN;
    }
    time.tv_sec as f64 + time.tv_nsec as f64 * 1e-9
}
