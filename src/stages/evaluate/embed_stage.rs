//! The `embed` stage (schema: `dreampipe_kinds::sd::embed`): writes the CLIP and
//! DINO embeddings of a set of images as a cached result, and reads such a result back for an
//! `evaluate` stage whose `real:` names it — refusing one made with other models.
use super::super::sd_common::{field_error, write_manifest};
use super::super::{StageContext, StageError};
use super::embedders::{Embedders, Embeddings};
use super::{inputs, memo};
use dreampipe_core::field;
use dreampipe_kinds::sd::embed::EmbedParams;
use dreampipe_kinds::sd::evaluate::EvaluateParams;
use serde_json::{Value, json};
use std::path::Path;

/// The output files.
const EMBEDDINGS_FILE: &str = "embeddings.safetensors";
const MANIFEST_FILE: &str = "manifest.json";

/// The content digest of a model field's input (`None` when unknown).
fn digest(ctx: &StageContext<'_>, field: &str) -> Option<String> {
    ctx.inputs.get(field)?.first()?.digest.clone()
}

/// Runs an `embed` stage.
pub fn run(ctx: &StageContext<'_>) -> Result<(), StageError> {
    let params: EmbedParams = ctx.typed()?;
    let folder = ctx
        .input_paths(field!(EmbedParams, images))
        .first()
        .map(|p| p.to_path_buf())
        .ok_or_else(|| {
            field_error(
                ctx,
                field!(EmbedParams, images),
                "no input given; name an images stage or a folder",
            )
        })?;
    let files = inputs::image_files(ctx, field!(EmbedParams, images), &folder)?;
    let embedders = Embedders::load(ctx, params.batch_size)?;
    let embeddings = embedders.embed(ctx, field!(EmbedParams, images), &files)?;
    memo::write_entry(&ctx.out_dir.join(EMBEDDINGS_FILE), &embeddings)?;
    let names: Vec<String> = files
        .iter()
        .map(|f| crate::cache::hash::relative_name(&folder, f))
        .collect();
    ctx.progress.step(1, 1);
    write_manifest(
        ctx,
        &json!({
            "images": names,
            (field!(EmbedParams, clip_model)): digest(ctx, field!(EmbedParams, clip_model)),
            (field!(EmbedParams, dino_model)): digest(ctx, field!(EmbedParams, dino_model)),
            "random_weights": embedders.random_weights,
        }),
    )
}

/// An `embed` stage's output in `folder`, for an evaluate stage's `real`: `None` when `folder`
/// is not one; an error naming both when its models differ from the evaluate stage's.
pub fn from_output(
    ctx: &StageContext<'_>,
    folder: &Path,
) -> Result<Option<Embeddings>, StageError> {
    let (file, manifest) = (folder.join(EMBEDDINGS_FILE), folder.join(MANIFEST_FILE));
    if !file.is_file() || !manifest.is_file() {
        return Ok(None);
    }
    let bad = |what: String| {
        field_error(
            ctx,
            field!(EvaluateParams, real),
            format!("`{}`: {what}", folder.display()),
        )
    };
    let text = std::fs::read_to_string(&manifest)
        .map_err(|e| bad(format!("cannot read {MANIFEST_FILE}: {e}")))?;
    let json: Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("invalid {MANIFEST_FILE}: {e}")))?;
    for field in [
        field!(EmbedParams, clip_model),
        field!(EmbedParams, dino_model),
    ] {
        let made_with = json.get(field).and_then(Value::as_str).map(str::to_string);
        if made_with != digest(ctx, field) {
            return Err(bad(format!(
                "embedded with another `{field}` than this stage's; give the embed stage the same `{field}`"
            )));
        }
    }
    let count = json
        .get("images")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    memo::read_entry(&file, count).map(Some).ok_or_else(|| {
        bad(format!(
            "{EMBEDDINGS_FILE} does not hold {count} CLIP and DINO rows"
        ))
    })
}
