//! Stable Diffusion on libtorch, matching Hugging Face diffusers numerically.
pub mod layers;
pub mod model_config;
pub mod unet;
pub mod vae;
pub mod weights;
