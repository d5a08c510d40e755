//! The executor: runs a plan on tokio. Stages whose upstreams are done run concurrently; each
//! stage's work (hashing, the stage itself, committing) runs on blocking threads. GPU stages
//! take a device slot (one stage per device at a time), CPU stages a `--jobs` permit. A
//! per-key lock makes concurrent runs on one cache compute each key once. A failed stage stops
//! its dependents only; cancellation stops new stages and signals running ones.
use super::events::{CancelFlag, Event, EventSender, ProgressReporter};
use super::job::{JOB_FORMAT, JobSpec, Placement, SnapshotSpec, commit_staged, run_in_staging};
use super::lockfile::LockFile;
pub use super::record::{Outcome, RunRecord, StageRecord};
use super::slots::{Slots, take_slot};
use super::slurm::{JobEnd, Slurm, SlurmOptions};
use crate::cache::CacheError;
use crate::cache::hash::{HashMemo, tree_digest};
use crate::cache::lock::{Acquired, KeyLock};
use crate::cache::store::{ResultRecord, Store, now_unix};
use crate::cache::verify;
use crate::plan::dirty::{DirtyReason, explain_miss, texts};
use crate::plan::fingerprint::{KeyMaterial, material};
use crate::plan::graph::Plan;
use crate::plan::prefix;
use crate::plan::prefix::{Sharing, sharing};
use crate::stages::{DeviceClass, ExtendFrom, ResolvedInput};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;

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
    /// Keeps `pin` on `key`'s result until the run ends (a second pin on a key is dropped).
    fn keep_pin(&self, key: &str, pin: KeyLock) {
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        pins.entry(key.to_string()).or_insert(pin);
    }

    fn is_pinned(&self, key: &str) -> bool {
        let pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        pins.contains_key(key)
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
    let devices = if options.devices.is_empty() {
        vec![crate::device::Device::Cpu]
    } else {
        options.devices.clone()
    };
    let store_for_slurm = store.clone();
    let shared = Arc::new(Shared {
        plan: plan.clone(),
        store,
        memo,
        events: events.clone(),
        cancel: cancel.clone(),
        slots: Slots::new(options.jobs, &devices),
        key_device: devices[0],
        forced: options.forced.clone(),
        locked: options.locked.clone(),
        verify: options.verify,
        run_started: started,
        pins: Mutex::new(HashMap::new()),
        slurm: (options.slurm.clone()).map(|o| Arc::new(Slurm::new(o, store_for_slurm))),
        sharing: sharing(&plan.pipeline, &options.selected),
        ended: (0..plan.len()).map(|_| watch::channel(false).0).collect(),
    });
    let poller = shared.slurm.clone().map(|slurm| {
        let cancel = cancel.clone();
        tokio::spawn(async move { slurm.poll(cancel).await })
    });
    let active = active_stages(&plan, &options.selected);
    let _ = events.send(Event::RunStarted {
        pipeline: plan.pipeline.name.clone(),
        stages: options.selected.iter().filter(|s| **s).count(),
    });
    let mut records: Vec<Option<StageRecord>> = vec![None; plan.len()];
    let mut done: BTreeMap<usize, Done> = BTreeMap::new();
    let mut waiting: Vec<usize> = (0..plan.len())
        .map(|i| {
            plan.upstream(i)
                .iter()
                .filter(|u| active.contains(u))
                .count()
        })
        .collect();
    let mut tasks = JoinSet::new();
    let mut task_stage: HashMap<tokio::task::Id, usize> = HashMap::new();
    for &index in &active {
        if waiting[index] == 0 {
            let id = spawn_stage(&mut tasks, &shared, index, options.selected[index], &done);
            task_stage.insert(id, index);
        }
    }
    while let Some(joined) = tasks.join_next_with_id().await {
        let (index, record, finished) = match joined {
            Ok((_, result)) => result,
            Err(error) => {
                // A panic outside the stage's own code: fail the stage, never report success.
                let Some(&index) = task_stage.get(&error.id()) else {
                    continue;
                };
                let mut record = base_record(&plan, index, Outcome::Failed);
                record.error = Some(format!("internal error: {error}"));
                (index, record, None)
            }
        };
        records[index] = Some(record);
        let Some(result) = finished else {
            block_dependents(&plan, index, &mut records, &events, &options.selected);
            continue;
        };
        done.insert(index, result);
        for dependent in plan.downstream(index) {
            waiting[dependent] = waiting[dependent].saturating_sub(1);
            if waiting[dependent] == 0
                && records[dependent].is_none()
                && active.contains(&dependent)
            {
                if cancel.is_cancelled() {
                    records[dependent] =
                        Some(skipped(&plan, dependent, "cancelled".to_string(), &events));
                } else {
                    let id = spawn_stage(
                        &mut tasks,
                        &shared,
                        dependent,
                        options.selected[dependent],
                        &done,
                    );
                    task_stage.insert(id, dependent);
                }
            }
        }
    }
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

/// Selected stages plus every upstream they need (the latter only looked up in the cache).
fn active_stages(plan: &Plan, selected: &[bool]) -> BTreeSet<usize> {
    let mut active = BTreeSet::new();
    for (index, _) in selected.iter().enumerate().filter(|(_, s)| **s) {
        active.extend(plan.ancestors(index));
    }
    active
}

fn block_dependents(
    plan: &Plan,
    failed: usize,
    records: &mut [Option<StageRecord>],
    events: &EventSender,
    selected: &[bool],
) {
    let failed_id = plan.pipeline.stages[failed].id.clone();
    for dependent in plan.descendants(failed) {
        if dependent != failed && records[dependent].is_none() && selected[dependent] {
            records[dependent] = Some(skipped(
                plan,
                dependent,
                format!("upstream `{failed_id}` did not finish"),
                events,
            ));
        }
    }
}

fn skipped(plan: &Plan, index: usize, reason: String, events: &EventSender) -> StageRecord {
    let mut record = base_record(plan, index, Outcome::Skipped);
    let _ = events.send(Event::Skipped {
        id: record.id.clone(),
        reason: reason.clone(),
    });
    record.error = Some(reason);
    record
}

fn base_record(plan: &Plan, index: usize, status: Outcome) -> StageRecord {
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

type TaskResult = (usize, StageRecord, Option<Done>);

fn spawn_stage(
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
                    error: error.clone(),
                    log: record.log.clone(),
                });
                record.error = Some(error);
                (index, record, None)
            }
        }
    });
    handle.id()
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| format!("internal error: the stage's thread panicked ({e})"))
}

/// Key → cache hit, or lock → recheck → slot → run → commit.
async fn run_stage(
    shared: &Arc<Shared>,
    index: usize,
    selected: bool,
    upstream: &BTreeMap<usize, Done>,
    record: &mut StageRecord,
) -> Result<Done, String> {
    let stage = shared.plan.pipeline.stages[index].clone();
    let new = compute_material(shared, index, upstream).await?;
    let key = new.key();
    record.key = Some(key.clone());
    check_locked_key(shared, &stage.id, &key)?;
    let forced = shared.forced[index];
    if !forced && let Some(done) = reuse(shared, index, &key, record, None).await? {
        return Ok(done);
    }
    if let Some(done) = served_by_runner(shared, index, &key, record).await? {
        // Computed by this run (from a longer run's snapshot): `--locked` checks it like any.
        check_locked_output(shared, &stage.id, &done.1)?;
        return Ok(done);
    }
    warn_unreadable_record(shared, &stage.id, &key);
    if !selected {
        return Err(format!(
            "not in the cache and not selected by --only/--until (key {}); run it first",
            short(&key)
        ));
    }
    let waiting = {
        let (events, id, key) = (shared.events.clone(), stage.id.clone(), key.clone());
        move || {
            let _ = events.send(Event::Waiting { id, key });
        }
    };
    // While waiting: reuse the result once another holder committed it (unless forced), or
    // when this run pinned it for another stage with the same key (replacing it would pull it
    // from under that stage's readers, and waiting for our own pin would never end).
    let reusable = {
        let (shared, key) = (shared.clone(), key.clone());
        move || (!forced && shared.store.lookup(&key).is_some()) || shared.is_pinned(&key)
    };
    let (store, cancel, lock_key) = (shared.store.clone(), shared.cancel.clone(), key.clone());
    let lock = blocking(move || store.lock_key(&lock_key, cancel.as_atomic(), waiting, reusable))
        .await?
        .map_err(|e| e.to_string())?;
    let (lock, waited) = match lock {
        Acquired::Immediately(lock) => (lock, false),
        Acquired::AfterWaiting(lock) => (lock, true),
        Acquired::Shared(pin) => {
            let found = shared.store.lookup(&key).ok_or_else(|| {
                "its result disappeared right after it was committed (cache gc?); run again"
                    .to_string()
            })?;
            return Ok(adopt(shared, index, &key, pin, found, record, None));
        }
    };
    if (!forced || waited) && shared.store.lookup(&key).is_some() {
        drop(lock); // pinning takes the shared lock
        return reuse(shared, index, &key, record, None)
            .await?
            .ok_or_else(|| {
                "its result was being replaced by another run (--force?) right now; run again"
                    .to_string()
            });
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
        return Err("its new result was removed at once (cache gc?); run again".to_string());
    };
    shared.keep_pin(&key, pinned);
    check_locked_output(shared, &stage.id, &done.1)?;
    Ok(done)
}

/// For a shorter variant of a steps sweep: waits until the longest variant's task has ended,
/// then takes the result committed from its snapshot (`None`: there is none, e.g. the longer
/// run was cached or failed; the variant then computes on its own).
async fn served_by_runner(
    shared: &Arc<Shared>,
    index: usize,
    key: &str,
    record: &mut StageRecord,
) -> Result<Option<Done>, String> {
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

/// The variants the run of stage `index` also produces from snapshots: those not cached yet,
/// each with the key material it has on its own (same upstreams as the runner).
async fn snapshot_specs(
    shared: &Arc<Shared>,
    index: usize,
    upstream: &BTreeMap<usize, Done>,
) -> Result<Vec<SnapshotSpec>, String> {
    let mut specs = Vec::new();
    for &(served, step) in &shared.sharing.serves[index] {
        if shared.forced[served] {
            continue; // recomputed on its own
        }
        let material = compute_material(shared, served, upstream).await?;
        let key = material.key();
        if shared.store.lookup(&key).is_none() {
            specs.push(SnapshotSpec {
                step,
                stage_id: shared.plan.pipeline.stages[served].id.clone(),
                key,
                material,
            });
        }
    }
    Ok(specs)
}

/// The cached result this training stage can continue from (docs/cache.md "Extending a run").
async fn extension_base(
    shared: &Arc<Shared>,
    index: usize,
    material: &KeyMaterial,
) -> Result<Option<ExtendFrom>, String> {
    let stage = shared.plan.pipeline.stages[index].clone();
    if shared.forced[index] || stage.kind.prefix_problem(&stage.params).is_some() {
        return Ok(None);
    }
    let Some(field) = stage.kind.steps_field() else {
        return Ok(None);
    };
    let (store, material) = (shared.store.clone(), material.clone());
    blocking(move || prefix::longest_cached_prefix(&store, &material, field)).await
}

/// A result folder whose record does not read is treated as absent: recomputed (the commit
/// replaces the folder), with a warning naming the record.
fn warn_unreadable_record(shared: &Shared, id: &str, key: &str) {
    if let Some(problem) = shared.store.unreadable_record(key) {
        let _ = shared.events.send(Event::Warning {
            id: id.to_string(),
            message: format!("its cached result is unusable ({problem}); recomputing it"),
        });
    }
}

async fn compute_material(
    shared: &Arc<Shared>,
    index: usize,
    upstream: &BTreeMap<usize, Done>,
) -> Result<KeyMaterial, String> {
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
    match built {
        Ok(Ok(material)) => Ok(material),
        Ok(Err(upstream)) => Err(format!(
            "internal error: upstream `{upstream}` has no output"
        )),
        Err(error) => Err(format!("hashing inputs: {error}")),
    }
}

/// The cached result for `key`, pinned for this run and recorded as this stage's latest;
/// `None` when there is none, or when another process holds its lock exclusively (it is
/// being removed or replaced: the caller then waits for the key's lock).
async fn reuse(
    shared: &Arc<Shared>,
    index: usize,
    key: &str,
    record: &mut StageRecord,
    served: Option<String>,
) -> Result<Option<Done>, String> {
    let Some((lock, found)) = pin(shared, key, PIN_PATIENCE).await? else {
        return Ok(None);
    };
    let (store, memo, checked) = (shared.store.clone(), shared.memo.clone(), found.clone());
    let memo = (!shared.verify).then_some(memo);
    let check = move || verify::damage(&store, memo.as_deref(), &checked);
    if let Some(damage) = blocking(check).await? {
        let id = &shared.plan.pipeline.stages[index].id;
        let _ = shared.events.send(Event::Warning {
            id: id.clone(),
            message: format!("{}; quarantined, recomputing it", damage.problem),
        });
        verify::quarantine_damaged(&shared.store, key, &damage).map_err(|e| e.to_string())?;
        drop(lock);
        return Ok(None);
    }
    Ok(Some(adopt(shared, index, key, lock, found, record, served)))
}

/// Keeps `pin` until the run ends and records the result `found` as this stage's latest.
fn adopt(
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

/// How long [`pin`] retries a busy key lock while the result still exists: other runs and
/// `cache gc` hold it only for a moment (a lookup, or removing the folder); a forced recompute
/// holds it longer, and then the caller waits for the lock with a message instead.
const PIN_PATIENCE: Duration = Duration::from_secs(2);
const PIN_RETRY: Duration = Duration::from_millis(20);

/// A shared lock on `key`'s result, for the caller to keep until the run ends. `None` when
/// there is no result, or when the key stayed locked exclusively by another process for
/// `patience`.
async fn pin(
    shared: &Arc<Shared>,
    key: &str,
    patience: Duration,
) -> Result<Option<(KeyLock, ResultRecord)>, String> {
    let (store, owned_key) = (shared.store.clone(), key.to_string());
    let cancel = shared.cancel.clone();
    blocking(
        move || -> Result<Option<(KeyLock, ResultRecord)>, CacheError> {
            let started = Instant::now();
            loop {
                if store.lookup(&owned_key).is_none() {
                    return Ok(None);
                }
                if let Some(lock) = store.try_lock_key_shared(&owned_key)? {
                    return Ok(store.lookup(&owned_key).map(|found| (lock, found)));
                }
                if started.elapsed() >= patience || cancel.is_cancelled() {
                    return Ok(None);
                }
                std::thread::sleep(PIN_RETRY);
            }
        },
    )
    .await?
    .map_err(|e| e.to_string())
}

fn short(key: &str) -> &str {
    &key[..12.min(key.len())]
}

fn check_locked_key(shared: &Shared, id: &str, key: &str) -> Result<(), String> {
    let Some(lock) = &shared.locked else {
        return Ok(());
    };
    match lock.stages.get(id) {
        None => Err(format!("--locked: stage `{id}` is not in the lock file")),
        Some(entry) if entry.key != key => Err(format!(
            "--locked: stage `{id}` has key {} but the lock file has {}; its inputs or parameters differ (see `dreampipe explain`)",
            short(key),
            short(&entry.key)
        )),
        Some(_) => Ok(()),
    }
}

fn check_locked_output(shared: &Shared, id: &str, digest: &str) -> Result<(), String> {
    let Some(entry) = shared.locked.as_ref().and_then(|l| l.stages.get(id)) else {
        return Ok(());
    };
    if entry.output == digest {
        return Ok(());
    }
    Err(format!(
        "--locked: stage `{id}` produced output {} but the lock file has {}; the stage is not reproducible here",
        short(digest),
        short(&entry.output)
    ))
}

/// Runs the stage in a staging folder and commits its output.
async fn compute(
    shared: &Arc<Shared>,
    index: usize,
    upstream: &BTreeMap<usize, Done>,
    new: &KeyMaterial,
    key: &str,
    record: &mut StageRecord,
) -> Result<Done, String> {
    if let Some(slurm) = &shared.slurm {
        return compute_on_slurm(shared, slurm, index, upstream, new, key, record).await;
    }
    let stage = shared.plan.pipeline.stages[index].clone();
    let device_slots = stage.resources.device_slots(stage.kind.device_class());
    let (slot, devices) = take_slot(&shared.slots, device_slots, &stage.id).await?;
    let device = match stage.kind.device_class() {
        DeviceClass::Gpu => devices.first().copied().unwrap_or(shared.key_device),
        DeviceClass::Cpu => crate::device::Device::Cpu,
    };
    if shared.cancel.is_cancelled() {
        return Err("cancelled".to_string());
    }
    let job = planned_job(shared, index, upstream, new, key).await?;
    record.log = Some(shared.store.log_path(key));
    let _ = shared.events.send(Event::Started {
        id: stage.id.clone(),
        key: key.to_string(),
    });
    let started = Instant::now();
    let since_run_start = |at: Instant| at.duration_since(shared.run_started).as_secs_f64();
    let (store, events, cancel) = (
        shared.store.clone(),
        shared.events.clone(),
        shared.cancel.clone(),
    );
    let (run_stage, run_job) = (stage.clone(), job.clone());
    let outcome = blocking(move || {
        let progress = ProgressReporter::new(&run_stage.id, Some(events));
        let placement = Placement {
            device,
            devices: &devices,
        };
        run_in_staging(
            &store,
            run_stage.kind.as_ref(),
            &run_job,
            &placement,
            &progress,
            &cancel,
        )
    })
    .await;
    drop(slot);
    record.ran = Some((since_run_start(started), since_run_start(Instant::now())));
    let staged = outcome??;
    let seconds = staged.seconds;
    let store = shared.store.clone();
    let committed = blocking(move || commit_staged(&store, &job, staged)).await??;
    finish_computed(shared, &stage.id, key, seconds, &committed, record)
}

/// Runs the stage as a Slurm job (resubmitted up to `--retries` times) and adopts the result
/// the job committed. A job an earlier controller left running for this key is waited for
/// instead of submitting a duplicate.
async fn compute_on_slurm(
    shared: &Arc<Shared>,
    slurm: &Arc<Slurm>,
    index: usize,
    upstream: &BTreeMap<usize, Done>,
    new: &KeyMaterial,
    key: &str,
    record: &mut StageRecord,
) -> Result<Done, String> {
    let stage = shared.plan.pipeline.stages[index].clone();
    let job = planned_job(shared, index, upstream, new, key).await?;
    let mut resources =
        (shared.plan.pipeline.executor).resources_for(stage.kind.kind(), &stage.resources);
    resources.gpus = Some(resources.device_slots(stage.kind.device_class()));
    let script = {
        let (slurm, job) = (slurm.clone(), job.clone());
        let needs_torch = stage.kind.needs_torch();
        blocking(move || slurm.prepare(&job, &resources, needs_torch)).await??
    };
    let _place = slurm.place().await?;
    if shared.cancel.is_cancelled() {
        return Err("cancelled".to_string());
    }
    record.log = Some(shared.store.log_path(key));
    let _ = shared.events.send(Event::Started {
        id: stage.id.clone(),
        key: key.to_string(),
    });
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        let (job_id, adopted) = match slurm.earlier_job(key) {
            Some(id) => (id, true),
            None => {
                let (slurm, script) = (slurm.clone(), script.clone());
                (blocking(move || slurm.submit(&script)).await??, false)
            }
        };
        let _ = shared.events.send(Event::Submitted {
            id: stage.id.clone(),
            job_id: job_id.clone(),
            adopted,
        });
        let end = slurm.wait(&job_id, key).await;
        let since_run_start = |at: Instant| at.duration_since(shared.run_started).as_secs_f64();
        record.ran = Some((since_run_start(started), since_run_start(Instant::now())));
        if let JobEnd::Exited(exit) = &end
            && exit.ok
        {
            let committed = shared.store.lookup(key).ok_or_else(|| {
                format!("Slurm job {job_id} reported success but the cache has no result for key {}; is the cache on a filesystem the nodes share?", short(key))
            })?;
            return finish_computed(shared, &stage.id, key, exit.seconds, &committed, record);
        }
        let (failure, log) = slurm.failure(key, &job_id, &end);
        record.log = Some(log);
        if matches!(end, JobEnd::Cancelled)
            || shared.cancel.is_cancelled()
            || attempt >= slurm.options.retries
        {
            return Err(failure);
        }
        attempt += 1;
        let _ = shared.events.send(Event::Warning {
            id: stage.id.clone(),
            message: format!(
                "{failure}; resubmitting (retry {attempt} of {})",
                slurm.options.retries
            ),
        });
    }
}

/// Records a result this run computed (here or in a Slurm job): remembers its file digests,
/// points the stage at it and reports it finished.
fn finish_computed(
    shared: &Shared,
    id: &str,
    key: &str,
    seconds: f64,
    committed: &ResultRecord,
    record: &mut StageRecord,
) -> Result<Done, String> {
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

/// The job of stage `index` with what its run also does: the snapshots it leaves for the
/// shorter variants it serves, and the cached shorter run it continues.
async fn planned_job(
    shared: &Arc<Shared>,
    index: usize,
    upstream: &BTreeMap<usize, Done>,
    material: &KeyMaterial,
    key: &str,
) -> Result<JobSpec, String> {
    let mut job = job_spec(shared, index, upstream, material, key);
    job.snapshots = snapshot_specs(shared, index, upstream).await?;
    job.extend_from = extension_base(shared, index, material).await?;
    Ok(job)
}

/// The self-contained description of one run of stage `index` under `key`.
fn job_spec(
    shared: &Shared,
    index: usize,
    upstream: &BTreeMap<usize, Done>,
    material: &KeyMaterial,
    key: &str,
) -> JobSpec {
    let stage = &shared.plan.pipeline.stages[index];
    JobSpec {
        format: JOB_FORMAT,
        pipeline: shared.plan.pipeline.name.clone(),
        pipeline_dir: absolute_dir(&shared.plan.pipeline.file),
        stage_id: stage.id.clone(),
        kind: stage.kind.kind().to_string(),
        params: stage.params.clone(),
        inputs: resolve_inputs(shared, stage, upstream, material),
        key: key.to_string(),
        material: material.clone(),
        replace: shared.forced[index],
        snapshots: Vec::new(),
        extend_from: None,
    }
}

fn resolve_inputs(
    shared: &Shared,
    stage: &crate::pipeline::StageInstance,
    upstream: &BTreeMap<usize, Done>,
    material: &KeyMaterial,
) -> BTreeMap<String, Vec<ResolvedInput>> {
    let stages = &shared.plan.pipeline.stages;
    let mut inputs: BTreeMap<String, Vec<ResolvedInput>> = BTreeMap::new();
    for (field, refs) in &stage.refs {
        for (_, index) in refs {
            if let Some((key, digest)) = upstream.get(index) {
                inputs
                    .entry(field.clone())
                    .or_default()
                    .push(ResolvedInput {
                        upstream: Some(stages[*index].name.clone()),
                        stage_id: Some(stages[*index].id.clone()),
                        path: shared.store.output_dir(key),
                        digest: Some(digest.clone()),
                    });
            }
        }
    }
    for (field, paths) in &stage.paths {
        for (written, path) in paths {
            let digest = material
                .inputs
                .get(field)
                .and_then(|trees| trees.get(written))
                .map(tree_digest);
            inputs
                .entry(field.clone())
                .or_default()
                .push(ResolvedInput {
                    upstream: None,
                    stage_id: None,
                    path: path.clone(),
                    digest,
                });
        }
    }
    inputs
}

/// The absolute folder of the pipeline file.
fn absolute_dir(file: &std::path::Path) -> PathBuf {
    let dir = match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::path::absolute(&dir).unwrap_or(dir)
}
