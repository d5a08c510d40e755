//! The `sample_grid` stage: samples every model × scheduler × prompt × seed and composes one
//! labeled grid per prompt (rows: models, × schedulers when several are given; columns: seeds).
//! Seeds are `seed, seed + 1, …` (`seed_count` of them); each sample equals
//! `dreampipe sample --seed <that seed>` with the same fields.
//!
//! `models` lists upstream stages; when one of them is a sweep, the runner fans this stage out
//! (one grid stage per variant, its id naming the variant): it does not gather all variants
//! into one stage. Folders go in `model_folders`.
use super::sd_common::{
    SampleInfo, create_dir, dtype_param, field_error, load_model, model_hash, model_label,
    parse_scheduler, write_manifest, write_sample,
};
use super::{DeviceClass, ParamSpec, ParamType, ResolvedInput, Stage, StageContext, StageError};
use crate::cache::store::file_name_for;
use crate::report::grid::{GridSpec, write_grid_png};
use crate::sd::pipeline::{DEFAULT_GUIDANCE, DEFAULT_STEPS, StableDiffusion, Txt2Img};
use crate::sd::schedulers::SchedulerKind;
use serde_json::{Value, json};
use std::path::PathBuf;

/// Most seeds (grid columns) per grid: wider grids stop being readable.
const MAX_SEED_COUNT: f64 = 64.0;
/// Same bounds as `generate` (see there).
const MAX_STEPS: f64 = 1000.0;
const MAX_GUIDANCE: f64 = 100.0;
const MIN_SIZE: f64 = 8.0;
const MAX_SIZE: f64 = 4096.0;

pub struct SampleGridStage;

impl Stage for SampleGridStage {
    fn kind(&self) -> &'static str {
        "sample_grid"
    }
    fn version(&self) -> u32 {
        1
    }
    fn device_class(&self) -> DeviceClass {
        DeviceClass::Gpu
    }
    fn summary(&self) -> &'static str {
        "Samples every model × scheduler × prompt × seed. Output: `samples/<model>/<prompt-index>/<seed>-<scheduler>.png` (A1111 parameters + stage id), `grid-<prompt-index>.png` (rows: models × schedulers, columns: seeds) and `manifest.json`."
    }
    fn schema(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::optional(
                "models",
                ParamType::StageRefList,
                json!([]),
                "stages producing models (a swept stage fans this stage out per variant)",
            ),
            ParamSpec::optional(
                "model_folders",
                ParamType::PathList,
                json!([]),
                "diffusers model folders",
            ),
            ParamSpec::required("prompts", ParamType::StringList, "one grid per prompt"),
            ParamSpec::optional(
                "negative_prompt",
                ParamType::String,
                json!(""),
                "negative prompt",
            ),
            ParamSpec::optional("seed", ParamType::Integer, json!(0), "seed of column 0")
                .range(0.0, super::generate::MAX_SEED),
            ParamSpec::optional(
                "seed_count",
                ParamType::Integer,
                json!(4),
                "columns: seeds `seed` … `seed + seed_count - 1`",
            )
            .range(1.0, MAX_SEED_COUNT),
            ParamSpec::optional(
                "schedulers",
                ParamType::StringList,
                json!([]),
                "schedulers to compare (ddim, pndm, lms, euler, euler-a, dpm++, ddpm); empty: the model's own",
            ),
            ParamSpec::optional(
                "steps",
                ParamType::Integer,
                json!(DEFAULT_STEPS),
                "denoising steps",
            )
            .range(1.0, MAX_STEPS),
            ParamSpec::optional(
                "guidance",
                ParamType::Number,
                json!(DEFAULT_GUIDANCE),
                "classifier-free guidance scale",
            )
            .range(0.0, MAX_GUIDANCE),
            ParamSpec::optional(
                "width",
                ParamType::Integer,
                Value::Null,
                "image width (a multiple of 8); unset: the model's default",
            )
            .range(MIN_SIZE, MAX_SIZE),
            ParamSpec::optional(
                "height",
                ParamType::Integer,
                Value::Null,
                "image height (a multiple of 8); unset: the model's default",
            )
            .range(MIN_SIZE, MAX_SIZE),
            ParamSpec::optional(
                "dtype",
                ParamType::String,
                json!("f32"),
                "weights' precision: f32, f16 or bf16",
            ),
        ]
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let grid = Grid::from_context(ctx)?;
        let mut rows = Vec::new();
        let mut images = Vec::new();
        let mut done = 0u64;
        for model_input in &grid.models {
            let label = model_label(model_input);
            let model_dir = super::training::model_dir(&model_input.path);
            let shared = load_model(ctx, "models", &model_dir, grid.kind)?;
            let model = shared.lock().unwrap_or_else(|p| p.into_inner());
            let hash = model_hash(&model_dir);
            for &scheduler in &grid.schedulers {
                let row = Row {
                    label: label.clone(),
                    scheduler,
                    hash: hash.clone(),
                };
                grid.sample_row(ctx, &model, &row, &mut images, &mut done)?;
                rows.push(row);
            }
        }
        grid.write_grids(ctx, &rows)?;
        write_manifest(ctx, &grid.manifest(images))
    }
}

/// One grid row: a model with one scheduler (`None`: the model's own).
struct Row {
    label: String,
    scheduler: Option<SchedulerKind>,
    hash: String,
}

impl Row {
    fn folder(&self) -> String {
        file_name_for(&self.label)
    }
    fn file_name(&self, seed: u64) -> String {
        match self.scheduler {
            Some(kind) => format!("{seed}-{}.png", kind.name()),
            None => format!("{seed}.png"),
        }
    }
    fn display(&self, several_schedulers: bool) -> String {
        match (self.scheduler, several_schedulers) {
            (Some(kind), true) => format!("{} · {}", self.label, kind.name()),
            _ => self.label.clone(),
        }
    }
}

/// The stage's fields, parsed.
struct Grid {
    models: Vec<ResolvedInput>,
    prompts: Vec<String>,
    seeds: Vec<u64>,
    schedulers: Vec<Option<SchedulerKind>>,
    request: Txt2Img,
    kind: tch::Kind,
}

impl Grid {
    fn from_context(ctx: &StageContext<'_>) -> Result<Self, StageError> {
        let models: Vec<ResolvedInput> = ["models", "model_folders"]
            .iter()
            .flat_map(|field| ctx.inputs.get(*field).into_iter().flatten().cloned())
            .collect();
        if models.is_empty() {
            return Err(field_error(
                ctx,
                "models",
                "no model given; list stages in `models` or folders in `model_folders`",
            ));
        }
        let prompts = string_list(ctx, "prompts");
        if prompts.is_empty() {
            return Err(field_error(ctx, "prompts", "give at least one prompt"));
        }
        let mut schedulers = Vec::new();
        for name in string_list(ctx, "schedulers") {
            schedulers.push(parse_scheduler(ctx, "schedulers", Some(&name))?);
        }
        if schedulers.is_empty() {
            schedulers.push(None);
        }
        let first_seed = ctx.i64_param("seed").unwrap_or(0) as u64;
        let seed_count = ctx.i64_param("seed_count").unwrap_or(1).max(1) as u64;
        let request = Txt2Img {
            prompt: String::new(),
            negative_prompt: ctx.str_param("negative_prompt")?.to_string(),
            seed: first_seed,
            steps: ctx.i64_param("steps").unwrap_or(DEFAULT_STEPS as i64) as usize,
            guidance: ctx.f64_param("guidance").unwrap_or(DEFAULT_GUIDANCE),
            scheduler: None,
            width: ctx.i64_param("width"),
            height: ctx.i64_param("height"),
            batch: 1,
        };
        Ok(Self {
            models,
            prompts,
            seeds: (first_seed..first_seed + seed_count).collect(),
            schedulers,
            request,
            kind: dtype_param(ctx)?,
        })
    }

    fn total(&self) -> u64 {
        (self.models.len() * self.schedulers.len() * self.prompts.len() * self.seeds.len()) as u64
    }

    /// Samples every prompt × seed of one row; appends manifest entries.
    fn sample_row(
        &self,
        ctx: &StageContext<'_>,
        model: &StableDiffusion,
        row: &Row,
        images: &mut Vec<Value>,
        done: &mut u64,
    ) -> Result<(), StageError> {
        for (prompt_index, prompt) in self.prompts.iter().enumerate() {
            let request = Txt2Img {
                prompt: prompt.clone(),
                scheduler: row.scheduler,
                ..self.request.clone()
            };
            let folder = ctx
                .out_dir
                .join("samples")
                .join(row.folder())
                .join(prompt_index.to_string());
            create_dir(&folder)?;
            let effective = row
                .scheduler
                .or_else(|| SchedulerKind::of_config(&model.scheduler_config).ok());
            // Step noise comes from one generator: only one-by-one matches `sample`.
            let one_by_one = effective.is_none_or(SchedulerKind::draws_step_noise);
            let chunk = if one_by_one { 1 } else { self.seeds.len() };
            for seeds in self.seeds.chunks(chunk) {
                ctx.check_cancelled()?;
                let output = model
                    .txt2img_per_sample_seeds(&request, seeds, &mut |_| {})
                    .map_err(|e| StageError::Failed(format!("stage `{}`: {e}", ctx.stage_id)))?;
                for (position, &seed) in seeds.iter().enumerate() {
                    let path = folder.join(row.file_name(seed));
                    let info = SampleInfo {
                        prompt,
                        negative_prompt: &request.negative_prompt,
                        steps: request.steps,
                        guidance: request.guidance,
                        seed,
                        model_hash: &row.hash,
                        model_name: &row.label,
                    };
                    write_sample(ctx, &path, &output, position as i64, &info)?;
                    images.push(json!({
                        "file": relative(ctx, &path),
                        "model": row.label,
                        "prompt": prompt,
                        "prompt_index": prompt_index,
                        "seed": seed,
                        "scheduler": output.scheduler.name(),
                        "steps": request.steps,
                        "guidance": request.guidance,
                    }));
                    *done += 1;
                    ctx.progress
                        .step_with_metric(*done, self.total(), "seed", seed as f64);
                }
            }
        }
        Ok(())
    }

    /// One `grid-<prompt-index>.png` per prompt, composed from the written samples.
    fn write_grids(&self, ctx: &StageContext<'_>, rows: &[Row]) -> Result<(), StageError> {
        let several = self.schedulers.len() > 1;
        let row_labels: Vec<String> = rows.iter().map(|r| r.display(several)).collect();
        let column_labels: Vec<String> = self.seeds.iter().map(|s| format!("seed {s}")).collect();
        for (prompt_index, prompt) in self.prompts.iter().enumerate() {
            let paths: Vec<Vec<PathBuf>> = rows
                .iter()
                .map(|row| {
                    let folder = ctx
                        .out_dir
                        .join("samples")
                        .join(row.folder())
                        .join(prompt_index.to_string());
                    self.seeds
                        .iter()
                        .map(|&seed| folder.join(row.file_name(seed)))
                        .collect()
                })
                .collect();
            let grid_error = |e: crate::report::ReportError| {
                StageError::Failed(format!(
                    "stage `{}`: grid {prompt_index}: {e}",
                    ctx.stage_id
                ))
            };
            let spec = GridSpec::from_paths(
                Some(prompt.clone()),
                row_labels.clone(),
                column_labels.clone(),
                &paths,
            )
            .map_err(grid_error)?;
            let target = ctx.out_dir.join(format!("grid-{prompt_index}.png"));
            write_grid_png(&spec, &target, None).map_err(grid_error)?;
        }
        Ok(())
    }

    fn manifest(&self, images: Vec<Value>) -> Value {
        let grids: Vec<Value> = self
            .prompts
            .iter()
            .enumerate()
            .map(|(index, prompt)| json!({"file": format!("grid-{index}.png"), "prompt": prompt}))
            .collect();
        json!({ "grids": grids, "images": images })
    }
}

fn string_list(ctx: &StageContext<'_>, field: &str) -> Vec<String> {
    ctx.params
        .get(field)
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `path` relative to the output folder, with `/` separators.
fn relative(ctx: &StageContext<'_>, path: &std::path::Path) -> String {
    crate::cache::hash::relative_name(ctx.out_dir, path)
}
