//! The `embed` stage: the CLIP image and DINO [CLS] embeddings of a set of images (a subject's
//! real images), as a cached result an `evaluate` stage's `real:` can name, so they are
//! computed once per (models, images) key and reused by every evaluate stage and rerun.
use super::evaluate::DEFAULT_BATCH;
use dreampipe_core::stages::params::Input;
use dreampipe_core::stages::{ParamSpec, ParamType, Stage};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Largest `batch_size`.
const MAX_BATCH: f64 = 1024.0;

pub struct EmbedKind;

/// An `embed` stage's fields (its table: [`EmbedKind::schema`]); the inputs are resolved by
/// the runner (`ctx.inputs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedParams {
    pub images: Input,
    pub clip_model: Input,
    pub dino_model: Input,
    pub batch_size: usize,
}

impl Stage for EmbedKind {
    super::torch_kind_methods!();
    fn kind(&self) -> &'static str {
        "embed"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "Embeds images with a CLIP model (image embeddings) and a DINO ViT ([CLS] embeddings), for `evaluate`'s `real`. Output: `embeddings.safetensors` (`clip` [n, d], `dino` [n, d]) and `manifest.json` (the images in order and the models' content digests)."
    }
    fn schema(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::required(
                "images",
                ParamType::PathOrStageRef,
                "an images stage or a folder of images",
            ),
            ParamSpec::required(
                "clip_model",
                ParamType::PathOrStageRef,
                "transformers CLIPModel folder, or the stage that wrote one (as evaluate's)",
            ),
            ParamSpec::required(
                "dino_model",
                ParamType::PathOrStageRef,
                "transformers ViTModel folder, or the stage that wrote one (as evaluate's)",
            ),
            ParamSpec::optional(
                "batch_size",
                ParamType::Integer,
                json!(DEFAULT_BATCH),
                "images per forward pass (bounds memory; only float rounding may differ)",
            )
            .range(1.0, MAX_BATCH)
            .not_in_key(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_the_fields_of_the_struct() {
        dreampipe_core::stages::params::check_table::<EmbedParams>(&EmbedKind.schema()).unwrap();
    }
}
