//! diffusers' `UNet2DConditionModel` (SD 1.x / 2.x) on tch: built from `unet/config.json`,
//! with module paths equal to the diffusers weight keys so `diffusion_pytorch_model.safetensors`
//! loads directly. Gradients flow through `forward` (nothing is detached).
pub mod attention;
pub mod blocks;
pub mod checkpointed;
pub mod config;
pub mod embeddings;
pub mod resnet;

use std::path::Path;
use tch::{Device, Kind, Tensor, nn, nn::VarStore};

use crate::sd::layers::{Conv2d, GroupNorm, LinearVisitor};
use crate::sd::model_config::ModelError;
use crate::sd::weights;
use blocks::{BlockContext, BlockSpec, DownBlock, MidBlock, UpBlock};
pub use config::{BlockKind, UNetConfig};
use embeddings::{TimestepEmbedding, timestep_embedding};

/// File names inside a diffusers `unet/` folder.
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_STEM: &str = "diffusion_pytorch_model";

/// Named intermediate activations collected by [`UNet2DConditionModel::forward_with_intermediates`].
pub type Intermediates = Vec<(String, Tensor)>;

/// The conditional denoising UNet.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// SDXL's `add_embedding` (pooled text + time ids → time-embedding width).
    add_embedding: Option<TimestepEmbedding>,
}

/// SDXL's `added_cond_kwargs`: the pooled text embeddings `[b, width]` and the six
/// micro-conditioning time ids `[b, 6]` (original size, crop top-left, target size).
#[derive(Debug)]
pub struct AddedConditions {
    pub text_embeds: Tensor,
    pub time_ids: Tensor,
}

impl UNet2DConditionModel {
    /// Builds the model from `dir/config.json` and loads `dir/diffusion_pytorch_model[.variant].safetensors`
    /// into a fresh `VarStore` on `device` with parameters of `kind`.
    pub fn load(
        dir: &Path,
        device: Device,
        kind: Kind,
        variant: Option<&str>,
    ) -> Result<(VarStore, Self), ModelError> {
        let config = UNetConfig::from_file(&dir.join(CONFIG_FILE))?;
        let file = weights::find_weights_file(dir, WEIGHTS_STEM, variant)?;
        let build = |root: nn::Path| Self::new(root, config);
        let keep_key = |key: &str| Some(key.to_string());
        Ok(weights::build_and_load(
            &file, device, kind, build, keep_key,
        )?)
    }

    /// Creates the (zero-filled) parameters under `path`.
    pub fn new(path: nn::Path, config: UNetConfig) -> Self {
        let ctx = BlockContext::from_config(&config);
        let channels = &config.block_out_channels;
        let first = channels[0];
        Self {
            conv_in: Conv2d::same(
                &path / "conv_in",
                config.in_channels,
                first,
                config.conv_in_kernel,
            ),
            time_embedding: TimestepEmbedding::new(
                &path / "time_embedding",
                first,
                config.time_embed_dim,
            ),
            down_blocks: down_blocks(&path, &ctx, &config),
            mid_block: MidBlock::new(&path / "mid_block", &ctx, &config),
            up_blocks: up_blocks(&path, &ctx, &config),
            conv_norm_out: GroupNorm::new(
                &path / "conv_norm_out",
                config.norm_num_groups,
                first,
                config.norm_eps,
            ),
            conv_out: Conv2d::same(
                &path / "conv_out",
                first,
                config.out_channels,
                config.conv_out_kernel,
            ),
            add_embedding: config.text_time.map(|text_time| {
                TimestepEmbedding::new(
                    &path / "add_embedding",
                    text_time.input_dim,
                    config.time_embed_dim,
                )
            }),
            config,
        }
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Every attention projection LoRA adapters attach to, with its diffusers module path.
    pub fn visit_lora_targets(&mut self, visit: &mut LinearVisitor<'_>) {
        for (index, block) in self.down_blocks.iter_mut().enumerate() {
            block.visit_lora_targets(&format!("down_blocks.{index}"), visit);
        }
        self.mid_block.visit_lora_targets("mid_block", visit);
        for (index, block) in self.up_blocks.iter_mut().enumerate() {
            block.visit_lora_targets(&format!("up_blocks.{index}"), visit);
        }
    }

    /// Predicts the noise (or v) for `sample` `[b, c, h, w]` at `timesteps` (0-d or `[b]`,
    /// integer or float) conditioned on `encoder_hidden_states` `[b, tokens, dim]`.
    /// `sample` and `encoder_hidden_states` must have the parameters' kind and device; like
    /// diffusers, a timestep batch that is neither 1 nor `b` is a (libtorch) panic.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Tensor {
        self.run(sample, timesteps, encoder_hidden_states, None, None)
    }

    /// [`forward`](Self::forward) with SDXL's added conditions (required by a `text_time`
    /// UNet, ignored by others).
    pub fn forward_added(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditions>,
    ) -> Tensor {
        self.run(sample, timesteps, encoder_hidden_states, added, None)
    }

    /// Whether the model takes SDXL's added conditions.
    pub fn takes_added_conditions(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// Like [`forward`](Self::forward), also returning the activations diffusers' forward hooks
    /// see: `time_proj`, `time_embedding`, `conv_in`, `down_blocks.N`, `mid_block`,
    /// `up_blocks.N`, `conv_norm_out`.
    pub fn forward_with_intermediates(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> (Tensor, Intermediates) {
        let mut intermediates = Vec::new();
        let output = self.run(
            sample,
            timesteps,
            encoder_hidden_states,
            None,
            Some(&mut intermediates),
        );
        (output, intermediates)
    }

    fn run(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedConditions>,
        mut record: Option<&mut Intermediates>,
    ) -> Tensor {
        let mut keep = |name: String, tensor: &Tensor| {
            if let Some(list) = record.as_deref_mut() {
                list.push((name, tensor.shallow_clone()));
            }
        };
        let time_proj = self.time_proj(sample, timesteps);
        keep("time_proj".into(), &time_proj);
        let temb = self.with_added(self.time_embedding.forward(&time_proj), added);
        keep("time_embedding".into(), &temb);
        let sample = if self.config.center_input_sample {
            sample * 2.0 - 1.0
        } else {
            sample.shallow_clone()
        };
        let mut hidden = self.conv_in.forward(&sample);
        keep("conv_in".into(), &hidden);
        let mut skips = vec![hidden.shallow_clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            let (output, block_skips) = block.forward(&hidden, &temb, context);
            hidden = output;
            skips.extend(block_skips);
            keep(format!("down_blocks.{i}"), &hidden);
        }
        hidden = self.mid_block.forward(&hidden, &temb, context);
        keep("mid_block".into(), &hidden);
        for (i, block) in self.up_blocks.iter().enumerate() {
            let block_skips = skips.split_off(skips.len().saturating_sub(block.skip_count()));
            let upsample_size = skips.last().map(|next| {
                let size = next.size();
                [size[2], size[3]]
            });
            hidden = block.forward(&hidden, &block_skips, &temb, context, upsample_size);
            keep(format!("up_blocks.{i}"), &hidden);
        }
        let normed = self.conv_norm_out.forward(&hidden);
        keep("conv_norm_out".into(), &normed);
        self.conv_out.forward(&normed.silu())
    }

    /// The time embedding every block takes: the timesteps' (and SDXL's added conditions').
    pub(crate) fn full_time_embedding(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        added: Option<&AddedConditions>,
    ) -> Tensor {
        let temb = self
            .time_embedding
            .forward(&self.time_proj(sample, timesteps));
        self.with_added(temb, added)
    }

    /// `temb + add_embedding(...)` for a `text_time` UNet given added conditions, else `temb`.
    fn with_added(&self, temb: Tensor, added: Option<&AddedConditions>) -> Tensor {
        match (&self.add_embedding, added) {
            (Some(add_embedding), Some(added)) => {
                temb.shallow_clone() + add_embedding.forward(&self.added_embeds(added, &temb))
            }
            _ => temb,
        }
    }

    /// `cat(text_embeds, add_time_proj(time_ids))` in the time embedding's kind, as diffusers'
    /// `get_aug_embed` for `text_time` builds `add_embedding`'s input.
    fn added_embeds(&self, added: &AddedConditions, temb: &Tensor) -> Tensor {
        let width = self.config.text_time.map_or(0, |t| t.time_embed_dim);
        let batch = added.text_embeds.size()[0];
        let time_embeds = timestep_embedding(
            &added.time_ids.flatten(0, -1),
            width,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )
        .reshape([batch, -1]);
        let text_embeds = added.text_embeds.to_kind(time_embeds.kind());
        Tensor::cat(&[text_embeds, time_embeds], -1).to_kind(temb.kind())
    }

    /// The sinusoidal projection of the timesteps, broadcast to the batch, in the sample's kind.
    fn time_proj(&self, sample: &Tensor, timesteps: &Tensor) -> Tensor {
        let timesteps = if timesteps.dim() == 0 {
            timesteps.unsqueeze(0)
        } else {
            timesteps.shallow_clone()
        };
        let batch = sample.size()[0];
        let timesteps = timesteps.to_device(sample.device()).expand([batch], false);
        let first = self.config.block_out_channels[0];
        timestep_embedding(
            &timesteps,
            first,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )
        .to_kind(sample.kind())
    }
}

fn down_blocks(path: &nn::Path, ctx: &BlockContext, config: &UNetConfig) -> Vec<DownBlock> {
    let channels = &config.block_out_channels;
    let last = channels.len() - 1;
    config
        .down_blocks
        .iter()
        .enumerate()
        .map(|(i, &kind)| {
            let spec = BlockSpec {
                kind,
                in_channels: if i == 0 { channels[0] } else { channels[i - 1] },
                out_channels: channels[i],
                prev_out_channels: 0,
                layers: config.layers_per_block,
                heads: config.attention_heads[i],
                transformer_layers: config.transformer_layers_per_block[i],
                resample: (i != last).then_some(config.downsample_padding),
            };
            DownBlock::new(path / "down_blocks" / i, ctx, &spec)
        })
        .collect()
}

fn up_blocks(path: &nn::Path, ctx: &BlockContext, config: &UNetConfig) -> Vec<UpBlock> {
    let reversed: Vec<i64> = config.block_out_channels.iter().rev().copied().collect();
    let heads: Vec<i64> = config.attention_heads.iter().rev().copied().collect();
    let transformer_layers: Vec<i64> = config
        .transformer_layers_per_block
        .iter()
        .rev()
        .copied()
        .collect();
    let last = reversed.len() - 1;
    config
        .up_blocks
        .iter()
        .enumerate()
        .map(|(i, &kind)| {
            let spec = BlockSpec {
                kind,
                in_channels: reversed[(i + 1).min(last)],
                out_channels: reversed[i],
                prev_out_channels: if i == 0 { reversed[0] } else { reversed[i - 1] },
                layers: config.layers_per_block + 1,
                heads: heads[i],
                transformer_layers: transformer_layers[i],
                resample: (i != last).then_some(0),
            };
            UpBlock::new(path / "up_blocks" / i, ctx, &spec)
        })
        .collect()
}
