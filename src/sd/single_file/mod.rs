//! Single-file Stable Diffusion checkpoints (the `.safetensors` files A1111, ComfyUI and model
//! sites use, in the original LDM key layout), in and out. [`import`] turns one into a
//! diffusers folder — the architecture from the file's own dreampipe metadata, else a config
//! folder, else detected (SD 1.x: CLIP ViT-L; SD 2.x: OpenCLIP ViT-H, fused `in_proj`; SDXL:
//! both under `conditioner.embedders`, the second with its `text_projection`) with
//! the bundled configs and tokenizer; [`export`] writes a folder as one file, its configs and
//! tokenizer in the header's metadata so it reads back with nothing else. Names: [`names`].
pub mod names;

use crate::sd::folder::ModelFolder;
use crate::sd::init::{self, Architecture, Component, InitError};
use crate::sd::weights;
use names::{
    CLIP_PREFIX, OPEN_CLIP_PREFIX, TEXT_PROJECTION, UNET_PREFIX, UnetLayout, VAE_PREFIX,
    XL_CLIP_PREFIX, XL_OPEN_CLIP_PREFIX,
};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// The metadata key holding the folder's small files (`{relative path: text}`).
pub const FILES_METADATA: &str = "dreampipe.files";
/// The files a written single file carries in its metadata.
const CARRIED_FILES: [&str; 8] = [
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "tokenizer/vocab.json",
];
/// The tokenizer's merges, also carried.
const MERGES: &str = "tokenizer/merges.txt";
/// SDXL's second text encoder and tokenizer files, also carried for SDXL.
const XL_CARRIED_FILES: [&str; 5] = [
    "text_encoder_2/config.json",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/vocab.json",
    "tokenizer_2/merges.txt",
];
/// Headers larger than this are refused before reading (safetensors' own limit).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Why a single file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SingleFileError {
    #[error(
        "{file}: a pickled checkpoint (.ckpt/.pt/.bin) is not read (it can run code); convert it once with diffusers' `convert_original_stable_diffusion_to_diffusers.py --from_safetensors` or any tool that saves `.safetensors`"
    )]
    Pickle { file: PathBuf },
    #[error("{file}: cannot read: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error("{file}: not a Stable Diffusion 1.x/2.x/XL single file (no `{expected}` tensors)")]
    NotStableDiffusion { file: PathBuf, expected: String },
    #[error(
        "{file}: tensor `{tensor}` is missing (needed for the {component}'s `{diffusers}`); a config folder (`--config`) describing this model's shapes may be needed"
    )]
    Missing {
        file: PathBuf,
        tensor: String,
        component: &'static str,
        diffusers: String,
    },
    #[error(
        "{file}: tensor `{tensor}` has shape {found:?} but the {component} config wants {expected:?}; this is not a standard SD 1.x/2.x shape: pass a diffusers folder with its configs (`--config FOLDER` / `config:`)"
    )]
    Shape {
        file: PathBuf,
        tensor: String,
        component: &'static str,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("{0}")]
    Write(String),
    #[error(transparent)]
    Init(#[from] InitError),
    #[error(transparent)]
    Weights(#[from] weights::WeightsError),
}

/// What the file itself cannot say.
#[derive(Debug, Default, Clone)]
pub struct ImportOptions {
    /// A diffusers folder whose config and tokenizer files (no weights needed) describe it.
    pub config: Option<PathBuf>,
    /// `epsilon` / `v_prediction` (SD 2.x 768 models), written into the scheduler config.
    pub prediction_type: Option<String>,
}

/// Writes the diffusers folder of single file `file` at `out` (through `<out>.partial`).
pub fn import(file: &Path, options: &ImportOptions, out: &Path) -> Result<(), SingleFileError> {
    refuse_pickles(file)?;
    let metadata = read_metadata(file)?;
    let tensors: HashMap<String, Tensor> = weights::read_tensors(file)?.into_iter().collect();
    let layout = TextEncoderLayout::detect(file, &tensors)?;
    let staging = partial_path(out);
    let written = write_configs(file, &metadata, options, layout, &staging)
        .and_then(|()| fill_components(file, &tensors, layout, &staging));
    if let Err(error) = written {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(error);
    }
    let _ = std::fs::remove_dir_all(out);
    std::fs::rename(&staging, out).map_err(|e| {
        SingleFileError::Write(format!("{}: cannot rename into place: {e}", out.display()))
    })
}

/// `<out>.partial-<pid>-<n>`: where an import writes before its rename (unique, so two
/// processes importing the same file never write into one folder).
fn partial_path(out: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    out.with_file_name(format!("{name}.partial-{}-{n}", std::process::id()))
}

fn refuse_pickles(file: &Path) -> Result<(), SingleFileError> {
    let extension = file.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ["ckpt", "pt", "pth", "bin"].contains(&extension.to_ascii_lowercase().as_str()) {
        return Err(SingleFileError::Pickle {
            file: file.to_path_buf(),
        });
    }
    Ok(())
}

/// Which text encoder a single file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderLayout {
    /// SD 1.x: transformers' CLIP names under `cond_stage_model.transformer.`.
    Clip,
    /// SD 2.x: OpenCLIP names under `cond_stage_model.model.`, q/k/v fused.
    OpenClip,
    /// SDXL: CLIP names under `conditioner.embedders.0.transformer.` and OpenCLIP names (with
    /// `text_projection`) under `conditioner.embedders.1.model.`.
    Xl,
}

impl TextEncoderLayout {
    fn detect(file: &Path, tensors: &HashMap<String, Tensor>) -> Result<Self, SingleFileError> {
        let has = |prefix: &str| tensors.keys().any(|k| k.starts_with(prefix));
        if !has(UNET_PREFIX) {
            return Err(SingleFileError::NotStableDiffusion {
                file: file.to_path_buf(),
                expected: UNET_PREFIX.to_string(),
            });
        }
        if has(XL_OPEN_CLIP_PREFIX) {
            Ok(Self::Xl)
        } else if has(&format!("{OPEN_CLIP_PREFIX}transformer.")) {
            Ok(Self::OpenClip)
        } else if has(CLIP_PREFIX) {
            Ok(Self::Clip)
        } else {
            Err(SingleFileError::NotStableDiffusion {
                file: file.to_path_buf(),
                expected: "cond_stage_model.".to_string(),
            })
        }
    }

    /// The layout a folder's text encoders are written in: SDXL's for an SDXL folder,
    /// OpenCLIP for SD 2.x's (`gelu`).
    fn of_folder(model: &ModelFolder) -> Result<Self, SingleFileError> {
        if model.is_xl() {
            return Ok(Self::Xl);
        }
        let config = read_config(&model.text_encoder_dir().join("config.json"))?;
        Ok(match config.get("hidden_act").and_then(Value::as_str) {
            Some("gelu") => Self::OpenClip,
            _ => Self::Clip,
        })
    }

    /// The components with weights of this layout's models.
    fn components(self) -> &'static [Component] {
        match self {
            Self::Xl => &Component::ALL_XL,
            _ => &Component::ALL,
        }
    }

    /// The small files a folder of this layout has (configs and tokenizers).
    fn carried_files(self) -> Vec<&'static str> {
        let mut files: Vec<&str> = CARRIED_FILES.iter().copied().chain([MERGES]).collect();
        if self == Self::Xl {
            files.extend(XL_CARRIED_FILES);
        }
        files
    }
}

/// The folder's configs and tokenizer: from the file's metadata, else the config folder, else
/// the bundled SD 1.5 / 2.1 ones.
fn write_configs(
    file: &Path,
    metadata: &BTreeMap<String, String>,
    options: &ImportOptions,
    layout: TextEncoderLayout,
    staging: &Path,
) -> Result<(), SingleFileError> {
    if let Some(carried) = metadata.get(FILES_METADATA) {
        let files: BTreeMap<String, String> =
            serde_json::from_str(carried).map_err(|e| SingleFileError::Read {
                file: file.to_path_buf(),
                reason: format!("metadata `{FILES_METADATA}`: {e}"),
            })?;
        for (relative, text) in &files {
            write_file(&staging.join(relative), text.as_bytes())?;
        }
    } else if let Some(folder) = &options.config {
        for relative in layout.carried_files() {
            let source = folder.join(relative);
            let text = std::fs::read(&source).map_err(|e| SingleFileError::Read {
                file: source.clone(),
                reason: format!(
                    "{e} (the config folder must hold the diffusers configs and tokenizer)"
                ),
            })?;
            write_file(&staging.join(relative), &text)?;
        }
    } else {
        let architecture = match layout {
            TextEncoderLayout::Clip => Architecture::Sd15,
            TextEncoderLayout::OpenClip => Architecture::Sd21,
            TextEncoderLayout::Xl => Architecture::Sdxl,
        };
        init::write_configs(staging, architecture)?;
    }
    if let Some(prediction) = &options.prediction_type {
        set_prediction_type(&staging.join("scheduler/scheduler_config.json"), prediction)?;
    }
    Ok(())
}

fn set_prediction_type(path: &Path, prediction: &str) -> Result<(), SingleFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| SingleFileError::Read {
        file: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut config: Value = serde_json::from_str(&text).map_err(|e| SingleFileError::Read {
        file: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    config["prediction_type"] = Value::String(prediction.to_string());
    let text = serde_json::to_string_pretty(&config).unwrap_or_default();
    write_file(path, text.as_bytes())
}

/// Builds each component from its config and fills it from the file's tensors.
fn fill_components(
    file: &Path,
    tensors: &HashMap<String, Tensor>,
    layout: TextEncoderLayout,
    staging: &Path,
) -> Result<(), SingleFileError> {
    for &component in layout.components() {
        let vs = init::build_component(staging, component)?;
        let mapper = NameMapper::for_component(staging, component, layout)?;
        let _guard = tch::no_grad_guard();
        for (name, mut variable) in vs.variables() {
            let value = mapper.fetch(file, tensors, &name, &variable.size())?;
            variable.copy_(&value.to_kind(variable.kind()));
        }
        let dir = staging.join(component.folder());
        let target = dir.join(format!("{}.safetensors", component.weights_stem()));
        weights::save_var_store(&vs, &target, None)?;
    }
    Ok(())
}

/// Maps one component's diffusers names to single-file names, from its config.
enum NameMapper {
    Unet(UnetLayout),
    Vae {
        up_blocks: usize,
    },
    TextEncoder(TextEncoderLayout),
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl NameMapper {
    fn for_component(
        root: &Path,
        component: Component,
        layout: TextEncoderLayout,
    ) -> Result<Self, SingleFileError> {
        let config = read_config(&root.join(component.folder()).join("config.json"))?;
        let blocks = |key: &str| -> Vec<String> {
            (config
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten())
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
        };
        Ok(match component {
            Component::Unet => Self::Unet(UnetLayout {
                layers_per_block: config["layers_per_block"].as_u64().unwrap_or(2) as usize,
                down_attention: (blocks("down_block_types").iter())
                    .map(|b| b.contains("CrossAttn"))
                    .collect(),
                up_attention: (blocks("up_block_types").iter())
                    .map(|b| b.contains("CrossAttn"))
                    .collect(),
            }),
            Component::Vae => Self::Vae {
                up_blocks: blocks("up_block_types").len(),
            },
            Component::TextEncoder => Self::TextEncoder(layout),
            Component::TextEncoder2 => Self::TextEncoder2,
        })
    }

    fn component(&self) -> &'static str {
        match self {
            Self::Unet(_) => "UNet",
            Self::Vae { .. } => "VAE",
            Self::TextEncoder(_) => "text encoder",
            Self::TextEncoder2 => "second text encoder",
        }
    }

    /// The single-file name of a diffusers tensor, and which third of a fused q/k/v it is.
    fn single_file_name(&self, name: &str) -> Option<(String, Option<usize>)> {
        match self {
            Self::Unet(layout) => {
                names::unet_name(name, layout).map(|n| (format!("{UNET_PREFIX}{n}"), None))
            }
            Self::Vae { up_blocks } => {
                names::vae_name(name, *up_blocks).map(|n| (format!("{VAE_PREFIX}{n}"), None))
            }
            Self::TextEncoder(TextEncoderLayout::Clip) => {
                Some((format!("{CLIP_PREFIX}{name}"), None))
            }
            Self::TextEncoder(TextEncoderLayout::OpenClip) => names::open_clip_name(name)
                .map(|(n, third)| (format!("{OPEN_CLIP_PREFIX}{n}"), third)),
            Self::TextEncoder(TextEncoderLayout::Xl) => {
                Some((format!("{XL_CLIP_PREFIX}{name}"), None))
            }
            Self::TextEncoder2 => names::open_clip_name(name)
                .map(|(n, third)| (format!("{XL_OPEN_CLIP_PREFIX}{n}"), third)),
        }
    }

    /// The value of diffusers tensor `name` (shape `shape`) from the file's tensors.
    fn fetch(
        &self,
        file: &Path,
        tensors: &HashMap<String, Tensor>,
        name: &str,
        shape: &[i64],
    ) -> Result<Tensor, SingleFileError> {
        let missing = |tensor: String| SingleFileError::Missing {
            file: file.to_path_buf(),
            tensor,
            component: self.component(),
            diffusers: name.to_string(),
        };
        let (stored, third) = self
            .single_file_name(name)
            .ok_or_else(|| missing(format!("(no single-file name for `{name}`)")))?;
        let found = tensors
            .get(&stored)
            .ok_or_else(|| missing(stored.clone()))?;
        let mut value = match third {
            Some(third) => found.chunk(3, 0)[third].shallow_clone(),
            None => found.shallow_clone(),
        };
        if matches!(self, Self::Vae { .. })
            && names::is_vae_attention_weight(name)
            && value.dim() == 4
        {
            value = value.flatten(1, 3);
        }
        if name == TEXT_PROJECTION {
            value = value.t_copy();
        }
        if value.size() != shape {
            return Err(SingleFileError::Shape {
                file: file.to_path_buf(),
                tensor: stored,
                component: self.component(),
                expected: shape.to_vec(),
                found: value.size(),
            });
        }
        Ok(value)
    }
}

/// Writes the diffusers folder `folder` as one single file at `file`, tensors in `kind`
/// (Float, Half or BFloat16), its configs and tokenizer in the metadata.
pub fn export(folder: &Path, file: &Path, kind: Kind) -> Result<(), SingleFileError> {
    let model = ModelFolder::open(folder).map_err(|e| SingleFileError::Write(e.to_string()))?;
    let layout = TextEncoderLayout::of_folder(&model)?;
    let mut out: Vec<(String, Tensor)> = Vec::new();
    for &component in layout.components() {
        let dir = folder.join(component.folder());
        let weights_file = weights::find_weights_file(&dir, component.weights_stem(), None)?;
        let mapper = NameMapper::for_component(folder, component, layout)?;
        let mut fused: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
        for (name, tensor) in weights::read_tensors(&weights_file)? {
            if name.ends_with("position_ids") {
                continue; // a buffer, not a weight
            }
            // transformers 5 writes CLIPTextModel without its `text_model.` prefix.
            let name = match component {
                Component::TextEncoder | Component::TextEncoder2
                    if !name.starts_with("text_model.") && name != TEXT_PROJECTION =>
                {
                    format!("text_model.{name}")
                }
                _ => name,
            };
            let Some((stored, third)) = mapper.single_file_name(&name) else {
                continue; // buffers such as position_ids
            };
            let mut value = tensor.to_kind(kind);
            if matches!(mapper, NameMapper::Vae { .. }) && names::is_vae_attention_weight(&name) {
                value = value.reshape([value.size()[0], value.size()[1], 1, 1]);
            }
            if name == TEXT_PROJECTION {
                value = value.t_copy();
            }
            match third {
                Some(third) => fused.entry(stored).or_default()[third] = Some(value),
                None => out.push((stored, value)),
            }
        }
        for (stored, parts) in fused {
            let [Some(q), Some(k), Some(v)] = parts else {
                return Err(SingleFileError::Write(format!(
                    "{}: `{stored}` lacks one of q/k/v in the text encoder",
                    folder.display()
                )));
            };
            out.push((stored, Tensor::cat(&[q, k, v], 0)));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    let metadata = carried_files(folder, layout)?;
    weights::write_safetensors_with_metadata(&out, file, &metadata).map_err(SingleFileError::Write)
}

/// `{FILES_METADATA: {relative path: text}}` of the folder's configs and tokenizer.
fn carried_files(
    folder: &Path,
    layout: TextEncoderLayout,
) -> Result<BTreeMap<String, String>, SingleFileError> {
    let mut files = BTreeMap::new();
    for relative in layout.carried_files() {
        let path = folder.join(relative);
        let text = std::fs::read_to_string(&path).map_err(|e| SingleFileError::Read {
            file: path.clone(),
            reason: e.to_string(),
        })?;
        files.insert(relative.to_string(), text);
    }
    let carried = serde_json::to_string(&files).unwrap_or_default();
    Ok(BTreeMap::from([
        (FILES_METADATA.to_string(), carried),
        ("format".to_string(), "pt".to_string()),
    ]))
}

/// The `__metadata__` of a safetensors file's header (empty when it has none).
pub fn read_metadata(file: &Path) -> Result<BTreeMap<String, String>, SingleFileError> {
    let failed = |reason: String| SingleFileError::Read {
        file: file.to_path_buf(),
        reason,
    };
    let mut handle = std::fs::File::open(file).map_err(|e| failed(e.to_string()))?;
    let mut length = [0u8; 8];
    handle
        .read_exact(&mut length)
        .map_err(|e| failed(format!("not a safetensors file ({e})")))?;
    let length = u64::from_le_bytes(length);
    if length > MAX_HEADER_BYTES {
        return Err(failed(format!(
            "header of {length} bytes (not a safetensors file?)"
        )));
    }
    let mut header = vec![0u8; length as usize];
    handle
        .read_exact(&mut header)
        .map_err(|e| failed(format!("truncated header ({e})")))?;
    let header: Value =
        serde_json::from_slice(&header).map_err(|e| failed(format!("header: {e}")))?;
    Ok((header
        .get("__metadata__")
        .and_then(Value::as_object)
        .into_iter()
        .flatten())
    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
    .collect())
}

fn read_config(path: &Path) -> Result<Value, SingleFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| SingleFileError::Read {
        file: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| SingleFileError::Read {
        file: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), SingleFileError> {
    let write = |e: std::io::Error| SingleFileError::Write(weights::write_error(path, &e));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(write)?;
    }
    std::fs::write(path, bytes).map_err(write)
}
