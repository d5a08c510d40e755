//! The outer training loop both methods share: resume from the latest checkpoint, run optimizer
//! steps until the total, report progress and metrics, write checkpoints every
//! `checkpointing_steps`, stop cleanly on cancellation (after a checkpoint) or on a non-finite
//! loss (naming the step and the last good checkpoint).
use super::checkpoint::{self, ResumeState};
use super::metrics::MetricsLog;
use super::progress::{Callbacks, Progress, Snapshots, StepReport, TrainOutcome};
use super::trainer_core::TrainerCore;
use super::{TrainError, io_error};
use std::path::{Path, PathBuf};

/// What the driver needs from a method's trainer: its [`TrainerCore`] (step count, trained
/// tensors, optimizer, mixed precision) and what only the method knows.
pub(crate) trait TrainingMethod {
    /// "dreambooth" / "textual_inversion" (recorded in checkpoints).
    fn method(&self) -> &'static str;
    fn core(&self) -> &TrainerCore;
    fn core_mut(&mut self) -> &mut TrainerCore;
    /// Writes the current model as a complete diffusers folder into `dir`.
    fn write_model(&self, dir: &Path) -> Result<(), TrainError>;
    /// Writes everything a run writes into its output folder when it ends (the model, and
    /// embedding files for textual inversion) into `dir`.
    fn write_outputs(&self, dir: &Path) -> Result<(), TrainError>;
    /// Draws the data of the next step and runs it.
    fn next_step(&mut self) -> Result<StepReport, TrainError>;
}

/// Settings of one run of the driver.
pub(crate) struct DriverSettings<'a> {
    pub work_dir: &'a Path,
    /// Where `metrics.jsonl` and, at the end, the method's outputs are written.
    pub output_dir: &'a Path,
    pub total_steps: u64,
    pub checkpointing_steps: u64,
    pub checkpoints_total_limit: Option<usize>,
    pub resume: bool,
    /// Save a checkpoint after the last step (if that step did not already).
    pub save_final: bool,
    pub seed: u64,
    pub dataset_sizes: Vec<usize>,
}

/// Runs `trainer` to `settings.total_steps` (resuming first when asked) and writes its outputs
/// into `settings.output_dir`.
pub(crate) fn run(
    trainer: &mut dyn TrainingMethod,
    settings: &DriverSettings,
    callbacks: &mut Callbacks,
) -> Result<TrainOutcome, TrainError> {
    let resumed_from = if settings.resume {
        resume(trainer, settings)?
    } else {
        None
    };
    let final_loss = run_steps(trainer, settings, callbacks, resumed_from)?;
    trainer.write_outputs(settings.output_dir)?;
    Ok(TrainOutcome {
        steps: trainer.core().step(),
        resumed_from,
        final_loss,
        output_dir: settings.output_dir.to_path_buf(),
    })
}

/// The steps from the current one to the total; returns the last loss.
fn run_steps(
    trainer: &mut dyn TrainingMethod,
    settings: &DriverSettings,
    callbacks: &mut Callbacks,
    resumed_from: Option<u64>,
) -> Result<Option<f64>, TrainError> {
    let mut last_checkpoint =
        resumed_from.map(|step| checkpoint::checkpoint_dir(settings.work_dir, step));
    let metrics = MetricsLog::open(settings.output_dir, trainer.core().step())?;
    let mut final_loss = None;
    while trainer.core().step() < settings.total_steps {
        if callbacks.cancelled() {
            let dir = save_unless_saved(trainer, settings, &last_checkpoint)?;
            return Err(TrainError::Cancelled {
                step: trainer.core().step(),
                checkpoint: dir,
            });
        }
        let report = trainer.next_step().map_err(|error| match error {
            TrainError::NonFiniteLoss { step, loss, .. } => TrainError::NonFiniteLoss {
                step,
                loss,
                checkpoint: last_checkpoint.clone(),
            },
            other => other,
        })?;
        let progress = Progress {
            step: trainer.core().step(),
            total: settings.total_steps,
            loss: report.loss,
            lr: report.lr,
            grad_norm: report.grad_norm,
            skipped_steps: report.skipped_steps,
        };
        metrics.append(&progress)?;
        (callbacks.on_progress)(&progress);
        final_loss = Some(report.loss);
        if progress
            .step
            .is_multiple_of(settings.checkpointing_steps.max(1))
        {
            last_checkpoint = Some(save(trainer, settings, Some(report.lr))?);
        }
        validate_if_due(trainer, callbacks)?;
        snapshot_if_due(trainer, callbacks)?;
    }
    if settings.save_final && trainer.core().step() > 0 {
        save_unless_saved(trainer, settings, &last_checkpoint)?;
    }
    Ok(final_loss)
}

/// Runs the validation callback when the step is a multiple of its interval.
fn validate_if_due(
    trainer: &dyn TrainingMethod,
    callbacks: &mut Callbacks,
) -> Result<(), TrainError> {
    let step = trainer.core().step();
    let Some(validation) = callbacks.validation.as_mut() else {
        return Ok(());
    };
    if !step.is_multiple_of(validation.every.max(1)) {
        return Ok(());
    }
    trainer.write_model(&validation.model_dir)?;
    (validation.run)(step, &validation.model_dir)
        .map_err(|problem| TrainError::Validation { step, problem })
}

/// Writes the snapshot of this step when one is asked for and not already there.
fn snapshot_if_due(
    trainer: &dyn TrainingMethod,
    callbacks: &mut Callbacks,
) -> Result<(), TrainError> {
    let step = trainer.core().step();
    let Some(snapshots) = callbacks.snapshots.as_mut() else {
        return Ok(());
    };
    let folder = Snapshots::folder(&snapshots.dir, step);
    if !snapshots.steps.contains(&step) || folder.exists() {
        return Ok(());
    }
    let partial = folder.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    trainer.write_outputs(&partial)?;
    (snapshots.finish)(step, &partial).map_err(|problem| TrainError::Snapshot { step, problem })?;
    std::fs::rename(&partial, &folder).map_err(|e| io_error(&folder, "rename", e))
}

fn resume(
    trainer: &mut dyn TrainingMethod,
    settings: &DriverSettings,
) -> Result<Option<u64>, TrainError> {
    let Some(found) = checkpoint::latest(settings.work_dir)? else {
        return Ok(None);
    };
    found.check_matches(trainer.method(), settings.seed, &settings.dataset_sizes)?;
    let saved = found.weights()?;
    let core = trainer.core_mut();
    checkpoint::restore_into(&found.dir, &saved, &core.checkpoint_tensors())?;
    found.load_optimizer(core.optimizer_mut())?;
    core.precision_mut().restore_scaler(found.state.grad_scaler);
    core.set_step(found.state.step);
    Ok(Some(found.state.step))
}

fn save(
    trainer: &dyn TrainingMethod,
    settings: &DriverSettings,
    lr: Option<f64>,
) -> Result<PathBuf, TrainError> {
    let state = ResumeState {
        method: trainer.method().to_string(),
        step: trainer.core().step(),
        seed: settings.seed,
        dataset_sizes: settings.dataset_sizes.clone(),
        lr,
        grad_scaler: trainer.core().precision().scaler_state(),
    };
    checkpoint::write(
        settings.work_dir,
        &state,
        &trainer.core().checkpoint_tensors(),
        trainer.core().optimizer(),
        settings.checkpoints_total_limit,
    )
}

fn save_unless_saved(
    trainer: &dyn TrainingMethod,
    settings: &DriverSettings,
    last: &Option<PathBuf>,
) -> Result<PathBuf, TrainError> {
    let current = checkpoint::checkpoint_dir(settings.work_dir, trainer.core().step());
    if last.as_ref() == Some(&current) {
        return Ok(current);
    }
    save(trainer, settings, None)
}
