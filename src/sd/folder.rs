//! A diffusers Stable Diffusion model folder: reads `model_index.json` (pipeline and component
//! classes), checks that every component the SD pipeline needs is listed and present on disk
//! (config, tokenizer files, a safetensors weights file), and reports which weight variants
//! (`*.fp16.safetensors`, ...) every weighted component has.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The index file at the root of a diffusers pipeline folder.
pub const MODEL_INDEX: &str = "model_index.json";
/// Weights file stem of diffusers models (`diffusion_pytorch_model[.<variant>].safetensors`).
pub const DIFFUSERS_WEIGHTS_STEM: &str = "diffusion_pytorch_model";
/// Weights file stem of transformers models (`model[.<variant>].safetensors`).
pub const TRANSFORMERS_WEIGHTS_STEM: &str = "model";
const SAFETENSORS_SUFFIX: &str = ".safetensors";

/// Components a Stable Diffusion pipeline needs, with the files each must contain and, for
/// models with weights, the weights file stem (diffusers' save_pretrained layout).
const REQUIRED_COMPONENTS: [(&str, &[&str], Option<&str>); 5] = [
    ("unet", &["config.json"], Some(DIFFUSERS_WEIGHTS_STEM)),
    ("vae", &["config.json"], Some(DIFFUSERS_WEIGHTS_STEM)),
    (
        "text_encoder",
        &["config.json"],
        Some(TRANSFORMERS_WEIGHTS_STEM),
    ),
    ("tokenizer", &["vocab.json", "merges.txt"], None),
    ("scheduler", &["scheduler_config.json"], None),
];

/// SDXL's second text encoder and tokenizer, checked like the required ones when listed.
const XL_COMPONENTS: [(&str, &[&str], Option<&str>); 2] = [
    (
        "text_encoder_2",
        &["config.json"],
        Some(TRANSFORMERS_WEIGHTS_STEM),
    ),
    ("tokenizer_2", &["vocab.json", "merges.txt"], None),
];

/// Why a model folder is unusable.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    #[error("{file}: cannot read: {reason} (is this a diffusers model folder?)")]
    Read { file: PathBuf, reason: String },
    #[error("{file}: invalid model index: {reason}")]
    Json { file: PathBuf, reason: String },
    #[error(
        "{file}: component '{component}' is not listed (a Stable Diffusion folder needs unet, vae, text_encoder, tokenizer and scheduler)"
    )]
    Unlisted { file: PathBuf, component: String },
    #[error("{dir}: folder of component '{component}' is missing (model_index.json lists it)")]
    MissingFolder { dir: PathBuf, component: String },
    #[error("{file}: missing (component '{component}' needs it)")]
    MissingFile { file: PathBuf, component: String },
    #[error(
        "{dir}: no weights file {stem}.safetensors or {stem}.<variant>.safetensors for component '{component}' (convert .bin checkpoints to .safetensors)"
    )]
    NoWeights {
        dir: PathBuf,
        stem: String,
        component: String,
    },
}

/// The `[library, class]` pair model_index.json gives a component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentClass {
    pub library: String,
    pub class_name: String,
}

/// An opened, checked diffusers model folder.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    root: PathBuf,
    pipeline_class: Option<String>,
    components: BTreeMap<String, ComponentClass>,
    variants: Vec<String>,
    has_plain_weights: bool,
    /// SDXL: `text_encoder_2` and `tokenizer_2` are listed (and present).
    xl: bool,
    /// SDXL's `force_zeros_for_empty_prompt` (diffusers' default true).
    force_zeros_for_empty_prompt: bool,
}

impl ModelFolder {
    /// Reads `dir/model_index.json` and checks the SD components.
    pub fn open(dir: &Path) -> Result<Self, FolderError> {
        let index_file = dir.join(MODEL_INDEX);
        let index = read_index(&index_file)?;
        let components = component_classes(&index);
        let mut variant_sets = Vec::new();
        let mut has_plain_weights = true;
        for (name, files, stem) in REQUIRED_COMPONENTS {
            if !components.contains_key(name) {
                return Err(FolderError::Unlisted {
                    file: index_file,
                    component: name.to_string(),
                });
            }
            check_component_files(dir, name, files)?;
            if let Some(stem) = stem {
                let weights = weight_files(&dir.join(name), name, stem)?;
                has_plain_weights &= weights.plain;
                variant_sets.push(weights.variants);
            }
        }
        let xl = XL_COMPONENTS
            .iter()
            .all(|(name, _, _)| components.contains_key(*name));
        if xl {
            for (name, files, stem) in XL_COMPONENTS {
                check_component_files(dir, name, files)?;
                if let Some(stem) = stem {
                    let weights = weight_files(&dir.join(name), name, stem)?;
                    has_plain_weights &= weights.plain;
                    variant_sets.push(weights.variants);
                }
            }
        }
        Ok(Self {
            root: dir.to_path_buf(),
            xl,
            force_zeros_for_empty_prompt: index
                .get("force_zeros_for_empty_prompt")
                .and_then(|v| v.as_bool())
                .unwrap_or(true),
            pipeline_class: index
                .get("_class_name")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            components,
            variants: common_variants(variant_sets),
            has_plain_weights,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn unet_dir(&self) -> PathBuf {
        self.root.join("unet")
    }

    pub fn vae_dir(&self) -> PathBuf {
        self.root.join("vae")
    }

    pub fn text_encoder_dir(&self) -> PathBuf {
        self.root.join("text_encoder")
    }

    pub fn tokenizer_dir(&self) -> PathBuf {
        self.root.join("tokenizer")
    }

    pub fn scheduler_dir(&self) -> PathBuf {
        self.root.join("scheduler")
    }

    /// Whether this is an SDXL folder (`text_encoder_2` and `tokenizer_2` listed).
    pub fn is_xl(&self) -> bool {
        self.xl
    }

    pub fn text_encoder_2_dir(&self) -> PathBuf {
        self.root.join("text_encoder_2")
    }

    pub fn tokenizer_2_dir(&self) -> PathBuf {
        self.root.join("tokenizer_2")
    }

    /// SDXL: an empty negative prompt means zero embeddings (`force_zeros_for_empty_prompt`).
    pub fn force_zeros_for_empty_prompt(&self) -> bool {
        self.force_zeros_for_empty_prompt
    }

    /// `_class_name` of model_index.json (e.g. "StableDiffusionPipeline"), if given.
    pub fn pipeline_class(&self) -> Option<&str> {
        self.pipeline_class.as_deref()
    }

    /// The class of a listed component (`None` when unlisted or `[null, null]`).
    pub fn component_class(&self, component: &str) -> Option<&ComponentClass> {
        self.components.get(component)
    }

    /// Weight variants (e.g. "fp16") that unet, vae and text_encoder all have, sorted.
    pub fn variants(&self) -> &[String] {
        &self.variants
    }

    pub fn has_variant(&self, variant: &str) -> bool {
        self.variants.iter().any(|v| v == variant)
    }

    /// Whether unet, vae and text_encoder all have a plain (non-variant) weights file.
    pub fn has_plain_weights(&self) -> bool {
        self.has_plain_weights
    }
}

fn read_index(file: &Path) -> Result<serde_json::Map<String, serde_json::Value>, FolderError> {
    let text = std::fs::read_to_string(file).map_err(|error| FolderError::Read {
        file: file.to_path_buf(),
        reason: error.to_string(),
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|error| FolderError::Json {
            file: file.to_path_buf(),
            reason: error.to_string(),
        })?;
    match json {
        serde_json::Value::Object(map) => Ok(map),
        _ => Err(FolderError::Json {
            file: file.to_path_buf(),
            reason: "expected a JSON object".to_string(),
        }),
    }
}

/// Entries of the form `"name": ["library", "Class"]`; `[null, null]` and `_`-keys are skipped.
fn component_classes(
    index: &serde_json::Map<String, serde_json::Value>,
) -> BTreeMap<String, ComponentClass> {
    index
        .iter()
        .filter(|(name, _)| !name.starts_with('_'))
        .filter_map(|(name, value)| {
            let pair = value.as_array()?;
            let (Some(library), Some(class_name)) = (pair.first()?.as_str(), pair.get(1)?.as_str())
            else {
                return None;
            };
            let class = ComponentClass {
                library: library.to_string(),
                class_name: class_name.to_string(),
            };
            Some((name.clone(), class))
        })
        .collect()
}

fn check_component_files(root: &Path, component: &str, files: &[&str]) -> Result<(), FolderError> {
    let dir = root.join(component);
    if !dir.is_dir() {
        return Err(FolderError::MissingFolder {
            dir,
            component: component.to_string(),
        });
    }
    match files.iter().map(|f| dir.join(f)).find(|f| !f.is_file()) {
        Some(file) => Err(FolderError::MissingFile {
            file,
            component: component.to_string(),
        }),
        None => Ok(()),
    }
}

/// The weights files of one component: whether `<stem>.safetensors` exists and which
/// `<stem>.<variant>.safetensors` do.
struct WeightFiles {
    plain: bool,
    variants: BTreeSet<String>,
}

fn weight_files(dir: &Path, component: &str, stem: &str) -> Result<WeightFiles, FolderError> {
    let entries = std::fs::read_dir(dir).map_err(|error| FolderError::Read {
        file: dir.to_path_buf(),
        reason: error.to_string(),
    })?;
    let names: Vec<String> = entries
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().is_file())
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    let plain_name = format!("{stem}{SAFETENSORS_SUFFIX}");
    let variant_of = |name: &String| {
        let middle = name.strip_prefix(stem)?.strip_prefix('.')?;
        let variant = middle.strip_suffix(SAFETENSORS_SUFFIX)?;
        (!variant.is_empty() && !variant.contains('.')).then(|| variant.to_string())
    };
    let files = WeightFiles {
        plain: names.contains(&plain_name),
        variants: names.iter().filter_map(variant_of).collect(),
    };
    if !files.plain && files.variants.is_empty() {
        return Err(FolderError::NoWeights {
            dir: dir.to_path_buf(),
            stem: stem.to_string(),
            component: component.to_string(),
        });
    }
    Ok(files)
}

fn common_variants(sets: Vec<BTreeSet<String>>) -> Vec<String> {
    let mut sets = sets.into_iter();
    let Some(first) = sets.next() else {
        return Vec::new();
    };
    sets.fold(first, |common, set| &common & &set)
        .into_iter()
        .collect()
}
