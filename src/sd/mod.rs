//! Stable Diffusion on libtorch, matching Hugging Face diffusers numerically.
pub mod clip;
pub mod folder;
pub mod tokenizer;
pub mod weights;
pub mod png;
