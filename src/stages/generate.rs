//! The `generate` stage: class images for prior preservation. Image `i` is txt2img with seed
//! `seed + i`, identical to `dreampipe sample --seed <seed+i>` with the same fields, whatever
//! `batch_size` is (each sample's initial noise is drawn from its own seeded generator).
//!
//! Incremental: every image is memoized in `<cache>/shared/generate/<memo key>.png`, keyed by
//! everything that decides its pixels and PNG text (stage id, model content digest, prompt,
//! negative prompt, its seed, steps, guidance, scheduler, size, dtype, device type). Raising
//! `count` changes the stage key, but the images already made are copied from the memo.
use super::sd_common::{
    SampleInfo, create_dir, field_error, kind_of, load_model, model_hash, model_label,
    restamp_sample, scheduler_kind, write_manifest, write_sample,
};
use super::{StageContext, StageError};
use crate::cache::hash::{HashMemo, tree_digest};
use crate::cache::store::reflink_or_copy;
use crate::sd::lora::{LoraWeights, ScaledLora};
use crate::sd::pipeline::{StableDiffusion, Txt2Img};
use crate::sd::schedulers::SchedulerKind;
use dreampipe_core::field;
use dreampipe_kinds::sd::generate::GenerateParams;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// Bumped when what a memo entry holds changes (invalidates every memoized image).
const MEMO_VERSION: u32 = 1;
/// The `shared_dir` folder of the memo.
const MEMO_FOLDER: &str = "generate";

/// Runs a `generate` stage (its schema: `dreampipe_kinds::sd::generate`).
pub fn run(ctx: &StageContext<'_>) -> Result<(), StageError> {
    let params: GenerateParams = ctx.typed()?;
    let job = Job::new(ctx, &params)?;
    let model = load_model(ctx, field!(GenerateParams, model), &job.model_dir, job.kind)?;
    let mut model = model.lock().unwrap_or_else(|p| p.into_inner());
    let weights = job
        .loras
        .iter()
        .map(|lora| {
            LoraWeights::read(&lora.file)
                .map_err(|e| field_error(ctx, field!(GenerateParams, loras), e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let scaled: Vec<ScaledLora<'_>> = (weights.iter().zip(&job.loras))
        .map(|(weights, lora)| ScaledLora {
            weights,
            scale: lora.scale,
        })
        .collect();
    super::sd_common::with_loras(
        ctx,
        field!(GenerateParams, loras),
        &mut model,
        &scaled,
        |model| job.run(ctx, model),
    )
}

/// One entry of `loras`: its file, content digest (for the memo) and weight.
struct LoraUse {
    file: PathBuf,
    digest: String,
    scale: f64,
}

/// `loras` with `lora_scales` (1 each when empty); an entry that is not a LoRA is an error.
fn loras_of(ctx: &StageContext<'_>, scales: &[f64]) -> Result<Vec<LoraUse>, StageError> {
    let lora_use = |lora: super::sd_common::LoraInput<'_>| {
        let digest = match &lora.input.digest {
            Some(digest) => digest.clone(),
            None => std::fs::read(&lora.file)
                .map(|bytes| blake3::hash(&bytes).to_hex().to_string())
                .map_err(|e| StageError::io("read", &lora.file, e))?,
        };
        Ok(LoraUse {
            file: lora.file,
            digest,
            scale: lora.scale,
        })
    };
    (super::sd_common::lora_inputs(ctx, scales)?.into_iter())
        .map(lora_use)
        .collect()
}

/// One run's fields, parsed.
struct Job {
    model_dir: PathBuf,
    /// The model's content digest when the runner knows it (saves rehashing the folder).
    model_digest: Option<String>,
    model_name: String,
    kind: tch::Kind,
    dtype: String,
    request: Txt2Img,
    count: u64,
    batch_size: usize,
    loras: Vec<LoraUse>,
}

impl Job {
    fn new(ctx: &StageContext<'_>, params: &GenerateParams) -> Result<Self, StageError> {
        let input = ctx
            .inputs
            .get(field!(GenerateParams, model))
            .and_then(|inputs| inputs.first())
            .ok_or_else(|| {
                field_error(
                    ctx,
                    field!(GenerateParams, model),
                    "no model folder was resolved",
                )
            })?;
        let request = Txt2Img {
            prompt: params.prompt.clone(),
            negative_prompt: params.negative_prompt.clone(),
            seed: params.seed,
            steps: params.steps,
            guidance: params.guidance,
            scheduler: params.scheduler.map(scheduler_kind),
            width: params.width,
            height: params.height,
            batch: 1,
        };
        Ok(Self {
            model_dir: super::training::resolve_model(ctx, input)?,
            model_digest: input.digest.clone(),
            model_name: model_label(input),
            kind: kind_of(params.dtype),
            dtype: params.dtype.name().to_string(),
            request,
            count: params.count.max(1),
            batch_size: params.batch_size.max(1),
            loras: loras_of(ctx, &params.lora_scales.0)?,
        })
    }

    fn run(&self, ctx: &StageContext<'_>, model: &StableDiffusion) -> Result<(), StageError> {
        let images_dir = ctx.out_dir.join(dreampipe_kinds::output::IMAGES_DIR);
        create_dir(&images_dir)?;
        let memo = ImageMemo::open(ctx, self, model)?;
        let hash = model_hash(&self.model_dir);
        let mut pending = Vec::new();
        let mut reused = 0u64;
        for index in 0..self.count {
            ctx.check_cancelled()?;
            if memo.restore(self.seed_of(index), &image_path(&images_dir, index))? {
                restamp_sample(ctx, &image_path(&images_dir, index))?;
                reused += 1;
                ctx.progress
                    .step_with_metric(reused, self.count, "reused", reused as f64);
            } else {
                pending.push(index);
            }
        }
        let chunk = if memo.scheduler.draws_step_noise() {
            1 // step noise comes from one generator: only one-by-one matches `sample`
        } else {
            self.batch_size
        };
        let mut done = reused;
        for indices in pending.chunks(chunk) {
            ctx.check_cancelled()?;
            let seeds: Vec<u64> = indices.iter().map(|&i| self.seed_of(i)).collect();
            let output = model
                .txt2img_per_sample_seeds(&self.request, &seeds, &mut |_| {})
                .map_err(|e| StageError::library(ctx.stage_id, e))?;
            for (position, (&index, &seed)) in indices.iter().zip(&seeds).enumerate() {
                let path = image_path(&images_dir, index);
                let info = SampleInfo {
                    prompt: &self.request.prompt,
                    negative_prompt: &self.request.negative_prompt,
                    steps: self.request.steps,
                    guidance: self.request.guidance,
                    seed,
                    model_hash: &hash,
                    model_name: &self.model_name,
                };
                write_sample(ctx, &path, &output, position as i64, &info)?;
                memo.store(seed, &path)?;
                done += 1;
                ctx.progress
                    .step_with_metric(done, self.count, "reused", reused as f64);
            }
        }
        ctx.log.line(&format!(
            "generate: {} generated, {reused} reused from {}",
            pending.len(),
            memo.dir.display()
        ));
        write_manifest(ctx, &self.manifest())
    }

    fn seed_of(&self, index: u64) -> u64 {
        self.request.seed + index
    }

    fn manifest(&self) -> Value {
        let images: Vec<Value> = (0..self.count)
            .map(|index| {
                json!({
                    "file": format!("images/{}", image_name(index)),
                    "seed": self.seed_of(index),
                    "prompt": self.request.prompt,
                })
            })
            .collect();
        json!({ "images": images })
    }
}

fn image_name(index: u64) -> String {
    format!("{index:04}.png")
}

fn image_path(images_dir: &Path, index: u64) -> PathBuf {
    images_dir.join(image_name(index))
}

/// The per-image memo of one run: everything but the seed is fixed, so the entry's name is
/// blake3(base fields + seed).
struct ImageMemo {
    dir: PathBuf,
    base: Value,
    scheduler: SchedulerKind,
}

impl ImageMemo {
    fn open(
        ctx: &StageContext<'_>,
        job: &Job,
        model: &StableDiffusion,
    ) -> Result<Self, StageError> {
        let model_digest = match &job.model_digest {
            Some(digest) => digest.clone(),
            None => HashMemo::in_memory()
                .hash_tree(&job.model_dir)
                .map(|tree| tree_digest(&tree))
                .map_err(|e| field_error(ctx, field!(GenerateParams, model), e))?,
        };
        let scheduler = match job.request.scheduler {
            Some(kind) => kind,
            None => SchedulerKind::of_config(&model.scheduler_config)
                .map_err(|e| field_error(ctx, field!(GenerateParams, scheduler), e))?,
        };
        let size = model.default_size();
        let mut base = json!({
            "memo_version": MEMO_VERSION,
            "stage": ctx.stage_id,
            "model": model_digest,
            "model_name": job.model_name,
            "prompt": job.request.prompt,
            "negative_prompt": job.request.negative_prompt,
            "steps": job.request.steps,
            "guidance": job.request.guidance,
            "scheduler": scheduler.name(),
            "width": job.request.width.unwrap_or(size),
            "height": job.request.height.unwrap_or(size),
            "dtype": job.dtype,
            "device": if matches!(ctx.device, crate::device::Device::Cuda(_)) { "cuda" } else { "cpu" },
        });
        if !job.loras.is_empty() {
            // Only with LoRAs, so the entries of runs without them stay valid.
            let loras: Vec<Value> = (job.loras.iter())
                .map(|lora| json!([lora.digest, lora.scale]))
                .collect();
            base["loras"] = json!(loras);
        }
        Ok(Self {
            dir: ctx.shared_dir(MEMO_FOLDER)?,
            base,
            scheduler,
        })
    }

    fn entry(&self, seed: u64) -> PathBuf {
        let mut fields = self.base.clone();
        fields["seed"] = json!(seed);
        let digest = blake3::hash(fields.to_string().as_bytes());
        self.dir.join(format!("{}.png", digest.to_hex()))
    }

    /// Copies the memoized image for `seed` to `target`; false when there is none.
    fn restore(&self, seed: u64, target: &Path) -> Result<bool, StageError> {
        let entry = self.entry(seed);
        if !entry.is_file() {
            return Ok(false);
        }
        reflink_or_copy(&entry, target).map_err(|e| StageError::io("copy", &entry, e))?;
        mark_used(&entry);
        Ok(true)
    }

    /// Memoizes `image` for `seed`: a temporary copy renamed into place, so a reader never sees
    /// a partial file.
    fn store(&self, seed: u64, image: &Path) -> Result<(), StageError> {
        let entry = self.entry(seed);
        let temporary = entry.with_extension(format!("tmp-{}", std::process::id()));
        reflink_or_copy(image, &temporary).map_err(|e| StageError::io("copy", image, e))?;
        std::fs::rename(&temporary, &entry).map_err(|e| StageError::io("rename", &temporary, e))
    }
}

/// Refreshes a memo entry's mtime, which `cache gc` reads as its last use; a failure only
/// makes the entry look older.
fn mark_used(entry: &Path) {
    if let Ok(file) = std::fs::File::options().write(true).open(entry) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}
