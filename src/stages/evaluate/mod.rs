//! Runs an `evaluate` stage (its schema: `dreampipe_kinds::sd::evaluate`): embeds
//! the generated images and the real ones (the latter through the shared-cache memo), scores
//! every generated image and writes `scores.json`.
pub mod embed_stage;
pub mod embedders;
pub mod inputs;
pub mod memo;
pub mod scores;

use super::sd_common::field_error;
use super::{StageContext, StageError};
use dreampipe_core::field;
use dreampipe_kinds::sd::evaluate::EvaluateParams;
use embedders::Embedders;
use scores::{Scored, mean_cosine, scores_json, without_identifier};
use std::collections::BTreeMap;

/// Runs the stage.
pub fn run(ctx: &StageContext<'_>) -> Result<(), StageError> {
    let params: EvaluateParams = ctx.typed()?;
    let generated = inputs::generated_images(ctx, params.prompt.as_deref())?;
    let started = std::time::Instant::now();
    let embedders = Embedders::load(ctx, params.batch_size)?;
    ctx.log.line(&format!(
        "models loaded in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let real_embeddings = real_embeddings(ctx, &embedders)?;
    let paths: Vec<_> = generated.iter().map(|g| g.path.clone()).collect();
    let started = std::time::Instant::now();
    let embeddings = embedders.embed(ctx, field!(EvaluateParams, generated), &paths)?;
    let seconds = started.elapsed().as_secs_f64();
    ctx.log.line(&format!(
        "{} generated images embedded in {seconds:.1} s",
        paths.len()
    ));
    let identifier = params.identifier.as_str();
    let texts = text_embeddings(ctx, &embedders, &generated, identifier)?;
    let class_prompt = params.class_prompt.as_str();
    let scored: Vec<Scored> = generated
        .iter()
        .enumerate()
        .map(|(index, image)| Scored {
            file: image.file.clone(),
            model: image.model.clone(),
            prompt: image.prompt.clone(),
            class_prompt: !class_prompt.is_empty() && image.prompt == class_prompt,
            dino: mean_cosine(&embeddings.dino[index], &real_embeddings.dino),
            clip_i: mean_cosine(&embeddings.clip[index], &real_embeddings.clip),
            clip_t: scores::cosine(
                &texts[&without_identifier(&image.prompt, identifier)],
                &embeddings.clip[index],
            ),
        })
        .collect();
    ctx.progress.step(1, 1);
    let mut document = scores_json(&scored);
    document["random_weights"] = serde_json::json!(embedders.random_weights);
    let path = ctx.out_dir.join("scores.json");
    let text = serde_json::to_string_pretty(&document)
        .map_err(|e| StageError::serialize(ctx.stage_id, "scores", e))?;
    std::fs::write(&path, text + "\n").map_err(|e| StageError::io("write", &path, e))?;
    Ok(())
}

/// The real images' embeddings: an `embed` stage's output, or computed (once per models and
/// images, through the shared memo) from an images stage or folder.
fn real_embeddings(
    ctx: &StageContext<'_>,
    embedders: &Embedders,
) -> Result<embedders::Embeddings, StageError> {
    let folder = ctx
        .input_paths(field!(EvaluateParams, real))
        .first()
        .map(|p| p.to_path_buf())
        .ok_or_else(|| {
            field_error(
                ctx,
                field!(EvaluateParams, real),
                "no input given; name an images or embed stage, or a folder",
            )
        })?;
    if let Some(found) = embed_stage::from_output(ctx, &folder)? {
        ctx.log.line(&format!(
            "real embeddings: from the embed stage output {}",
            folder.display()
        ));
        return Ok(found);
    }
    let real = inputs::real_images(ctx, &folder)?;
    memo::real_embeddings(ctx, embedders, &real)
}

/// The CLIP text embedding of each distinct prompt, identifier removed.
fn text_embeddings(
    ctx: &StageContext<'_>,
    embedders: &Embedders,
    generated: &[inputs::GeneratedImage],
    identifier: &str,
) -> Result<BTreeMap<String, Vec<f32>>, StageError> {
    let mut texts = BTreeMap::new();
    for image in generated {
        let prompt = without_identifier(&image.prompt, identifier);
        if texts.contains_key(&prompt) {
            continue;
        }
        let embedding = embedders
            .clip
            .text_embeds(&prompt, embedders.device)
            .map_err(|e| field_error(ctx, field!(EvaluateParams, clip_model), e))?;
        let values = embedders::rows(&embedding.unsqueeze(0)).remove(0);
        texts.insert(prompt, values);
    }
    Ok(texts)
}
