//! Validation: from YAML text to a [`Pipeline`], collecting every error (syntax, unknown kind,
//! unknown field with a suggestion, wrong type, out-of-range value, missing stage reference,
//! cycle, missing input path, oversized sweep) instead of stopping at the first. Driven by each
//! kind's parameter schema, so new stage kinds get the same checks for free.
use super::spec::{KeyLocator, STAGE_KEYS, TOP_LEVEL_KEYS, describe, key_text, yaml_to_json};
use super::sweep::MAX_TOTAL_STAGES;
use super::{Diagnostic, Pipeline, PipelineError, limits, presets, sweep};
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

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            overrides: Vec::new(),
            registry: crate::stages::registry(),
        }
    }
}

/// A stage after field checks, before sweep expansion.
pub struct StageDraft {
    pub name: String,
    pub kind: Arc<dyn Stage>,
    pub params: serde_json::Map<String, Value>,
    pub matrix: Vec<(String, Vec<Value>)>,
    /// Upstream stage names per field.
    pub refs: BTreeMap<String, Vec<String>>,
    pub paths: BTreeMap<String, Vec<(String, PathBuf)>>,
    pub resources: super::Resources,
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

/// Closest candidate to `word` (edit distance at most a third of its length, at least 1).
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (strsim::osa_distance(word, c), c))
        .filter(|(distance, _)| *distance <= limit && *distance < word.chars().count())
        .min()
        .map(|(_, c)| c)
}

fn did_you_mean(word: &str, candidates: &[&str]) -> String {
    match suggest(word, candidates.iter().copied()) {
        Some(best) => format!("; did you mean `{best}`?"),
        None => format!(" (expected one of: {})", candidates.join(", ")),
    }
}

/// A diffusers folder, or a folder whose `model/` is one (a `textual_inversion` output).
fn is_model_folder(path: &Path) -> bool {
    path.join("model_index.json").is_file() || path.join("model/model_index.json").is_file()
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

    fn check(&mut self, text: &str, overrides: &[String]) -> Option<Pipeline> {
        if let Some((location, message)) = limits::check_text(text) {
            self.diagnostics.push(Diagnostic {
                file: self.file.clone(),
                location,
                stage: None,
                field: None,
                message,
            });
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
                self.diagnostics.push(Diagnostic {
                    file: self.file.clone(),
                    location,
                    stage: None,
                    field: None,
                    message,
                });
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

    /// `resources: {gpus: N}`: N device slots held while the stage runs (0 to
    /// MAX_GPUS_PER_STAGE; a GPU kind needs at least one).
    fn check_resources(
        &mut self,
        stage: &str,
        value: &Value,
        class: crate::stages::DeviceClass,
    ) -> Option<super::Resources> {
        const FIELDS: [&str; 1] = ["gpus"];
        let Some(map) = value.as_object() else {
            let message = "must be a mapping such as `{gpus: 1}`".to_string();
            self.stage_error(stage, "resources", message);
            return None;
        };
        let mut resources = super::Resources::default();
        let mut ok = true;
        for (name, value) in map {
            let field = format!("resources.{name}");
            if name != "gpus" {
                let hint = did_you_mean(name, &FIELDS);
                self.stage_error(stage, &field, format!("unknown resource{hint}"));
                ok = false;
                continue;
            }
            let gpus = value.as_u64().map(|n| n as usize);
            let minimum = usize::from(class == crate::stages::DeviceClass::Gpu);
            match gpus {
                Some(n) if (minimum..=super::MAX_GPUS_PER_STAGE).contains(&n) => {
                    resources.gpus = Some(n)
                }
                _ => {
                    let message = format!(
                        "must be a whole number from {minimum} to {}, got {value}{}",
                        super::MAX_GPUS_PER_STAGE,
                        if minimum == 1 {
                            " (this kind runs on a device)"
                        } else {
                            ""
                        }
                    );
                    self.stage_error(stage, &field, message);
                    ok = false;
                }
            }
        }
        ok.then_some(resources)
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
                        self.stage_error(stage, spec.name, format!("`{item}` is not a model folder (no model_index.json in it or in its `model/`); give a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a stage that writes one"));
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
        let index: BTreeMap<&str, usize> = drafts
            .iter()
            .enumerate()
            .map(|(i, d)| (d.name.as_str(), i))
            .collect();
        let mut graph = petgraph::graph::DiGraph::<usize, ()>::new();
        let nodes: Vec<_> = (0..drafts.len()).map(|i| graph.add_node(i)).collect();
        for (i, draft) in drafts.iter().enumerate() {
            for upstream in draft.refs.values().flatten() {
                if let Some(&u) = index.get(upstream.as_str()) {
                    graph.update_edge(nodes[u], nodes[i], ());
                }
            }
        }
        if petgraph::algo::toposort(&graph, None).is_ok() {
            return Some(declaration_order_topological(drafts, &index));
        }
        for component in petgraph::algo::tarjan_scc(&graph) {
            if component.len() < 2 {
                continue;
            }
            let members: BTreeSet<usize> = component.iter().map(|n| graph[*n]).collect();
            let cycle = cycle_path(drafts, &members, &index);
            let first = &drafts[cycle[0]].name;
            let text: Vec<&str> = cycle
                .iter()
                .chain(cycle.first())
                .map(|&i| drafts[i].name.as_str())
                .collect();
            self.report(
                &["stages", first],
                Some(first),
                None,
                format!("stages form a cycle: {}", text.join(" → ")),
            );
        }
        None
    }
}

/// Kahn's algorithm picking the earliest-declared ready stage first, so output order follows
/// the file wherever the edges allow.
fn declaration_order_topological(
    drafts: &[StageDraft],
    index: &BTreeMap<&str, usize>,
) -> Vec<usize> {
    let upstreams: Vec<BTreeSet<usize>> = drafts
        .iter()
        .map(|d| {
            d.refs
                .values()
                .flatten()
                .filter_map(|u| index.get(u.as_str()).copied())
                .collect()
        })
        .collect();
    let mut waiting: Vec<usize> = upstreams.iter().map(BTreeSet::len).collect();
    let mut ready: BTreeSet<usize> = (0..drafts.len()).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(drafts.len());
    while let Some(next) = ready.pop_first() {
        order.push(next);
        for (dependent, ups) in upstreams.iter().enumerate() {
            if ups.contains(&next) {
                waiting[dependent] -= 1;
                if waiting[dependent] == 0 {
                    ready.insert(dependent);
                }
            }
        }
    }
    order
}

/// Walks a strongly connected component from its first-declared stage back to it.
fn cycle_path(
    drafts: &[StageDraft],
    members: &BTreeSet<usize>,
    index: &BTreeMap<&str, usize>,
) -> Vec<usize> {
    let Some(&start) = members.iter().next() else {
        return Vec::new();
    };
    let mut path = vec![start];
    let mut current = start;
    // Follow downstream edges (stage → a member that depends on it), preferring the lowest index.
    loop {
        let next = members.iter().copied().find(|&m| {
            drafts[m]
                .refs
                .values()
                .flatten()
                .any(|u| index.get(u.as_str()) == Some(&current))
                && (m == start || !path.contains(&m))
        });
        match next {
            Some(m) if m == start => break,
            Some(m) => {
                path.push(m);
                current = m;
            }
            None => break,
        }
    }
    path
}

fn string_items(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

/// Why `value` does not fit `spec`, if it does not.
pub fn type_error(spec: &ParamSpec, value: &Value) -> Option<String> {
    if value.is_null() && spec.default == Some(Value::Null) {
        return None;
    }
    if !fits_type(spec.ty, value) {
        return Some(format!(
            "expected {}, found {}",
            spec.ty.describe(),
            describe_misfit(spec.ty, value)
        ));
    }
    if let Some(message) = spec.allowed.and_then(|allowed| not_allowed(allowed, value)) {
        return Some(message);
    }
    numbers_of(value)
        .into_iter()
        .find_map(|(number, item)| range_error(spec, number, item))
}

fn fits_type(ty: ParamType, value: &Value) -> bool {
    let all = || {
        value
            .as_array()
            .is_some_and(|a| a.iter().all(|item| item_fits(ty, item)))
    };
    match ty {
        ParamType::String | ParamType::Path | ParamType::StageRef | ParamType::PathOrStageRef => {
            value.is_string()
        }
        ParamType::Integer => is_integer(value),
        ParamType::Number => value.is_number(),
        ParamType::Bool => value.is_boolean(),
        ParamType::StringList => all(),
        ParamType::IntegerList
        | ParamType::NumberList
        | ParamType::PathList
        | ParamType::StageRefList
        | ParamType::PathOrStageRefList => item_fits(ty, value) || all(),
    }
}

fn is_integer(value: &Value) -> bool {
    value.is_i64() || value.is_u64()
}

/// Whether one item of a list type fits (`false` for scalar types).
fn item_fits(ty: ParamType, item: &Value) -> bool {
    match ty {
        ParamType::IntegerList => is_integer(item),
        ParamType::NumberList => item.is_number(),
        ParamType::StringList
        | ParamType::PathList
        | ParamType::StageRefList
        | ParamType::PathOrStageRefList => item.is_string(),
        _ => false,
    }
}

/// The value, or for a list of a list type its first item that does not fit (`the string
/// "fast" in the list`).
fn describe_misfit(ty: ParamType, value: &Value) -> String {
    let bad_item = value
        .as_array()
        .and_then(|items| items.iter().find(|item| !item_fits(ty, item)))
        .filter(|_| is_list_type(ty));
    match bad_item {
        Some(item) => format!("{} in the list", describe(item)),
        None => describe(value),
    }
}

fn is_list_type(ty: ParamType) -> bool {
    matches!(
        ty,
        ParamType::StringList
            | ParamType::IntegerList
            | ParamType::NumberList
            | ParamType::PathList
            | ParamType::StageRefList
            | ParamType::PathOrStageRefList
    )
}

/// The first string of `value` (a string or a list of them) that is not in `allowed`.
fn not_allowed(allowed: &[&str], value: &Value) -> Option<String> {
    let items: Vec<&str> = match value {
        Value::String(text) => vec![text.as_str()],
        Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let bad = items.into_iter().find(|item| !allowed.contains(item))?;
    Some(format!(
        "unknown value \"{bad}\"{}",
        did_you_mean(bad, allowed)
    ))
}

/// The numbers in a scalar or a list, each with the value it came from.
fn numbers_of(value: &Value) -> Vec<(f64, &Value)> {
    match value {
        Value::Array(items) => items
            .iter()
            .filter_map(|v| v.as_f64().map(|n| (n, v)))
            .collect(),
        other => other.as_f64().map(|n| (n, other)).into_iter().collect(),
    }
}

fn range_error(spec: &ParamSpec, number: f64, value: &Value) -> Option<String> {
    if let Some(step) = spec.step.filter(|step| number % (*step as f64) != 0.0) {
        return Some(format!(
            "{} is not a multiple of {step} (the VAE works in blocks of 8 pixels); use {}",
            super::display_value(value),
            ((number / step as f64).round() as i64).max(1) * step
        ));
    }
    let below = spec.min.is_some_and(|min| number < min);
    let above = spec.max.is_some_and(|max| number > max);
    (below || above).then(|| {
        let integral = matches!(spec.ty, ParamType::Integer | ParamType::IntegerList);
        let show = |bound: f64| display_bound(bound, integral);
        let (min, max) = (spec.min.map(show), spec.max.map(show));
        let bounds = match (min, max) {
            (Some(min), Some(max)) => format!("between {min} and {max}"),
            (Some(min), None) => format!("at least {min}"),
            (None, Some(max)) => format!("at most {max}"),
            (None, None) => String::new(),
        };
        format!(
            "{} is out of range: must be {bounds}",
            super::display_value(value)
        )
    })
}

/// A range bound as written in messages: integers in full for integer fields (`9007199254740991`,
/// not `9.007199254740991e15`).
fn display_bound(bound: f64, integral: bool) -> String {
    /// Integers up to 2^53 are exact in an f64.
    const EXACT_LIMIT: f64 = 9_007_199_254_740_992.0;
    if integral && bound.fract() == 0.0 && bound.abs() <= EXACT_LIMIT {
        format!("{}", bound as i64)
    } else {
        super::display_float(bound)
    }
}

/// Replaces `${params.NAME}`: a whole-string reference keeps the value's type.
fn substitute_params(
    value: Value,
    params: &serde_json::Map<String, Value>,
) -> Result<Value, String> {
    match value {
        Value::String(text) => substitute_text(&text, params),
        Value::Array(items) => Ok(Value::Array(
            items
                .into_iter()
                .map(|v| substitute_params(v, params))
                .collect::<Result<_, _>>()?,
        )),
        Value::Object(map) => Ok(Value::Object(
            map.into_iter()
                .map(|(k, v)| substitute_params(v, params).map(|v| (k, v)))
                .collect::<Result<_, _>>()?,
        )),
        other => Ok(other),
    }
}

const PARAM_PREFIX: &str = "${params.";

fn substitute_text(text: &str, params: &serde_json::Map<String, Value>) -> Result<Value, String> {
    if !text.contains(PARAM_PREFIX) {
        return Ok(Value::String(text.to_string()));
    }
    let lookup = |name: &str| {
        params.get(name).cloned().ok_or_else(|| {
            let hint = match suggest(name, params.keys().map(String::as_str)) {
                Some(best) => format!("; did you mean `{best}`?"),
                None => " (declare it under `params:`)".to_string(),
            };
            format!("unknown parameter `${{params.{name}}}`{hint}")
        })
    };
    if let Some(name) = text
        .strip_prefix(PARAM_PREFIX)
        .and_then(|rest| rest.strip_suffix('}'))
        .filter(|n| !n.contains('}'))
    {
        return lookup(name);
    }
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find(PARAM_PREFIX) {
        out.push_str(&rest[..start]);
        let after = &rest[start + PARAM_PREFIX.len()..];
        let Some(end) = after.find('}') else {
            return Err(format!("unclosed `${{params.` in \"{text}\""));
        };
        out.push_str(&super::display_value(&lookup(&after[..end])?));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

/// Removes serde_yaml's trailing " at line L column C" (the location is printed separately).
fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(at) => message[..at].to_string(),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn suggestions_allow_typos_and_transpositions_but_not_unrelated_words() {
        assert_eq!(suggest("comand", ["command", "images"]), Some("command"));
        assert_eq!(suggest("rnu", ["run", "needs"]), Some("run"));
        assert_eq!(
            suggest("learnign_rate", ["learning_rate", "steps"]),
            Some("learning_rate")
        );
        assert_eq!(suggest("b", ["a"]), None);
        assert_eq!(suggest("zzz", ["prep", "train"]), None);
    }

    #[test]
    fn params_substitute_typed_when_whole_and_as_text_inside() {
        let params = json!({"lr": 2e-6, "steps": 400, "name": "dog"});
        let params = params.as_object().expect("object");
        assert_eq!(substitute_text("${params.steps}", params), Ok(json!(400)));
        assert_eq!(
            substitute_text("train --lr ${params.lr} ${params.name}", params),
            Ok(json!("train --lr 2e-6 dog"))
        );
        assert_eq!(
            substitute_text("echo ${HOME}", params),
            Ok(json!("echo ${HOME}"))
        );
        assert_eq!(
            substitute_text("${params.lrr}", params),
            Err("unknown parameter `${params.lrr}`; did you mean `lr`?".to_string())
        );
    }
}
