//! What the DreamBooth and textual-inversion loops share: mixed-precision and optimizer choices,
//! the per-step random streams (derived from `(seed, step)` so a resumed run draws exactly what
//! an uninterrupted one would), the diffusion loss of one batch with explicit latents / noise /
//! timesteps, progress callbacks and the `metrics.jsonl` log.
use super::TrainError;
use super::adamw8bit::AdamW8bit;
use super::grad_scaler::GradScaler;
use super::loss::{self, PredictionType};
use super::optim::{AdamW, AdamWConfig};
use crate::sd::autocast::{self, Autocast};
use crate::sd::rng::{self, SeededScope};
use crate::sd::schedulers::{DdpmScheduler, SchedulerConfig};
use crate::sd::unet::UNet2DConditionModel;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Device, Kind, Tensor, nn::VarStore};

/// Name of the per-step metrics file written into the output directory (the stage-output
/// contract's name, shared with the report that reads it).
pub use dreampipe_core::report::build::METRICS_FILE;
/// train_dreambooth.py adds `0.1 * randn(b, c, 1, 1)` with `--offset_noise`.
pub const OFFSET_NOISE_SCALE: f64 = 0.1;
/// Training resolutions must be multiples of this (SD's VAE downsamples by 8; 8 also covers
/// the tiny test model's factor 4).
pub const RESOLUTION_MULTIPLE: u32 = 8;
/// Salts that keep the derived random streams of one step apart.
const SALT_TENSORS: u64 = 0x7465_6e73_6f72_7321;
const SALT_SAMPLE: u64 = 0x7361_6d70_6c65_7321;
const SALT_EPOCH: u64 = 0x6570_6f63_6873_2121;

use dreampipe_core::stages::sd_kinds::training::TrainingParams;
/// `--mixed_precision` (`no | fp16 | bf16`) and `--use_8bit_adam` (`adamw | adamw8bit`): the
/// stage schemas' closed sets, parsed where the stage's fields are.
pub use dreampipe_core::stages::sd_kinds::training::{MixedPrecision, OptimizerKind};

/// `--mixed_precision` as accelerate applies it: the frozen modules run in the lower precision;
/// the trained modules keep float32 weights and run their forward (so their backward) under
/// libtorch's autocast; fp16 also scales the loss ([`GradScaler`]).
pub trait MixedPrecisionExt: Copy {
    /// The dtype frozen modules run in on `device`. fp16 needs CUDA (libtorch's CPU half
    /// kernels are incomplete and slow); bf16 works on both.
    fn weight_kind(self, device: Device) -> Result<Kind, TrainError>;
    /// The autocast region the trained modules' forward runs in (None without mixed
    /// precision).
    fn autocast(self, device: Device) -> Result<Option<Autocast>, TrainError>;
    /// fp16's dynamic loss scaling (torch.amp.GradScaler's defaults); bf16 needs none.
    fn grad_scaler(self) -> Option<GradScaler>;
}

impl MixedPrecisionExt for MixedPrecision {
    fn weight_kind(self, device: Device) -> Result<Kind, TrainError> {
        match (self, device) {
            (Self::No, _) => Ok(Kind::Float),
            (Self::Bf16, _) => Ok(Kind::BFloat16),
            (Self::Fp16, Device::Cuda(_)) => Ok(Kind::Half),
            (Self::Fp16, _) => Err(TrainError::Config {
                field: "mixed_precision",
                problem: "fp16 needs a CUDA device; on CPU use 'bf16' or 'no'".to_string(),
            }),
        }
    }

    fn autocast(self, device: Device) -> Result<Option<Autocast>, TrainError> {
        let kind = self.weight_kind(device)?;
        Ok((kind != Kind::Float).then_some(Autocast { device, kind }))
    }

    fn grad_scaler(self) -> Option<GradScaler> {
        (self == Self::Fp16).then(GradScaler::default)
    }
}

/// A kind's typed fields at its schema's defaults but for `given` (the required ones): the
/// library configs' starting point, so a default is written once, in the stage schema.
pub fn schema_defaults<P: serde::de::DeserializeOwned>(
    schema: &[dreampipe_core::stages::ParamSpec],
    given: serde_json::Value,
) -> P {
    let given = given.as_object().cloned().unwrap_or_default();
    // The kinds' unit tests check that every schema's defaults parse into its struct.
    dreampipe_core::stages::params::with_defaults(schema, given)
        .unwrap_or_else(|e| panic!("a stage schema's defaults do not fit its struct: {e}"))
}

/// Rejects shared settings the training loop cannot run, naming the option (the stage schema
/// refuses them already; library callers build configs by hand).
pub fn validate_training(training: &TrainingParams, device: Device) -> Result<(), TrainError> {
    let fail = |field: &'static str| {
        Err(TrainError::Config {
            field,
            problem: "must be at least 1".to_string(),
        })
    };
    if training.train_batch_size == 0 {
        return fail("train_batch_size");
    }
    if training.gradient_accumulation_steps == 0 {
        return fail("gradient_accumulation_steps");
    }
    if training.checkpointing_steps == 0 {
        return fail("checkpointing_steps");
    }
    let resolution = training.resolution;
    if resolution == 0 || !resolution.is_multiple_of(RESOLUTION_MULTIPLE) {
        return Err(TrainError::Config {
            field: "resolution",
            problem: "must be a positive multiple of 8".to_string(),
        });
    }
    training.mixed_precision.weight_kind(device).map(|_| ())
}

/// The optimizer of a training run (either kind, one interface).
pub enum Optimizer {
    Full(AdamW),
    EightBit(AdamW8bit),
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, params: &[Tensor], config: AdamWConfig) -> Self {
        match kind {
            OptimizerKind::AdamW => Self::Full(AdamW::new(params, config)),
            OptimizerKind::AdamW8bit => Self::EightBit(AdamW8bit::new(params, config)),
        }
    }

    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Self::Full(o) => o.set_lr(lr),
            Self::EightBit(o) => o.set_lr(lr),
        }
    }

    /// One update; fails only when libtorch refuses the fused kernel's tensors mid-update.
    pub fn step(&mut self) -> Result<(), TrainError> {
        match self {
            Self::Full(o) => o.step(),
            Self::EightBit(o) => {
                o.step();
                Ok(())
            }
        }
    }

    pub fn zero_grad(&mut self) {
        match self {
            Self::Full(o) => o.zero_grad(),
            Self::EightBit(o) => o.zero_grad(),
        }
    }

    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        match self {
            Self::Full(o) => o.save(dir),
            Self::EightBit(o) => o.save(dir),
        }
    }

    pub fn load(&mut self, dir: &Path) -> Result<(), TrainError> {
        match self {
            Self::Full(o) => o.load(dir),
            Self::EightBit(o) => o.load(dir),
        }
    }
}

/// One optimizer step as reported to the progress callback and `metrics.jsonl`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Optimizer steps done (1-based after the first step).
    pub step: u64,
    pub total: u64,
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    /// The learning rate this step used.
    pub lr: f64,
    /// Global gradient norm before clipping (None where the loop does not clip).
    pub grad_norm: Option<f64>,
    /// fp16 loss scaling: optimizer steps skipped so far for inf/NaN gradients (None without).
    pub skipped_steps: Option<u64>,
}

/// How a training loop reports progress and learns that it should stop.
pub struct Callbacks<'a> {
    pub on_progress: &'a mut dyn FnMut(&Progress),
    /// Checked before every step; when set, a checkpoint is written and the loop returns
    /// [`TrainError::Cancelled`].
    pub cancel: &'a AtomicBool,
    /// Sampling with the model being trained every few steps (diffusers' validation_steps).
    pub validation: Option<Validation<'a>>,
    /// Complete outputs at given steps, as a run ending there would write them (a steps
    /// sweep's shorter variants served by its longest run).
    pub snapshots: Option<Snapshots<'a>>,
}

/// At each of `steps`, the loop writes what a run of that many steps writes at its end into
/// `dir/step-N` (through `dir/step-N.partial` and a rename, so a folder that exists is
/// complete), then calls `finish(step, folder)` to add the stage's own files (metrics,
/// validation samples). A folder already there (from before a resume) is kept.
pub struct Snapshots<'a> {
    pub steps: Vec<u64>,
    pub dir: PathBuf,
    pub finish: &'a mut dyn FnMut(u64, &Path) -> Result<(), String>,
}

impl Snapshots<'_> {
    /// The folder of the snapshot at `step`.
    pub fn folder(dir: &Path, step: u64) -> PathBuf {
        dir.join(format!("step-{step}"))
    }
}

/// diffusers' `--validation_prompt` / `--validation_steps`: every `every` optimizer steps the
/// loop writes the current model as a diffusers folder into `model_dir` and calls `run(step,
/// model_dir)`, which samples from it (an error stops training).
pub struct Validation<'a> {
    pub every: u64,
    pub model_dir: PathBuf,
    pub run: &'a mut dyn FnMut(u64, &Path) -> Result<(), String>,
}

impl Callbacks<'_> {
    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// What a finished run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    pub steps: u64,
    /// Step of the checkpoint the run resumed from, if any.
    pub resumed_from: Option<u64>,
    pub final_loss: Option<f64>,
    pub output_dir: PathBuf,
}

/// One micro-batch with every random draw made explicit: `latents` already multiplied by the
/// VAE scaling factor, `noise` like `latents`, one int64 timestep per sample, token ids [b, 77].
pub struct StepBatch {
    pub latents: Tensor,
    pub noise: Tensor,
    pub timesteps: Tensor,
    pub input_ids: Tensor,
}

/// The result of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    pub loss: f64,
    pub grad_norm: Option<f64>,
    pub lr: f64,
    /// Steps skipped so far by fp16 loss scaling (None without it).
    pub skipped_steps: Option<u64>,
}

/// How the per-sample squared errors become the loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossSpec {
    /// Prior preservation: the batch is [instance..., class...] and the loss is
    /// `instance + weight * prior`.
    pub prior_loss_weight: Option<f64>,
    /// Min-SNR-gamma weighting of the instance half.
    pub snr_gamma: Option<f64>,
}

/// splitmix64: a small, well-mixed hash used to derive independent seeds.
pub(crate) fn splitmix64(mut state: u64) -> u64 {
    state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn mix(seed: u64, salt: u64, a: u64, b: u64) -> u64 {
    splitmix64(splitmix64(splitmix64(seed ^ salt).wrapping_add(a)).wrapping_add(b))
}

/// Opens a seeded scope (see `sd::rng`) for the tensor draws (VAE sample, noise, timesteps) of
/// micro-batch `micro` of optimizer step `step`; keep it until the last draw. Deviation from
/// diffusers' single stream: every step starts from its own seed, so a resumed run draws exactly
/// the same values.
pub fn seed_step_tensors(seed: u64, step: u64, micro: u64) -> SeededScope {
    rng::seeded(mix(seed, SALT_TENSORS, step, micro))
}

/// A deterministic stream for the data-side choices of one sample (crop, flip, template).
pub struct SampleRng(u64);

impl SampleRng {
    /// The stream of dataset sample number `sample` (counted over the whole run).
    pub fn for_sample(seed: u64, sample: u64) -> Self {
        Self(mix(seed, SALT_SAMPLE, sample, 0))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = splitmix64(self.0);
        self.0
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The dataset index of run-wide sample number `sample`: each epoch visits every index once,
/// in an order shuffled from `(seed, epoch)` (like a DataLoader with `shuffle=True`).
pub fn dataset_index(seed: u64, len: usize, sample: u64) -> usize {
    let len = len.max(1);
    let epoch = sample / len as u64;
    let position = (sample % len as u64) as usize;
    epoch_order(seed, len, epoch)[position]
}

fn epoch_order(seed: u64, len: usize, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    let mut rng = SampleRng(mix(seed, SALT_EPOCH, epoch, len as u64));
    for i in (1..len).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// `prediction_type` of the scheduler config: epsilon (default) or v_prediction.
pub fn prediction_type(config: &SchedulerConfig) -> Result<PredictionType, TrainError> {
    match config.prediction_type.as_deref().unwrap_or("epsilon") {
        "epsilon" => Ok(PredictionType::Epsilon),
        "v_prediction" => Ok(PredictionType::VPrediction),
        other => Err(TrainError::Model(format!(
            "{}: prediction_type '{other}' cannot be trained here; supported: epsilon, v_prediction",
            config.source
        ))),
    }
}

/// The noise and timesteps of a batch of latents, drawn after the latents from the thread's
/// seeded generator: `randn_like`, the optional offset noise, then `randint(0, T, (b,))`.
pub fn draw_noise_and_timesteps(
    latents: &Tensor,
    offset_noise: bool,
    num_train_timesteps: usize,
) -> Result<(Tensor, Tensor), TrainError> {
    let noise = rng::randn(&latents.size(), latents.kind(), latents.device());
    let noise = if offset_noise {
        loss::offset_noise(&noise, OFFSET_NOISE_SCALE)?
    } else {
        noise
    };
    let batch = latents.size()[0];
    let timesteps = rng::randint(0, num_train_timesteps as i64, &[batch], latents.device());
    Ok((noise, timesteps))
}

/// The modules a diffusion loss runs through.
pub struct DiffusionModel<'a> {
    pub unet: &'a UNet2DConditionModel,
    /// The dtype of the UNet's weights (inputs are cast to it).
    pub unet_kind: Kind,
    /// Autocast for the UNet's forward when it is trained under mixed precision.
    pub autocast: Option<Autocast>,
    pub scheduler: &'a DdpmScheduler,
    pub prediction: PredictionType,
}

/// The training loss of one batch (train_dreambooth.py / textual_inversion.py): add noise,
/// predict, compare with epsilon or v in float32, split instance / prior halves, optional
/// min-SNR weighting of the instance half.
pub fn diffusion_loss(
    model: &DiffusionModel,
    batch: &StepBatch,
    encoder_hidden_states: &Tensor,
    spec: &LossSpec,
) -> Result<Tensor, TrainError> {
    let (noisy, timesteps) = noisy_latents(model, batch)?;
    let kind = model.unet_kind;
    let pred = autocast::maybe(model.autocast, || {
        model.unet.forward(
            &noisy.to_kind(kind),
            &timesteps,
            &encoder_hidden_states.to_kind(kind),
        )
    })
    .map_err(TrainError::Model)?;
    loss_from_prediction(model, batch, &pred, &timesteps).and_then(|parts| parts.combine(spec))
}

/// The noisy latents the UNet sees and the timesteps, on the latents' device.
pub fn noisy_latents(
    model: &DiffusionModel,
    batch: &StepBatch,
) -> Result<(Tensor, Tensor), TrainError> {
    let device = batch.latents.device();
    let timesteps = batch.timesteps.to_device(device);
    let noisy = model
        .scheduler
        .add_noise(&batch.latents, &batch.noise, &timesteps)
        .map_err(TrainError::model)?;
    Ok((noisy, timesteps))
}

/// A prediction and what it is compared with (before the loss spec applies).
pub struct PredictionParts<'a> {
    model: &'a DiffusionModel<'a>,
    pred: Tensor,
    target: Tensor,
    timesteps: Tensor,
}

/// Pairs the UNet's prediction (any kind) with its target, both float32.
pub fn loss_from_prediction<'a>(
    model: &'a DiffusionModel<'a>,
    batch: &StepBatch,
    pred: &Tensor,
    timesteps: &Tensor,
) -> Result<PredictionParts<'a>, TrainError> {
    let target = match model.prediction {
        PredictionType::Epsilon => batch.noise.shallow_clone(),
        PredictionType::VPrediction => model
            .scheduler
            .get_velocity(&batch.latents, &batch.noise, timesteps)
            .map_err(TrainError::model)?,
    }
    .to_kind(Kind::Float);
    Ok(PredictionParts {
        model,
        pred: pred.to_kind(Kind::Float),
        target,
        timesteps: timesteps.shallow_clone(),
    })
}

impl PredictionParts<'_> {
    /// The loss: MSE (or min-SNR weighted) of the instance half plus the weighted prior half.
    pub fn combine(self, spec: &LossSpec) -> Result<Tensor, TrainError> {
        let model = self.model;
        let (pred, target, timesteps) = (self.pred, self.target, self.timesteps);
        let (pred, target, timesteps, prior) = match spec.prior_loss_weight {
            Some(weight) => {
                let (pred, pred_prior) = loss::split_instance_prior(&pred)?;
                let (target, target_prior) = loss::split_instance_prior(&target)?;
                let (t, _) = loss::split_instance_prior(&timesteps)?;
                let prior = loss::mse(&pred_prior, &target_prior)? * weight;
                (pred, target, t, Some(prior))
            }
            None => (pred, target, timesteps, None),
        };
        let instance = match spec.snr_gamma {
            None => loss::mse(&pred, &target)?,
            Some(gamma) => min_snr_instance_loss(model, &pred, &target, &timesteps, gamma)?,
        };
        Ok(match prior {
            Some(prior) => instance + prior,
            None => instance,
        })
    }
}

/// train_dreambooth.py's min-SNR weighting: `min(snr, gamma) / snr`, plus 1 for v-prediction
/// ("floored to an SNR weight of one"), times the per-sample MSE, averaged over the batch.
fn min_snr_instance_loss(
    model: &DiffusionModel,
    pred: &Tensor,
    target: &Tensor,
    timesteps: &Tensor,
    gamma: f64,
) -> Result<Tensor, TrainError> {
    let acp = model.scheduler.alphas_cumprod();
    let base = loss::min_snr_weights(acp, timesteps, gamma, PredictionType::Epsilon)?;
    let weights = match model.prediction {
        PredictionType::Epsilon => base,
        PredictionType::VPrediction => base + 1.0,
    };
    let squared = (pred - target).square();
    let dims: Vec<i64> = (1..squared.dim() as i64).collect();
    let per_sample = squared.mean_dim(dims.as_slice(), false, Kind::Float);
    Ok((per_sample * weights.to_device(pred.device())).mean(Kind::Float))
}

/// The variables of `vs` that require grad, sorted by name (a stable optimizer order).
pub fn trainable_sorted(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Appends one JSON line per optimizer step to `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl`, dropping lines of steps after `resumed_step` (they are
    /// recomputed by the resumed run) — all lines when starting fresh.
    pub fn open(dir: &Path, resumed_step: u64) -> Result<Self, TrainError> {
        let path = dir.join(METRICS_FILE);
        let kept: Vec<String> = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .lines()
                .filter(|line| line_step(line).is_some_and(|s| s <= resumed_step))
                .map(str::to_string)
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut text = kept.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, "create the directory", e))?;
        std::fs::write(&path, text).map_err(|e| io_error(&path, "write", e))?;
        Ok(Self { path })
    }

    pub fn append(&self, progress: &Progress) -> Result<(), TrainError> {
        let line = serde_json::json!({
            "step": progress.step,
            "loss": finite_or_null(progress.loss),
            "lr": progress.lr,
            "grad_norm": progress.grad_norm.map(finite_or_null),
        });
        let mut line = line;
        if let Some(skipped) = progress.skipped_steps {
            line["skipped_steps"] = skipped.into();
        }
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| io_error(&self.path, "open for appending", e))?;
        writeln!(file, "{line}").map_err(|e| io_error(&self.path, "append to", e))
    }
}

fn finite_or_null(value: f64) -> serde_json::Value {
    serde_json::Number::from_f64(value).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

fn line_step(line: &str) -> Option<u64> {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()?
        .get("step")?
        .as_u64()
}

pub(crate) fn io_error(path: &Path, action: &'static str, reason: impl ToString) -> TrainError {
    TrainError::Io {
        path: path.to_path_buf(),
        action,
        reason: reason.to_string(),
    }
}

/// Fails with [`TrainError::NonFiniteLoss`] (checkpoint filled in by the loop) when `loss` is
/// NaN or infinite.
pub(crate) fn check_finite(loss: f64, step: u64) -> Result<(), TrainError> {
    if loss.is_finite() {
        Ok(())
    } else {
        Err(TrainError::NonFiniteLoss {
            step,
            loss,
            checkpoint: None,
        })
    }
}

/// `max_train_steps`, or `num_train_epochs * ceil(ceil(len / batch) / accumulation)`.
pub fn total_steps(
    max_train_steps: Option<u64>,
    num_train_epochs: u64,
    dataset_len: usize,
    batch: usize,
    accumulation: u64,
) -> u64 {
    max_train_steps.unwrap_or_else(|| {
        let batches = (dataset_len as u64).div_ceil(batch.max(1) as u64);
        num_train_epochs * batches.div_ceil(accumulation.max(1))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_lines_count_skipped_steps_only_with_loss_scaling() {
        let dir = tempfile::tempdir().unwrap();
        let log = MetricsLog::open(dir.path(), 0).unwrap();
        let progress = Progress {
            step: 1,
            total: 2,
            loss: 0.5,
            lr: 1e-4,
            grad_norm: Some(f64::INFINITY),
            skipped_steps: None,
        };
        log.append(&progress).unwrap();
        log.append(&Progress {
            step: 2,
            skipped_steps: Some(1),
            ..progress
        })
        .unwrap();
        let text = std::fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(
            text,
            "{\"grad_norm\":null,\"loss\":0.5,\"lr\":0.0001,\"step\":1}\n\
             {\"grad_norm\":null,\"loss\":0.5,\"lr\":0.0001,\"skipped_steps\":1,\"step\":2}\n"
        );
    }

    #[test]
    fn every_epoch_visits_every_index_once_in_a_seeded_order() {
        let len = 7;
        let epoch0: Vec<usize> = (0..7).map(|s| dataset_index(5, len, s)).collect();
        let epoch1: Vec<usize> = (7..14).map(|s| dataset_index(5, len, s)).collect();
        let mut sorted = epoch0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..7).collect::<Vec<_>>());
        let mut sorted1 = epoch1.clone();
        sorted1.sort();
        assert_eq!(sorted1, (0..7).collect::<Vec<_>>());
        assert_ne!(epoch0, epoch1);
        let other_seed: Vec<usize> = (0..7).map(|s| dataset_index(6, len, s)).collect();
        assert_ne!(epoch0, other_seed);
    }

    #[test]
    fn mixed_precision_rejects_fp16_on_cpu() {
        let error = MixedPrecision::Fp16.weight_kind(Device::Cpu).unwrap_err();
        assert_eq!(
            error.to_string(),
            "training option 'mixed_precision': fp16 needs a CUDA device; on CPU use 'bf16' or 'no'"
        );
        assert_eq!(
            MixedPrecision::Bf16.weight_kind(Device::Cpu).unwrap(),
            Kind::BFloat16
        );
    }

    #[test]
    fn total_steps_follow_diffusers_epoch_math() {
        assert_eq!(total_steps(Some(9), 1, 5, 2, 1), 9);
        assert_eq!(total_steps(None, 2, 5, 2, 2), 4);
    }
}
