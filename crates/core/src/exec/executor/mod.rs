//! The executor: runs a plan on tokio. Stages whose upstreams are done run concurrently; each
//! stage's work (hashing, the stage itself, committing) runs on blocking threads. GPU stages
//! take a device slot (one stage per device at a time), CPU stages a `--jobs` permit. A
//! per-key lock makes concurrent runs on one cache compute each key once. A failed stage stops
//! its dependents only; cancellation stops new stages and signals running ones.
use super::error::{ExecError, SkipReason};
use super::events::{CancelFlag, Event, EventSender};
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

/// The scheduling state of one run: each stage's record so far, the finished stages' results,
/// how many active upstreams each stage still waits for, and the running tasks.
struct Schedule {
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
    fn new(shared: &Arc<Shared>, selected: Vec<bool>) -> Self {
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
    async fn run(mut self) -> Vec<Option<StageRecord>> {
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
    let reason = SkipReason::UpstreamFailed {
        id: plan.pipeline.stages[failed].id.clone(),
    };
    for dependent in plan.descendants(failed) {
        if dependent != failed && records[dependent].is_none() && selected[dependent] {
            records[dependent] = Some(skipped(plan, dependent, reason.clone(), events));
        }
    }
}

fn skipped(plan: &Plan, index: usize, reason: SkipReason, events: &EventSender) -> StageRecord {
    let mut record = base_record(plan, index, Outcome::Skipped);
    let _ = events.send(Event::Skipped {
        id: record.id.clone(),
        reason: reason.to_string(),
    });
    record.error = Some(reason.to_string());
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

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ExecError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(ExecError::ThreadPanicked)
}

/// Key → cache hit, or lock → recheck → slot → run → commit.
async fn run_stage(
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

/// Takes `key`'s lock to compute it, saying so when another holder makes the stage wait.
async fn lock_key(
    shared: &Arc<Shared>,
    id: &str,
    key: &str,
    forced: bool,
) -> Result<Acquired, ExecError> {
    let waiting = {
        let (events, id, key) = (shared.events.clone(), id.to_string(), key.to_string());
        move || {
            let _ = events.send(Event::Waiting { id, key });
        }
    };
    // While waiting: reuse the result once another holder committed it (unless forced), or
    // when this run pinned it for another stage with the same key (replacing it would pull it
    // from under that stage's readers, and waiting for our own pin would never end).
    let reusable = {
        let (shared, key) = (shared.clone(), key.to_string());
        move || (!forced && shared.store.lookup(&key).is_some()) || shared.is_pinned(&key)
    };
    let (store, cancel, key) = (shared.store.clone(), shared.cancel.clone(), key.to_string());
    let acquired = blocking(move || store.lock_key(&key, cancel.as_atomic(), waiting, reusable));
    Ok(acquired.await??)
}

/// For a shorter variant of a steps sweep: waits until the longest variant's task has ended,
/// then takes the result committed from its snapshot (`None`: there is none, e.g. the longer
/// run was cached or failed; the variant then computes on its own).
async fn served_by_runner(
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

/// The variants the run of stage `index` also produces from snapshots: those not cached yet,
/// each with the key material it has on its own (same upstreams as the runner).
async fn snapshot_specs(
    shared: &Arc<Shared>,
    index: usize,
    upstream: &BTreeMap<usize, Done>,
) -> Result<Vec<SnapshotSpec>, ExecError> {
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
) -> Result<Option<ExtendFrom>, ExecError> {
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
fn key_material(
    built: Result<Result<KeyMaterial, String>, CacheError>,
) -> Result<KeyMaterial, ExecError> {
    match built {
        Ok(Ok(material)) => Ok(material),
        Ok(Err(upstream)) => Err(ExecError::UpstreamMissing { upstream }),
        Err(error) => Err(ExecError::Hashing(error)),
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
) -> Result<Option<Done>, ExecError> {
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
        verify::quarantine_damaged(&shared.store, key, &damage)?;
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
) -> Result<Option<(KeyLock, ResultRecord)>, ExecError> {
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
    .map_err(ExecError::from)
}

/// With `--locked`: the stage must be in the lock file under the same key.
fn check_locked_key(locked: Option<&LockFile>, id: &str, key: &str) -> Result<(), ExecError> {
    let Some(lock) = locked else {
        return Ok(());
    };
    match lock.stages.get(id) {
        None => Err(ExecError::NotLocked { id: id.to_string() }),
        Some(entry) if entry.key != key => Err(ExecError::LockedKeyMismatch {
            id: id.to_string(),
            key: key.to_string(),
            locked: entry.key.clone(),
        }),
        Some(_) => Ok(()),
    }
}

/// With `--locked`: a computed output must have the digest the lock file recorded.
fn check_locked_output(locked: Option<&LockFile>, id: &str, digest: &str) -> Result<(), ExecError> {
    let Some(entry) = locked.and_then(|l| l.stages.get(id)) else {
        return Ok(());
    };
    if entry.output == digest {
        return Ok(());
    }
    Err(ExecError::LockedOutputMismatch {
        id: id.to_string(),
        output: digest.to_string(),
        locked: entry.output.clone(),
    })
}

/// Runs the stage in a staging folder and commits its output.
async fn compute(
    shared: &Arc<Shared>,
    index: usize,
    upstream: &BTreeMap<usize, Done>,
    new: &KeyMaterial,
    key: &str,
    record: &mut StageRecord,
) -> Result<Done, ExecError> {
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
        return Err(ExecError::Cancelled);
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
        let progress = super::events::progress_reporter(&run_stage.id, events);
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
) -> Result<Done, ExecError> {
    let stage = shared.plan.pipeline.stages[index].clone();
    let job = planned_job(shared, index, upstream, new, key).await?;
    let mut resources =
        (shared.plan.pipeline.executor).resources_for(stage.kind.kind(), &stage.resources);
    resources.gpus = Some(resources.device_slots(stage.kind.device_class()));
    let script = {
        let (slurm, job) = (slurm.clone(), job.clone());
        let needs_torch = stage.kind.needs_torch();
        blocking(move || slurm.prepare(&job, &resources, needs_torch))
            .await?
            .map_err(ExecError::Slurm)?
    };
    let _place = slurm.place().await.map_err(ExecError::Slurm)?;
    if shared.cancel.is_cancelled() {
        return Err(ExecError::Cancelled);
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
                let submitted = blocking(move || slurm.submit(&script)).await?;
                (submitted.map_err(ExecError::Slurm)?, false)
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
            let committed = (shared.store.lookup(key)).ok_or_else(|| ExecError::SlurmNoResult {
                job_id: job_id.clone(),
                key: key.to_string(),
            })?;
            return finish_computed(shared, &stage.id, key, exit.seconds, &committed, record);
        }
        let (failure, log) = slurm.failure(key, &job_id, &end);
        record.log = Some(log);
        if matches!(end, JobEnd::Cancelled)
            || shared.cancel.is_cancelled()
            || attempt >= slurm.options.retries
        {
            return Err(ExecError::Slurm(failure));
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

/// The job of stage `index` with what its run also does: the snapshots it leaves for the
/// shorter variants it serves, and the cached shorter run it continues.
async fn planned_job(
    shared: &Arc<Shared>,
    index: usize,
    upstream: &BTreeMap<usize, Done>,
    material: &KeyMaterial,
    key: &str,
) -> Result<JobSpec, ExecError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::lockfile::LockEntry;
    use crate::pipeline::{LoadOptions, load_str};
    use std::path::Path;

    fn lock_file(id: &str, key: &str, output: &str) -> LockFile {
        let entry = LockEntry {
            key: key.to_string(),
            output: output.to_string(),
        };
        LockFile {
            pipeline: "p".to_string(),
            stages: BTreeMap::from([(id.to_string(), entry)]),
        }
    }

    #[test]
    fn a_locked_key_mismatch_names_both_keys_shortened() {
        let (locked, key) = ("1".repeat(64), "3".repeat(64));
        let lock = lock_file("a", &locked, &"2".repeat(64));
        let error = check_locked_key(Some(&lock), "a", &key).unwrap_err();
        assert!(
            matches!(&error, ExecError::LockedKeyMismatch { id, key: k, locked: l }
                if id == "a" && *k == key && *l == locked),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "--locked: stage `a` has key 333333333333 but the lock file has 111111111111; \
             its inputs or parameters differ (see `dreampipe explain`)"
        );
        let missing = check_locked_key(Some(&lock), "b", &key).unwrap_err();
        assert!(matches!(&missing, ExecError::NotLocked { id } if id == "b"));
        assert_eq!(
            missing.to_string(),
            "--locked: stage `b` is not in the lock file"
        );
        assert!(check_locked_key(Some(&lock), "a", &locked).is_ok());
        assert!(check_locked_key(None, "b", &key).is_ok());
    }

    #[test]
    fn a_locked_output_mismatch_says_the_stage_is_not_reproducible() {
        let lock = lock_file("a", "k", &"2".repeat(64));
        let error = check_locked_output(Some(&lock), "a", &"4".repeat(64)).unwrap_err();
        assert!(matches!(&error, ExecError::LockedOutputMismatch { id, .. } if id == "a"));
        assert_eq!(
            error.to_string(),
            "--locked: stage `a` produced output 444444444444 but the lock file has \
             222222222222; the stage is not reproducible here"
        );
        assert!(check_locked_output(Some(&lock), "a", &"2".repeat(64)).is_ok());
        assert!(check_locked_output(Some(&lock), "other", "x").is_ok());
    }

    #[test]
    fn an_upstream_without_output_is_an_internal_error_naming_it() {
        let error = key_material(Ok(Err("prep".to_string()))).unwrap_err();
        assert!(matches!(&error, ExecError::UpstreamMissing { upstream } if upstream == "prep"));
        assert_eq!(
            error.to_string(),
            "internal error: upstream `prep` has no output"
        );
        let unreadable = CacheError::io("hash", Path::new("data/x.txt"), denied());
        let error = key_material(Err(unreadable)).unwrap_err();
        assert!(matches!(error, ExecError::Hashing(CacheError::Io { .. })));
        assert_eq!(
            error.to_string(),
            "hashing inputs: cache: hash `data/x.txt`: permission denied"
        );
    }

    fn denied() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied")
    }

    /// `a`, and `b` reading it.
    const CHAIN: &str = "name: chain
stages:
  a:
    kind: step
  b:
    kind: step
    needs: a
";

    /// Runs [`CHAIN`] in a fresh cache with only the stages in `selected`.
    async fn run_chain(selected: Vec<bool>, cancel: CancelFlag) -> RunRecord {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("p.yaml");
        let options = LoadOptions::new(crate::stages::test_kinds::registry());
        let pipeline = load_str(CHAIN, &file, dir.path(), &options).expect("valid");
        let store = Store::open(&dir.path().join("cache")).expect("store");
        let n = selected.len();
        let options = ExecOptions {
            jobs: 1,
            devices: Vec::new(),
            selected,
            forced: vec![false; n],
            locked: None,
            verify: false,
            slurm: None,
        };
        let (events, _received) = tokio::sync::mpsc::unbounded_channel();
        let memo = Arc::new(HashMemo::in_memory());
        let plan = Arc::new(Plan::new(pipeline));
        execute(plan, store, memo, options, events, cancel).await
    }

    #[tokio::test]
    async fn an_unselected_upstream_missing_from_the_cache_fails_and_skips_its_dependents() {
        let record = run_chain(vec![false, true], CancelFlag::default()).await;
        let [a, b] = &record.stages[..] else {
            panic!("{:?}", record.stages)
        };
        assert_eq!(a.status, Outcome::Failed);
        let key = a.key.clone().expect("keyed");
        let expected = format!(
            "not in the cache and not selected by --only/--until (key {}); run it first",
            &key[..12]
        );
        assert_eq!(a.error.as_deref(), Some(expected.as_str()));
        assert_eq!(ExecError::NotSelected { key }.to_string(), expected);
        assert_eq!(b.status, Outcome::Skipped);
        let skip = SkipReason::UpstreamFailed { id: "a".into() };
        assert_eq!(b.error.as_deref(), Some("upstream `a` did not finish"));
        assert_eq!(b.error, Some(skip.to_string()));
        assert!(!record.success);
    }

    #[tokio::test]
    async fn a_cancelled_run_fails_its_next_stage_as_cancelled() {
        let cancel = CancelFlag::default();
        cancel.cancel();
        let record = run_chain(vec![true, true], cancel).await;
        assert!(record.cancelled && !record.success);
        assert_eq!(record.stages[0].status, Outcome::Failed);
        assert_eq!(record.stages[0].error.as_deref(), Some("cancelled"));
        assert_eq!(ExecError::Cancelled.to_string(), "cancelled");
        assert_eq!(record.stages[1].status, Outcome::Skipped);
    }
}
