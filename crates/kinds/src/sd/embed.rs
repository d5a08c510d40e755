//! The `embed` stage: the CLIP image and DINO [CLS] embeddings of a set of images (a subject's
//! real images), as a cached result an `evaluate` stage's `real:` can name, so they are
//! computed once per (models, images) key and reused by every evaluate stage and rerun.
use super::evaluate::DEFAULT_BATCH;
use dreampipe_core::stages::Stage;
use dreampipe_core::stages::params::{Input, Params};
use serde::{Deserialize, Serialize};

/// Largest `batch_size`.
const MAX_BATCH: f64 = 1024.0;

pub struct EmbedKind;

/// An `embed` stage's fields (its table is derived: [`Params`]); the inputs are resolved by
/// the runner (`ctx.inputs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Params)]
#[serde(deny_unknown_fields)]
pub struct EmbedParams {
    /// an images stage or a folder of images
    pub images: Input,
    /// transformers CLIPModel folder, or the stage that wrote one (as evaluate's)
    pub clip_model: Input,
    /// transformers ViTModel folder, or the stage that wrote one (as evaluate's)
    pub dino_model: Input,
    /// images per forward pass (bounds memory; only float rounding may differ)
    #[param(default = DEFAULT_BATCH, range(1.0, MAX_BATCH), not_in_key)]
    pub batch_size: usize,
}

/// The kind's name.
pub const EMBED: &str = "embed";

impl Stage for EmbedKind {
    super::torch_kind_methods!(EmbedParams);
    fn kind(&self) -> &'static str {
        EMBED
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "Embeds images with a CLIP model (image embeddings) and a DINO ViT ([CLS] embeddings), for `evaluate`'s `real`. Output: `embeddings.safetensors` (`clip` [n, d], `dino` [n, d]) and `manifest.json` (the images in order and the models' content digests)."
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
