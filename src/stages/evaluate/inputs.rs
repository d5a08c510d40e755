//! The images an `evaluate` (or `world_score`) stage scores: generated images with their variant
//! label and prompt (from each input's `manifest.json` — sample_grid, generate, images and
//! toy_world stages write one, toy_world's with a `caption` per image — or,
//! for a plain folder, its image files with the `prompt` field), and the real images (an images
//! stage's `images/` or a folder).
use super::super::sd_common::field_error;
use super::super::{ResolvedInput, StageContext, StageError};
use dreampipe_core::field;
use dreampipe_core::imagefile;
use dreampipe_kinds::sd::evaluate::EvaluateParams;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A generated image to score.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub path: PathBuf,
    /// As `scores.json` names it: the manifest's `file` (prefixed by the input's label when
    /// several inputs are scored).
    pub file: String,
    pub model: String,
    pub prompt: String,
}

/// Every generated image of the `generated` inputs, in input then manifest order.
/// `prompt` is the stage's field: the prompt of images whose input records none.
pub fn generated_images(
    ctx: &StageContext<'_>,
    prompt: Option<&str>,
) -> Result<Vec<GeneratedImage>, StageError> {
    let inputs: Vec<ResolvedInput> = ctx
        .inputs
        .get(field!(EvaluateParams, generated))
        .cloned()
        .unwrap_or_default();
    if inputs.is_empty() {
        return Err(field_error(
            ctx,
            field!(EvaluateParams, generated),
            "no input given; name a sample_grid, generate or images stage, or a folder",
        ));
    }
    let mut images = Vec::new();
    for input in &inputs {
        let prefix = (inputs.len() > 1).then(|| input.label());
        let mut of_input = match input.path.join("manifest.json") {
            manifest if manifest.is_file() => from_manifest(ctx, input, &manifest, prompt)?,
            _ => from_folder(ctx, input, prompt)?,
        };
        if let Some(prefix) = prefix {
            of_input
                .iter_mut()
                .for_each(|i| i.file = format!("{prefix}/{}", i.file));
        }
        images.extend(of_input);
    }
    Ok(images)
}

fn missing_prompt(ctx: &StageContext<'_>, input: &ResolvedInput) -> StageError {
    field_error(
        ctx,
        field!(EvaluateParams, prompt),
        format!(
            "the images of `{}` carry no prompt; set `prompt:` to the prompt they were generated with",
            input.label()
        ),
    )
}

fn from_manifest(
    ctx: &StageContext<'_>,
    input: &ResolvedInput,
    manifest: &Path,
    prompt: Option<&str>,
) -> Result<Vec<GeneratedImage>, StageError> {
    let bad = |what: String| {
        field_error(
            ctx,
            field!(EvaluateParams, generated),
            format!("`{}`: {what}", manifest.display()),
        )
    };
    let text = std::fs::read_to_string(manifest).map_err(|e| bad(format!("cannot read: {e}")))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let entries = json
        .get("images")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no `images` list".into()))?;
    let varying = varying_fields(entries);
    let mut images = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let file = entry
            .get("file")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("image {index} has no `file`")))?;
        if Path::new(file).is_absolute() || file.split('/').any(|part| part == "..") {
            return Err(bad(format!("image {index}: `{file}` leaves the folder")));
        }
        // A toy_world manifest gives each image's caption: the prompt it answers.
        let recorded = entry.get("prompt").or_else(|| entry.get("caption"));
        let entry_prompt = recorded.and_then(Value::as_str).or(prompt);
        images.push(GeneratedImage {
            path: input.path.join(file),
            file: file.to_string(),
            model: row_label(entry, &varying, input),
            prompt: entry_prompt
                .ok_or_else(|| missing_prompt(ctx, input))?
                .to_string(),
        });
    }
    Ok(images)
}

/// The grid-row fields (sample_grid's `scheduler`, `steps`, `guidance`) whose value differs
/// between a manifest's images: each is part of a row's label, as in the grid.
fn varying_fields(entries: &[Value]) -> Vec<&'static str> {
    ["scheduler", "steps", "guidance"]
        .into_iter()
        .filter(|field| {
            let mut values = entries.iter().map(|e| e.get(*field));
            values
                .next()
                .is_some_and(|first| values.any(|v| v != first))
        })
        .collect()
}

/// The variant an image belongs to: its `model` (else the input's label) and, when the grid
/// compares them, its scheduler / steps / guidance (`db · ddim · 50 steps`, the grid's row label).
fn row_label(entry: &Value, varying: &[&str], input: &ResolvedInput) -> String {
    let model = entry
        .get("model")
        .and_then(Value::as_str)
        .map_or_else(|| input.label(), str::to_string);
    let mut parts = vec![model];
    for field in varying {
        let value = entry.get(*field).cloned().unwrap_or(Value::Null);
        let text = value
            .as_str()
            .map_or_else(|| value.to_string(), str::to_string);
        parts.push(match *field {
            "steps" => format!("{text} steps"),
            "guidance" => format!("cfg {text}"),
            _ => text,
        });
    }
    parts.join(" · ")
}

fn from_folder(
    ctx: &StageContext<'_>,
    input: &ResolvedInput,
    prompt: Option<&str>,
) -> Result<Vec<GeneratedImage>, StageError> {
    let prompt = prompt.ok_or_else(|| missing_prompt(ctx, input))?;
    let files = image_files(ctx, field!(EvaluateParams, generated), &input.path)?;
    Ok(files
        .into_iter()
        .map(|path| GeneratedImage {
            file: imagefile_name(&input.path, &path),
            path,
            model: input.label(),
            prompt: prompt.to_string(),
        })
        .collect())
}

fn imagefile_name(root: &Path, path: &Path) -> String {
    crate::cache::hash::relative_name(root, path)
}

/// The image files of a folder, or of its `images/` sub-folder when it has one (an images
/// or generate stage's output); at least one.
pub fn image_files(
    ctx: &StageContext<'_>,
    field: &str,
    folder: &Path,
) -> Result<Vec<PathBuf>, StageError> {
    let images = folder.join(dreampipe_kinds::output::IMAGES_DIR);
    let dir = if images.is_dir() {
        images
    } else {
        folder.to_path_buf()
    };
    let files = imagefile::list_folder(&dir).map_err(|e| field_error(ctx, field, e))?;
    if files.is_empty() {
        return Err(field_error(
            ctx,
            field,
            format!("`{}` holds no image files", dir.display()),
        ));
    }
    Ok(files)
}

/// The real images (`real`) in `folder`, the field's resolved input.
pub fn real_images(ctx: &StageContext<'_>, folder: &Path) -> Result<Vec<PathBuf>, StageError> {
    image_files(ctx, field!(EvaluateParams, real), folder)
}
