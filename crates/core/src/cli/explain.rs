//! `dreampipe explain PIPELINE STAGE`: why a stage will rerun, field by field.
use super::Context;
use super::common::{PipelineArgs, StageStatuses, assess_stage};
use crate::plan::dirty::Status;
use crate::plan::prefix;
use clap::Args;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// A stage name (all its sweep variants) or id.
    pub stage: String,
}

pub fn run(context: &Context, args: &ExplainArgs) -> anyhow::Result<ExitCode> {
    let StageStatuses {
        plan,
        targets,
        statuses,
        memo,
    } = assess_stage(context, &args.pipeline, &args.stage)?;
    let _ = memo.save();
    let sharing = prefix::sharing(&plan.pipeline, &vec![true; plan.len()]);
    for index in targets {
        let id = &plan.pipeline.stages[index].id;
        match &statuses[index] {
            Status::Fresh { key, output } => println!(
                "{id}: fresh (key {}), output {}",
                key.get(..12).unwrap_or(key),
                output.display()
            ),
            Status::Dirty { key, reasons } => {
                println!(
                    "{id}: will run (key {}) because:",
                    key.get(..12).unwrap_or(key)
                );
                reasons.iter().for_each(|r| println!("  - {r}"));
            }
            Status::Pending { reasons } => {
                println!("{id}: will run because:");
                reasons.iter().for_each(|r| println!("  - {r}"));
            }
            Status::NotSelected => println!("{id}: not selected"),
        }
        if let Some(note) = super::plan::served_note(&plan, &sharing, &statuses, index) {
            println!("  served {note} (not trained on its own)");
        }
        if let Some(why) = &sharing.unshared[index] {
            println!("  {why}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
