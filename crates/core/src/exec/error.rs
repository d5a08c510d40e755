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
    /// What the Slurm controller (`exec/slurm.rs`) met.
    #[error("{0}")]
    Slurm(SlurmError),
}

/// Why the Slurm controller could not get a stage run by a Slurm job.
#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error("internal error: the Slurm job limit was closed")]
    LimitClosed,
    /// The job file could not be written.
    #[error("{0}")]
    JobFile(JobError),
    /// Slurm does not create the `--output` folder; it could not be made.
    #[error("creating `{}`: {error}", path.display())]
    CreateLogs {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("writing `{}`: {error}", path.display())]
    WriteScript {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("could not run sbatch ({0}); is Slurm installed on this host?")]
    NoSbatch(std::io::Error),
    #[error("sbatch refused the job ({status}): {stderr}")]
    Refused {
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// The job ran and did not commit a result; `last_lines`: the end of its log (none for a
    /// cancelled job).
    #[error("{end}{}", tail(last_lines))]
    Job {
        end: SlurmJobFailure,
        last_lines: Vec<String>,
    },
}

/// `; last lines: a | b` after a failed job's message (nothing without lines).
fn tail(lines: &[String]) -> String {
    match lines.is_empty() {
        true => String::new(),
        false => format!("; last lines: {}", lines.join(" | ")),
    }
}

/// How a Slurm job ended without a result.
#[derive(Debug, thiserror::Error)]
pub enum SlurmJobFailure {
    /// The job wrote an exit record with this error.
    #[error("Slurm job {job_id} failed: {}", error.as_deref().unwrap_or("no error recorded"))]
    Failed {
        job_id: String,
        error: Option<String>,
    },
    /// Slurm says it ended in `state` without an exit record; `details`: its exit code and
    /// reason when Slurm gives them.
    #[error(
        "Slurm job {job_id} ended {state}{} before the stage finished",
        parenthesized(details)
    )]
    Ended {
        job_id: String,
        state: String,
        details: Vec<String>,
    },
    /// This run cancelled it.
    #[error("cancelled (Slurm job {job_id} scancel'ed)")]
    Cancelled { job_id: String },
}

/// ` (a, b)`, or nothing without items.
fn parenthesized(items: &[String]) -> String {
    match items.is_empty() {
        true => String::new(),
        false => format!(" ({})", items.join(", ")),
    }
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

    /// The controller's messages, as they read when they were strings.
    #[test]
    fn slurm_errors_read_as_the_controller_worded_them() {
        let job = |end| SlurmError::Job {
            end,
            last_lines: vec!["a".to_string(), "b".to_string()],
        };
        let failed = job(SlurmJobFailure::Failed {
            job_id: "7".to_string(),
            error: None,
        });
        assert_eq!(
            failed.to_string(),
            "Slurm job 7 failed: no error recorded; last lines: a | b"
        );
        let ended = job(SlurmJobFailure::Ended {
            job_id: "7".to_string(),
            state: "TIMEOUT".to_string(),
            details: vec!["exit code 0:15".to_string(), "TimeLimit".to_string()],
        });
        assert_eq!(
            ended.to_string(),
            "Slurm job 7 ended TIMEOUT (exit code 0:15, TimeLimit) before the stage finished; last lines: a | b"
        );
        let cancelled = SlurmError::Job {
            end: SlurmJobFailure::Cancelled {
                job_id: "7".to_string(),
            },
            last_lines: Vec::new(),
        };
        assert_eq!(
            ExecError::Slurm(cancelled).to_string(),
            "cancelled (Slurm job 7 scancel'ed)"
        );
        let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "not found");
        assert_eq!(
            SlurmError::NoSbatch(missing).to_string(),
            "could not run sbatch (not found); is Slurm installed on this host?"
        );
    }

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
        let failed = ExecError::from(JobError::from(StageError::CommandExited { code: 3 }));
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
    fn stage_errors_carry_their_cause_and_read_as_one_line() {
        let bad_json = || serde_json::from_str::<u32>("x").unwrap_err();
        let bad_png = || image::ImageError::IoError(std::io::Error::other("disk full"));
        let stage = || "db".to_string();
        let cases: Vec<(StageError, String)> = vec![
            (
                StageError::BadField {
                    stage: stage(),
                    field: "path".to_string(),
                    problem: "`x` holds no image files".to_string(),
                },
                "stage `db`: field `path`: `x` holds no image files".to_string(),
            ),
            (
                StageError::UnreadableInput {
                    stage: stage(),
                    field: "model",
                    source: "not a checkpoint".into(),
                },
                "stage `db`, field `model`: not a checkpoint".to_string(),
            ),
            (
                StageError::Parameters {
                    stage: stage(),
                    source: bad_json(),
                },
                format!("stage `db`: parameters: {}", bad_json()),
            ),
            (
                StageError::serialize("db", "scores", bad_json()),
                format!("stage `db`: scores: {}", bad_json()),
            ),
            (
                StageError::library("db", "out of memory"),
                "stage `db`: out of memory".to_string(),
            ),
            (
                StageError::Grid {
                    stage: stage(),
                    grid: 2,
                    source: "no images".into(),
                },
                "stage `db`: grid 2: no images".to_string(),
            ),
            (
                StageError::CommandExited { code: 3 },
                "command exited with status 3".to_string(),
            ),
            (
                StageError::CommandKilled,
                "command was killed by a signal".to_string(),
            ),
            (
                StageError::NoInputFolder { kind: "images" },
                "images: no input folder".to_string(),
            ),
            (
                StageError::WriteImage {
                    kind: "images",
                    path: "out/0000.png".into(),
                    source: bad_png(),
                },
                "images: writing `out/0000.png`: disk full".to_string(),
            ),
            (
                StageError::Manifest {
                    kind: "images",
                    source: bad_json(),
                },
                format!("images: manifest: {}", bad_json()),
            ),
            (
                StageError::ReadImage {
                    path: "in/a.png".into(),
                    source: bad_png(),
                },
                "in/a.png: disk full".to_string(),
            ),
            (
                crate::stages::needs_torch_worker("train"),
                "stage kind `train` runs in the torch worker (dreampipe-torch); this process \
                 has only its schema"
                    .to_string(),
            ),
            (
                StageError::Message("writing `w.safetensors`: disk full".to_string()),
                "writing `w.safetensors`: disk full".to_string(),
            ),
        ];
        for (error, text) in cases {
            assert_eq!(error.to_string(), text);
        }
        use std::error::Error as _;
        let library = StageError::library("db", std::io::Error::other("gone"));
        assert_eq!(
            library.source().map(|s| s.to_string()).as_deref(),
            Some("gone")
        );
        assert!(matches!(
            crate::stages::needs_torch_worker("x"),
            StageError::NeedsTorchWorker { kind } if kind == "x"
        ));
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
