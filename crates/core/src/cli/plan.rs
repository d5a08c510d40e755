//! `dreampipe plan PIPELINE`: what a run would do with each stage, and why.
use super::Context;
use super::common::{PipelineArgs, flags, open_cache};
use crate::plan::dirty::{Status, assess};
use crate::plan::graph::Plan;
use clap::Args;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Treat these stages as forced.
    #[arg(long)]
    pub force: Vec<String>,
}

pub fn run(context: &Context, args: &PlanArgs) -> anyhow::Result<ExitCode> {
    let plan = args.pipeline.plan(context)?;
    let forced = flags(&plan, &args.force)?;
    print!(
        "{}",
        render(context, &plan, &vec![true; plan.len()], &forced)?
    );
    Ok(ExitCode::SUCCESS)
}

/// One line per stage: fresh (with its output) or run (with the first reason).
pub fn render(
    context: &Context,
    plan: &Plan,
    selected: &[bool],
    forced: &[bool],
) -> anyhow::Result<String> {
    let (store, memo) = open_cache(context)?;
    let statuses = assess(plan, &store, &memo, context.device, selected, forced)?;
    let _ = memo.save();
    let fresh = statuses
        .iter()
        .filter(|s| matches!(s, Status::Fresh { .. }))
        .count();
    let to_run = statuses
        .iter()
        .filter(|s| matches!(s, Status::Dirty { .. } | Status::Pending { .. }))
        .count();
    let mut text = format!(
        "plan for `{}`: {} stage(s), {fresh} fresh, {to_run} to run\n",
        plan.pipeline.name,
        plan.len()
    );
    for (stage, status) in plan.pipeline.stages.iter().zip(&statuses) {
        let line = match status {
            Status::Fresh { output, .. } => format!("  fresh  {}  {}", stage.id, output.display()),
            Status::Dirty { reasons, .. } | Status::Pending { reasons } => {
                format!("  run    {}  {}", stage.id, reasons.join("; "))
            }
            Status::NotSelected => format!("  -      {}  not selected", stage.id),
        };
        text.push_str(&line);
        text.push('\n');
    }
    Ok(text)
}
