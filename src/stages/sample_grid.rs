//! The `sample_grid` stage: samples every model × scheduler × steps × guidance × prompt × seed
//! and composes one labeled grid per prompt (rows: models, × schedulers / steps / guidance
//! when several are given; columns: seeds). Each sample equals
//! `dreampipe sample --seed <that seed>` with the same fields.
//!
//! `models` mixes stage names and folders. It gathers: a swept upstream contributes every
//! variant as its own row, labelled with the variant id (`db[learning_rate=2e-6]`), in one grid
//! stage.
use super::sd_common::{
    SampleInfo, create_dir, field_error, kind_of, load_model, model_hash, model_label,
    scheduler_kind, stamp_from, write_manifest, write_sample,
};
use super::{ResolvedInput, StageContext, StageError};
use crate::cache::store::file_name_for;
use crate::sd::lora::{LoraWeights, ScaledLora};
use crate::sd::pipeline::{StableDiffusion, Txt2Img};
use crate::sd::schedulers::SchedulerKind;
use dreampipe_core::field;
use dreampipe_kinds::grid::{GridSpec, write_grid_png};
use dreampipe_kinds::sd::sample_grid::SampleGridParams;
use serde_json::{Value, json};
use std::path::PathBuf;

/// Most seeds (grid columns) per grid: wider grids stop being readable.
const MAX_SEED_COUNT: usize = 64;

/// Runs a `sample_grid` stage (its schema: `dreampipe_kinds::sd::sample_grid`).
pub fn run(ctx: &StageContext<'_>) -> Result<(), StageError> {
    let params: SampleGridParams = ctx.typed()?;
    let grid = Grid::new(ctx, &params)?;
    let mut rows = Vec::new();
    let mut images = Vec::new();
    let mut done = 0u64;
    let every_row = every_row_loras(ctx, &params.lora_weights)?;
    let mut out = Outputs {
        rows: &mut rows,
        images: &mut images,
        done: &mut done,
    };
    for (model_input, lora) in grid.models.iter().zip(&grid.entry_loras) {
        let label = model_label(model_input);
        if let Some(lora) = lora {
            grid.sample_lora_rows(ctx, &label, lora, &every_row, &mut out)?;
            continue;
        }
        let model_dir = super::training::resolve_model(ctx, model_input)?;
        let shared = load_model(ctx, field!(SampleGridParams, models), &model_dir, grid.kind)?;
        let mut model = shared.lock().unwrap_or_else(|p| p.into_inner());
        let hash = model_hash(&model_dir);
        let loras = scaled(&every_row, None);
        super::sd_common::with_loras(
            ctx,
            field!(SampleGridParams, loras),
            &mut model,
            &loras,
            |model| grid.sample_rows(ctx, model, &grid.rows_of(&label, &hash), &mut out),
        )?;
    }
    grid.write_grids(ctx, &rows)?;
    write_manifest(ctx, &grid.manifest(images))
}

/// The grid PNG's settings fields naming its rows and columns (labels joined by " | ").
const GRID_ROWS_FIELD: &str = "dreampipe grid rows";
const GRID_COLUMNS_FIELD: &str = "dreampipe grid columns";

/// One grid row: a model with one scheduler (`None`: the model's own), steps and guidance.
#[derive(Clone)]
struct Row {
    label: String,
    scheduler: Option<SchedulerKind>,
    steps: usize,
    guidance: f64,
    hash: String,
}

/// Which row fields vary across the grid (those get a file-name suffix and a label part).
#[derive(Clone, Copy)]
struct Varying {
    schedulers: bool,
    steps: bool,
    guidance: bool,
}

impl Row {
    fn folder(&self) -> String {
        file_name_for(&self.label)
    }
    fn file_name(&self, seed: u64, varying: Varying) -> String {
        let mut name = seed.to_string();
        if let Some(kind) = self.scheduler {
            name.push_str(&format!("-{}", kind.name()));
        }
        if varying.steps {
            name.push_str(&format!("-s{}", self.steps));
        }
        if varying.guidance {
            name.push_str(&format!("-g{}", self.guidance));
        }
        name + ".png"
    }
    fn display(&self, varying: Varying) -> String {
        let mut parts = vec![self.label.clone()];
        if let (Some(kind), true) = (self.scheduler, varying.schedulers) {
            parts.push(kind.name().to_string());
        }
        if varying.steps {
            parts.push(format!("{} steps", self.steps));
        }
        if varying.guidance {
            parts.push(format!("cfg {}", self.guidance));
        }
        parts.join(" · ")
    }
}

/// The stage's fields, parsed.
struct Grid {
    models: Vec<ResolvedInput>,
    /// Per model: its LoRA file when the entry is a LoRA (a `dreambooth_lora` stage or file).
    entry_loras: Vec<Option<PathBuf>>,
    /// The model LoRA rows sample on, and the adapter weights of their rows.
    base_model: Option<ResolvedInput>,
    lora_scales: Vec<f64>,
    prompts: Vec<String>,
    seeds: Vec<u64>,
    schedulers: Vec<Option<SchedulerKind>>,
    steps: Vec<usize>,
    guidance: Vec<f64>,
    request: Txt2Img,
    kind: tch::Kind,
}

/// The lists a grid needs at least one entry of: models, prompts, steps and guidance.
fn check_not_empty(
    ctx: &StageContext<'_>,
    params: &SampleGridParams,
    models: &[ResolvedInput],
) -> Result<(), StageError> {
    let empty = [
        (
            models.is_empty(),
            field!(SampleGridParams, models),
            "no model given; list stages or model folders",
        ),
        (
            params.prompts.is_empty(),
            field!(SampleGridParams, prompts),
            "give at least one prompt",
        ),
        (
            params.steps.is_empty(),
            field!(SampleGridParams, steps),
            "give at least one value",
        ),
        (
            params.guidance.is_empty(),
            field!(SampleGridParams, guidance),
            "give at least one value",
        ),
    ];
    match empty.into_iter().find(|(is_empty, _, _)| *is_empty) {
        Some((_, field, message)) => Err(field_error(ctx, field, message)),
        None => Ok(()),
    }
}

impl Grid {
    fn new(ctx: &StageContext<'_>, params: &SampleGridParams) -> Result<Self, StageError> {
        let models: Vec<ResolvedInput> = ctx
            .inputs
            .get(field!(SampleGridParams, models))
            .cloned()
            .unwrap_or_default();
        check_not_empty(ctx, params, &models)?;
        let mut schedulers: Vec<Option<SchedulerKind>> = params
            .schedulers
            .iter()
            .map(|&name| Some(scheduler_kind(name)))
            .collect();
        if schedulers.is_empty() {
            schedulers.push(None);
        }
        let steps: Vec<usize> = params.steps.iter().map(|&s| s.max(1)).collect();
        let guidance = params.guidance.to_vec();
        let request = Txt2Img {
            prompt: String::new(),
            negative_prompt: params.negative_prompt.clone(),
            seed: 0,
            steps: steps[0],
            guidance: guidance[0],
            scheduler: None,
            width: params.width,
            height: params.height,
            batch: 1,
        };
        let (entry_loras, base_model) = lora_entries(ctx, &models)?;
        Ok(Self {
            models,
            entry_loras,
            base_model,
            lora_scales: params.lora_scales.to_vec(),
            prompts: params.prompts.to_vec(),
            seeds: checked_seeds(ctx, &params.seeds)?,
            schedulers,
            steps,
            guidance,
            request,
            kind: kind_of(params.dtype),
        })
    }

    fn varying(&self) -> Varying {
        Varying {
            schedulers: self.schedulers.len() > 1,
            steps: self.steps.len() > 1,
            guidance: self.guidance.len() > 1,
        }
    }

    /// The rows of one model: schedulers × steps × guidance, in that nesting order.
    fn rows_of(&self, label: &str, hash: &str) -> Vec<Row> {
        let mut rows = Vec::new();
        for &scheduler in &self.schedulers {
            for &steps in &self.steps {
                for &guidance in &self.guidance {
                    rows.push(Row {
                        label: label.to_string(),
                        scheduler,
                        steps,
                        guidance,
                        hash: hash.to_string(),
                    });
                }
            }
        }
        rows
    }

    fn total(&self) -> u64 {
        let lora_models = self.entry_loras.iter().filter(|l| l.is_some()).count();
        let model_rows = self.models.len() - lora_models + lora_models * self.lora_scales.len();
        let rows = model_rows * self.schedulers.len() * self.steps.len() * self.guidance.len();
        (rows * self.prompts.len() * self.seeds.len()) as u64
    }

    /// The rows of a LoRA entry: `base_model` with the LoRA at each of `lora_scales`,
    /// labelled `<label> ×<scale>`.
    fn sample_lora_rows(
        &self,
        ctx: &StageContext<'_>,
        label: &str,
        lora_file: &std::path::Path,
        every_row: &[(LoraWeights, f64)],
        out: &mut Outputs<'_>,
    ) -> Result<(), StageError> {
        let weights = LoraWeights::read(lora_file)
            .map_err(|e| field_error(ctx, field!(SampleGridParams, models), e))?;
        let base = self.base_model.as_ref().ok_or_else(|| {
            field_error(
                ctx,
                field!(SampleGridParams, base_model),
                "is required when `models` lists a LoRA",
            )
        })?;
        let base_dir = super::training::resolve_model(ctx, base)?;
        let shared = load_model(
            ctx,
            field!(SampleGridParams, base_model),
            &base_dir,
            self.kind,
        )?;
        let mut model = shared.lock().unwrap_or_else(|p| p.into_inner());
        let hash = model_hash(&base_dir);
        for &scale in &self.lora_scales {
            let row_label = format!("{label} ×{scale}");
            let loras = scaled(every_row, Some((&weights, scale)));
            super::sd_common::with_loras(
                ctx,
                field!(SampleGridParams, models),
                &mut model,
                &loras,
                |model| self.sample_rows(ctx, model, &self.rows_of(&row_label, &hash), out),
            )?;
        }
        Ok(())
    }

    /// Samples `rows` on `model` (its adapters attached), recording them.
    fn sample_rows(
        &self,
        ctx: &StageContext<'_>,
        model: &StableDiffusion,
        rows: &[Row],
        out: &mut Outputs<'_>,
    ) -> Result<(), StageError> {
        for row in rows {
            self.sample_row(ctx, model, row, out.images, out.done)?;
            out.rows.push(row.clone());
        }
        Ok(())
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
        for prompt_index in 0..self.prompts.len() {
            self.sample_prompt(ctx, model, row, prompt_index, images, done)?;
        }
        Ok(())
    }

    /// Samples every seed of prompt `prompt_index` in one row into its folder.
    fn sample_prompt(
        &self,
        ctx: &StageContext<'_>,
        model: &StableDiffusion,
        row: &Row,
        prompt_index: usize,
        images: &mut Vec<Value>,
        done: &mut u64,
    ) -> Result<(), StageError> {
        let prompt = &self.prompts[prompt_index];
        let request = Txt2Img {
            prompt: prompt.clone(),
            scheduler: row.scheduler,
            steps: row.steps,
            guidance: row.guidance,
            ..self.request.clone()
        };
        let folder = ctx
            .out_dir
            .join("samples")
            .join(row.folder())
            .join(prompt_index.to_string());
        create_dir(&folder)?;
        for seeds in self.seeds.chunks(self.seeds_per_call(model, row)) {
            ctx.check_cancelled()?;
            let output = model
                .txt2img_per_sample_seeds(&request, seeds, &mut |_| {})
                .map_err(|e| StageError::library(ctx.stage_id, e))?;
            for (position, &seed) in seeds.iter().enumerate() {
                let path = folder.join(row.file_name(seed, self.varying()));
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
        Ok(())
    }

    /// Seeds sampled per call: all at once, or one by one when the row's scheduler draws step
    /// noise (from one generator: only one-by-one matches `sample`).
    fn seeds_per_call(&self, model: &StableDiffusion, row: &Row) -> usize {
        let effective = row
            .scheduler
            .or_else(|| SchedulerKind::of_config(&model.scheduler_config).ok());
        let one_by_one = effective.is_none_or(SchedulerKind::draws_step_noise);
        if one_by_one { 1 } else { self.seeds.len() }
    }

    /// One `grid-<prompt-index>.png` per prompt, composed from the written samples.
    fn write_grids(&self, ctx: &StageContext<'_>, rows: &[Row]) -> Result<(), StageError> {
        let varying = self.varying();
        let row_labels: Vec<String> = rows.iter().map(|r| r.display(varying)).collect();
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
                        .map(|&seed| folder.join(row.file_name(seed, varying)))
                        .collect()
                })
                .collect();
            let grid_error = |e: dreampipe_kinds::grid::GridPngError| StageError::Grid {
                stage: ctx.stage_id.to_string(),
                grid: prompt_index,
                source: e.into(),
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
            let layout = [
                (GRID_ROWS_FIELD.to_string(), row_labels.join(" | ")),
                (GRID_COLUMNS_FIELD.to_string(), column_labels.join(" | ")),
            ];
            // As A1111 does for grids: the first image's parameters, plus the layout.
            if let Some(first) = paths.first().and_then(|row| row.first()) {
                stamp_from(ctx, first, &target, &layout)?;
            }
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

/// The `seeds` field: at most [`MAX_SEED_COUNT`], without repeats (each names its files).
/// Per model entry its LoRA file (a `dreambooth_lora` stage or a LoRA file), and the
/// `base_model` the LoRA rows sample on (required when there is one).
fn lora_entries(
    ctx: &StageContext<'_>,
    models: &[ResolvedInput],
) -> Result<(Vec<Option<PathBuf>>, Option<ResolvedInput>), StageError> {
    let loras: Vec<Option<PathBuf>> = models
        .iter()
        .map(|input| crate::sd::lora::files::lora_file_of(&input.path))
        .collect();
    let base_model = ctx
        .inputs
        .get(field!(SampleGridParams, base_model))
        .and_then(|i| i.first())
        .cloned();
    if loras.iter().any(Option::is_some) && base_model.is_none() {
        return Err(field_error(
            ctx,
            field!(SampleGridParams, base_model),
            "is required when `models` lists a LoRA: name the model the LoRA rows sample on",
        ));
    }
    Ok((loras, base_model))
}

/// What a run accumulates: the rows sampled, the manifest entries, the images done.
struct Outputs<'a> {
    rows: &'a mut Vec<Row>,
    images: &'a mut Vec<Value>,
    done: &'a mut u64,
}

/// The `loras` applied to every row, with their `lora_weights` (1 each when empty); an entry
/// that is not a LoRA is an error of `loras`.
fn every_row_loras(
    ctx: &StageContext<'_>,
    weights: &[f64],
) -> Result<Vec<(LoraWeights, f64)>, StageError> {
    let read = |lora: super::sd_common::LoraInput<'_>| {
        let read = LoraWeights::read(&lora.file)
            .map_err(|e| field_error(ctx, field!(SampleGridParams, loras), e))?;
        Ok((read, lora.scale))
    };
    (super::sd_common::lora_inputs(ctx, weights)?.into_iter())
        .map(read)
        .collect()
}

/// The every-row LoRAs at their weights, plus a row's own LoRA entry at its scale.
fn scaled<'a>(
    every_row: &'a [(LoraWeights, f64)],
    entry: Option<(&'a LoraWeights, f64)>,
) -> Vec<ScaledLora<'a>> {
    let global = every_row.iter().map(|(weights, scale)| (weights, *scale));
    (global.chain(entry))
        .map(|(weights, scale)| ScaledLora { weights, scale })
        .collect()
}

/// The `seeds` field: 1 to [`MAX_SEED_COUNT`] seeds, none repeated.
fn checked_seeds(ctx: &StageContext<'_>, seeds: &[u64]) -> Result<Vec<u64>, StageError> {
    let seeds = seeds.to_vec();
    if seeds.is_empty() || seeds.len() > MAX_SEED_COUNT {
        let message = format!("give 1 to {MAX_SEED_COUNT} seeds, not {}", seeds.len());
        return Err(field_error(ctx, field!(SampleGridParams, seeds), message));
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(repeated) = seeds.iter().find(|s| !seen.insert(**s)) {
        let message = format!("seed {repeated} is listed twice");
        return Err(field_error(ctx, field!(SampleGridParams, seeds), message));
    }
    Ok(seeds)
}

/// `path` relative to the output folder, with `/` separators.
fn relative(ctx: &StageContext<'_>, path: &std::path::Path) -> String {
    crate::cache::hash::relative_name(ctx.out_dir, path)
}
