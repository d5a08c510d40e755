//! diffusers' `ResnetBlock2D` (time-conditioned or not), `Downsample2D` and `Upsample2D`,
//! shared by the UNet and the VAE.
use tch::{Tensor, nn};

use crate::sd::layers::{Conv2d, GroupNorm, Linear};

/// Shape and normalisation settings of one resnet block.
#[derive(Debug, Clone, Copy)]
pub struct ResnetSpec {
    pub in_channels: i64,
    pub out_channels: i64,
    /// Width of the time embedding; `None` for the VAE (no `time_emb_proj`).
    pub temb_channels: Option<i64>,
    pub groups: i64,
    pub eps: f64,
    pub output_scale_factor: f64,
}

/// `norm1 → SiLU → conv1 (+ time_emb_proj(SiLU(temb))) → norm2 → SiLU → conv2`, plus the
/// (1x1 `conv_shortcut` when the width changes) residual, divided by `output_scale_factor`.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(path: nn::Path, spec: ResnetSpec) -> Self {
        let ResnetSpec {
            in_channels,
            out_channels,
            groups,
            eps,
            ..
        } = spec;
        Self {
            norm1: GroupNorm::new(&path / "norm1", groups, in_channels, eps),
            conv1: Conv2d::same(&path / "conv1", in_channels, out_channels, 3),
            time_emb_proj: spec
                .temb_channels
                .map(|temb| Linear::new(&path / "time_emb_proj", temb, out_channels, true)),
            norm2: GroupNorm::new(&path / "norm2", groups, out_channels, eps),
            conv2: Conv2d::same(&path / "conv2", out_channels, out_channels, 3),
            conv_shortcut: (in_channels != out_channels)
                .then(|| Conv2d::new(&path / "conv_shortcut", in_channels, out_channels, 1, 1, 0)),
            output_scale_factor: spec.output_scale_factor,
        }
    }

    pub fn forward(&self, input: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let convolved = self.conv1.forward(&self.norm1.forward(input).silu());
        let hidden = match (&self.time_emb_proj, temb) {
            (Some(projection), Some(temb)) => {
                convolved + projection.forward(&temb.silu()).unsqueeze(-1).unsqueeze(-1)
            }
            _ => convolved,
        };
        let hidden = self.conv2.forward(&self.norm2.forward(&hidden).silu());
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(input),
            None => input.shallow_clone(),
        };
        let output = shortcut + hidden;
        if self.output_scale_factor == 1.0 {
            output
        } else {
            output / self.output_scale_factor
        }
    }
}

/// Stride-2 3x3 convolution (`downsamplers.0.conv`). With `padding == 0` diffusers pads one
/// zero column/row on the right/bottom first (the VAE does this).
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub fn new(path: nn::Path, channels: i64, padding: i64) -> Self {
        Self {
            conv: Conv2d::new(&path / "conv", channels, channels, 3, 2, padding),
            pad_right_bottom: padding == 0,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        if self.pad_right_bottom {
            self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest-neighbour 2x upsampling (or to an explicit size) then a 3x3 conv
/// (`upsamplers.0.conv`).
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(path: nn::Path, channels: i64) -> Self {
        Self {
            conv: Conv2d::same(&path / "conv", channels, channels, 3),
        }
    }

    /// Upsamples to `size` (height, width) when given, else by 2.
    pub fn forward(&self, x: &Tensor, size: Option<[i64; 2]>) -> Tensor {
        let upsampled = match size {
            Some(size) => x.upsample_nearest2d(size, None, None),
            None => {
                let (height, width) = (x.size()[2], x.size()[3]);
                x.upsample_nearest2d([height * 2, width * 2], 2.0, 2.0)
            }
        };
        self.conv.forward(&upsampled)
    }
}
