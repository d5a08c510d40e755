//! PNG output of samples: the kinds crate's writer and A1111 `parameters` text (re-exported),
//! plus what needs the torch side: the conversion of a decoded image tensor to RGB bytes, A1111's
//! sampler names for the schedulers and its short model hash (used by `dreampipe sample` and
//! the sampling stages alike).
pub use dreampipe_kinds::png::*;

use crate::sd::schedulers::SchedulerKind;
use std::path::Path;

/// Converts a decoded image tensor in [-1, 1], shape [3, h, w], to RGB bytes the way diffusers
/// does: `(x / 2 + 0.5).clamp(0, 1)`, then `(x * 255).round()` as uint8.
pub fn tensor_to_rgb_bytes(image: &tch::Tensor) -> Vec<u8> {
    let pixels = (image.to_kind(tch::Kind::Float).to_device(tch::Device::Cpu) / 2.0 + 0.5)
        .clamp(0.0, 1.0)
        .permute([1, 2, 0])
        .contiguous();
    let bytes = (pixels * 255.0)
        .round()
        .to_kind(tch::Kind::Uint8)
        .flatten(0, -1);
    Vec::<u8>::try_from(&bytes).unwrap_or_default()
}

/// A1111-style short model hash: the first 10 hex digits of the blake3 of the UNet weights.
pub fn short_weights_hash(model: &Path) -> String {
    let unet = model.join("unet");
    let file = [
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
    ]
    .iter()
    .map(|name| unet.join(name))
    .find(|path| path.is_file());
    let Some(file) = file else {
        return String::new();
    };
    let mut hasher = blake3::Hasher::new();
    match hasher.update_mmap_rayon(&file) {
        Ok(_) => hasher.finalize().to_hex()[..10].to_string(),
        Err(_) => String::new(),
    }
}

/// The sampler names AUTOMATIC1111 writes for these schedulers.
pub fn a1111_sampler_name(kind: SchedulerKind) -> &'static str {
    match kind {
        SchedulerKind::Ddim => "DDIM",
        SchedulerKind::Pndm => "PLMS",
        SchedulerKind::Lms => "LMS",
        SchedulerKind::Euler => "Euler",
        SchedulerKind::EulerAncestral => "Euler a",
        SchedulerKind::DpmSolverMultistep => "DPM++ 2M",
        SchedulerKind::Ddpm => "DDPM",
    }
}
