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

/// A dense layer (`torch.nn.Linear`), bias optional.
#[derive(Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(path: nn::Path, in_features: i64, out_features: i64, with_bias: bool) -> Self {
        Self {
            weight: path.zeros("weight", &[out_features, in_features]),
            bias: with_bias.then(|| path.zeros("bias", &[out_features])),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

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
