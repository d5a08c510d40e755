//! The tests that compare with goldens made on another CPU (diffusers, transformers, torch):
//! one test binary, which `make test-kernels` runs again under ATen's other CPU kernel sets
//! (`ATEN_CPU_CAPABILITY=default|avx2 cargo test --test goldens`). Modules that seed or draw from
//! libtorch's global generator hold `sd_support::global_rng()` meanwhile.
use std::path::{Path, PathBuf};

#[path = "../support/sd.rs"]
mod sd_support;
#[path = "../support/stage.rs"]
mod stage_support;

mod eval_embeddings;
mod sd2_goldens;
mod sd_lora;
mod sd_pipeline;
mod sd_sample_cli;
mod sd_schedulers;
mod sd_text_encoder;
mod sd_unet;
mod sd_vae;
mod sdxl_pipeline;
mod stage_evaluate;
mod train_adamw8bit;
mod train_dreambooth;
mod train_finetune;
mod train_lora;
mod train_lora_sdxl;
mod train_loss;
mod train_optim;
mod train_textual_inversion;
mod train_vae;

/// The repository root (the root package's folder).
fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The binary the CLI tests run: the torch worker, the whole CLI in one process.
fn dreampipe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dreampipe-torch"))
}
