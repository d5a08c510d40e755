//! The stage kinds with their implementations: the core's stage interface (re-exported), the
//! kinds of `dreampipe_kinds` and the Stable Diffusion kinds' `run`s, which need libtorch
//! (their schemas live in `dreampipe_kinds::sd`, so the front binary can validate and plan
//! without it).
pub mod dreambooth;
pub mod evaluate;
pub mod generate;
pub mod sample_grid;
pub mod sd_common;
pub mod textual_inversion;
pub mod training;
pub mod vae;
pub mod world_score;

pub use dreampipe_core::stages::*;

/// Every stage kind dreampipe ships, each with its implementation.
pub fn registry() -> Registry {
    dreampipe_kinds::registry()
        .implement("generate", generate::run)
        .implement("evaluate", evaluate::run)
        .implement("embed", evaluate::embed_stage::run)
        .implement("sample_grid", sample_grid::run)
        .implement("textual_inversion", textual_inversion::run)
        .implement("dreambooth", dreambooth::run)
        .implement("dreambooth_lora", dreambooth::run_lora)
        .implement("finetune", dreambooth::run_finetune)
        .implement("vae", vae::run)
        .implement("world_score", world_score::run)
}
