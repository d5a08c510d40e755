//! `UNet2DConditionModel` configuration as read from a diffusers `unet/config.json`, with
//! diffusers' defaults for missing keys and errors for features this port does not implement.
use std::path::Path;

use crate::sd::model_config::{ConfigReader, ModelError};

/// diffusers' `UNet2DConditionModel.__init__` defaults (diffusers 0.42.1), used for keys that
/// older hub configs omit.
mod defaults {
    pub const DOWN_BLOCK_TYPES: [&str; 4] = [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ];
    pub const UP_BLOCK_TYPES: [&str; 4] = [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ];
    pub const BLOCK_OUT_CHANNELS: [i64; 4] = [320, 640, 1280, 1280];
    pub const LAYERS_PER_BLOCK: i64 = 2;
    pub const CROSS_ATTENTION_DIM: i64 = 1280;
    pub const ATTENTION_HEAD_DIM: i64 = 8;
    pub const NORM_NUM_GROUPS: i64 = 32;
    pub const NORM_EPS: f64 = 1e-5;
    pub const CHANNELS: i64 = 4;
    pub const DOWNSAMPLE_PADDING: i64 = 1;
    pub const CONV_KERNEL: i64 = 3;
}

/// Width of the time embedding relative to `block_out_channels[0]` (diffusers:
/// `time_embed_dim = block_out_channels[0] * 4` for positional embeddings).
const TIME_EMBED_MULTIPLIER: i64 = 4;

/// Whether a down/up block has transformer (cross-attention) layers after its resnets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// `DownBlock2D` / `UpBlock2D`.
    Plain,
    /// `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`.
    CrossAttention,
}

/// The settings the model is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub down_blocks: Vec<BlockKind>,
    pub up_blocks: Vec<BlockKind>,
    pub cross_attention_dim: i64,
    /// Number of attention heads per down block (diffusers' `attention_head_dim`, which is
    /// really a head count; the head width is `channels / heads`).
    pub attention_heads: Vec<i64>,
    /// Transformer blocks per attention layer, per down block.
    pub transformer_layers_per_block: Vec<i64>,
    pub use_linear_projection: bool,
    /// Run attention in float32 when the model runs in half precision (SD 2.1 sets it).
    /// diffusers 0.42.1's SDPA processor ignores the flag (relying on the fused kernels'
    /// float32 accumulation); upcasting here is the safer reading and changes nothing in float32.
    pub upcast_attention: bool,
    pub norm_num_groups: i64,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub center_input_sample: bool,
    pub downsample_padding: i64,
    pub mid_block_scale_factor: f64,
    pub conv_in_kernel: i64,
    pub conv_out_kernel: i64,
    pub time_embed_dim: i64,
    pub sample_size: Option<i64>,
    /// SDXL's `addition_embed_type: text_time`: pooled text embeddings and micro-conditioning
    /// time ids added to the time embedding.
    pub text_time: Option<TextTimeConfig>,
}

/// The sizes of SDXL's added conditioning (`add_time_proj`, `add_embedding`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextTimeConfig {
    /// Width of each time id's sinusoidal embedding (`addition_time_embed_dim`).
    pub time_embed_dim: i64,
    /// Input width of `add_embedding`: pooled text width + 6 × `time_embed_dim`
    /// (`projection_class_embeddings_input_dim`).
    pub input_dim: i64,
}

impl UNetConfig {
    /// Reads `config.json` from `file`.
    pub fn from_file(file: &Path) -> Result<Self, ModelError> {
        Self::from_reader(&ConfigReader::open(file)?)
    }

    /// Parses config text; `file` is only used in error messages.
    pub fn from_json_str(text: &str, file: &Path) -> Result<Self, ModelError> {
        Self::from_reader(&ConfigReader::parse(text, file)?)
    }

    fn from_reader(config: &ConfigReader) -> Result<Self, ModelError> {
        reject_unsupported(config)?;
        let block_out_channels =
            config.int_list("block_out_channels", &defaults::BLOCK_OUT_CHANNELS)?;
        let down_blocks = block_kinds(
            config,
            "down_block_types",
            &defaults::DOWN_BLOCK_TYPES,
            "DownBlock2D",
            "CrossAttnDownBlock2D",
        )?;
        let up_blocks = block_kinds(
            config,
            "up_block_types",
            &defaults::UP_BLOCK_TYPES,
            "UpBlock2D",
            "CrossAttnUpBlock2D",
        )?;
        check_block_counts(config, &block_out_channels, &down_blocks, &up_blocks)?;
        let blocks = down_blocks.len();
        let parsed = Self {
            in_channels: config.int("in_channels", defaults::CHANNELS)?,
            out_channels: config.int("out_channels", defaults::CHANNELS)?,
            layers_per_block: config.int("layers_per_block", defaults::LAYERS_PER_BLOCK)?,
            cross_attention_dim: config
                .int("cross_attention_dim", defaults::CROSS_ATTENTION_DIM)?,
            attention_heads: attention_heads(config, &block_out_channels)?,
            transformer_layers_per_block: config.int_per_block(
                "transformer_layers_per_block",
                1,
                blocks,
            )?,
            use_linear_projection: config.bool("use_linear_projection", false)?,
            upcast_attention: config.bool("upcast_attention", false)?,
            norm_num_groups: config.int("norm_num_groups", defaults::NORM_NUM_GROUPS)?,
            norm_eps: config.float("norm_eps", defaults::NORM_EPS)?,
            flip_sin_to_cos: config.bool("flip_sin_to_cos", true)?,
            freq_shift: config.float("freq_shift", 0.0)?,
            center_input_sample: config.bool("center_input_sample", false)?,
            downsample_padding: config.int("downsample_padding", defaults::DOWNSAMPLE_PADDING)?,
            mid_block_scale_factor: config.float("mid_block_scale_factor", 1.0)?,
            conv_in_kernel: config.int("conv_in_kernel", defaults::CONV_KERNEL)?,
            conv_out_kernel: config.int("conv_out_kernel", defaults::CONV_KERNEL)?,
            time_embed_dim: config
                .optional_int("time_embedding_dim")?
                .unwrap_or(block_out_channels[0] * TIME_EMBED_MULTIPLIER),
            sample_size: config.optional_int("sample_size")?,
            text_time: text_time(config)?,
            block_out_channels,
            down_blocks,
            up_blocks,
        };
        parsed.validate(config)?;
        Ok(parsed)
    }

    /// Rejects sizes the model cannot be built with (they would fail deep inside libtorch).
    fn validate(&self, config: &ConfigReader) -> Result<(), ModelError> {
        let groups = self.norm_num_groups;
        let channels_ok = self
            .block_out_channels
            .iter()
            .all(|&c| c > 0 && c % groups == 0);
        config.check(
            "block_out_channels",
            channels_ok,
            "every entry must be a positive multiple of norm_num_groups",
        )?;
        config.check(
            "layers_per_block",
            self.layers_per_block >= 1,
            "must be at least 1",
        )?;
        config.check("in_channels", self.in_channels >= 1, "must be at least 1")?;
        config.check("out_channels", self.out_channels >= 1, "must be at least 1")?;
        config.check(
            "cross_attention_dim",
            self.cross_attention_dim >= 1,
            "must be at least 1",
        )?;
        let layers_ok = self.transformer_layers_per_block.iter().all(|&n| n >= 1);
        config.check(
            "transformer_layers_per_block",
            layers_ok,
            "must be at least 1",
        )?;
        for (key, kernel) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            config.check(
                key,
                kernel >= 1 && kernel % 2 == 1,
                "must be a positive odd number",
            )?;
        }
        Ok(())
    }
}

/// `addition_embed_type`: none (SD 1.x/2.x) or `text_time` (SDXL) with its two sizes.
fn text_time(config: &ConfigReader) -> Result<Option<TextTimeConfig>, ModelError> {
    match config.optional_string("addition_embed_type")?.as_deref() {
        None => {
            config.require_null("projection_class_embeddings_input_dim")?;
            Ok(None)
        }
        Some("text_time") => {
            let time_embed_dim = config.optional_int("addition_time_embed_dim")?;
            let input_dim = config.optional_int("projection_class_embeddings_input_dim")?;
            let (Some(time_embed_dim), Some(input_dim)) = (time_embed_dim, input_dim) else {
                return Err(config.unsupported(
                    "addition_embed_type",
                    "text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim",
                ));
            };
            config.check(
                "addition_time_embed_dim",
                time_embed_dim >= 2,
                "must be at least 2",
            )?;
            config.check("projection_class_embeddings_input_dim", input_dim > 6 * time_embed_dim,
                "must exceed 6 × addition_time_embed_dim (the six time ids) by the pooled text width")?;
            Ok(Some(TextTimeConfig {
                time_embed_dim,
                input_dim,
            }))
        }
        Some(_) => Err(config.unsupported("addition_embed_type", "supported: null, text_time")),
    }
}

/// Errors for every config feature of `UNet2DConditionModel` that SD 1.x/2.x/XL do not use.
fn reject_unsupported(config: &ConfigReader) -> Result<(), ModelError> {
    for key in [
        "class_embed_type",
        "num_class_embeds",
        "encoder_hid_dim",
        "encoder_hid_dim_type",
        "time_cond_proj_dim",
        "timestep_post_act",
        "time_embedding_act_fn",
        "cross_attention_norm",
        "reverse_transformer_layers_per_block",
        "num_attention_heads",
    ] {
        config.require_null(key)?;
    }
    for key in [
        "dual_cross_attention",
        "only_cross_attention",
        "mid_block_only_cross_attention",
        "resnet_skip_time_act",
        "class_embeddings_concat",
    ] {
        config.require_false(key)?;
    }
    config.require_string(
        "mid_block_type",
        "UNetMidBlock2DCrossAttn",
        &["UNetMidBlock2DCrossAttn"],
    )?;
    config.require_string("act_fn", "silu", &["silu"])?;
    config.require_string("time_embedding_type", "positional", &["positional"])?;
    config.require_string("resnet_time_scale_shift", "default", &["default"])?;
    config.require_string("attention_type", "default", &["default"])?;
    if config.float("resnet_out_scale_factor", 1.0)? != 1.0 {
        return Err(config.unsupported("resnet_out_scale_factor", "only 1.0 is supported"));
    }
    let groups = config.int("norm_num_groups", defaults::NORM_NUM_GROUPS)?;
    config.check("norm_num_groups", groups >= 1, "must be at least 1")?;
    Ok(())
}

fn block_kinds(
    config: &ConfigReader,
    key: &str,
    default: &[&str],
    plain: &str,
    cross_attention: &str,
) -> Result<Vec<BlockKind>, ModelError> {
    config
        .string_list(key, default)?
        .iter()
        .map(|name| match name.as_str() {
            n if n == plain => Ok(BlockKind::Plain),
            n if n == cross_attention => Ok(BlockKind::CrossAttention),
            _ => Err(config.unsupported(
                key,
                format!("supported block types: {plain}, {cross_attention}"),
            )),
        })
        .collect()
}

fn check_block_counts(
    config: &ConfigReader,
    block_out_channels: &[i64],
    down_blocks: &[BlockKind],
    up_blocks: &[BlockKind],
) -> Result<(), ModelError> {
    if down_blocks.is_empty() || down_blocks.len() != block_out_channels.len() {
        return Err(config.unsupported(
            "down_block_types",
            format!(
                "need one down block per block_out_channels entry ({})",
                block_out_channels.len()
            ),
        ));
    }
    if up_blocks.len() != down_blocks.len() {
        return Err(config.unsupported(
            "up_block_types",
            format!(
                "need as many up blocks as down blocks ({})",
                down_blocks.len()
            ),
        ));
    }
    Ok(())
}

/// Head counts per down block. diffusers reads `attention_head_dim` as the number of heads
/// (`num_attention_heads = num_attention_heads or attention_head_dim`); each block's channels
/// must divide evenly.
fn attention_heads(
    config: &ConfigReader,
    block_out_channels: &[i64],
) -> Result<Vec<i64>, ModelError> {
    let key = "attention_head_dim";
    let heads =
        config.int_per_block(key, defaults::ATTENTION_HEAD_DIM, block_out_channels.len())?;
    let divides = heads
        .iter()
        .zip(block_out_channels)
        .all(|(&h, &channels)| h > 0 && channels % h == 0);
    if divides {
        Ok(heads)
    } else {
        Err(config.unsupported(
            key,
            "each block's channel count must be divisible by its head count",
        ))
    }
}
