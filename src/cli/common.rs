//! Helpers the pipeline verbs share: the `PIPELINE [--set …]` arguments, loading, opening the
//! cache.
use super::Context;
use crate::cache::hash::HashMemo;
use crate::cache::store::Store;
use crate::pipeline::{LoadOptions, Pipeline, load};
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
    pub fn load(&self) -> anyhow::Result<Pipeline> {
        let options = LoadOptions {
            overrides: self.set.clone(),
            ..LoadOptions::default()
        };
        Ok(load(&self.pipeline, &options)?)
    }

    pub fn plan(&self) -> anyhow::Result<Plan> {
        Ok(Plan::new(self.load()?))
    }
}

/// The store and the hash memo of the context's cache root.
pub fn open_cache(context: &Context) -> anyhow::Result<(Store, Arc<HashMemo>)> {
    let store = Store::open(&context.cache_root)?;
    let memo = Arc::new(HashMemo::load(&store.memo_path()));
    Ok((store, memo))
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
