//! Stable Diffusion on libtorch, matching Hugging Face diffusers numerically.
pub mod train;
pub mod weights;
