//! `dreampipe dag PIPELINE [--format mermaid|dot]`: the stage graph as text.
use super::Context;
use super::common::PipelineArgs;
use clap::{Args, ValueEnum};
use std::process::ExitCode;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DagFormat {
    Mermaid,
    Dot,
}

#[derive(Debug, Args)]
pub struct DagArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[arg(long, value_enum, default_value = "mermaid")]
    pub format: DagFormat,
}

pub fn run(context: &Context, args: &DagArgs) -> anyhow::Result<ExitCode> {
    let plan = args.pipeline.plan(context)?;
    match args.format {
        DagFormat::Mermaid => print!("{}", plan.mermaid()),
        DagFormat::Dot => print!("{}", plan.dot()),
    }
    Ok(ExitCode::SUCCESS)
}
