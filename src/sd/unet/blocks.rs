//! The UNet's down, mid and up blocks (`DownBlock2D` / `CrossAttnDownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `UpBlock2D` / `CrossAttnUpBlock2D`). A plain block is a
//! cross-attention block without `attentions`.
use tch::{Tensor, nn};

use super::attention::{Transformer2DModel, TransformerSpec};
use super::config::{BlockKind, UNetConfig};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetSpec, Upsample2D};
use crate::sd::layers::LinearVisitor;

/// Settings shared by every block of one UNet.
#[derive(Debug, Clone, Copy)]
pub struct BlockContext {
    pub temb_channels: i64,
    pub groups: i64,
    pub eps: f64,
    pub context_dim: i64,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
}

impl BlockContext {
    pub fn from_config(config: &UNetConfig) -> Self {
        Self {
            temb_channels: config.time_embed_dim,
            groups: config.norm_num_groups,
            eps: config.norm_eps,
            context_dim: config.cross_attention_dim,
            use_linear_projection: config.use_linear_projection,
            upcast_attention: config.upcast_attention,
        }
    }

    fn resnet(&self, in_channels: i64, out_channels: i64, output_scale_factor: f64) -> ResnetSpec {
        ResnetSpec {
            in_channels,
            out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
            output_scale_factor,
        }
    }

    fn transformer(&self, channels: i64, heads: i64, layers: i64) -> TransformerSpec {
        TransformerSpec {
            channels,
            heads,
            context_dim: self.context_dim,
            layers,
            groups: self.groups,
            use_linear_projection: self.use_linear_projection,
            upcast_attention: self.upcast_attention,
        }
    }
}

/// Shape of one down or up block.
#[derive(Debug, Clone, Copy)]
pub struct BlockSpec {
    pub kind: BlockKind,
    pub in_channels: i64,
    pub out_channels: i64,
    /// For up blocks: the channels coming from the block below (`prev_output_channel`).
    pub prev_out_channels: i64,
    pub layers: i64,
    pub heads: i64,
    pub transformer_layers: i64,
    /// Down blocks: `Some(padding)` adds a downsampler. Up blocks: `Some(_)` adds an upsampler.
    pub resample: Option<i64>,
}

fn attentions(path: &nn::Path, ctx: &BlockContext, spec: &BlockSpec) -> Vec<Transformer2DModel> {
    if spec.kind == BlockKind::Plain {
        return Vec::new();
    }
    (0..spec.layers)
        .map(|i| {
            let transformer =
                ctx.transformer(spec.out_channels, spec.heads, spec.transformer_layers);
            Transformer2DModel::new(path / "attentions" / i, transformer)
        })
        .collect()
}

/// `resnets[i]` (each followed by `attentions[i]` when present), then an optional
/// `downsamplers.0`. Returns every intermediate state for the skip connections.
#[derive(Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// The LoRA targets of this block's attentions, under `prefix.attentions.<i>`.
    pub fn visit_lora_targets(&mut self, prefix: &str, visit: &mut LinearVisitor<'_>) {
        visit_attentions(&mut self.attentions, prefix, visit);
    }

    pub fn new(path: nn::Path, ctx: &BlockContext, spec: &BlockSpec) -> Self {
        let resnets = (0..spec.layers)
            .map(|i| {
                let in_channels = if i == 0 {
                    spec.in_channels
                } else {
                    spec.out_channels
                };
                ResnetBlock2D::new(
                    &path / "resnets" / i,
                    ctx.resnet(in_channels, spec.out_channels, 1.0),
                )
            })
            .collect();
        Self {
            resnets,
            attentions: attentions(&path, ctx, spec),
            downsampler: spec.resample.map(|padding| {
                Downsample2D::new(&path / "downsamplers" / 0, spec.out_channels, padding)
            }),
        }
    }

    /// Returns the block output and the states it contributes to the skip connections.
    pub fn forward(
        &self,
        input: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> (Tensor, Vec<Tensor>) {
        let mut hidden = input.shallow_clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            hidden = resnet.forward(&hidden, Some(temb));
            if let Some(attention) = self.attentions.get(i) {
                hidden = attention.forward(&hidden, context);
            }
            skips.push(hidden.shallow_clone());
        }
        if let Some(downsampler) = &self.downsampler {
            hidden = downsampler.forward(&hidden);
            skips.push(hidden.shallow_clone());
        }
        (hidden, skips)
    }
}

/// `UNetMidBlock2DCrossAttn` with one layer: `resnets.0 → attentions.0 → resnets.1`.
#[derive(Debug)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    /// The LoRA targets of this block's attentions, under `prefix.attentions.<i>`.
    pub fn visit_lora_targets(&mut self, prefix: &str, visit: &mut LinearVisitor<'_>) {
        visit_attentions(&mut self.attentions, prefix, visit);
    }

    pub fn new(path: nn::Path, ctx: &BlockContext, config: &UNetConfig) -> Self {
        let channels = *config.block_out_channels.last().unwrap_or(&0);
        let heads = *config.attention_heads.last().unwrap_or(&1);
        let layers = *config.transformer_layers_per_block.last().unwrap_or(&1);
        let scale = config.mid_block_scale_factor;
        Self {
            resnets: (0..2)
                .map(|i| {
                    ResnetBlock2D::new(&path / "resnets" / i, ctx.resnet(channels, channels, scale))
                })
                .collect(),
            attentions: vec![Transformer2DModel::new(
                &path / "attentions" / 0,
                ctx.transformer(channels, heads, layers),
            )],
        }
    }

    pub fn forward(&self, input: &Tensor, temb: &Tensor, context: &Tensor) -> Tensor {
        let mut hidden = self.resnets[0].forward(input, Some(temb));
        for (attention, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            hidden = attention.forward(&hidden, context);
            hidden = resnet.forward(&hidden, Some(temb));
        }
        hidden
    }
}

/// `resnets[i]` over `cat(hidden, skip)` (each followed by `attentions[i]` when present), then
/// an optional `upsamplers.0`.
#[derive(Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// The LoRA targets of this block's attentions, under `prefix.attentions.<i>`.
    pub fn visit_lora_targets(&mut self, prefix: &str, visit: &mut LinearVisitor<'_>) {
        visit_attentions(&mut self.attentions, prefix, visit);
    }

    pub fn new(path: nn::Path, ctx: &BlockContext, spec: &BlockSpec) -> Self {
        let resnets = (0..spec.layers)
            .map(|i| {
                let skip_channels = if i == spec.layers - 1 {
                    spec.in_channels
                } else {
                    spec.out_channels
                };
                let hidden_channels = if i == 0 {
                    spec.prev_out_channels
                } else {
                    spec.out_channels
                };
                let resnet = ctx.resnet(hidden_channels + skip_channels, spec.out_channels, 1.0);
                ResnetBlock2D::new(&path / "resnets" / i, resnet)
            })
            .collect();
        Self {
            resnets,
            attentions: attentions(&path, ctx, spec),
            upsampler: spec
                .resample
                .map(|_| Upsample2D::new(&path / "upsamplers" / 0, spec.out_channels)),
        }
    }

    /// How many skip states this block consumes.
    pub fn skip_count(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are consumed last-first; `upsample_size` is the spatial size of the next
    /// block's skips.
    pub fn forward(
        &self,
        input: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<[i64; 2]>,
    ) -> Tensor {
        let mut hidden = input.shallow_clone();
        for (i, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            hidden = resnet.forward(&Tensor::cat(&[&hidden, skip], 1), Some(temb));
            if let Some(attention) = self.attentions.get(i) {
                hidden = attention.forward(&hidden, context);
            }
        }
        match &self.upsampler {
            Some(upsampler) => upsampler.forward(&hidden, upsample_size),
            None => hidden,
        }
    }
}

fn visit_attentions(
    attentions: &mut [Transformer2DModel],
    prefix: &str,
    visit: &mut LinearVisitor<'_>,
) {
    for (index, attention) in attentions.iter_mut().enumerate() {
        attention.visit_lora_targets(&format!("{prefix}.attentions.{index}"), visit);
    }
}
