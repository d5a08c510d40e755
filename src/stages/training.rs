//! What the training stage kinds (`dreambooth`, `dreambooth_lora`, `textual_inversion`) share:
//! how inputs resolve (a model input that holds
//! `model/model_index.json` but no `model_index.json` of its own — a `textual_inversion`
//! output — means its `model/` folder; an image input that holds `images/` — an `images` or
//! `generate` output — means that folder), the early device check of `mixed_precision`, and
//! one run of a training loop inside a stage (reading the kind's typed [`TrainingParams`]): loss progress, cancel, resume from `ctx.work_dir`,
//! validation samples and `report.json`.
//!
//! Everything a run writes goes to `<work_dir>/output` first and is moved into `ctx.out_dir`
//! when training finishes, so `metrics.jsonl` and `validation/step-N.png` of the steps before a
//! crash survive into the resumed run.

use super::sd_common::{
    SampleInfo, create_dir, field_error, kind_of, model_hash, provenance, provenance_of,
    restamp_as_this_stage, write_sample_as,
};
use super::{ResolvedInput, StageContext, StageError};
use crate::sd::pipeline::{DEFAULT_GUIDANCE, StableDiffusion, Txt2Img, Txt2ImgOutput};
use crate::sd::train::TrainError;
use crate::sd::train::checkpoint;
use crate::sd::train::common::{
    Callbacks, METRICS_FILE, MixedPrecisionExt, Progress, Snapshots, TrainOutcome, Validation,
};
use dreampipe_core::field;
use dreampipe_core::imagefile;
use dreampipe_core::stages::{FINAL_STATE_DIR, SNAPSHOTS_DIR};
use dreampipe_kinds::sd::training::{ExportFormat, TrainingParams};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// Subfolder of `work_dir` the run writes its output into before it is moved to `out_dir`.
const STAGED_OUTPUT: &str = "output";
/// The single file a stage writes with `export: [single_file]`.
pub const SINGLE_FILE: &str = "model.safetensors";
/// What a diffusers model folder holds.
const MODEL_ENTRIES: [&str; 6] = [
    "model_index.json",
    "unet",
    "vae",
    "text_encoder",
    "tokenizer",
    "scheduler",
];
/// Subfolder of `work_dir` with the validation samples written for each snapshot.
const SNAPSHOT_SAMPLES: &str = "snapshot-samples";
/// Subfolder of `work_dir` the model is written to before each validation.
const VALIDATION_MODEL: &str = "validation-model";
/// The images file the report reads (docs/pipelines.md: `{"images": [{path, caption, step}]}`).
pub use dreampipe_kinds::output::IMAGES_FILE;
/// Output subfolder of the validation samples (`step-N.png`).
pub use dreampipe_kinds::output::VALIDATION_DIR;
/// Weight of the previous value in the progress bar's loss average (an exponential moving
/// average, bias-corrected like Adam's moments; 0.9 ≈ the last ten steps).
const LOSS_SMOOTHING: f64 = 0.9;
/// The model folder of a `model:` input (see [`model_dir`]); a single-file checkpoint is read
/// into a diffusers folder once, kept in the cache's shared area under the input's digest (the
/// one its key holds; hashed here only when the input has none).
pub fn resolve_model(ctx: &StageContext<'_>, model: &ResolvedInput) -> Result<PathBuf, StageError> {
    let input = model.path.as_path();
    let folder = model_dir(input);
    // A training stage's output with `export: [single_file]` only: its model.safetensors.
    let single = input.join(SINGLE_FILE);
    let input = match !folder.join("model_index.json").is_file() && single.is_file() {
        true => single.as_path(),
        false => input,
    };
    if !input.is_file() {
        return Ok(folder);
    }
    let digest = match &model.digest {
        Some(digest) => digest.clone(),
        None => {
            let size = (std::fs::metadata(input))
                .map_err(|e| StageError::io("read", input, e))?
                .len();
            dreampipe_core::cache::hash::hash_file_uncached(input, size)
                .map_err(|e| StageError::library(ctx.stage_id, e))?
        }
    };
    let folder = ctx.shared_dir("single-file")?.join(digest);
    if folder.join("model_index.json").is_file() {
        return Ok(folder);
    }
    ctx.log.line(&format!(
        "reading single file {} into {}",
        input.display(),
        folder.display()
    ));
    let options = crate::sd::single_file::ImportOptions::default();
    crate::sd::single_file::import(input, &options, &folder).map_err(|e| {
        StageError::UnreadableInput {
            stage: ctx.stage_id.to_string(),
            field: field!(TrainingParams, model),
            source: e.into(),
        }
    })?;
    Ok(folder)
}

/// The model folder an input names: itself, or its `model/` when only that is a diffusers
/// folder (the output of a `textual_inversion` stage).
pub fn model_dir(input: &Path) -> PathBuf {
    let nested = input.join(dreampipe_kinds::output::MODEL_DIR);
    if !input.join("model_index.json").is_file() && nested.join("model_index.json").is_file() {
        nested
    } else {
        input.to_path_buf()
    }
}

/// The image folder an input names: its `images/` when it has one (an `images` or `generate`
/// output), else itself.
pub fn image_dir(input: &Path) -> PathBuf {
    let nested = input.join(dreampipe_kinds::output::IMAGES_DIR);
    if nested.is_dir() {
        nested
    } else {
        input.to_path_buf()
    }
}

/// The one resolved path of input `field`.
pub fn single_input(ctx: &StageContext<'_>, field: &str) -> Result<PathBuf, StageError> {
    single_resolved(ctx, field).map(|input| input.path.clone())
}

/// The one resolved input of `field`, with its digest.
pub fn single_resolved<'a>(
    ctx: &'a StageContext<'_>,
    field: &str,
) -> Result<&'a ResolvedInput, StageError> {
    (ctx.inputs.get(field).and_then(|inputs| inputs.first()))
        .ok_or_else(|| field_error(ctx, field, "no path was resolved"))
}

/// What one training run reads of a kind's typed fields: the shared ones, and what `export:`
/// asks for (empty for a LoRA run, whose output is always its LoRA files).
pub struct RunSettings<'a> {
    pub training: &'a TrainingParams,
    pub export: &'a [ExportFormat],
}

/// `mixed_precision` against the stage's device, before anything loads (fp16 needs CUDA).
pub fn check_precision(
    ctx: &StageContext<'_>,
    training: &TrainingParams,
) -> Result<(), StageError> {
    let device = crate::device::to_tch(ctx.device);
    (training.mixed_precision.weight_kind(device))
        .map(|_| ())
        .map_err(|e| {
            field_error(
                ctx,
                field!(TrainingParams, mixed_precision),
                config_problem(e),
            )
        })
}

/// The problem text of a library config error (without its own field prefix).
fn config_problem(error: TrainError) -> String {
    match error {
        TrainError::Config { problem, .. } => problem,
        other => other.to_string(),
    }
}

/// `<work_dir>/output`: where the library writes (moved to `out_dir` at the end).
pub fn staged_output(ctx: &StageContext<'_>) -> PathBuf {
    ctx.work_dir.join(STAGED_OUTPUT)
}

/// The library's error as a stage error (cancellation stays cancellation).
pub fn stage_error(ctx: &StageContext<'_>, error: TrainError) -> StageError {
    match error {
        TrainError::Cancelled { step, checkpoint } => {
            ctx.log.line(&format!(
                "cancelled at step {step}; checkpoint {}",
                checkpoint.display()
            ));
            StageError::Cancelled
        }
        other => StageError::library(ctx.stage_id, other),
    }
}

/// Runs `train` with the stage's progress, cancel flag and validation sampling, then moves the
/// output into `out_dir` and writes `report.json`.
/// [`run_training`] for a training method named `method`, then logs where it resumed from and
/// how it ended.
pub fn run_method(
    ctx: &StageContext<'_>,
    settings: &RunSettings<'_>,
    method: &str,
    train: impl FnOnce(&mut Callbacks) -> Result<TrainOutcome, TrainError>,
) -> Result<(), StageError> {
    prepare_extension(ctx)?;
    let outcome = run_training(ctx, settings, train)?;
    apply_exports(ctx, settings, ctx.out_dir).map_err(StageError::Message)?;
    if let Some(step) = outcome.resumed_from {
        ctx.log.line(&format!("resumed from step {step}"));
    }
    if keeps_final_state(settings.training) {
        let last = checkpoint::checkpoint_dir(ctx.work_dir, outcome.steps);
        let kept = ctx.work_dir.join(FINAL_STATE_DIR);
        let _ = std::fs::remove_dir_all(&kept);
        std::fs::rename(&last, &kept).map_err(|e| StageError::io("keep", &last, e))?;
    }
    ctx.log.line(&format!(
        "{method}: {} steps, final loss {:?}",
        outcome.steps, outcome.final_loss
    ));
    Ok(())
}

pub fn run_training<T>(
    ctx: &StageContext<'_>,
    settings: &RunSettings<'_>,
    train: impl FnOnce(&mut Callbacks) -> Result<T, TrainError>,
) -> Result<T, StageError> {
    let staged = staged_output(ctx);
    create_dir(&staged)?;
    let mut smoother = LossSmoother::default();
    let mut on_progress = |progress: &Progress| {
        let smoothed = smoother.push(progress.loss);
        ctx.progress
            .step_with_metric(progress.step, progress.total, "loss", smoothed);
    };
    let sampler = ValidationSampler::new(settings.training, &staged);
    let mut run_sample = |step: u64, dir: &Path| {
        sampler
            .as_ref()
            .map_or(Ok(()), |s| s.sample(ctx, step, dir))
    };
    let validation = sampler.as_ref().map(|s| Validation {
        every: s.every,
        model_dir: ctx.work_dir.join(VALIDATION_MODEL),
        run: &mut run_sample,
    });
    let prompt = (sampler.as_ref())
        .map(|s| s.request.prompt.clone())
        .unwrap_or_default();
    let mut finish_snapshot =
        |step: u64, dir: &Path| finish_snapshot(ctx, settings, (&staged, dir), step, &prompt);
    let snapshots = (!ctx.snapshots.is_empty()).then(|| Snapshots {
        steps: ctx.snapshots.iter().map(|t| t.step).collect(),
        dir: ctx.work_dir.join(SNAPSHOTS_DIR),
        finish: &mut finish_snapshot,
    });
    let mut callbacks = Callbacks {
        on_progress: &mut on_progress,
        cancel: ctx.cancel.as_atomic(),
        validation,
        snapshots,
    };
    let outcome = train(&mut callbacks).map_err(|e| stage_error(ctx, e))?;
    move_entries(&staged, ctx.out_dir)?;
    write_report(ctx, ctx.out_dir, &prompt)?;
    Ok(outcome)
}

/// Completes the snapshot at `step` (the trainer wrote its model files into `dir`) with what
/// the stage adds when a run ends: the metrics, the validation samples up to `step` (written
/// for this variant as they were made) and `report.json`.
fn finish_snapshot(
    ctx: &StageContext<'_>,
    settings: &RunSettings<'_>,
    (staged, dir): (&Path, &Path),
    step: u64,
    prompt: &str,
) -> Result<(), String> {
    let metrics = staged.join(METRICS_FILE);
    std::fs::copy(&metrics, dir.join(METRICS_FILE))
        .map_err(|e| format!("copying `{}`: {e}", metrics.display()))?;
    let samples = snapshot_samples(ctx, step);
    let kept: Vec<u64> = (validation_steps(&samples).into_iter())
        .filter(|s| *s <= step)
        .collect();
    if !kept.is_empty() {
        let target = dir.join(VALIDATION_DIR);
        std::fs::create_dir_all(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        for sample in kept {
            let name = format!("step-{sample}.png");
            std::fs::copy(samples.join(&name), target.join(&name))
                .map_err(|e| format!("copying `{}`: {e}", samples.join(&name).display()))?;
        }
    }
    write_report(ctx, dir, prompt).map_err(|e| e.to_string())?;
    apply_exports(ctx, settings, dir)
}

/// The single file of the stage's model folder in `out` (the output itself, or `out/model` for
/// textual inversion) when `export:` names it, and the folder removed when `export:` does not
/// name `diffusers`. Snapshots get the same, so a served variant's output is its own.
fn apply_exports(
    ctx: &StageContext<'_>,
    settings: &RunSettings<'_>,
    out: &Path,
) -> Result<(), String> {
    if !settings.export.contains(&ExportFormat::SingleFile) {
        return Ok(());
    }
    let folder = model_dir(out);
    let kind = kind_of(settings.training.save_dtype);
    let file = out.join(SINGLE_FILE);
    crate::sd::single_file::export(&folder, &file, kind)
        .map_err(|e| format!("stage `{}`, field `export`: {e}", ctx.stage_id))?;
    if settings.export.contains(&ExportFormat::Diffusers) {
        return Ok(());
    }
    remove_model_folder(&folder, out)
}

/// Removes a diffusers folder's files (the folder itself when it is `out/model`).
fn remove_model_folder(folder: &Path, out: &Path) -> Result<(), String> {
    let failed = |path: &Path, e: std::io::Error| format!("removing `{}`: {e}", path.display());
    if folder != out {
        return std::fs::remove_dir_all(folder).map_err(|e| failed(folder, e));
    }
    for entry in MODEL_ENTRIES {
        let path = out.join(entry);
        let removed = match path.is_dir() {
            true => std::fs::remove_dir_all(&path),
            false => std::fs::remove_file(&path),
        };
        removed.map_err(|e| failed(&path, e))?;
    }
    Ok(())
}

/// Where the validation samples of the snapshot at `step` are written as they are made.
fn snapshot_samples(ctx: &StageContext<'_>, step: u64) -> PathBuf {
    ctx.work_dir
        .join(SNAPSHOT_SAMPLES)
        .join(format!("step-{step}"))
}

/// Whether the run keeps the training state it ends with (weights, optimizer moments) for a
/// longer run of the same stage to continue from: when its schedule does not depend on the
/// total steps (docs/cache.md "Extending a run").
pub fn keeps_final_state(training: &TrainingParams) -> bool {
    training.prefix_problem().is_none()
}

/// Starting from a shorter cached run (`ctx.extend_from`) unless this key already has
/// checkpoints of its own: its state becomes this run's checkpoint at its step, its metrics and
/// validation samples (renamed to this stage) the first lines and images of this run's output.
fn prepare_extension(ctx: &StageContext<'_>) -> Result<(), StageError> {
    let Some(base) = ctx.extend_from else {
        return Ok(());
    };
    let has_checkpoints = std::fs::read_dir(ctx.work_dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"));
    if has_checkpoints {
        return Ok(());
    }
    let checkpoint = checkpoint::checkpoint_dir(ctx.work_dir, base.step);
    crate::sd::train::output::copy_dir(&base.state_dir, &checkpoint)
        .map_err(|e| stage_error(ctx, e))?;
    let staged = staged_output(ctx);
    create_dir(&staged)?;
    let metrics = base.output_dir.join(METRICS_FILE);
    std::fs::copy(&metrics, staged.join(METRICS_FILE))
        .map_err(|e| StageError::io("copy", &metrics, e))?;
    let samples = base.output_dir.join(VALIDATION_DIR);
    for step in validation_steps(&samples) {
        let name = format!("step-{step}.png");
        let target = staged.join(VALIDATION_DIR).join(&name);
        create_dir(&staged.join(VALIDATION_DIR))?;
        std::fs::copy(samples.join(&name), &target)
            .map_err(|e| StageError::io("copy", &samples.join(&name), e))?;
        restamp_as_this_stage(ctx, &target, &base.stage_id)?;
    }
    ctx.log.line(&format!(
        "continuing from the {}-step result {} (stage `{}`) instead of starting over",
        base.step,
        &base.key[..12.min(base.key.len())],
        base.stage_id
    ));
    Ok(())
}

/// The bias-corrected exponential moving average of the loss shown on the progress bar.
#[derive(Default)]
struct LossSmoother {
    average: f64,
    count: i32,
}

impl LossSmoother {
    fn push(&mut self, loss: f64) -> f64 {
        self.count += 1;
        self.average = LOSS_SMOOTHING * self.average + (1.0 - LOSS_SMOOTHING) * loss;
        self.average / (1.0 - LOSS_SMOOTHING.powi(self.count))
    }
}

/// Samples `validation_prompt` from the model being trained.
struct ValidationSampler {
    every: u64,
    request: Txt2Img,
    kind: tch::Kind,
    dir: PathBuf,
}

impl ValidationSampler {
    /// The sampler of `validation_prompt` (`None` when it is unset).
    fn new(training: &TrainingParams, staged: &Path) -> Option<Self> {
        let prompt = training.validation_prompt.as_ref()?;
        let resolution = i64::from(training.resolution);
        Some(Self {
            every: training.validation_steps.max(1),
            request: Txt2Img {
                prompt: prompt.clone(),
                negative_prompt: String::new(),
                seed: training.seed,
                steps: training.validation_inference_steps.max(1),
                guidance: DEFAULT_GUIDANCE,
                scheduler: None,
                width: Some(resolution),
                height: Some(resolution),
                batch: 1,
            },
            kind: kind_of(training.dtype),
            dir: staged.join(VALIDATION_DIR),
        })
    }

    fn sample(&self, ctx: &StageContext<'_>, step: u64, model_dir: &Path) -> Result<(), String> {
        let output = self.render(ctx, model_dir)?;
        let hash = model_hash(model_dir);
        let path = self.dir.join(format!("step-{step}.png"));
        self.write(ctx, &path, &output, &hash, ctx.stage_id, provenance(ctx))?;
        // The same image for each shorter variant whose run includes this step, naming it.
        for target in ctx.snapshots.iter().filter(|t| t.step >= step) {
            let named = provenance_of(&target.stage_id, &target.key, ctx.pipeline);
            let copy = snapshot_samples(ctx, target.step).join(format!("step-{step}.png"));
            self.write(ctx, &copy, &output, &hash, &target.stage_id, named)?;
        }
        ctx.log
            .line(&format!("validation sample {}", path.display()));
        Ok(())
    }

    /// The validation image of the model written to `model_dir`: a diffusers folder, or LoRA
    /// files, which are sampled on the stage's `model`.
    fn render(&self, ctx: &StageContext<'_>, model_dir: &Path) -> Result<Txt2ImgOutput, String> {
        let device = crate::device::to_tch(ctx.device);
        let lora_file = model_dir.join(crate::sd::lora::files::DIFFUSERS_FILE);
        if !lora_file.is_file() {
            let model =
                StableDiffusion::load(model_dir, device, self.kind).map_err(|e| e.to_string())?;
            return model
                .txt2img(&self.request, &mut |_| {})
                .map_err(|e| e.to_string());
        }
        let lora = crate::sd::lora::LoraWeights::read(&lora_file).map_err(|e| e.to_string())?;
        let base = resolve_model(
            ctx,
            single_resolved(ctx, field!(TrainingParams, model)).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        let shared = crate::sd::pool::get(&base, device, self.kind).map_err(|e| e.to_string())?;
        let mut model = shared.lock().unwrap_or_else(|p| p.into_inner());
        let loras = [crate::sd::lora::ScaledLora {
            weights: &lora,
            scale: 1.0,
        }];
        model
            .with_loras(&loras, |model| model.txt2img(&self.request, &mut |_| {}))
            .map_err(|e| e.to_string())
    }

    fn write(
        &self,
        ctx: &StageContext<'_>,
        path: &Path,
        output: &Txt2ImgOutput,
        hash: &str,
        model_name: &str,
        provenance: Vec<(String, String)>,
    ) -> Result<(), String> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let info = SampleInfo {
            prompt: &self.request.prompt,
            negative_prompt: "",
            steps: self.request.steps,
            guidance: self.request.guidance,
            seed: self.request.seed,
            model_hash: hash,
            model_name,
        };
        write_sample_as(ctx, path, output, 0, &info, provenance).map_err(|e| e.to_string())
    }
}

/// The steps of the `step-N.png` samples in `dir` (none when it does not exist), sorted.
fn validation_steps(dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix("step-")?
                    .strip_suffix(".png")?
                    .parse()
                    .ok()
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    steps.sort_unstable();
    steps
}

/// `report.json` in `out`: every validation sample in `out/validation`, by step.
fn write_report(ctx: &StageContext<'_>, out: &Path, prompt: &str) -> Result<(), StageError> {
    let steps = validation_steps(&out.join(VALIDATION_DIR));
    let images: Vec<Value> = steps
        .iter()
        .map(|step| {
            json!({
                "path": format!("{VALIDATION_DIR}/step-{step}.png"),
                "caption": prompt,
                "step": step,
            })
        })
        .collect();
    let path = out.join(IMAGES_FILE);
    let text = serde_json::to_string_pretty(&json!({ "images": images }))
        .map_err(|e| StageError::serialize(ctx.stage_id, "report", e))?;
    std::fs::write(&path, text).map_err(|e| StageError::io("write", &path, e))
}

/// Files up to this size are copied out of the work folder instead of moved, so metrics and
/// validation samples survive a commit that fails (a resumed run then still has them).
const KEPT_FILE_BYTES: u64 = 1 << 20;

/// Hands every entry of `from` to `to` (both live in the cache): large files are moved
/// (renamed), small ones copied, folders recursively. The executor removes the work folder
/// once the result is committed.
fn move_entries(from: &Path, to: &Path) -> Result<(), StageError> {
    create_dir(to)?;
    let entries = std::fs::read_dir(from).map_err(|e| StageError::io("list", from, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StageError::io("list", from, e))?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let meta = entry
            .metadata()
            .map_err(|e| StageError::io("stat", &source, e))?;
        let handed = if meta.is_dir() {
            move_entries(&source, &target)
        } else if meta.len() <= KEPT_FILE_BYTES {
            std::fs::copy(&source, &target)
                .map(|_| ())
                .map_err(|e| StageError::io("copy", &source, e))
        } else {
            std::fs::rename(&source, &target).map_err(|e| StageError::io("move", &source, e))
        };
        handed?;
    }
    Ok(())
}

/// The image folder of field `field` (see [`image_dir`]), every file of it checked against the
/// shared image rules (`imagefile`: image extension, size limit from the header) before any
/// model is loaded, so a bad file fails at once, named with the stage and field.
pub fn checked_image_dir(ctx: &StageContext<'_>, field: &str) -> Result<PathBuf, StageError> {
    let dir = image_dir(&single_input(ctx, field)?);
    let files = imagefile::list_folder(&dir).map_err(|e| field_error(ctx, field, e))?;
    for file in &files {
        imagefile::check(file).map_err(|e| field_error(ctx, field, e))?;
    }
    Ok(dir)
}

/// Uses the first `count` images of `dir` (sorted by name): `dir` itself when it has no more,
/// else a folder of links in `work_dir` (diffusers' `--num_class_images` cap).
pub fn first_images(
    ctx: &StageContext<'_>,
    dir: &Path,
    count: usize,
    field: &str,
) -> Result<(PathBuf, usize), StageError> {
    let files =
        crate::sd::train::data::list_images(dir, field).map_err(|e| field_error(ctx, field, e))?;
    if files.len() <= count {
        return Ok((dir.to_path_buf(), files.len()));
    }
    let subset = ctx.work_dir.join(format!("{field}-first-{count}"));
    let _ = std::fs::remove_dir_all(&subset);
    create_dir(&subset)?;
    for file in &files[..count] {
        let name = file.file_name().unwrap_or_default();
        let target = subset.join(name);
        std::fs::hard_link(file, &target)
            .or_else(|_| std::fs::copy(file, &target).map(|_| ()))
            .map_err(|e| StageError::io("copy", file, e))?;
    }
    Ok((subset, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The trainer's name for textual inversion's model folder is the output contract's.
    #[test]
    fn the_trainer_writes_the_contract_model_folder() {
        assert_eq!(
            crate::sd::train::textual_inversion::MODEL_SUBDIR,
            dreampipe_kinds::output::MODEL_DIR
        );
    }

    #[test]
    fn smoothed_loss_is_a_bias_corrected_moving_average() {
        let mut smoother = LossSmoother::default();
        assert_eq!(smoother.push(2.0), 2.0);
        // (0.9·0.2 + 0.1·1.0) / (1 − 0.81) = 0.28 / 0.19
        let second = smoother.push(1.0);
        assert!((second - 0.28 / 0.19).abs() < 1e-12, "{second}");
    }

    #[test]
    fn small_outputs_stay_in_the_work_folder_until_the_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (from, to) = (dir.path().join("work/output"), dir.path().join("out"));
        std::fs::create_dir_all(from.join("model")).expect("mkdir");
        std::fs::write(from.join("metrics.jsonl"), "{\"step\": 1}\n").expect("write");
        let big = std::fs::File::create(from.join("model/weights.safetensors")).expect("create");
        big.set_len(KEPT_FILE_BYTES + 1).expect("sparse");
        move_entries(&from, &to).expect("hand over");
        assert_eq!(
            std::fs::read_to_string(to.join("metrics.jsonl")).expect("read"),
            "{\"step\": 1}\n"
        );
        assert!(
            from.join("metrics.jsonl").is_file(),
            "a copy stays for a resumed run"
        );
        assert!(to.join("model/weights.safetensors").is_file());
        assert!(
            !from.join("model/weights.safetensors").exists(),
            "large files are moved"
        );
    }

    #[test]
    fn inputs_resolve_to_nested_model_and_images_folders() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("ti/model")).expect("mkdir");
        std::fs::write(root.join("ti/model/model_index.json"), "{}").expect("write");
        assert_eq!(model_dir(&root.join("ti")), root.join("ti/model"));
        std::fs::write(root.join("ti/model_index.json"), "{}").expect("write");
        assert_eq!(model_dir(&root.join("ti")), root.join("ti"));
        std::fs::create_dir_all(root.join("photos/images")).expect("mkdir");
        assert_eq!(image_dir(&root.join("photos")), root.join("photos/images"));
        assert_eq!(image_dir(&root.join("ti")), root.join("ti"));
    }
}
