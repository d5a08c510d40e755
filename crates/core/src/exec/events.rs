//! Events the executor emits; reporters (progress bars, plain lines, the summary) only consume
//! them, so the engine never touches the terminal.
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;

/// A stage's side of a run (defined in `stages`, which needs nothing from `exec`).
pub use crate::stages::handle::{CancelFlag, Progress, ProgressReporter};

/// Version of the JSON form of events (`run --message-format json`); bumped when a field
/// changes meaning or disappears (new fields may appear without a bump).
pub const EVENT_SCHEMA_VERSION: u32 = 1;

/// One thing that happened during a run. Its JSON form (`--message-format json`) is the
/// variant name in snake case under `event`, with the fields as named here.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    RunStarted {
        pipeline: String,
        stages: usize,
    },
    /// The result was already in the cache.
    Cached {
        id: String,
        key: String,
        output: PathBuf,
    },
    /// A shorter variant of a steps sweep, committed from the longest run's snapshot (`from`
    /// says which run and step).
    Served {
        id: String,
        from: String,
        output: PathBuf,
    },
    /// Another run holds this key's lock; this run waits and reuses its result.
    Waiting {
        id: String,
        key: String,
    },
    Started {
        id: String,
        key: String,
    },
    /// The stage runs as Slurm job `job_id` (`adopted`: a job an earlier run submitted, which
    /// this run waits for instead of submitting a duplicate).
    Submitted {
        id: String,
        job_id: String,
        adopted: bool,
    },
    Progress {
        id: String,
        step: u64,
        total: u64,
        /// (name, value), e.g. ("loss", 0.12); JSON: a two-element array.
        metric: Option<(String, f64)>,
    },
    Finished {
        id: String,
        seconds: f64,
        output: PathBuf,
    },
    Failed {
        id: String,
        error: String,
        log: Option<PathBuf>,
    },
    Skipped {
        id: String,
        reason: String,
    },
    /// Something the user should know that does not fail the stage (printed on stderr).
    Warning {
        id: String,
        message: String,
    },
}

/// Where events go.
pub type EventSender = UnboundedSender<Event>;

/// A stage's progress reporter whose reports become [`Event::Progress`] of stage `id`.
pub fn progress_reporter(id: &str, sender: EventSender) -> ProgressReporter {
    let id = id.to_string();
    ProgressReporter::new(Some(Arc::new(move |progress: Progress| {
        let _ = sender.send(Event::Progress {
            id: id.clone(),
            step: progress.step,
            total: progress.total,
            metric: progress.metric,
        });
    })))
}
