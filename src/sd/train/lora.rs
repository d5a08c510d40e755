//! LoRA training as diffusers' train_dreambooth_lora.py sets it up: adapters of rank `rank` on
//! the UNet's attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`) and, with
//! `train_text_encoder`, on the text encoder's (`q_proj`, `k_proj`, `v_proj`, `out_proj`),
//! scaled by `lora_alpha / rank`, initialised as PEFT's `init_lora_weights="gaussian"` does
//! (A ~ N(0, 1/rank), B = 0), trained while the base weights stay frozen. The adapters' tensors
//! are named as PEFT names them (`unet.<module>.lora_A.weight`), which is also how checkpoints
//! store them.
use crate::sd::clip::ClipTextModel;
use crate::sd::layers::{Linear, LoraAdapter};
use crate::sd::lora::{Component, LoraModule, LoraWeights};
use crate::sd::rng::Generator;
use crate::sd::unet::UNet2DConditionModel;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The script's UNet targets (`add_k_proj` / `add_v_proj` do not exist in SD 1.x/2.x UNets).
const UNET_TARGETS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];
/// The script's text-encoder targets.
const TEXT_TARGETS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];
/// Name suffixes of the two matrices (PEFT's).
const DOWN: &str = "lora_A.weight";
const UP: &str = "lora_B.weight";

/// `--rank` and `lora_alpha` (the script sets alpha = rank).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraSettings {
    pub rank: i64,
    pub alpha: f64,
}

impl LoraSettings {
    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

fn is_target(path: &str, targets: &[&str]) -> bool {
    targets
        .iter()
        .any(|target| path.ends_with(&format!(".{target}")))
}

/// Creates the adapters of one component on its targets; returns their trainable tensors
/// named `<prefix>.<module>.lora_A.weight` / `.lora_B.weight`, in model order.
fn add_adapters(
    visit_all: &mut dyn FnMut(&mut crate::sd::layers::LinearVisitor<'_>),
    component: Component,
    settings: LoraSettings,
    generator: &mut Generator,
    device: Device,
) -> Vec<(String, Tensor)> {
    let targets: &[&str] = match component {
        Component::Unet => &UNET_TARGETS,
        Component::TextEncoder | Component::TextEncoder2 => &TEXT_TARGETS,
    };
    let prefix = component.diffusers_prefix();
    let mut named = Vec::new();
    visit_all(&mut |path, linear: &mut Linear| {
        if !is_target(path, targets) {
            return;
        }
        let (out_features, in_features) = linear.weight_shape();
        let std = 1.0 / settings.rank as f64;
        let down = (generator.randn(&[settings.rank, in_features], Kind::Float) * std)
            .to_device(device)
            .set_requires_grad(true);
        let up = Tensor::zeros([out_features, settings.rank], (Kind::Float, device))
            .set_requires_grad(true);
        linear.adapters_mut().push(LoraAdapter {
            down: down.shallow_clone(),
            up: up.shallow_clone(),
            scale: settings.scaling(),
        });
        named.push((format!("{prefix}.{path}.{DOWN}"), down));
        named.push((format!("{prefix}.{path}.{UP}"), up));
    });
    named
}

/// Adds trainable adapters to the UNet (and the text encoder when given), seeded by `seed`.
pub fn add_trainable_adapters(
    unet: &mut UNet2DConditionModel,
    texts: TextEncoders<'_>,
    settings: LoraSettings,
    seed: u64,
    device: Device,
) -> Vec<(String, Tensor)> {
    let mut generator = Generator::new(seed);
    let mut named = add_adapters(
        &mut |visit| unet.visit_lora_targets(visit),
        Component::Unet,
        settings,
        &mut generator,
        device,
    );
    let encoders = [
        (texts.first, Component::TextEncoder),
        (texts.second, Component::TextEncoder2),
    ];
    for (encoder, component) in encoders {
        if let Some(encoder) = encoder {
            named.extend(add_adapters(
                &mut |visit| encoder.visit_lora_targets(visit),
                component,
                settings,
                &mut generator,
                device,
            ));
        }
    }
    named
}

/// The text encoders that get adapters (none: the UNet only; SDXL has a second).
#[derive(Default)]
pub struct TextEncoders<'a> {
    pub first: Option<&'a mut ClipTextModel>,
    pub second: Option<&'a mut ClipTextModel>,
}

/// Copies `values` (by name) into the adapters' tensors: a run starting from given weights
/// (the goldens start from PEFT's draw).
pub fn set_adapter_weights(trainables: &[(String, Tensor)], values: &[(String, Tensor)]) {
    let values: std::collections::HashMap<&str, &Tensor> =
        values.iter().map(|(n, t)| (n.as_str(), t)).collect();
    tch::no_grad(|| {
        for (name, tensor) in trainables {
            if let Some(value) = values.get(name.as_str()) {
                tensor.shallow_clone().copy_(value);
            }
        }
    });
}

/// The trained adapters as [`LoraWeights`] (alpha recorded), from their PEFT-named tensors.
pub fn trained_weights(
    trainables: &[(String, Tensor)],
    settings: LoraSettings,
    source: &Path,
) -> LoraWeights {
    let mut modules = Vec::new();
    for pair in trainables.chunks(2) {
        let [(down_name, down), (_, up)] = pair else {
            continue;
        };
        let name = down_name.trim_end_matches(&format!(".{DOWN}"));
        let (component, path) = match name.split_once('.') {
            Some(("unet", path)) => (Component::Unet, path),
            Some(("text_encoder_2", path)) => (Component::TextEncoder2, path),
            Some((_, path)) => (Component::TextEncoder, path),
            None => continue,
        };
        modules.push(LoraModule {
            component,
            path: path.to_string(),
            down: down.detach().to_device(Device::Cpu),
            up: up.detach().to_device(Device::Cpu),
            alpha: Some(settings.alpha),
        });
    }
    LoraWeights {
        modules,
        source: source.to_path_buf(),
    }
}
