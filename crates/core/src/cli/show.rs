//! `dreampipe show PIPELINE STAGE`: the output folder of a stage's current result.
use super::Context;
use super::common::{PipelineArgs, StageStatuses, assess_stage};
use crate::plan::dirty::Status;
use clap::Args;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    pub stage: String,
}

pub fn run(context: &Context, args: &ShowArgs) -> anyhow::Result<ExitCode> {
    let StageStatuses {
        plan,
        targets,
        statuses,
        ..
    } = assess_stage(context, &args.pipeline, &args.stage)?;
    let mut missing = Vec::new();
    for index in targets {
        match &statuses[index] {
            Status::Fresh { output, .. } => println!("{}", output.display()),
            _ => missing.push(plan.pipeline.stages[index].id.clone()),
        }
    }
    if missing.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    anyhow::bail!(
        "no result for the current inputs of {}; run `dreampipe run {}` first",
        missing.join(", "),
        args.pipeline.pipeline.display()
    )
}
