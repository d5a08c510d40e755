//! `dreampipe show PIPELINE STAGE`: the output folder of a stage's current result.
use super::Context;
use super::common::{PipelineArgs, open_cache};
use crate::plan::dirty::{Status, assess};
use clap::Args;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    pub stage: String,
}

pub fn run(context: &Context, args: &ShowArgs) -> anyhow::Result<ExitCode> {
    let plan = args.pipeline.plan()?;
    let targets = plan.find(&args.stage)?;
    let (store, memo) = open_cache(context)?;
    let statuses = assess(
        &plan,
        &store,
        &memo,
        context.device,
        &vec![true; plan.len()],
        &vec![false; plan.len()],
    )?;
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
