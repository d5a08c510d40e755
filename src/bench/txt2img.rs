//! txt2img timing: the same work as `diffusers_bench.py txt2img` (DDIM, classifier-free
//! guidance, text encoding + UNet loop + VAE decode). One untimed warm-up generation of
//! `warmup_steps` steps, then one timed generation whose per-step callback times give the UNet step rate.
use super::{BenchError, Stamp, mean, peak_rss_mib, round4, seconds_since};
use crate::sd::pipeline::{Event, StableDiffusion, Txt2Img};
use crate::sd::schedulers::SchedulerKind;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind};

/// The prompt both sides encode (any prompt costs the same: CLIP always sees 77 tokens).
pub const BENCH_PROMPT: &str = "a photo of an astronaut riding a horse on mars";
/// diffusers' default guidance scale (classifier-free guidance on).
pub const BENCH_GUIDANCE: f64 = 7.5;
/// Default scheduler steps of the warm-up generation (enough to touch every kernel twice).
pub const DEFAULT_WARMUP_STEPS: usize = 2;

/// What to time.
#[derive(Debug, Clone)]
pub struct Txt2ImgBench {
    pub model: PathBuf,
    /// Label of the model in the report (`tiny`, `sd15`).
    pub label: String,
    /// Image side in pixels; None: the model's default size.
    pub size: Option<i64>,
    pub batch: i64,
    /// Scheduler steps of the timed generation (at least 2: the first step carries the text
    /// encoding, so the step rate is taken from steps 2..N).
    pub steps: usize,
    /// Scheduler steps of the untimed warm-up generation (0: none).
    pub warmup_steps: usize,
    pub threads: i32,
    pub device: Device,
    pub kind: Kind,
}

/// Loads the model, warms up, times one generation; returns the JSON record.
pub fn run(bench: &Txt2ImgBench) -> Result<Value, BenchError> {
    if bench.steps < 2 {
        return Err(BenchError::BadArgument {
            field: "steps",
            value: bench.steps.to_string(),
            problem: "must be at least 2 (the step rate is measured between step callbacks)",
        });
    }
    let started = Instant::now();
    let model = StableDiffusion::load(&bench.model, bench.device, bench.kind)?;
    let load_s = seconds_since(started);
    let size = bench.size.unwrap_or_else(|| model.default_size());
    let mut request = bench_request(bench, size);
    if bench.warmup_steps > 0 {
        model.txt2img(&request, &mut |_| {})?;
    }
    request.steps = bench.steps;
    let (total_s, total_cpu_s, intervals, cpu_intervals) = timed_generation(&model, &request)?;
    let step_s = mean(&intervals);
    let fastest_step_s = intervals.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(json!({
        "bench": "txt2img",
        "impl": "dreampipe",
        "model": bench.label,
        "device": device_name(bench.device),
        "dtype": format!("{:?}", bench.kind),
        "size": size,
        "batch": bench.batch,
        "steps": bench.steps,
        "warmup_steps": bench.warmup_steps,
        "threads": bench.threads,
        "load_s": round4(load_s),
        "unet_step_s": round4(step_s),
        "unet_steps_per_s": round4(1.0 / step_s),
        "unet_step_min_s": round4(fastest_step_s),
        "unet_step_times_s": intervals.iter().map(|t| round4(*t)).collect::<Vec<_>>(),
        "unet_step_cpu_s": round4(mean(&cpu_intervals)),
        "e2e_cpu_s_per_image": round4(total_cpu_s / bench.batch as f64),
        "e2e_s": round4(total_s),
        "e2e_s_per_image": round4(total_s / bench.batch as f64),
        "peak_rss_mib": round4(peak_rss_mib()),
    }))
}

/// The benchmark's generation at `size` (its steps are the warm-up's).
fn bench_request(bench: &Txt2ImgBench, size: i64) -> Txt2Img {
    Txt2Img {
        prompt: BENCH_PROMPT.to_string(),
        negative_prompt: String::new(),
        seed: 0,
        steps: bench.warmup_steps,
        guidance: BENCH_GUIDANCE,
        scheduler: Some(SchedulerKind::Ddim),
        width: Some(size),
        height: Some(size),
        batch: bench.batch,
    }
}

/// Runs `request` once, timed: (wall s, CPU s) of the whole generation, then the wall and CPU
/// seconds between consecutive step callbacks.
fn timed_generation(
    model: &StableDiffusion,
    request: &Txt2Img,
) -> Result<(f64, f64, Vec<f64>, Vec<f64>), BenchError> {
    let mut step_ends = Vec::with_capacity(request.steps);
    let started = Stamp::now();
    let output = model.txt2img(request, &mut |event| {
        if let Event::Step { latents, .. } = event {
            synchronize(latents);
            step_ends.push(Stamp::now());
        }
    })?;
    synchronize(&output.images);
    let (total_s, total_cpu_s) = started.until(&Stamp::now());
    let (intervals, cpu_intervals): (Vec<f64>, Vec<f64>) = step_ends
        .windows(2)
        .map(|pair| pair[0].until(&pair[1]))
        .unzip();
    Ok((total_s, total_cpu_s, intervals, cpu_intervals))
}

/// Waits for queued device work touching `tensor` (a no-op cost on the CPU, where ops are
/// synchronous); CUDA timings would otherwise measure kernel launches only.
pub fn synchronize(tensor: &tch::Tensor) {
    if let Device::Cuda(index) = tensor.device() {
        tch::Cuda::synchronize(index as i64);
    }
}

/// `cpu` / `cuda:N`, as the Python side writes `str(device)`.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(index) => format!("cuda:{index}"),
        _ => "cpu".to_string(),
    }
}
