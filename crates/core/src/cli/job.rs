//! `dreampipe job FILE` (hidden): what a Slurm job runs. Reads the job file the controller
//! wrote, computes the stage into staging and commits it with the store (exec/job.rs), then
//! writes the exit record the controller waits for. SIGTERM (scancel, time limit, preemption)
//! cancels the stage: its checkpoints stay in the work folder for the next attempt and no exit
//! record is written, so Slurm's own state says why the job ended.
use super::{Context, Handoff};
use crate::cache::store::Store;
use crate::exec::error::JobError;
use crate::exec::events::{CancelFlag, ProgressReporter};
use crate::exec::job::{self, ExitRecord, JobSpec, Placement};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit code of a job stopped by SIGTERM (128 + 15).
const EXIT_TERMINATED: u8 = 143;
/// Lines of a failed stage's log copied into the job's output (the Slurm log).
const STAGE_LOG_LINES: usize = 10;

#[derive(Debug, Args)]
pub struct JobArgs {
    /// The job file (`<cache>/jobs/<key>/job.json`).
    pub file: PathBuf,
}

pub fn run(context: &Context, args: &JobArgs) -> anyhow::Result<ExitCode> {
    let job = job::read_job(&args.file).map_err(anyhow::Error::msg)?;
    let stage = context.registry.get(&job.kind).cloned().ok_or_else(|| {
        anyhow::anyhow!(
            "job file `{}`: stage kind `{}` is unknown to this dreampipe",
            args.file.display(),
            job.kind
        )
    })?;
    if stage.needs_torch() && !context.torch_in_process {
        return Err(Handoff.into());
    }
    let store = Store::open(&context.cache_root)?;
    let job_id = std::env::var("SLURM_JOB_ID").unwrap_or_else(|_| "local".to_string());
    let exit_path = job::exit_path(&store, &job.key, &job_id);
    if !job.replace
        && let Some(found) = store.lookup(&job.key)
    {
        println!("dreampipe job: `{}` is already in the cache", job.stage_id);
        write_exit(&exit_path, true, None, Some(found.output_digest), 0.0)?;
        return Ok(ExitCode::SUCCESS);
    }
    let cuda = match job.material.device_class.as_str() {
        "cuda" => context.every_device()?,
        _ => Vec::new(),
    };
    let devices = job::job_devices(stage.as_ref(), &job, &cuda).map_err(anyhow::Error::msg)?;
    let device = devices
        .first()
        .copied()
        .unwrap_or(crate::device::Device::Cpu);
    println!(
        "dreampipe job {job_id}: stage `{}` (key {}) on {device:?}",
        job.stage_id, job.key
    );
    let cancel = CancelFlag::default();
    cancel_on_sigterm(&cancel);
    let placement = Placement {
        device,
        devices: &devices,
    };
    let progress = ProgressReporter::new(None);
    let staged = job::run_in_staging(&store, stage.as_ref(), &job, &placement, &progress, &cancel);
    finish(&store, &job, &exit_path, staged, &cancel)
}

/// Commits a finished run and writes the exit record (none when cancelled by a signal).
fn finish(
    store: &Store,
    job: &JobSpec,
    exit_path: &Path,
    staged: Result<job::Staged, JobError>,
    cancel: &CancelFlag,
) -> anyhow::Result<ExitCode> {
    let outcome = staged.and_then(|staged| {
        let seconds = staged.seconds;
        job::commit_staged(store, job, staged).map(|record| (record, seconds))
    });
    match outcome {
        Ok((record, seconds)) => {
            println!("dreampipe job: committed in {seconds:.1}s");
            write_exit(exit_path, true, None, Some(record.output_digest), seconds)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(_) if cancel.is_cancelled() => {
            eprintln!("dreampipe job: stopped by SIGTERM; checkpoints stay for the next attempt");
            Ok(ExitCode::from(EXIT_TERMINATED))
        }
        Err(error) => {
            // The controller shows this log's last lines: put the stage log's there too.
            let stage_log = std::fs::read_to_string(store.log_path(&job.key)).unwrap_or_default();
            let lines: Vec<&str> = stage_log.lines().filter(|l| !l.trim().is_empty()).collect();
            for line in &lines[lines.len().saturating_sub(STAGE_LOG_LINES)..] {
                eprintln!("{line}");
            }
            eprintln!("dreampipe job: stage `{}` failed: {error}", job.stage_id);
            write_exit(exit_path, false, Some(error.to_string()), None, 0.0)?;
            Ok(ExitCode::FAILURE)
        }
    }
}

fn write_exit(
    path: &Path,
    ok: bool,
    error: Option<String>,
    output_digest: Option<String>,
    seconds: f64,
) -> anyhow::Result<()> {
    let record = ExitRecord {
        ok,
        error,
        output_digest,
        seconds,
    };
    job::write_atomically(path, &record).map_err(anyhow::Error::msg)
}

/// Sets `cancel` when the process receives SIGTERM (Slurm's first signal before SIGKILL).
fn cancel_on_sigterm(cancel: &CancelFlag) {
    let cancel = cancel.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        let Ok(runtime) = runtime else {
            return;
        };
        runtime.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            if let Ok(mut terminate) = signal(SignalKind::terminate())
                && terminate.recv().await.is_some()
            {
                cancel.cancel();
            }
        });
    });
}
