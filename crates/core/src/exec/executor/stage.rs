//! One stage's way through a run: its key, then a cache hit, a result served by the longer
//! variant of a steps sweep, or lock → recheck → compute → pin.
use super::compute::compute;
use super::locked::{check_locked_key, check_locked_output};
use super::pins::{lock_key, pin, reuse};
use super::records::adopt;
use super::{Done, Outcome, Shared, StageRecord, blocking};
use crate::cache::CacheError;
use crate::cache::lock::Acquired;
use crate::exec::error::ExecError;
use crate::exec::events::Event;
use crate::plan::dirty::{DirtyReason, explain_miss, texts};
use crate::plan::fingerprint::{KeyMaterial, material};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Key → cache hit, or lock → recheck → slot → run → commit.
pub(super) async fn run_stage(
    shared: &Arc<Shared>,
    index: usize,
    selected: bool,
    upstream: &BTreeMap<usize, Done>,
    record: &mut StageRecord,
) -> Result<Done, ExecError> {
    let stage = shared.plan.pipeline.stages[index].clone();
    let new = compute_material(shared, index, upstream).await?;
    let key = new.key();
    record.key = Some(key.clone());
    check_locked_key(shared.locked.as_ref(), &stage.id, &key)?;
    let forced = shared.forced[index];
    if !forced && let Some(done) = reuse(shared, index, &key, record, None).await? {
        return Ok(done);
    }
    if let Some(done) = served_by_runner(shared, index, &key, record).await? {
        // Computed by this run (from a longer run's snapshot): `--locked` checks it like any.
        check_locked_output(shared.locked.as_ref(), &stage.id, &done.1)?;
        return Ok(done);
    }
    warn_unreadable_record(shared, &stage.id, &key);
    if !selected {
        return Err(ExecError::NotSelected { key });
    }
    let (lock, waited) = match lock_key(shared, &stage.id, &key, forced).await? {
        Acquired::Immediately(lock) => (lock, false),
        Acquired::AfterWaiting(lock) => (lock, true),
        Acquired::Shared(pin) => {
            let found = shared
                .store
                .lookup(&key)
                .ok_or(ExecError::ResultDisappeared)?;
            return Ok(adopt(shared, index, &key, pin, found, record, None));
        }
    };
    if (!forced || waited) && shared.store.lookup(&key).is_some() {
        drop(lock); // pinning takes the shared lock
        return (reuse(shared, index, &key, record, None).await?)
            .ok_or(ExecError::ResultBeingReplaced);
    }
    let reasons = if forced {
        vec![DirtyReason::Forced]
    } else {
        explain_miss(&shared.store, &shared.plan.pipeline.name, &stage.id, &new)
    };
    record.reasons = texts(&reasons);
    let done = compute(shared, index, upstream, &new, &key, record).await?;
    drop(lock); // pinning takes the shared lock
    let Some((pinned, _)) = pin(shared, &key, Duration::MAX).await? else {
        return Err(ExecError::NewResultRemoved);
    };
    shared.keep_pin(&key, pinned);
    check_locked_output(shared.locked.as_ref(), &stage.id, &done.1)?;
    Ok(done)
}

/// For a shorter variant of a steps sweep: waits until the longest variant's task has ended,
/// then takes the result committed from its snapshot (`None`: there is none, e.g. the longer
/// run was cached or failed; the variant then computes on its own).
pub(super) async fn served_by_runner(
    shared: &Arc<Shared>,
    index: usize,
    key: &str,
    record: &mut StageRecord,
) -> Result<Option<Done>, ExecError> {
    let Some((runner, _)) = shared.sharing.served_by[index] else {
        return Ok(None);
    };
    if shared.forced[index] {
        return Ok(None); // `--force` recomputes it on its own
    }
    let mut ended = shared.ended[runner].subscribe();
    // The runner may never start (cancelled before it was spawned): keep an eye on the flag.
    while !*ended.borrow() && !shared.cancel.is_cancelled() {
        let _ = tokio::time::timeout(Duration::from_millis(200), ended.changed()).await;
    }
    let note = (shared.sharing)
        .served_note(&shared.plan.pipeline, index)
        .unwrap_or_default();
    let Some(done) = reuse(shared, index, key, record, Some(note.clone())).await? else {
        return Ok(None);
    };
    record.status = Outcome::Ran;
    record.reasons = vec![note];
    Ok(Some(done))
}

/// A result folder whose record does not read is treated as absent: recomputed (the commit
/// replaces the folder), with a warning naming the record.
pub(super) fn warn_unreadable_record(shared: &Shared, id: &str, key: &str) {
    if let Some(problem) = shared.store.unreadable_record(key) {
        let _ = shared.events.send(Event::Warning {
            id: id.to_string(),
            message: format!("its cached result is unusable ({problem}); recomputing it"),
        });
    }
}

pub(super) async fn compute_material(
    shared: &Arc<Shared>,
    index: usize,
    upstream: &BTreeMap<usize, Done>,
) -> Result<KeyMaterial, ExecError> {
    let (plan, memo, device) = (shared.plan.clone(), shared.memo.clone(), shared.key_device);
    let digests: BTreeMap<usize, String> =
        upstream.iter().map(|(i, (_, d))| (*i, d.clone())).collect();
    let built = blocking(move || {
        material(
            &plan.pipeline.stages[index],
            &|i| digests.get(&i).cloned(),
            &memo,
            device,
        )
    })
    .await?;
    key_material(built)
}

/// What [`material`] built, or why not: an upstream without output, or a file that did not hash.
pub(super) fn key_material(
    built: Result<Result<KeyMaterial, String>, CacheError>,
) -> Result<KeyMaterial, ExecError> {
    match built {
        Ok(Ok(material)) => Ok(material),
        Ok(Err(upstream)) => Err(ExecError::UpstreamMissing { upstream }),
        Err(error) => Err(ExecError::Hashing(error)),
    }
}
