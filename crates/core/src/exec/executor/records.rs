//! The stage records the executor fills in: a stage that did not run (not selected, skipped),
//! a cached result adopted, a result this run computed.
use super::{Done, Outcome, Shared, StageRecord};
use crate::cache::lock::KeyLock;
use crate::cache::store::ResultRecord;
use crate::exec::error::{ExecError, SkipReason};
use crate::exec::events::{Event, EventSender};
use crate::plan::graph::Plan;

pub(super) fn skipped(
    plan: &Plan,
    index: usize,
    reason: SkipReason,
    events: &EventSender,
) -> StageRecord {
    let mut record = base_record(plan, index, Outcome::Skipped);
    let _ = events.send(Event::Skipped {
        id: record.id.clone(),
        reason: reason.to_string(),
    });
    record.error = Some(reason.to_string());
    record
}

pub(super) fn base_record(plan: &Plan, index: usize, status: Outcome) -> StageRecord {
    let stage = &plan.pipeline.stages[index];
    StageRecord {
        id: stage.id.clone(),
        name: stage.name.clone(),
        kind: stage.kind.kind().to_string(),
        status,
        duration_s: 0.0,
        key: None,
        output: None,
        output_digest: None,
        params: serde_json::Value::Object(stage.params.clone()),
        log: None,
        error: None,
        ran: None,
        reasons: Vec::new(),
    }
}

/// Keeps `pin` until the run ends and records the result `found` as this stage's latest.
pub(super) fn adopt(
    shared: &Shared,
    index: usize,
    key: &str,
    pin: KeyLock,
    found: ResultRecord,
    record: &mut StageRecord,
    served: Option<String>,
) -> Done {
    shared.keep_pin(key, pin);
    let id = &shared.plan.pipeline.stages[index].id;
    let _ = shared
        .store
        .record_stage(&shared.plan.pipeline.name, id, key);
    let output = shared.store.output_dir(key);
    let event = match served {
        Some(from) => Event::Served {
            id: id.clone(),
            from,
            output: output.clone(),
        },
        None => Event::Cached {
            id: id.clone(),
            key: key.to_string(),
            output: output.clone(),
        },
    };
    let _ = shared.events.send(event);
    record.status = Outcome::Cached;
    record.output = Some(output);
    record.output_digest = Some(found.output_digest.clone());
    (key.to_string(), found.output_digest)
}

/// Records a result this run computed (here or in a Slurm job): remembers its file digests,
/// points the stage at it and reports it finished.
pub(super) fn finish_computed(
    shared: &Shared,
    id: &str,
    key: &str,
    seconds: f64,
    committed: &ResultRecord,
    record: &mut StageRecord,
) -> Result<Done, ExecError> {
    let store = &shared.store;
    let output = store.output_dir(key);
    for (name, digest) in &committed.files {
        shared.memo.remember(&output.join(name), digest);
    }
    let _ = store.record_stage(&shared.plan.pipeline.name, id, key);
    let _ = shared.events.send(Event::Finished {
        id: id.to_string(),
        seconds,
        output: output.clone(),
    });
    record.status = Outcome::Ran;
    record.output = Some(output);
    record.output_digest = Some(committed.output_digest.clone());
    Ok((key.to_string(), committed.output_digest.clone()))
}
