//! What one run of a stage is given: its job (parameters, resolved inputs, key), the snapshots
//! it leaves for the shorter variants of a steps sweep, and the cached run it continues.
use super::stage::compute_material;
use super::{Done, Shared, blocking};
use crate::cache::hash::tree_digest;
use crate::exec::error::ExecError;
use crate::exec::job::{JOB_FORMAT, JobSpec, SnapshotSpec};
use crate::plan::fingerprint::KeyMaterial;
use crate::plan::prefix;
use crate::stages::{ExtendFrom, ResolvedInput};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// The job of stage `index` with what its run also does: the snapshots it leaves for the
/// shorter variants it serves, and the cached shorter run it continues.
pub(super) async fn planned_job(
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

/// The variants the run of stage `index` also produces from snapshots: those not cached yet,
/// each with the key material it has on its own (same upstreams as the runner).
pub(super) async fn snapshot_specs(
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
pub(super) async fn extension_base(
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

/// The self-contained description of one run of stage `index` under `key`.
pub(super) fn job_spec(
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

pub(super) fn resolve_inputs(
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
pub(super) fn absolute_dir(file: &std::path::Path) -> PathBuf {
    let dir = match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::path::absolute(&dir).unwrap_or(dir)
}
