//! What a training loop reports and how it is steered: the result of one optimizer step, the
//! progress line of the callback and `metrics.jsonl`, cancellation, validation, snapshots, and
//! the outcome of a finished run.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

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
    /// [`TrainError::Cancelled`](super::TrainError::Cancelled).
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

/// The result of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    pub loss: f64,
    pub grad_norm: Option<f64>,
    pub lr: f64,
    /// Steps skipped so far by fp16 loss scaling (None without it).
    pub skipped_steps: Option<u64>,
}
