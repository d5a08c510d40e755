//! Validation: from YAML text to a [`Pipeline`], collecting every error (syntax, unknown kind,
//! unknown field with a suggestion, wrong type, out-of-range value, missing stage reference,
//! cycle, missing input path, oversized sweep) instead of stopping at the first. Driven by each
//! kind's parameter schema, so new stage kinds get the same checks for free.
use super::cycles;
use super::spec::{KeyLocator, STAGE_KEYS, TOP_LEVEL_KEYS, describe, key_text, yaml_to_json};
use super::substitution::substitute_params;
use super::suggest::{did_you_mean, suggest};
use super::sweep::MAX_TOTAL_STAGES;
use super::typecheck::{string_items, type_error};
use super::{Diagnostic, Pipeline, PipelineError, StageDraft, limits, presets, sweep};
use crate::stages::{ParamSpec, ParamType, Registry, Stage};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// A diffusers folder, a folder whose `model/` is one (a `textual_inversion` output), or a
/// single-file `.safetensors` checkpoint (read into a folder when the stage runs).
fn is_model_folder(path: &Path) -> bool {
    path.join("model_index.json").is_file()
        || path.join("model/model_index.json").is_file()
        || (path.is_file() && path.extension().is_some_and(|e| e == "safetensors"))
}

fn too_many_stages(count: usize) -> String {
    format!(
        "the pipeline has {count} stages, over the limit of {MAX_TOTAL_STAGES}; split it into several pipelines"
    )
}

/// A name as messages show it: the first 40 characters of a very long one, then `…`.
fn short_name(name: &str) -> String {
    match name.char_indices().nth(40) {
        Some((end, _)) => format!("{}…", &name[..end]),
        None => name.to_string(),
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
        let order = order?;
        let swept: BTreeSet<String> = drafts
            .iter()
            .filter(|d| !d.matrix.is_empty())
            .map(|d| d.name.clone())
            .collect();
        match sweep::expand(drafts, &order) {
            Ok(stages) => Some(Pipeline {
                name,
                file: self.file.clone(),
                stages,
                executor,
            }),
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

    fn check_top_keys(&mut self, top: &serde_yaml::Mapping) {
        for key in top.keys() {
            let key = key_text(key).unwrap_or_default();
            if !TOP_LEVEL_KEYS.contains(&key.as_str()) {
                let hint = did_you_mean(&key, &TOP_LEVEL_KEYS);
                self.report(
                    &[&key],
                    None,
                    None,
                    format!("unknown top-level section `{key}`{hint}"),
                );
            }
        }
    }

    fn pipeline_name(&mut self, top: &serde_yaml::Mapping) -> String {
        let stem = self
            .file
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "pipeline".to_string());
        match top.get("name") {
            None => stem,
            Some(serde_yaml::Value::String(name)) if limits::name_problem(name).is_none() => {
                name.clone()
            }
            Some(value) => {
                let problem = value.as_str().and_then(limits::name_problem);
                let message = match problem {
                    Some(problem) if problem.contains("characters long") => {
                        format!("the pipeline name {problem}")
                    }
                    _ => "the pipeline name must be a string of letters, digits, `_` and `-`"
                        .to_string(),
                };
                self.report(&["name"], None, Some("name"), message);
                stem
            }
        }
    }

    /// A default that no registered stage kind has as a field is most likely a typo.
    fn check_defaults_used(&mut self, defaults: &serde_json::Map<String, Value>) {
        let fields: BTreeSet<&'static str> = self
            .registry
            .all()
            .flat_map(|kind| kind.schema().into_iter().map(|spec| spec.name))
            .collect();
        for key in defaults.keys().filter(|k| !fields.contains(k.as_str())) {
            let hint = match suggest(key, fields.iter().copied()) {
                Some(best) => format!("; did you mean `{best}`?"),
                None => String::new(),
            };
            let message =
                format!("no stage kind has a field `{key}`, so this default applies nowhere{hint}");
            self.report(
                &["defaults", key],
                None,
                Some(&format!("defaults.{key}")),
                message,
            );
        }
    }

    fn section_map(
        &mut self,
        top: &serde_yaml::Mapping,
        section: &str,
    ) -> serde_json::Map<String, Value> {
        match top.get(section).map(yaml_to_json) {
            None | Some(Ok(Value::Null)) => serde_json::Map::new(),
            Some(Ok(Value::Object(map))) => map,
            Some(Ok(other)) => {
                self.report(
                    &[section],
                    None,
                    Some(section),
                    format!(
                        "expected a mapping of names to values, found {}",
                        describe(&other)
                    ),
                );
                serde_json::Map::new()
            }
            Some(Err(message)) => {
                self.report(&[section], None, Some(section), message);
                serde_json::Map::new()
            }
        }
    }

    fn raw_stages(&mut self, top: &serde_yaml::Mapping) -> Option<Vec<RawStage>> {
        let stages = match top.get("stages") {
            Some(serde_yaml::Value::Mapping(map)) if !map.is_empty() => map,
            Some(serde_yaml::Value::Mapping(_)) | Some(serde_yaml::Value::Null) | None => {
                self.report(
                    &["stages"],
                    None,
                    Some("stages"),
                    "the pipeline has no stages: add a `stages:` mapping from stage name to stage"
                        .to_string(),
                );
                return None;
            }
            Some(_) => {
                self.report(
                    &["stages"],
                    None,
                    Some("stages"),
                    "`stages` must be a mapping from stage name to stage".to_string(),
                );
                return None;
            }
        };
        if stages.len() > MAX_TOTAL_STAGES {
            self.report(
                &["stages"],
                None,
                Some("stages"),
                too_many_stages(stages.len()),
            );
            return None;
        }
        let mut raw = Vec::new();
        for (key, value) in stages {
            let name = key_text(key).unwrap_or_default();
            if let Some(problem) = limits::name_problem(&name) {
                let shown = short_name(&name);
                self.report(
                    &["stages", &name],
                    Some(&shown),
                    None,
                    match problem.starts_with("may only") {
                        true => format!("stage names {problem}"),
                        false => format!("the stage name {problem}"),
                    },
                );
                continue;
            }
            let Some(mapping) = value.as_mapping() else {
                self.report(
                    &["stages", &name],
                    Some(&name),
                    None,
                    "a stage must be a mapping with at least `kind:`".to_string(),
                );
                continue;
            };
            let fields = self.merge_preset(&name, mapping);
            raw.push(RawStage { name, fields });
        }
        Some(raw)
    }

    /// The stage's fields with a `use:` preset's fields underneath.
    fn merge_preset(
        &mut self,
        stage: &str,
        mapping: &serde_yaml::Mapping,
    ) -> Vec<(String, serde_yaml::Value)> {
        let own: Vec<(String, serde_yaml::Value)> = mapping
            .iter()
            .map(|(k, v)| (key_text(k).unwrap_or_default(), v.clone()))
            .collect();
        let Some((_, used)) = own.iter().find(|(k, _)| k == "use") else {
            return own;
        };
        let Some(preset_name) = used.as_str() else {
            self.stage_error(
                stage,
                "use",
                "expected the name of a preset in `stages/`".to_string(),
            );
            return own;
        };
        let Some(path) = presets::find(&self.dir, preset_name) else {
            self.stage_error(stage, "use", format!("no preset `stages/{preset_name}.yaml` next to the pipeline or in a parent folder"));
            return own;
        };
        let preset = match presets::read(&path) {
            Ok(preset) => preset,
            Err(message) => {
                self.stage_error(stage, "use", message);
                return own;
            }
        };
        let mut merged: Vec<(String, serde_yaml::Value)> = Vec::new();
        for (key, value) in preset {
            let key = key_text(&key).unwrap_or_default();
            if key == "use" {
                self.stage_error(
                    stage,
                    "use",
                    format!("preset `{}` may not `use:` another preset", path.display()),
                );
            } else if !own.iter().any(|(k, _)| *k == key) {
                merged.push((key, value));
            }
        }
        merged.extend(own.into_iter().filter(|(k, _)| k != "use"));
        merged
    }

    fn apply_overrides(
        &mut self,
        overrides: &[String],
        stages: &mut [RawStage],
        params: &mut serde_json::Map<String, Value>,
    ) {
        for text in overrides {
            let parsed = text.split_once('=').and_then(|(target, value)| {
                target
                    .split_once('.')
                    .map(|(stage, field)| (stage, field, value))
            });
            let Some((stage, field, value_text)) =
                parsed.filter(|(s, f, _)| !s.is_empty() && !f.is_empty())
            else {
                self.report(
                    &[],
                    None,
                    None,
                    format!("--set `{text}`: expected STAGE.FIELD=VALUE (or params.NAME=VALUE)"),
                );
                continue;
            };
            let value = serde_yaml::from_str::<serde_yaml::Value>(value_text)
                .unwrap_or_else(|_| serde_yaml::Value::String(value_text.to_string()));
            if stage == "params" && !params.contains_key(field) {
                let declared: Vec<&str> = params.keys().map(String::as_str).collect();
                let hint = match suggest(field, declared.iter().copied()) {
                    Some(near) => format!("; did you mean `{near}`?"),
                    None if declared.is_empty() => "; it declares none".to_string(),
                    None => format!(" (it declares: {})", declared.join(", ")),
                };
                self.report(
                    &[],
                    None,
                    None,
                    format!(
                        "--set `{text}`: the pipeline has no param `{field}` under `params:`{hint}"
                    ),
                );
                continue;
            }
            if stage == "params" {
                match yaml_to_json(&value) {
                    Ok(json) => {
                        params.insert(field.to_string(), json);
                    }
                    Err(message) => {
                        self.report(&[], None, None, format!("--set `{text}`: {message}"))
                    }
                }
                continue;
            }
            let Some(target) = stages.iter_mut().find(|s| s.name == stage) else {
                let names: Vec<String> = stages.iter().map(|s| s.name.clone()).collect();
                let hint =
                    did_you_mean(stage, &names.iter().map(String::as_str).collect::<Vec<_>>());
                self.report(
                    &[],
                    None,
                    None,
                    format!("--set `{text}`: no stage named `{stage}`{hint}"),
                );
                continue;
            };
            target.fields.retain(|(k, _)| k != field);
            target.fields.push((field.to_string(), value));
        }
    }

    fn check_stage(
        &mut self,
        raw: &RawStage,
        names: &BTreeSet<String>,
        params: &serde_json::Map<String, Value>,
        defaults: &serde_json::Map<String, Value>,
    ) -> Option<StageDraft> {
        let stage = raw.name.as_str();
        let kind = self.stage_kind(raw)?;
        let schema = kind.schema();
        let field_names: Vec<&str> = STAGE_KEYS
            .iter()
            .copied()
            .chain(schema.iter().map(|p| p.name))
            .collect();
        let mut values = serde_json::Map::new();
        let mut matrix = Vec::new();
        let mut resources = super::Resources::default();
        let mut ok = true;
        // Fields present (even if invalid) or suggested for a typo are not also "missing".
        let mut accounted: BTreeSet<&str> = BTreeSet::new();
        for (field, raw_value) in &raw.fields {
            if field == "kind" || field == "use" {
                continue;
            }
            accounted.insert(field.as_str());
            let value = match yaml_to_json(raw_value).and_then(|v| substitute_params(v, params)) {
                Ok(value) => value,
                Err(message) => {
                    self.stage_error(stage, field, message);
                    ok = false;
                    continue;
                }
            };
            if field == "matrix" {
                matrix = self
                    .check_matrix(stage, &value, &schema)
                    .unwrap_or_else(|| {
                        ok = false;
                        Vec::new()
                    });
            } else if field == "resources" {
                match self.check_resources(stage, &value, kind.device_class()) {
                    Some(checked) => resources = checked,
                    None => ok = false,
                }
            } else if let Some(spec) = schema.iter().find(|p| p.name == field) {
                ok &= self.check_value(stage, field, spec, &value);
                values.insert(field.clone(), value);
            } else {
                if let Some(best) = suggest(field, field_names.iter().copied()) {
                    accounted.insert(best);
                }
                let hint = did_you_mean(field, &field_names);
                self.stage_error(
                    stage,
                    field,
                    format!("unknown field for kind `{}`{hint}", kind.kind()),
                );
                ok = false;
            }
        }
        for (field, _) in &matrix {
            if values.contains_key(field) {
                self.stage_error(
                    stage,
                    field,
                    "is both set and swept in `matrix`; keep one".to_string(),
                );
                ok = false;
            }
        }
        for spec in &schema {
            let swept = matrix.iter().any(|(f, _)| f == spec.name);
            if values.contains_key(spec.name) || swept || accounted.contains(spec.name) {
                continue;
            }
            if let Some(default) = defaults.get(spec.name) {
                ok &= self.check_value(stage, spec.name, spec, default);
                values.insert(spec.name.to_string(), default.clone());
            } else if let Some(default) = &spec.default {
                values.insert(spec.name.to_string(), default.clone());
            } else {
                self.report(
                    &["stages", stage],
                    Some(stage),
                    Some(spec.name),
                    format!("missing required field ({})", spec.doc),
                );
                ok = false;
            }
        }
        let (refs, paths) = self.resolve_inputs(stage, &schema, &values, names)?;
        if !ok {
            return None;
        }
        Some(StageDraft {
            name: stage.to_string(),
            kind,
            params: values,
            matrix,
            refs,
            paths,
            resources,
        })
    }

    /// Each kind's rules between fields and against the stages its fields name
    /// ([`Stage::check_fields`](crate::stages::Stage::check_fields)), before anything runs.
    fn check_cross_fields(&mut self, drafts: &[StageDraft]) {
        let by_name: BTreeMap<&str, &StageDraft> =
            drafts.iter().map(|d| (d.name.as_str(), d)).collect();
        for draft in drafts {
            let upstream = (draft.refs.iter())
                .map(|(field, names)| {
                    let stages = (names.iter())
                        .filter_map(|name| by_name.get(name.as_str()))
                        .map(|up| crate::stages::UpstreamView {
                            name: &up.name,
                            kind: up.kind.kind(),
                            params: &up.params,
                        })
                        .collect();
                    (field.clone(), stages)
                })
                .collect();
            let view = crate::stages::FieldView {
                params: &draft.params,
                upstream,
            };
            for (field, message) in draft.kind.check_fields(&view) {
                self.stage_error(&draft.name, field, message);
            }
        }
    }

    /// `resources:` (docs/pipelines.md "Devices", docs/cluster.md): device slots held while
    /// the stage runs (0 to MAX_GPUS_PER_STAGE; a GPU kind needs at least one) and sbatch flags.
    fn check_resources(
        &mut self,
        stage: &str,
        value: &Value,
        class: crate::stages::DeviceClass,
    ) -> Option<super::Resources> {
        let min_gpus = usize::from(class == crate::stages::DeviceClass::Gpu);
        match super::resources::parse_resources(value, "resources", min_gpus) {
            Ok(resources) => Some(resources),
            Err(problems) => {
                for (field, message) in problems {
                    self.stage_error(stage, &field, message);
                }
                None
            }
        }
    }

    /// The `executor:` section; its `kinds:` must name known stage kinds.
    fn executor_section(&mut self, top: &serde_yaml::Mapping) -> super::ExecutorSpec {
        let value = match top.get("executor").map(yaml_to_json) {
            None | Some(Ok(Value::Null)) => return super::ExecutorSpec::default(),
            Some(Ok(value)) => value,
            Some(Err(message)) => {
                self.report(&["executor"], None, Some("executor"), message);
                return super::ExecutorSpec::default();
            }
        };
        let (spec, problems) = super::resources::parse_executor(&value);
        for (field, message) in problems {
            let path: Vec<&str> = field.split('.').collect();
            self.report(&path, None, Some(&field), message);
        }
        for kind in spec.kinds.keys() {
            if self.registry.get(kind).is_none() {
                let names = self.registry.names();
                let hint = did_you_mean(kind, &names);
                let field = format!("executor.kinds.{kind}");
                self.report(
                    &["executor", "kinds", kind],
                    None,
                    Some(&field),
                    format!("unknown stage kind{hint}"),
                );
            }
        }
        spec
    }

    fn stage_kind(&mut self, raw: &RawStage) -> Option<Arc<dyn Stage>> {
        let stage = raw.name.as_str();
        let Some((_, kind_value)) = raw.fields.iter().find(|(k, _)| k == "kind") else {
            if raw.fields.iter().any(|(k, _)| k == "use") {
                return None; // the `use:` preset could not be merged; that error names the cause
            }
            let hint = format!("(known kinds: {})", self.registry.names().join(", "));
            self.report(
                &["stages", stage],
                Some(stage),
                None,
                format!("missing `kind:` {hint}"),
            );
            return None;
        };
        let Some(kind) = kind_value.as_str() else {
            self.stage_error(
                stage,
                "kind",
                format!(
                    "expected the name of a stage kind (known kinds: {})",
                    self.registry.names().join(", ")
                ),
            );
            return None;
        };
        if let Some(found) = self.registry.get(kind) {
            return Some(found.clone());
        }
        let hint = did_you_mean(kind, &self.registry.names());
        self.stage_error(stage, "kind", format!("unknown stage kind `{kind}`{hint}"));
        None
    }

    fn check_matrix(
        &mut self,
        stage: &str,
        value: &Value,
        schema: &[ParamSpec],
    ) -> Option<Vec<(String, Vec<Value>)>> {
        let Value::Object(map) = value else {
            self.stage_error(
                stage,
                "matrix",
                format!(
                    "expected a mapping from field to a list of values, found {}",
                    describe(value)
                ),
            );
            return None;
        };
        let mut axes = Vec::new();
        let mut ok = true;
        for (field, values) in map {
            let path = format!("matrix.{field}");
            let Some(spec) = schema.iter().find(|p| p.name == field) else {
                let names: Vec<&str> = schema.iter().map(|p| p.name).collect();
                self.stage_error(
                    stage,
                    &path,
                    format!(
                        "cannot sweep unknown field `{field}`{}",
                        did_you_mean(field, &names)
                    ),
                );
                ok = false;
                continue;
            };
            if spec.ty.is_input() {
                self.stage_error(
                    stage,
                    &path,
                    "input fields (paths, stage references) cannot be swept".to_string(),
                );
                ok = false;
                continue;
            }
            let Value::Array(list) = values else {
                self.stage_error(
                    stage,
                    &path,
                    format!(
                        "expected a list of values to sweep, found {}",
                        describe(values)
                    ),
                );
                ok = false;
                continue;
            };
            if list.is_empty() {
                self.stage_error(
                    stage,
                    &path,
                    "the list of values to sweep is empty".to_string(),
                );
                ok = false;
                continue;
            }
            for item in list {
                ok &= self.check_value(stage, &path, spec, item);
            }
            axes.push((field.clone(), list.clone()));
        }
        ok.then_some(axes)
    }

    /// Type and range of one value; reports and returns false when wrong.
    fn check_value(&mut self, stage: &str, field: &str, spec: &ParamSpec, value: &Value) -> bool {
        match type_error(spec, value) {
            Some(message) => {
                self.stage_error(stage, field, message);
                false
            }
            None => true,
        }
    }

    #[allow(clippy::type_complexity)]
    fn resolve_inputs(
        &mut self,
        stage: &str,
        schema: &[ParamSpec],
        values: &serde_json::Map<String, Value>,
        names: &BTreeSet<String>,
    ) -> Option<(
        BTreeMap<String, Vec<String>>,
        BTreeMap<String, Vec<(String, PathBuf)>>,
    )> {
        let mut refs = BTreeMap::new();
        let mut paths = BTreeMap::new();
        let mut ok = true;
        for spec in schema.iter().filter(|s| s.ty.is_input()) {
            let items = string_items(values.get(spec.name));
            let mut field_refs = Vec::new();
            let mut field_paths = Vec::new();
            for item in items {
                let either = matches!(
                    spec.ty,
                    ParamType::PathOrStageRef | ParamType::PathOrStageRefList
                );
                let as_ref = matches!(spec.ty, ParamType::StageRef | ParamType::StageRefList)
                    || (either && names.contains(&item));
                if as_ref {
                    ok &= self.check_reference(stage, spec.name, &item, names);
                    field_refs.push(item);
                } else {
                    let resolved = self.dir.join(&item);
                    if !resolved.exists() {
                        let also = if either {
                            " and is not a stage name"
                        } else {
                            ""
                        };
                        self.stage_error(stage, spec.name, format!("input `{item}` does not exist{also} (paths are relative to the pipeline's folder)"));
                        ok = false;
                    } else if spec.model && !is_model_folder(&resolved) {
                        self.stage_error(stage, spec.name, format!("`{item}` is not a model folder (no model_index.json in it or in its `model/`); give a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), a single-file `.safetensors` checkpoint or a stage that writes one"));
                        ok = false;
                    }
                    field_paths.push((item, resolved));
                }
            }
            if !field_refs.is_empty() {
                refs.insert(spec.name.to_string(), field_refs);
            }
            if !field_paths.is_empty() {
                paths.insert(spec.name.to_string(), field_paths);
            }
        }
        ok.then_some((refs, paths))
    }

    fn check_reference(
        &mut self,
        stage: &str,
        field: &str,
        target: &str,
        names: &BTreeSet<String>,
    ) -> bool {
        if target == stage {
            self.stage_error(stage, field, "a stage cannot depend on itself".to_string());
            return false;
        }
        if names.contains(target) {
            return true;
        }
        let all: Vec<&str> = names.iter().map(String::as_str).collect();
        let hint = match suggest(target, all.iter().copied()) {
            Some(best) => format!("; did you mean `{best}`?"),
            None => String::new(),
        };
        self.stage_error(
            stage,
            field,
            format!("refers to stage `{target}`, which does not exist{hint}"),
        );
        false
    }

    /// Orders stages so every upstream comes first; reports each cycle by its stages.
    fn check_cycles(&mut self, drafts: &[StageDraft]) -> Option<Vec<usize>> {
        match cycles::order(drafts) {
            Ok(order) => Some(order),
            Err(found) => {
                for (first, message) in found {
                    self.report(&["stages", &first], Some(&first), None, message);
                }
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
