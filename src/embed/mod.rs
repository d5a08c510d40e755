//! Image and text embedding models for evaluating generated images (the `evaluate` stage): the
//! image preprocessing of transformers' CLIP / ViT image processors (`preprocess`, PIL's
//! resampling in `resample`), transformers' `CLIPModel` vision tower and projections on top of
//! the SD text encoder (`clip_model`), and `ViTModel` for DINO's [CLS] embedding (`vit`).
pub mod clip_model;
pub mod init;
pub mod preprocess;
pub mod resample;
pub mod vit;

use std::path::PathBuf;

/// Why an embedding model or its image processor could not be read, loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("{file}: cannot read: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error("{file}: {reason}")]
    Config { file: PathBuf, reason: String },
    /// `reason` already names the file (`dreampipe_core::imagefile`'s messages).
    #[error("{reason}")]
    Image { file: PathBuf, reason: String },
    #[error(transparent)]
    Weights(#[from] crate::sd::weights::WeightsError),
    #[error(transparent)]
    Text(#[from] crate::sd::clip::ClipError),
    #[error(transparent)]
    Tokenizer(#[from] crate::sd::tokenizer::TokenizerError),
}

/// Reads a JSON file into a value, naming the file in errors.
pub(crate) fn read_json(file: &std::path::Path) -> Result<serde_json::Value, EmbedError> {
    let text = std::fs::read_to_string(file).map_err(|e| EmbedError::Read {
        file: file.to_path_buf(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| EmbedError::Config {
        file: file.to_path_buf(),
        reason: format!("invalid JSON: {e}"),
    })
}
