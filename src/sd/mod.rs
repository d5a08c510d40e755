//! Stable Diffusion on libtorch, matching Hugging Face diffusers numerically.
pub mod schedulers;
pub mod weights;
