//! dreampipe's runner, without libtorch and without any stage kind: pipeline files (`pipeline`:
//! YAML → validated stages), plans (`plan`: DAG + fingerprints + dirty reasons), the executor
//! (`exec`), the content-addressed cache (`cache`), reports (`report`), the stage-kind interface
//! (`stages`: the `Stage` trait, typed parameters, the registry the binaries fill), devices
//! without torch (`device`), image files within one size limit (`imagefile`) and the CLI verbs
//! that need no tensors (`cli`). It names no stage kind and no torch-worker verb: the binaries
//! register both (the kinds come from `dreampipe_kinds`, their implementations needing
//! libtorch from the `dreampipe` crate).
// `#[derive(Params)]` names `::dreampipe_core`, also for the structs core itself declares.
extern crate self as dreampipe_core;

pub mod cache;
pub mod cli;
pub mod device;
pub mod exec;
pub mod imagefile;
pub mod panics;
pub mod pipeline;
pub mod plan;
pub mod report;
pub mod stages;
