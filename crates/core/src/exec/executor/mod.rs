//! The executor: runs a plan on tokio. Stages whose upstreams are done run concurrently; each
//! stage's work (hashing, the stage itself, committing) runs on blocking threads. GPU stages
//! take a device slot (one stage per device at a time), CPU stages a `--jobs` permit. A
//! per-key lock makes concurrent runs on one cache compute each key once. A failed stage stops
//! its dependents only; cancellation stops new stages and signals running ones.
//!
//! This module owns the run's shared state and its entry point; beside it: `schedule` (the
//! order stages start in), `stage` (one stage's way from key to result), `pins` (locks keeping
//! results alive), `locked` (`--locked`), `compute` (here or on Slurm), `slots` (CPU permits
//! and device slots), `job_plan` (what a run of a stage is given) and `records` (the stage
//! records).
mod compute;
mod job_plan;
mod locked;
mod pins;
mod records;
mod schedule;
mod slots;
mod stage;
#[cfg(test)]
mod tests;

use super::error::ExecError;
use super::events::{CancelFlag, Event, EventSender};
use super::lockfile::LockFile;
pub use super::record::{Outcome, RunRecord, StageRecord};
use super::slurm::{Slurm, SlurmOptions};
use crate::cache::hash::HashMemo;
use crate::cache::lock::KeyLock;
use crate::cache::store::{Store, now_unix};
use crate::plan::graph::Plan;
use crate::plan::prefix::{Sharing, sharing};
use records::base_record;
use schedule::Schedule;
use slots::Slots;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::watch;

/// How a run treats its stages.
pub struct ExecOptions {
    /// Concurrent CPU stages.
    pub jobs: usize,
    /// Devices for GPU stages, one stage at a time on each.
    pub devices: Vec<crate::device::Device>,
    /// Stages this run covers (others are only looked up when a selected stage needs them).
    pub selected: Vec<bool>,
    /// Stages to rerun even when cached.
    pub forced: Vec<bool>,
    /// With `--locked`: the expected keys and output digests.
    pub locked: Option<LockFile>,
    /// With `--verify`: rehash every file of a reused result (else only changed files).
    pub verify: bool,
    /// With `--executor slurm`: dirty stages run as Slurm jobs (exec/slurm.rs).
    pub slurm: Option<SlurmOptions>,
}

struct Shared {
    plan: Arc<Plan>,
    store: Store,
    memo: Arc<HashMemo>,
    events: EventSender,
    cancel: CancelFlag,
    slots: Slots,
    key_device: crate::device::Device,
    forced: Vec<bool>,
    locked: Option<LockFile>,
    verify: bool,
    /// When the run started (stage records' `ran` times count from it).
    run_started: Instant,
    /// Shared locks on every result this run uses (found cached or committed), by key, held
    /// until the run ends, so `cache gc` cannot remove one before a downstream stage reads it.
    pins: Mutex<HashMap<String, KeyLock>>,
    slurm: Option<Arc<Slurm>>,
    /// Steps sweeps trained once (plan/prefix.rs).
    sharing: Sharing,
    /// Per stage: set once its task has ended (served variants wait for their runner).
    ended: Vec<watch::Sender<bool>>,
}

impl Shared {
    /// The run's shared state: `--devices` (the CPU when none) and the options' stage flags.
    fn new(
        plan: &Arc<Plan>,
        store: Store,
        memo: Arc<HashMemo>,
        options: &ExecOptions,
        events: EventSender,
        cancel: CancelFlag,
        run_started: Instant,
    ) -> Self {
        let devices = if options.devices.is_empty() {
            vec![crate::device::Device::Cpu]
        } else {
            options.devices.clone()
        };
        let slurm = (options.slurm.clone()).map(|o| Arc::new(Slurm::new(o, store.clone())));
        Self {
            plan: plan.clone(),
            store,
            memo,
            events,
            cancel,
            slots: Slots::new(options.jobs, &devices),
            key_device: devices[0],
            forced: options.forced.clone(),
            locked: options.locked.clone(),
            verify: options.verify,
            run_started,
            pins: Mutex::new(HashMap::new()),
            slurm,
            sharing: sharing(&plan.pipeline, &options.selected),
            ended: (0..plan.len()).map(|_| watch::channel(false).0).collect(),
        }
    }
}

/// (key, output digest) of a finished stage.
type Done = (String, String);

/// Runs the selected stages of `plan` and returns the run record.
pub async fn execute(
    plan: Arc<Plan>,
    store: Store,
    memo: Arc<HashMemo>,
    options: ExecOptions,
    events: EventSender,
    cancel: CancelFlag,
) -> RunRecord {
    let started = Instant::now();
    let started_unix = now_unix();
    let shared = Shared::new(
        &plan,
        store,
        memo,
        &options,
        events,
        cancel.clone(),
        started,
    );
    let shared = Arc::new(shared);
    let poller = shared.slurm.clone().map(|slurm| {
        let cancel = cancel.clone();
        tokio::spawn(async move { slurm.poll(cancel).await })
    });
    let _ = shared.events.send(Event::RunStarted {
        pipeline: plan.pipeline.name.clone(),
        stages: options.selected.iter().filter(|s| **s).count(),
    });
    let records = Schedule::new(&shared, options.selected).run().await;
    if let (Some(slurm), Some(poller)) = (&shared.slurm, poller) {
        slurm.close();
        let _ = poller.await;
    }
    let stages: Vec<StageRecord> = records
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|| base_record(&plan, i, Outcome::NotSelected)))
        .collect();
    let success = stages.iter().all(|s| {
        matches!(
            s.status,
            Outcome::Cached | Outcome::Ran | Outcome::NotSelected
        )
    });
    RunRecord {
        pipeline: plan.pipeline.name.clone(),
        file: plan.pipeline.file.clone(),
        cache_root: shared.store.root().to_path_buf(),
        started_unix,
        duration_s: started.elapsed().as_secs_f64(),
        success,
        cancelled: cancel.is_cancelled(),
        stages,
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ExecError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(ExecError::ThreadPanicked)
}
