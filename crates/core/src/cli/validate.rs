//! `dreampipe validate PIPELINE`: every error at once, or a one-line confirmation.
use super::Context;
use super::common::PipelineArgs;
use clap::Args;
use std::collections::BTreeSet;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
}

pub fn run(context: &Context, args: &ValidateArgs) -> anyhow::Result<ExitCode> {
    let pipeline = args.pipeline.load(context)?;
    let names: BTreeSet<&str> = pipeline.stages.iter().map(|s| s.name.as_str()).collect();
    println!(
        "pipeline `{}` is valid: {} stage(s), {} after sweep expansion",
        pipeline.name,
        names.len(),
        pipeline.stages.len()
    );
    Ok(ExitCode::SUCCESS)
}
