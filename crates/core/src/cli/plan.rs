//! `dreampipe plan PIPELINE`: what a run would do with each stage, and why.
use super::Context;
use super::common::{PipelineArgs, flags, open_cache};
use crate::exec::slurm::{ScriptFor, script_text};
use crate::pipeline::ExecutorKind;
use crate::plan::dirty::{Status, assess, texts};
use crate::plan::graph::Plan;
use crate::plan::prefix;
use crate::stages::DeviceClass;
use clap::Args;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Treat these stages as forced.
    #[arg(long)]
    pub force: Vec<String>,
    /// With `slurm`: show the batch script each stage to run would be submitted with
    /// (default: the pipeline's `executor: {kind}`).
    #[arg(long, value_enum)]
    pub executor: Option<ExecutorKind>,
}

pub fn run(context: &Context, args: &PlanArgs) -> anyhow::Result<ExitCode> {
    let plan = args.pipeline.plan(context)?;
    let forced = flags(&plan, &args.force)?;
    let selected = vec![true; plan.len()];
    let kind = args.executor.or(plan.pipeline.executor.kind);
    if kind == Some(ExecutorKind::Slurm) {
        print!("{}", render_slurm(context, &plan, &selected, &forced)?);
    } else {
        print!("{}", render(context, &plan, &selected, &forced)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// How a stage that will run is produced by a longer run of a steps sweep, when its runner
/// runs too (a cached runner left no snapshots: the variant then trains on its own).
pub fn served_note(
    plan: &Plan,
    sharing: &prefix::Sharing,
    statuses: &[Status],
    index: usize,
) -> Option<String> {
    let (runner, _) = sharing.served_by[index]?;
    let runs = matches!(
        statuses[runner],
        Status::Dirty { .. } | Status::Pending { .. }
    );
    let waits = matches!(
        statuses[index],
        Status::Dirty { .. } | Status::Pending { .. }
    );
    (runs && waits)
        .then(|| sharing.served_note(&plan.pipeline, index))
        .flatten()
}

/// The plan, each stage to run followed by the batch script its Slurm job would get (keys of
/// GPU stages as on the nodes: CUDA unless `--device cpu`).
fn render_slurm(
    context: &Context,
    plan: &Plan,
    selected: &[bool],
    forced: &[bool],
) -> anyhow::Result<String> {
    let (store, memo) = open_cache(context)?;
    let device = super::run::slurm_key_device(context);
    let statuses = assess(plan, &store, &memo, device, selected, forced)?;
    let _ = memo.save();
    let mut text = format!("plan for `{}` on Slurm\n", plan.pipeline.name);
    let torch = crate::device::torch_binary();
    for (stage, status) in plan.pipeline.stages.iter().zip(&statuses) {
        let key = match status {
            Status::Fresh { output, .. } => {
                text.push_str(&format!("  fresh  {}  {}\n", stage.id, output.display()));
                continue;
            }
            Status::NotSelected => continue,
            Status::Dirty { key, .. } => key.clone(),
            Status::Pending { .. } => "<known once its upstream has run>".to_string(),
        };
        let class = stage.kind.device_class();
        let mut resources = plan
            .pipeline
            .executor
            .resources_for(stage.kind.kind(), &stage.resources);
        resources.gpus = Some(resources.device_slots(class));
        let what = ScriptFor {
            stage_id: &stage.id,
            pipeline: &plan.pipeline.name,
            key: &key,
            cuda: class == DeviceClass::Gpu && device != crate::device::Device::Cpu,
            needs_torch: stage.kind.needs_torch(),
        };
        text.push_str(&format!("  job    {}\n", stage.id));
        for line in script_text(&what, &resources, &torch, &store).lines() {
            text.push_str(&format!("    {line}\n"));
        }
    }
    Ok(text)
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
    let sharing = prefix::sharing(&plan.pipeline, selected);
    for (index, (stage, status)) in plan.pipeline.stages.iter().zip(&statuses).enumerate() {
        let line = match status {
            Status::Fresh { output, .. } => format!("  fresh  {}  {}", stage.id, output.display()),
            _ if let Some(note) = served_note(plan, &sharing, &statuses, index) => {
                format!("  served {}  {note}", stage.id)
            }
            Status::Dirty { reasons, .. } | Status::Pending { reasons } => {
                format!("  run    {}  {}", stage.id, texts(reasons).join("; "))
            }
            Status::NotSelected => format!("  -      {}  not selected", stage.id),
        };
        text.push_str(&line);
        text.push('\n');
    }
    Ok(text)
}
