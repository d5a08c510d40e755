//! Computing a stage's result: here, in a staging folder on a device slot, or as a Slurm job.
use super::job_plan::planned_job;
use super::records::finish_computed;
use super::slots::take_slot;
use super::{Done, Shared, StageRecord, blocking};
use crate::exec::error::ExecError;
use crate::exec::events::Event;
use crate::exec::job::{JobSpec, Placement, commit_staged, run_in_staging};
use crate::exec::slurm::{JobEnd, Slurm};
use crate::pipeline::StageInstance;
use crate::plan::fingerprint::KeyMaterial;
use crate::stages::DeviceClass;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Runs the stage in a staging folder and commits its output.
pub(super) async fn compute(
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
        let progress = crate::exec::events::progress_reporter(&run_stage.id, events);
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
pub(super) async fn compute_on_slurm(
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
    let script = batch_script(shared, slurm, &stage, &job).await?;
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
        let job_id = submit_or_adopt(shared, slurm, &stage.id, key, &script).await?;
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
        let retries = slurm.options.retries;
        let _ = shared.events.send(Event::Warning {
            id: stage.id.clone(),
            message: format!("{failure}; resubmitting (retry {attempt} of {retries})"),
        });
    }
}

/// Writes the job's batch script with the stage's resources (its own over the executor's for
/// its kind), at least the device slots its class needs.
async fn batch_script(
    shared: &Shared,
    slurm: &Arc<Slurm>,
    stage: &StageInstance,
    job: &JobSpec,
) -> Result<PathBuf, ExecError> {
    let mut resources =
        (shared.plan.pipeline.executor).resources_for(stage.kind.kind(), &stage.resources);
    resources.gpus = Some(resources.device_slots(stage.kind.device_class()));
    let (slurm, job) = (slurm.clone(), job.clone());
    let needs_torch = stage.kind.needs_torch();
    blocking(move || slurm.prepare(&job, &resources, needs_torch))
        .await?
        .map_err(ExecError::Slurm)
}

/// The id of the job computing `key`: one an earlier controller left queued, else a new
/// submission of `script`; reports which.
async fn submit_or_adopt(
    shared: &Shared,
    slurm: &Arc<Slurm>,
    id: &str,
    key: &str,
    script: &Path,
) -> Result<String, ExecError> {
    let (job_id, adopted) = match slurm.earlier_job(key) {
        Some(id) => (id, true),
        None => {
            let (slurm, script) = (slurm.clone(), script.to_path_buf());
            let submitted = blocking(move || slurm.submit(&script)).await?;
            (submitted.map_err(ExecError::Slurm)?, false)
        }
    };
    let _ = shared.events.send(Event::Submitted {
        id: id.to_string(),
        job_id: job_id.clone(),
        adopted,
    });
    Ok(job_id)
}
