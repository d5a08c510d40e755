//! `dreampipe run PIPELINE`: validate, plan, execute with progress, print the summary, write
//! the run record and the lock file. Exit code 1 when a stage failed, 130 when interrupted.
use super::common::{PipelineArgs, flags, open_cache};
use super::{Context, Handoff};
use crate::cache::hash::HashMemo;
use crate::cache::store::Store;
use crate::device::{Device, DeviceRequest};
use crate::exec::events::CancelFlag;
use crate::exec::executor::{ExecOptions, Outcome, RunRecord, execute};
use crate::exec::lockfile::{self, LockEntry, LockFile};
use crate::exec::slurm::SlurmOptions;
use crate::pipeline::ExecutorKind;
use crate::plan::dirty::{Status, assess};
use crate::plan::graph::Plan;
use crate::report::progress::{self, Style};
use crate::report::summary;
use clap::Args;
use std::process::ExitCode;
use std::sync::Arc;

/// Exit code after Ctrl-C (128 + SIGINT, the shell convention).
const EXIT_INTERRUPTED: u8 = 130;

/// How `run` reports on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MessageFormat {
    /// Progress bars or plain lines, then the summary table.
    Human,
    /// One JSON object per event and a final `run_finished` (docs/pipelines.md); the human
    /// summary goes to stderr.
    Json,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// `human` (default) or `json`: one JSON object per event on stdout.
    #[arg(long, value_enum, default_value = "human")]
    pub message_format: MessageFormat,
    /// Run only up to these stages (and what they need).
    #[arg(long)]
    pub until: Vec<String>,
    /// Run only these stages (their upstreams must be cached).
    #[arg(long)]
    pub only: Vec<String>,
    /// Rerun these stages even when cached.
    #[arg(long)]
    pub force: Vec<String>,
    /// Print the plan and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Concurrent CPU stages (default: number of CPU cores).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Devices for GPU stages, one stage per device at a time, e.g. `cuda:0,cuda:1`; `auto`:
    /// every visible GPU (default: every visible GPU with `--device auto`, else --device).
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<DeviceRequest>,
    /// Fail when a stage's key or output digest differs from `<pipeline>.lock`.
    #[arg(long)]
    pub locked: bool,
    /// Plain log lines even on a terminal.
    #[arg(long)]
    pub plain: bool,
    /// Rehash every file of every result the run reuses, not only files changed since commit
    /// (docs/cache.md, "What a run checks").
    #[arg(long)]
    pub verify: bool,
    /// Where dirty stages run: `local` (this machine) or `slurm` (one job per stage,
    /// docs/cluster.md); default: the pipeline's `executor: {kind}`, else local.
    #[arg(long, value_enum)]
    pub executor: Option<ExecutorKind>,
    /// Resubmit a failed Slurm job up to N times (default: `executor: {retries}`, else 0).
    #[arg(long)]
    pub retries: Option<usize>,
}

pub fn run(context: &Context, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let plan = Arc::new(args.pipeline.plan(context)?);
    let selected = plan.selection(&args.until, &args.only)?;
    let forced = flags(&plan, &args.force)?;
    if args.dry_run {
        print!(
            "{}",
            super::plan::render(context, &plan, &selected, &forced)?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let lock_path = lockfile::path_for(&args.pipeline.pipeline);
    let options = exec_options(context, args, &plan, &lock_path, selected, forced)?;
    let (store, memo) = open_cache(context)?;
    // A Slurm controller computes nothing itself: the jobs run the torch worker.
    if !context.torch_in_process && options.slurm.is_none() {
        let (selected, forced) = (&options.selected, &options.forced);
        let statuses = assess(&plan, &store, &memo, options.devices[0], selected, forced)?;
        if torch_work_left(&plan, &statuses) {
            let _ = memo.save(); // the worker reuses the digests just computed
            return Err(Handoff.into());
        }
    }
    let json = args.message_format == MessageFormat::Json;
    if json {
        println!(
            "{}",
            progress::json_line(&planned(&plan, &options.selected))
        );
    }
    let style = output_style(args);
    let record = execute_until_interrupted(&plan, &store, &memo, options, style)?;
    let _ = memo.save();
    report_run(&plan, &store, &record, json);
    if !args.locked && record.success {
        update_lock_file(&lock_path, &record)?;
    }
    Ok(if record.cancelled {
        ExitCode::from(EXIT_INTERRUPTED)
    } else if record.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The executor's options from the flags, the pipeline's `executor:` section and, with
/// `--locked`, the lock file.
fn exec_options(
    context: &Context,
    args: &RunArgs,
    plan: &Plan,
    lock_path: &std::path::Path,
    selected: Vec<bool>,
    forced: Vec<bool>,
) -> anyhow::Result<ExecOptions> {
    let locked = if args.locked {
        Some(lockfile::read(lock_path)?)
    } else {
        None
    };
    let slurm = slurm_options(plan, args);
    let devices = match slurm {
        Some(_) => vec![slurm_key_device(context)],
        None => resolve_devices(context, &args.devices)?,
    };
    let jobs = (args.jobs.or(plan.pipeline.executor.jobs)).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    Ok(ExecOptions {
        verify: args.verify,
        jobs,
        devices,
        selected,
        forced,
        locked,
        slurm,
    })
}

/// JSON lines with `--message-format json`, plain lines with `--plain`, else what suits stdout.
fn output_style(args: &RunArgs) -> Style {
    match (args.message_format == MessageFormat::Json, args.plain) {
        (true, _) => Style::Json,
        (false, true) => Style::Plain,
        (false, false) => progress::style_for_stdout(),
    }
}

/// Executes the plan with progress in `style`; Ctrl-C or SIGTERM cancels the running stages.
fn execute_until_interrupted(
    plan: &Arc<Plan>,
    store: &Store,
    memo: &Arc<HashMemo>,
    options: ExecOptions,
    style: Style,
) -> anyhow::Result<RunRecord> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let record = runtime.block_on(async {
        let cancel = CancelFlag::default();
        let on_interrupt = cancel.clone();
        tokio::spawn(async move {
            if interrupted().await {
                eprintln!("interrupted: cancelling running stages (nothing partial is committed)");
                on_interrupt.cancel();
            }
        });
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let reporter = tokio::spawn(progress::report(receiver, style));
        let record = execute(
            plan.clone(),
            store.clone(),
            memo.clone(),
            options,
            sender,
            cancel,
        )
        .await;
        let _ = reporter.await;
        record
    });
    runtime.shutdown_background();
    Ok(record)
}

/// The summary table, the run record and the HTML report, each path printed; with JSON on
/// stdout, the human lines go to stderr and a `run_finished` line ends stdout.
fn report_run(plan: &Plan, store: &Store, record: &RunRecord, json: bool) {
    let human = |text: String| match json {
        true => eprint!("{text}"),
        false => print!("{text}"),
    };
    human(summary::table(record));
    let record_path = written(
        summary::write_record(store.root(), record),
        "the run record",
    );
    if let Some(path) = &record_path {
        human(format!("run record: {}\n", path.display()));
    }
    let page = super::report::write(&plan.pipeline, Some(record), store, None);
    let page = written(page.map_err(|e| format!("{e:#}")), "the report");
    if let Some(page) = &page {
        human(format!("report: {}\n", page.display()));
    }
    if json {
        let finished = run_finished(record, record_path, page);
        println!("{}", progress::json_line(&finished));
    }
}

/// Waits for Ctrl-C (SIGINT) or SIGTERM (a scheduler or `kill` stopping the run); false when
/// neither handler could be installed.
async fn interrupted() -> bool {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut terminate) = signal(SignalKind::terminate()) else {
        return tokio::signal::ctrl_c().await.is_ok();
    };
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.is_ok(),
        received = terminate.recv() => received.is_some(),
    }
}

/// A file the run writes after its stages (record, report): on failure a warning, never an
/// error — the stages' results are committed either way.
fn written<T, E: std::fmt::Display>(result: Result<T, E>, what: &str) -> Option<T> {
    result
        .map_err(|error| eprintln!("warning: could not write {what}: {error}"))
        .ok()
}

/// The first JSON event: every stage of the plan, whether this run selected it.
fn planned(plan: &Plan, selected: &[bool]) -> serde_json::Value {
    let stages: Vec<serde_json::Value> = (plan.pipeline.stages.iter().zip(selected))
        .map(|(stage, selected)| {
            serde_json::json!({"id": stage.id, "kind": stage.kind.kind(), "selected": selected})
        })
        .collect();
    serde_json::json!({"event": "planned", "pipeline": plan.pipeline.name, "stages": stages})
}

/// The last JSON event: the outcome, the counts and where the record and report are.
fn run_finished(
    record: &RunRecord,
    record_path: Option<std::path::PathBuf>,
    report: Option<std::path::PathBuf>,
) -> serde_json::Value {
    let count = |outcome: Outcome| record.stages.iter().filter(|s| s.status == outcome).count();
    serde_json::json!({
        "event": "run_finished",
        "pipeline": record.pipeline,
        "success": record.success,
        "cancelled": record.cancelled,
        "duration_s": record.duration_s,
        "ran": count(Outcome::Ran),
        "cached": count(Outcome::Cached),
        "failed": count(Outcome::Failed),
        "skipped": count(Outcome::Skipped),
        "record": record_path,
        "report": report,
    })
}

/// With `--executor slurm` (or `executor: {kind: slurm}`): how the controller talks to Slurm.
/// `--jobs` bounds jobs in flight (default: no bound, a sweep of N dirty stages is N jobs).
fn slurm_options(plan: &Plan, args: &RunArgs) -> Option<SlurmOptions> {
    let spec = &plan.pipeline.executor;
    let kind = args.executor.or(spec.kind).unwrap_or_default();
    (kind == ExecutorKind::Slurm).then(|| {
        let jobs = args.jobs.or(spec.jobs).unwrap_or(usize::MAX);
        let retries = args.retries.or(spec.retries).unwrap_or(0);
        SlurmOptions::new(crate::device::torch_binary(), jobs, retries)
    })
}

/// The device type that enters the keys of GPU stages run on Slurm: the nodes' GPUs (CUDA),
/// unless `--device cpu` says the jobs compute on CPUs. The controller's own hardware does not
/// matter (a login node often has no GPU).
pub(super) fn slurm_key_device(context: &Context) -> Device {
    match context.device_request {
        DeviceRequest::Cpu => Device::Cpu,
        _ => Device::Cuda(0),
    }
}

/// The device slots of the run: `--devices` (`auto` = every visible GPU), else every visible
/// GPU when `--device auto` found CUDA, else `--device`. Duplicates are kept: `cuda:0,cuda:0`
/// runs two stages on one GPU.
fn resolve_devices(context: &Context, requests: &[DeviceRequest]) -> anyhow::Result<Vec<Device>> {
    if requests.is_empty() {
        return match (context.device_request, context.device) {
            (DeviceRequest::Auto, Device::Cuda(_)) => context.every_device(),
            _ => Ok(vec![context.device]),
        };
    }
    let mut devices = Vec::new();
    for request in requests {
        match request {
            DeviceRequest::Auto => devices.extend(context.every_device()?),
            other => devices.push(context.resolve(*other)?),
        }
    }
    Ok(devices)
}

/// Whether a stage of a kind that needs libtorch would run (not cached, or after an upstream
/// that runs): then the front hands the whole run to the torch worker.
fn torch_work_left(plan: &Plan, statuses: &[Status]) -> bool {
    plan.pipeline
        .stages
        .iter()
        .zip(statuses)
        .any(|(stage, status)| {
            stage.kind.needs_torch()
                && matches!(status, Status::Dirty { .. } | Status::Pending { .. })
        })
}

/// Merges this run's keys and output digests into `<pipeline>.lock`.
fn update_lock_file(path: &std::path::Path, record: &RunRecord) -> anyhow::Result<()> {
    let mut lock = lockfile::read(path)
        .ok()
        .filter(|l| l.pipeline == record.pipeline)
        .unwrap_or_else(|| LockFile {
            pipeline: record.pipeline.clone(),
            ..LockFile::default()
        });
    let ids: std::collections::BTreeSet<&str> =
        record.stages.iter().map(|s| s.id.as_str()).collect();
    lock.stages.retain(|id, _| ids.contains(id.as_str()));
    for stage in &record.stages {
        if let (Outcome::Cached | Outcome::Ran, Some(key), Some(output)) =
            (stage.status, &stage.key, &stage.output_digest)
        {
            lock.stages.insert(
                stage.id.clone(),
                LockEntry {
                    key: key.clone(),
                    output: output.clone(),
                },
            );
        }
    }
    lockfile::write(path, &lock)?;
    Ok(())
}
