//! Pipeline texts that verbs write or run, supplied with the kinds they name by whoever builds
//! the [`Registry`](super::Registry) (the kinds crate): the runner itself names no kind.

/// The pipelines `dreampipe init` writes and `dreampipe bench-cache` runs.
#[derive(Clone, Copy)]
pub struct PipelineTemplates {
    /// `init`'s starter pipeline; `{name}`, `{images}`, `{model}` and `{class}` are replaced.
    pub starter: &'static str,
    /// `init`'s pipeline name when the folder's name has no usable characters.
    pub starter_fallback_name: &'static str,
    /// `bench-cache`: one cheap CPU stage swept over this many variants.
    pub bench_sweep: fn(usize) -> String,
    /// `bench-cache`: one cheap CPU stage reading the folder `model` beside the pipeline.
    pub bench_noop: &'static str,
}
