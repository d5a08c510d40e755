//! dreampipe's core, without libtorch: pipeline files (`pipeline`: YAML → validated stages),
//! plans (`plan`: DAG + fingerprints + dirty reasons), the executor (`exec`), the
//! content-addressed cache (`cache`), reports (`report`, `png`), stage kinds (`stages`: the
//! trait, the CPU kinds and the Stable Diffusion kinds' schemas), devices without torch
//! (`device`), image files within one size limit (`imagefile`) and the CLI verbs that need no tensors (`cli`). The `dreampipe` crate adds the
//! Stable Diffusion implementation and the torch worker binary.
pub mod cache;
pub mod cli;
pub mod device;
pub mod exec;
pub mod imagefile;
pub mod panics;
pub mod pipeline;
pub mod plan;
pub mod png;
pub mod report;
pub mod stages;
