//! Attention layers: diffusers' `Attention` (self / cross, through
//! `scaled_dot_product_attention`), the GEGLU `FeedForward`, `BasicTransformerBlock`,
//! `Transformer2DModel` (continuous input, conv or linear projections) and the VAE's
//! single-head spatial self-attention with its own `group_norm`.
use tch::{Kind, Tensor, nn};

use crate::sd::layers::{Conv2d, GroupNorm, LayerNorm, Linear, LinearVisitor};

/// `BasicTransformerBlock` layer-norm epsilon (diffusers' `norm_eps` default there).
const TRANSFORMER_BLOCK_NORM_EPS: f64 = 1e-5;
/// `Transformer2DModel` group-norm epsilon (hard-coded 1e-6 in diffusers).
const TRANSFORMER_GROUP_NORM_EPS: f64 = 1e-6;
/// `FeedForward` hidden width multiplier (diffusers' `mult=4`).
const FEED_FORWARD_MULT: i64 = 4;

/// Scaled dot-product attention over `[batch, tokens, heads * head_dim]` inputs. With
/// `upcast` and a half-precision input the attention itself runs in float32.
fn multi_head_attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    heads: i64,
    upcast: bool,
) -> Tensor {
    let kind = query.kind();
    let upcast = upcast && matches!(kind, Kind::Half | Kind::BFloat16);
    let split = |x: &Tensor| {
        let (batch, tokens, width) = x.size3().unwrap_or_default();
        let x = x
            .view([batch, tokens, heads, width / heads])
            .transpose(1, 2);
        if upcast { x.to_kind(Kind::Float) } else { x }
    };
    let (q, k, v) = (split(query), split(key), split(value));
    let attended =
        Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
    let (batch, _, tokens, head_dim) = attended.size4().unwrap_or_default();
    attended
        .transpose(1, 2)
        .reshape([batch, tokens, heads * head_dim])
        .to_kind(kind)
}

/// diffusers' `Attention` as used in transformer blocks: bias-free `to_q/to_k/to_v`,
/// `to_out.0` with bias. Self-attention when no context is given.
#[derive(Debug)]
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: i64,
    upcast: bool,
}

impl CrossAttention {
    pub fn new(path: nn::Path, query_dim: i64, context_dim: i64, heads: i64, upcast: bool) -> Self {
        Self {
            to_q: Linear::new(&path / "to_q", query_dim, query_dim, false),
            to_k: Linear::new(&path / "to_k", context_dim, query_dim, false),
            to_v: Linear::new(&path / "to_v", context_dim, query_dim, false),
            to_out: Linear::new(&path / "to_out" / 0, query_dim, query_dim, true),
            heads,
            upcast,
        }
    }

    /// `to_q`, `to_k`, `to_v`, `to_out.0` under `prefix` (the targets of diffusers' LoRA scripts).
    pub fn visit_lora_targets(&mut self, prefix: &str, visit: &mut LinearVisitor<'_>) {
        visit(&format!("{prefix}.to_q"), &mut self.to_q);
        visit(&format!("{prefix}.to_k"), &mut self.to_k);
        visit(&format!("{prefix}.to_v"), &mut self.to_v);
        visit(&format!("{prefix}.to_out.0"), &mut self.to_out);
    }

    pub fn forward(&self, hidden: &Tensor, context: Option<&Tensor>) -> Tensor {
        let context = context.unwrap_or(hidden);
        let query = self.to_q.forward(hidden);
        let key = self.to_k.forward(context);
        let value = self.to_v.forward(context);
        let attended = multi_head_attention(&query, &key, &value, self.heads, self.upcast);
        self.to_out.forward(&attended)
    }
}

/// `FeedForward` with GEGLU: `net.2(a * gelu(b))` where `a, b = net.0.proj(x).chunk(2)`.
#[derive(Debug)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn new(path: nn::Path, dim: i64) -> Self {
        let inner = dim * FEED_FORWARD_MULT;
        Self {
            proj: Linear::new(&path / "net" / 0 / "proj", dim, inner * 2, true),
            out: Linear::new(&path / "net" / 2, inner, dim, true),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let projected = self.proj.forward(x);
        let halves = projected.chunk(2, -1);
        self.out.forward(&(&halves[0] * halves[1].gelu("none")))
    }
}

/// Self-attention, cross-attention and feed-forward, each pre-normed and residual.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(path: nn::Path, dim: i64, context_dim: i64, heads: i64, upcast: bool) -> Self {
        Self {
            norm1: LayerNorm::new(&path / "norm1", dim, TRANSFORMER_BLOCK_NORM_EPS),
            attn1: CrossAttention::new(&path / "attn1", dim, dim, heads, upcast),
            norm2: LayerNorm::new(&path / "norm2", dim, TRANSFORMER_BLOCK_NORM_EPS),
            attn2: CrossAttention::new(&path / "attn2", dim, context_dim, heads, upcast),
            norm3: LayerNorm::new(&path / "norm3", dim, TRANSFORMER_BLOCK_NORM_EPS),
            ff: FeedForward::new(&path / "ff", dim),
        }
    }

    /// The projections of `attn1` and `attn2`, then the feed-forward's `ff.net.0.proj` and `ff.net.2`.
    pub fn visit_lora_targets(&mut self, prefix: &str, visit: &mut LinearVisitor<'_>) {
        self.attn1
            .visit_lora_targets(&format!("{prefix}.attn1"), visit);
        self.attn2
            .visit_lora_targets(&format!("{prefix}.attn2"), visit);
        visit(&format!("{prefix}.ff.net.0.proj"), &mut self.ff.proj);
        visit(&format!("{prefix}.ff.net.2"), &mut self.ff.out);
    }

    pub fn forward(&self, hidden: &Tensor, context: &Tensor) -> Tensor {
        let hidden = self.attn1.forward(&self.norm1.forward(hidden), None) + hidden;
        let hidden = self
            .attn2
            .forward(&self.norm2.forward(&hidden), Some(context))
            + hidden;
        self.ff.forward(&self.norm3.forward(&hidden)) + hidden
    }
}

/// `proj_in` / `proj_out`: 1x1 convolutions (SD 1.x) or linear layers (SD 2.x).
#[derive(Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(path: nn::Path, channels: i64, linear: bool) -> Self {
        if linear {
            Self::Linear(Linear::new(path, channels, channels, true))
        } else {
            Self::Conv(Conv2d::new(path, channels, channels, 1, 1, 0))
        }
    }
}

/// Settings of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub struct TransformerSpec {
    pub channels: i64,
    pub heads: i64,
    pub context_dim: i64,
    pub layers: i64,
    pub groups: i64,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
}

/// `norm → proj_in → transformer_blocks → proj_out`, added to the input.
#[derive(Debug)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(path: nn::Path, spec: TransformerSpec) -> Self {
        let channels = spec.channels;
        let blocks = (0..spec.layers)
            .map(|i| {
                let block_path = &path / "transformer_blocks" / i;
                BasicTransformerBlock::new(
                    block_path,
                    channels,
                    spec.context_dim,
                    spec.heads,
                    spec.upcast_attention,
                )
            })
            .collect();
        Self {
            norm: GroupNorm::new(
                &path / "norm",
                spec.groups,
                channels,
                TRANSFORMER_GROUP_NORM_EPS,
            ),
            proj_in: Projection::new(&path / "proj_in", channels, spec.use_linear_projection),
            blocks,
            proj_out: Projection::new(&path / "proj_out", channels, spec.use_linear_projection),
        }
    }

    /// The linear layers of every transformer block, and `proj_in` / `proj_out` where they are
    /// linear (SD 2.x; SD 1.x's are 1x1 convolutions, which take no adapter here).
    pub fn visit_lora_targets(&mut self, prefix: &str, visit: &mut LinearVisitor<'_>) {
        if let Projection::Linear(linear) = &mut self.proj_in {
            visit(&format!("{prefix}.proj_in"), linear);
        }
        for (index, block) in self.blocks.iter_mut().enumerate() {
            block.visit_lora_targets(&format!("{prefix}.transformer_blocks.{index}"), visit);
        }
        if let Projection::Linear(linear) = &mut self.proj_out {
            visit(&format!("{prefix}.proj_out"), linear);
        }
    }

    pub fn forward(&self, input: &Tensor, context: &Tensor) -> Tensor {
        let (batch, channels, height, width) = input.size4().unwrap_or_default();
        let to_tokens = |x: Tensor| {
            x.permute([0, 2, 3, 1])
                .reshape([batch, height * width, channels])
        };
        let to_image = |x: Tensor| {
            x.reshape([batch, height, width, channels])
                .permute([0, 3, 1, 2])
                .contiguous()
        };
        let normed = self.norm.forward(input);
        let mut hidden = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(&normed)),
            Projection::Linear(linear) => linear.forward(&to_tokens(normed)),
        };
        for block in &self.blocks {
            hidden = block.forward(&hidden, context);
        }
        let output = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(hidden)),
            Projection::Linear(linear) => to_image(linear.forward(&hidden)),
        };
        output + input
    }
}

/// The VAE mid-block attention: `group_norm`, single-head attention over pixels with biased
/// `to_q/to_k/to_v/to_out.0`, plus the residual.
#[derive(Debug)]
pub struct SpatialSelfAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialSelfAttention {
    pub fn new(path: nn::Path, channels: i64, groups: i64, eps: f64) -> Self {
        Self {
            group_norm: GroupNorm::new(&path / "group_norm", groups, channels, eps),
            to_q: Linear::new(&path / "to_q", channels, channels, true),
            to_k: Linear::new(&path / "to_k", channels, channels, true),
            to_v: Linear::new(&path / "to_v", channels, channels, true),
            to_out: Linear::new(&path / "to_out" / 0, channels, channels, true),
        }
    }

    pub fn forward(&self, input: &Tensor) -> Tensor {
        let (batch, channels, height, width) = input.size4().unwrap_or_default();
        let normed = self.group_norm.forward(input);
        let tokens = normed
            .view([batch, channels, height * width])
            .transpose(1, 2);
        let query = self.to_q.forward(&tokens);
        let key = self.to_k.forward(&tokens);
        let value = self.to_v.forward(&tokens);
        let attended = self
            .to_out
            .forward(&multi_head_attention(&query, &key, &value, 1, false));
        attended
            .transpose(-1, -2)
            .reshape([batch, channels, height, width])
            + input
    }
}
