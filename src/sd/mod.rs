//! Stable Diffusion on libtorch, matching Hugging Face diffusers numerically.
pub mod weights;
pub mod clip;
pub mod folder;
pub mod tokenizer;
