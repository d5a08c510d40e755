//! Helpers the pipeline verbs share: the `PIPELINE [--set …]` arguments, loading, opening the
//! cache.
use super::Context;
use crate::cache::hash::HashMemo;
use crate::cache::store::Store;
use crate::pipeline::{LoadOptions, Pipeline, load};
use crate::plan::dirty::{Status, assess};
use crate::plan::graph::Plan;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;

/// A pipeline file and its overrides.
#[derive(Debug, Args)]
pub struct PipelineArgs {
    /// The pipeline YAML file.
    pub pipeline: PathBuf,
    /// Override a stage field (`stage.field=value`) or a pipeline param (`params.name=value`).
    #[arg(long = "set", value_name = "STAGE.FIELD=VALUE")]
    pub set: Vec<String>,
}

impl PipelineArgs {
    pub fn load(&self, context: &Context) -> anyhow::Result<Pipeline> {
        let options = LoadOptions {
            overrides: self.set.clone(),
            registry: context.registry.clone(),
        };
        Ok(load(&self.pipeline, &options)?)
    }

    pub fn plan(&self, context: &Context) -> anyhow::Result<Plan> {
        Ok(Plan::new(self.load(context)?))
    }
}

/// The store and the hash memo of the context's cache root.
pub fn open_cache(context: &Context) -> anyhow::Result<(Store, Arc<HashMemo>)> {
    let store = Store::open(&context.cache_root)?;
    let memo = Arc::new(HashMemo::load(&store.memo_path()));
    Ok((store, memo))
}

/// The stages one STAGE argument names, with every stage's status (all selected, none forced).
pub struct StageStatuses {
    pub plan: Plan,
    /// Indices of the stages `stage` matches (all variants of a swept stage).
    pub targets: Vec<usize>,
    /// One status per stage of `plan`.
    pub statuses: Vec<Status>,
    /// The hash memo `assess` filled (the caller decides whether to save it).
    pub memo: Arc<HashMemo>,
}

/// Loads the pipeline, finds `stage` in it and assesses every stage against the cache
/// (`explain`, `show`).
pub fn assess_stage(
    context: &Context,
    pipeline: &PipelineArgs,
    stage: &str,
) -> anyhow::Result<StageStatuses> {
    let plan = pipeline.plan(context)?;
    let targets = plan.find(stage)?;
    let (store, memo) = open_cache(context)?;
    let statuses = assess(
        &plan,
        &store,
        &memo,
        context.device,
        &vec![true; plan.len()],
        &vec![false; plan.len()],
    )?;
    Ok(StageStatuses {
        plan,
        targets,
        statuses,
        memo,
    })
}

/// Indices of stages matching any of `patterns`, as flags over all stages.
pub fn flags(plan: &Plan, patterns: &[String]) -> anyhow::Result<Vec<bool>> {
    let mut flags = vec![false; plan.len()];
    for pattern in patterns {
        for index in plan.find(pattern)? {
            flags[index] = true;
        }
    }
    Ok(flags)
}
