//! transformers' CLIP and ViT image processors (the PIL backend: `CLIPImageProcessorPil`,
//! `ViTImageProcessorPil`), driven by a model folder's `preprocessor_config.json`: convert to
//! RGB, resize (shortest edge to `size` keeping the aspect ratio, or to `height` x `width`) with
//! PIL's filter, center crop (zero padding when the crop is larger), rescale
//! (`float32(float64(v) * rescale_factor)`) and normalize (`(x - mean) / std` in float32) —
//! each step in the same arithmetic as transformers, so the pixel values are equal.
use super::EmbedError;
use super::resample::{Filter, Rgb8, resize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// The processor's file name in a transformers model folder.
pub const PREPROCESSOR_CONFIG: &str = "preprocessor_config.json";
/// `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD` (transformers.image_utils), CLIP's defaults.
const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// `IMAGENET_STANDARD_MEAN` / `_STD`, ViTImageProcessor's defaults.
const IMAGENET_STANDARD: [f64; 3] = [0.5, 0.5, 0.5];
/// transformers' default `rescale_factor`.
const DEFAULT_RESCALE: f64 = 1.0 / 255.0;
/// Largest side accepted in a processor config (a real one says 224 or 336).
const MAX_SIDE: i64 = 4096;

/// How the resize step sizes its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// The shorter side becomes this; the longer `int(size * long / short)`.
    ShortestEdge(usize),
    /// Exactly `height` x `width`.
    Exact { height: usize, width: usize },
}

/// The processor family: it decides the class defaults and how an integer `size` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Clip,
    Vit,
}

/// A parsed `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    pub resize: Option<(ResizeTo, Filter)>,
    /// (height, width) of the center crop.
    pub crop: Option<(usize, usize)>,
    pub rescale: Option<f64>,
    pub normalize: Option<([f64; 3], [f64; 3])>,
}

/// Reads one processor config with its class defaults and errors naming the file and key.
struct Reader<'a> {
    file: &'a Path,
    json: &'a Value,
    family: Family,
}

impl Reader<'_> {
    fn error(&self, reason: impl Into<String>) -> EmbedError {
        EmbedError::Config {
            file: self.file.to_path_buf(),
            reason: reason.into(),
        }
    }

    fn flag(&self, key: &str, default: bool) -> Result<bool, EmbedError> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => {
                Err(self.error(format!("key '{key}' must be true or false, not {other}")))
            }
        }
    }

    fn side(&self, key: &str, value: &Value) -> Result<usize, EmbedError> {
        match value.as_i64() {
            Some(n) if (1..=MAX_SIDE).contains(&n) => Ok(n as usize),
            _ => Err(self.error(format!(
                "key '{key}' must hold sides from 1 to {MAX_SIDE}, found {value}"
            ))),
        }
    }

    /// `size`: an integer (CLIP: shortest edge; ViT: square, as transformers' `get_size_dict`
    /// with the class's `default_to_square`) or an object.
    fn size(&self) -> Result<ResizeTo, EmbedError> {
        let default = match self.family {
            Family::Clip => ResizeTo::ShortestEdge(224),
            Family::Vit => ResizeTo::Exact {
                height: 224,
                width: 224,
            },
        };
        let Some(value) = self.json.get("size").filter(|v| !v.is_null()) else {
            return Ok(default);
        };
        if value.is_number() {
            let side = self.side("size", value)?;
            return Ok(match self.family {
                Family::Clip => ResizeTo::ShortestEdge(side),
                Family::Vit => ResizeTo::Exact {
                    height: side,
                    width: side,
                },
            });
        }
        if value.get("longest_edge").is_some() {
            return Err(self.error("key 'size': 'longest_edge' is not supported; give 'shortest_edge' or 'height' and 'width'"));
        }
        if let Some(edge) = value.get("shortest_edge") {
            return Ok(ResizeTo::ShortestEdge(
                self.side("size.shortest_edge", edge)?,
            ));
        }
        self.height_width("size", value)
            .map(|(height, width)| ResizeTo::Exact { height, width })
    }

    fn height_width(&self, key: &str, value: &Value) -> Result<(usize, usize), EmbedError> {
        if value.is_number() {
            let side = self.side(key, value)?;
            return Ok((side, side));
        }
        match (value.get("height"), value.get("width")) {
            (Some(h), Some(w)) => Ok((self.side(key, h)?, self.side(key, w)?)),
            _ => Err(self.error(format!(
                "key '{key}' must be an integer or have 'height' and 'width', found {value}"
            ))),
        }
    }

    fn filter(&self) -> Result<Filter, EmbedError> {
        let default = match self.family {
            Family::Clip => Filter::Bicubic,
            Family::Vit => Filter::Bilinear,
        };
        match self.json.get("resample").filter(|v| !v.is_null()) {
            None => Ok(default),
            Some(value) => value.as_i64().and_then(Filter::from_pil).ok_or_else(|| {
                self.error(format!(
                    "key 'resample' is {value}; supported: 2 (bilinear) and 3 (bicubic)"
                ))
            }),
        }
    }

    fn triple(&self, key: &str, default: [f64; 3]) -> Result<[f64; 3], EmbedError> {
        let Some(value) = self.json.get(key).filter(|v| !v.is_null()) else {
            return Ok(default);
        };
        if let Some(x) = value.as_f64() {
            return Ok([x; 3]);
        }
        let numbers: Option<Vec<f64>> = value
            .as_array()
            .map(|items| items.iter().map(Value::as_f64).collect())
            .unwrap_or(None);
        match numbers.as_deref() {
            Some([a, b, c]) => Ok([*a, *b, *c]),
            _ => Err(self.error(format!(
                "key '{key}' must be a number or three numbers, found {value}"
            ))),
        }
    }
}

impl ImageProcessor {
    /// Reads `dir/preprocessor_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, EmbedError> {
        Self::from_file(&dir.join(PREPROCESSOR_CONFIG))
    }

    /// Reads a processor config; its `image_processor_type` (or the older
    /// `feature_extractor_type`) must name a CLIP or ViT processor.
    pub fn from_file(file: &Path) -> Result<Self, EmbedError> {
        let json = super::read_json(file)?;
        let family = family_of(file, &json)?;
        let reader = Reader {
            file,
            json: &json,
            family,
        };
        let is_clip = family == Family::Clip;
        let resize = match reader.flag("do_resize", true)? {
            true => Some((reader.size()?, reader.filter()?)),
            false => None,
        };
        let crop = match reader.flag("do_center_crop", is_clip)? {
            true => {
                let value = json
                    .get("crop_size")
                    .cloned()
                    .unwrap_or(serde_json::json!(224));
                Some(reader.height_width("crop_size", &value)?)
            }
            false => None,
        };
        let rescale = match reader.flag("do_rescale", true)? {
            true => Some(match json.get("rescale_factor").and_then(Value::as_f64) {
                Some(factor) => factor,
                None => DEFAULT_RESCALE,
            }),
            false => None,
        };
        let (mean, std) = match family {
            Family::Clip => (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
            Family::Vit => (IMAGENET_STANDARD, IMAGENET_STANDARD),
        };
        let normalize = match reader.flag("do_normalize", true)? {
            true => Some((
                reader.triple("image_mean", mean)?,
                reader.triple("image_std", std)?,
            )),
            false => None,
        };
        Ok(Self {
            resize,
            crop,
            rescale,
            normalize,
        })
    }

    /// The [3, height, width] float32 pixel values of one RGB image.
    pub fn pixel_values(&self, image: &Rgb8) -> Tensor {
        let mut current = image.clone();
        if let Some((to, filter)) = self.resize {
            let (height, width) = output_size(current.height, current.width, to);
            current = resize(&current, width, height, filter);
        }
        if let Some((height, width)) = self.crop {
            current = center_crop(&current, height, width);
        }
        let (height, width) = (current.height, current.width);
        let mut values = vec![0f32; 3 * height * width];
        for (index, &byte) in current.pixels.iter().enumerate() {
            let channel = index % 3;
            let mut value = match self.rescale {
                Some(factor) => (f64::from(byte) * factor) as f32,
                None => f32::from(byte),
            };
            if let Some((mean, std)) = self.normalize {
                value = (value - mean[channel] as f32) / std[channel] as f32;
            }
            values[channel * height * width + index / 3] = value;
        }
        Tensor::from_slice(&values).view([3, height as i64, width as i64])
    }

    /// The (height, width) of [`Self::pixel_values`] for any input (the crop, else the resize).
    pub fn output_side(&self) -> Option<(usize, usize)> {
        match (self.crop, self.resize) {
            (Some(crop), _) => Some(crop),
            (None, Some((ResizeTo::Exact { height, width }, _))) => Some((height, width)),
            _ => None,
        }
    }
}

fn family_of(file: &Path, json: &Value) -> Result<Family, EmbedError> {
    let name = ["image_processor_type", "feature_extractor_type"]
        .iter()
        .find_map(|key| json.get(*key).and_then(Value::as_str))
        .unwrap_or("");
    if name.starts_with("CLIP") {
        Ok(Family::Clip)
    } else if name.starts_with("ViT") {
        Ok(Family::Vit)
    } else {
        Err(EmbedError::Config {
            file: file.to_path_buf(),
            reason: format!(
                "key 'image_processor_type' is '{name}'; supported: CLIPImageProcessor and ViTImageProcessor (or their FeatureExtractor names)"
            ),
        })
    }
}

/// transformers' `get_resize_output_image_size(default_to_square=False)` for a shortest edge.
pub fn output_size(height: usize, width: usize, to: ResizeTo) -> (usize, usize) {
    match to {
        ResizeTo::Exact { height, width } => (height, width),
        ResizeTo::ShortestEdge(size) => {
            let (short, long) = if width <= height {
                (width, height)
            } else {
                (height, width)
            };
            let new_long = (size as f64 * long as f64 / short as f64) as usize;
            if width <= height {
                (new_long, size)
            } else {
                (size, new_long)
            }
        }
    }
}

/// transformers' `center_crop`: top-left at `floor((side - crop) / 2)`; parts outside the
/// image (a crop larger than the image) are zero.
fn center_crop(image: &Rgb8, height: usize, width: usize) -> Rgb8 {
    let top = (image.height as i64 - height as i64).div_euclid(2);
    let left = (image.width as i64 - width as i64).div_euclid(2);
    let mut pixels = vec![0u8; height * width * 3];
    for y in 0..height {
        let sy = top + y as i64;
        if sy < 0 || sy >= image.height as i64 {
            continue;
        }
        for x in 0..width {
            let sx = left + x as i64;
            if sx < 0 || sx >= image.width as i64 {
                continue;
            }
            let source = (sy as usize * image.width + sx as usize) * 3;
            pixels[(y * width + x) * 3..][..3].copy_from_slice(&image.pixels[source..source + 3]);
        }
    }
    Rgb8 {
        width,
        height,
        pixels,
    }
}

/// Decodes an image file (PNG, JPEG, WebP; the shared size limit and EXIF orientation of
/// `dreampipe_core::imagefile`) to 8-bit RGB: alpha dropped, grey expanded, as PIL's
/// `convert("RGB")`.
pub fn read_rgb(file: &Path) -> Result<Rgb8, EmbedError> {
    let rgb = dreampipe_core::imagefile::decode_rgb(file).map_err(|reason| EmbedError::Image {
        file: PathBuf::from(file),
        reason,
    })?;
    Ok(Rgb8 {
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        pixels: rgb.into_raw(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_sizes_truncate_like_transformers() {
        // int(224 * 640 / 427) = 335; portrait swaps.
        assert_eq!(
            output_size(427, 640, ResizeTo::ShortestEdge(224)),
            (224, 335)
        );
        assert_eq!(
            output_size(640, 427, ResizeTo::ShortestEdge(224)),
            (335, 224)
        );
        assert_eq!(output_size(50, 50, ResizeTo::ShortestEdge(34)), (34, 34));
    }

    #[test]
    fn a_crop_larger_than_the_image_pads_with_zeros() {
        let image = Rgb8 {
            width: 1,
            height: 1,
            pixels: vec![9, 9, 9],
        };
        let cropped = center_crop(&image, 2, 3);
        // top = floor(-1/2) = -1, left = floor(-2/2) = -1: the pixel lands at (1, 1).
        let mut expected = vec![0u8; 18];
        expected[(3 + 1) * 3..][..3].copy_from_slice(&[9, 9, 9]);
        assert_eq!(cropped.pixels, expected);
    }
}
