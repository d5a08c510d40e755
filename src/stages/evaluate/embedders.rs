//! The two embedding models of an `evaluate` stage with their image processors: loads them from
//! `clip_model` / `dino_model`, checks that each processor feeds its model the size it expects,
//! and embeds images in batches of `batch_size` (the memory bound).
use super::super::sd_common::field_error;
use super::super::{StageContext, StageError};
use crate::embed::clip_model::ClipModel;
use crate::embed::init::has_random_weights;
use crate::embed::preprocess::{ImageProcessor, read_rgb};
use crate::embed::vit::VitModel;
use dreampipe_core::field;
use dreampipe_kinds::sd::evaluate::EvaluateParams;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// Per image: the CLIP image embedding and the DINO [CLS] embedding.
pub struct Embeddings {
    pub clip: Vec<Vec<f32>>,
    pub dino: Vec<Vec<f32>>,
}

pub struct Embedders {
    pub clip: ClipModel,
    dino: VitModel,
    clip_processor: ImageProcessor,
    dino_processor: ImageProcessor,
    pub device: Device,
    batch: usize,
    /// Whether either folder was made by `dreampipe model init` (its scores mean nothing).
    pub random_weights: bool,
}

fn model_dir(ctx: &StageContext<'_>, field: &str) -> Result<PathBuf, StageError> {
    ctx.input_paths(field)
        .first()
        .map(|p| p.to_path_buf())
        .ok_or_else(|| field_error(ctx, field, "no folder given"))
}

/// Checks that `processor` makes `side` x `side` pixels (the model's `image_size`).
fn check_side(
    ctx: &StageContext<'_>,
    field: &str,
    dir: &Path,
    processor: &ImageProcessor,
    side: i64,
) -> Result<(), StageError> {
    let side = side as usize;
    match processor.output_side() {
        Some(size) if size == (side, side) => Ok(()),
        found => Err(field_error(
            ctx,
            field,
            format!(
                "`{}`: preprocessor_config.json makes {} pixels but config.json's image_size is {side}; fix one of them",
                dir.display(),
                found.map_or("variable-size".to_string(), |(h, w)| format!("{h}x{w}")),
            ),
        )),
    }
}

impl Embedders {
    /// The stage's models on its device; `batch` images per forward pass (`batch_size`).
    pub fn load(ctx: &StageContext<'_>, batch: usize) -> Result<Self, StageError> {
        let device = crate::device::to_tch(ctx.device);
        let (clip_dir, dino_dir) = (
            model_dir(ctx, field!(EvaluateParams, clip_model))?,
            model_dir(ctx, field!(EvaluateParams, dino_model))?,
        );
        let clip = ClipModel::load(&clip_dir, device)
            .map_err(|e| field_error(ctx, field!(EvaluateParams, clip_model), e))?;
        let clip_processor = ImageProcessor::from_dir(&clip_dir)
            .map_err(|e| field_error(ctx, field!(EvaluateParams, clip_model), e))?;
        check_side(
            ctx,
            field!(EvaluateParams, clip_model),
            &clip_dir,
            &clip_processor,
            clip.image_size(),
        )?;
        let dino = VitModel::load(&dino_dir, device)
            .map_err(|e| field_error(ctx, field!(EvaluateParams, dino_model), e))?;
        let dino_processor = ImageProcessor::from_dir(&dino_dir)
            .map_err(|e| field_error(ctx, field!(EvaluateParams, dino_model), e))?;
        check_side(
            ctx,
            field!(EvaluateParams, dino_model),
            &dino_dir,
            &dino_processor,
            dino.config.image_size,
        )?;
        Ok(Self {
            clip,
            dino,
            clip_processor,
            dino_processor,
            device,
            batch: batch.max(1),
            random_weights: has_random_weights(&clip_dir) || has_random_weights(&dino_dir),
        })
    }

    /// Embeds `paths` with both models, `batch_size` images per forward pass.
    pub fn embed(
        &self,
        ctx: &StageContext<'_>,
        field: &str,
        paths: &[PathBuf],
    ) -> Result<Embeddings, StageError> {
        let mut out = Embeddings {
            clip: Vec::new(),
            dino: Vec::new(),
        };
        for chunk in paths.chunks(self.batch) {
            ctx.check_cancelled()?;
            let mut clip_pixels = Vec::with_capacity(chunk.len());
            let mut dino_pixels = Vec::with_capacity(chunk.len());
            let started = std::time::Instant::now();
            for path in chunk {
                let image = read_rgb(path).map_err(|e| field_error(ctx, field, e))?;
                clip_pixels.push(self.clip_processor.pixel_values(&image));
                dino_pixels.push(self.dino_processor.pixel_values(&image));
            }
            let preprocessed = started.elapsed().as_secs_f64();
            let clip = self
                .clip
                .image_embeds(&Tensor::stack(&clip_pixels, 0).to_device(self.device));
            let dino = self
                .dino
                .cls_embeds(&Tensor::stack(&dino_pixels, 0).to_device(self.device));
            out.clip.extend(rows(&clip));
            out.dino.extend(rows(&dino));
            let seconds = started.elapsed().as_secs_f64();
            ctx.log.line(&format!(
                "{field}: {} images: decode + preprocess {preprocessed:.2} s, embeddings {:.2} s",
                chunk.len(),
                seconds - preprocessed
            ));
        }
        Ok(out)
    }
}

/// The rows of a [n, d] tensor as float32 vectors.
pub fn rows(tensor: &Tensor) -> Vec<Vec<f32>> {
    let tensor = tensor
        .to_device(Device::Cpu)
        .to_kind(tch::Kind::Float)
        .contiguous();
    let (n, d) = tensor.size2().expect("[n, d] embeddings");
    let flat = Vec::<f32>::try_from(tensor.view([-1])).expect("float32 values");
    (0..n as usize)
        .map(|i| flat[i * d as usize..(i + 1) * d as usize].to_vec())
        .collect()
}
