//! PNG output of samples: the kinds crate's writer and A1111 `parameters` text (re-exported),
//! plus the conversion of a decoded image tensor to RGB bytes.
pub use dreampipe_kinds::png::*;

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
