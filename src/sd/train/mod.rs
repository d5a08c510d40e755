//! Training building blocks on plain `tch` tensors, matching PyTorch / diffusers / bitsandbytes:
//! optimizers ([`optim::AdamW`], [`adamw8bit::AdamW8bit`]) with resumable state (one save/load
//! path, `state_io`), gradient clipping, diffusers' learning-rate schedules, the DreamBooth
//! losses, fp16 loss scaling and mixed precision (gradient checkpointing of the UNet is in
//! `sd::unet::checkpointed`).
//!
//! DreamBooth (with LoRA) and textual inversion are one algorithm: the outer loop (resume,
//! checkpoints, metrics, cancellation, validation, snapshots) is `driver`, the optimizer step
//! (accumulation, finite-loss check, mixed-precision backward, unscale, clipping, update, lr
//! schedule, step count) is `trainer_core`, and the base model they load is `base_model`. Each
//! method supplies only what differs: which parameters train, the loss of a batch, what runs
//! after an update, its data and its outputs.
pub mod adamw8bit;
mod adamw_config;
mod aten_adamw;
mod base_model;
pub mod batch;
pub mod checkpoint;
pub mod common;
pub mod config;
pub mod data;
pub mod dreambooth;
mod driver;
pub mod grad_scaler;
pub mod lora;
pub mod loss;
pub mod lr_schedule;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod optimizer;
pub mod output;
pub mod precision;
pub mod progress;
mod state_io;
pub mod streams;
pub mod textual_inversion;
mod trainer_core;
pub mod vae;

use std::path::{Path, PathBuf};

/// Why a training building block could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: cannot {action}: {reason}")]
    Io {
        path: PathBuf,
        action: &'static str,
        reason: String,
    },
    #[error(
        "{path}: optimizer state does not fit this optimizer: {detail} (resume with the same optimizer kind and the same trainable parameters, in the same order)"
    )]
    StateMismatch { path: PathBuf, detail: String },
    #[error("lr scheduler '{name}': {problem}")]
    ScheduleArgs { name: String, problem: String },
    #[error("loss: {0}")]
    Loss(String),
    #[error("gradient checkpointing: {0}")]
    Checkpointing(String),
    #[error("training option '{field}': {problem}")]
    Config {
        field: &'static str,
        problem: String,
    },
    #[error("{path}: {problem}")]
    Data { path: PathBuf, problem: String },
    /// A failed write of a weights or state file (the message names the file).
    #[error("{0}")]
    Write(String),
    /// An image file or folder the shared image rules refuse (the message names the file).
    #[error("{0}")]
    Image(String),
    #[error("{0}")]
    Model(String),
    #[error("validation at step {step}: {problem}")]
    Validation { step: u64, problem: String },
    #[error("the snapshot at step {step}: {problem}")]
    Snapshot { step: u64, problem: String },
    #[error(
        "step {step}: the loss is {loss} (not finite); training stopped. {}",
        checkpoint_hint(.checkpoint)
    )]
    NonFiniteLoss {
        step: u64,
        loss: f64,
        checkpoint: Option<PathBuf>,
    },
    #[error("training cancelled at step {step}; progress is saved in {}: run again with resume to continue", .checkpoint.display())]
    Cancelled { step: u64, checkpoint: PathBuf },
    #[error(
        "optimizer step: {0}; the optimizer state is now unspecified: resume from the last checkpoint"
    )]
    Optimizer(String),
}

fn checkpoint_hint(checkpoint: &Option<PathBuf>) -> String {
    match checkpoint {
        Some(dir) => format!(
            "The last good checkpoint is {}; lower learning_rate (or check the data) and resume from it",
            dir.display()
        ),
        None => {
            "No checkpoint was written yet; lower learning_rate (or check the data) and start again"
                .to_string()
        }
    }
}

/// An I/O failure on `path`, as a [`TrainError::Io`].
pub(crate) fn io_error(path: &Path, action: &'static str, reason: impl ToString) -> TrainError {
    TrainError::Io {
        path: path.to_path_buf(),
        action,
        reason: reason.to_string(),
    }
}

impl TrainError {
    /// Wraps a model/scheduler/tokenizer error (its message already names the file).
    pub(crate) fn model(error: impl std::fmt::Display) -> Self {
        Self::Model(error.to_string())
    }
}
