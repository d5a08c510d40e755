//! Random-weight embedding-model folders of the real shapes (`dreampipe model init --like
//! clip-l14 | clip-b32 | dino-s16`, and the test fixtures' `clip-tiny` / `dino-tiny` for quick
//! runs such as the demo), so an `evaluate` stage runs anywhere without downloads:
//! the published config and preprocessor files of openai/clip-vit-large-patch14,
//! openai/clip-vit-base-patch32 and facebook/dino-vits16 (the ViT without its unused pooler),
//! the CLIP tokenizer, seeded random weights (transformers-like: linear and embedding weights
//! ~ N(0, 0.02), zero biases, unit LayerNorms) and a `dreampipe_random_weights.json` marker,
//! which the `evaluate` stage reports (their numbers mean nothing).
use super::clip_model::{self, ClipModelConfig};
use super::vit::{self, VitConfig};
use crate::sd::init::{CLIP_MERGES, CLIP_VOCAB, InitError, WeightDtype};
use crate::sd::weights;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor, nn::VarStore};

/// The marker file a random-weight folder carries.
pub const RANDOM_WEIGHTS_MARKER: &str = "dreampipe_random_weights.json";
/// Standard deviation of the random weights (transformers' `initializer_range` default).
const WEIGHT_STD: f64 = 0.02;

/// An embedding model whose configs ship with the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbedArchitecture {
    ClipL14,
    ClipB32,
    DinoS16,
    /// The test fixtures' tiny CLIP (tests/fixtures/eval/clip-tiny, the tiny SD vocabulary).
    ClipTiny,
    /// The test fixtures' tiny ViT (tests/fixtures/eval/dino-tiny).
    DinoTiny,
}

impl EmbedArchitecture {
    pub fn name(self) -> &'static str {
        match self {
            Self::ClipL14 => "clip-l14",
            Self::ClipB32 => "clip-b32",
            Self::DinoS16 => "dino-s16",
            Self::ClipTiny => "clip-tiny",
            Self::DinoTiny => "dino-tiny",
        }
    }

    /// (config.json, preprocessor_config.json) as published.
    fn files(self) -> (&'static str, &'static str) {
        let clip_processor = include_str!("architectures/clip-preprocessor.json");
        match self {
            Self::ClipL14 => (include_str!("architectures/clip-l14.json"), clip_processor),
            Self::ClipB32 => (include_str!("architectures/clip-b32.json"), clip_processor),
            Self::DinoS16 => (
                include_str!("architectures/dino-s16.json"),
                include_str!("architectures/dino-preprocessor.json"),
            ),
            Self::ClipTiny => (
                include_str!("../../tests/fixtures/eval/clip-tiny/config.json"),
                include_str!("../../tests/fixtures/eval/clip-tiny/preprocessor_config.json"),
            ),
            Self::DinoTiny => (
                include_str!("../../tests/fixtures/eval/dino-tiny/config.json"),
                include_str!("../../tests/fixtures/eval/dino-tiny/preprocessor_config.json"),
            ),
        }
    }

    fn is_clip(self) -> bool {
        !matches!(self, Self::DinoS16 | Self::DinoTiny)
    }

    /// The tokenizer files (vocab.json, merges.txt) of a CLIP architecture.
    fn tokenizer(self) -> (&'static [u8], &'static [u8]) {
        match self {
            Self::ClipTiny => (
                include_bytes!("../../models/tiny-sd/tokenizer/vocab.json"),
                include_bytes!("../../models/tiny-sd/tokenizer/merges.txt"),
            ),
            _ => (CLIP_VOCAB, CLIP_MERGES),
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct EmbedReport {
    pub file: PathBuf,
    pub parameters: i64,
}

fn write(path: &Path, contents: &[u8]) -> Result<(), InitError> {
    std::fs::write(path, contents).map_err(|e| InitError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Writes the config, preprocessor, tokenizer (CLIP) and marker files into `dir`.
pub fn write_configs(
    dir: &Path,
    architecture: EmbedArchitecture,
    seed: u64,
) -> Result<(), InitError> {
    std::fs::create_dir_all(dir).map_err(|e| InitError::Write {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let (config, processor) = architecture.files();
    write(&dir.join("config.json"), config.as_bytes())?;
    write(&dir.join("preprocessor_config.json"), processor.as_bytes())?;
    if architecture.is_clip() {
        let (vocab, merges) = architecture.tokenizer();
        write(&dir.join("vocab.json"), vocab)?;
        write(&dir.join("merges.txt"), merges)?;
    }
    let marker = serde_json::json!({"like": architecture.name(), "seed": seed});
    write(
        &dir.join(RANDOM_WEIGHTS_MARKER),
        format!("{marker:#}\n").as_bytes(),
    )
}

/// The model's variables for the written config, zero-filled.
fn build(dir: &Path, architecture: EmbedArchitecture) -> Result<VarStore, InitError> {
    let config = dir.join("config.json");
    let invalid = |e: super::EmbedError| InitError::Config {
        file: config.clone(),
        reason: e.to_string(),
    };
    let vs = VarStore::new(Device::Cpu);
    if architecture.is_clip() {
        let config = ClipModelConfig::from_file(&config).map_err(invalid)?;
        clip_model::Parts::new(vs.root(), &config);
    } else {
        let config = VitConfig::from_file(&config).map_err(invalid)?;
        vit::build(vs.root(), &config);
    }
    Ok(vs)
}

/// Fills every variable: LayerNorm weights 1, biases 0, everything else N(0, 0.02).
fn fill(vs: &VarStore) {
    let _guard = tch::no_grad_guard();
    let mut names: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, mut variable) in names {
        let is_norm = name.contains("norm") || name.contains("layrnorm");
        let value = if name.ends_with(".bias") {
            variable.zeros_like()
        } else if is_norm {
            variable.ones_like()
        } else {
            Tensor::randn(variable.size(), (Kind::Float, Device::Cpu)) * WEIGHT_STD
        };
        variable.copy_(&value);
    }
}

/// Writes a complete random-weight folder into `out` (created; must not hold a config yet).
pub fn write_folder(
    out: &Path,
    architecture: EmbedArchitecture,
    seed: u64,
    dtype: WeightDtype,
) -> Result<EmbedReport, InitError> {
    if out.join("config.json").exists() {
        return Err(InitError::OutputNotEmpty {
            dir: out.to_path_buf(),
        });
    }
    write_configs(out, architecture, seed)?;
    let vs = build(out, architecture)?;
    tch::manual_seed(seed as i64);
    fill(&vs);
    let file = out.join("model.safetensors");
    weights::save_var_store(&vs, &file, Some(dtype.kind()))?;
    Ok(EmbedReport {
        file,
        parameters: crate::sd::init::parameter_count(&vs),
    })
}

/// Whether `dir` was written by [`write_folder`].
pub fn has_random_weights(dir: &Path) -> bool {
    dir.join(RANDOM_WEIGHTS_MARKER).is_file()
}
