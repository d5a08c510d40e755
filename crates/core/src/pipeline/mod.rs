//! Pipeline files: parsing (`spec`, `limits`), validation reporting every error at once
//! (`validate`, with its `typecheck` for values against their schema, `substitution` for
//! `${params.X}`, `cycles`, `suggest` for "did you mean"), sweep expansion (`sweep`) and stage
//! presets (`presets`), placement (`resources`: a stage's `resources:` and the `executor:`
//! section). The result is a [`Pipeline`]: a
//! flat list of concrete stage instances with their upstream edges resolved.
pub mod limits;
pub mod presets;
pub mod resources;
pub mod spec;
pub mod suggest;
pub mod sweep;
pub mod validate;

use crate::stages::Stage;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

pub use resources::{ExecutorKind, ExecutorSpec, MAX_GPUS_PER_STAGE, Resources};
pub use validate::{LoadOptions, load, load_str};

/// One problem in a pipeline file, located as precisely as the parser allows.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based line and column.
    pub location: Option<(usize, usize)>,
    pub stage: Option<String>,
    /// Dotted field path inside the stage (or the top-level section).
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, column)) = self.location {
            write!(f, ":{line}:{column}")?;
        }
        write!(f, ": ")?;
        match (&self.stage, &self.field) {
            (Some(stage), Some(field)) => write!(f, "stage `{stage}`, field `{field}`: ")?,
            (Some(stage), None) => write!(f, "stage `{stage}`: ")?,
            (None, Some(field)) => write!(f, "`{field}`: ")?,
            (None, None) => {}
        }
        write!(f, "{}", self.message)
    }
}

/// Every problem found in a pipeline file.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineError {
    pub file: PathBuf,
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.diagnostics.len();
        let plural = if count == 1 { "" } else { "s" };
        write!(
            f,
            "pipeline `{}` is invalid ({count} error{plural}):",
            self.file.display()
        )?;
        for diagnostic in &self.diagnostics {
            write!(f, "\n  {diagnostic}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PipelineError {}

/// One axis value of a sweep: which stage declared it, the field and its display text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Coord {
    pub origin: String,
    pub field: String,
    pub value: String,
}

/// A concrete stage after sweep expansion.
#[derive(Clone)]
pub struct StageInstance {
    /// Unique id: the name, plus `[field=value,…]` for sweep variants.
    pub id: String,
    /// The stage's name in the file.
    pub name: String,
    pub kind: Arc<dyn Stage>,
    /// Every schema field with defaults filled in (inputs as written).
    pub params: serde_json::Map<String, Value>,
    /// Upstream references per field: (upstream stage name, index into `Pipeline::stages`);
    /// in a gathering field the first item is the variant's id (`db[learning_rate=2e-6]`), so
    /// several variants of one stage stay apart (also in the key's `upstream` map).
    pub refs: BTreeMap<String, Vec<(String, usize)>>,
    /// Input paths per field: (path as written, resolved path).
    pub paths: BTreeMap<String, Vec<(String, PathBuf)>>,
    pub coords: Vec<Coord>,
    /// What the stage reserves while it runs (`resources:`; not part of its key).
    pub resources: Resources,
}

/// A stage after field checks, before sweep expansion.
pub struct StageDraft {
    pub name: String,
    pub kind: Arc<dyn Stage>,
    pub params: serde_json::Map<String, Value>,
    /// The fields of `params` the pipeline file does not give (their schema default).
    pub defaulted: std::collections::BTreeSet<String>,
    pub matrix: Vec<(String, Vec<Value>)>,
    /// Upstream stage names per field.
    pub refs: BTreeMap<String, Vec<String>>,
    pub paths: BTreeMap<String, Vec<(String, PathBuf)>>,
    pub resources: Resources,
}

/// A validated pipeline: stages in an order where every upstream comes first.
#[derive(Clone)]
pub struct Pipeline {
    pub name: String,
    pub file: PathBuf,
    pub stages: Vec<StageInstance>,
    /// The `executor:` section (defaults when absent).
    pub executor: ExecutorSpec,
}

impl Pipeline {
    /// Stages whose id or name equals `pattern` (a name selects all its sweep variants).
    pub fn select(&self, pattern: &str) -> Vec<usize> {
        self.stages
            .iter()
            .enumerate()
            .filter(|(_, s)| s.id == pattern || s.name == pattern)
            .map(|(i, _)| i)
            .collect()
    }
}

/// Formats a value the way ids and messages show it: `2e-6`, `400`, `0.5`, `text`.
pub fn display_value(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Number(number) => match (number.as_i64(), number.as_f64()) {
            (Some(int), _) => int.to_string(),
            (None, Some(float)) => display_float(float),
            _ => number.to_string(),
        },
        other => other.to_string(),
    }
}

/// Small and huge floats in exponent form (`2e-6`), others plainly (`0.5`).
pub fn display_float(value: f64) -> String {
    let magnitude = value.abs();
    if value != 0.0 && !(1e-3..1e6).contains(&magnitude) {
        format!("{value:e}")
    } else {
        format!("{value}")
    }
}
