//! The order of a run: stages start once their active upstreams are done, a failure skips
//! its dependents, cancellation skips the stages not started yet.
use super::records::{base_record, skipped};
use super::stage::run_stage;
use super::{Done, Outcome, Shared, StageRecord};
use crate::exec::error::{ExecError, SkipReason};
use crate::exec::events::{Event, EventSender};
use crate::plan::graph::Plan;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;
use tokio::task::JoinSet;

/// The scheduling state of one run: each stage's record so far, the finished stages' results,
/// how many active upstreams each stage still waits for, and the running tasks.
pub(super) struct Schedule {
    shared: Arc<Shared>,
    selected: Vec<bool>,
    active: BTreeSet<usize>,
    records: Vec<Option<StageRecord>>,
    done: BTreeMap<usize, Done>,
    waiting: Vec<usize>,
    tasks: JoinSet<TaskResult>,
    task_stage: HashMap<tokio::task::Id, usize>,
}

impl Schedule {
    pub(super) fn new(shared: &Arc<Shared>, selected: Vec<bool>) -> Self {
        let plan = &shared.plan;
        let active = active_stages(plan, &selected);
        let waiting = (0..plan.len())
            .map(|i| {
                plan.upstream(i)
                    .iter()
                    .filter(|u| active.contains(u))
                    .count()
            })
            .collect();
        Self {
            shared: shared.clone(),
            selected,
            active,
            records: vec![None; plan.len()],
            done: BTreeMap::new(),
            waiting,
            tasks: JoinSet::new(),
            task_stage: HashMap::new(),
        }
    }

    /// Runs every active stage once its upstreams finished; returns the records (`None`: the
    /// stage was not selected).
    pub(super) async fn run(mut self) -> Vec<Option<StageRecord>> {
        let ready: Vec<usize> = (self.active.iter())
            .copied()
            .filter(|&index| self.waiting[index] == 0)
            .collect();
        for index in ready {
            self.spawn(index);
        }
        while let Some(joined) = self.tasks.join_next_with_id().await {
            let Some((index, record, finished)) = self.task_result(joined) else {
                continue;
            };
            self.records[index] = Some(record);
            match finished {
                Some(result) => self.release_dependents(index, result),
                None => {
                    let shared = &self.shared;
                    let (plan, events) = (&shared.plan, &shared.events);
                    block_dependents(plan, index, &mut self.records, events, &self.selected);
                }
            }
        }
        self.records
    }

    fn spawn(&mut self, index: usize) {
        let (shared, selected) = (&self.shared, self.selected[index]);
        let id = spawn_stage(&mut self.tasks, shared, index, selected, &self.done);
        self.task_stage.insert(id, index);
    }

    /// A finished task's result; a task that panicked outside the stage's own code fails its
    /// stage (never reported as a success).
    fn task_result(
        &self,
        joined: Result<(tokio::task::Id, TaskResult), tokio::task::JoinError>,
    ) -> Option<TaskResult> {
        match joined {
            Ok((_, result)) => Some(result),
            Err(error) => {
                let &index = self.task_stage.get(&error.id())?;
                let mut record = base_record(&self.shared.plan, index, Outcome::Failed);
                record.error = Some(ExecError::TaskFailed(error).to_string());
                Some((index, record, None))
            }
        }
    }

    /// Records stage `index` as done and starts the dependents it was the last wait of
    /// (skipping them once the run is cancelled).
    fn release_dependents(&mut self, index: usize, result: Done) {
        self.done.insert(index, result);
        for dependent in self.shared.plan.downstream(index) {
            self.waiting[dependent] = self.waiting[dependent].saturating_sub(1);
            let ready = self.waiting[dependent] == 0
                && self.records[dependent].is_none()
                && self.active.contains(&dependent);
            if !ready {
                continue;
            }
            if self.shared.cancel.is_cancelled() {
                let (plan, events) = (&self.shared.plan, &self.shared.events);
                let skip = skipped(plan, dependent, SkipReason::Cancelled, events);
                self.records[dependent] = Some(skip);
            } else {
                self.spawn(dependent);
            }
        }
    }
}

/// Selected stages plus every upstream they need (the latter only looked up in the cache).
pub(super) fn active_stages(plan: &Plan, selected: &[bool]) -> BTreeSet<usize> {
    let mut active = BTreeSet::new();
    for (index, _) in selected.iter().enumerate().filter(|(_, s)| **s) {
        active.extend(plan.ancestors(index));
    }
    active
}

pub(super) fn block_dependents(
    plan: &Plan,
    failed: usize,
    records: &mut [Option<StageRecord>],
    events: &EventSender,
    selected: &[bool],
) {
    let reason = SkipReason::UpstreamFailed {
        id: plan.pipeline.stages[failed].id.clone(),
    };
    for dependent in plan.descendants(failed) {
        if dependent != failed && records[dependent].is_none() && selected[dependent] {
            records[dependent] = Some(skipped(plan, dependent, reason.clone(), events));
        }
    }
}

pub(super) type TaskResult = (usize, StageRecord, Option<Done>);

pub(super) fn spawn_stage(
    tasks: &mut JoinSet<TaskResult>,
    shared: &Arc<Shared>,
    index: usize,
    selected: bool,
    done: &BTreeMap<usize, Done>,
) -> tokio::task::Id {
    let shared = shared.clone();
    let upstream: BTreeMap<usize, Done> = shared
        .plan
        .upstream(index)
        .into_iter()
        .filter_map(|u| done.get(&u).map(|d| (u, d.clone())))
        .collect();
    let handle = tasks.spawn(async move {
        let started = Instant::now();
        let mut record = base_record(&shared.plan, index, Outcome::Failed);
        let result = run_stage(&shared, index, selected, &upstream, &mut record).await;
        shared.ended[index].send_replace(true);
        record.duration_s = started.elapsed().as_secs_f64();
        match result {
            Ok(done) => (index, record, Some(done)),
            Err(error) => {
                record.status = Outcome::Failed;
                let _ = shared.events.send(Event::Failed {
                    id: record.id.clone(),
                    error: error.to_string(),
                    log: record.log.clone(),
                });
                record.error = Some(error.to_string());
                (index, record, None)
            }
        }
    });
    handle.id()
}
