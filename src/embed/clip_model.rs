//! transformers' `CLIPModel` for evaluation: the vision tower (patch embedding, class token,
//! pre-LayerNorm, a non-causal CLIP encoder, post-LayerNorm of the class token) with
//! `visual_projection`, and the SD text encoder (`sd::clip`) with `text_projection`; both give
//! the projected embeddings `get_image_features` / `get_text_features` return. Variables carry
//! the checkpoint's names (`vision_model.encoder.layers.0.mlp.fc1.weight`, ...).
use super::EmbedError;
use crate::sd::clip::{Activation, ClipTextConfig, ClipTextModel, EncoderLayer, LayerDims};
use crate::sd::tokenizer::ClipTokenizer;
use crate::sd::weights;
use serde_json::Value;
use std::path::Path;
use tch::{Device, Kind, Tensor, nn, nn::Module, nn::VarStore};

/// `CLIPVisionConfig` defaults (transformers), for keys a config leaves out.
const VISION_DEFAULTS: VisionDefaults = VisionDefaults {
    hidden_size: 768,
    intermediate_size: 3072,
    heads: 12,
    layers: 12,
    image_size: 224,
    patch_size: 32,
};
/// `CLIPConfig.projection_dim` default.
const DEFAULT_PROJECTION_DIM: i64 = 512;
/// Largest size accepted from a config (a real CLIP's largest is 4096, ViT-bigG's MLP 8192).
const MAX_CONFIG_SIZE: i64 = 1 << 16;

struct VisionDefaults {
    hidden_size: i64,
    intermediate_size: i64,
    heads: i64,
    layers: i64,
    image_size: i64,
    patch_size: i64,
}

/// The vision tower's sizes (`vision_config` of a `CLIPModel` config.json).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    pub layer: LayerDims,
    pub layers: i64,
    pub image_size: i64,
    pub patch_size: i64,
}

/// A `CLIPModel` folder's config: both towers and the projection size.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipModelConfig {
    pub text: ClipTextConfig,
    pub vision: ClipVisionConfig,
    pub projection_dim: i64,
}

/// Reads integer keys of one JSON object with defaults, naming the file and section.
pub(crate) struct Section<'a> {
    pub file: &'a Path,
    pub name: &'a str,
    pub json: &'a Value,
}

impl Section<'_> {
    pub fn error(&self, reason: impl std::fmt::Display) -> EmbedError {
        EmbedError::Config {
            file: self.file.to_path_buf(),
            reason: format!("{}{reason}", self.prefix()),
        }
    }

    fn prefix(&self) -> String {
        if self.name.is_empty() {
            String::new()
        } else {
            format!("{}: ", self.name)
        }
    }

    pub fn int(&self, key: &str, default: i64) -> Result<i64, EmbedError> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(value) => match value.as_i64() {
                Some(n) if (1..=MAX_CONFIG_SIZE).contains(&n) => Ok(n),
                _ => Err(self.error(format!(
                    "key '{key}' must be an integer from 1 to {MAX_CONFIG_SIZE}, found {value}"
                ))),
            },
        }
    }

    pub fn float(&self, key: &str, default: f64) -> Result<f64, EmbedError> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(value) => value
                .as_f64()
                .filter(|x| *x > 0.0)
                .ok_or_else(|| self.error(format!("key '{key}' must be a positive number"))),
        }
    }

    pub fn activation(&self, default: &str) -> Result<Activation, EmbedError> {
        let name = self
            .json
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or(default);
        Activation::from_name(name).ok_or_else(|| {
            self.error(format!(
                "key 'hidden_act' is '{name}'; supported: 'quick_gelu' and 'gelu'"
            ))
        })
    }

    /// Layer sizes whose hidden size splits evenly into heads.
    pub fn layer(
        &self,
        defaults: (i64, i64, i64),
        eps: f64,
        act: &str,
    ) -> Result<LayerDims, EmbedError> {
        let hidden_size = self.int("hidden_size", defaults.0)?;
        let heads = self.int("num_attention_heads", defaults.2)?;
        if hidden_size % heads != 0 {
            return Err(self.error(format!(
                "hidden_size {hidden_size} is not divisible by num_attention_heads {heads}"
            )));
        }
        Ok(LayerDims {
            hidden_size,
            intermediate_size: self.int("intermediate_size", defaults.1)?,
            heads,
            layer_norm_eps: self.float("layer_norm_eps", eps)?,
            activation: self.activation(act)?,
            causal: false,
        })
    }

    /// `image_size` and `patch_size`, the first a multiple of the second.
    pub fn patches(&self, image: i64, patch: i64) -> Result<(i64, i64), EmbedError> {
        let (image_size, patch_size) = (
            self.int("image_size", image)?,
            self.int("patch_size", patch)?,
        );
        if image_size % patch_size != 0 {
            return Err(self.error(format!(
                "image_size {image_size} is not a multiple of patch_size {patch_size}"
            )));
        }
        Ok((image_size, patch_size))
    }
}

impl ClipModelConfig {
    /// Reads a `CLIPModel` config.json (`text_config`, `vision_config`, `projection_dim`).
    pub fn from_file(file: &Path) -> Result<Self, EmbedError> {
        let json = super::read_json(file)?;
        let top = Section {
            file,
            name: "",
            json: &json,
        };
        let (Some(text), Some(vision)) = (json.get("text_config"), json.get("vision_config"))
        else {
            return Err(top.error("not a CLIPModel config: 'text_config' and 'vision_config' are required (give a transformers CLIPModel folder, e.g. openai/clip-vit-large-patch14)"));
        };
        let text = ClipTextConfig::from_json(&text.to_string(), file)?;
        let section = Section {
            file,
            name: "vision_config",
            json: vision,
        };
        let d = &VISION_DEFAULTS;
        let layer = section.layer(
            (d.hidden_size, d.intermediate_size, d.heads),
            1e-5,
            "quick_gelu",
        )?;
        let (image_size, patch_size) = section.patches(d.image_size, d.patch_size)?;
        let vision = ClipVisionConfig {
            layer,
            layers: section.int("num_hidden_layers", d.layers)?,
            image_size,
            patch_size,
        };
        let projection_dim = top.int("projection_dim", DEFAULT_PROJECTION_DIM)?;
        Ok(Self {
            text,
            vision,
            projection_dim,
        })
    }
}

/// CLIPVisionTransformer.
#[derive(Debug)]
struct VisionTower {
    class_embedding: Tensor,
    patch_embedding: nn::Conv2D,
    position_embedding: Tensor,
    pre_layernorm: nn::LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: nn::LayerNorm,
    image_size: i64,
}

impl VisionTower {
    fn new(path: nn::Path, config: &ClipVisionConfig) -> Self {
        let hidden = config.layer.hidden_size;
        let embeddings = &path / "embeddings";
        let patches = (config.image_size / config.patch_size).pow(2);
        let conv = nn::ConvConfig {
            stride: config.patch_size,
            bias: false,
            ws_init: nn::Init::Const(0.0),
            ..Default::default()
        };
        let eps = config.layer.layer_norm_eps;
        let layers_path = &path / "encoder" / "layers";
        Self {
            class_embedding: embeddings.zeros("class_embedding", &[hidden]),
            patch_embedding: nn::conv2d(
                &embeddings / "patch_embedding",
                3,
                hidden,
                config.patch_size,
                conv,
            ),
            position_embedding: (&embeddings / "position_embedding")
                .zeros("weight", &[patches + 1, hidden]),
            // "pre_layrnorm" is the checkpoints' spelling.
            pre_layernorm: crate::sd::clip::layer_norm(&path / "pre_layrnorm", hidden, eps),
            layers: (0..config.layers)
                .map(|i| EncoderLayer::new(&layers_path / i, config.layer))
                .collect(),
            post_layernorm: crate::sd::clip::layer_norm(&path / "post_layernorm", hidden, eps),
            image_size: config.image_size,
        }
    }

    /// [batch, hidden]: the post-LayerNorm class token (`pooler_output`).
    fn forward(&self, pixel_values: &Tensor) -> Tensor {
        let patches = self
            .patch_embedding
            .forward(pixel_values)
            .flatten(2, -1)
            .transpose(1, 2); // [b, n, h]
        let batch = patches.size()[0];
        let class = self
            .class_embedding
            .view([1, 1, -1])
            .expand([batch, 1, -1], false);
        let mut state = Tensor::cat(&[class, patches], 1) + self.position_embedding.unsqueeze(0);
        state = self.pre_layernorm.forward(&state);
        for layer in &self.layers {
            state = layer.forward(&state);
        }
        self.post_layernorm.forward(&state.select(1, 0))
    }
}

/// The variables of a `CLIPModel` under `root`, named as its checkpoints.
pub(crate) struct Parts {
    vision: VisionTower,
    text: ClipTextModel,
    visual_projection: nn::Linear,
    text_projection: nn::Linear,
}

impl Parts {
    pub(crate) fn new(root: nn::Path, config: &ClipModelConfig) -> Self {
        let projection_dim = config.projection_dim;
        let vision_hidden = config.vision.layer.hidden_size;
        Self {
            vision: VisionTower::new(&root / "vision_model", &config.vision),
            text: ClipTextModel::new(&root, config.text.clone()),
            visual_projection: projection(
                &root / "visual_projection",
                vision_hidden,
                projection_dim,
            ),
            text_projection: projection(
                &root / "text_projection",
                config.text.hidden_size,
                projection_dim,
            ),
        }
    }
}

/// A loaded `CLIPModel` with its tokenizer.
pub struct ClipModel {
    pub config: ClipModelConfig,
    vision: VisionTower,
    text: ClipTextModel,
    visual_projection: nn::Linear,
    text_projection: nn::Linear,
    tokenizer: ClipTokenizer,
    _vs: VarStore,
}

fn projection(path: nn::Path, input: i64, output: i64) -> nn::Linear {
    let config = nn::LinearConfig {
        ws_init: nn::Init::Const(0.0),
        bs_init: None,
        bias: false,
    };
    nn::linear(path, input, output, config)
}

impl ClipModel {
    /// Loads `dir`: config.json, model.safetensors (float weights, converted to float32), and
    /// the tokenizer files (vocab.json, merges.txt) beside them.
    pub fn load(dir: &Path, device: Device) -> Result<Self, EmbedError> {
        let config = ClipModelConfig::from_file(&dir.join("config.json"))?;
        let file =
            weights::find_weights_file(dir, crate::sd::folder::TRANSFORMERS_WEIGHTS_STEM, None)?;
        let tokenizer = ClipTokenizer::from_dir(dir)?;
        let (vs, parts) = weights::build_and_load(
            &file,
            device,
            Kind::Float,
            |root| Parts::new(root, &config),
            checkpoint_key,
        )?;
        Ok(Self {
            config,
            vision: parts.vision,
            text: parts.text,
            visual_projection: parts.visual_projection,
            text_projection: parts.text_projection,
            tokenizer,
            _vs: vs,
        })
    }

    /// The vision tower's input side (`vision_config.image_size`).
    pub fn image_size(&self) -> i64 {
        self.vision.image_size
    }

    /// [batch, projection_dim] image embeddings of [batch, 3, side, side] pixel values.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        self.visual_projection
            .forward(&self.vision.forward(pixel_values))
    }

    /// [projection_dim] text embedding of `prompt` (padded to the tokenizer's max length, as
    /// `tokenizer(prompt, padding="max_length", truncation=True)`).
    pub fn text_embeds(&self, prompt: &str, device: Device) -> Result<Tensor, EmbedError> {
        let _guard = tch::no_grad_guard();
        let ids = Tensor::from_slice(&self.tokenizer.encode(prompt).ids)
            .unsqueeze(0)
            .to_device(device);
        let pooled = self.text.forward(&ids)?.pooler_output;
        Ok(self.text_projection.forward(&pooled).squeeze_dim(0))
    }
}

/// Checkpoint keys are the variable names; `logit_scale` and `position_ids` buffers are not used.
fn checkpoint_key(key: &str) -> Option<String> {
    (key != "logit_scale" && !key.ends_with("position_ids")).then(|| key.to_string())
}
