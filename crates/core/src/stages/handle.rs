//! What a running stage holds of its run besides its files: the progress reporter it reports
//! steps through and the cancellation flag it checks. Both are defined here, on the stage's
//! side, so `stages` needs nothing from `exec`; the executor connects the reporter to its event
//! stream (`exec::events::progress_reporter`).
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// One progress report of a stage: `step` of `total` done, with an optional named metric
/// (e.g. `loss`).
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub step: u64,
    pub total: u64,
    pub metric: Option<(String, f64)>,
}

/// Where a stage's progress reports go.
pub type ProgressSink = Arc<dyn Fn(Progress) + Send + Sync>;

/// What a stage uses to report its progress (step/total and one metric such as loss).
#[derive(Clone)]
pub struct ProgressReporter {
    sink: Option<ProgressSink>,
}

impl ProgressReporter {
    /// Reports to `sink`; `None` drops every report (a Slurm job, tests).
    pub fn new(sink: Option<ProgressSink>) -> Self {
        Self { sink }
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
        if let Some(sink) = &self.sink {
            sink(Progress {
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
