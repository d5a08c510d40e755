//! Training images: listing an image folder (sorted, so runs are reproducible), decoding every
//! file up front (an undecodable file is an error naming it), and the per-sample transforms of
//! the diffusers scripts, turning an RGB image into a `[3, r, r]` float tensor in [-1, 1]:
//!
//! * DreamBooth (torchvision): `Resize(r)` of the shorter side (bilinear with antialias — the
//!   image crate's triangle filter, which widens with the scale like PIL's bilinear), then
//!   `CenterCrop(r)` or `RandomCrop(r)`, optional horizontal flip, `(x/255 - 0.5) / 0.5`.
//! * Textual inversion: optional square center crop of the original, resize to `r x r`
//!   (bicubic, aspect not kept), horizontal flip with p = 0.5, `x / 127.5 - 1`.
use super::TrainError;
use super::streams::SampleRng;
use dreampipe_core::imagefile;
use image::RgbImage;
use image::imageops::{self, FilterType};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// File extensions read from an image folder (lowercase).
pub const IMAGE_EXTENSIONS: [&str; 4] = imagefile::EXTENSIONS;
/// textual_inversion.py's `flip_p`.
pub const TI_FLIP_PROBABILITY: f64 = 0.5;

/// How an image is cropped to the square training resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// train_dreambooth.py: shorter side to `resolution`, then a center or random crop, then
    /// an optional random flip (p = 0.5).
    DreamBooth {
        resolution: u32,
        center_crop: bool,
        random_flip: bool,
    },
    /// textual_inversion.py: optional square center crop, stretch to `resolution`, flip p = 0.5.
    TextualInversion { resolution: u32, center_crop: bool },
}

impl Transform {
    /// Whether two draws of the same image can differ (then latents cannot be cached).
    pub fn is_random(&self) -> bool {
        match *self {
            Self::DreamBooth {
                center_crop,
                random_flip,
                ..
            } => !center_crop || random_flip,
            Self::TextualInversion { .. } => true,
        }
    }

    /// Applies the transform; random choices come from `rng`.
    pub fn apply(&self, image: &RgbImage, rng: &mut SampleRng) -> Tensor {
        self.apply_with_crop(image, rng).0
    }

    /// [`apply`](Self::apply), also returning SDXL's `crop_top_left` `(top, left)`: where the
    /// crop sits in the resized image (for a flipped sample, in the flipped image, as
    /// train_dreambooth_lora_sdxl.py flips before it crops); (0, 0) for textual inversion.
    pub fn apply_with_crop(&self, image: &RgbImage, rng: &mut SampleRng) -> (Tensor, (u32, u32)) {
        match *self {
            Self::DreamBooth {
                resolution,
                center_crop,
                random_flip,
            } => {
                let resized = resize_shorter_side(image, resolution);
                let (x, y) = if center_crop {
                    center_crop_origin(resized.width(), resized.height(), resolution)
                } else {
                    random_crop_origin(resized.width(), resized.height(), resolution, rng)
                };
                let cropped = imageops::crop_imm(&resized, x, y, resolution, resolution).to_image();
                let flipped = random_flip && rng.unit() < 0.5;
                let (cropped, left) = if flipped {
                    let mirrored = resized.width().saturating_sub(x + resolution);
                    (imageops::flip_horizontal(&cropped), mirrored)
                } else {
                    (cropped, x)
                };
                (to_unit_range_tensor(&cropped), (y, left))
            }
            Self::TextualInversion {
                resolution,
                center_crop,
            } => {
                let source = if center_crop {
                    square_center_crop(image)
                } else {
                    image.clone()
                };
                let resized =
                    imageops::resize(&source, resolution, resolution, FilterType::CatmullRom);
                let flipped = rng.unit() < TI_FLIP_PROBABILITY;
                let resized = if flipped {
                    imageops::flip_horizontal(&resized)
                } else {
                    resized
                };
                (to_unit_range_tensor(&resized), (0, 0))
            }
        }
    }
}

/// The images of `dir` by the rules every image reader shares (`imagefile::list_folder`:
/// non-hidden files, each with an image extension), sorted by name. `what` names the option
/// in errors (e.g. "instance_data_dir").
pub fn list_images(dir: &Path, what: &str) -> Result<Vec<PathBuf>, TrainError> {
    let files = imagefile::list_folder(dir).map_err(|problem| TrainError::Data {
        path: dir.to_path_buf(),
        problem: format!("the {what} folder: {problem}"),
    })?;
    if files.is_empty() {
        return Err(TrainError::Data {
            path: dir.to_path_buf(),
            problem: format!(
                "the {what} folder has no images ({})",
                IMAGE_EXTENSIONS.join(", ")
            ),
        });
    }
    Ok(files)
}

/// The caption of an image: the text of `name.txt` beside it, trimmed; an error naming the file
/// when it is missing or empty.
pub fn read_caption(image: &Path) -> Result<String, TrainError> {
    let file = image.with_extension(dreampipe_core::imagefile::CAPTION_EXTENSION);
    let missing = |problem: &str| TrainError::Data {
        path: file.clone(),
        problem: format!(
            "{problem}: captioned fine-tuning needs `name.txt` beside each `name.png`"
        ),
    };
    let text = std::fs::read_to_string(&file).map_err(|_| missing("no caption file"))?;
    let caption = text.trim();
    if caption.is_empty() {
        return Err(missing("the caption is empty"));
    }
    Ok(caption.to_string())
}

/// Decodes one image to RGB within the image limit, applying its EXIF orientation (PIL's
/// `exif_transpose`).
pub fn decode_image(path: &Path) -> Result<RgbImage, TrainError> {
    imagefile::decode_rgb(path).map_err(TrainError::Image)
}

/// Lists and decodes every image of a folder.
pub fn load_folder(dir: &Path, what: &str) -> Result<Vec<RgbImage>, TrainError> {
    list_images(dir, what)?
        .iter()
        .map(|path| decode_image(path))
        .collect()
}

/// torchvision `Resize(size)`: the shorter side becomes `size`, the longer one
/// `int(size * long / short)`.
pub fn resize_shorter_side(image: &RgbImage, size: u32) -> RgbImage {
    let (width, height) = image.dimensions();
    let (new_width, new_height) = if width <= height {
        (
            size,
            (size as u64 * height as u64 / width.max(1) as u64) as u32,
        )
    } else {
        (
            (size as u64 * width as u64 / height.max(1) as u64) as u32,
            size,
        )
    };
    if (new_width, new_height) == (width, height) {
        return image.clone();
    }
    imageops::resize(image, new_width, new_height, FilterType::Triangle)
}

/// torchvision `CenterCrop`: `int(round((len - size) / 2))` on each axis.
pub fn center_crop_origin(width: u32, height: u32, size: u32) -> (u32, u32) {
    let offset = |len: u32| ((len.saturating_sub(size)) as f64 / 2.0).round_ties_even() as u32;
    (offset(width), offset(height))
}

/// torchvision `RandomCrop`: a uniform offset in `0..=len - size` on each axis.
fn random_crop_origin(width: u32, height: u32, size: u32, rng: &mut SampleRng) -> (u32, u32) {
    let y = rng.below(u64::from(height.saturating_sub(size)) + 1) as u32;
    let x = rng.below(u64::from(width.saturating_sub(size)) + 1) as u32;
    (x, y)
}

/// textual_inversion.py's crop: `img[(h - c)//2 : (h + c)//2, (w - c)//2 : (w + c)//2]`.
fn square_center_crop(image: &RgbImage) -> RgbImage {
    let (width, height) = image.dimensions();
    let crop = width.min(height);
    imageops::crop_imm(image, (width - crop) / 2, (height - crop) / 2, crop, crop).to_image()
}

/// HWC u8 -> CHW float32 in [-1, 1] (`(x / 255 - 0.5) / 0.5`).
pub fn to_unit_range_tensor(image: &RgbImage) -> Tensor {
    let (width, height) = image.dimensions();
    let bytes = Tensor::from_slice(image.as_raw())
        .view([height as i64, width as i64, 3])
        .permute([2, 0, 1])
        .to_kind(Kind::Float);
    (bytes / 255.0 - 0.5) / 0.5
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorter_side_resize_keeps_aspect_like_torchvision() {
        let image = RgbImage::new(100, 60);
        let resized = resize_shorter_side(&image, 32);
        // int(32 * 100 / 60) = 53
        assert_eq!(resized.dimensions(), (53, 32));
        let tall = resize_shorter_side(&RgbImage::new(60, 100), 32);
        assert_eq!(tall.dimensions(), (32, 53));
    }

    #[test]
    fn center_crop_offsets_round_like_torchvision() {
        // round((53 - 32) / 2) = round(10.5) = 10 (Python rounds half to even).
        assert_eq!(center_crop_origin(53, 32, 32), (10, 0));
        assert_eq!(center_crop_origin(55, 40, 32), (12, 4));
    }

    #[test]
    fn pixels_map_to_minus_one_one() {
        let mut image = RgbImage::new(2, 1);
        image.put_pixel(0, 0, image::Rgb([0, 255, 51]));
        image.put_pixel(1, 0, image::Rgb([255, 0, 0]));
        let tensor = to_unit_range_tensor(&image);
        assert_eq!(tensor.size(), [3, 1, 2]);
        let expected = Tensor::from_slice(&[-1.0f32, 1.0, 1.0, -1.0, -0.6, -1.0]);
        assert!(tensor.flatten(0, -1).allclose(&expected, 0.0, 1e-6, false));
    }

    #[test]
    fn flip_mirrors_the_columns() {
        let mut image = RgbImage::new(4, 4);
        image.put_pixel(0, 0, image::Rgb([255, 255, 255]));
        let transform = Transform::DreamBooth {
            resolution: 4,
            center_crop: true,
            random_flip: true,
        };
        let mut flipped_seen = false;
        let mut plain_seen = false;
        for sample in 0..16 {
            let tensor = transform.apply(&image, &mut SampleRng::for_sample(1, sample));
            let left = tensor.double_value(&[0, 0, 0]);
            let right = tensor.double_value(&[0, 0, 3]);
            match (left, right) {
                (1.0, -1.0) => plain_seen = true,
                (-1.0, 1.0) => flipped_seen = true,
                other => panic!("unexpected corner values {other:?}"),
            }
        }
        assert!(flipped_seen && plain_seen);
    }

    #[test]
    fn an_undecodable_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("broken.png");
        std::fs::write(&bad, b"not a png").unwrap();
        let error = load_folder(dir.path(), "instance_data_dir").unwrap_err();
        let message = error.to_string();
        assert_eq!(
            message,
            format!(
                "`{}` does not decode as an image: Format error decoding Png: Invalid PNG signature.; replace or remove the file",
                bad.display()
            )
        );
    }

    #[test]
    fn an_empty_folder_is_an_error_naming_the_option() {
        let dir = tempfile::tempdir().unwrap();
        let error = list_images(dir.path(), "class_data_dir").unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "{}: the class_data_dir folder has no images (png, jpg, jpeg, webp)",
                dir.path().display()
            )
        );
    }
}
