//! dreampipe: Stable Diffusion fine-tuning experiments as cached YAML pipelines.
//!
//! Data flow: `pipeline` (YAML → validated stages) → `plan` (DAG + fingerprints) → `exec`
//! (concurrent executor, events) → `cache` (content-addressed store); these, with `report`,
//! live in the libtorch-free `dreampipe_core` crate and are re-exported here, as is
//! `dreampipe_kinds` (`kinds`: every kind's typed parameters and schema, the CPU kinds, the
//! output contract, A1111 PNG text, image grids). This crate adds
//! `sd` (the Stable Diffusion implementation on libtorch), the Stable Diffusion stage kinds'
//! implementations (`stages`), the torch verbs (`cli`), CUDA loading (`device`) and `bench`.
pub use dreampipe_core::{cache, exec, imagefile, pipeline, plan, report};
pub use dreampipe_kinds as kinds;

pub mod bench;
pub mod cli;
pub mod device;
pub mod embed;
pub mod sd;
pub mod stages;
