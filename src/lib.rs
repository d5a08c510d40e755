//! dreampipe: Stable Diffusion fine-tuning experiments as cached YAML pipelines.
//!
//! Data flow: `pipeline` (YAML → validated stages) → `plan` (DAG + fingerprints) → `exec`
//! (concurrent executor, events) → `cache` (content-addressed store). `sd` is the Stable
//! Diffusion implementation the GPU stages run on; `device` picks CPU/CUDA.
pub mod bench;
pub mod cache;
pub mod cli;
pub mod device;
pub mod exec;
pub mod pipeline;
pub mod plan;
pub mod report;
pub mod sd;
pub mod stages;
