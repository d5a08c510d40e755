//! Training building blocks on plain `tch` tensors, matching PyTorch / diffusers / bitsandbytes:
//! optimizers ([`optim::AdamW`], [`adamw8bit::AdamW8bit`]) with resumable state, gradient
//! clipping, diffusers' learning-rate schedules, the DreamBooth losses, and a two-phase
//! gradient-checkpointing helper. DreamBooth / textual inversion loops are built on these.
pub mod adamw8bit;
pub mod checkpointing;
pub mod loss;
pub mod lr_schedule;
pub mod optim;
mod state_io;

use std::path::PathBuf;

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
    #[error("unknown lr scheduler '{name}': valid names are {valid}")]
    UnknownSchedule { name: String, valid: String },
    #[error("lr scheduler '{name}': {problem}")]
    ScheduleArgs { name: String, problem: String },
    #[error("loss: {0}")]
    Loss(String),
    #[error("gradient checkpointing: {0}")]
    Checkpointing(String),
}
