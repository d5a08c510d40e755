//! Validation: from YAML text to a [`Pipeline`], collecting every error (syntax, unknown kind,
//! unknown field with a suggestion, wrong type, out-of-range value, missing stage reference,
//! cycle, missing input path, oversized sweep) instead of stopping at the first. Driven by each
//! kind's parameter schema, so new stage kinds get the same checks for free.
//!
//! This module owns the entry points and the order of the checks; each concern lives beside
//! it: `sections` (top-level sections), `stages` (raw stages, presets), `overrides` (`--set`),
//! `fields` (a stage against its kind's schema), `typecheck` (one value against its schema
//! entry), `substitution` (`${params.X}`), `matrix` (sweep axes), `inputs` (references and
//! paths) and `cycles` (the stage graph's order).
mod cycles;
mod fields;
mod inputs;
mod matrix;
mod overrides;
mod sections;
mod stages;
mod substitution;
mod typecheck;

use super::spec::KeyLocator;
use super::sweep::MAX_TOTAL_STAGES;
use super::{Diagnostic, Pipeline, PipelineError, StageDraft, StageInstance, limits, sweep};
use crate::stages::Registry;
use stages::too_many_stages;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What `load` needs besides the file.
#[derive(Clone)]
pub struct LoadOptions {
    /// `--set stage.field=value` overrides (also `params.name=value`).
    pub overrides: Vec<String>,
    pub registry: Registry,
}

impl LoadOptions {
    /// Options with no overrides, checking stages against the kinds of `registry`.
    pub fn new(registry: Registry) -> Self {
        Self {
            overrides: Vec::new(),
            registry,
        }
    }
}

/// Reads and validates a pipeline file.
pub fn load(path: &Path, options: &LoadOptions) -> Result<Pipeline, PipelineError> {
    let text = std::fs::read_to_string(path).map_err(|e| PipelineError {
        file: path.to_path_buf(),
        diagnostics: vec![Diagnostic {
            file: path.to_path_buf(),
            location: None,
            stage: None,
            field: None,
            message: format!("cannot read the file: {e}"),
        }],
    })?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    load_str(&text, path, &dir, options)
}

/// Validates pipeline text; `file` names it in messages, `dir` anchors relative paths.
pub fn load_str(
    text: &str,
    file: &Path,
    dir: &Path,
    options: &LoadOptions,
) -> Result<Pipeline, PipelineError> {
    let mut checker = Checker {
        file: file.to_path_buf(),
        dir: dir.to_path_buf(),
        locator: KeyLocator::new(text),
        diagnostics: Vec::new(),
        registry: &options.registry,
    };
    let pipeline = checker.check(text, &options.overrides);
    match pipeline {
        Some(pipeline) if checker.diagnostics.is_empty() => Ok(pipeline),
        _ => Err(PipelineError {
            file: file.to_path_buf(),
            diagnostics: checker.diagnostics,
        }),
    }
}

struct Checker<'a> {
    file: PathBuf,
    dir: PathBuf,
    locator: KeyLocator,
    diagnostics: Vec<Diagnostic>,
    registry: &'a Registry,
}

/// Raw fields of one stage, with where each came from (for positions).
struct RawStage {
    name: String,
    fields: Vec<(String, serde_yaml::Value)>,
}

impl Checker<'_> {
    fn report(
        &mut self,
        key_path: &[&str],
        stage: Option<&str>,
        field: Option<&str>,
        message: String,
    ) {
        self.diagnostics.push(Diagnostic {
            file: self.file.clone(),
            location: self.locator.find(key_path),
            stage: stage.map(str::to_string),
            field: field.map(str::to_string),
            message,
        });
    }

    fn stage_error(&mut self, stage: &str, field: &str, message: String) {
        let path: Vec<&str> = ["stages", stage]
            .into_iter()
            .chain(field.split('.'))
            .collect();
        self.report(&path, Some(stage), Some(field), message);
    }

    /// An error about the file as a whole (not a stage or field), at `location` when known.
    fn file_error(&mut self, location: Option<(usize, usize)>, message: String) {
        self.diagnostics.push(Diagnostic {
            file: self.file.clone(),
            location,
            stage: None,
            field: None,
            message,
        });
    }

    fn check(&mut self, text: &str, overrides: &[String]) -> Option<Pipeline> {
        let top = self.top_mapping(text)?;
        self.check_top_keys(&top);
        let name = self.pipeline_name(&top);
        let executor = self.executor_section(&top);
        let mut params = self.section_map(&top, "params");
        let defaults = self.section_map(&top, "defaults");
        let mut raw_stages = self.raw_stages(&top)?;
        self.apply_overrides(overrides, &mut raw_stages, &mut params);
        let names: BTreeSet<String> = raw_stages.iter().map(|s| s.name.clone()).collect();
        self.check_defaults_used(&defaults);
        let drafts: Vec<StageDraft> = raw_stages
            .iter()
            .filter_map(|raw| self.check_stage(raw, &names, &params, &defaults))
            .collect();
        self.check_cross_fields(&drafts);
        let stages_valid = self.diagnostics.is_empty() && drafts.len() == raw_stages.len();
        // Cycles among the stages that did validate are reported with the field errors.
        let order = self.check_cycles(&drafts);
        if !stages_valid {
            return None;
        }
        let stages = self.expand(drafts, &order?)?;
        Some(Pipeline {
            name,
            file: self.file.clone(),
            stages,
            executor,
        })
    }

    /// The file's top-level mapping, after the size limits and the YAML syntax.
    fn top_mapping(&mut self, text: &str) -> Option<serde_yaml::Mapping> {
        if let Some((location, message)) = limits::check_text(text) {
            self.file_error(location, message);
            return None;
        }
        // Counted from the text before parsing, so a huge pipeline fails in milliseconds.
        let located = self.locator.count_children(&["stages"]);
        if located > MAX_TOTAL_STAGES {
            self.report(&["stages"], None, Some("stages"), too_many_stages(located));
            return None;
        }
        let root: serde_yaml::Value = match serde_yaml::from_str(text) {
            Ok(value) => value,
            Err(error) => {
                let location = error.location().map(|l| (l.line(), l.column()));
                let message = format!("invalid YAML: {}", strip_location(&error.to_string()));
                self.file_error(location, message);
                return None;
            }
        };
        let serde_yaml::Value::Mapping(top) = root else {
            self.report(
                &[],
                None,
                None,
                "a pipeline must be a mapping with a `stages:` section".to_string(),
            );
            return None;
        };
        Some(top)
    }

    /// The stage instances of the sweep expansion; a too-large sweep is reported at the
    /// stage's `matrix` when it has one.
    fn expand(&mut self, drafts: Vec<StageDraft>, order: &[usize]) -> Option<Vec<StageInstance>> {
        let swept: BTreeSet<String> = drafts
            .iter()
            .filter(|d| !d.matrix.is_empty())
            .map(|d| d.name.clone())
            .collect();
        match sweep::expand(drafts, order) {
            Ok(stages) => Some(stages),
            Err(error) if swept.contains(&error.stage) => {
                self.stage_error(&error.stage, "matrix", error.message);
                None
            }
            Err(error) => {
                let path = ["stages", error.stage.as_str()];
                self.report(&path, Some(&error.stage), None, error.message);
                None
            }
        }
    }
}

/// Removes serde_yaml's trailing " at line L column C" (the location is printed separately).
fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(at) => message[..at].to_string(),
        None => message.to_string(),
    }
}
