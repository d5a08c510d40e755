//! Writing PNGs that carry their generation parameters, in the "parameters" text chunk format
//! that AUTOMATIC1111 and ComfyUI users already read:
//!
//! ```text
//! <prompt>
//! Negative prompt: <negative prompt>
//! Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model hash: 0123456789, ...
//! ```
//! plus dreampipe's own fields (stage key, pipeline) at the end of the settings line.
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

/// The PNG text keyword A1111 writes and reads.
pub const PARAMETERS_KEYWORD: &str = "parameters";
/// The PNG parameters field naming the stage that wrote an image.
pub const STAGE_FIELD: &str = "dreampipe stage";
/// The PNG parameters fields holding the stage key and the pipeline name.
pub const KEY_FIELD: &str = "dreampipe key";
pub const PIPELINE_FIELD: &str = "dreampipe pipeline";

/// What produced an image.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParameters {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    /// A1111's sampler name (e.g. "DDIM", "PNDM", "LMS", "Euler", "Euler a", "DPM++ 2M", "DDPM").
    pub sampler: String,
    pub guidance: f64,
    pub seed: u64,
    pub width: i64,
    pub height: i64,
    /// Short hash of the model weights (first 10 hex digits, like A1111's).
    pub model_hash: String,
    pub model_name: String,
    /// Extra `key: value` pairs (dreampipe stage key, pipeline name, ...).
    pub extra: Vec<(String, String)>,
}

impl GenerationParameters {
    /// Renders the A1111 "parameters" text.
    pub fn to_a1111_text(&self) -> String {
        let mut settings = vec![
            format!("Steps: {}", self.steps),
            format!("Sampler: {}", self.sampler),
            format!("CFG scale: {}", python_float(self.guidance)),
            format!("Seed: {}", self.seed),
            format!("Size: {}x{}", self.width, self.height),
            format!("Model hash: {}", self.model_hash),
            format!("Model: {}", self.model_name),
        ];
        settings.extend(self.extra.iter().map(|(k, v)| settings_field(k, v)));
        let mut text = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            text.push_str(&format!("\nNegative prompt: {}", self.negative_prompt));
        }
        text.push('\n');
        text.push_str(&settings.join(", "));
        text
    }
}

/// Formats like Python's `str(float)` (A1111 writes "CFG scale: 7.0", not "7").
fn python_float(value: f64) -> String {
    if value.is_finite() && value.fract() == 0.0 {
        format!("{value:.1}")
    } else {
        value.to_string()
    }
}

/// One `key: value` item of the settings line, the value quoted when it needs it.
pub fn settings_field(key: &str, value: &str) -> String {
    format!("{key}: {}", quote_if_needed(value))
}

/// A1111 quotes values containing a comma or colon so the settings line stays parseable.
fn quote_if_needed(value: &str) -> String {
    if value.contains(',') || value.contains(':') {
        format!("\"{}\"", value.replace('"', "\\\""))
    } else {
        value.to_string()
    }
}

/// Why a PNG could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum PngError {
    #[error("{path}: cannot write PNG: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("{path}: cannot read PNG: {reason}")]
    Read { path: PathBuf, reason: String },
}

/// Writes 8-bit RGB pixels (row-major, `width * height * 3` bytes) with the parameters chunk.
pub fn write_rgb_png(
    path: &Path,
    rgb: &[u8],
    width: u32,
    height: u32,
    parameters: Option<&GenerationParameters>,
) -> Result<(), PngError> {
    let text = parameters.map(GenerationParameters::to_a1111_text);
    write_png_with_text(path, rgb, width, height, text.as_deref())
}

fn is_latin1(text: &str) -> bool {
    text.chars().all(|c| (c as u32) < 256)
}

/// Reads the "parameters" text chunk of a PNG, if it has one.
pub fn read_parameters_text(path: &Path) -> Result<Option<String>, PngError> {
    let read_error = |reason: String| PngError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|e| read_error(e.to_string()))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder.read_info().map_err(|e| read_error(e.to_string()))?;
    let info = reader.info();
    if let Some(chunk) = info
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == PARAMETERS_KEYWORD)
    {
        return Ok(Some(chunk.text.clone()));
    }
    match info
        .utf8_text
        .iter()
        .find(|c| c.keyword == PARAMETERS_KEYWORD)
    {
        Some(chunk) => chunk
            .get_text()
            .map(Some)
            .map_err(|e| read_error(e.to_string())),
        None => Ok(None),
    }
}

/// Rewrites a PNG written by [`write_rgb_png`] with another "parameters" text (same pixels).
pub fn replace_parameters_text(path: &Path, text: &str) -> Result<(), PngError> {
    let read_error = |reason: String| PngError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|e| read_error(e.to_string()))?;
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .map_err(|e| read_error(e.to_string()))?;
    let (width, height) = (reader.info().width, reader.info().height);
    if reader.info().color_type != png::ColorType::Rgb
        || reader.info().bit_depth != png::BitDepth::Eight
    {
        return Err(read_error("not an 8-bit RGB PNG".to_string()));
    }
    dreampipe_core::imagefile::check(path).map_err(read_error)?; // the image limit, before allocating
    let mut rgb = vec![0u8; width as usize * height as usize * 3];
    reader
        .next_frame(&mut rgb)
        .map_err(|e| read_error(e.to_string()))?;
    let temporary = path.with_extension("restamp.tmp");
    write_png_with_text(&temporary, &rgb, width, height, Some(text))?;
    std::fs::rename(&temporary, path).map_err(|e| PngError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn write_png_with_text(
    path: &Path,
    rgb: &[u8],
    width: u32,
    height: u32,
    text: Option<&str>,
) -> Result<(), PngError> {
    let write_error = |reason: String| PngError::Write {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::create(path).map_err(|e| write_error(e.to_string()))?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    if let Some(text) = text {
        let added = if is_latin1(text) {
            encoder.add_text_chunk(PARAMETERS_KEYWORD.to_string(), text.to_string())
        } else {
            encoder.add_itxt_chunk(PARAMETERS_KEYWORD.to_string(), text.to_string())
        };
        added.map_err(|e| write_error(e.to_string()))?;
    }
    let mut writer = encoder
        .write_header()
        .map_err(|e| write_error(e.to_string()))?;
    writer
        .write_image_data(rgb)
        .map_err(|e| write_error(e.to_string()))?;
    writer.finish().map_err(|e| write_error(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_parameters() -> GenerationParameters {
        GenerationParameters {
            prompt: "a photo of sks dog".to_string(),
            negative_prompt: "blurry".to_string(),
            steps: 50,
            sampler: "DDIM".to_string(),
            guidance: 7.5,
            seed: 1234,
            width: 512,
            height: 512,
            model_hash: "0123456789".to_string(),
            model_name: "tiny-sd".to_string(),
            extra: vec![("dreampipe pipeline".to_string(), "demo".to_string())],
        }
    }

    #[test]
    fn a1111_text_has_prompt_negative_and_settings_lines() {
        assert_eq!(
            sample_parameters().to_a1111_text(),
            "a photo of sks dog\nNegative prompt: blurry\nSteps: 50, Sampler: DDIM, CFG scale: 7.5, \
             Seed: 1234, Size: 512x512, Model hash: 0123456789, Model: tiny-sd, dreampipe pipeline: demo"
        );
    }

    #[test]
    fn whole_guidance_scales_keep_their_decimal_point() {
        let mut parameters = sample_parameters();
        parameters.guidance = 7.0;
        assert!(parameters.to_a1111_text().contains(", CFG scale: 7.0, "));
    }

    #[test]
    fn parameters_chunk_round_trips_latin1_and_utf8() {
        let dir = tempfile::tempdir().unwrap();
        for prompt in ["a dog", "一只狗"] {
            let mut parameters = sample_parameters();
            parameters.prompt = prompt.to_string();
            let path = dir.path().join("x.png");
            write_rgb_png(&path, &[0u8; 2 * 2 * 3], 2, 2, Some(&parameters)).unwrap();
            let text = read_parameters_text(&path).unwrap().unwrap();
            assert_eq!(text, parameters.to_a1111_text());
        }
    }
}
