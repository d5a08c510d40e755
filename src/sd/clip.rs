//! The CLIP text encoder (transformers' `CLIPTextModel`): token + position embeddings, a stack of
//! pre-LayerNorm causal self-attention layers and a final LayerNorm. Variables are named exactly
//! like the checkpoint keys (`text_model.encoder.layers.0.self_attn.q_proj.weight`, ...) so
//! `weights::load_into` fills them; files with or without the `text_model.` prefix load.
use crate::sd::layers::{Linear, LinearVisitor};
use crate::sd::weights::{self, WeightsError};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor, nn, nn::Module, nn::VarStore};

/// Root of every variable name (the hub checkpoints' key prefix).
const ROOT: &str = "text_model";
/// transformers' "legacy" pooling: configs with `eos_token_id == 2` (old CLIP configs, whose
/// real eos is the largest id) pool at the argmax of the ids (CLIPTextTransformer.forward).
const LEGACY_EOS_TOKEN_ID: i64 = 2;
/// Coefficient of quick_gelu, `x * sigmoid(1.702 x)` (transformers' QuickGELUActivation).
const QUICK_GELU_COEFFICIENT: f64 = 1.702;
/// File name stem of a transformers model's weights (`model.safetensors`, `model.fp16.safetensors`).
const WEIGHTS_STEM: &str = crate::sd::folder::TRANSFORMERS_WEIGHTS_STEM;
/// Buffer some SD checkpoints store; it is recomputed, not loaded.
const POSITION_IDS_KEY: &str = "embeddings.position_ids";

/// Why the text encoder could not be configured, loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error("{file}: cannot read: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error("{file}: invalid text encoder config: {reason}")]
    Config { file: PathBuf, reason: String },
    #[error(
        "{file}: key 'hidden_act' is '{found}'; supported activations are 'quick_gelu' (SD1.x) and 'gelu' (SD2.x)"
    )]
    UnsupportedActivation { file: PathBuf, found: String },
    #[error("{file}: hidden_size {hidden_size} is not divisible by num_attention_heads {heads}")]
    HeadSplit {
        file: PathBuf,
        hidden_size: i64,
        heads: i64,
    },
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(
        "text encoder input ids must have shape [batch, length] with length <= {max_length}, got {shape:?}"
    )]
    InputShape { shape: Vec<i64>, max_length: i64 },
    #[error(
        "text encoder input ids must lie in 0..{vocab_size} (the embedding table), found {found}; was the tokenizer extended without resizing the embeddings?"
    )]
    InputId { found: i64, vocab_size: i64 },
    #[error("new token embedding rows must have shape [n, {hidden_size}], got {shape:?}")]
    EmbeddingRows { shape: Vec<i64>, hidden_size: i64 },
}

/// The activation of the MLP blocks (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP, SD1.x).
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP ViT-H, SD2.x).
    Gelu,
}

/// The fields of `text_encoder/config.json` the model needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_attention_heads: i64,
    pub num_hidden_layers: i64,
    pub max_position_embeddings: i64,
    pub vocab_size: i64,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
    pub eos_token_id: i64,
    /// `CLIPTextModelWithProjection` (SDXL's second text encoder): the width of
    /// `text_projection`, applied to the pooled output.
    pub projection_dim: Option<i64>,
}

/// config.json as written by transformers (defaults = CLIPTextConfig's defaults).
#[derive(Deserialize)]
struct RawConfig {
    hidden_size: i64,
    intermediate_size: i64,
    num_attention_heads: i64,
    num_hidden_layers: i64,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: i64,
    vocab_size: i64,
    #[serde(default = "default_layer_norm_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_hidden_act")]
    hidden_act: String,
    #[serde(default = "default_eos_token_id")]
    eos_token_id: i64,
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    projection_dim: Option<i64>,
}

/// CLIPTextConfig defaults (transformers).
fn default_max_positions() -> i64 {
    77
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_hidden_act() -> String {
    "quick_gelu".to_string()
}
fn default_eos_token_id() -> i64 {
    2
}

impl ClipTextConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(file: &Path) -> Result<Self, ClipError> {
        let text = std::fs::read_to_string(file).map_err(|error| ClipError::Read {
            file: file.to_path_buf(),
            reason: error.to_string(),
        })?;
        Self::from_json(&text, file)
    }

    /// Parses and validates config JSON text (`file` names it in errors).
    pub fn from_json(text: &str, file: &Path) -> Result<Self, ClipError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|error| ClipError::Config {
            file: file.to_path_buf(),
            reason: error.to_string(),
        })?;
        let hidden_act = Activation::from_name(&raw.hidden_act).ok_or_else(|| {
            ClipError::UnsupportedActivation {
                file: file.to_path_buf(),
                found: raw.hidden_act.clone(),
            }
        })?;
        let sizes = [
            ("hidden_size", raw.hidden_size),
            ("intermediate_size", raw.intermediate_size),
            ("num_attention_heads", raw.num_attention_heads),
            ("num_hidden_layers", raw.num_hidden_layers),
            ("max_position_embeddings", raw.max_position_embeddings),
            ("vocab_size", raw.vocab_size),
        ];
        for (key, value) in sizes {
            if let Some(problem) = crate::sd::model_config::size_problem(key, value) {
                return Err(ClipError::Config {
                    file: file.to_path_buf(),
                    reason: format!("key '{key}' {problem}"),
                });
            }
        }
        if raw.num_attention_heads <= 0 || raw.hidden_size % raw.num_attention_heads != 0 {
            return Err(ClipError::HeadSplit {
                file: file.to_path_buf(),
                hidden_size: raw.hidden_size,
                heads: raw.num_attention_heads,
            });
        }
        Ok(Self {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_attention_heads: raw.num_attention_heads,
            num_hidden_layers: raw.num_hidden_layers,
            max_position_embeddings: raw.max_position_embeddings,
            vocab_size: raw.vocab_size,
            layer_norm_eps: raw.layer_norm_eps,
            hidden_act,
            eos_token_id: raw.eos_token_id,
            projection_dim: with_projection(&raw),
        })
    }
}

/// The projection width of a `CLIPTextModelWithProjection` config (transformers' default 512
/// when the config omits it); `None` for a plain `CLIPTextModel`.
fn with_projection(raw: &RawConfig) -> Option<i64> {
    /// CLIPTextConfig's `projection_dim` default.
    const DEFAULT_PROJECTION_DIM: i64 = 512;
    let projected = (raw.architectures.iter()).any(|name| name == "CLIPTextModelWithProjection");
    projected.then(|| raw.projection_dim.unwrap_or(DEFAULT_PROJECTION_DIM))
}

/// What `CLIPTextModel(input_ids, output_hidden_states=True)` returns.
#[derive(Debug)]
pub struct ClipTextOutput {
    /// [batch, length, hidden] after the final LayerNorm (SD's `encoder_hidden_states`).
    pub last_hidden_state: Tensor,
    /// [batch, hidden]: `last_hidden_state` at each sequence's eos token.
    pub pooler_output: Tensor,
    /// Embedding output then each layer's output (before the final LayerNorm).
    pub hidden_states: Vec<Tensor>,
    /// [batch, projection_dim]: `text_projection(pooler_output)` of a
    /// `CLIPTextModelWithProjection` (its `text_embeds`).
    pub text_embeds: Option<Tensor>,
}

impl ClipTextOutput {
    /// What SDXL conditions on from one text encoder: the penultimate hidden state
    /// `[batch, length, hidden]` and the pooled output (`text_embeds` when the encoder has a
    /// projection, else `pooler_output`).
    pub fn into_sdxl_parts(self) -> (Tensor, Tensor) {
        let states = &self.hidden_states;
        let penultimate = states[states.len().saturating_sub(2)].shallow_clone();
        (penultimate, self.text_embeds.unwrap_or(self.pooler_output))
    }
}

/// Multi-head causal self-attention with q/k/v/out projections.
#[derive(Debug)]
struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: i64,
    causal: bool,
}

/// The sizes of one encoder layer: the text encoder's (causal) and CLIP's vision tower's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerDims {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub heads: i64,
    pub layer_norm_eps: f64,
    pub activation: Activation,
    pub causal: bool,
}

impl ClipTextConfig {
    fn layer_dims(&self) -> LayerDims {
        LayerDims {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            heads: self.num_attention_heads,
            layer_norm_eps: self.layer_norm_eps,
            activation: self.hidden_act,
            causal: true,
        }
    }
}

/// Zero-initialised linear layers (the weights are loaded afterwards): tch's default random init
/// would draw from the global CPU generator that seeded sampling runs rely on (see `sd::rng`).
pub(crate) fn loaded_linear() -> nn::LinearConfig {
    nn::LinearConfig {
        ws_init: nn::Init::Const(0.0),
        bs_init: Some(nn::Init::Const(0.0)),
        bias: true,
    }
}

impl SelfAttention {
    fn new(path: nn::Path, dims: LayerDims) -> Self {
        let linear =
            |name: &str| Linear::new(&path / name, dims.hidden_size, dims.hidden_size, true);
        Self {
            q_proj: linear("q_proj"),
            k_proj: linear("k_proj"),
            v_proj: linear("v_proj"),
            out_proj: linear("out_proj"),
            heads: dims.heads,
            causal: dims.causal,
        }
    }

    /// `q_proj`, `k_proj`, `v_proj`, `out_proj` (the text-encoder targets of diffusers' LoRA scripts).
    fn visit_lora_targets(&mut self, prefix: &str, visit: &mut LinearVisitor<'_>) {
        visit(&format!("{prefix}.q_proj"), &mut self.q_proj);
        visit(&format!("{prefix}.k_proj"), &mut self.k_proj);
        visit(&format!("{prefix}.v_proj"), &mut self.v_proj);
        visit(&format!("{prefix}.out_proj"), &mut self.out_proj);
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        // Encoder states are [batch, length, hidden] (checked by ClipTextModel::check_input).
        let shape = x.size();
        let (batch, length, channels) = (shape[0], shape[1], shape[2]);
        let split_heads = |t: Tensor| {
            t.view([batch, length, self.heads, channels / self.heads])
                .transpose(1, 2)
        };
        let query = split_heads(self.q_proj.forward(x));
        let key = split_heads(self.k_proj.forward(x));
        let value = split_heads(self.v_proj.forward(x));
        // Default scale 1/sqrt(head_dim), as transformers' CLIPAttention.
        let attended = Tensor::scaled_dot_product_attention(
            &query,
            &key,
            &value,
            None::<Tensor>,
            0.0,
            self.causal,
            None,
            false,
        );
        let merged = attended
            .transpose(1, 2)
            .contiguous()
            .view([batch, length, channels]);
        self.out_proj.forward(&merged)
    }
}

/// fc1 -> activation -> fc2.
#[derive(Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl Mlp {
    fn new(path: nn::Path, dims: LayerDims) -> Self {
        let (hidden, inner) = (dims.hidden_size, dims.intermediate_size);
        Self {
            fc1: Linear::new(&path / "fc1", hidden, inner, true),
            fc2: Linear::new(&path / "fc2", inner, hidden, true),
            activation: dims.activation,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2
            .forward(&self.activation.apply(&self.fc1.forward(x)))
    }
}

impl Activation {
    /// Reads `hidden_act`; `None` for other activations.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Activation::QuickGelu),
            "gelu" => Some(Activation::Gelu),
            _ => None,
        }
    }

    pub(crate) fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::QuickGelu => x * (x * QUICK_GELU_COEFFICIENT).sigmoid(),
            Activation::Gelu => x.gelu("none"),
        }
    }
}

/// Pre-LayerNorm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x)).
#[derive(Debug)]
pub(crate) struct EncoderLayer {
    self_attn: SelfAttention,
    layer_norm1: nn::LayerNorm,
    mlp: Mlp,
    layer_norm2: nn::LayerNorm,
}

impl EncoderLayer {
    pub(crate) fn new(path: nn::Path, dims: LayerDims) -> Self {
        let norm = |name: &str| layer_norm(&path / name, dims.hidden_size, dims.layer_norm_eps);
        Self {
            self_attn: SelfAttention::new(&path / "self_attn", dims),
            layer_norm1: norm("layer_norm1"),
            mlp: Mlp::new(&path / "mlp", dims),
            layer_norm2: norm("layer_norm2"),
        }
    }

    pub(crate) fn visit_lora_targets(&mut self, prefix: &str, visit: &mut LinearVisitor<'_>) {
        self.self_attn
            .visit_lora_targets(&format!("{prefix}.self_attn"), visit);
        visit(&format!("{prefix}.mlp.fc1"), &mut self.mlp.fc1);
        visit(&format!("{prefix}.mlp.fc2"), &mut self.mlp.fc2);
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.self_attn.forward(&self.layer_norm1.forward(x));
        &x + self.mlp.forward(&self.layer_norm2.forward(&x))
    }
}

/// A LayerNorm over the last dimension of size `size`.
pub(crate) fn layer_norm(path: nn::Path, size: i64, eps: f64) -> nn::LayerNorm {
    let layer_norm_config = nn::LayerNormConfig {
        eps,
        ..Default::default()
    };
    nn::layer_norm(path, vec![size], layer_norm_config)
}

/// The CLIP text encoder.
#[derive(Debug)]
pub struct ClipTextModel {
    config: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: nn::LayerNorm,
    text_projection: Option<Linear>,
}

impl ClipTextModel {
    /// Creates the variables under `root / "text_model"` (uninitialised weights).
    pub fn new(root: &nn::Path, config: ClipTextConfig) -> Self {
        let model = root / ROOT;
        let embeddings = &model / "embeddings";
        let hidden = config.hidden_size;
        let token_embedding =
            (&embeddings / "token_embedding").zeros("weight", &[config.vocab_size, hidden]);
        let position_embedding = (&embeddings / "position_embedding")
            .zeros("weight", &[config.max_position_embeddings, hidden]);
        let layers_path = &model / "encoder" / "layers";
        let layers = (0..config.num_hidden_layers)
            .map(|index| EncoderLayer::new(&layers_path / index, config.layer_dims()))
            .collect();
        let final_layer_norm = layer_norm(
            &model / "final_layer_norm",
            config.hidden_size,
            config.layer_norm_eps,
        );
        // At the root, beside `text_model`, as transformers names it.
        let text_projection = config
            .projection_dim
            .map(|dim| Linear::new(root / "text_projection", config.hidden_size, dim, false));
        Self {
            config,
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
        }
    }

    /// Every attention projection LoRA adapters attach to, named as transformers 4.x names the
    /// module (`text_model.encoder.layers.0.self_attn.q_proj`).
    pub fn visit_lora_targets(&mut self, visit: &mut LinearVisitor<'_>) {
        for (index, layer) in self.layers.iter_mut().enumerate() {
            layer.visit_lora_targets(&format!("{ROOT}.encoder.layers.{index}"), visit);
        }
    }

    /// Loads `dir/config.json` and `dir/model[.<variant>].safetensors` (any float dtype,
    /// converted to `kind`) onto `device`.
    pub fn load(
        dir: &Path,
        device: Device,
        kind: Kind,
        variant: Option<&str>,
    ) -> Result<(VarStore, Self), ClipError> {
        let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let file = weights::find_weights_file(dir, WEIGHTS_STEM, variant)?;
        Self::load_file(&file, config, device, kind)
    }

    /// Builds the model for `config` and fills it from one safetensors file.
    pub fn load_file(
        file: &Path,
        config: ClipTextConfig,
        device: Device,
        kind: Kind,
    ) -> Result<(VarStore, Self), ClipError> {
        let mut vs = VarStore::new(device);
        vs.set_kind(kind);
        let model = weights::allocating(file, || Self::new(&vs.root(), config))?;
        weights::load_into(&vs, file, checkpoint_key_to_variable)?;
        Ok((vs, model))
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The [vocab, hidden] token-embedding matrix (the variable textual inversion trains).
    pub fn token_embedding(&self) -> &Tensor {
        &self.token_embedding
    }

    /// Appends `rows` ([n, hidden]) to the token embedding, e.g. one row per token added to
    /// the tokenizer (transformers' `resize_token_embeddings` + setting the new rows). The
    /// VarStore variable is resized in place. Returns the new vocabulary size.
    pub fn append_token_embeddings(&mut self, rows: &Tensor) -> Result<i64, ClipError> {
        let hidden = self.config.hidden_size;
        let shape = rows.size();
        if shape.len() != 2 || shape[1] != hidden {
            return Err(ClipError::EmbeddingRows {
                shape,
                hidden_size: hidden,
            });
        }
        let _guard = tch::no_grad_guard();
        let current = &self.token_embedding;
        let rows = rows.to_kind(current.kind()).to_device(current.device());
        let grown = Tensor::cat(&[current.detach(), rows], 0);
        self.token_embedding.set_data(&grown);
        self.config.vocab_size = grown.size()[0];
        Ok(self.config.vocab_size)
    }

    /// Runs the encoder on `input_ids` ([batch, length], int64, length <= max positions).
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput, ClipError> {
        self.check_input(input_ids)?;
        let length = input_ids.size()[1];
        let positions = self.position_embedding.narrow(0, 0, length);
        let mut state = Tensor::embedding(&self.token_embedding, input_ids, -1, false, false)
            + positions.unsqueeze(0);
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        for layer in &self.layers {
            let next = layer.forward(&state);
            hidden_states.push(state);
            state = next;
        }
        hidden_states.push(state.shallow_clone());
        let last_hidden_state = self.final_layer_norm.forward(&state);
        let pooler_output = self.pool(&last_hidden_state, input_ids);
        let text_embeds = (self.text_projection.as_ref()).map(|p| p.forward(&pooler_output));
        Ok(ClipTextOutput {
            last_hidden_state,
            pooler_output,
            hidden_states,
            text_embeds,
        })
    }

    fn check_input(&self, input_ids: &Tensor) -> Result<(), ClipError> {
        let shape = input_ids.size();
        let max_length = self.config.max_position_embeddings;
        if shape.len() != 2 || shape[1] > max_length || shape[1] == 0 {
            return Err(ClipError::InputShape { shape, max_length });
        }
        let vocab_size = self.config.vocab_size;
        let (low, high) = (
            input_ids.min().int64_value(&[]),
            input_ids.max().int64_value(&[]),
        );
        let out_of_range = if low < 0 { low } else { high };
        if low < 0 || high >= vocab_size {
            return Err(ClipError::InputId {
                found: out_of_range,
                vocab_size,
            });
        }
        Ok(())
    }

    /// The state at each sequence's eos: the first `eos_token_id`, or the largest id for
    /// legacy configs (see LEGACY_EOS_TOKEN_ID).
    fn pool(&self, last_hidden_state: &Tensor, input_ids: &Tensor) -> Tensor {
        let eos_positions = if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID {
            input_ids.argmax(-1, false)
        } else {
            input_ids
                .eq(self.config.eos_token_id)
                .to_kind(Kind::Int)
                .argmax(-1, false)
        };
        let batch = Tensor::arange(input_ids.size()[0], (Kind::Int64, input_ids.device()));
        last_hidden_state.index(&[Some(batch), Some(eos_positions)])
    }
}

/// Maps a checkpoint key to its variable: keys may lack the `text_model.` prefix (transformers 5
/// saves them so); the `position_ids` buffer is skipped.
fn checkpoint_key_to_variable(key: &str) -> Option<String> {
    if key.starts_with("text_projection.") {
        return Some(key.to_string());
    }
    let inner = key
        .strip_prefix(ROOT)
        .and_then(|rest| rest.strip_prefix('.'))
        .unwrap_or(key);
    (inner != POSITION_IDS_KEY).then(|| format!("{ROOT}.{inner}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_match_their_formulas() {
        // Expected values from math.erf / math.exp: gelu(x) = x/2 (1 + erf(x/sqrt 2)),
        // quick_gelu(x) = x / (1 + exp(-1.702 x)).
        let x = Tensor::from_slice(&[-0.5f64, 2.0]);
        let gelu = Tensor::from_slice(&[-0.15426876936299344f64, 1.9544997361036416]);
        let quick = Tensor::from_slice(&[-0.1496115633936199f64, 1.9356586231442083]);
        assert!(
            Activation::Gelu
                .apply(&x)
                .allclose(&gelu, 1e-12, 1e-12, false)
        );
        assert!(
            Activation::QuickGelu
                .apply(&x)
                .allclose(&quick, 1e-12, 1e-12, false)
        );
    }

    #[test]
    fn checkpoint_keys_with_and_without_prefix_map_to_the_same_variable() {
        let expected = Some("text_model.final_layer_norm.weight".to_string());
        assert_eq!(
            checkpoint_key_to_variable("text_model.final_layer_norm.weight"),
            expected
        );
        assert_eq!(
            checkpoint_key_to_variable("final_layer_norm.weight"),
            expected
        );
        assert_eq!(
            checkpoint_key_to_variable("text_model.embeddings.position_ids"),
            None
        );
        assert_eq!(checkpoint_key_to_variable("embeddings.position_ids"), None);
    }
}
