//! transformers' `ViTModel` (DINO's ViT-S/16 is one) up to the final LayerNorm: patch embedding
//! with bias, [CLS] token, position embeddings, pre-LayerNorm layers (`layernorm_before`,
//! self-attention, `layernorm_after`, MLP) and `layernorm`. The DINO metric uses the [CLS] row of
//! `last_hidden_state`; the pooler is not built and its weights are skipped. Checkpoints saved
//! from a `ViTFor...` model (keys prefixed `vit.`) load too.
use super::EmbedError;
use super::clip_model::Section;
use crate::sd::clip::{Activation, loaded_linear};
use crate::sd::weights;
use std::path::Path;
use tch::{Device, Kind, Tensor, nn, nn::Module, nn::VarStore};

/// `ViTConfig` defaults (transformers): hidden, intermediate, heads; layers; image, patch; eps.
const DEFAULT_SIZES: (i64, i64, i64) = (768, 3072, 12);
const DEFAULT_LAYERS: i64 = 12;
const DEFAULT_IMAGE_SIZE: i64 = 224;
const DEFAULT_PATCH_SIZE: i64 = 16;
const DEFAULT_LAYER_NORM_EPS: f64 = 1e-12;

/// A ViTModel config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub heads: i64,
    pub layers: i64,
    pub image_size: i64,
    pub patch_size: i64,
    pub layer_norm_eps: f64,
    pub activation: Activation,
    pub qkv_bias: bool,
}

impl VitConfig {
    pub fn from_file(file: &Path) -> Result<Self, EmbedError> {
        let json = super::read_json(file)?;
        let section = Section {
            file,
            name: "",
            json: &json,
        };
        if json.get("model_type").and_then(|v| v.as_str()) != Some("vit") {
            return Err(section.error("not a ViTModel config: 'model_type' must be \"vit\" (give a transformers ViTModel folder, e.g. facebook/dino-vits16)"));
        }
        let layer = section.layer(DEFAULT_SIZES, DEFAULT_LAYER_NORM_EPS, "gelu")?;
        let (image_size, patch_size) = section.patches(DEFAULT_IMAGE_SIZE, DEFAULT_PATCH_SIZE)?;
        Ok(Self {
            hidden_size: layer.hidden_size,
            intermediate_size: layer.intermediate_size,
            heads: layer.heads,
            layers: section.int("num_hidden_layers", DEFAULT_LAYERS)?,
            image_size,
            patch_size,
            layer_norm_eps: layer.layer_norm_eps,
            activation: layer.activation,
            qkv_bias: json
                .get("qkv_bias")
                .and_then(|v| v.as_bool())
                .unwrap_or(true),
        })
    }
}

/// One ViTLayer.
#[derive(Debug)]
struct Layer {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    attention_output: nn::Linear,
    intermediate: nn::Linear,
    output: nn::Linear,
    layernorm_before: nn::LayerNorm,
    layernorm_after: nn::LayerNorm,
    heads: i64,
    activation: Activation,
}

impl Layer {
    fn new(path: nn::Path, config: &VitConfig) -> Self {
        let (hidden, inner) = (config.hidden_size, config.intermediate_size);
        let qkv = nn::LinearConfig {
            bias: config.qkv_bias,
            ..loaded_linear()
        };
        let attention = &path / "attention" / "attention";
        let norm =
            |name: &str| crate::sd::clip::layer_norm(&path / name, hidden, config.layer_norm_eps);
        Self {
            query: nn::linear(&attention / "query", hidden, hidden, qkv),
            key: nn::linear(&attention / "key", hidden, hidden, qkv),
            value: nn::linear(&attention / "value", hidden, hidden, qkv),
            attention_output: nn::linear(
                &path / "attention" / "output" / "dense",
                hidden,
                hidden,
                loaded_linear(),
            ),
            intermediate: nn::linear(
                &path / "intermediate" / "dense",
                hidden,
                inner,
                loaded_linear(),
            ),
            output: nn::linear(&path / "output" / "dense", inner, hidden, loaded_linear()),
            layernorm_before: norm("layernorm_before"),
            layernorm_after: norm("layernorm_after"),
            heads: config.heads,
            activation: config.activation,
        }
    }

    fn attention(&self, x: &Tensor) -> Tensor {
        let (batch, length, channels) = x.size3().expect("[batch, tokens, hidden]");
        let split = |t: Tensor| {
            t.view([batch, length, self.heads, channels / self.heads])
                .transpose(1, 2)
        };
        let (q, k, v) = (
            split(self.query.forward(x)),
            split(self.key.forward(x)),
            split(self.value.forward(x)),
        );
        // Scale 1/sqrt(head_dim), no mask (ViTSelfAttention).
        let attended = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let merged = attended
            .transpose(1, 2)
            .contiguous()
            .view([batch, length, channels]);
        self.attention_output.forward(&merged)
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.attention(&self.layernorm_before.forward(x));
        let inner = self
            .activation
            .apply(&self.intermediate.forward(&self.layernorm_after.forward(&x)));
        &x + self.output.forward(&inner)
    }
}

/// A loaded ViTModel.
pub struct VitModel {
    pub config: VitConfig,
    cls_token: Tensor,
    position_embeddings: Tensor,
    projection: nn::Conv2D,
    layers: Vec<Layer>,
    layernorm: nn::LayerNorm,
    _vs: VarStore,
}

pub(crate) struct Parts {
    cls_token: Tensor,
    position_embeddings: Tensor,
    projection: nn::Conv2D,
    layers: Vec<Layer>,
    layernorm: nn::LayerNorm,
}

pub(crate) fn build(root: nn::Path, config: &VitConfig) -> Parts {
    let hidden = config.hidden_size;
    let embeddings = &root / "embeddings";
    let patches = (config.image_size / config.patch_size).pow(2);
    let conv = nn::ConvConfig {
        stride: config.patch_size,
        ws_init: nn::Init::Const(0.0),
        bs_init: nn::Init::Const(0.0),
        ..Default::default()
    };
    let layers_path = &root / "encoder" / "layer";
    Parts {
        cls_token: embeddings.zeros("cls_token", &[1, 1, hidden]),
        position_embeddings: embeddings.zeros("position_embeddings", &[1, patches + 1, hidden]),
        projection: nn::conv2d(
            &embeddings / "patch_embeddings" / "projection",
            3,
            hidden,
            config.patch_size,
            conv,
        ),
        layers: (0..config.layers)
            .map(|i| Layer::new(&layers_path / i, config))
            .collect(),
        layernorm: crate::sd::clip::layer_norm(&root / "layernorm", hidden, config.layer_norm_eps),
    }
}

impl VitModel {
    /// Loads `dir/config.json` and `dir/model.safetensors` (converted to float32).
    pub fn load(dir: &Path, device: Device) -> Result<Self, EmbedError> {
        let config = VitConfig::from_file(&dir.join("config.json"))?;
        let file =
            weights::find_weights_file(dir, crate::sd::folder::TRANSFORMERS_WEIGHTS_STEM, None)?;
        let (vs, parts) = weights::build_and_load(
            &file,
            device,
            Kind::Float,
            |root| build(root, &config),
            checkpoint_key,
        )?;
        Ok(Self {
            config,
            cls_token: parts.cls_token,
            position_embeddings: parts.position_embeddings,
            projection: parts.projection,
            layers: parts.layers,
            layernorm: parts.layernorm,
            _vs: vs,
        })
    }

    /// [batch, hidden]: the [CLS] row of `last_hidden_state` for [batch, 3, side, side] pixels.
    pub fn cls_embeds(&self, pixel_values: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        let patches = self
            .projection
            .forward(pixel_values)
            .flatten(2, -1)
            .transpose(1, 2); // [b, n, h]
        let batch = patches.size()[0];
        let cls = self.cls_token.expand([batch, 1, -1], false);
        let mut state = Tensor::cat(&[cls, patches], 1) + &self.position_embeddings;
        for layer in &self.layers {
            state = layer.forward(&state);
        }
        self.layernorm.forward(&state).select(1, 0)
    }
}

/// Keys without a `vit.` prefix; the pooler is skipped.
fn checkpoint_key(key: &str) -> Option<String> {
    let key = key.strip_prefix("vit.").unwrap_or(key);
    (!key.starts_with("pooler.")).then(|| key.to_string())
}
