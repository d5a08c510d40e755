//! Events the executor emits; reporters (progress bars, plain lines, the summary) only consume
//! them, so the engine never touches the terminal.
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::mpsc::UnboundedSender;

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

/// What a stage uses to report its progress (step/total and one metric such as loss).
#[derive(Clone)]
pub struct ProgressReporter {
    id: String,
    sender: Option<EventSender>,
}

impl ProgressReporter {
    pub fn new(id: &str, sender: Option<EventSender>) -> Self {
        Self {
            id: id.to_string(),
            sender,
        }
    }

    /// Reports `step` of `total` done.
    pub fn step(&self, step: u64, total: u64) {
        self.send(step, total, None);
    }

    /// Reports `step` of `total` with a named metric (e.g. `loss`).
    pub fn step_with_metric(&self, step: u64, total: u64, name: &str, value: f64) {
        self.send(step, total, Some((name.to_string(), value)));
    }

    fn send(&self, step: u64, total: u64, metric: Option<(String, f64)>) {
        if let Some(sender) = &self.sender {
            let _ = sender.send(Event::Progress {
                id: self.id.clone(),
                step,
                total,
                metric,
            });
        }
    }
}

/// A cancellation flag shared by the executor, the Ctrl-C handler and running stages.
#[derive(Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    pub fn as_atomic(&self) -> &AtomicBool {
        &self.0
    }
}
