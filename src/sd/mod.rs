//! Stable Diffusion on libtorch, matching Hugging Face diffusers numerically.
pub mod weights;
pub mod png;
