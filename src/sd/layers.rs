//! The parameterised layers the SD models are built from (conv, linear, group/layer norm), with
//! variables named as PyTorch names them (`weight`, `bias`) so diffusers checkpoints load as-is.
//! Variables are created zero-filled: every model here is meant to be filled by
//! `weights::load_into` right after construction, and zeros are the cheapest allocation.
use tch::{Tensor, nn};

/// A 2-D convolution (`torch.nn.Conv2d`, dilation 1, groups 1, with bias).
#[derive(Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    /// `Conv2d(in_channels, out_channels, kernel, stride, padding)` under `path`.
    pub fn new(
        path: nn::Path,
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    ) -> Self {
        Self {
            weight: path.zeros("weight", &[out_channels, in_channels, kernel, kernel]),
            bias: path.zeros("bias", &[out_channels]),
            stride,
            padding,
        }
    }

    /// A stride-1 convolution that keeps the spatial size (`padding = (kernel - 1) / 2`).
    pub fn same(path: nn::Path, in_channels: i64, out_channels: i64, kernel: i64) -> Self {
        Self::new(path, in_channels, out_channels, kernel, 1, (kernel - 1) / 2)
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.weight,
            Some(&self.bias),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )
    }
}

/// A dense layer (`torch.nn.Linear`), bias optional, with the LoRA adapters attached to it
/// (none unless `sd::lora` attaches some).
#[derive(Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    adapters: Vec<LoraAdapter>,
}

/// One low-rank update of a [`Linear`]: `x -> up(down(x)) * scale`, added to the layer's output
/// as PEFT's LoRA layer adds it (input cast to the adapter's dtype, sum cast back).
#[derive(Debug)]
pub struct LoraAdapter {
    /// `lora_A` / `lora_down`: `[rank, in_features]`.
    pub down: Tensor,
    /// `lora_B` / `lora_up`: `[out_features, rank]`.
    pub up: Tensor,
    /// `lora_alpha / rank` times the user's weight for this adapter.
    pub scale: f64,
}

impl Linear {
    pub fn new(path: nn::Path, in_features: i64, out_features: i64, with_bias: bool) -> Self {
        Self {
            weight: path.zeros("weight", &[out_features, in_features]),
            bias: with_bias.then(|| path.zeros("bias", &[out_features])),
            adapters: Vec::new(),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let base = x.linear(&self.weight, self.bias.as_ref());
        if self.adapters.is_empty() {
            return base;
        }
        let kind = base.kind();
        let sum = self.adapters.iter().fold(base, |sum, adapter| {
            let update = x
                .to_kind(adapter.down.kind())
                .linear::<Tensor>(&adapter.down, None)
                .linear::<Tensor>(&adapter.up, None)
                * adapter.scale;
            sum + update
        });
        sum.to_kind(kind)
    }

    /// `[out_features, in_features]`.
    pub fn weight_shape(&self) -> (i64, i64) {
        let size = self.weight.size();
        (size[0], size[1])
    }

    /// The adapters applied after the layer, in order.
    pub fn adapters_mut(&mut self) -> &mut Vec<LoraAdapter> {
        &mut self.adapters
    }
}

/// Called with each LoRA-targetable layer of a model and its diffusers module path
/// (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`).
pub type LinearVisitor<'a> = dyn FnMut(&str, &mut Linear) + 'a;

/// `torch.nn.GroupNorm` with affine parameters.
#[derive(Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: i64,
    eps: f64,
}

impl GroupNorm {
    pub fn new(path: nn::Path, groups: i64, channels: i64, eps: f64) -> Self {
        Self {
            weight: path.zeros("weight", &[channels]),
            bias: path.zeros("bias", &[channels]),
            groups,
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.group_norm(
            self.groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// `torch.nn.LayerNorm` over the last dimension, with affine parameters.
#[derive(Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn new(path: nn::Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: path.zeros("weight", &[dim]),
            bias: path.zeros("bias", &[dim]),
            dim,
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}
