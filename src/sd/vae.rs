//! diffusers' `AutoencoderKL` (the SD VAE): encoder to a diagonal Gaussian over latents,
//! decoder back to images, built from `vae/config.json` with diffusers' weight key names.
use std::path::Path;
use tch::{Device, Kind, Tensor, nn, nn::VarStore};

use crate::sd::layers::{Conv2d, GroupNorm};
use crate::sd::model_config::{ConfigReader, ModelError};
use crate::sd::unet::attention::SpatialSelfAttention;
use crate::sd::unet::resnet::{Downsample2D, ResnetBlock2D, ResnetSpec, Upsample2D};
use crate::sd::weights;

/// File names inside a diffusers `vae/` folder.
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_STEM: &str = "diffusion_pytorch_model";

/// Epsilon of every VAE norm (diffusers hard-codes `1e-6` in `Encoder` / `Decoder`).
const VAE_NORM_EPS: f64 = 1e-6;
/// `DiagonalGaussianDistribution` clamps the log-variance to this range.
const LOGVAR_RANGE: (f64, f64) = (-30.0, 20.0);
/// diffusers' `AutoencoderKL` defaults for keys older configs omit.
const DEFAULT_SCALING_FACTOR: f64 = 0.18215;
const DEFAULT_BLOCK_OUT_CHANNELS: [i64; 1] = [64];
const DEFAULT_NORM_NUM_GROUPS: i64 = 32;
const DEFAULT_LATENT_CHANNELS: i64 = 4;
const DEFAULT_IMAGE_CHANNELS: i64 = 3;
const DOWN_BLOCK_TYPE: &str = "DownEncoderBlock2D";
const UP_BLOCK_TYPE: &str = "UpDecoderBlock2D";

/// The settings the VAE is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub latent_channels: i64,
    pub norm_num_groups: i64,
    pub scaling_factor: f64,
    pub sample_size: Option<i64>,
    /// The pipeline runs the VAE in float32 even when the rest is half precision.
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl VaeConfig {
    pub fn from_file(file: &Path) -> Result<Self, ModelError> {
        Self::from_reader(&ConfigReader::open(file)?)
    }

    /// Parses config text; `file` is only used in error messages.
    pub fn from_json_str(text: &str, file: &Path) -> Result<Self, ModelError> {
        Self::from_reader(&ConfigReader::parse(text, file)?)
    }

    fn from_reader(config: &ConfigReader) -> Result<Self, ModelError> {
        config.require_string("act_fn", "silu", &["silu"])?;
        config.require_null("shift_factor")?;
        config.require_null("latents_mean")?;
        config.require_null("latents_std")?;
        let block_out_channels =
            config.int_list("block_out_channels", &DEFAULT_BLOCK_OUT_CHANNELS)?;
        let groups = config.int("norm_num_groups", DEFAULT_NORM_NUM_GROUPS)?;
        config.check("norm_num_groups", groups >= 1, "must be at least 1")?;
        let channels_ok = !block_out_channels.is_empty()
            && block_out_channels.iter().all(|&c| c > 0 && c % groups == 0);
        config.check(
            "block_out_channels",
            channels_ok,
            "need at least one entry, each a positive multiple of norm_num_groups",
        )?;
        config.check(
            "layers_per_block",
            config.int("layers_per_block", 1)? >= 1,
            "must be at least 1",
        )?;
        for (key, expected) in [
            ("down_block_types", DOWN_BLOCK_TYPE),
            ("up_block_types", UP_BLOCK_TYPE),
        ] {
            let types = config.string_list(key, &[expected])?;
            if types.len() != block_out_channels.len() || types.iter().any(|t| t != expected) {
                return Err(config.unsupported(
                    key,
                    format!("need {} entries, each {expected}", block_out_channels.len()),
                ));
            }
        }
        Ok(Self {
            in_channels: config.int("in_channels", DEFAULT_IMAGE_CHANNELS)?,
            out_channels: config.int("out_channels", DEFAULT_IMAGE_CHANNELS)?,
            layers_per_block: config.int("layers_per_block", 1)?,
            latent_channels: config.int("latent_channels", DEFAULT_LATENT_CHANNELS)?,
            norm_num_groups: config.int("norm_num_groups", DEFAULT_NORM_NUM_GROUPS)?,
            scaling_factor: config.float("scaling_factor", DEFAULT_SCALING_FACTOR)?,
            sample_size: config.optional_int("sample_size")?,
            force_upcast: config.bool("force_upcast", true)?,
            use_quant_conv: config.bool("use_quant_conv", true)?,
            use_post_quant_conv: config.bool("use_post_quant_conv", true)?,
            mid_block_add_attention: config.bool("mid_block_add_attention", true)?,
            block_out_channels,
        })
    }

    fn resnet(&self, in_channels: i64, out_channels: i64) -> ResnetSpec {
        ResnetSpec {
            in_channels,
            out_channels,
            temb_channels: None,
            groups: self.norm_num_groups,
            eps: VAE_NORM_EPS,
            output_scale_factor: 1.0,
        }
    }
}

/// `UNetMidBlock2D` without time embedding: `resnets.0 → attentions.0 → resnets.1`.
#[derive(Debug)]
struct VaeMidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<SpatialSelfAttention>,
}

impl VaeMidBlock {
    fn new(path: nn::Path, config: &VaeConfig, channels: i64) -> Self {
        Self {
            resnets: (0..2)
                .map(|i| {
                    ResnetBlock2D::new(&path / "resnets" / i, config.resnet(channels, channels))
                })
                .collect(),
            attention: config.mid_block_add_attention.then(|| {
                SpatialSelfAttention::new(
                    &path / "attentions" / 0,
                    channels,
                    config.norm_num_groups,
                    VAE_NORM_EPS,
                )
            }),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let hidden = self.resnets[0].forward(x, None);
        let hidden = match &self.attention {
            Some(attention) => attention.forward(&hidden),
            None => hidden,
        };
        self.resnets[1].forward(&hidden, None)
    }
}

/// A `DownEncoderBlock2D` or `UpDecoderBlock2D`: resnets then an optional resampler.
#[derive(Debug)]
struct VaeBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
    upsampler: Option<Upsample2D>,
}

impl VaeBlock {
    fn resnets(
        path: &nn::Path,
        config: &VaeConfig,
        layers: i64,
        in_channels: i64,
        out_channels: i64,
    ) -> Vec<ResnetBlock2D> {
        (0..layers)
            .map(|i| {
                let input = if i == 0 { in_channels } else { out_channels };
                ResnetBlock2D::new(path / "resnets" / i, config.resnet(input, out_channels))
            })
            .collect()
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut hidden = x.shallow_clone();
        for resnet in &self.resnets {
            hidden = resnet.forward(&hidden, None);
        }
        if let Some(downsampler) = &self.downsampler {
            hidden = downsampler.forward(&hidden);
        }
        if let Some(upsampler) = &self.upsampler {
            hidden = upsampler.forward(&hidden, None);
        }
        hidden
    }
}

/// `conv_in → down_blocks → mid_block → conv_norm_out → SiLU → conv_out` (2 x latent channels).
#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<VaeBlock>,
    mid_block: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(path: nn::Path, config: &VaeConfig) -> Self {
        let channels = &config.block_out_channels;
        let last = channels.len() - 1;
        let down_blocks = (0..channels.len())
            .map(|i| {
                let block_path = &path / "down_blocks" / i;
                let input = if i == 0 { channels[0] } else { channels[i - 1] };
                VaeBlock {
                    resnets: VaeBlock::resnets(
                        &block_path,
                        config,
                        config.layers_per_block,
                        input,
                        channels[i],
                    ),
                    // DownEncoderBlock2D uses downsample_padding 0 (pad right/bottom, then conv).
                    downsampler: (i != last).then(|| {
                        Downsample2D::new(&block_path / "downsamplers" / 0, channels[i], 0)
                    }),
                    upsampler: None,
                }
            })
            .collect();
        Self {
            conv_in: Conv2d::same(&path / "conv_in", config.in_channels, channels[0], 3),
            down_blocks,
            mid_block: VaeMidBlock::new(&path / "mid_block", config, channels[last]),
            conv_norm_out: GroupNorm::new(
                &path / "conv_norm_out",
                config.norm_num_groups,
                channels[last],
                VAE_NORM_EPS,
            ),
            conv_out: Conv2d::same(
                &path / "conv_out",
                channels[last],
                2 * config.latent_channels,
                3,
            ),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut hidden = self.conv_in.forward(x);
        for block in &self.down_blocks {
            hidden = block.forward(&hidden);
        }
        let hidden = self.mid_block.forward(&hidden);
        self.conv_out
            .forward(&self.conv_norm_out.forward(&hidden).silu())
    }
}

/// `conv_in → mid_block → up_blocks → conv_norm_out → SiLU → conv_out`.
#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: VaeMidBlock,
    up_blocks: Vec<VaeBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(path: nn::Path, config: &VaeConfig) -> Self {
        let reversed: Vec<i64> = config.block_out_channels.iter().rev().copied().collect();
        let last = reversed.len() - 1;
        let up_blocks = (0..reversed.len())
            .map(|i| {
                let block_path = &path / "up_blocks" / i;
                let input = if i == 0 { reversed[0] } else { reversed[i - 1] };
                VaeBlock {
                    resnets: VaeBlock::resnets(
                        &block_path,
                        config,
                        config.layers_per_block + 1,
                        input,
                        reversed[i],
                    ),
                    downsampler: None,
                    upsampler: (i != last)
                        .then(|| Upsample2D::new(&block_path / "upsamplers" / 0, reversed[i])),
                }
            })
            .collect();
        Self {
            conv_in: Conv2d::same(&path / "conv_in", config.latent_channels, reversed[0], 3),
            mid_block: VaeMidBlock::new(&path / "mid_block", config, reversed[0]),
            up_blocks,
            conv_norm_out: GroupNorm::new(
                &path / "conv_norm_out",
                config.norm_num_groups,
                reversed[last],
                VAE_NORM_EPS,
            ),
            conv_out: Conv2d::same(&path / "conv_out", reversed[last], config.out_channels, 3),
        }
    }

    fn forward(&self, z: &Tensor) -> Tensor {
        let mut hidden = self.mid_block.forward(&self.conv_in.forward(z));
        for block in &self.up_blocks {
            hidden = block.forward(&hidden);
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&hidden).silu())
    }
}

/// The posterior `N(mean, std^2)` over latents returned by [`AutoencoderKL::encode`].
#[derive(Debug)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Log-variance, clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// Splits `[b, 2c, h, w]` moments into mean and log-variance.
    pub fn from_moments(moments: &Tensor) -> Self {
        let halves = moments.chunk(2, 1);
        let logvar = halves[1].clamp(LOGVAR_RANGE.0, LOGVAR_RANGE.1);
        let std = (&logvar * 0.5).exp();
        Self {
            mean: halves[0].shallow_clone(),
            logvar,
            std,
        }
    }

    /// `mean + std * randn`, drawn from the thread's seeded generator (`sd::rng::seeded(s)`
    /// reproduces diffusers' `Generator().manual_seed(s)`; outside a scope, tch's global one).
    pub fn sample(&self) -> Tensor {
        let noise = crate::sd::rng::randn(&self.mean.size(), self.mean.kind(), self.mean.device());
        &self.mean + &self.std * noise
    }

    /// The distribution's mode (= mean).
    pub fn mode(&self) -> Tensor {
        self.mean.shallow_clone()
    }
}

/// The SD variational autoencoder.
#[derive(Debug)]
pub struct AutoencoderKL {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    /// Builds the VAE from `dir/config.json` and loads `dir/diffusion_pytorch_model[.variant].safetensors`.
    /// Checkpoints saved with the deprecated attention names (`query`, `key`, `value`,
    /// `proj_attn`) are renamed on the fly as diffusers does.
    pub fn load(
        dir: &Path,
        device: Device,
        kind: Kind,
        variant: Option<&str>,
    ) -> Result<(VarStore, Self), ModelError> {
        let config = VaeConfig::from_file(&dir.join(CONFIG_FILE))?;
        let file = weights::find_weights_file(dir, WEIGHTS_STEM, variant)?;
        let build = |root: nn::Path| Self::new(root, config);
        let rename = |key: &str| Some(rename_deprecated_attention(key));
        Ok(weights::build_and_load(&file, device, kind, build, rename)?)
    }

    /// Creates the (zero-filled) parameters under `path`.
    pub fn new(path: nn::Path, config: VaeConfig) -> Self {
        let latent = config.latent_channels;
        Self {
            encoder: Encoder::new(&path / "encoder", &config),
            decoder: Decoder::new(&path / "decoder", &config),
            quant_conv: config
                .use_quant_conv
                .then(|| Conv2d::new(&path / "quant_conv", 2 * latent, 2 * latent, 1, 1, 0)),
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| Conv2d::new(&path / "post_quant_conv", latent, latent, 1, 1, 0)),
            config,
        }
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Latents are multiplied by this before the UNet sees them.
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// Images `[b, 3, H, W]` in [-1, 1] to the latent posterior.
    pub fn encode(&self, images: &Tensor) -> DiagonalGaussian {
        let hidden = self.encoder.forward(images);
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&hidden),
            None => hidden,
        };
        DiagonalGaussian::from_moments(&moments)
    }

    /// Latents (unscaled) to images in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        let latents = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents),
            None => latents.shallow_clone(),
        };
        self.decoder.forward(&latents)
    }
}

/// Maps the pre-0.14 diffusers VAE attention names to the current ones.
fn rename_deprecated_attention(key: &str) -> String {
    const RENAMES: [(&str, &str); 4] = [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ];
    RENAMES
        .iter()
        .find(|(old, _)| key.contains(old))
        .map_or_else(|| key.to_string(), |(old, new)| key.replacen(old, new, 1))
}
