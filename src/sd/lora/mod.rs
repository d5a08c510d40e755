//! LoRA: the adapter files users have and want back, and adapters on a loaded model.
//!
//! Reads the layouts loaders meet in the wild — PEFT (`lora_A` / `lora_B`), what diffusers'
//! `train_dreambooth_lora.py` saves (`lora.down` / `lora.up`, `lora_linear_layer.down` / `.up`)
//! and kohya / A1111 / ComfyUI (`lora_unet_…` / `lora_te_…` with `lora_down`, `lora_up`,
//! `alpha`) — into one [`LoraWeights`]; writes the diffusers and kohya layouts
//! ([`files`]); attaches adapters to a model's layers ([`attach`]) the way PEFT computes them:
//! `W x + scale · (alpha / rank) · up(down(x))`.
pub mod files;

use crate::sd::clip::ClipTextModel;
use crate::sd::layers::{Linear, LoraAdapter};
use crate::sd::unet::UNet2DConditionModel;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Which model of a pipeline an adapter belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl Component {
    /// The key prefix of diffusers' LoRA files (`unet.`, `text_encoder.`).
    pub fn diffusers_prefix(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }

    /// The key prefix of kohya files (`lora_unet_`, `lora_te_`).
    pub fn kohya_prefix(self) -> &'static str {
        match self {
            Component::Unet => "lora_unet",
            Component::TextEncoder => "lora_te",
            Component::TextEncoder2 => "lora_te2",
        }
    }
}

/// The low-rank pair of one layer.
#[derive(Debug)]
pub struct LoraModule {
    pub component: Component,
    /// The layer's module path as diffusers / transformers 4.x name it
    /// (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`,
    /// `text_model.encoder.layers.0.self_attn.q_proj`), or for kohya files the same path with
    /// `_` for `.` until it is matched against a model.
    pub path: String,
    /// `[rank, in_features]`.
    pub down: Tensor,
    /// `[out_features, rank]`.
    pub up: Tensor,
    /// `None`: alpha = rank (scale 1), as diffusers' files without alphas mean.
    pub alpha: Option<f64>,
}

impl LoraModule {
    pub fn rank(&self) -> i64 {
        self.down.size()[0]
    }

    /// `alpha / rank`: the factor PEFT multiplies the update by.
    pub fn scaling(&self) -> f64 {
        self.alpha.map_or(1.0, |alpha| alpha / self.rank() as f64)
    }
}

/// The adapters of one LoRA file (or of a training run), keyed by layer.
#[derive(Debug)]
pub struct LoraWeights {
    pub modules: Vec<LoraModule>,
    /// Where they came from (named in errors).
    pub source: PathBuf,
}

/// Why a LoRA file cannot be read or applied; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("{}: cannot read the LoRA file: {reason}", .file.display())]
    Read { file: PathBuf, reason: String },
    #[error("{}: tensor '{key}' is not a LoRA weight dreampipe reads ({hint})", .file.display())]
    UnknownKey {
        file: PathBuf,
        key: String,
        hint: &'static str,
    },
    #[error("{}: layer '{path}' has {problem}", .file.display())]
    Incomplete {
        file: PathBuf,
        path: String,
        problem: String,
    },
    #[error("{}: the file has no LoRA weights", .file.display())]
    Empty { file: PathBuf },
    #[error(
        "{}: layer '{path}' is not a layer of this model (is the LoRA for another architecture, e.g. SDXL or SD 2.x vs SD 1.x?)",
        .file.display()
    )]
    NoSuchLayer { file: PathBuf, path: String },
    #[error(
        "{}: layer '{path}' is {expected_in}->{expected_out} in the model but the LoRA is {found_in}->{found_out} (a LoRA for another architecture?)",
        .file.display()
    )]
    Shape {
        file: PathBuf,
        path: String,
        expected_in: i64,
        expected_out: i64,
        found_in: i64,
        found_out: i64,
    },
    #[error("{}: cannot write: {reason}", .file.display())]
    Write { file: PathBuf, reason: String },
}

/// One LoRA to apply, with the user's weight for it (diffusers' adapter weight / `scale`).
pub struct ScaledLora<'a> {
    pub weights: &'a LoraWeights,
    pub scale: f64,
}

impl LoraWeights {
    /// Reads any of the supported layouts (see the module doc).
    pub fn read(file: &Path) -> Result<Self, LoraError> {
        let tensors = Tensor::read_safetensors(file).map_err(|error| LoraError::Read {
            file: file.to_path_buf(),
            reason: error.to_string(),
        })?;
        files::parse(file, tensors)
    }

    /// The adapters of one component.
    pub fn of(&self, component: Component) -> impl Iterator<Item = &LoraModule> {
        self.modules
            .iter()
            .filter(move |module| module.component == component)
    }

    /// Replaces kohya's underscored layer paths by the model's dotted module paths (what the
    /// diffusers layout needs); paths the model lacks stay as they are.
    pub fn resolve_paths(&mut self, targets: &mut LoraTargets<'_>) {
        let mut names: HashMap<(Component, String), String> = HashMap::new();
        targets.visit_all(&mut |component, path, _| {
            names.insert((component, underscored(path)), path.to_string());
        });
        for module in &mut self.modules {
            if let Some(path) = names.get(&(module.component, underscored(&module.path))) {
                module.path = path.clone();
            }
        }
    }

    /// The largest rank among the modules.
    pub fn rank(&self) -> i64 {
        self.modules.iter().map(LoraModule::rank).max().unwrap_or(0)
    }
}

/// `a.b.c` and `a_b_c` name one layer (kohya writes `_` for `.`).
fn underscored(path: &str) -> String {
    path.replace('.', "_")
}

/// The models of a pipeline adapters attach to (SDXL has a second text encoder).
pub struct LoraTargets<'a> {
    pub unet: &'a mut UNet2DConditionModel,
    pub text_encoder: &'a mut ClipTextModel,
    pub text_encoder_2: Option<&'a mut ClipTextModel>,
}

impl LoraTargets<'_> {
    /// Every targetable layer of every model, with its component and module path.
    fn visit_all(&mut self, visit: &mut dyn FnMut(Component, &str, &mut Linear)) {
        self.unet
            .visit_lora_targets(&mut |path, linear| visit(Component::Unet, path, linear));
        self.text_encoder
            .visit_lora_targets(&mut |path, linear| visit(Component::TextEncoder, path, linear));
        if let Some(text_encoder_2) = self.text_encoder_2.as_deref_mut() {
            text_encoder_2.visit_lora_targets(&mut |path, linear| {
                visit(Component::TextEncoder2, path, linear)
            });
        }
    }
}

/// Attaches every LoRA in `loras` to the models, in order (several adapters on one layer add
/// up, as PEFT's active adapters do). Adapters already attached stay; use [`detach`] first for
/// a fresh set. Fails, leaving nothing attached, when a layer is unknown or its shape differs.
pub fn attach(
    targets: &mut LoraTargets<'_>,
    loras: &[ScaledLora<'_>],
    kind: Kind,
) -> Result<(), LoraError> {
    let mut plan = AttachPlan::default();
    for lora in loras {
        plan.add(lora, kind);
    }
    let result = plan.apply(targets);
    if result.is_err() {
        detach(targets);
    }
    result
}

/// Removes every adapter from the models.
pub fn detach(targets: &mut LoraTargets<'_>) {
    targets.visit_all(&mut |_, _, linear| linear.adapters_mut().clear());
}

/// A module of a LoRA file, ready to attach.
struct Pending {
    file: PathBuf,
    path: String,
    adapter: LoraAdapter,
}

/// The adapters to attach, by component and underscored layer path.
#[derive(Default)]
struct AttachPlan {
    pending: HashMap<(Component, String), Vec<Pending>>,
}

impl AttachPlan {
    fn add(&mut self, lora: &ScaledLora<'_>, kind: Kind) {
        for module in &lora.weights.modules {
            let adapter = LoraAdapter {
                down: module.down.to_kind(kind),
                up: module.up.to_kind(kind),
                scale: module.scaling() * lora.scale,
            };
            self.pending
                .entry((module.component, underscored(&module.path)))
                .or_default()
                .push(Pending {
                    file: lora.weights.source.clone(),
                    path: module.path.clone(),
                    adapter,
                });
        }
    }

    /// Moves the adapters onto the layers of `targets`; fails on the first adapter whose shape
    /// does not fit, or that no layer took.
    fn apply(&mut self, targets: &mut LoraTargets<'_>) -> Result<(), LoraError> {
        let mut failure = None;
        targets.visit_all(&mut |component, path, linear| {
            let Some(pending) = self.pending.remove(&(component, underscored(path))) else {
                return;
            };
            for item in pending {
                if failure.is_none() {
                    match check_shape(linear, &item) {
                        Ok(()) => linear.adapters_mut().push(item.adapter),
                        Err(error) => failure = Some(error),
                    }
                }
            }
        });
        if let Some(error) = failure {
            return Err(error);
        }
        let left = self
            .pending
            .values()
            .min_by_key(|items| items.first().map(|i| i.path.clone()));
        match left.and_then(|items| items.first()) {
            Some(item) => Err(LoraError::NoSuchLayer {
                file: item.file.clone(),
                path: item.path.clone(),
            }),
            None => Ok(()),
        }
    }
}

fn check_shape(linear: &Linear, item: &Pending) -> Result<(), LoraError> {
    let (out_features, in_features) = linear.weight_shape();
    let (rank, found_in) = (item.adapter.down.size()[0], item.adapter.down.size()[1]);
    let up = item.adapter.up.size();
    if found_in == in_features && up[0] == out_features && up[1] == rank {
        return Ok(());
    }
    Err(LoraError::Shape {
        file: item.file.clone(),
        path: item.path.clone(),
        expected_in: in_features,
        expected_out: out_features,
        found_in,
        found_out: up[0],
    })
}
