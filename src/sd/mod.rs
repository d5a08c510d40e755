//! Stable Diffusion on libtorch, matching Hugging Face diffusers numerically.
pub mod autocast;
pub mod clip;
pub mod folder;
pub mod init;
pub mod layers;
pub mod model_config;
pub mod pipeline;
pub mod png;
pub mod pool;
pub mod rng;
pub mod schedulers;
pub mod single_file;
pub mod tokenizer;
pub mod train;
pub mod unet;
pub mod vae;
pub mod weights;
