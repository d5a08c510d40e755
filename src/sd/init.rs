//! Random-weight Stable Diffusion model folders: writes a complete diffusers folder
//! (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`) with the
//! real configs of a known architecture (the tiny test model, SD 1.5, SD 2.1, SDXL base 1.0 —
//! which adds `text_encoder_2/` and `tokenizer_2/`) and seeded random
//! weights, for benchmarks and end-to-end tests without downloading checkpoints.
//!
//! Initialisation follows what the reference libraries do when they build these models from a
//! config: the UNet and the VAE get PyTorch's module defaults (diffusers defines no custom init
//! for them): conv/linear weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), norm weights
//! 1 and biases 0. The text encoder gets transformers' `CLIPPreTrainedModel._init_weights`
//! (normal distributions scaled by hidden size and depth, zero biases, unit LayerNorms).
//! The distributions match; the draw order does not (variables are filled in name order), so the
//! bytes differ from PyTorch's for the same seed.
//!
//! Reproducibility: each component reseeds libtorch's global CPU generator (`tch::manual_seed`)
//! and then draws from it, so the same seed writes the same bytes, provided nothing else in the
//! process draws from that generator meanwhile (building a tch `nn::linear` does).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor, nn::VarStore};

use crate::sd::clip::{ClipError, ClipTextConfig, ClipTextModel};
use crate::sd::folder::{DIFFUSERS_WEIGHTS_STEM, MODEL_INDEX, TRANSFORMERS_WEIGHTS_STEM};
use crate::sd::model_config::ModelError;
use crate::sd::unet::{UNet2DConditionModel, UNetConfig};
use crate::sd::vae::{AutoencoderKL, VaeConfig};
use crate::sd::weights::{self, WeightsError};

/// Name of every model's config file inside its component folder.
const CONFIG_FILE: &str = "config.json";
/// transformers' `CLIPTextConfig.initializer_factor` default.
const DEFAULT_INITIALIZER_FACTOR: f64 = 1.0;
/// Standard deviation of CLIP's token and position embeddings before the factor
/// (transformers' `CLIPPreTrainedModel._init_weights` hard-codes 0.02).
const CLIP_EMBEDDING_STD: f64 = 0.02;

/// A model architecture whose configs ship with the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// The tiny test model of `models/tiny-sd/` (2,014-token vocabulary).
    Tiny,
    /// Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5 configs).
    Sd15,
    /// Stable Diffusion 2.1 (stabilityai/stable-diffusion-2-1 configs).
    Sd21,
    /// Stable Diffusion XL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0 configs).
    Sdxl,
}

impl Architecture {
    pub const ALL: [Architecture; 4] = [
        Architecture::Tiny,
        Architecture::Sd15,
        Architecture::Sd21,
        Architecture::Sdxl,
    ];

    /// The name used on the command line (`tiny`, `sd15`, `sd21`).
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Tiny => "tiny",
            Architecture::Sd15 => "sd15",
            Architecture::Sd21 => "sd21",
            Architecture::Sdxl => "sdxl",
        }
    }

    /// The components with weights, in the order they are written.
    pub fn components(self) -> &'static [Component] {
        match self {
            Architecture::Sdxl => &Component::ALL_XL,
            _ => &Component::ALL,
        }
    }

    /// The files written verbatim into the folder.
    pub fn files(self) -> ArchitectureFiles {
        match self {
            Architecture::Tiny => tiny_files(),
            Architecture::Sd15 => sd15_files(),
            Architecture::Sd21 => sd21_files(),
            Architecture::Sdxl => sdxl_files(),
        }
    }
}

impl std::str::FromStr for Architecture {
    type Err = InitError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|architecture| architecture.name() == name)
            .ok_or_else(|| InitError::UnknownArchitecture(name.to_string()))
    }
}

/// The config and tokenizer files of an architecture, as embedded in the binary.
#[derive(Debug, Clone, Copy)]
pub struct ArchitectureFiles {
    pub model_index: &'static str,
    pub unet: &'static str,
    pub vae: &'static str,
    pub text_encoder: &'static str,
    pub scheduler: &'static str,
    pub tokenizer_config: &'static str,
    pub special_tokens_map: &'static str,
    pub vocab: &'static [u8],
    pub merges: &'static [u8],
    /// SDXL's second text encoder config and tokenizer files.
    pub xl: Option<XlFiles>,
}

/// `text_encoder_2/config.json` and `tokenizer_2/`'s configs (the vocabulary is the first's).
#[derive(Debug, Clone, Copy)]
pub struct XlFiles {
    pub text_encoder_2: &'static str,
    pub tokenizer_2_config: &'static str,
    pub tokenizer_2_special_tokens_map: &'static str,
}

fn sdxl_files() -> ArchitectureFiles {
    ArchitectureFiles {
        model_index: include_str!("architectures/sdxl/model_index.json"),
        unet: include_str!("architectures/sdxl/unet.json"),
        vae: include_str!("architectures/sdxl/vae.json"),
        text_encoder: include_str!("architectures/sdxl/text_encoder.json"),
        scheduler: include_str!("architectures/sdxl/scheduler.json"),
        tokenizer_config: include_str!("architectures/sdxl/tokenizer_config.json"),
        special_tokens_map: include_str!("architectures/sdxl/special_tokens_map.json"),
        vocab: CLIP_VOCAB,
        merges: CLIP_MERGES,
        xl: Some(XlFiles {
            text_encoder_2: include_str!("architectures/sdxl/text_encoder_2.json"),
            tokenizer_2_config: include_str!("architectures/sdxl/tokenizer_2_config.json"),
            tokenizer_2_special_tokens_map: include_str!(
                "architectures/sdxl/tokenizer_2_special_tokens_map.json"
            ),
        }),
    }
}

/// The full CLIP BPE (49,408 tokens, the one SD 1.x and 2.x ship), kept with the test
/// fixtures (see tests/fixtures/sd-tiny/README.md for how it was built).
pub(crate) const CLIP_VOCAB: &[u8] =
    include_bytes!("../../tests/fixtures/sd-tiny/tokenizer-full/vocab.json");
pub(crate) const CLIP_MERGES: &[u8] =
    include_bytes!("../../tests/fixtures/sd-tiny/tokenizer-full/merges.txt");

fn tiny_files() -> ArchitectureFiles {
    ArchitectureFiles {
        model_index: include_str!("../../models/tiny-sd/model_index.json"),
        unet: include_str!("../../models/tiny-sd/unet/config.json"),
        vae: include_str!("../../models/tiny-sd/vae/config.json"),
        text_encoder: include_str!("../../models/tiny-sd/text_encoder/config.json"),
        scheduler: include_str!("../../models/tiny-sd/scheduler/scheduler_config.json"),
        tokenizer_config: include_str!("../../models/tiny-sd/tokenizer/tokenizer_config.json"),
        special_tokens_map: include_str!("../../models/tiny-sd/tokenizer/special_tokens_map.json"),
        vocab: include_bytes!("../../models/tiny-sd/tokenizer/vocab.json"),
        merges: include_bytes!("../../models/tiny-sd/tokenizer/merges.txt"),
        xl: None,
    }
}

fn sd15_files() -> ArchitectureFiles {
    ArchitectureFiles {
        model_index: include_str!("architectures/sd15/model_index.json"),
        unet: include_str!("architectures/sd15/unet.json"),
        vae: include_str!("architectures/sd15/vae.json"),
        text_encoder: include_str!("architectures/sd15/text_encoder.json"),
        scheduler: include_str!("architectures/sd15/scheduler.json"),
        tokenizer_config: include_str!("architectures/sd15/tokenizer_config.json"),
        special_tokens_map: include_str!("architectures/sd15/special_tokens_map.json"),
        vocab: CLIP_VOCAB,
        merges: CLIP_MERGES,
        xl: None,
    }
}

fn sd21_files() -> ArchitectureFiles {
    ArchitectureFiles {
        model_index: include_str!("architectures/sd21/model_index.json"),
        unet: include_str!("architectures/sd21/unet.json"),
        vae: include_str!("architectures/sd21/vae.json"),
        text_encoder: include_str!("architectures/sd21/text_encoder.json"),
        scheduler: include_str!("architectures/sd21/scheduler.json"),
        tokenizer_config: include_str!("architectures/sd21/tokenizer_config.json"),
        special_tokens_map: include_str!("architectures/sd21/special_tokens_map.json"),
        vocab: CLIP_VOCAB,
        merges: CLIP_MERGES,
        xl: None,
    }
}

/// Floating-point type of the written weights. Weights are drawn in float32 and converted, so
/// an f16 folder holds the rounded values of the f32 folder with the same seed. Either way the
/// files have the plain names (`diffusion_pytorch_model.safetensors`, `model.safetensors`),
/// which every loader finds without asking for a variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    F16,
}

impl WeightDtype {
    pub fn kind(self) -> Kind {
        match self {
            WeightDtype::F32 => Kind::Float,
            WeightDtype::F16 => Kind::Half,
        }
    }
}

/// What to write.
#[derive(Debug, Clone, Copy)]
pub struct InitOptions {
    pub architecture: Architecture,
    pub seed: u64,
    pub dtype: WeightDtype,
}

/// The components with weights, in the order they are written (and seeded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Unet,
    Vae,
    TextEncoder,
    /// SDXL's `CLIPTextModelWithProjection`.
    TextEncoder2,
}

impl Component {
    /// SD 1.x / 2.x.
    pub const ALL: [Component; 3] = [Component::Unet, Component::Vae, Component::TextEncoder];
    /// SDXL.
    pub const ALL_XL: [Component; 4] = [
        Component::Unet,
        Component::Vae,
        Component::TextEncoder,
        Component::TextEncoder2,
    ];

    /// Folder name inside the model folder.
    pub fn folder(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Vae => "vae",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }

    /// The weights file's stem (`diffusion_pytorch_model` / `model`).
    pub fn weights_stem(self) -> &'static str {
        match self {
            Component::Unet | Component::Vae => DIFFUSERS_WEIGHTS_STEM,
            Component::TextEncoder | Component::TextEncoder2 => TRANSFORMERS_WEIGHTS_STEM,
        }
    }

    /// Seed of this component's draws: distinct per component, so no two share a stream (the
    /// SD components keep the seeds they had before SDXL's was added).
    fn seed(self, seed: u64) -> i64 {
        let index = Component::ALL_XL
            .iter()
            .position(|c| *c == self)
            .unwrap_or(0) as u64;
        let per_seed = match self {
            Component::TextEncoder2 => Component::ALL_XL.len() as u64,
            _ => Component::ALL.len() as u64,
        };
        seed.wrapping_mul(per_seed).wrapping_add(index) as i64
    }
}

/// What was written for one component.
#[derive(Debug, Clone)]
pub struct ComponentReport {
    pub component: Component,
    pub parameters: i64,
    pub file: PathBuf,
    pub bytes: u64,
}

/// Why a model folder could not be written.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("unknown architecture '{0}'; supported: tiny, sd15, sd21, sdxl")]
    UnknownArchitecture(String),
    #[error("{dir}: output folder exists and is not empty; choose a new folder or delete it first")]
    OutputNotEmpty { dir: PathBuf },
    #[error("{path}: cannot write: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("{file}: invalid config: {reason}")]
    Config { file: PathBuf, reason: String },
    #[error(
        "internal error: no initialisation rule for variable '{variable}' of the {component} (please report this)"
    )]
    NoInitRule {
        variable: String,
        component: &'static str,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Clip(#[from] ClipError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

/// Writes a complete random-weight model folder to `out`, which must not exist or be empty.
/// Everything is written to a sibling staging folder `<out>.partial` first (replacing one left
/// by an interrupted run) and renamed into place at the end, so a failure leaves no
/// half-written `out`.
pub fn write_model_folder(
    out: &Path,
    options: &InitOptions,
) -> Result<Vec<ComponentReport>, InitError> {
    ensure_empty_or_missing(out)?;
    let staging = staging_dir(out);
    remove_dir_if_present(&staging)?;
    let result = write_configs(&staging, options.architecture).and_then(|()| {
        (options.architecture.components().iter())
            .map(|&component| write_random_weights(&staging, component, options))
            .collect::<Result<Vec<_>, _>>()
    });
    let reports = match result {
        Ok(reports) => reports,
        Err(error) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(error);
        }
    };
    if out.is_dir() {
        std::fs::remove_dir(out).map_err(|e| write_error(out, e))?;
    }
    std::fs::rename(&staging, out).map_err(|e| write_error(out, e))?;
    Ok(reports
        .into_iter()
        .map(|report| ComponentReport {
            file: out.join(report.file.strip_prefix(&staging).unwrap_or(&report.file)),
            ..report
        })
        .collect())
}

/// Writes `model_index.json`, every component's config and the tokenizer files (no weights).
pub fn write_configs(out: &Path, architecture: Architecture) -> Result<(), InitError> {
    let files = architecture.files();
    let entries: [(&str, &[u8]); 9] = [
        (MODEL_INDEX, files.model_index.as_bytes()),
        ("unet/config.json", files.unet.as_bytes()),
        ("vae/config.json", files.vae.as_bytes()),
        ("text_encoder/config.json", files.text_encoder.as_bytes()),
        (
            "scheduler/scheduler_config.json",
            files.scheduler.as_bytes(),
        ),
        (
            "tokenizer/tokenizer_config.json",
            files.tokenizer_config.as_bytes(),
        ),
        (
            "tokenizer/special_tokens_map.json",
            files.special_tokens_map.as_bytes(),
        ),
        ("tokenizer/vocab.json", files.vocab),
        ("tokenizer/merges.txt", files.merges),
    ];
    for (relative, contents) in entries {
        write_file(&out.join(relative), contents)?;
    }
    if let Some(xl) = files.xl {
        let extra: [(&str, &[u8]); 5] = [
            ("text_encoder_2/config.json", xl.text_encoder_2.as_bytes()),
            (
                "tokenizer_2/tokenizer_config.json",
                xl.tokenizer_2_config.as_bytes(),
            ),
            (
                "tokenizer_2/special_tokens_map.json",
                xl.tokenizer_2_special_tokens_map.as_bytes(),
            ),
            ("tokenizer_2/vocab.json", files.vocab),
            ("tokenizer_2/merges.txt", files.merges),
        ];
        for (relative, contents) in extra {
            write_file(&out.join(relative), contents)?;
        }
    }
    Ok(())
}

/// Builds the parameters of `component` from `root/<component>/config.json` (as written by
/// [`write_configs`]) on the CPU, in float32, with placeholder values (zeros; tch's default
/// init for the text encoder's linear layers, which draws from the global generator).
pub fn build_component(root: &Path, component: Component) -> Result<VarStore, InitError> {
    let config = root.join(component.folder()).join(CONFIG_FILE);
    let vs = VarStore::new(Device::Cpu);
    match component {
        Component::Unet => {
            UNet2DConditionModel::new(vs.root(), UNetConfig::from_file(&config)?);
        }
        Component::Vae => {
            AutoencoderKL::new(vs.root(), VaeConfig::from_file(&config)?);
        }
        Component::TextEncoder | Component::TextEncoder2 => {
            ClipTextModel::new(&vs.root(), ClipTextConfig::from_file(&config)?);
        }
    }
    Ok(vs)
}

/// Number of scalar parameters in `vs`.
pub fn parameter_count(vs: &VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}

/// Builds `component` from its written config, fills it with seeded random values and saves it.
fn write_random_weights(
    root: &Path,
    component: Component,
    options: &InitOptions,
) -> Result<ComponentReport, InitError> {
    let vs = build_component(root, component)?;
    tch::manual_seed(component.seed(options.seed));
    let variables: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    match component {
        Component::Unet | Component::Vae => fill_variables(&variables, component, |name| {
            torch_default_init(&variables, name)
        })?,
        Component::TextEncoder | Component::TextEncoder2 => {
            let config = root.join(component.folder()).join(CONFIG_FILE);
            let scales = ClipInitScales::from_config(&config)?;
            fill_variables(&variables, component, |name| {
                clip_init(&variables, &scales, name)
            })?;
        }
    }
    let file = root
        .join(component.folder())
        .join(format!("{}.safetensors", component.weights_stem()));
    weights::save_var_store(&vs, &file, Some(options.dtype.kind()))?;
    let bytes = std::fs::metadata(&file).map_or(0, |m| m.len());
    Ok(ComponentReport {
        component,
        parameters: parameter_count(&vs),
        file,
        bytes,
    })
}

/// How one variable is filled.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    /// U(-bound, bound).
    Uniform(f64),
    /// N(0, std).
    Normal(f64),
    Ones,
    Zeros,
}

/// Fills every variable (in name order, after the caller seeded the generator) by `rule`.
fn fill_variables(
    variables: &BTreeMap<String, Tensor>,
    component: Component,
    rule: impl Fn(&str) -> Option<Init>,
) -> Result<(), InitError> {
    let _guard = tch::no_grad_guard();
    for (name, variable) in variables {
        let init = rule(name).ok_or_else(|| InitError::NoInitRule {
            variable: name.clone(),
            component: component.folder(),
        })?;
        let mut variable = variable.shallow_clone();
        let _ = match init {
            Init::Uniform(bound) => variable.uniform_(-bound, bound),
            Init::Normal(std) => variable.normal_(0.0, std),
            Init::Ones => variable.fill_(1.0),
            Init::Zeros => variable.zero_(),
        };
    }
    Ok(())
}

/// PyTorch's defaults for Conv2d / Linear (`kaiming_uniform_(a=sqrt(5))`, i.e.
/// U(±1/sqrt(fan_in)), for the weight and U(±1/sqrt(fan_in)) for the bias) and for GroupNorm /
/// LayerNorm (weight 1, bias 0). A layer is a norm when its weight is a vector.
fn torch_default_init(variables: &BTreeMap<String, Tensor>, name: &str) -> Option<Init> {
    let (stem, is_weight) = match name.strip_suffix(".weight") {
        Some(stem) => (stem, true),
        None => (name.strip_suffix(".bias")?, false),
    };
    let weight = variables.get(&format!("{stem}.weight"))?;
    Some(match (weight.dim() >= 2, is_weight) {
        (true, _) => Init::Uniform(1.0 / (fan_in(weight) as f64).sqrt()),
        (false, true) => Init::Ones,
        (false, false) => Init::Zeros,
    })
}

/// Inputs per output unit of a linear (`[out, in]`) or conv (`[out, in, kh, kw]`) weight.
fn fan_in(weight: &Tensor) -> i64 {
    weight.size()[1..].iter().product()
}

/// The standard deviations transformers' `CLIPPreTrainedModel._init_weights` uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipInitScales {
    /// Token and position embeddings: `0.02 * factor`.
    pub embedding: f64,
    /// q/k/v projections and fc2: `hidden^-0.5 * (2 * layers)^-0.5 * factor`.
    pub in_projection: f64,
    /// Attention output projection: `hidden^-0.5 * factor`.
    pub out_projection: f64,
    /// fc1: `(2 * hidden)^-0.5 * factor`.
    pub fc1: f64,
}

impl ClipInitScales {
    /// Reads `hidden_size`, `num_hidden_layers` and `initializer_factor` from `config.json`.
    pub fn from_config(file: &Path) -> Result<Self, InitError> {
        let config = ClipTextConfig::from_file(file)?;
        let factor = read_initializer_factor(file)?;
        let hidden = config.hidden_size as f64;
        let layers = config.num_hidden_layers as f64;
        Ok(Self {
            embedding: CLIP_EMBEDDING_STD * factor,
            in_projection: hidden.powf(-0.5) * (2.0 * layers).powf(-0.5) * factor,
            out_projection: hidden.powf(-0.5) * factor,
            fc1: (2.0 * hidden).powf(-0.5) * factor,
        })
    }

    /// The standard deviation for a weight matrix named `name`, if it is drawn from a normal.
    fn weight_std(&self, name: &str) -> Option<f64> {
        let suffixes = [
            ("token_embedding.weight", self.embedding),
            ("position_embedding.weight", self.embedding),
            ("q_proj.weight", self.in_projection),
            ("k_proj.weight", self.in_projection),
            ("v_proj.weight", self.in_projection),
            ("out_proj.weight", self.out_projection),
            // CLIPTextModelWithProjection: hidden^-0.5 * factor, as the attention output.
            ("text_projection.weight", self.out_projection),
            ("fc1.weight", self.fc1),
            ("fc2.weight", self.in_projection),
        ];
        suffixes
            .iter()
            .find(|(suffix, _)| name.ends_with(suffix))
            .map(|&(_, std)| std)
    }
}

fn read_initializer_factor(file: &Path) -> Result<f64, InitError> {
    let text = std::fs::read_to_string(file).map_err(|e| InitError::Config {
        file: file.to_path_buf(),
        reason: e.to_string(),
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| InitError::Config {
        file: file.to_path_buf(),
        reason: e.to_string(),
    })?;
    match json.get("initializer_factor") {
        None | Some(serde_json::Value::Null) => Ok(DEFAULT_INITIALIZER_FACTOR),
        Some(value) => value.as_f64().ok_or_else(|| InitError::Config {
            file: file.to_path_buf(),
            reason: format!("key 'initializer_factor' must be a number, found {value}"),
        }),
    }
}

/// transformers' CLIP init: normal weights (see [`ClipInitScales`]), LayerNorm weights 1,
/// every bias 0.
fn clip_init(
    variables: &BTreeMap<String, Tensor>,
    scales: &ClipInitScales,
    name: &str,
) -> Option<Init> {
    if let Some(std) = scales.weight_std(name) {
        Some(Init::Normal(std))
    } else if name.ends_with(".bias") {
        Some(Init::Zeros)
    } else if name.ends_with(".weight") && variables.get(name)?.dim() == 1 {
        Some(Init::Ones)
    } else {
        None
    }
}

fn ensure_empty_or_missing(dir: &Path) -> Result<(), InitError> {
    match std::fs::read_dir(dir) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(write_error(dir, error)),
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(InitError::OutputNotEmpty {
                dir: dir.to_path_buf(),
            }),
        },
    }
}

/// `<out>.partial` next to `out`.
fn staging_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

fn remove_dir_if_present(dir: &Path) -> Result<(), InitError> {
    match std::fs::remove_dir_all(dir) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(write_error(dir, error)),
        _ => Ok(()),
    }
}

fn write_file(path: &Path, contents: &[u8]) -> Result<(), InitError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| write_error(parent, e))?;
    }
    std::fs::write(path, contents).map_err(|e| write_error(path, e))
}

fn write_error(path: &Path, error: std::io::Error) -> InitError {
    InitError::Write {
        path: path.to_path_buf(),
        reason: error.to_string(),
    }
}
