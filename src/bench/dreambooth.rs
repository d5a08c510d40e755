//! One DreamBooth optimizer step, timed: the work of the training loop of diffusers'
//! `examples/dreambooth/train_dreambooth.py` for one batch (no prior preservation):
//! VAE-encode the instance image and sample its latent (frozen VAE, no graph), scale, draw
//! noise and a timestep, `DDPMScheduler.add_noise`, encode the prompt (with a graph when the
//! text encoder trains), UNet forward, MSE against the noise, backward,
//! `clip_grad_norm_(max_norm=1)`, `AdamW.step`, `zero_grad(set_to_none=False)`.
//! Built from the `sd::train` building blocks (the DreamBooth library loop was not merged
//! when this was written); `bench/diffusers_bench.py dreambooth` does the same in PyTorch.
use super::txt2img::{device_name, synchronize};
use super::{BenchError, Stamp, mean, peak_rss_mib, round4, seconds_since};
use crate::sd::autocast::{self, Autocast};
use crate::sd::clip::ClipTextModel;
use crate::sd::folder::ModelFolder;
use crate::sd::schedulers::SchedulerConfig;
use crate::sd::schedulers::ddpm::DdpmScheduler;
use crate::sd::tokenizer::ClipTokenizer;
use crate::sd::train::lora::{self, LoraSettings};
use crate::sd::train::loss;
use crate::sd::train::optim::{AdamW, AdamWConfig, clip_grad_norm};
use crate::sd::unet::UNet2DConditionModel;
use crate::sd::vae::AutoencoderKL;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor, nn::VarStore};

/// train_dreambooth.py's `--instance_prompt` style prompt.
pub const INSTANCE_PROMPT: &str = "a photo of sks dog";
/// train_dreambooth.py defaults: `--learning_rate 5e-6`, `--adam_weight_decay 1e-2`,
/// `--adam_epsilon 1e-8`, betas (0.9, 0.999), `--max_grad_norm 1.0`.
pub const LEARNING_RATE: f64 = 5e-6;
pub const WEIGHT_DECAY: f64 = 1e-2;
pub const ADAM_EPSILON: f64 = 1e-8;
pub const MAX_GRAD_NORM: f64 = 1.0;
/// Untimed steps first: the first step allocates the AdamW moments and the gradients.
pub const WARMUP_STEPS: usize = 1;

/// What to time.
#[derive(Debug, Clone)]
pub struct DreamBoothBench {
    pub model: PathBuf,
    pub label: String,
    /// Training resolution in pixels (`--resolution`).
    pub resolution: i64,
    /// Timed optimizer steps.
    pub steps: usize,
    /// Train the text encoder too (`--train_text_encoder`).
    pub train_text_encoder: bool,
    /// bf16 mixed precision (autocast for the trained modules).
    pub mixed_precision: bool,
    /// LoRA of this rank (alpha = rank) instead of full fine-tuning: the base stays frozen.
    pub lora_rank: Option<i64>,
    pub threads: i32,
    pub device: Device,
}

/// The models and optimizer of one run.
struct Trainer {
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: ClipTextModel,
    noise_scheduler: DdpmScheduler,
    optimizer: AdamW,
    trainable: Vec<Tensor>,
    input_ids: Tensor,
    pixel_values: Tensor,
    train_text_encoder: bool,
    autocast: Option<Autocast>,
    /// Own the weights the modules view.
    _stores: Vec<VarStore>,
}

/// Loads the model, runs the warm-up step, times `steps` steps; returns the JSON record.
pub fn run(bench: &DreamBoothBench) -> Result<Value, BenchError> {
    if bench.steps < 1 {
        return Err(BenchError::BadArgument {
            field: "steps",
            value: bench.steps.to_string(),
            problem: "must be at least 1",
        });
    }
    let started = Instant::now();
    let mut trainer = Trainer::load(bench)?;
    let load_s = seconds_since(started);
    tch::manual_seed(0);
    let mut losses = Vec::with_capacity(WARMUP_STEPS + bench.steps);
    for _ in 0..WARMUP_STEPS {
        losses.push(trainer.step(&mut Phases::default())?);
    }
    let mut step_times = Vec::with_capacity(bench.steps);
    let mut step_cpu_times = Vec::with_capacity(bench.steps);
    let mut phases = Phases::default();
    for _ in 0..bench.steps {
        let started = Stamp::now();
        losses.push(trainer.step(&mut phases)?);
        let (wall, cpu) = started.until(&Stamp::now());
        step_times.push(wall);
        step_cpu_times.push(cpu);
    }
    let step_s = mean(&step_times);
    let fastest_step_s = step_times.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(json!({
        "bench": "dreambooth",
        "impl": "dreampipe",
        "model": bench.label,
        "device": device_name(bench.device),
        // The report pairs records by dtype: mixed precision is its own row.
        "dtype": if bench.mixed_precision { "bf16 autocast" } else { "Float" },
        "resolution": bench.resolution,
        "batch": 1,
        "train_text_encoder": bench.train_text_encoder,
        "mixed_precision": if bench.mixed_precision { "bf16" } else { "no" },
        "lora_rank": bench.lora_rank,
        "steps": bench.steps,
        "threads": bench.threads,
        "load_s": round4(load_s),
        "step_s": round4(step_s),
        "step_min_s": round4(fastest_step_s),
        "step_cpu_s": round4(mean(&step_cpu_times)),
        "step_times_s": step_times.iter().map(|t| round4(*t)).collect::<Vec<_>>(),
        "trainable_params": trainer.trainable.iter().map(|t| t.numel() as i64).sum::<i64>(),
        "losses": losses,
        "phases_s": phases.means(bench.steps, false),
        "phases_cpu_s": phases.means(bench.steps, true),
        "peak_rss_mib": round4(peak_rss_mib()),
    }))
}

/// The model's DDPM noise scheduler (from its scheduler config).
fn ddpm_scheduler(folder: &ModelFolder, dir: &Path) -> Result<DdpmScheduler, BenchError> {
    let config_file = folder.scheduler_dir().join("scheduler_config.json");
    let scheduler_config = SchedulerConfig::from_file(&config_file)
        .map_err(|e| load_error(dir, "scheduler config", e))?;
    DdpmScheduler::new(&scheduler_config).map_err(|e| load_error(dir, "DDPM scheduler", e))
}

/// What the benchmark trains: LoRA adapters (UNet, and the text encoder when it trains; the
/// base weights frozen), or the UNet's (and the text encoder's) own weights.
fn trainable_tensors(
    bench: &DreamBoothBench,
    (unet_store, unet): (&mut VarStore, &mut UNet2DConditionModel),
    (te_store, text_encoder): (&mut VarStore, &mut ClipTextModel),
) -> Vec<Tensor> {
    match bench.lora_rank {
        Some(rank) => {
            unet_store.freeze();
            te_store.freeze();
            let settings = LoraSettings {
                rank,
                alpha: rank as f64,
            };
            let text = bench.train_text_encoder.then_some(text_encoder);
            let texts = lora::TextEncoders {
                first: text,
                second: None,
            };
            let named = lora::add_trainable_adapters(unet, texts, settings, 0, bench.device);
            named.into_iter().map(|(_, tensor)| tensor).collect()
        }
        None => {
            let mut trainable = unet_store.trainable_variables();
            if bench.train_text_encoder {
                trainable.extend(te_store.trainable_variables());
            } else {
                te_store.freeze();
            }
            trainable
        }
    }
}

impl Trainer {
    fn load(bench: &DreamBoothBench) -> Result<Self, BenchError> {
        let dir = &bench.model;
        let folder = ModelFolder::open(dir).map_err(|e| load_error(dir, "model folder", e))?;
        let device = bench.device;
        let weight_kind = match bench.mixed_precision {
            true => Kind::BFloat16,
            false => Kind::Float,
        };
        let text_kind = match bench.train_text_encoder {
            true => Kind::Float,
            false => weight_kind,
        };
        let tokenizer = ClipTokenizer::from_dir(&folder.tokenizer_dir())
            .map_err(|e| load_error(dir, "tokenizer", e))?;
        let (mut te_store, mut text_encoder) =
            ClipTextModel::load(&folder.text_encoder_dir(), device, text_kind, None)
                .map_err(|e| load_error(dir, "text encoder", e))?;
        let (mut unet_store, mut unet) =
            UNet2DConditionModel::load(&folder.unet_dir(), device, Kind::Float, None)
                .map_err(|e| load_error(dir, "UNet", e))?;
        let (mut vae_store, vae) =
            AutoencoderKL::load(&folder.vae_dir(), device, weight_kind, None)
                .map_err(|e| load_error(dir, "VAE", e))?;
        vae_store.freeze();
        let noise_scheduler = ddpm_scheduler(&folder, dir)?;
        let trainable = trainable_tensors(
            bench,
            (&mut unet_store, &mut unet),
            (&mut te_store, &mut text_encoder),
        );
        let optimizer = AdamW::new(&trainable, adamw_config());
        let ids = tokenizer.encode(INSTANCE_PROMPT).ids;
        let input_ids = Tensor::from_slice(&ids).unsqueeze(0).to_device(device);
        tch::manual_seed(0);
        let shape = [1, 3, bench.resolution, bench.resolution];
        let pixel_values = (Tensor::rand(shape, (Kind::Float, Device::Cpu)) * 2.0 - 1.0)
            .to_device(device)
            .to_kind(weight_kind);
        Ok(Self {
            unet,
            vae,
            text_encoder,
            noise_scheduler,
            optimizer,
            trainable,
            input_ids,
            pixel_values,
            train_text_encoder: bench.train_text_encoder,
            autocast: (weight_kind != Kind::Float).then_some(Autocast {
                device,
                kind: weight_kind,
            }),
            _stores: vec![te_store, unet_store, vae_store],
        })
    }

    /// One optimizer step; returns the loss. `phases` gets the seconds of each part added.
    fn step(&mut self, phases: &mut Phases) -> Result<f64, BenchError> {
        let mut lap = Lap::start();
        let latents = tch::no_grad(|| self.vae.encode(&self.pixel_values).sample())
            * self.vae.scaling_factor();
        let noise = latents.randn_like();
        let train_steps = self.noise_scheduler.num_train_timesteps() as i64;
        let timesteps = Tensor::randint(train_steps, [1], (Kind::Int64, latents.device()));
        let noisy = self
            .noise_scheduler
            .add_noise(&latents, &noise, &timesteps)
            .map_err(|e| BenchError::Train(crate::sd::train::TrainError::Loss(e.to_string())))?;
        phases.add(PHASES[0], lap.next(&noisy));
        let hidden = self.encode_prompt()?;
        phases.add(PHASES[1], lap.next(&hidden));
        let prediction = self.under_autocast(|| self.unet.forward(&noisy, &timesteps, &hidden))?;
        let loss = loss::mse(
            &prediction.to_kind(Kind::Float),
            &noise.to_kind(Kind::Float),
        )?;
        phases.add(PHASES[2], lap.next(&loss));
        loss.backward();
        phases.add(PHASES[3], lap.next(&loss));
        clip_grad_norm(&self.trainable, MAX_GRAD_NORM);
        phases.add(PHASES[4], lap.next(&loss));
        self.optimizer.step()?;
        self.optimizer.zero_grad();
        let value = loss.double_value(&[]);
        phases.add(PHASES[5], lap.next(&loss));
        Ok(value)
    }

    fn encode_prompt(&self) -> Result<Tensor, BenchError> {
        let forward = || self.text_encoder.forward(&self.input_ids);
        let output = if self.train_text_encoder {
            self.under_autocast(forward)?
        } else {
            tch::no_grad(forward)
        };
        let hidden = output
            .map(|o| o.last_hidden_state)
            .map_err(|e| load_error(Path::new("text_encoder"), "prompt encoding", e))?;
        // accelerate converts a prepared module's outputs to float32.
        Ok(match (self.train_text_encoder, self.autocast) {
            (true, Some(_)) => hidden.to_kind(Kind::Float),
            _ => hidden,
        })
    }

    /// A trained module's forward: under autocast with mixed precision (as accelerate wraps
    /// prepared modules).
    fn under_autocast<T>(&self, forward: impl FnOnce() -> T) -> Result<T, BenchError> {
        autocast::maybe(self.autocast, forward)
            .map_err(|e| BenchError::Train(crate::sd::train::TrainError::Model(e)))
    }
}

/// The parts of a step timed separately (the Python side uses the same names).
pub const PHASES: [&str; 6] = [
    "vae_encode_and_noise",
    "text_encoder",
    "unet_forward_and_loss",
    "backward",
    "clip_grad_norm",
    "optimizer_step",
];

/// (wall, CPU) seconds spent in each phase, summed over steps.
#[derive(Default)]
struct Phases(std::collections::BTreeMap<&'static str, (f64, f64)>);

impl Phases {
    fn add(&mut self, phase: &'static str, (wall, cpu): (f64, f64)) {
        let total = self.0.entry(phase).or_default();
        total.0 += wall;
        total.1 += cpu;
    }

    /// `{phase: mean seconds per step}` of the wall (`cpu == false`) or CPU times.
    fn means(&self, steps: usize, cpu: bool) -> Value {
        let steps = steps.max(1) as f64;
        Value::Object(
            self.0
                .iter()
                .map(|(phase, (wall, cpu_s))| {
                    let total = if cpu { cpu_s } else { wall };
                    (phase.to_string(), json!(round4(total / steps)))
                })
                .collect(),
        )
    }
}

/// A stopwatch whose laps end once the device has finished the work producing a tensor.
struct Lap(Stamp);

impl Lap {
    fn start() -> Self {
        Self(Stamp::now())
    }

    /// (wall, CPU) seconds since the previous lap, after waiting for `produced`'s device.
    fn next(&mut self, produced: &Tensor) -> (f64, f64) {
        synchronize(produced);
        let now = Stamp::now();
        let lap = self.0.until(&now);
        self.0 = now;
        lap
    }
}

fn adamw_config() -> AdamWConfig {
    AdamWConfig {
        lr: LEARNING_RATE,
        weight_decay: WEIGHT_DECAY,
        eps: ADAM_EPSILON,
        ..AdamWConfig::default()
    }
}

fn load_error(dir: &Path, component: &'static str, error: impl std::fmt::Display) -> BenchError {
    BenchError::Load {
        dir: dir.to_path_buf(),
        component,
        reason: error.to_string(),
    }
}
