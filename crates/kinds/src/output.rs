//! The stage-output contract: the names of what a stage leaves at the top of its output folder
//! for the report and for downstream stages (docs/pipelines.md). Every name is here; the two
//! the HTML report reads are defined by the report itself (`dreampipe_core::report::build`) and
//! re-exported, because the report is in the runner crate, which this crate depends on (a
//! definition here would make the runner depend on the kinds).
/// The images a stage wants shown (`{"images": [{path, caption, step}]}`), read by the report.
pub use dreampipe_core::report::build::IMAGES_FILE;
/// The training log (`{"step", "loss", "lr", …}` per line), drawn as curves by the report.
pub use dreampipe_core::report::build::METRICS_FILE;

/// A diffusers model folder inside an output (`textual_inversion`'s `model/`): a `model:`
/// field naming the stage reads it.
pub const MODEL_DIR: &str = "model";
/// The images of an image-set output (`images`, `generate`, `toy_world`): an input field naming
/// the stage reads them.
pub const IMAGES_DIR: &str = "images";
/// A training stage's validation samples, `step-N.png`.
pub const VALIDATION_DIR: &str = "validation";
