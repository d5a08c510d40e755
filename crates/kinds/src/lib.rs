//! dreampipe's stage kinds without libtorch: every kind's typed parameters, schema table,
//! version, device class and summary (`sd`: the Stable Diffusion kinds, whose runs need
//! libtorch and are attached by the torch worker; `command`, `images`, `toy_world`: the CPU
//! kinds, run here), the stage-output contract (`output`), the A1111 PNG text format (`png`),
//! labeled image grids (`grid`, `font`) and the torch worker's verbs as the front declares
//! them (`worker_verbs`). Both binaries build their registry from [`registry`]; the runner
//! (`dreampipe_core`) names no kind.
pub mod command;
pub mod font;
pub mod grid;
pub mod images;
pub mod output;
pub mod png;
pub mod sd;
pub mod templates;
pub mod toy_world;
pub mod worker_verbs;
pub mod world_check;

use dreampipe_core::stages::Registry;
use std::sync::Arc;

/// Every stage kind dreampipe ships (add new kinds here, one line each). The Stable Diffusion
/// kinds are schemas only; `dreampipe::stages::registry()` adds their implementations.
pub fn registry() -> Registry {
    Registry::empty()
        .with(Arc::new(command::CommandStage))
        .with(Arc::new(images::ImagesStage))
        .with(Arc::new(toy_world::ToyWorldKind))
        .with(Arc::new(sd::generate::GenerateKind))
        .with(Arc::new(sd::evaluate::EvaluateKind))
        .with(Arc::new(sd::embed::EmbedKind))
        .with(Arc::new(sd::sample_grid::SampleGridKind))
        .with(Arc::new(sd::textual_inversion::TextualInversionKind))
        .with(Arc::new(sd::dreambooth::DreamBoothKind))
        .with(Arc::new(sd::dreambooth_lora::DreamBoothLoraKind))
        .with(Arc::new(sd::finetune::FinetuneKind))
        .with(Arc::new(sd::vae::VaeKind))
        .with(Arc::new(sd::world_score::WorldScoreKind))
        .with_templates(templates::templates())
}
