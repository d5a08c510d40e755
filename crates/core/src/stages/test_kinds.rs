//! A stage kind for the core's own unit tests (the shipped kinds live in `dreampipe_kinds`,
//! which depends on this crate): `step` writes `step.txt` into its output and may `needs:`
//! other stages.
use super::params::{Input, ParamTable, Params};
use super::{ParamSpec, Registry, Stage, StageContext, StageError};
use std::sync::Arc;

pub(crate) struct StepKind;

/// A `step` stage's fields.
#[derive(serde::Serialize, serde::Deserialize, Params)]
#[serde(deny_unknown_fields)]
struct StepParams {
    /// stages to run first
    #[param(ty = StageRefList, default = null)]
    needs: Input,
}

impl Stage for StepKind {
    fn kind(&self) -> &'static str {
        "step"
    }
    fn version(&self) -> u32 {
        1
    }
    fn schema(&self) -> Vec<ParamSpec> {
        StepParams::param_specs()
    }
    fn summary(&self) -> &'static str {
        "a test step"
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let path = ctx.out_dir.join("step.txt");
        std::fs::write(&path, ctx.stage_id).map_err(|e| StageError::io("write", &path, e))
    }
}

/// A registry holding [`StepKind`].
pub(crate) fn registry() -> Registry {
    Registry::empty().with(Arc::new(StepKind))
}
