//! The `images` stage: imports a folder of instance images, listed and size-checked by
//! `imagefile` exactly as the training stages read them (a broken or oversized file fails the
//! stage, named); optionally resizes the shorter side to `resolution` and
//! center-crops a square. Output: `images/NNNN.png` (RGB) and `manifest.json`.
use dreampipe_core::field;
use dreampipe_core::imagefile;
use dreampipe_core::stages::field_error;
use dreampipe_core::stages::params::{Input, ParamTable, Params};
use dreampipe_core::stages::{ParamSpec, Stage, StageContext, StageError};
use image::imageops::FilterType;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Largest accepted `resolution` (an SD 2.x image is 768; 4096 leaves room without absurdity).
const MAX_RESOLUTION: f64 = 4096.0;
/// Smallest accepted `resolution`: the VAE downsamples by 8.
const MIN_RESOLUTION: f64 = 8.0;

pub struct ImagesStage;

/// An `images` stage's fields (its table is derived: [`Params`]; `path` is resolved by the
/// runner: `ctx.inputs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct ImagesParams {
    /// folder of images (every non-hidden file must be an image within the image limit)
    #[param(ty = Path)]
    pub path: Input,
    /// shorter side after resizing; unset keeps the size
    #[param(default = null, range(MIN_RESOLUTION, MAX_RESOLUTION))]
    pub resolution: Option<u32>,
    /// crop a centered square after resizing
    #[param(default = true)]
    pub center_crop: bool,
}

impl Stage for ImagesStage {
    fn kind(&self) -> &'static str {
        "images"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "Imports a folder of images: each file must decode; optional resize of the shorter side + center crop. Output: `images/0000.png`… (RGB PNG, sorted by source name) and `manifest.json` (source, width, height per image)."
    }
    fn schema(&self) -> Vec<ParamSpec> {
        ImagesParams::param_specs()
    }
    fn run(&self, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let params: ImagesParams = ctx.typed()?;
        let folder = ctx
            .input_paths(field!(ImagesParams, path))
            .first()
            .map(|p| p.to_path_buf())
            .ok_or(StageError::NoInputFolder { kind: "images" })?;
        let files = imagefile::list_folder(&folder)
            .map_err(|e| field_error(ctx, field!(ImagesParams, path), e))?;
        if files.is_empty() {
            return Err(field_error(
                ctx,
                field!(ImagesParams, path),
                format!("`{}` holds no image files", folder.display()),
            ));
        }
        let images_dir = ctx.out_dir.join(crate::output::IMAGES_DIR);
        std::fs::create_dir_all(&images_dir)
            .map_err(|e| StageError::io("create", &images_dir, e))?;
        let (resolution, crop) = (params.resolution, params.center_crop);
        let mut manifest = Vec::new();
        for (index, source) in files.iter().enumerate() {
            ctx.check_cancelled()?;
            let decoded = imagefile::decode_rgb(source)
                .map_err(|e| field_error(ctx, field!(ImagesParams, path), e))?;
            let converted = transform(decoded, resolution, crop);
            let name = format!("{index:04}.png");
            let target = images_dir.join(&name);
            converted
                .save(&target)
                .map_err(|source| StageError::WriteImage {
                    kind: "images",
                    path: target.clone(),
                    source,
                })?;
            manifest.push(json!({
                "file": format!("images/{name}"),
                "source": source.file_name().map(|n| n.to_string_lossy().to_string()),
                "width": converted.width(),
                "height": converted.height(),
            }));
            ctx.progress.step(index as u64 + 1, files.len() as u64);
        }
        let manifest_path = ctx.out_dir.join("manifest.json");
        let text =
            serde_json::to_string_pretty(&json!({ "images": manifest })).map_err(|source| {
                StageError::Manifest {
                    kind: "images",
                    source,
                }
            })?;
        std::fs::write(&manifest_path, text).map_err(|e| StageError::io("write", &manifest_path, e))
    }
}

/// Resizes the shorter side to `resolution` (Lanczos3), then center-crops a square.
fn transform(image: image::RgbImage, resolution: Option<u32>, crop: bool) -> image::RgbImage {
    let Some(size) = resolution else { return image };
    let (w, h) = image.dimensions();
    let scale = size as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as u32).max(size),
        ((h as f64 * scale).round() as u32).max(size),
    );
    let resized = image::imageops::resize(&image, nw, nh, FilterType::Lanczos3);
    if !crop {
        return resized;
    }
    let (x, y) = ((nw - size) / 2, (nh - size) / 2);
    image::imageops::crop_imm(&resized, x, y, size, size).to_image()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_the_fields_of_the_struct() {
        dreampipe_core::stages::params::check_table::<ImagesParams>(&ImagesStage.schema()).unwrap();
    }

    #[test]
    fn resize_then_center_crop_gives_square_of_resolution() {
        let image = image::RgbImage::from_fn(40, 20, |x, _| image::Rgb([x as u8 * 6, 0, 0]));
        let out = transform(image, Some(10), true);
        assert_eq!(out.dimensions(), (10, 10));
        let uncropped = transform(image::RgbImage::new(40, 20), Some(10), false);
        assert_eq!(uncropped.dimensions(), (20, 10));
    }
}
