//! Why the executor could not finish a stage, as enums (like the dirty reasons in
//! `plan/dirty.rs`): [`ExecError`] for the executor itself, [`JobError`] for one stage run
//! (staging, the stage, the commit, job files), [`SlotError`] for where it runs, and
//! [`SkipReason`] for a stage that never started. Each `Display` is the wording that the run
//! record, the `failed` / `skipped` events, the CLI and a Slurm job's exit record show; the
//! variants are what code and tests match on.
use crate::cache::CacheError;
use crate::stages::StageError;
use std::fmt;
use std::path::PathBuf;
use tokio::task::JoinError;

/// The first 12 hex digits of a key or digest, as messages show them.
pub(crate) fn short(key: &str) -> &str {
    &key[..12.min(key.len())]
}

/// Why the executor failed a stage.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// `--locked`, and the lock file has no entry for the stage.
    #[error("--locked: stage `{id}` is not in the lock file")]
    NotLocked { id: String },
    /// `--locked`, and the stage's key is not the one the lock file recorded.
    #[error(
        "--locked: stage `{id}` has key {} but the lock file has {}; its inputs or parameters differ (see `dreampipe explain`)",
        short(.key),
        short(.locked)
    )]
    LockedKeyMismatch {
        id: String,
        key: String,
        locked: String,
    },
    /// `--locked`, and the stage computed another output than the lock file recorded.
    #[error(
        "--locked: stage `{id}` produced output {} but the lock file has {}; the stage is not reproducible here",
        short(.output),
        short(.locked)
    )]
    LockedOutputMismatch {
        id: String,
        output: String,
        locked: String,
    },
    /// An upstream that `--only` / `--until` left out has no cached result for `key`.
    #[error(
        "not in the cache and not selected by --only/--until (key {}); run it first",
        short(.key)
    )]
    NotSelected { key: String },
    /// The stage was started before its upstream `upstream` had an output (a bug).
    #[error("internal error: upstream `{upstream}` has no output")]
    UpstreamMissing { upstream: String },
    /// Hashing the stage's input files for its key failed.
    #[error("hashing inputs: {0}")]
    Hashing(#[source] CacheError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// Another process (`cache gc`) removed the result between its commit and our pin.
    #[error("its result disappeared right after it was committed (cache gc?); run again")]
    ResultDisappeared,
    /// Another run (`--force`) held the result's lock to replace it.
    #[error("its result was being replaced by another run (--force?) right now; run again")]
    ResultBeingReplaced,
    /// The result this run committed was removed before it could be pinned.
    #[error("its new result was removed at once (cache gc?); run again")]
    NewResultRemoved,
    /// The run was cancelled before the stage started computing.
    #[error("cancelled")]
    Cancelled,
    /// A blocking thread of the stage (hashing, running, committing) panicked.
    #[error("internal error: the stage's thread panicked ({0})")]
    ThreadPanicked(#[source] JoinError),
    /// The stage's task itself panicked (outside the stage's own code).
    #[error("internal error: {0}")]
    TaskFailed(#[source] JoinError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error(transparent)]
    Job(#[from] JobError),
    /// A Slurm job said it succeeded, but its result is not in the cache this run reads.
    #[error(
        "Slurm job {job_id} reported success but the cache has no result for key {}; is the cache on a filesystem the nodes share?",
        short(.key)
    )]
    SlurmNoResult { job_id: String, key: String },
    /// The Slurm controller's one-line message (worded by `exec/slurm.rs`).
    #[error("{0}")]
    Slurm(String),
}

impl ExecError {
    /// Whether the stage stopped because the run was cancelled (before or while it ran).
    pub fn is_cancelled(&self) -> bool {
        matches!(
            self,
            Self::Cancelled | Self::Job(JobError::Stage(StageError::Cancelled))
        )
    }
}

/// Why one stage run (here or in a Slurm job) failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Staging, committing or a store lookup failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The stage itself failed, or was cancelled (`cancelled`).
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error("creating `{path}`: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing `{path}`: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A job or exit record that does not serialize (a bug).
    #[error("{0}")]
    Encode(#[source] serde_json::Error),
    /// The job file does not read as a job.
    #[error("job file: {0}")]
    JobFile(#[source] CacheError),
    #[error(
        "job file `{path}` has format {found} but this dreampipe reads format {reads}; submit it with the same dreampipe build"
    )]
    Format {
        path: PathBuf,
        found: u32,
        /// The format this build reads (`job::JOB_FORMAT`).
        reads: u32,
    },
    #[error("job file `{path}` is damaged: its key material does not hash to its key")]
    Damaged { path: PathBuf },
    /// A stage keyed for CUDA on a node without a usable CUDA device.
    #[error(
        "stage `{stage_id}` was keyed for CUDA but this node has no usable CUDA device (CUDA_VISIBLE_DEVICES={visible}); give the stage GPUs (`resources: {{gpus: 1}}`) or run with `--device cpu`"
    )]
    NoCuda { stage_id: String, visible: String },
}

/// Why a stage could not get its CPU permit or devices.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("internal error: the executor's slots were closed")]
    Closed,
    /// `resources: {gpus: N}` asks for more devices than `--devices` gave the run.
    #[error(
        "stage `{stage_id}` asks for {asked} devices (`resources: {{gpus: {asked}}}`) but this run has {available} (--devices)"
    )]
    TooManyDevices {
        stage_id: String,
        asked: usize,
        available: usize,
    },
}

/// Why a selected stage was skipped (never started).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// The run was cancelled before the stage's upstreams finished.
    Cancelled,
    /// An upstream failed or was skipped.
    UpstreamFailed { id: String },
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cancelled => write!(f, "cancelled"),
            Self::UpstreamFailed { id } => write!(f, "upstream `{id}` did not finish"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancellation_reads_the_same_wherever_it_stopped_the_stage() {
        let before = ExecError::Cancelled;
        let during = ExecError::from(JobError::from(StageError::Cancelled));
        for error in [&before, &during] {
            assert!(error.is_cancelled());
            assert_eq!(error.to_string(), "cancelled");
        }
        assert!(!ExecError::ResultDisappeared.is_cancelled());
        assert_eq!(SkipReason::Cancelled.to_string(), "cancelled");
    }

    #[test]
    fn wrapped_errors_keep_their_own_wording() {
        let slot = ExecError::from(SlotError::Closed);
        assert_eq!(
            slot.to_string(),
            "internal error: the executor's slots were closed"
        );
        let failed = ExecError::from(JobError::from(StageError::Failed(
            "command exited with status 3".to_string(),
        )));
        assert_eq!(failed.to_string(), "command exited with status 3");
        let no_cuda = JobError::NoCuda {
            stage_id: "db".to_string(),
            visible: "unset".to_string(),
        };
        assert_eq!(
            no_cuda.to_string(),
            "stage `db` was keyed for CUDA but this node has no usable CUDA device \
             (CUDA_VISIBLE_DEVICES=unset); give the stage GPUs (`resources: {gpus: 1}`) or run \
             with `--device cpu`"
        );
    }

    #[test]
    fn slurm_messages_shorten_the_key() {
        let error = ExecError::SlurmNoResult {
            job_id: "42".to_string(),
            key: "f".repeat(64),
        };
        assert_eq!(
            error.to_string(),
            "Slurm job 42 reported success but the cache has no result for key ffffffffffff; \
             is the cache on a filesystem the nodes share?"
        );
    }
}
